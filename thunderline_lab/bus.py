"""In-process publish/subscribe for events, with glob patterns and telemetry hooks.

The store writer, the MLflow logger and the live monitor subscribe here; the training loop
and the Optuna callbacks publish. A subscriber that raises never breaks publishing or the
other subscribers: the failure is counted, logged and reported to telemetry hooks (the
seeds' ``publish start/stop/exception/dropped`` telemetry).

Example:
    >>> from thunderline_lab.bus import EventBus
    >>> from thunderline_lab import events
    >>> bus = EventBus()
    >>> seen = []
    >>> _ = bus.subscribe("ml.run.*", seen.append)
    >>> bus.publish(events.run_start(model_run_id="r", trial_id="t"))
    1
    >>> len(seen)
    1
"""

from __future__ import annotations

import fnmatch
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from thunderline_lab.events import Event

__all__ = ["EventBus", "Subscription", "TelemetryHook"]

log = logging.getLogger(__name__)

Handler = Callable[[Event], Any]
TelemetryKind = Literal["publish.start", "publish.stop", "publish.exception", "dropped"]
TelemetryHook = Callable[[TelemetryKind, dict[str, Any]], None]


@dataclass(eq=False)
class Subscription:
    """A handler subscribed to the event names matching ``pattern``."""

    pattern: str
    handler: Handler
    name: str
    _regex: re.Pattern[str] = field(repr=False, default=re.compile(""))
    failures: int = 0

    def matches(self, event_name: str) -> bool:
        return self._regex.fullmatch(event_name) is not None


class EventBus:
    """Publish events to subscribers whose glob pattern matches the event name.

    Patterns are shell globs on the dotted name: ``ml.*``, ``ml.run.*``, ``ml.trial.complete``.
    Matching subscribers are cached per event name, so publishing costs a dict lookup plus
    the handlers themselves.
    """

    def __init__(self) -> None:
        self._subs: list[Subscription] = []
        self._route_cache: dict[str, tuple[Subscription, ...]] = {}
        self._hooks: list[TelemetryHook] = []
        self._lock = threading.Lock()
        self.published = 0
        self.dropped = 0

    # -- subscription ---------------------------------------------------------------------

    def subscribe(self, pattern: str, handler: Handler, *, name: str | None = None) -> Subscription:
        """Call ``handler(event)`` for every published event whose name matches ``pattern``."""
        sub = Subscription(
            pattern=pattern,
            handler=handler,
            name=name or str(getattr(handler, "__qualname__", repr(handler))),
            _regex=re.compile(fnmatch.translate(pattern)),
        )
        with self._lock:
            self._subs.append(sub)
            self._route_cache.clear()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop delivering to ``sub`` (no error if it is already gone)."""
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)
            self._route_cache.clear()

    def add_telemetry_hook(self, hook: TelemetryHook) -> None:
        """Receive ``(kind, info)`` for publish start/stop/exception and dropped events."""
        self._hooks.append(hook)

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        return tuple(self._subs)

    # -- publishing -----------------------------------------------------------------------

    def _route(self, event_name: str) -> tuple[Subscription, ...]:
        subs = self._route_cache.get(event_name)
        if subs is None:
            with self._lock:
                subs = tuple(s for s in self._subs if s.matches(event_name))
                self._route_cache[event_name] = subs
        return subs

    def publish(self, event: Event) -> int:
        """Deliver ``event`` to every matching subscriber; returns how many received it.

        An event that no subscriber matches is counted as dropped (and reported to hooks).
        """
        subs = self._route(event.name)
        self.published += 1
        hooks = self._hooks
        if hooks:
            self._emit("publish.start", {"event_name": event.name, "event_id": event.id})
            started = time.perf_counter()
        if not subs:
            self.dropped += 1
            if hooks:
                self._emit("dropped", {"event_name": event.name, "event_id": event.id})
            return 0
        delivered = 0
        for sub in subs:
            try:
                sub.handler(event)
                delivered += 1
            except Exception as exc:
                sub.failures += 1
                log.exception("subscriber %s failed on %s %s", sub.name, event.name, event.id)
                if hooks:
                    self._emit(
                        "publish.exception",
                        {
                            "event_name": event.name,
                            "event_id": event.id,
                            "subscriber": sub.name,
                            "error": repr(exc),
                        },
                    )
        if hooks:
            self._emit(
                "publish.stop",
                {
                    "event_name": event.name,
                    "event_id": event.id,
                    "delivered": delivered,
                    "duration_s": time.perf_counter() - started,
                },
            )
        return delivered

    def publish_many(self, events: Iterable[Event]) -> int:
        """Publish each event in order; returns the total number of deliveries."""
        return sum(self.publish(e) for e in events)

    def _emit(self, kind: TelemetryKind, info: dict[str, Any]) -> None:
        for hook in self._hooks:
            try:
                hook(kind, info)
            except Exception:
                log.exception("telemetry hook %r failed", hook)

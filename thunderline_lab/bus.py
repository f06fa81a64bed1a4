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

import contextlib
import fnmatch
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

from thunderline_lab.events import (
    ErrorDetail,
    Event,
    EventValidationError,
    new_event_id,
    validate_event,
    validate_events,
)

__all__ = ["AsyncEmitter", "EventBus", "Subscription", "TelemetryHook"]

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


class AsyncEmitter:
    """The training thread's side of tracking: ``emit`` queues, a thread publishes.

    Building and validating an event right after a training step costs about 100 µs on
    these machines, ten times what a tight loop of emits suggests: the step's kernels have
    evicted the validator from the CPU caches. ``emit`` therefore only queues the name, the
    time and the payload (a few µs, cold or warm); a background thread fills in the id and
    timestamp, validates the batch (the same rules and errors as the constructors) and
    publishes the events in order. Nothing is lost silently: an invalid event's
    :class:`~thunderline_lab.events.EventValidationError` is raised by the next ``emit``,
    ``publish``, ``flush`` or ``close`` on the producer's side, and the valid events around
    it are published.

    Example:
        >>> from thunderline_lab.bus import AsyncEmitter, EventBus
        >>> bus = EventBus()
        >>> seen = []
        >>> _ = bus.subscribe("ml.run.*", seen.append)
        >>> with AsyncEmitter(bus, model_run_id="r", trial_id="t0") as emit:
        ...     emit.emit("ml.run.metric", step=0, measurements={"train_loss": 0.7})
        >>> [(e.name, e.payload.step) for e in seen]
        [('ml.run.metric', 0)]

    Args:
        bus: where the events go.
        interval: seconds between two publishing rounds of the background thread.
        correlation_id: set on every event emitted.
        **common: payload fields of every event emitted (``model_run_id``, ``trial_id``,
            ``study`` ...).
    """

    def __init__(
        self,
        bus: EventBus,
        *,
        interval: float = 0.05,
        correlation_id: str | None = None,
        **common: Any,
    ) -> None:
        self.bus = bus
        self.interval = interval
        self.correlation_id = correlation_id
        self.common = common
        self.published = 0
        self._queue: deque[Any] = deque()
        self._drain_lock = threading.RLock()  # a subscriber may flush from the thread
        self._error: EventValidationError | None = None
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="thunderline-emit", daemon=True)
        self._thread.start()

    # -- the producer's side ----------------------------------------------------------------

    def emit(self, name: str, /, **payload: Any) -> None:
        """Queue event ``name`` with ``payload`` (plus the common fields); time is now."""
        if self._error is not None:
            self._raise_error()
        self._queue.append((name, time.time_ns(), payload))

    def publish(self, event: Event) -> None:
        """Queue an event built elsewhere, in order with the emitted ones."""
        if self._error is not None:
            self._raise_error()
        self._queue.append(event)

    def flush(self) -> None:
        """Publish everything queued so far, now, from the calling thread.

        Raises:
            EventValidationError: for invalid events emitted since the last check.
        """
        self._drain()
        if self._error is not None:
            self._raise_error()

    def close(self) -> None:
        """Publish what is queued and stop the thread (raises like :meth:`flush`)."""
        if not self._closed:
            self._closed = True
            self._stop.set()
            self._thread.join()
        self.flush()

    def __enter__(self) -> AsyncEmitter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        with contextlib.suppress(EventValidationError):  # do not mask the caller's error
            self.close()

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        assert error is not None
        raise error

    # -- the background thread ----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._drain()
            except Exception:  # pragma: no cover - the thread must outlive any surprise
                log.exception("AsyncEmitter could not publish")
        self._drain()

    def _drain(self) -> None:
        with self._drain_lock:
            items = []
            while self._queue:
                items.append(self._queue.popleft())
            if not items:
                return
            built = [self._build(item) for item in items]
            try:
                evs = validate_events(built)
            except EventValidationError as exc:
                evs, errors = self._valid_ones(built, exc)
                self._error = EventValidationError(
                    [*(self._error.errors if self._error else []), *errors]
                )
            for ev in evs:
                self.bus.publish(ev)
            self.published += len(evs)

    def _build(self, item: Any) -> Any:
        if not isinstance(item, tuple):
            return item
        name, t_ns, payload = item
        return {
            "id": new_event_id(),
            "name": name,
            "timestamp": datetime.fromtimestamp(t_ns / 1e9, UTC),
            "correlation_id": self.correlation_id,
            "payload": {**self.common, **payload},
        }

    @staticmethod
    def _valid_ones(
        built: list[Any], exc: EventValidationError
    ) -> tuple[list[Event], list[ErrorDetail]]:
        bad = {e.index for e in exc.errors}
        good = [validate_event(b) for i, b in enumerate(built) if i not in bad]
        errors = []
        for e in exc.errors:
            item = built[e.index] if e.index is not None else None
            name = item.get("name") if isinstance(item, dict) else None
            message = f"{e.message} (emitted {name})" if name else e.message
            errors.append(replace(e, index=None, message=message))
        return good, errors

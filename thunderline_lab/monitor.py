"""Live training monitor: a study's trials, curves and SN-vs-none means while it runs.

One monitor, three event sources behind one interface (:class:`EventSource`)::

    BusSource(bus)                  the study runs in this kernel (push: a bus subscription)
    StoreSource(lab_or_store)       another process writes the lab's store (polls events_after)
    GatewaySource(url, token)       a remote lab's gateway (polls GET /api/events?after=SEQ)

and :class:`CombinedSource` to follow several as one, each event once:
``LiveMonitor.from_store(lab, study, bus=bus)`` shows this kernel's events at once (bus)
and every worker's of the same study (the lab's store). ``from_store`` and ``from_gateway``
attach to a running study with a snapshot (its trials and the downsampled curves of the
recent ones) and then tail only newer events, however long the lab's log.

Events are folded into a pure-Python :class:`MonitorState` (per-trial rows plus bounded,
decimated per-curve histories), separate from rendering, so it is testable and benchmarkable
without a frontend. A pump thread drains the source and redraws at most every
``min_interval`` seconds (default 0.25 s: ≤ 4 redraws/s) whatever the event rate, sending
only what changed; it never calls ``clear_output`` and never prints into other cells.

In JupyterLab the monitor is an ipywidgets panel: study summary, a Stop button (when the
study runs in the background: :meth:`LiveMonitor.run_in_background`), the trial table and
the learning curves (a PNG rendered with matplotlib's Agg backend). When there is no live
frontend (papermill, nbclient, nbval, a plain script) it prints an occasional text line
instead. Either way, when the study finishes the monitor leaves a static snapshot (PNG +
HTML table) in the notebook, so executed notebooks and exported HTML show the result.

Example:
    >>> from thunderline_lab.bus import EventBus
    >>> from thunderline_lab.monitor import LiveMonitor, synthetic_study
    >>> bus = EventBus()
    >>> mon = LiveMonitor.from_bus(bus, study="demo", mode="text", text_interval=1e9)
    >>> _ = bus.publish_many(synthetic_study("demo", n_pairs=2, epochs=3))
    >>> mon.pump()  # the pump thread does this; here by hand
    >>> mon.state.summary()["n_completed"]
    4
    >>> mon.close()
"""

from __future__ import annotations

import contextvars
import functools
import html
import inspect
import io
import json
import logging
import math
import numbers
import os
import random
import re
import sys
import threading
import time
import urllib.parse
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Any,
    Concatenate,
    Literal,
    ParamSpec,
    Protocol,
    TypeGuard,
    TypeVar,
    cast,
    runtime_checkable,
)

import pandas as pd

from thunderline_lab import events as ev_mod
from thunderline_lab.bus import EventBus
from thunderline_lab.errors import (
    ConfigError,
    GatewayError,
    StoreError,
    StudyError,
    ThunderlineLabError,
    did_you_mean,
)
from thunderline_lab.events import Event, EventConflictError
from thunderline_lab.lab import ENV_TOKEN, study_name
from thunderline_lab.store import TrialStore

__all__ = [
    "ARM_COLORS",
    "BackgroundRun",
    "BusSource",
    "CombinedSource",
    "Curve",
    "EventSource",
    "GatewayMirror",
    "GatewaySource",
    "LiveMonitor",
    "MonitorState",
    "StoreSource",
    "TrialRow",
    "as_source",
    "detect_frontend",
    "render_curves_png",
    "render_panel_html",
    "render_table_html",
    "render_table_text",
    "render_text_line",
    "simulate_study",
    "synthetic_study",
]

log = logging.getLogger(__name__)

ENV_MONITOR_MODE = "THUNDERLINE_MONITOR"
ARM_COLORS = {"SN": "#1f77b4", "none": "#d62728", "?": "#7f7f7f"}
TERMINAL = frozenset(ev_mod.TERMINAL_STATUSES)
LIFECYCLE = frozenset(
    ("ml.trial.start", "ml.trial.complete", "ml.trial.failed", "ml.run.start", "ml.run.stop")
)
Mode = Literal["auto", "widget", "text"]

# ---------------------------------------------------------------------------------------------
# Event sources
# ---------------------------------------------------------------------------------------------


@runtime_checkable
class EventSource(Protocol):
    """Where a monitor's events come from: ``poll()`` returns what arrived since last time.

    Events are :class:`~thunderline_lab.events.Event` objects (bus) or their JSON dicts
    (store, gateway); :class:`MonitorState` folds either.
    """

    label: str
    poll_interval: float

    def poll(self) -> list[Any]:
        """Events that arrived since the previous call, oldest first."""
        ...

    def close(self) -> None:
        """Release the source (unsubscribe, close connections)."""
        ...


class BusSource:
    """Push source: subscribes to an in-process :class:`~thunderline_lab.bus.EventBus`.

    Publishing costs the producer one locked list append. The buffer is bounded: beyond
    ``max_buffer`` waiting events, ``ml.run.metric`` events are dropped (counted in
    ``dropped``) while lifecycle events are always kept.

    Example:
        >>> src = BusSource(EventBus())
        >>> src.poll()
        []
    """

    poll_interval = 0.05

    def __init__(
        self,
        bus: EventBus,
        *,
        pattern: str = "ml.*",
        max_buffer: int = 500_000,
        label: str = "bus",
    ) -> None:
        _check_bus(bus)
        self.bus = bus
        self.label = label
        self.max_buffer = max_buffer
        self.dropped = 0
        self._buf: list[Any] = []
        self._lock = threading.Lock()
        self._sub = bus.subscribe(pattern, self._on_event, name="LiveMonitor")

    def _on_event(self, event: Event) -> None:
        with self._lock:
            if len(self._buf) >= self.max_buffer and event.name == "ml.run.metric":
                self.dropped += 1
                return
            self._buf.append(event)

    def poll(self) -> list[Any]:
        with self._lock:
            batch, self._buf = self._buf, []
        return batch

    def close(self) -> None:
        self.bus.unsubscribe(self._sub)


def _check_bus(bus: Any) -> None:
    """Refuse what is no bus here, not at its first use (``"notabus".subscribe``).

    Raises:
        ConfigError: naming ``bus`` and what it got.
    """
    if not isinstance(bus, EventBus):
        raise ConfigError(f"bus: expected an EventBus, got {type(bus).__name__} {bus!r}")


class StoreSource:
    """Poll a lab's trial store for events after a sequence number (another process's study).

    Args:
        store: an open :class:`~thunderline_lab.store.TrialStore`, a lab directory, a
            :class:`~thunderline_lab.lab.Lab`, or the path of a ``lab.db`` file (opened
            here, closed by :meth:`close`).
        after: start after this sequence number (0: from the beginning; ``None``: only
            events logged from now on).
        limit: events per query; up to ``max_batches`` queries per poll.
        create: create the lab's store when there is none; by default a missing store is
            an error (a mistyped path would otherwise make a new, empty lab to watch).

    Raises:
        StoreError: there is no trial store at that path (and ``create`` is false).

    Example:
        >>> src = StoreSource(TrialStore(":memory:"))
        >>> src.poll(), src.after
        ([], 0)
    """

    def __init__(
        self,
        store: Any,
        *,
        after: int | None = 0,
        limit: int = 5000,
        max_batches: int = 20,
        poll_interval: float = 0.5,
        create: bool = False,
    ) -> None:
        self.store, self._owned = _open_store(store, create=create)
        self.label = f"store {self.store.path}"
        self.after = self.store.last_seq() if after is None else int(after)
        self.limit = limit
        self.max_batches = max_batches
        self.poll_interval = poll_interval

    def poll(self) -> list[Any]:
        out: list[Any] = []
        for _ in range(self.max_batches):
            batch = self.store.events_after(self.after, self.limit)
            if not batch:
                break
            out.extend(batch)
            self.after = int(batch[-1]["seq"])
            if len(batch) < self.limit:
                break
        return out

    def close(self) -> None:
        if self._owned:
            self.store.close()


class GatewaySource:
    """Poll a gateway's ``GET /api/events?after=SEQ&limit=N`` (a lab on another machine).

    The answer is ``{"events": [...], "next_after": SEQ}``; pages are followed while full.
    :meth:`last_seq`, :meth:`trials` and :meth:`metric_history` read what
    :meth:`LiveMonitor.from_gateway` attaches with, shaped as the store's reads.

    Args:
        url: the gateway's base URL (``http://127.0.0.1:8765``).
        token: sent as ``Authorization: Bearer TOKEN``; default ``$THUNDERLINE_LAB_TOKEN``.
        client: an ``httpx.Client`` to use instead of a new one (tests pass a
            ``MockTransport`` client or FastAPI's ``TestClient``).
        log_check_interval: while nothing new arrives, every this many seconds the
            gateway's last sequence number (``GET /healthz``) is compared with the
            position: a log that now ends before it (the gateway restarted on another lab,
            or its log was replaced) is warned about and followed from its start, instead
            of waiting for ever for numbers it will take long to reach.

    Raises:
        GatewayError: ``url`` is no ``http://`` or ``https://`` URL (here, at once); from
            :meth:`poll` when the gateway is unreachable or answers badly
            (:attr:`last_status` is then the status of its answer, None without one).
    """

    def __init__(
        self,
        url: str = "",
        token: str | None = None,
        *,
        after: int = 0,
        limit: int = 1000,
        max_pages: int = 10,
        poll_interval: float = 0.5,
        timeout: float = 5.0,
        client: Any = None,
        log_check_interval: float = 10.0,
    ) -> None:
        import httpx

        if client is None:
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise GatewayError(
                    f"gateway URL {url!r}: expected an http:// or https:// URL with a host, "
                    "such as http://127.0.0.1:8765"
                )
        if token is None:  # as EventClient and the gateway itself
            token = os.environ.get(ENV_TOKEN) or None
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._owned = client is None
        self.client: httpx.Client = client or httpx.Client(
            base_url=url, headers=headers, timeout=timeout
        )
        if client is not None and headers:
            self.client.headers.update(headers)
        self.label = f"gateway {url or self.client.base_url}"
        self.last_status: int | None = None  # of the last answer (None: no answer)
        self.after = int(after)
        self.limit = limit
        self.max_pages = max_pages
        self.poll_interval = poll_interval
        self.log_check_interval = log_check_interval
        self.log_restarts = 0  # times the gateway's log was found to end before `after`
        self._log_checked_at = time.monotonic()

    def _get(self, path: str, params: Mapping[str, Any], what: str, *keys: str) -> list[Any]:
        """GET ``path`` and the answer's ``keys``; every failure a :class:`GatewayError`."""
        import httpx

        self.last_status = None
        try:
            resp = self.client.get(path, params=dict(params))
        except httpx.HTTPError as exc:
            raise GatewayError(f"{self.label}: cannot fetch {what}: {exc}") from exc
        self.last_status = resp.status_code
        route = path.split("?", 1)[0]
        if resp.status_code != 200:
            hint = ""
            if resp.status_code in (401, 403):
                hint = " (a missing or wrong token: pass the one the gateway was started with)"
            body = "" if hint else f": {resp.text[:200]}"  # a refusal: the hint says it all
            raise GatewayError(f"{self.label}: GET {route} answered {resp.status_code}{hint}{body}")
        try:
            body = resp.json()
            return [body[key] for key in keys]
        except (ValueError, KeyError, TypeError) as exc:
            raise GatewayError(f"{self.label}: malformed {route} answer: {exc}") from exc

    def poll(self) -> list[Any]:
        out: list[Any] = []
        for _ in range(self.max_pages):
            params = {"after": self.after, "limit": self.limit}
            page, next_after = self._get("/api/events", params, "events", "events", "next_after")
            try:
                next_after = int(next_after)
            except (ValueError, TypeError) as exc:
                raise GatewayError(f"{self.label}: malformed /api/events answer: {exc}") from exc
            out.extend(page)
            self.after = max(self.after, next_after)
            if len(page) < self.limit:
                break
        if not out and self.after > 0:
            self._check_log_position()
        return out

    def _check_log_position(self) -> None:
        now = time.monotonic()
        if now - self._log_checked_at < self.log_check_interval:
            return
        self._log_checked_at = now
        seq = self.last_seq()
        if seq < self.after:
            log.warning(
                "%s: its log ends at sequence number %d, before this monitor's position %d "
                "(the gateway restarted on another lab, or its log was replaced): following "
                "its log from the start",
                self.label,
                seq,
                self.after,
            )
            self.after = 0
            self.log_restarts += 1

    # -- the snapshot a monitor attaches with (LiveMonitor.from_gateway) ----------------
    # The same reads as TrialStore's, over HTTP, so MonitorState loads either.

    def last_seq(self) -> int:
        """The newest sequence number of the gateway's log (``GET /healthz``)."""
        (seq,) = self._get("/healthz", {}, "the last sequence number", "last_seq")
        if not isinstance(seq, int):
            raise GatewayError(f"{self.label}: malformed /healthz answer: last_seq={seq!r}")
        return seq

    def trials(self, *, study: str | None = None, model_run_id: str | None = None) -> pd.DataFrame:
        """A study's trials (``GET /api/trials``) as the DataFrame ``TrialStore.trials`` gives."""
        params = {k: v for k, v in (("study", study), ("model_run_id", model_run_id)) if v}
        (rows,) = self._get("/api/trials", params, "trials", "trials")
        return pd.DataFrame(rows, columns=None if rows else ["model_run_id", "trial_id"])

    def studies(self) -> list[str]:
        """The names of the studies the gateway's lab has trials of, sorted (as
        ``TrialStore.studies``; read from ``GET /api/trials``)."""
        (rows,) = self._get("/api/trials", {}, "trials", "trials")
        try:
            return sorted({str(r["study"]) for r in rows if r.get("study") is not None})
        except (AttributeError, TypeError) as exc:
            raise GatewayError(f"{self.label}: malformed /api/trials answer: {exc}") from exc

    def metric_history(
        self,
        model_run_id: str,
        trial_id: str | Sequence[str] | None = None,
        name: str | Sequence[str] | None = None,
        *,
        max_points: int = 1000,
    ) -> pd.DataFrame:
        """Trials' curves, downsampled (``GET /api/trials/{run}/{trial}/metrics``, one
        request per trial), as the DataFrame ``TrialStore.metric_history`` gives."""
        if trial_id is None:
            trial_ids = self.trials(model_run_id=model_run_id)["trial_id"].tolist()
        else:
            trial_ids = [trial_id] if isinstance(trial_id, str) else list(trial_id)
        params: dict[str, Any] = {"max_points": max_points}
        if name is not None:
            params["names"] = name if isinstance(name, str) else ",".join(name)
        run = urllib.parse.quote(model_run_id, safe="")
        rows: list[tuple[str, str, int, float]] = []
        for trial in trial_ids:
            path = f"/api/trials/{run}/{urllib.parse.quote(trial, safe='')}/metrics"
            (curves,) = self._get(path, params, f"the metrics of trial {trial!r}", "metrics")
            try:
                for metric, points in curves.items():
                    steps, values = points["steps"], points["values"]
                    rows += [
                        (trial, metric, int(s), float(v))
                        for s, v in zip(steps, values, strict=True)
                    ]
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                raise GatewayError(f"{self.label}: malformed {path} answer: {exc}") from exc
        rows.sort(key=lambda r: (r[0], r[1], r[2]))
        return pd.DataFrame(rows, columns=["trial_id", "name", "step", "value"])

    def close(self) -> None:
        if self._owned:
            self.client.close()


def _warn_unknown_study(store: TrialStore | GatewaySource, study: str) -> None:
    """A study the lab has no trials of is waited for; when the lab has others, say so
    (with the closest names) rather than wait in silence for a mistyped name."""
    import difflib

    try:
        known = store.studies()
    except ThunderlineLabError:  # a notice only: never the reason a monitor fails to open
        return
    if not known or study in known:
        return
    close = difflib.get_close_matches(study, known, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
    shown = ", ".join(known[:20]) + (f", … ({len(known)} in all)" if len(known) > 20 else "")
    log.warning(
        "no trials of study %r in this lab yet: waiting for them (%sthe lab's studies: %s)",
        study,
        hint,
        shown,
    )


class GatewayMirror:
    """A local copy of a gateway's event log, as a trial store the lab's tools read.

    A study that reports through a gateway (``thunderline-lab run --gateway URL``,
    ``run_study(gateway=...)``) leaves none of its events in the local lab's store. The
    mirror brings them back: :meth:`sync` appends the events the gateway logged since the
    last sync (``GET /api/events?after=``, page by page) to ``<lab>/gateway-mirror/
    <host>-<port>.db``, whose tables (trials, metric series) are derived from the events
    exactly as the gateway's own are; the comparison, the trial table and the batch
    runner's progress read it as any lab's store. Ids are idempotency keys, so a sync
    interrupted anywhere (or two processes syncing at once) only re-reads a page.

    Where it has reached is kept beside it (``.json``: the gateway's sequence number and
    the id of the event logged there). A gateway that no longer logs that event there
    (restarted on another lab, whatever its log's length), or that logs an event whose id
    the mirror holds with other content, is mirrored again from the start.

    Args:
        lab: the local lab the mirror belongs to.
        url: the gateway's base URL.
        token: the gateway's token (default: ``$THUNDERLINE_LAB_TOKEN``).
        client: an ``httpx.Client`` to use (tests pass FastAPI's ``TestClient``).

    Raises:
        GatewayError: ``url`` is no ``http(s)://`` URL (here); from :meth:`sync`, the
            gateway is unreachable, refuses the token or answers badly.
    """

    PAGE = 10_000  # events per GET (the gateway's largest page)

    def __init__(
        self,
        lab: Any,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        client: Any = None,
    ) -> None:
        self.source = GatewaySource(
            url, token, limit=self.PAGE, max_pages=1, timeout=timeout, client=client
        )
        self.url = url
        parts = urllib.parse.urlsplit(url)
        slug = "".join(
            c if c.isalnum() or c in "-." else "_"
            for c in f"{parts.hostname or 'gateway'}-{parts.port or parts.scheme}{parts.path}"
        ).rstrip("_")
        self.path = Path(lab.root) / "gateway-mirror" / f"{slug}.db"
        self.state_path = self.path.with_suffix(".json")

    def _position(self) -> tuple[int, str | None]:
        """(the gateway's sequence number mirrored up to, the id of the event logged there)."""
        try:
            state = json.loads(self.state_path.read_text())
            if state.get("url") != self.url:
                return 0, None
            return int(state["after"]), state.get("last_id")
        except (OSError, ValueError, KeyError, TypeError):
            return 0, None  # no state (or a torn one): re-read from the start, duplicates skipped

    def _save_position(self, after: int, last_id: Any) -> None:
        tmp = self.state_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"url": self.url, "after": after, "last_id": last_id}))
        os.replace(tmp, self.state_path)

    def _same_log(self, after: int, last_id: str | None) -> bool:
        """Whether the gateway still logs, at ``after``, the event the mirror stopped at: a
        gateway restarted on another lab has other events there (or none)."""
        (page,) = self.source._get(
            "/api/events", {"after": after - 1, "limit": 1}, "the mirror's position", "events"
        )
        return bool(page) and isinstance(page[0], Mapping) and page[0].get("id") == last_id

    def _reset(self) -> None:
        for p in (self.path, *(self.path.with_name(self.path.name + s) for s in ("-wal", "-shm"))):
            p.unlink(missing_ok=True)
        self.state_path.unlink(missing_ok=True)

    def sync(self) -> int:
        """Append what the gateway logged since the last sync; returns how many events
        were new to the mirror."""
        after, last_id = self._position()
        if after and not self._same_log(after, last_id):
            log.warning(
                "%s: its log no longer holds, at sequence number %d, the event the mirror "
                "stopped at (restarted on another lab?): mirroring it again from the start",
                self.source.label,
                after,
            )
            self._reset()
            after = 0
        self.source.after = after
        page = self.source.poll()  # an unreachable gateway: nothing is created
        if not page:  # nothing new (every progress tick of a batch run): the store unopened
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        added = 0
        for attempt in (1, 2):
            try:
                with TrialStore(self.path) as store:
                    while True:  # to an empty page: one may end early at the byte limit
                        if not page:
                            return added
                        added += store.append(
                            [{k: v for k, v in e.items() if k != "seq"} for e in page]
                        ).accepted
                        self._save_position(self.source.after, page[-1].get("id"))
                        page = self.source.poll()
            except EventConflictError:
                if attempt == 2:
                    raise
                log.warning(
                    "%s: it logged an event the mirror holds with other content (its log "
                    "was replaced?): mirroring it again from the start",
                    self.source.label,
                )
                self._reset()
                self.source.after, added = 0, 0
                page = self.source.poll()
        return added  # pragma: no cover - the loop returns or raises

    def store(self) -> TrialStore:
        """The mirror's trial store (as it stands: :meth:`sync` first to bring it up to date)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return TrialStore(self.path)

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> GatewayMirror:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# host:port (a gateway's address without its http://), which would be taken for a lab path
_HOST_PORT = re.compile(r"(?:[\w.-]+|\[[0-9A-Fa-f:.]+\]):\d{1,5}(?:/\S*)?")


def _open_store(store: Any, *, create: bool = False) -> tuple[TrialStore, bool]:
    """``store`` as an open trial store, and whether it was opened here (to close).

    Raises:
        ConfigError: ``store`` is no store, lab or path.
        StoreError: no trial store at that path (unless ``create``).
    """
    if isinstance(store, TrialStore):
        return store, False
    from thunderline_lab.lab import Lab

    if isinstance(store, Lab):
        db_path = store.db_path
    elif isinstance(store, str | os.PathLike):
        path = Path(store)
        db_path = Lab.resolve(path).db_path if path.is_dir() or path.suffix != ".db" else path
    else:
        raise ConfigError(
            "store: expected a TrialStore, a Lab, a lab directory or a lab.db path, "
            f"got {type(store).__name__} {store!r}"
        )
    if not create and not db_path.exists():
        if isinstance(store, str) and _HOST_PORT.fullmatch(store):
            hint = f"a gateway URL needs http://, as in 'http://{store}'"
        else:
            hint = (
                "check the lab directory; a study's first events create it: to watch a new "
                "lab before its first study starts, pass create=True; in live_monitor.ipynb, "
                "-p new_lab True"
            )
        raise StoreError(f"no trial store at {db_path} ({hint})")
    return TrialStore(db_path), True


class CombinedSource:
    """Several sources followed as one; an event that more than one delivers counts once.

    The study notebook's monitor combines this kernel's bus (its own events at once) with
    the lab's store (every worker's events of the study, this kernel's among them a moment
    later, when they are written). Duplicates are recognised by event id among the last
    ``memory`` ids seen. A source that fails keeps what the others delivered for the next
    poll and re-raises.

    Example:
        >>> bus = EventBus()
        >>> src = CombinedSource(BusSource(bus), BusSource(bus))
        >>> _ = bus.publish_many(synthetic_study("demo", n_pairs=1, epochs=2))
        >>> len(src.poll()), src.duplicates
        (8, 8)
    """

    def __init__(self, *sources: EventSource, memory: int = 20_000) -> None:
        if not sources:
            raise ValueError("CombinedSource needs at least one source")
        self.sources = list(sources)
        self.label = " + ".join(s.label for s in self.sources)
        # the slowest source's pace: a store is not queried more often than on its own
        self.poll_interval = max(s.poll_interval for s in self.sources)
        self.memory = memory
        self.duplicates = 0
        # the oldest id first; OrderedDict pops it in O(1) (a dict's next(iter()) rescans
        # the deleted slots before it: 18x slower per event at this size)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._pending: list[Any] = []

    def poll(self) -> list[Any]:
        for src in self.sources:
            for event in src.poll():
                event_id = (
                    event.get("id") if isinstance(event, Mapping) else getattr(event, "id", None)
                )
                if event_id is not None:
                    if event_id in self._seen:
                        self.duplicates += 1
                        continue
                    self._seen[event_id] = None
                    if len(self._seen) > self.memory:
                        self._seen.popitem(last=False)
                self._pending.append(event)
        batch, self._pending = self._pending, []
        return batch

    def close(self) -> None:
        for src in self.sources:
            src.close()


def as_source(obj: Any) -> EventSource:
    """Wrap a bus, store, lab (path) or gateway URL as an :class:`EventSource`.

    Example:
        >>> as_source(EventBus()).label
        'bus'
    """
    if isinstance(obj, EventSource):
        return obj
    if isinstance(obj, EventBus):
        return BusSource(obj)
    if isinstance(obj, str) and obj.startswith(("http://", "https://")):
        return GatewaySource(obj)
    from thunderline_lab.lab import Lab

    if not isinstance(obj, TrialStore | Lab | str | os.PathLike):
        raise ConfigError(
            "source: expected an event source, an EventBus, a TrialStore, a Lab, a lab "
            f"directory, a lab.db path or a gateway URL, got {type(obj).__name__} {obj!r}"
        )
    return StoreSource(obj)


# ---------------------------------------------------------------------------------------------
# State: a pure fold of events
# ---------------------------------------------------------------------------------------------


class Curve:
    """A bounded learning curve: keeps ≤ ``capacity`` evenly strided points plus the last.

    When full it drops every other point and doubles its stride, so memory stays bounded
    however long training runs, and the curve keeps its shape.

    Example:
        >>> c = Curve(capacity=10)
        >>> for s in range(1000):
        ...     c.add(s, float(s))
        >>> steps, values = c.points()
        >>> len(steps) <= 11, steps[0], steps[-1]
        (True, 0, 999)
    """

    __slots__ = ("capacity", "count", "last_step", "last_value", "steps", "stride", "values")

    def __init__(self, capacity: int = 500) -> None:
        self.capacity = max(2, capacity)
        self.stride = 1
        self.count = 0
        self.steps: list[int] = []
        self.values: list[float] = []
        self.last_step: int | None = None
        self.last_value = math.nan

    def add(self, step: int, value: float) -> None:
        """Append a point; a repeated step updates it, an older step is ignored."""
        if self.last_step is not None and step <= self.last_step:
            if step == self.last_step:
                self.last_value = value
                if self.steps and self.steps[-1] == step:
                    self.values[-1] = value
            return
        self.last_step, self.last_value = step, value
        if self.count % self.stride == 0:
            self.steps.append(step)
            self.values.append(value)
            if len(self.steps) > self.capacity:
                del self.steps[1::2]
                del self.values[1::2]
                self.stride *= 2
        self.count += 1

    def points(self) -> tuple[list[int], list[float]]:
        """The kept points and the latest one, in step order."""
        if self.last_step is None or (self.steps and self.steps[-1] == self.last_step):
            return list(self.steps), list(self.values)
        return [*self.steps, self.last_step], [*self.values, self.last_value]

    def __len__(self) -> int:
        return len(self.steps) + (0 if not self.steps or self.steps[-1] == self.last_step else 1)


@dataclass
class TrialRow:
    """One trial as the monitor shows it.

    ``best`` is the objective at the epoch with the lowest selection metric so far
    (``val_loss``): the trainer's own ``best_val_accuracy``, the weights it restores; a
    running maximum only while no ``val_loss`` has been reported. ``best_loss`` and
    ``best_step`` are that epoch's selection metric and step.
    """

    model_run_id: str
    trial_id: str
    order: int
    status: str = "running"
    spectral_norm: bool | None = None
    coeff: float | None = None
    pair_id: Any = None
    group_id: Any = None  # the configuration (its pairs on several seeds are one unit)
    epoch: int | None = None  # the last step reported (an epoch index, from 0)
    planned_epochs: int | None = None  # the trial's ``epochs`` parameter, when it gives one
    last: dict[str, float] = field(default_factory=dict)
    best: float | None = None
    best_loss: float | None = None
    best_step: int | None = None
    best_final: bool = False  # the trainer's own best_<objective>: no curve overrides it
    objective_step: int | None = None
    lipschitz: float | None = None
    error: str | None = None
    touched: int = 0
    mlflow_run_id: str | None = None
    mlflow_experiment_id: str | None = None

    @property
    def arm(self) -> str:
        """``SN``, ``none`` or ``?`` (not known yet)."""
        return "?" if self.spectral_norm is None else ("SN" if self.spectral_norm else "none")


def _planned_epochs(params: Any, known: int | None) -> int | None:
    """A trial's planned epochs: its ``epochs`` parameter (what :mod:`thunderline_lab.study`
    gives every trial) when that is a whole number of at least 1, else what was known."""
    planned = params.get("epochs") if isinstance(params, Mapping) else None
    if isinstance(planned, int) and not isinstance(planned, bool) and planned >= 1:
        return planned
    return known


def _epoch_cell(row: TrialRow) -> str:
    """The table's epoch: epochs trained of those planned (``4/20``: the step reported is
    the epoch's index, from 0), or the last step as reported when no plan is known."""
    if row.epoch is None:
        return "—"
    if row.planned_epochs is None:
        return str(row.epoch)
    return f"{row.epoch + 1}/{row.planned_epochs}"


_EPOCH_HELP = (
    "epochs trained of the trial's planned epochs (an early stop or a pruned trial ends "
    "short of them); the last step reported when the trial's parameters give no epochs"
)


def _finite(value: Any) -> TypeGuard[float]:
    """A finite number (raw event dicts may carry NaN or infinity; validated events not)."""
    return isinstance(value, int | float) and math.isfinite(value)


def _payload_get(payload: Any) -> Callable[[str], Any]:
    if isinstance(payload, Mapping):
        return payload.get
    return lambda key: getattr(payload, key, None)


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _locked(
    method: Callable[Concatenate[MonitorState, _P], _R],
) -> Callable[Concatenate[MonitorState, _P], _R]:
    """Run a :class:`MonitorState` method holding its lock (never during a fold)."""

    @functools.wraps(method)
    def locked(self: MonitorState, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self.lock:
            return method(self, *args, **kwargs)

    return locked


class MonitorState:
    """Folds study events into per-trial rows and bounded learning curves.

    Memory is bounded by the number of trials (one small row each), not by the number of
    events: each curve keeps ≤ ``curve_points`` points (decimated), and only the
    ``max_curve_trials`` most recently active trials keep curves.

    Thread-safe: a fold and the views (:meth:`summary`, :meth:`table_rows`, …) hold
    :attr:`lock`, so a notebook cell or :func:`~thunderline_lab.notebook.follow` reading
    the state while the monitor's pump thread folds sees it before or after a batch, never
    half-changed (nor fails with "dictionary changed size during iteration").

    Args:
        study: only events of this study (``model_run_id`` or ``study`` field); None: all.
        objective: the metric whose best value the table and summary show.
        direction: ``max`` or ``min`` for the objective.
        selection_metric: the metric (lower is better) whose best epoch picks a trial's
            ``best`` objective value, as the trainer does: ``val_accuracy`` at the lowest
            ``val_loss``. ``None``, or a trial that reports no such metric: the best
            objective value seen.
        curve_metrics: metric names kept as curves.

    Raises:
        ConfigError: an option of the wrong type or out of range, or a ``study`` that is no
            name (an integer is taken as its text).

    Example:
        >>> st = MonitorState(study="demo")
        >>> st.apply_many(synthetic_study("demo", n_pairs=1, epochs=4))
        >>> [(r.trial_id, r.status, r.arm, r.epoch) for r in st.rows.values()]
        [('trial_0000', 'completed', 'none', 3), ('trial_0001', 'completed', 'SN', 3)]
    """

    def __init__(
        self,
        study: str | None = None,
        *,
        objective: str = "val_accuracy",
        direction: Literal["max", "min"] = "max",
        selection_metric: str | None = "val_loss",
        curve_metrics: Sequence[str] = ("val_accuracy", "val_loss", "train_loss"),
        curve_points: int = 500,
        max_curve_trials: int = 100,
    ) -> None:
        _check_options(
            {
                "objective": objective,
                "direction": direction,
                "selection_metric": selection_metric,
                "curve_metrics": curve_metrics,
                "curve_points": curve_points,
                "max_curve_trials": max_curve_trials,
            }
        )
        self.study = None if study is None else study_name(study)
        self.budget: int | None = None  # the study's n_trials, when the monitor is told it
        self.objective = objective
        self.direction = direction
        self.selection_metric = selection_metric
        self.curve_metrics = tuple(curve_metrics)
        self.curve_points = curve_points
        self.max_curve_trials = max_curve_trials
        self.rows: dict[tuple[str, str], TrialRow] = {}
        self.curves: dict[tuple[str, str], dict[str, Curve]] = {}
        self.version = 0
        self.events = 0
        self.ignored = 0
        self.lifecycle_version = 0
        self.studies_seen: set[str] = set()
        self._summary_cache: tuple[int, dict[str, Any]] | None = None
        self._sign = 1.0 if direction == "max" else -1.0
        self.lock = threading.RLock()

    # -- folding ------------------------------------------------------------------------

    def apply_many(self, events: Iterable[Any]) -> None:
        """Fold events (Event objects or their JSON dicts), in order."""
        with self.lock:
            for event in events:
                self._apply(event)

    def apply(self, event: Any) -> None:
        """Fold one event; events of other studies or non-ml names are ignored."""
        with self.lock:
            self._apply(event)

    def _apply(self, event: Any) -> None:
        if isinstance(event, Mapping):
            name, payload = event.get("name"), event.get("payload") or {}
        else:
            name, payload = event.name, event.payload
        if not isinstance(name, str) or not name.startswith("ml."):
            self.ignored += 1
            return
        get = _payload_get(payload)
        run_id, trial_id = get("model_run_id"), get("trial_id")
        if not isinstance(run_id, str) or not isinstance(trial_id, str):
            self.ignored += 1
            return
        study = get("study") or run_id
        if self.study is not None and self.study not in (run_id, study):
            self.ignored += 1
            return
        self.studies_seen.add(study)
        key = (run_id, trial_id)
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = TrialRow(run_id, trial_id, order=len(self.rows))
            self.lifecycle_version += 1
        self.events += 1
        self.version += 1
        row.touched = self.version
        if name == "ml.run.metric":
            self._apply_metric(key, row, get)
        else:
            self._apply_lifecycle(name, row, get)

    def _apply_metric(self, key: tuple[str, str], row: TrialRow, get: Callable[[str], Any]) -> None:
        points = dict(get("measurements") or {})
        if get("metric_name") is not None and get("metric_value") is not None:
            points[get("metric_name")] = get("metric_value")
        step = get("step")
        step = int(step) if isinstance(step, int | float) else 0
        if row.epoch is None or step > row.epoch:
            row.epoch = step
        if row.spectral_norm is None and get("spectral_norm") is not None:
            row.spectral_norm = bool(get("spectral_norm"))
        curves = self.curves.get(key)
        if curves is None:
            curves = self.curves[key] = {}
            if len(self.curves) > self.max_curve_trials:
                self._evict_curves()
        objective = loss = None
        for metric, value in points.items():
            if not isinstance(value, int | float):
                continue
            value = float(value)
            row.last[metric] = value
            if metric == self.objective and math.isfinite(value):
                objective = value
            elif metric == "lipschitz_upper":
                row.lipschitz = value
            if metric == self.selection_metric and math.isfinite(value):
                loss = value
            if metric in self.curve_metrics:
                curve = curves.get(metric)
                if curve is None:
                    curve = curves[metric] = Curve(self.curve_points)
                curve.add(step, value)
        if objective is not None or loss is not None:
            self._offer_epoch(row, step, objective, loss)

    def _offer_epoch(
        self, row: TrialRow, step: int, objective: float | None, loss: float | None
    ) -> None:
        """The trainer's rule for a trial's best: the objective at the lowest loss so far."""
        if objective is not None:
            row.objective_step = step
        if loss is not None and (row.best_loss is None or loss < row.best_loss):
            row.best_loss, row.best_step = loss, step
            if objective is None and row.objective_step == step:
                objective = row.last.get(self.objective)  # reported earlier at this step
            if objective is not None:
                self._set_best(row, objective)
        elif objective is not None:
            if row.best_loss is None:  # no loss reported (yet): the best value seen
                self._offer_best(row, objective)
            elif row.best_step == step:  # the objective of the best epoch, reported after it
                self._set_best(row, objective)

    def _set_best(self, row: TrialRow, value: float) -> None:
        if row.best != value:
            row.best = value
            self.lifecycle_version += 1

    def _offer_best(self, row: TrialRow, value: float) -> None:
        if row.best is None or self._sign * value > self._sign * row.best:
            self._set_best(row, value)

    def _apply_lifecycle(self, name: str, row: TrialRow, get: Callable[[str], Any]) -> None:
        self.lifecycle_version += 1
        sn = get("spectral_norm")
        if sn is not None:
            row.spectral_norm = bool(sn)
        coeff = get("spectral_norm_coeff")
        params = get("parameters") or {}
        if coeff is None and isinstance(params.get("spectral_norm_coeff"), int | float):
            coeff = params["spectral_norm_coeff"]
        if coeff is not None:
            row.coeff = float(coeff)
        if row.spectral_norm is None and isinstance(params.get("spectral_norm"), bool):
            row.spectral_norm = params["spectral_norm"]
        if params.get("pair_id") is not None:
            row.pair_id = params["pair_id"]
        if params.get("group_id") is not None:
            row.group_id = params["group_id"]
        row.planned_epochs = _planned_epochs(params, row.planned_epochs)
        if get("mlflow_run_id"):  # from the trial's events or the MLflow logger's link event
            row.mlflow_run_id = str(get("mlflow_run_id"))
            experiment = (get("metadata") or {}).get("mlflow_experiment_id")
            if experiment is not None:
                row.mlflow_experiment_id = str(experiment)
        metrics = get("metrics") or {}
        if metrics:
            best = metrics.get(f"best_{self.objective}", metrics.get(self.objective))
            if isinstance(best, int | float) and math.isfinite(best):
                if f"best_{self.objective}" in metrics:
                    self._set_best(row, float(best))  # the trainer's own word is final
                    row.best_final = True
                elif row.best_loss is None or row.objective_step is None:
                    # the final value counts without a loss, or when the objective has no
                    # per-epoch value (test_accuracy: measured once, after training)
                    self._offer_best(row, float(best))
            if isinstance(metrics.get("lipschitz_upper"), int | float):
                row.lipschitz = float(metrics["lipschitz_upper"])
            if _finite(metrics.get("epochs")) and row.epoch is None:
                row.epoch = int(metrics["epochs"]) - 1
        if name == "ml.trial.complete":
            row.status = get("status") or "completed"
        elif name == "ml.trial.failed":
            row.status = "failed"
            row.error = f"{get('error_type')}: {get('error_message')}"
        elif name == "ml.run.stop" and row.status == "running" and get("success") is False:
            row.status = "failed"

    def _evict_curves(self) -> None:
        """Drop the curves of the least recently active trial (finished trials first)."""

        def rank(key: tuple[str, str]) -> tuple[int, int]:
            row = self.rows[key]
            return (0 if row.status in TERMINAL else 1, row.touched)

        while len(self.curves) > self.max_curve_trials:
            del self.curves[min(self.curves, key=rank)]

    # -- bulk loading (attach to a long study without replaying every event) ------------

    @_locked
    def load_trials(self, trials: Any) -> None:
        """Seed rows from :meth:`TrialStore.trials` (a DataFrame)."""
        for rec in trials.to_dict("records"):
            key = (rec["model_run_id"], rec["trial_id"])
            row = self.rows.get(key) or TrialRow(key[0], key[1], order=len(self.rows))
            self.rows[key] = row
            row.status = rec["status"]
            row.spectral_norm = rec["spectral_norm"]
            coeff = rec.get("spectral_norm_coeff")
            row.coeff = None if coeff is None or coeff != coeff else float(coeff)
            params, metrics = rec.get("parameters") or {}, rec.get("metrics") or {}
            row.pair_id = params.get("pair_id")
            row.group_id = params.get("group_id")
            row.planned_epochs = _planned_epochs(params, row.planned_epochs)
            # the trainer's best_<objective> is final; a trial without it (pruned, failed)
            # gets its last value until load_history finds the best by the live rule
            best = metrics.get(f"best_{self.objective}", metrics.get(self.objective))
            if _finite(best):
                row.best = float(best)
                row.best_final = f"best_{self.objective}" in metrics
            if isinstance(metrics.get("lipschitz_upper"), int | float):
                row.lipschitz = float(metrics["lipschitz_upper"])
            if _finite(metrics.get("epochs")):
                row.epoch = int(metrics["epochs"]) - 1
        self.version += 1
        self.lifecycle_version += 1

    @_locked
    def load_history(
        self,
        store: TrialStore | GatewaySource,
        model_run_id: str,
        trial_ids: Sequence[str] | None = None,
        *,
        max_points: int = 1000,
    ) -> int:
        """Seed curves from the store's metric history, downsampled per curve.

        Uses :meth:`TrialStore.metric_history` with ``max_points`` (one query for all the
        trials and curves), or a gateway's (:meth:`GatewaySource.metric_history`). A trial's
        ``best`` is taken from the loaded points by the same rule as live events (the
        objective at the lowest ``selection_metric``), unless the trainer reported its own
        ``best_<objective>`` (a running trial, or a pruned or failed one, has none).
        Returns the number of points loaded.
        """
        wanted = {*self.curve_metrics, self.objective}
        if self.selection_metric is not None:
            wanted.add(self.selection_metric)
        # per running trial: step -> (objective, selection metric), replayed in step order
        epochs: dict[tuple[str, str], dict[int, list[float | None]]] = {}
        frames = [
            store.metric_history(
                model_run_id,
                None if trial_ids is None else list(trial_ids),
                sorted(wanted),
                max_points=max_points,
            )
        ]
        n = 0
        for df in frames:
            cols = (
                df["trial_id"].tolist(),
                df["name"].tolist(),
                df["step"].tolist(),
                df["value"].tolist(),
            )
            current: tuple[Any, Any] | None = None
            curve: Curve | None = None
            row: TrialRow | None = None
            for trial_id, name, step, value in zip(*cols, strict=True):
                if name not in wanted:
                    continue
                if current is None or current != (trial_id, name):
                    key = (model_run_id, str(trial_id))
                    if current is None or current[0] != trial_id:
                        row = self.rows.get(key)
                        if row is None:
                            row = self.rows[key] = TrialRow(key[0], key[1], order=len(self.rows))
                    current = (trial_id, name)
                    curve = None
                    if name in self.curve_metrics:
                        curve = Curve(max(self.curve_points, 1000))
                        self.curves.setdefault(key, {})[str(name)] = curve
                assert row is not None
                step, value = int(step), float(value)
                if curve is not None:
                    curve.add(step, value)
                row.epoch = max(row.epoch or 0, step)
                row.last[str(name)] = value
                if not row.best_final and math.isfinite(value):
                    key = (model_run_id, str(trial_id))
                    pair = epochs.setdefault(key, {}).setdefault(step, [None, None])
                    if name == self.objective:
                        pair[0] = value
                    if name == self.selection_metric:
                        pair[1] = value
                n += 1
        for key, steps in epochs.items():
            row = self.rows[key]
            if any(loss is not None for _objective, loss in steps.values()) and any(
                objective is not None for objective, _loss in steps.values()
            ):  # the curves name the best epoch's objective: the summary's was a last value
                row.best = row.best_loss = row.best_step = None
            for step in sorted(steps):
                objective, loss = steps[step]
                self._offer_epoch(row, step, objective, loss)
        self.version += 1
        self.lifecycle_version += 1
        return n

    # -- views --------------------------------------------------------------------------

    @property
    def best_label(self) -> str:
        """What a trial's ``best`` means, for headers: ``val_accuracy at lowest val_loss``."""
        if self.selection_metric and self.selection_metric != self.objective:
            return f"{self.objective} at lowest {self.selection_metric}"
        return f"best {self.objective}"

    @property
    def best_help(self) -> str:
        """A sentence explaining :attr:`best_label` (tooltips, text footnotes)."""
        if self.selection_metric and self.selection_metric != self.objective:
            return (
                f"{self.objective} at the epoch with the lowest {self.selection_metric} so far "
                f"(the weights the trainer keeps; the best {self.objective} seen while a "
                f"trial reports no {self.selection_metric})"
            )
        return f"the best {self.objective} seen"

    @_locked
    def n_points(self) -> int:
        """Curve points held (bounded by trials x metrics x ``curve_points``)."""
        return sum(len(c) for curves in self.curves.values() for c in curves.values())

    @_locked
    def best_row(self) -> TrialRow | None:
        """The completed trial with the best objective so far (Optuna's notion of best)."""
        best: TrialRow | None = None
        for row in self.rows.values():
            if (
                row.best is not None
                and row.status == "completed"
                and (best is None or self._sign * row.best > self._sign * (best.best or 0.0))
            ):
                best = row
        return best

    @_locked
    def summary(self) -> dict[str, Any]:
        """Study-level figures: counts by status, the best trial, SN-vs-none running means.

        Means are over completed trials (each trial's ``best``: :attr:`best_label`), with
        standard errors (``se``), a configuration run on several seeds (its ``group_id``)
        counting once, with its seeds' mean, as in the comparison;
        ``paired`` is the mean SN − none difference over complete pairs, as the comparison
        counts them: one per configuration of one study (its ``group_id``: a configuration run
        on several seeds is one pair, each arm's mean over its seeds; else its ``pair_id``).
        """
        if self._summary_cache is not None and self._summary_cache[0] == self.lifecycle_version:
            out = dict(self._summary_cache[1])
            out["events"] = self.events
            return out
        counts = {s: 0 for s in ("running", "completed", "pruned", "cancelled", "failed")}
        arms: dict[str, list[float]] = {"SN": [], "none": []}
        configs: dict[Any, list[float]] = {}  # (run, group_id, arm) -> its seeds' values
        # (run, unit) -> its seeds' twins: pair_id -> arm -> values
        pairs: dict[Any, dict[Any, dict[str, list[float]]]] = {}
        for row in self.rows.values():
            counts[row.status] = counts.get(row.status, 0) + 1
            if row.status == "completed" and row.best is not None and row.arm in arms:
                if row.group_id is None:
                    arms[row.arm].append(row.best)
                else:
                    cfg = (row.model_run_id, _hashable_id(row.group_id), row.arm)
                    configs.setdefault(cfg, []).append(row.best)
                if row.pair_id is not None:  # a twin: its unit is its configuration
                    unit = _hashable_id(row.group_id if row.group_id is not None else row.pair_id)
                    key = (row.model_run_id, unit)  # another study's "g0000" is another pair
                    seeds = pairs.setdefault(key, {})
                    twins = seeds.setdefault(_hashable_id(row.pair_id), {"SN": [], "none": []})
                    twins[row.arm].append(row.best)
        for (_, _, arm), values in configs.items():
            arms[arm].append(sum(values) / len(values))
        diffs = []
        for seeds in pairs.values():
            # only the seeds with both twins, as the comparison pairs them: a seed whose twin
            # failed or still runs would put its own spread into one arm's mean
            both = [t for t in seeds.values() if t["SN"] and t["none"]]
            sn = [v for t in both for v in t["SN"]]
            none = [v for t in both for v in t["none"]]
            if sn:
                diffs.append(sum(sn) / len(sn) - sum(none) / len(none))
        best = self.best_row()
        out = {
            "study": self.study or ", ".join(sorted(self.studies_seen)) or "?",
            "objective": self.objective,
            "n_trials": len(self.rows),
            "budget": self.budget,
            **{f"n_{k}": v for k, v in counts.items()},
            "n_done": len(self.rows) - counts["running"],
            "best": None
            if best is None
            else {
                "value": best.best,
                "trial_id": best.trial_id,
                "arm": best.arm,
                "coeff": best.coeff,
            },
            "arms": {arm: _mean_se(values) for arm, values in arms.items()},
            "paired": _mean_se(diffs),
            "events": self.events,
        }
        self._summary_cache = (self.lifecycle_version, out)
        return dict(out)

    @_locked
    def table_rows(self, max_rows: int = 25) -> list[TrialRow]:
        """Rows to show: running trials first, then the most recent; newest first."""
        ordered = sorted(
            self.rows.values(), key=lambda r: (r.status == "running", r.order), reverse=True
        )
        return ordered[:max_rows]

    @_locked
    def curve_snapshot(self, max_trials: int = 40) -> list[tuple[TrialRow, dict[str, tuple]]]:
        """Copies of the curves of the ``max_trials`` most recent trials (for plotting)."""
        keys = sorted(self.curves, key=lambda k: self.rows[k].order)[-max_trials:]
        return [
            (self.rows[k], {name: c.points() for name, c in self.curves[k].items()}) for k in keys
        ]


def _mean_se(values: Sequence[float]) -> dict[str, float | int | None]:
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "se": None}
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "se": None}
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return {"n": n, "mean": mean, "se": math.sqrt(var / n)}


# ---------------------------------------------------------------------------------------------
# Rendering (pure functions of the state)
# ---------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or value != value:
        return "—"
    return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"


def _arm_label(row: TrialRow) -> str:
    if row.spectral_norm is None:
        return "?"
    if not row.spectral_norm:
        return "off"
    return "on" if row.coeff is None else f"on (c={row.coeff:.3g})"


_TD = "padding:2px 8px;text-align:right"


def _mlflow_cell(row: TrialRow, ui_url: str) -> str:
    if row.mlflow_run_id is None:
        return "—"
    short = html.escape(row.mlflow_run_id[:8])
    if row.mlflow_experiment_id is None:
        return f'<code title="{html.escape(row.mlflow_run_id)}">{short}</code>'
    url = f"{ui_url.rstrip('/')}/#/experiments/{row.mlflow_experiment_id}/runs/{row.mlflow_run_id}"
    return f'<a class="tl-mlflow" href="{html.escape(url)}" target="_blank">{short}</a>'


def render_table_html(
    state: MonitorState, max_rows: int = 25, *, mlflow_ui: str = "http://127.0.0.1:5000"
) -> str:
    """The trial table as an HTML fragment (``table.tl-monitor-table``, one ``tr.tl-trial``
    per trial with ``data-trial``/``data-status``/``data-arm`` attributes). Trials mirrored
    to MLflow link to their run in the MLflow UI at ``mlflow_ui``."""
    rows = state.table_rows(max_rows)
    best = state.best_row()
    th = '<th style="padding:2px 8px;text-align:right">'
    th_best = (
        f'<th class="tl-best" style="padding:2px 8px;text-align:right" '
        f'title="{html.escape(state.best_help)}">'
    )
    head = (
        f"<tr>{th}trial</th>{th}status</th>{th}SN</th>"
        f"{th_best}{html.escape(state.best_label)}</th>"
        f'<th style="padding:2px 8px;text-align:right" title="{html.escape(_EPOCH_HELP)}">'
        "epoch</th>"
        f"{th}Lipschitz bound</th>{th}σ<sub>max</sub></th>{th}MLflow</th></tr>"
    )
    body = []
    td = f'<td style="{_TD}">'
    for row in rows:
        star = " ★" if best is row else ""
        color = ARM_COLORS[row.arm]
        body.append(
            f'<tr class="tl-trial" data-trial="{html.escape(row.trial_id)}" '
            f'data-status="{html.escape(row.status)}" data-arm="{row.arm}">'
            f"{td}{html.escape(row.trial_id)}{star}</td>"
            f'<td class="tl-status-{html.escape(row.status)}" style="{_TD}">'
            f"{html.escape(row.status)}</td>"
            f'<td style="{_TD};color:{color};font-weight:600">{_arm_label(row)}</td>'
            f"{td}{_fmt(row.best)}</td>"
            f"{td}{_epoch_cell(row)}</td>"
            f"{td}{_fmt(row.lipschitz, 3)}</td>"
            f"{td}{_fmt(row.last.get('max_sigma'), 3)}</td>"
            f"{td}{_mlflow_cell(row, mlflow_ui)}</td></tr>"
        )
    more = len(state.rows) - len(rows)
    caption = (
        f"<caption style='caption-side:bottom;text-align:left;color:#666'>"
        f"showing {len(rows)} of {len(state.rows)} trials (running first, newest first)"
        "</caption>"
        if more > 0
        else ""
    )
    return (
        '<table class="tl-monitor-table" style="border-collapse:collapse;font-size:12px">'
        f"{caption}<thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"
    )


def _se_text(se: float | None) -> str:
    return f" ± {se:.4f} s.e." if se is not None else ""


def _hashable_id(value: Any) -> Any:
    """A ``pair_id`` / ``group_id`` as a dict key: as it is, or (a list or an object, which
    free-form parameters allow) its JSON."""
    try:
        hash(value)
    except TypeError:
        return json.dumps(value, sort_keys=True, default=str)
    return value


def _paired_text(p: Mapping[str, Any], sep: str, label: str, pairs: str) -> str:
    """The paired Δ SN − none part of a status line ("" before the first pair)."""
    if not p["n"]:
        return ""
    return f"{sep}{label} {p['mean']:+.4f}{_se_text(p['se'])} (n={p['n']}{pairs})"


def _arm_text(s: Mapping[str, Any], arm: str) -> str:
    a = s["arms"][arm]
    if not a["n"]:
        return f"{arm} —"
    return f"{arm} {a['mean']:.4f}{_se_text(a['se'])} (n={a['n']})"


def render_panel_html(state: MonitorState, status: str = "") -> str:
    """The study-level panel (``div.tl-monitor-panel``): progress, best, SN vs none."""
    s = state.summary()
    best = s["best"]
    best_txt = (
        "—"
        if best is None
        else f"{best['value']:.4f} ({html.escape(best['trial_id'])}, {best['arm']})"
    )
    paired = _paired_text(s["paired"], " · ", "paired Δ SN−none", " pairs")
    label = html.escape(state.best_label)
    helptext = html.escape(state.best_help)
    return (
        '<div class="tl-monitor-panel" style="font-size:13px;line-height:1.5">'
        f"<b>{html.escape(str(s['study']))}</b> · "
        f'<span class="tl-monitor-progress">{_trials_seen(s)}: {s["n_done"]} done '
        f"({s['n_completed']} completed, {s['n_pruned']} pruned, {s['n_failed']} failed"
        f"{', ' + str(s['n_cancelled']) + ' cancelled' if s['n_cancelled'] else ''}), "
        f'{s["n_running"]} running</span> · <span title="{helptext}">best trial '
        f"({label}) {best_txt}</span><br>"
        f'<span class="tl-monitor-means">running means (completed trials, {label}): '
        f'<span style="color:{ARM_COLORS["SN"]}">{_arm_text(s, "SN")}</span> | '
        f'<span style="color:{ARM_COLORS["none"]}">{_arm_text(s, "none")}</span>{paired}</span><br>'
        f'<span class="tl-monitor-status" style="color:#666">{html.escape(status)}</span></div>'
    )


def _trials_seen(s: Mapping[str, Any]) -> str:
    """``5 trials so far (budget 24)``, the budget when known: the trials seen are not a
    fraction of it ("2/3 done" read as 2 of a 3-trial study), since trials the lab retries
    (stale, cancelled) are seen but not counted toward it."""
    n, budget = s["n_trials"], s.get("budget")
    seen = f"{n} trial{'' if n == 1 else 's'} so far"
    return seen if budget is None else f"{seen} (budget {budget})"


def render_text_line(state: MonitorState, status: str = "") -> str:
    """One line for logs and headless runs."""
    s = state.summary()
    best = s["best"]
    best_txt = "—" if best is None else f"{best['value']:.4f} ({best['trial_id']}, {best['arm']})"
    paired = _paired_text(s["paired"], " | ", "paired Δ", "")
    tail = f" [{status}]" if status else ""
    return (
        f"[monitor {s['study']}] {_trials_seen(s)}: {s['n_done']} done, {s['n_running']} running"
        f" | best trial ({state.best_label}) {best_txt}"
        f" | {_arm_text(s, 'SN')} | {_arm_text(s, 'none')}{paired}{tail}"
    )


def render_table_text(state: MonitorState, max_rows: int = 25) -> str:
    """The trial table as fixed-width text (for terminals), with a note on ``best``."""
    lines = [f"{'trial':<14}{'status':<11}{'SN':<12}{'best*':>8}{'epoch':>9}{'lipschitz':>11}"]
    rows = state.table_rows(max_rows)
    for row in rows:
        lines.append(
            f"{row.trial_id:<14}{row.status:<11}{_arm_label(row):<12}{_fmt(row.best):>8}"
            f"{_epoch_cell(row):>9}{_fmt(row.lipschitz, 3):>11}"
        )
    more = len(state.rows) - len(rows)
    if more > 0:
        lines.append(
            f"… {more} more trials (showing {len(rows)} of {len(state.rows)}: "
            "running first, newest first)"
        )
    lines.append(f"* best: {state.best_help}")
    return "\n".join(lines)


def _curve_panels(state: MonitorState, snapshot: Sequence[tuple[Any, Any]]) -> list[str]:
    """The metrics :func:`render_curves_png` draws a panel of: the objective, then the
    first curve metric the snapshot's trials report (at most two)."""
    names = [state.objective] + [m for m in state.curve_metrics if m != state.objective]
    present = [n for n in names if any(n in curves for _, curves in snapshot)]
    return (present or [state.objective])[:2]


def render_curves_png(
    state: MonitorState,
    *,
    max_trials: int = 40,
    size: tuple[float, float] = (9.0, 3.2),
    dpi: int = 80,
) -> bytes:
    """Learning curves (objective, and a loss) per trial, coloured by SN arm, as PNG bytes.

    Uses matplotlib's Agg canvas directly (no pyplot), so it is safe off the main thread and
    leaves the notebook's inline backend alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    snapshot = state.curve_snapshot(max_trials)
    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    panels = _curve_panels(state, snapshot)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    ended_early = False  # a pruned, failed or cancelled trial's curve drawn (dotted)
    for ax, name in zip(axes, panels, strict=True):
        for row, curves in snapshot:
            if name not in curves:
                continue
            steps, values = curves[name]
            running = row.status == "running"
            ended_early |= row.status not in ("running", "completed")
            ax.plot(
                steps,
                values,
                color=ARM_COLORS[row.arm],
                alpha=0.9 if running else 0.45,
                lw=1.6 if running else 1.0,
                ls="-" if row.status in ("running", "completed") else ":",
            )
        ax.set_title(name if not state.study else f"{state.study} · {name}", fontsize=10)
        ax.set_xlabel("epoch", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no 0.25-epoch ticks
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.25)
    handles = [
        Line2D([0], [0], color=ARM_COLORS["SN"], lw=2, label="SN"),
        Line2D([0], [0], color=ARM_COLORS["none"], lw=2, label="none"),
    ]
    if ended_early:
        handles.append(
            Line2D([0], [0], color="#888", lw=1, ls=":", label="pruned / failed / cancelled")
        )
    axes[0].legend(handles=handles, fontsize=8, loc="best")
    if not snapshot:
        axes[0].text(
            0.5,
            0.5,
            "waiting for metrics…",
            ha="center",
            va="center",
            transform=axes[0].transAxes,
            color="#888",
        )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Frontend detection
# ---------------------------------------------------------------------------------------------


def detect_frontend() -> tuple[Literal["widget", "text"], str]:
    """Whether a live Jupyter frontend can show widgets here: ``(mode, reason)``.

    ``$THUNDERLINE_MONITOR`` (``widget``/``text``) overrides. Otherwise widgets need a
    Jupyter kernel (ZMQ shell) whose current request came from an interactive frontend:
    papermill, nbclient and nbval execute with stdin disabled, JupyterLab and VS Code do not.
    """
    forced = os.environ.get(ENV_MONITOR_MODE, "").strip().lower()
    if forced == "widget":
        return "widget", f"${ENV_MONITOR_MODE}=widget"
    if forced == "text":
        return "text", f"${ENV_MONITOR_MODE}=text"
    ipython_mod = sys.modules.get("IPython")
    ip = ipython_mod.get_ipython() if ipython_mod is not None else None
    if ip is None:
        return "text", "not running under IPython"
    if type(ip).__name__ != "ZMQInteractiveShell":
        return "text", f"no notebook frontend ({type(ip).__name__})"
    kernel = getattr(ip, "kernel", None)
    if kernel is not None and not getattr(kernel, "_allow_stdin", True):
        return "text", "headless execution (papermill/nbclient/nbval: stdin disabled)"
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return "text", "ipywidgets is not installed"
    return "widget", "Jupyter frontend"


def _in_kernel() -> bool:
    ipython_mod = sys.modules.get("IPython")
    ip = ipython_mod.get_ipython() if ipython_mod is not None else None
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


# ---------------------------------------------------------------------------------------------
# The monitor
# ---------------------------------------------------------------------------------------------


@dataclass
class BackgroundRun:
    """A study running in a background thread under a monitor (see
    :meth:`LiveMonitor.run_in_background`), or one that already ran (``thread`` None).

    Attributes:
        stop: asks the study to stop (the monitor's :meth:`~LiveMonitor.request_stop`).
        monitor: the monitor following the study, if any.
    """

    thread: threading.Thread | None = None
    result: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    stop: Callable[[], None] | None = None
    monitor: LiveMonitor | None = None

    def wait(self, timeout: float | None = None) -> Any:
        """Wait for the study; returns its result, or re-raises its exception.

        Interrupting the kernel while waiting stops the study cleanly, as the Stop button
        does: the running trial ends cancelled, and ``wait`` returns once the study has
        ended (a second interrupt stops waiting). A cell that blocks the kernel also holds
        back widget messages (ipykernel handles them between cells), so the Stop button
        cannot answer while a notebook waits here: interrupt the kernel (■) instead.

        Raises:
            TimeoutError: ``timeout`` seconds passed and the study still runs.
        """
        try:
            ended = self._wait_done(timeout)
        except KeyboardInterrupt:
            if self.stop is None or self.done.is_set():
                raise
            self.stop()
            log.warning("interrupted: the study stops after the current epoch; waiting for it")
            self.done.wait()
            ended = True
        if not ended:
            raise TimeoutError("the study is still running")
        if self.error is not None:
            raise self.error
        return self.result

    def _wait_done(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done.wait(0.1):  # in slices: an interrupt is taken at once
            if deadline is not None and time.monotonic() >= deadline:
                return False
        return True

    @property
    def running(self) -> bool:
        return not self.done.is_set()


class LiveMonitor:
    """Live view of a running study: trial table, learning curves, SN-vs-none panel.

    Args:
        source: an :class:`EventSource` (or a bus / store / lab path / gateway URL).
        study: only this study's events (model_run_id or study name); None: all.
        mode: ``widget`` (ipywidgets), ``text`` (occasional lines), or ``auto``
            (:func:`detect_frontend`).
        min_interval: minimum seconds between redraws (0.25: at most 4 per second).
        plot_interval: minimum seconds between re-rendering the curves PNG.
        poll_interval: seconds between polls of the source (None: the source's own pace).
        text_interval: minimum seconds between text lines in text mode (status changes
            such as a source outage included: one warning is logged per outage, one line
            when it recovers).
        snapshot_on_finish: leave a static PNG + HTML table when the study finishes.
        selection_metric: a trial's ``best`` is the objective at the epoch with the lowest
            value of this metric, as the trainer's ``best_val_accuracy``
            (:class:`MonitorState`).
        budget: the study's number of trials (its ``n_trials``), shown beside the trials
            seen (``5 trials so far (budget 24)``); None when not known, as for a monitor
            following a study started elsewhere (the events do not say it).

    Raises:
        ConfigError: an option of the wrong type or out of range (intervals are finite
            numbers of seconds, counts integers), or a ``study`` that is no name (an
            integer is taken as its text: papermill makes ``-p study_name 2024`` an int);
            checked before the source is opened.

    Example (in a notebook; ``mode="auto"`` picks widgets or text lines)::

        bus = EventBus()
        mon = LiveMonitor.from_bus(bus, study="sn-ab").start()
        run = mon.run_in_background(
            lambda: run_study("sn-ab", bus=bus, should_stop=mon.stop_event))
        result = run.wait()  # in a later cell: waits for the study
        # ... or in the foreground (no Stop button: a busy kernel cannot handle a click):
        with LiveMonitor.from_bus(bus, study="sn-ab") as mon:
            run_study("sn-ab", bus=bus, should_stop=mon.should_stop)

    :func:`thunderline_lab.notebook.start_study` does the former for the study notebook.

    Keep a reference to the monitor (``mon = ...``): one that nobody holds any more (a
    re-run cell rebound ``mon``) stops polling and releases its source when it is
    garbage-collected. (IPython's ``Out`` history holds a cell's last value: end such a
    cell with ``mon.start();`` or an assignment.)
    """

    def __init__(
        self,
        source: Any,
        study: str | int | None = None,
        *,
        mode: Mode = "auto",
        objective: str = "val_accuracy",
        direction: Literal["max", "min"] = "max",
        min_interval: float = 0.25,
        plot_interval: float = 1.0,
        poll_interval: float | None = None,
        text_interval: float = 10.0,
        max_table_rows: int = 25,
        max_plot_trials: int = 40,
        curve_points: int = 500,
        max_curve_trials: int = 100,
        snapshot_on_finish: bool = True,
        title: str | None = None,
        selection_metric: str | None = "val_loss",
        budget: int | None = None,
    ) -> None:
        # every option (the parameters of this call), before the source is opened
        _check_options({k: v for k, v in locals().items() if k in _monitor_options()})
        study = None if study is None else study_name(study)
        self.source = as_source(source)
        self.state = MonitorState(
            study,
            objective=objective,
            direction=direction,
            selection_metric=selection_metric,
            curve_points=curve_points,
            max_curve_trials=max(max_curve_trials, max_plot_trials),
        )
        self.state.budget = None if budget is None else int(budget)
        if mode == "auto":
            self.mode, self.mode_reason = detect_frontend()
        else:
            self.mode, self.mode_reason = mode, "chosen"
        self.min_interval = min_interval
        self.plot_interval = plot_interval
        default_poll: float = getattr(self.source, "poll_interval", 0.25)
        self.poll_interval = default_poll if poll_interval is None else float(poll_interval)
        self.text_interval = text_interval
        self.max_table_rows = max_table_rows
        self.max_plot_trials = max_plot_trials
        self.snapshot_on_finish = snapshot_on_finish
        self.title = title
        self.stop_event = threading.Event()
        self.redraws = 0
        self.redraw_times: deque[float] = deque(maxlen=1000)
        self.text_lines = 0
        self.source_errors = 0  # failed polls, all told
        self.polls_ok = 0  # successful polls: 0 with errors means "never connected"
        self.pumps = 0  # polls folded into the state
        self.last_error: str | None = None
        self.loaded_trials = 0  # trials loaded from a snapshot (from_store, from_gateway)
        self._loaded_from = "the store"
        self._attach: Callable[[], None] | None = None  # a snapshot still to take
        self._failing = False  # in an outage: warned once, says so again on recovery
        self._outage_errors = 0
        self._last_event_at = time.monotonic()
        self._status = "starting"
        self._drawn_status = ""
        self._drawn_version = -1
        self._plotted_version = -1
        self._last_draw = -math.inf
        self._last_plot = -math.inf
        self._last_text = -math.inf
        self._lock = self.state.lock  # one lock: the pump's fold and every read of the state
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx: contextvars.Context | None = None
        self._display: Any = None
        self._widgets: dict[str, Any] = {}
        self._sent: dict[str, Any] = {}
        self._started = False
        self._finished = False
        self._closed = False
        self._background: BackgroundRun | None = None
        # A monitor nobody holds any more (a re-run cell rebound its name) stops its pump
        # thread and releases its source: it neither polls nor buffers events for nobody.
        # The pump thread and the Stop button hold it weakly for that.
        self._release = weakref.finalize(self, _release_monitor, self._halt, self.source)
        self._release.atexit = False

    # -- constructors -------------------------------------------------------------------

    @classmethod
    def from_bus(cls, bus: EventBus, study: str | int | None = None, **kwargs: Any) -> LiveMonitor:
        """Monitor a study publishing on ``bus`` in this process."""
        _check_options(kwargs, _monitor_options())
        study = None if study is None else study_name(study)
        return cls(BusSource(bus), study, **kwargs)

    @classmethod
    def from_store(
        cls,
        store: Any,
        study: str | int | None = None,
        *,
        snapshot: bool = True,
        bus: EventBus | None = None,
        create: bool = False,
        **kwargs: Any,
    ) -> LiveMonitor:
        """Monitor a study that other processes (workers) write into a lab's store.

        With ``snapshot`` (and a ``study``), the current trials and their downsampled
        curves are loaded first (:meth:`MonitorState.load_trials` / ``load_history``) and
        only newer events are tailed, instead of replaying the whole log.

        A study the lab has no trials of yet is waited for: open the monitor, then start
        the study (elsewhere); its trials show as their events arrive, and
        :func:`~thunderline_lab.notebook.follow` does not call it finished before it had
        any. A lab without a trial store, though, is an error (a mistyped path would
        otherwise be watched forever), unless ``create``.

        Args:
            bus: also follow this kernel's bus (a :class:`CombinedSource`): its events show
                at once, every worker's as they reach the store.
            create: create the store if the lab has none (a study about to start here).

        Raises:
            StoreError: no trial store at ``store`` (a mistyped lab path), unless ``create``;
                a ``host:port`` there is told it needs ``http://``.
            ConfigError: ``store`` is no store, lab or path; ``bus`` no bus; a bad option.
        """
        _check_options(kwargs, _monitor_options())
        study = None if study is None else study_name(study)
        if bus is not None:
            _check_bus(bus)
        store_source = StoreSource(store, after=None if snapshot and study else 0, create=create)
        source: EventSource = store_source
        if bus is not None:
            source = CombinedSource(BusSource(bus), store_source)
        mon = cls(source, study, **kwargs)
        if snapshot and study:
            mon._load_snapshot(store_source.store, study)
        if study and bus is None and not mon.state.rows:
            _warn_unknown_study(store_source.store, study)
        return mon

    @classmethod
    def from_gateway(
        cls,
        url: str,
        token: str | None = None,
        study: str | int | None = None,
        *,
        snapshot: bool = True,
        client: Any = None,
        bus: EventBus | None = None,
        **kwargs: Any,
    ) -> LiveMonitor:
        """Monitor a study through a lab's gateway, as :meth:`from_store` does a store.

        With ``snapshot`` (and a ``study``) the monitor attaches with the study's trials
        (``GET /api/trials?study=``) and the downsampled curves of its recent trials
        (``GET /api/trials/{run}/{trial}/metrics``), then tails only the events logged after
        the log's end at that moment (``GET /healthz``'s ``last_seq``): the other studies'
        events, and this one's already summed up, never cross the network. Without, it
        replays the whole log from sequence 0 (``GET /api/events?after=``).

        The snapshot is taken here; when the gateway cannot answer yet, the pump takes it
        on its first poll instead, with the same retries and one warning per outage as the
        polls (a monitor started before its gateway still attaches). A gateway that refuses
        the token, though, is an error here: retrying would not help.

        Args:
            client: an ``httpx.Client`` to use (as :class:`GatewaySource`'s).
            bus: also follow this kernel's bus (a :class:`CombinedSource`): a study this
                kernel reports through the gateway shows its own events at once, every
                worker's as the gateway logs them.

        Raises:
            GatewayError: ``url`` is no ``http(s)://`` URL, or (with a snapshot) the gateway
                answers 401 or 403: a wrong or missing ``token``.
        """
        _check_options(kwargs, _monitor_options())
        study = None if study is None else study_name(study)
        if bus is not None:
            _check_bus(bus)
        source = GatewaySource(url, token, client=client)
        followed: EventSource = source
        if bus is not None:
            followed = CombinedSource(BusSource(bus), source)
        mon = cls(followed, study, **kwargs)
        if snapshot and study:

            def attach() -> None:
                after = source.last_seq()  # first: what the snapshot misses is tailed
                mon._load_snapshot(source, study)
                source.after = after
                if bus is None and not mon.state.rows:  # a mistyped name: as from_store
                    _warn_unknown_study(source, study)

            mon._attach = attach
            try:
                mon._attach_now()
            except GatewayError as exc:
                if source.last_status in (401, 403):  # a wrong token stays wrong
                    mon._release()
                    raise
                log.debug("monitor attach deferred to the pump: %s", exc)
        return mon

    def _load_snapshot(self, reader: TrialStore | GatewaySource, study: str) -> None:
        """Load the study's trials and the downsampled curves of the recent ones."""
        trials = reader.trials(study=study)
        with self._lock:
            self.state.load_trials(trials)
            self.loaded_trials = len(trials)
            self._loaded_from = "the gateway" if isinstance(reader, GatewaySource) else "the store"
        recent = trials.tail(self.max_plot_trials)
        for run_id, part in recent.groupby("model_run_id"):
            with self._lock:
                self.state.load_history(reader, str(run_id), part["trial_id"].tolist())

    def _attach_now(self) -> None:
        """Take a pending snapshot (from_gateway); it raises as a failed poll does."""
        attach = self._attach
        if attach is not None:
            attach()
            self._attach = None

    def _poll(self) -> list[Any]:
        self._attach_now()
        return self.source.poll()

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def headless(self) -> bool:
        """True in text mode (no live frontend)."""
        return self.mode == "text"

    def idle_seconds(self) -> float:
        """Seconds since the source last delivered events of this study (or since start)."""
        return time.monotonic() - self._last_event_at

    def study_finished(self, quiet: float = 60.0) -> bool:
        """Whether the followed study looks finished: it has trials, none of them runs, and
        nothing new arrived for ``quiet`` seconds.

        The events carry no study-level end (``ml.run.stop`` ends one trial's run), and a
        study starts its next trial right after the last one finished, so a quiet spell with
        no trial running is the sign; ``quiet`` covers a worker still loading its data.
        While the source fails (a gateway gone away) nothing can be told: not finished. Once
        it answers again, what it missed is delivered (the log keeps it), so a spell with
        nothing new, outage included, then counts.
        """
        if self._failing or self._attach is not None:
            return False
        s = self.state.summary()
        return s["n_trials"] > 0 and s["n_running"] == 0 and self.idle_seconds() >= quiet

    def wait_for_running_trials(self, quiet: float = 60.0, poll: float = 0.2) -> bool:
        """Wait while trials of the study still run elsewhere (other workers), so the final
        view is the whole study's; returns True once none runs.

        Gives up (False) when nothing new arrived for ``quiet`` seconds (a worker that died
        mid-trial leaves its trial "running" until a study run marks it failed), and at once
        when Stop was pressed.
        """
        self._catch_up(poll)
        while not self.stop_event.is_set():
            if self.state.summary()["n_running"] == 0:
                return True
            if self.idle_seconds() >= quiet:
                return False
            if self._status.startswith("live"):
                self._status = (
                    f"this worker is done; following other workers' trials · {self.source.label}"
                )
            time.sleep(poll)
        return False

    def _catch_up(self, poll: float) -> None:
        """Return once a whole pump ran after this call (the state holds what arrived)."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            if not self._finished:
                self.pump()
            return
        target = self.pumps + 2  # the one under way may have polled before this call
        deadline = time.monotonic() + 10 * self.poll_interval + 1.0
        while self.pumps < target and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(min(poll, self.poll_interval))

    def should_stop(self) -> bool:
        """For studies that poll: True once Stop was pressed (or :meth:`request_stop`)."""
        return self.stop_event.is_set()

    def request_stop(self) -> None:
        """Ask the study to stop (what the Stop button does)."""
        self.stop_event.set()
        self._status = "stop requested — finishing the current epoch"
        btn = self._widgets.get("stop")
        if btn is not None:
            btn.disabled = True
            btn.description = "Stopping…"

    def start(self, *, display: bool = True, thread: bool = True) -> LiveMonitor:
        """Show the monitor (widget mode) and start the pump thread; returns self."""
        if self._started:
            return self
        self._started = True
        self._ctx = contextvars.copy_context()
        self._last_event_at = time.monotonic()
        self._status = f"live · {self.source.label}"
        if self.mode == "widget":
            self._build_widgets()
            if display:
                self._show_widget()
        elif display:
            self._emit_text(force=True)
        if thread:
            # A plain thread: ipykernel sends its text lines to the cell executing now (papermill
            # keeps only those), never into an earlier cell.
            self._thread = threading.Thread(
                target=_pump_loop,
                args=(weakref.ref(self), self._halt, self.poll_interval),
                name="thunderline-monitor",
                daemon=True,
            )
            self._thread.start()
        return self

    def __enter__(self) -> LiveMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pump_in_thread(self, backoff: float) -> float:
        """One pass of the pump thread; returns the seconds to wait before the next."""
        try:
            self.pump()
            return self.poll_interval
        except Exception as exc:  # a monitor must never take the study down
            self._source_failed(exc)
            try:
                self._maybe_redraw()  # throttled like any redraw: no line per retry
            except Exception:
                log.debug("monitor redraw failed", exc_info=True)
            return min(max(backoff * 2, self.poll_interval), 10.0)

    def _source_failed(self, exc: Exception) -> None:
        """Count a failed poll; warn once per outage (the recovery is announced once too)."""
        self.source_errors += 1
        self._outage_errors += 1
        known = isinstance(exc, ThunderlineLabError)
        self.last_error = str(exc) if known else f"{type(exc).__name__}: {exc}"
        self._status = f"source error (retrying): {self.last_error}"
        if self._failing:
            log.debug("monitor source %s still failing: %s", self.source.label, exc)
            return
        self._failing = True
        if known:
            label, message = self.source.label, str(exc)
            log.warning(
                "monitor source failed: %s (retrying quietly; one more line when it recovers)",
                message if message.startswith(label) else f"{label}: {message}",
            )
        else:
            log.warning("monitor pump failed (retrying quietly)", exc_info=True)

    def _source_ok(self) -> None:
        self.polls_ok += 1
        if not self._failing:
            return
        self._failing = False
        log.warning(
            "monitor source %s recovered after %d failed polls",
            self.source.label,
            self._outage_errors,
        )
        self._outage_errors = 0
        if not self._finished:
            self._status = f"live · {self.source.label}"

    def pump(self, *, force: bool = False) -> None:
        """Drain the source, fold the events and redraw if due (throttled, coalesced)."""
        batch = self._poll()
        self._source_ok()
        if batch:
            with self._lock:
                before = self.state.events
                self.state.apply_many(batch)
                if self.state.events != before:
                    self._last_event_at = time.monotonic()
        self.pumps += 1
        self._maybe_redraw(force=force)

    def _maybe_redraw(self, *, force: bool = False) -> None:
        if not self._started:
            return
        now = time.monotonic()
        if self.mode == "text":
            if force or now - self._last_text >= self.text_interval:
                self._emit_text(force=force)
            return
        if not self._widgets:
            return
        wait = self.min_interval - (now - self._last_draw)
        if wait > 0:
            if not force:
                return
            # a forced redraw (the final state, a source error) still keeps the rate limit:
            # it waits out the interval rather than making a fifth redraw within a second
            time.sleep(wait)
            now = time.monotonic()
        with self._lock:
            version = self.state.version
            panel = render_panel_html(self.state, self._status)
            table = render_table_html(self.state, self.max_table_rows)
        changed = self._set("panel", panel) | self._set("table", table)
        if version != self._plotted_version and (
            force or now - self._last_plot >= self.plot_interval
        ):
            with self._lock:
                self._plotted_version = self.state.version
                png = render_curves_png(self.state, max_trials=self.max_plot_trials)
            changed |= self._set("curves", png)
            self._last_plot = now
        self._drawn_version = version
        if changed:
            self._last_draw = now
            self.redraws += 1
            self.redraw_times.append(now)

    def _set(self, name: str, value: Any) -> bool:
        if self._sent.get(name) == value:
            return False
        self._sent[name] = value
        self._widgets[name].value = value
        return True

    def _emit_text(self, *, force: bool = False) -> None:
        version, status = self.state.version, self._status
        if not force and version == self._drawn_version and status == self._drawn_status:
            return
        with self._lock:
            line = render_text_line(self.state, status)
        self._drawn_version, self._drawn_status = version, status
        self._last_text = time.monotonic()
        self.text_lines += 1
        print(line, flush=True)

    # -- widgets ------------------------------------------------------------------------

    def _build_widgets(self) -> None:
        import ipywidgets as w

        panel = w.HTML(value="")
        table = w.HTML(value="")
        curves = w.Image(format="png", layout=w.Layout(max_width="100%"))
        stop = w.Button(
            description="Stop study",
            button_style="danger",
            icon="stop",
            tooltip="Ends the study cleanly after the current epoch",
            layout=w.Layout(display="none", width="auto"),
        )
        stop.on_click(_weak_method(self.request_stop))  # widgets live on: hold self weakly
        curves.add_class("tl-monitor-curves")
        stop.add_class("tl-monitor-stop")
        title = w.HTML(value=f"<b>{html.escape(self.title)}</b>") if self.title else None
        children = [c for c in (title, w.HBox([panel, stop]), curves, table) if c is not None]
        box = w.VBox(children)
        box.add_class("tl-monitor")
        self._widgets = {"box": box, "panel": panel, "table": table, "curves": curves, "stop": stop}
        self._maybe_redraw(force=True)

    def _show_widget(self) -> None:
        from IPython.display import display

        self._display = display(self._widgets["box"], display_id=True)

    @property
    def widget(self) -> Any:
        """The ipywidgets container (None in text mode)."""
        return self._widgets.get("box")

    # -- background studies -------------------------------------------------------------

    def run_in_background(
        self, fn: Callable[[], Any], *, wait: bool | None = None
    ) -> BackgroundRun:
        """Run ``fn()`` (the study) in a thread; the Stop button sets :attr:`stop_event`.

        ``fn`` should end cleanly once ``monitor.stop_event`` is set (pass it, or
        ``monitor.should_stop``, as the study runner's ``should_stop``). When ``fn`` returns
        the monitor drains the last events and finishes (final redraw and static snapshot).
        :meth:`BackgroundRun.wait` returns the study's result (or raises its error, with its
        traceback: the monitor itself only shows the error in its status line).

        Args:
            wait: block until the study ends (and raise its error here). Default: only
                without a live frontend (papermill/nbval), where the notebook must not end
                before the study; interrupting the wait stops the study cleanly.

        Raises:
            StudyError: a study this monitor runs is still running (one study per monitor:
                the first to end would finish the monitor under the other), or the monitor
                has finished (make a new one).
        """
        previous = self._background
        if previous is not None and previous.running:
            raise StudyError(
                "a study is still running under this monitor: stop it (run.stop(), or the "
                "Stop button) and wait for it (run.wait()) before starting another"
            )
        if self._finished:
            raise StudyError(
                "this monitor has finished (its final snapshot is taken): make a new monitor "
                "for another study"
            )
        if not self._started:
            self.start()
        run = BackgroundRun(stop=self.request_stop, monitor=self)

        def target() -> None:
            try:
                run.result = fn()
            except BaseException as exc:
                # not logged here: wait() re-raises it with its traceback, and the status
                # line names it, so it shows once
                run.error = exc
            finally:
                status = f"failed ({type(run.error).__name__}: {run.error})" if run.error else None
                try:
                    if self.mode == "widget" and self._ctx is not None:
                        # the snapshot replaces the widget from the cell that displayed it
                        self._ctx.run(self.finish, status)
                    else:
                        self.finish(status)
                finally:
                    run.done.set()

        run.thread = threading.Thread(target=target, name="thunderline-study", daemon=True)
        self._background = run
        stop = self._widgets.get("stop")
        if stop is not None:
            stop.layout.display = ""
        run.thread.start()
        if wait if wait is not None else self.headless:
            run.wait()  # the study's error is raised here, in the cell that ran it
        return run

    # -- finishing ----------------------------------------------------------------------

    def finish(self, status: str | None = None) -> None:
        """Drain the source, stop the pump, draw the final state, leave the snapshot."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
        self._halt.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        try:
            batch = self._poll()
            if batch:
                with self._lock:
                    self.state.apply_many(batch)
            self._source_ok()
        except ThunderlineLabError as exc:
            self.source_errors += 1
            self.last_error = str(exc)
        if status is None:
            status = "stopped" if self.stop_event.is_set() else "finished"
        self._status = self._final_status(status)
        stop = self._widgets.get("stop")
        if stop is not None:
            stop.layout.display = "none"
        if self.mode == "widget" and self._widgets:
            self._maybe_redraw(force=True)
        elif self._started:
            self._emit_text(force=True)
        if self.snapshot_on_finish and self._started:
            self._leave_snapshot()

    def _final_status(self, status: str) -> str:
        label = self.source.label
        if self.polls_ok == 0 and self.source_errors:
            error = str(self.last_error)
            error = error[len(label) + 2 :] if error.startswith(f"{label}: ") else error
            return f"{status} · never connected to {label} (last error: {error})"
        events = self.state.events
        if self.loaded_trials:
            seen = (
                f"{self.loaded_trials} trial{'' if self.loaded_trials == 1 else 's'} loaded "
                f"from {self._loaded_from}, then {events} new event{'' if events == 1 else 's'}"
            )
        else:
            seen = f"{events} events"
        return f"{status} · {seen} · {label}"

    def close(self) -> None:
        """Finish and release the source (unsubscribe / close connections)."""
        if self._closed:
            return
        self.finish()
        self._closed = True
        self._release()

    def snapshot(self) -> tuple[bytes, str]:
        """The current curves (PNG bytes) and panel + table (HTML)."""
        with self._lock:
            png = render_curves_png(self.state, max_trials=self.max_plot_trials)
            page = render_panel_html(self.state, self._status) + render_table_html(
                self.state, self.max_table_rows
            )
        return png, page

    def save_snapshot(self, directory: str | Path, stem: str = "monitor") -> tuple[Path, Path]:
        """Write ``<stem>.png`` and ``<stem>.html`` into ``directory``."""
        png, page = self.snapshot()
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        png_path, html_path = out / f"{stem}.png", out / f"{stem}.html"
        png_path.write_bytes(png)
        html_path.write_text(f"<!doctype html><meta charset='utf-8'>{page}", encoding="utf-8")
        return png_path, html_path

    def _leave_snapshot(self) -> None:
        png, page = self.snapshot()
        if not _in_kernel():
            print(render_table_text(self.state, self.max_table_rows), flush=True)
            return
        import base64

        from IPython.display import HTML, Image, display

        # what the picture shows, for readers who cannot see it (and nbconvert's HTML export,
        # which warns of an image without it)
        alt_text = self._curves_alt()
        alt = html.escape(alt_text, quote=True)
        snap_html = (
            '<div class="tl-monitor-snapshot">'
            f'<img class="tl-monitor-curves" alt="{alt}" src="data:image/png;base64,'
            f'{base64.b64encode(png).decode()}"/>{page}</div>'
        )
        if self._display is not None:
            # The live widget becomes a static snapshot in place: it survives kernel restarts,
            # HTML export and nbconvert, and no other output is touched.
            self._display.update(
                {
                    "text/html": snap_html,
                    "image/png": png,
                    "text/plain": render_text_line(self.state, self._status),
                },
                raw=True,
                metadata={"image/png": {"alt": alt_text}},
            )
        else:
            display(Image(data=png, format="png", alt=alt_text), HTML(page))

    def _curves_alt(self) -> str:
        """The alt text of the curves' picture: what it plots, of which study."""
        state = self.state
        of = f" of study {state.study}" if state.study else ""
        with self._lock:  # the panels the picture draws (snapshot() drew it just now)
            panels = _curve_panels(state, state.curve_snapshot(self.max_plot_trials))
        return f"learning curves{of} per epoch, coloured by SN arm: {', '.join(panels)}"


_CHOICES = {"mode": ("auto", "widget", "text"), "direction": ("max", "min")}
# Durations in seconds, and the bound each must pass: a redraw or text interval may be 0
# (every pump), a poll interval not (a busy loop); infinity is refused too (a forced redraw
# would sleep out an infinite min_interval).
_SECONDS = {"min_interval": ">= 0", "plot_interval": ">= 0", "text_interval": ">= 0"}
# Counts and their least value: a curve needs two points (Curve keeps at least two).
_COUNTS = {"max_table_rows": 1, "max_plot_trials": 1, "curve_points": 2, "max_curve_trials": 1}


def _expected(name: str, value: Any) -> str | None:
    """What option ``name`` accepts, if ``value`` is not that; None when it is fine (or
    ``name`` is no option checked here)."""
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if name in _CHOICES:
        choices = _CHOICES[name]
        if isinstance(value, str) and value in choices:
            return None
        return " or ".join([", ".join(map(repr, choices[:-1])), repr(choices[-1])])
    if name == "poll_interval":
        if value is None or (number and math.isfinite(value) and value > 0):
            return None  # None: the source's own pace
        return "a finite number of seconds > 0, or None (the source's own pace)"
    if name in _SECONDS:
        if number and math.isfinite(value) and value >= 0:
            return None
        return f"a finite number of seconds {_SECONDS[name]}"
    if name in _COUNTS:
        least = _COUNTS[name]
        integer = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if integer and int(value) >= least:
            return None
        return f"an integer >= {least}"
    if name in ("objective", "selection_metric"):
        # a metric name: a misspelt one shows only once events arrive (any name may come)
        if (isinstance(value, str) and value.strip()) or (
            value is None and name == "selection_metric"
        ):
            return None
        return "a metric name" + (", or None" if name == "selection_metric" else "")
    if name == "curve_metrics":  # a lone string would be taken letter by letter
        if isinstance(value, list | tuple) and all(isinstance(m, str) and m for m in value):
            return None
        return "a list of metric names"
    if name == "snapshot_on_finish":
        return None if isinstance(value, bool) else "True or False"
    if name == "title":
        return None if value is None or isinstance(value, str) else "a title (text), or None"
    if name == "budget":
        integer = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if value is None or (integer and int(value) >= 1):
            return None
        return "the study's number of trials (an integer >= 1), or None (not known)"
    return None


def _check_options(options: Mapping[str, Any], known: Sequence[str] | None = None) -> None:
    """Refuse a monitor option that is misspelt, out of range or of the wrong type, and,
    given the ``known`` names, an unknown one (``from_*`` check before opening a source:
    a refused option leaves none subscribed or open).

    Raises:
        ConfigError: naming the option, what it accepts and what it got.
    """
    for name, value in options.items():
        if known is not None and name not in known:
            raise ConfigError(
                f"{name}: no option of LiveMonitor{did_you_mean(name, known)} "
                f"(its options: {', '.join(known)})"
            )
        expected = _expected(name, value)
        if expected is not None:
            raise ConfigError(f"{name}: expected {expected}, got {value!r}")


@functools.cache
def _monitor_options() -> tuple[str, ...]:
    """The keyword-only options of :class:`LiveMonitor` (what ``from_*`` pass on to it)."""
    params = inspect.signature(LiveMonitor.__init__).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _release_monitor(halt: threading.Event, source: EventSource) -> None:
    """Stop a monitor's pump and release its source (close, or the monitor collected)."""
    halt.set()
    try:
        source.close()
    except Exception:  # also runs at garbage collection: never raise there
        log.debug("closing the monitor's source failed", exc_info=True)


def _pump_loop(ref: weakref.ref[LiveMonitor], halt: threading.Event, backoff: float) -> None:
    """The pump thread: holds the monitor only while pumping, so it can be collected."""
    while not halt.wait(backoff):
        monitor = ref()
        if monitor is None:
            return
        backoff = monitor._pump_in_thread(backoff)
        del monitor


def _weak_method(method: Callable[[], Any]) -> Callable[[Any], None]:
    """A widget callback calling ``method`` (bound) while its object lives."""
    ref = weakref.WeakMethod(method)

    def call(_widget: Any) -> None:
        bound = ref()
        if bound is not None:
            bound()

    return call


# ---------------------------------------------------------------------------------------------
# Synthetic studies (demos, tests, benchmarks)
# ---------------------------------------------------------------------------------------------

_SYNTH_LAYERS = ("net.0", "net.2", "net.4")


def _trial_events(
    study: str,
    number: int,
    pair: int,
    sn: bool,
    coeff: float,
    epochs: int,
    rng: random.Random,
    fate: str = "completed",
) -> Iterator[Event]:
    trial_id = f"trial_{number:04d}"
    params = {
        "lr": 3e-3,
        "depth": 3,
        "width": 64,
        "dropout": 0.1,
        "weight_decay": 1e-4,
        "spectral_norm": sn,
        "spectral_norm_coeff": coeff if sn else None,
        "seed": pair,
        "pair_id": f"pair_{pair:04d}",
        "arm": "sn" if sn else "none",
        "epochs": epochs,  # planned, as a study's trials give it
    }
    common = {"model_run_id": study, "trial_id": trial_id, "study": study}
    yield ev_mod.trial_start(
        **common, spectral_norm=sn, spectral_norm_coeff=coeff if sn else None, parameters=params
    )
    pair_rng = random.Random(pair)
    ceiling = 0.86 + 0.06 * pair_rng.random() + (0.012 if sn else 0.0)
    speed = 0.25 + 0.1 * pair_rng.random()
    best, best_loss = 0.0, math.inf
    sigma = 0.0
    last_epoch = epochs - 1 if fate != "pruned" else max(1, epochs // 3)
    for epoch in range(last_epoch + 1):
        acc = ceiling * (1 - math.exp(-speed * (epoch + 1))) + rng.gauss(0, 0.006)
        acc = min(max(acc, 0.0), 1.0)
        val_loss = max(0.05, 1.2 * math.exp(-speed * (epoch + 1)) + 0.25 + rng.gauss(0, 0.01))
        train_loss = max(0.01, val_loss * (0.85 if sn else 0.7))
        sigma = min(coeff, 0.95 + 0.01 * epoch) if sn else 1.0 + 0.35 * epoch**0.7
        best, best_loss = max(best, acc), min(best_loss, val_loss)
        yield ev_mod.run_metric(
            **common,
            step=epoch,
            spectral_norm=sn,
            measurements={
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_accuracy": acc,
                "lr": 3e-3,
                "max_sigma": sigma,
            },
        )
    if fate == "failed":
        yield ev_mod.trial_failed(
            **common, error_type="diverged", error_message="loss became NaN", spectral_norm=sn
        )
        return
    sigmas = {
        f"sigma/{layer}": (min(coeff, 0.97) if sn else sigma * (0.6 + 0.2 * i))
        for i, layer in enumerate(_SYNTH_LAYERS)
    }
    upper = math.prod(sigmas.values())
    test_acc = best - 0.01 + rng.gauss(0, 0.004)
    metrics = {
        "train_accuracy": min(1.0, best + (0.01 if sn else 0.05)),
        "val_accuracy": acc,
        "best_val_accuracy": best,
        "best_val_loss": best_loss,
        "test_accuracy": test_acc,
        "generalization_gap": 0.01 if sn else 0.05,
        "test_nll": 0.35 - (0.04 if sn else 0.0) + rng.gauss(0, 0.01),
        "test_ece": 0.03 - (0.01 if sn else 0.0) + abs(rng.gauss(0, 0.003)),
        "test_brier": 0.12 + rng.gauss(0, 0.005),
        "noise_acc_0.1": test_acc - (0.02 if sn else 0.04),
        "noise_acc_0.3": test_acc - (0.08 if sn else 0.15),
        "fgsm_acc_0.01": test_acc - (0.03 if sn else 0.06),
        "fgsm_acc_0.05": test_acc - (0.12 if sn else 0.25),
        "fgsm_acc_0.1": test_acc - (0.25 if sn else 0.45),
        "lipschitz_upper": upper,
        "lipschitz_lower": upper * 0.2,
        "max_sigma": max(sigmas.values()),
        **sigmas,
        "step_time_ms": 4.0 + (0.6 if sn else 0.0),
        "n_params": 9000.0,
        "epochs": float(last_epoch + 1),
    }
    yield ev_mod.trial_complete(
        **common,
        spectral_norm=sn,
        spectral_norm_coeff=coeff if sn else None,
        status="pruned" if fate == "pruned" else "completed",
        metrics=metrics if fate != "pruned" else {"val_accuracy": acc},
        parameters=params,
        duration_ms=100 * (last_epoch + 1),
    )


def _synthetic_trials(
    study: str, n_pairs: int, epochs: int, coeff: float, seed: int, pruned: int, failed: int
) -> Iterator[Iterator[Event]]:
    rng = random.Random(seed)
    fates = ["completed"] * (2 * n_pairs)
    for i in range(min(pruned, len(fates))):
        fates[-1 - 2 * i] = "pruned"
    for i in range(min(failed, len(fates))):
        fates[-2 - 2 * i] = "failed"
    for pair in range(n_pairs):
        arms = [False, True] if rng.random() < 0.5 or pair == 0 else [True, False]
        for j, sn in enumerate(arms):
            number = 2 * pair + j
            yield _trial_events(study, number, pair, sn, coeff, epochs, rng, fates[number])


def synthetic_study(
    study: str = "demo",
    *,
    n_pairs: int = 4,
    epochs: int = 10,
    coeff: float = 1.0,
    seed: int = 0,
    pruned: int = 0,
    failed: int = 0,
) -> list[Event]:
    """Events of a made-up paired SN-vs-none study (for demos, tests and benchmarks).

    Follows the study layer's contract: ``trial_{n:04d}`` ids, per-epoch ``ml.run.metric``
    with ``train_loss, val_loss, val_accuracy, lr, max_sigma``, ``ml.trial.complete`` with
    the full metric set (incl. ``sigma/<layer>``), twins sharing ``parameters["pair_id"]``.

    Example:
        >>> evs = synthetic_study("s", n_pairs=1, epochs=2)
        >>> [e.name for e in evs][:3]
        ['ml.trial.start', 'ml.run.metric', 'ml.run.metric']
    """
    return [
        e
        for trial in _synthetic_trials(study, n_pairs, epochs, coeff, seed, pruned, failed)
        for e in trial
    ]


def simulate_study(
    bus: EventBus,
    study: str = "demo",
    *,
    delay: float = 0.05,
    stop_event: threading.Event | None = None,
    **kwargs: Any,
) -> dict[str, int]:
    """Publish a :func:`synthetic_study` on ``bus``, sleeping ``delay`` s per event.

    Honours ``stop_event`` like a real study: the running trial ends ``cancelled`` and no
    new trial starts. Returns counts of trials by final status.
    """
    counts = {"completed": 0, "pruned": 0, "failed": 0, "cancelled": 0}
    trials = _synthetic_trials(
        study,
        kwargs.pop("n_pairs", 4),
        kwargs.pop("epochs", 10),
        kwargs.pop("coeff", 1.0),
        kwargs.pop("seed", 0),
        kwargs.pop("pruned", 0),
        kwargs.pop("failed", 0),
    )
    if kwargs:
        raise TypeError(f"unexpected arguments: {', '.join(kwargs)}")
    for trial in trials:
        if stop_event is not None and stop_event.is_set():
            break
        sn = None
        for event in trial:
            if stop_event is not None and stop_event.is_set() and event.name == "ml.run.metric":
                p = cast(ev_mod.RunMetric, event.payload)
                cancel = ev_mod.trial_complete(
                    model_run_id=p.model_run_id,
                    trial_id=p.trial_id,
                    study=p.study,
                    spectral_norm=bool(sn),
                    status="cancelled",
                )
                bus.publish(cancel)
                counts["cancelled"] += 1
                return counts
            if event.name == "ml.trial.start":
                sn = event.payload.spectral_norm  # type: ignore[union-attr]
            bus.publish(event)
            if event.name == "ml.trial.complete":
                counts[event.payload.status] += 1  # type: ignore[union-attr]
            elif event.name == "ml.trial.failed":
                counts["failed"] += 1
            if delay:
                time.sleep(delay)
    return counts

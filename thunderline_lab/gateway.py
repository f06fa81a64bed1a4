"""ThunderGate: the HTTP event gateway for remote workers, and the client that reports to it.

The gateway is the one ingest point of a lab for workers on other processes or machines
(seed 000's Phase 2B). It accepts the same inputs as ``thunderline-lab ingest``: canonical
events (one, or an array, or JSON lines) and the seeds' Cerebros payloads, validates them
with :mod:`thunderline_lab.events` / :mod:`thunderline_lab.wire`, appends them to the lab's
:class:`~thunderline_lab.store.TrialStore`, and answers ``202`` **only after the events are
committed**::

    POST /api/events/ml[?model_run_id=NAME]   202 {"accepted", "duplicates", "ids", "last_seq"}
                                              400 unparseable body (a record nested too
                                              deeply is a 422 naming it), 401 token, 413 too large,
                                              403 another site's browser page, 415 compressed,
                                              422 {"detail", "errors": [{index, path, message,
                                              rule, value}]}, 409 an id already names another
                                              event, or an event contradicts its trial (a
                                              changed outcome, another arm; same body), 503
                                              busy / store unavailable
    GET  /api/events?after=SEQ&limit=N        {"events": [{"seq", ...event}], "next_after"}
    GET  /api/trials[?study=&model_run_id=&status=&spectral_norm=]   {"trials": [...]}
    GET  /api/trials/{model_run_id}/{trial_id}                       one trial, or 404
    GET  /api/trials/{model_run_id}/{trial_id}/metrics[?names=a,b&max_points=N]
                                               its metric curves, downsampled (or 404)
    GET  /healthz                              liveness + last sequence number (no token)
    GET  /docs, /openapi.json                  OpenAPI (the request body schema included)

A query parameter an endpoint does not take (``?model_run=NAME``), or one given twice, is
a 422 naming it (``query.model_run``, with the closest parameter the endpoint takes).

``ids`` lists every event id of the request (new and duplicate alike): all of them are in
the store when the answer arrives. Event ids are idempotency keys, so a client may resend a
batch whose answer it never got.

**Group commit.** Request handlers parse, validate and serialise (``TrialStore.prepare``,
in a worker thread for large bodies); they hand the prepared batch plus a future to one
writer thread, which appends whatever requests are waiting in a single
``TrialStore.append_prepared`` transaction and then resolves their futures. The writer
runs only transactions, and the store writes many rows per SQLite statement, so the GIL is
let go for whole statements and the next requests are parsed on the other core meanwhile.
Under concurrency many requests share one commit (and one fsync: the gateway's connection
runs SQLite with ``synchronous=FULL``, so a 202 survives power loss, not only ``kill -9``)
instead of paying one each. The ingest route is answered by a small ASGI layer in front
of FastAPI (the FastAPI route documents it), which halves the CPU per request.

**Security.** Binds ``127.0.0.1`` by default; :func:`serve` refuses any other address
without a token. With a token, ``/api/*`` requires ``Authorization: Bearer TOKEN`` (or
``X-Thunderline-Token: TOKEN``). A browser request from another site (``Sec-Fetch-Site:
cross-site``: any web page the user has open) cannot post events, token or not; without a
token neither can a request whose ``Origin`` is another site's or ``null`` (browsers that
send no ``Sec-Fetch-Site``). SQL is
parameterised (the store's), bodies are limited (8 MiB) as are events per request (50,000)
and events waiting for the writer, and error answers never carry stack traces.

**Behind a reverse proxy.** Every route and ``/docs`` work under a path prefix: uvicorn's
``--root-path`` (:func:`serve`'s ``root_path``), ``FastAPI(root_path=...)``, or the app
mounted in another ASGI app (whose lifespan should then enter the gateway's,
``app.router.lifespan_context(app)``, so that the writer and the lab are closed at shutdown).

:class:`EventClient` posts events in batches with retry and exponential backoff; when the
gateway stays unreachable it appends them to a local JSON-lines spool file, replayed on the
next successful contact (or by :meth:`EventClient.replay_spool`). It is also a bus
subscriber (:meth:`EventClient.attach`), so a training process reports through the gateway
exactly as it would to a local :class:`~thunderline_lab.store.StoreWriter`.

Example:
    >>> from thunderline_lab.gateway import create_app, EventClient
    >>> from thunderline_lab.store import TrialStore
    >>> app = create_app(TrialStore(":memory:"))          # serve with uvicorn
    >>> # in a worker:  client = EventClient("http://127.0.0.1:8765", spool="spool.jsonl")
    >>> #               client.attach(bus); ...; client.close()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import os
import random
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx
import pydantic_core
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from thunderline_lab.errors import GatewayError, StoreError, did_you_mean
from thunderline_lab.events import (
    _MISSING,
    ErrorDetail,
    Event,
    EventConflictError,
    EventValidationError,
    MLEvent,
    event_json_schema,
    fast_events,
    is_fast,
    to_event,
)
from thunderline_lab.lab import ENV_TOKEN, Lab
from thunderline_lab.store import PreparedBatch, TrialStore, trial_records
from thunderline_lab.wire import (
    DEFAULT_MODEL_RUN_ID,
    at_lines,
    read_json_records,
    seed_field_path,
    to_events,
    translate_record,
)

if TYPE_CHECKING:
    from thunderline_lab.bus import EventBus, Subscription

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "ENV_TOKEN",
    "EVENTS_PAGE_BYTES",
    "MAX_BATCH_EVENTS",
    "MAX_BODY_BYTES",
    "ErrorBody",
    "ErrorItem",
    "EventClient",
    "EventsPage",
    "GatewayBusy",
    "GroupCommitWriter",
    "Health",
    "IngestResponse",
    "IngestResult",
    "LoopbackHostOnly",
    "MetricCurve",
    "MetricHistory",
    "SendError",
    "SendResult",
    "TrialsPage",
    "create_app",
    "is_loopback",
    "parse_body",
    "serve",
    "storage_errors",
]

log = logging.getLogger(__name__)

# GET /api/events ends a page once its events' JSON reaches this size (and holds at least
# one): ``limit`` large events would otherwise all be read into memory for one answer. A
# client pages on with ``next_after`` as always.
EVENTS_PAGE_BYTES = 8 * 1024 * 1024

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_BATCH_EVENTS = 50_000
MAX_PENDING_EVENTS = 400_000
INGEST_PATH = "/api/events/ml"
_INGEST_QUERY = ("model_run_id",)  # the query parameters of POST INGEST_PATH
_INT64_MAX = 2**63 - 1
_MAX_METRIC_POINTS = 10_000  # per curve of GET .../metrics: a bounded answer for any curve
_MAX_METRIC_NAMES = 100
_INT_FIELDS = ("step", "duration_ms", "rank", "epochs")
_BODY_ERRORS = {"json_invalid", "encoding", "empty", "json_depth"}
_THREADPOOL_BODY = 256 * 1024  # parse bigger bodies off the event loop
# GET /api/trials?status=: what a trial row can say (events.TERMINAL_STATUSES and running);
# any other value is a 422 naming the allowed ones, not an empty list
TrialStatus = Literal["running", "completed", "pruned", "cancelled", "failed"]
GIL_SWITCH_INTERVAL = 0.0005  # seconds: serve()'s sys.setswitchinterval (Python's is 0.005)


# ---------------------------------------------------------------------------------------------
# Parsing a request body into validated events
# ---------------------------------------------------------------------------------------------


_ONE_EVENT: TypeAdapter[Any] = TypeAdapter(MLEvent)
_EVENT_LIST: TypeAdapter[list[Any]] = TypeAdapter(list[MLEvent])


def _looks_canonical(body: bytes) -> bool:
    head = body[:4096]
    return b'"name"' in head and b'"event"' not in head and b'"trials"' not in head


def parse_body(
    body: bytes,
    *,
    default_model_run_id: str = DEFAULT_MODEL_RUN_ID,
    max_events: int = MAX_BATCH_EVENTS,
) -> list[Event]:
    """Parse and validate a request body: canonical events, JSON lines or seed payloads.

    Events are also checked against what the store can hold (64-bit integers, timestamps
    that convert to UTC), so a request is refused with a field path rather than failing
    at commit.

    Example:
        >>> body = b'{"event": "ml.run.metric", "trial_id": "t1", "metadata": {"epoch": 0},'
        >>> body += b' "measurements": {"val_accuracy": 0.5}}'
        >>> [ev.name for ev in parse_body(body, default_model_run_id="run-1")]
        ['ml.run.metric']

    Raises:
        EventValidationError: with rule ``json_invalid``/``encoding``/``empty``/``json_depth``
            for an unparseable body (HTTP 400), ``batch_too_large`` above ``max_events``
            (HTTP 413), else one detail per broken field (HTTP 422).
    """
    events: list[Event] | None = None
    if _looks_canonical(body) and not _SURROGATE_ESCAPE.search(body):
        # canonical ml.* events validate straight from the bytes in one pass; anything
        # else (seed payloads, JSON lines, errors to name) takes the wire path below
        with contextlib.suppress(ValidationError, RecursionError):
            if body.lstrip()[:1] == b"{":
                events = [_ONE_EVENT.validate_json(body)]
            else:
                events = _EVENT_LIST.validate_json(body)
    records: list[Any] | None = None
    lines: list[int] | None = None  # JSON lines: each record's line in the body
    if events is None:
        try:
            parsed = read_json_records(body, "<body>")
        except RecursionError:
            raise EventValidationError(
                [ErrorDetail(None, "<body>", _MISSING, "json_depth", "JSON nested too deeply")]
            ) from None
        if parsed.errors:
            raise EventValidationError(_with_line_faults(parsed, default_model_run_id), "<body>")
        records, lines = parsed.records, parsed.lines
        _check_count(len(records), max_events)
        if _SURROGATE_ESCAPE.search(body):
            bad_text = _surrogate_errors(records)
            if bad_text:
                raise EventValidationError(bad_text)
        try:
            events = to_events(records, default_model_run_id=default_model_run_id)
        except RecursionError:
            raise EventValidationError(
                [ErrorDetail(None, "<body>", _MISSING, "json_depth", "JSON nested too deeply")]
            ) from None
        except EventValidationError as exc:
            raise EventValidationError(at_lines(exc.errors, lines)) from None
    _check_count(len(events), max_events)
    errors = storage_errors(events)
    if errors:
        raise EventValidationError(
            at_lines(_wire_paths(errors, records, default_model_run_id), lines)
        )
    return events


def _with_line_faults(parsed: Any, default_model_run_id: str) -> list[ErrorDetail]:
    """A JSON-lines body's unreadable lines, and the faults of the lines that were read
    (one answer names every broken line, as ``thunderline-lab validate`` does), in line
    order; a JSON document's syntax error alone."""
    errors = list(parsed.errors)
    if parsed.lines is None or not parsed.records:
        return errors
    try:
        to_events(parsed.records, default_model_run_id=default_model_run_id)
    except EventValidationError as exc:
        errors += at_lines(exc.errors, parsed.lines)
    except RecursionError:  # a line nested too deeply: its own error is enough
        pass

    def line_of(e: ErrorDetail) -> int:
        return e.source_line or 0

    return sorted(errors, key=line_of)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _parse_for_store(body: bytes, *, default_model_run_id: str, max_events: int) -> list[Any]:
    """What the gateway appends: canonical ``ml.*`` bodies as msgspec structs straight from
    the bytes (:func:`events.fast_events`; the store appends them as they are, and the
    checks of :func:`storage_errors` are part of that schema), anything else as
    :func:`parse_body` gives it."""
    if _looks_canonical(body) and not _SURROGATE_ESCAPE.search(body):
        text = body.strip()
        fast = fast_events(b"[" + text + b"]" if text[:1] == b"{" else text)
        if fast is not None:
            _check_count(len(fast), max_events)
            return fast
    return parse_body(body, default_model_run_id=default_model_run_id, max_events=max_events)


def _surrogate_errors(records: list[Any]) -> list[ErrorDetail]:
    """Strings holding lone surrogates (``"\\ud800"`` in JSON): not text, cannot be stored."""
    errors: list[ErrorDetail] = []

    def bad(text: str) -> bool:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False

    def walk(value: Any, path: str, index: int) -> None:
        if isinstance(value, str):
            if bad(value):
                errors.append(
                    ErrorDetail(
                        index,
                        path or "<event>",
                        _MISSING,
                        "string_unicode",
                        "not valid Unicode text (a lone surrogate)",
                    )
                )
        elif isinstance(value, Mapping):
            for key, sub in value.items():
                sub_path = f"{path}.{key}" if path else str(key)
                if isinstance(key, str) and bad(key):
                    errors.append(
                        ErrorDetail(
                            index,
                            path or "<event>",
                            _MISSING,
                            "string_unicode",
                            "a key is not valid Unicode text (a lone surrogate)",
                        )
                    )
                    continue
                walk(sub, sub_path, index)
        elif isinstance(value, list):
            for j, sub in enumerate(value):
                walk(sub, f"{path}[{j}]", index)

    for i, rec in enumerate(records):
        walk(rec, "", i)
    return errors


def _at_records(exc: EventValidationError, body: bytes, default_run: str) -> EventValidationError:
    """``exc`` (refused at commit, its errors indexed by translated event) with each error
    pointed back at its posted record, field and, for JSON lines, line, as the errors of
    parsing are (:func:`_wire_paths`: a seed 002 record is several events). The body is read
    again only on this error path."""
    try:
        parsed = read_json_records(body, "<body>")
    except EventValidationError:
        return exc
    if parsed.errors:
        return exc
    errors = _wire_paths(list(exc.errors), parsed.records, default_run)
    return type(exc)(at_lines(errors, parsed.lines))


def _check_count(n: int, max_events: int) -> None:
    if n > max_events:
        raise EventValidationError(
            [
                ErrorDetail(
                    None,
                    "<body>",
                    n,
                    "batch_too_large",
                    f"{n} events in one request; the limit is {max_events}: split the batch",
                )
            ]
        )


def storage_errors(events: Sequence[Event]) -> list[ErrorDetail]:
    """What valid events the store still could not hold: integers beyond 64 bits and
    timestamps that overflow when converted to UTC (cheap: run on every request).

    Values that cannot be serialised (lone surrogates, extreme nesting) are rare and costly
    to look for, so only a failed commit looks for them (:func:`_diagnose`).
    """
    errors: list[ErrorDetail] = []
    for i, ev in enumerate(events):
        try:
            ev.timestamp.astimezone(UTC)
        except (OverflowError, ValueError):
            errors.append(
                ErrorDetail(
                    i,
                    "timestamp",
                    ev.timestamp.isoformat(),
                    "datetime_range",
                    "out of range once converted to UTC",
                )
            )
        payload = ev.payload
        if isinstance(payload, Mapping):
            continue
        for name in _INT_FIELDS:
            value = getattr(payload, name, None)
            if isinstance(value, int) and value > _INT64_MAX:
                errors.append(
                    ErrorDetail(
                        i,
                        f"payload.{name}",
                        value,
                        "int_range",
                        f"must be at most {_INT64_MAX} (a 64-bit integer)",
                    )
                )
    return errors


def _diagnose(events: Sequence[Event]) -> list[ErrorDetail]:
    """Find the fields that made an append fail (slow path: only after a failed commit)."""
    events = [to_event(ev) if is_fast(ev) else ev for ev in events]
    errors = storage_errors(events)
    for i, ev in enumerate(events):
        try:
            ev.model_dump_json()
            continue
        except (pydantic_core.PydanticSerializationError, ValueError, RecursionError):
            pass
        payload = ev.payload
        fields = payload.items() if isinstance(payload, Mapping) else payload
        for key, value in fields:
            try:
                pydantic_core.to_json(value)
            except (pydantic_core.PydanticSerializationError, ValueError, RecursionError) as exc:
                message = str(exc).split(":", 1)[-1].strip() or "cannot be stored"
                if "depth" in message:
                    message = "nested too deeply to store"
                elif "surrogate" in message or "encode" in message:
                    message = "holds text that is not valid Unicode (a lone surrogate)"
                errors.append(ErrorDetail(i, f"payload.{key}", _MISSING, "unstorable", message))
                break
        else:
            errors.append(
                ErrorDetail(i, "<event>", _MISSING, "unstorable", "the event cannot be stored")
            )
    return errors


def _wire_paths(
    errors: list[ErrorDetail], records: list[Any] | None, default_run: str
) -> list[ErrorDetail]:
    """Map errors about translated events back to the posted records and their fields."""
    if records is None:
        return errors
    origin: list[tuple[int, Any, int]] = []  # (record index, record, position in record)
    for i, rec in enumerate(records):
        try:
            n = len(translate_record(rec, i, default_model_run_id=default_run))
        except EventValidationError:
            n = 0
        origin.extend((i, rec, j) for j in range(n))
    out = []
    for e in errors:
        if e.index is None or e.index >= len(origin):
            out.append(e)
            continue
        i, rec, j = origin[e.index]
        out.append(ErrorDetail(i, seed_field_path(rec, j, e.path), e.value, e.rule, e.message))
    return out


# ---------------------------------------------------------------------------------------------
# Group commit
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IngestResult:
    """The gateway's answer to one request: new events, duplicates, every id, last seq."""

    accepted: int
    duplicates: int
    ids: list[str] = field(repr=False)
    last_seq: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "ids": self.ids,
            "last_seq": self.last_seq,
        }


class GatewayBusy(GatewayError):
    """Too many events are waiting for the writer; the client should retry later."""


@dataclass(eq=False)
class _Pending:
    prepared: PreparedBatch  # the request's events (``prepared.items``), ready to append
    future: concurrent.futures.Future[IngestResult]

    @property
    def events(self) -> list[Any]:
        return self.prepared.items


class GroupCommitWriter:
    """One thread that commits many requests' events per store transaction.

    :meth:`submit` queues a request's validated events and returns a future resolved
    with its :class:`IngestResult` once they are committed (or with the error). The
    thread drains whatever is queued, up to ``max_group_events``, into one
    :meth:`TrialStore.append_prepared` (their batches joined; requests that share an event
    id are prepared again as one batch); if that fails for a reason other than the store itself
    (an event it cannot hold), the requests are committed one by one so only the bad one
    fails.

    Example:
        >>> from thunderline_lab import events
        >>> writer = GroupCommitWriter(TrialStore(":memory:"))
        >>> ev = events.trial_start(model_run_id="r", trial_id="t", spectral_norm=True)
        >>> writer.submit([ev]).result().accepted
        1
        >>> writer.close()
    """

    def __init__(
        self,
        store: TrialStore,
        *,
        max_group_events: int = MAX_BATCH_EVENTS,
        max_pending_events: int = MAX_PENDING_EVENTS,
        group_commit: bool = True,
    ) -> None:
        self.store = store
        self.group_commit = group_commit
        self.max_group_events = max_group_events
        self.max_pending_events = max_pending_events
        self._queue: deque[_Pending] = deque()
        self._pending_events = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.groups = 0
        self.requests = 0
        self.committed = 0

    @property
    def pending_events(self) -> int:
        """Events queued or being committed (not committed yet)."""
        return self._pending_events

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="thundergate-writer", daemon=True
            )
            self._thread.start()

    def submit(
        self, events: list[Event], prepared: PreparedBatch | None = None
    ) -> concurrent.futures.Future[IngestResult]:
        """Queue validated events for the next group commit.

        ``prepared`` is ``store.prepare(events)`` when the caller made it already (the
        gateway does, in the thread that parsed the request); otherwise it is made here,
        in the caller's thread: the writer thread only runs transactions.

        Raises:
            EventValidationError: an event cannot be written (from ``store.prepare``).
            GatewayBusy: more than ``max_pending_events`` would be waiting.
            GatewayError: the writer is closed.
        """
        if prepared is None:
            prepared = self.store.prepare(events)
        fut: concurrent.futures.Future[IngestResult] = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise GatewayError("the gateway is shutting down")
            if (
                self._pending_events
                and self._pending_events + len(events) > self.max_pending_events
            ):
                raise GatewayBusy(
                    f"{self._pending_events} events are waiting to be committed; retry later"
                )
            self._ensure_thread()
            self._queue.append(_Pending(prepared, fut))
            self._pending_events += len(events)
            self._cond.notify()
        return fut

    def _take_group(self) -> list[_Pending] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            group: list[_Pending] = []
            n = 0
            while self._queue and (
                not group
                or (self.group_commit and n + len(self._queue[0].events) <= self.max_group_events)
            ):
                item = self._queue.popleft()
                group.append(item)
                n += len(item.events)
            return group

    def _run(self) -> None:
        while True:
            group = self._take_group()
            if group is None:
                return
            live = [p for p in group if p.future.set_running_or_notify_cancel()]
            try:
                self._commit(group, live)
            except BaseException as exc:  # never let the writer thread die silently
                log.exception("gateway writer failed")
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(GatewayError(f"commit failed: {exc!r}"))
            finally:
                with self._cond:
                    self._pending_events -= sum(len(p.events) for p in group)

    def _commit(self, group: list[_Pending], live: list[_Pending]) -> None:
        """Append the group in one transaction and resolve its live futures."""
        try:
            joined = PreparedBatch.join([p.prepared for p in group])
            if joined is None:  # an id in two requests: one batch skips or checks the repeat
                joined = self.store.prepare([ev for p in group for ev in p.events])
            result = self.store.append_prepared(joined)
        except StoreError as exc:
            for p in live:
                p.future.set_exception(exc)
            return
        except Exception as exc:
            if len(group) > 1:
                for p in group:
                    self._commit([p], [p] if p in live else [])
                return
            if isinstance(exc, EventConflictError):  # an id that names another event
                err: Exception = exc
            else:
                errors = _diagnose(group[0].events)
                err = EventValidationError(errors) if errors else GatewayError(repr(exc))
            for p in live:
                p.future.set_exception(err)
            return
        self.groups += 1
        self.requests += len(group)
        self.committed += result.accepted
        fresh = set(result.ids)
        for p in group:
            ids = [ev.id for ev in p.events]
            accepted = 0
            for ev_id in ids:
                if ev_id in fresh:
                    fresh.discard(ev_id)
                    accepted += 1
            if p in live:
                p.future.set_result(
                    IngestResult(accepted, len(ids) - accepted, ids, result.last_seq)
                )

    def close(self, timeout: float | None = 30.0) -> None:
        """Commit what is queued, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


class ErrorItem(BaseModel):
    """One broken rule: record index (None for the whole body), field path, message."""

    index: int | None
    path: str
    message: str
    rule: str
    value: str | None = None
    line: int | None = None  # a JSON-lines body's record: its 1-based line


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: a summary and (for input errors) one item per broken field."""

    detail: str
    errors: list[ErrorItem] = []


class IngestResponse(BaseModel):
    """202: the events are committed; ``ids`` are every event id of the request."""

    accepted: int
    duplicates: int
    ids: list[str]
    last_seq: int


class EventsPage(BaseModel):
    """Logged events after a sequence number; pass ``next_after`` as the next ``after``.

    A page holds at most ``limit`` events and ends once their JSON reaches 8 MiB
    (:data:`EVENTS_PAGE_BYTES`), so a short page does not mean the log has no more."""

    events: list[dict[str, Any]]
    next_after: int


class TrialsPage(BaseModel):
    """Trial rows (as ``thunderline-lab trials --format json``)."""

    trials: list[dict[str, Any]]


class MetricCurve(BaseModel):
    """One metric's points, in step order."""

    steps: list[int]
    values: list[float]


class MetricHistory(BaseModel):
    """A trial's metric curves by name (:meth:`TrialStore.metric_history`, downsampled)."""

    model_run_id: str
    trial_id: str
    metrics: dict[str, MetricCurve]


class Health(BaseModel):
    """Liveness, the newest sequence number, and the writer's counters."""

    status: str
    last_seq: int
    pending_events: int
    requests_committed: int
    commits: int
    events_committed: int


class _Problem(Exception):
    def __init__(
        self,
        status: int,
        detail: str,
        errors: Sequence[ErrorDetail] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = list(errors)
        self.headers = dict(headers or {})


def _error_item(e: ErrorDetail) -> dict[str, Any]:
    item = e.as_dict()
    if not item["path"]:
        item["path"] = "<body>" if e.index is None else "<event>"
    return item


def _problem_response(
    status: int,
    detail: str,
    errors: Sequence[ErrorDetail] = (),
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        {"detail": detail, "errors": [_error_item(e) for e in errors]},
        status_code=status,
        headers=dict(headers or {}),
    )


def _validation_problem(exc: EventValidationError) -> _Problem:
    rules = {e.rule for e in exc.errors}
    if rules & {"batch_too_large"}:
        return _Problem(413, exc.errors[0].message, exc.errors)
    if any(e.rule in _BODY_ERRORS and e.index is None for e in exc.errors):
        # a record nested too deeply is named by its index (422): a client sets it aside
        # alone; only a body that cannot be read at all, or by record, is a 400
        return _Problem(400, "the body is not parseable JSON", exc.errors)
    n = len(exc.errors)
    if isinstance(exc, EventConflictError):
        if all(e.rule == "id_conflict" for e in exc.errors):
            detail = (
                "1 event id already names another event"
                if n == 1
                else f"{n} event ids already name other events"
            )
        else:  # a finished trial's changed outcome, a trial moved to the other arm
            detail = f"{n} event{'s contradict' if n != 1 else ' contradicts'} what is stored"
        return _Problem(409, detail, exc.errors)
    return _Problem(422, f"{n} invalid field{'s' if n != 1 else ''}", exc.errors)


def _schema_components() -> tuple[dict[str, Any], dict[str, Any]]:
    """The events' JSON Schema with ``$defs`` moved to OpenAPI components."""
    text = json.dumps(event_json_schema()).replace('"#/$defs/', '"#/components/schemas/')
    schema = json.loads(text)
    defs = schema.pop("$defs", {})
    schema.pop("$schema", None)
    seed001 = {
        "type": "object",
        "title": "Seed 001 post",
        "required": ["event", "trial_id"],
        "properties": {
            "event": {"type": "string"},
            "trial_id": {"type": "string"},
            "metadata": {"type": "object"},
            "measurements": {"type": "object"},
        },
    }
    seed002 = {
        "type": "object",
        "title": "Seed 002 trial report",
        "required": ["trials"],
        "properties": {"trials": {"type": "array", "items": {"type": "object"}}},
    }
    body = {
        "oneOf": [
            *schema["oneOf"],
            seed001,
            seed002,
            {"type": "array", "items": {"anyOf": [seed001, seed002]}},
        ],
        "description": schema.get("description", ""),
    }
    return body, defs


def _route_path(scope: Mapping[str, Any]) -> str:
    """The path the app routes on: ``path`` without the ``root_path`` it was mounted or
    served at (uvicorn ``--root-path``, a Starlette ``Mount``), as Starlette's router
    takes it."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :]
    return path


def _path_ids(scope: Mapping[str, Any], route_prefix: str) -> list[str]:
    """The decoded segments of the route path after ``route_prefix``, split only where the
    client sent a "/" (a percent-encoded "%2F" stays inside its segment).

    The router sees the decoded path, so ``r%2F1/t`` arrives as ``r/1/t``; the raw path
    keeps the difference. Whatever prefix the app is served under, the route path is the
    end of the path, so it is found as the shortest tail of the raw segments that
    decodes to it. Without a raw path (or one that does not match) the decoded
    segments are all there is.
    """
    tail = _route_path(scope).removeprefix(route_prefix)
    raw = scope.get("raw_path")
    if raw:
        decoded = [
            urllib.parse.unquote(seg) for seg in raw.decode("latin-1").split("?", 1)[0].split("/")
        ]
        size = -1  # the length of the last k decoded segments joined with "/"
        for k in range(1, len(decoded) + 1):
            size += len(decoded[-k]) + 1
            if size >= len(tail):
                if size == len(tail) and "/".join(decoded[-k:]) == tail:
                    return decoded[-k:]
                break
    return tail.split("/")


class _ClientGone(Exception):
    """The client disconnected before sending its whole body."""


def _repeated_query_names(query: bytes) -> dict[str, list[str]]:
    """The parameters a query string gives more than once (name -> its values).

    A parameter given twice (``?after=5&after=900``) is refused rather than read as its
    last value, which a client that meant the first would never notice.
    """
    pairs = urllib.parse.parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    seen: dict[str, list[str]] = {}
    for name, value in pairs:
        seen.setdefault(name, []).append(value)
    return {name: values for name, values in seen.items() if len(values) > 1}


def _unknown_query_names(query: bytes, known: Iterable[str]) -> list[ErrorDetail]:
    """The parameters of a query string that an endpoint does not take, each named with the
    closest one it does: a misspelt ``?model_run=x`` was ignored, and the events were filed
    under the default run (``?stauts=failed`` listed every trial)."""
    known = sorted(known)
    expected = f"; expected {', '.join(known)}" if known else ": this endpoint takes none"
    errors: list[ErrorDetail] = []
    for name, value in urllib.parse.parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if name not in known and all(e.path != f"query.{name}" for e in errors):
            hint = did_you_mean(name, known)
            message = f"unknown parameter{hint}{expected}"
            errors.append(ErrorDetail(None, f"query.{name}", value, "extra_forbidden", message))
    return errors


def _query_names(dependant: Any) -> set[str]:
    """The query parameters a FastAPI endpoint declares (its own and its dependencies')."""
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def _check_query(scope: Mapping[str, Any], known: Iterable[str]) -> None:
    """Refuse (422) the query parameters the endpoint does not take, by name."""
    query = scope.get("query_string", b"")
    if query:
        unknown = _unknown_query_names(query, known)
        if unknown:
            raise _Problem(422, f"{len(unknown)} invalid request parameter(s)", unknown)


class _IngestFastPath:
    """ASGI middleware answering ``POST /api/events/ml`` directly (see :func:`create_app`)."""

    def __init__(self, app: Any, ingest: Any) -> None:
        self.app = app
        self.ingest = ingest

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and b"&" in scope.get("query_string", b""):
            repeated = _repeated_query_names(scope["query_string"])
            if repeated:
                await _problem_response(
                    422,
                    f"{len(repeated)} invalid request parameter(s)",
                    [
                        ErrorDetail(
                            None,
                            f"query.{name}",
                            values,
                            "repeated",
                            f"given {len(values)} times: give it once"
                            + (" (several metrics: names=a,b)" if name == "names" else ""),
                        )
                        for name, values in repeated.items()
                    ],
                )(scope, receive, send)
                return
        if not (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and _route_path(scope) == INGEST_PATH
        ):
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = []
        try:
            result = await self.ingest(scope, receive)
        except _ClientGone:
            return
        except _Problem as exc:
            status = exc.status
            body = json.dumps(
                {"detail": exc.detail, "errors": [_error_item(e) for e in exc.errors]}
            ).encode()
            headers = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
        else:
            status, body = 202, json.dumps(result.as_dict()).encode()
        headers += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _resolve_stores(
    lab_or_store: Lab | TrialStore | str | os.PathLike[str],
) -> tuple[TrialStore, TrialStore, list[TrialStore]]:
    """(write store, read store, stores the app owns and must close)."""
    if isinstance(lab_or_store, TrialStore):
        return lab_or_store, lab_or_store, []
    lab = lab_or_store if isinstance(lab_or_store, Lab) else Lab.resolve(lab_or_store)
    writer = lab.store()
    reader = TrialStore(lab.db_path)
    return writer, reader, [writer, reader]


def create_app(
    lab_or_store: Lab | TrialStore | str | os.PathLike[str],
    token: str | None = None,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_batch_events: int = MAX_BATCH_EVENTS,
    max_pending_events: int = MAX_PENDING_EVENTS,
    default_model_run_id: str = DEFAULT_MODEL_RUN_ID,
    synchronous: str | None = None,
    group_commit: bool = True,
) -> FastAPI:
    """The gateway's FastAPI app over a lab (directory or :class:`Lab`) or an open store.

    A lab gets two connections (the writer thread's and one for reads, which WAL lets run
    alongside writes); an open store is shared and left open at shutdown.

    Example:
        >>> from fastapi.testclient import TestClient
        >>> app = create_app(TrialStore(":memory:"))
        >>> with TestClient(app) as http:
        ...     http.post("/api/events/ml", json={"event": "ml.trial.start", "trial_id": "t",
        ...               "metadata": {"spectral_norm": True}}).status_code
        202

    Args:
        token: when set, every ``/api/*`` request must carry it.
        max_body_bytes: larger bodies get 413.
        max_batch_events: more events in one request get 413.
        max_pending_events: more events waiting for the writer get 503 + Retry-After.
        default_model_run_id: attribution of seed 001 posts that name no run (a request
            may override it with ``?model_run_id=``).
        synchronous: SQLite ``synchronous`` level of the writer's connection. ``"FULL"``
            (the default for a lab) fsyncs every commit, so a 202 survives power loss, not
            just a crash of the gateway; ``"NORMAL"`` (WAL) survives ``kill -9`` but may lose
            the last commits on power loss. An open store is left as it is unless given.
        group_commit: commit many requests per transaction (on by default; off only to
            measure what it buys).

    Raises:
        GatewayError: an unknown ``synchronous`` level.
    """
    write_store, read_store, owned = _resolve_stores(lab_or_store)
    level = synchronous if synchronous is not None else ("FULL" if owned else None)
    if level is not None:
        if level.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise GatewayError(f"unknown synchronous level {level!r} (FULL or NORMAL)")
        write_store.conn.execute(f"PRAGMA synchronous = {level.upper()}")
    writer = GroupCommitWriter(
        write_store,
        max_group_events=max(max_batch_events, 1),
        max_pending_events=max_pending_events,
        group_commit=group_commit,
    )
    token_bytes = token.encode() if token else None

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await run_in_threadpool(writer.close)
            for store in owned:
                store.close()

    app = FastAPI(
        title="ThunderGate — thunderline-lab event gateway",
        version="1",
        description=(__doc__ or "").split("\n\n")[1],
        lifespan=lifespan,
        docs_url=None,  # served below from the installed Swagger UI, not a CDN
        redoc_url=None,
    )
    _serve_docs(app)
    app.state.writer = writer
    app.state.store = write_store

    def token_problem() -> _Problem:
        return _Problem(
            401,
            "missing or wrong token (Authorization: Bearer TOKEN)",
            [
                ErrorDetail(
                    None,
                    "header.authorization",
                    _MISSING,
                    "token",
                    "Authorization: Bearer TOKEN (or X-Thunderline-Token: TOKEN) with the "
                    "gateway's token",
                )
            ],
            headers={"WWW-Authenticate": "Bearer"},
        )

    def cross_site_problem() -> _Problem:
        # Without a token the gateway trusts whatever reaches loopback, and a browser
        # sends a cross-site "simple" POST (text/plain, no preflight) from any web page the
        # user has open. Browsers mark such requests; HTTP clients and the gateway's own
        # /docs page never send "cross-site".
        return _Problem(
            403,
            "a browser request from another site cannot post events",
            [
                ErrorDetail(
                    None,
                    "header.sec-fetch-site",
                    "cross-site",
                    "cross_site",
                    "events are posted by workers (HTTP clients), not by other web pages",
                )
            ],
        )

    def check_token(headers: Mapping[bytes, bytes]) -> None:
        """The token as sent (raw header bytes), on every route alike."""
        if token_bytes is None:
            return
        given = headers.get(b"x-thunderline-token")
        auth = headers.get(b"authorization", b"")
        if given is None and auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given, token_bytes):
            raise token_problem()

    async def require_token(request: Request) -> None:
        check_token(dict(request.scope["headers"]))

    async def known_query_only(request: Request) -> None:
        """Refuse a query parameter the route does not declare (after the token check)."""
        route = request.scope.get("route")
        if request.scope.get("query_string") and route is not None:
            _check_query(request.scope, _query_names(route.dependant))

    api_dependencies = [Depends(require_token), Depends(known_query_only)]

    @app.exception_handler(_Problem)
    async def _on_problem(_request: Request, exc: _Problem) -> JSONResponse:
        return _problem_response(exc.status, exc.detail, exc.errors, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _on_request_invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            ErrorDetail(
                None,
                ".".join(str(p) for p in err.get("loc", ())) or "<request>",
                err.get("input"),
                err.get("type", "invalid"),
                err.get("msg", "invalid"),
            )
            for err in exc.errors()
        ]
        return _problem_response(422, f"{len(errors)} invalid request parameter(s)", errors)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _problem_response(exc.status_code, str(exc.detail), (), exc.headers)

    @app.exception_handler(Exception)
    async def _on_crash(_request: Request, exc: Exception) -> JSONResponse:
        log.error("gateway request failed: %r", exc, exc_info=exc)
        return _problem_response(500, "internal error (see the gateway's log)")

    def body_too_large(declared: int | None) -> _Problem:
        size = f"body of {declared} bytes" if declared is not None else "body"
        return _Problem(
            413,
            f"{size} exceeds the limit of {max_body_bytes} bytes",
            [
                ErrorDetail(
                    None,
                    "<body>",
                    _MISSING if declared is None else declared,
                    "body_too_large",
                    f"at most {max_body_bytes} bytes per request",
                )
            ],
        )

    async def read_body(headers: Mapping[bytes, bytes], receive: Any) -> bytes:
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                raise _Problem(
                    400,
                    "bad Content-Length header",
                    [
                        ErrorDetail(
                            None,
                            "header.content-length",
                            declared.decode("latin-1"),
                            "header_invalid",
                            "must be the body's size in bytes (a non-negative integer)",
                        )
                    ],
                )
            if int(declared) > max_body_bytes:
                raise body_too_large(int(declared))
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_body_bytes:
                raise body_too_large(None)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def run_id_from(query: bytes) -> str:
        # latin-1 maps bytes (raw or %-escaped) to characters one to one: the value's bytes
        # are then read as UTF-8, as the body is (raw UTF-8 bytes are not taken as latin-1)
        values = urllib.parse.parse_qs(
            query.decode("latin-1"), keep_blank_values=True, encoding="latin-1"
        )
        given = values.get("model_run_id")
        if not given:
            return default_model_run_id
        try:
            run = given[-1].encode("latin-1").decode("utf-8")
        except UnicodeDecodeError:
            raise _Problem(
                422,
                "1 invalid request parameter",
                [
                    ErrorDetail(
                        None,
                        "query.model_run_id",
                        given[-1].encode("latin-1").decode("utf-8", errors="replace"),
                        "string_unicode",
                        "not UTF-8 text (percent-encode the UTF-8 bytes of the name)",
                    )
                ],
            ) from None
        if not 1 <= len(run) <= 256:
            rule = "string_too_short" if not run else "string_too_long"
            raise _Problem(
                422,
                "1 invalid request parameter",
                [ErrorDetail(None, "query.model_run_id", run, rule, "must be 1 to 256 characters")],
            )
        return run

    def parse_and_prepare(body: bytes, default_run: str) -> tuple[list[Any], PreparedBatch | None]:
        """A request's events, validated and serialised for the writer (None: no events);
        run where the request is parsed, so the writer thread only runs transactions."""
        events = _parse_for_store(
            body, default_model_run_id=default_run, max_events=max_batch_events
        )
        if not events:
            return events, None
        try:
            return events, write_store.prepare(events)
        except EventValidationError:  # an event that validates but cannot be written
            errors = _diagnose(events)  # names the field, where the encoder only knew "<event>"
            if errors:
                raise EventValidationError(errors) from None
            raise

    async def ingest(scope: Mapping[str, Any], receive: Any) -> IngestResult:
        """POST /api/events/ml: auth, bounded body, parse + validate, group commit."""
        headers = dict(scope["headers"])
        if headers.get(b"sec-fetch-site", b"").strip().lower() == b"cross-site" or (
            token_bytes is None and _foreign_origin(headers)
        ):
            raise cross_site_problem()
        check_token(headers)
        encoding = headers.get(b"content-encoding", b"").strip().lower()
        if encoding not in (b"", b"identity"):
            shown = encoding.decode("latin-1")
            raise _Problem(
                415,
                f"Content-Encoding {shown!r} is not supported: send the body uncompressed",
                [
                    ErrorDetail(
                        None,
                        "header.content-encoding",
                        shown,
                        "unsupported_encoding",
                        "only uncompressed bodies (identity) are read",
                    )
                ],
            )
        _check_query(scope, _INGEST_QUERY)
        default_run = run_id_from(scope.get("query_string", b""))
        body = await read_body(headers, receive)
        try:
            if len(body) > _THREADPOOL_BODY:
                events, prepared = await run_in_threadpool(parse_and_prepare, body, default_run)
            else:
                events, prepared = parse_and_prepare(body, default_run)
        except EventValidationError as exc:
            raise _validation_problem(exc) from None
        if prepared is None:  # nothing to write ([]): the log's position as it is
            return IngestResult(0, 0, [], await run_in_threadpool(read_store.last_seq))
        try:
            fut = writer.submit(events, prepared)
        except GatewayBusy as exc:
            raise _Problem(503, str(exc), headers={"Retry-After": "1"}) from None
        except GatewayError as exc:
            raise _Problem(503, str(exc), headers={"Retry-After": "2"}) from None
        try:
            return await asyncio.wrap_future(fut)
        except EventValidationError as exc:  # refused at commit (a conflict)
            raise _validation_problem(_at_records(exc, body, default_run)) from None
        except StoreError:
            log.exception("gateway could not commit %d events", len(events))
            raise _Problem(
                503, "the trial store is unavailable; retry later", headers={"Retry-After": "2"}
            ) from None
        except GatewayError:
            raise _Problem(
                503, "the events could not be committed; retry later", headers={"Retry-After": "2"}
            ) from None

    # The hot path skips FastAPI's routing and dependency machinery (measured: ~1 ms of
    # CPU per request); the FastAPI route below documents it and behaves identically.
    app.add_middleware(_IngestFastPath, ingest=ingest)

    body_schema, _defs = _schema_components()
    problem_responses: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorBody, "description": text}
        for code, text in (
            (400, "unparseable JSON"),
            (401, "token missing or wrong"),
            (403, "a browser request from another site (Sec-Fetch-Site: cross-site)"),
            (
                409,
                "an event id already names another event (its content differs), or an "
                "event contradicts its trial (id_conflict, trial_finished, trial_conflict): "
                "nothing of the request is written",
            ),
            (413, "body or batch too large"),
            (415, "a compressed body (Content-Encoding): send it uncompressed"),
            (422, "invalid events: every error's index, field path, message"),
            (503, "busy or the store is unavailable: retry later"),
        )
    }
    # a read has no body: the ingest-only answers are documented on the POST alone
    read_responses = {
        code: spec for code, spec in problem_responses.items() if code not in (400, 409, 413, 415)
    }
    # as check_token reads it: "Authorization: Bearer TOKEN" or "X-Thunderline-Token: TOKEN"
    security_schemes = {
        "bearerToken": {
            "type": "http",
            "scheme": "bearer",
            "description": "Authorization: Bearer TOKEN (the gateway's token)",
        },
        "tokenHeader": {
            "type": "apiKey",
            "in": "header",
            "name": "X-Thunderline-Token",
            "description": "the gateway's token, in a header of its own",
        },
    }
    secured: dict[str, Any] = (
        {"security": [{"bearerToken": []}, {"tokenHeader": []}]} if token_bytes else {}
    )

    @app.post(
        INGEST_PATH,
        status_code=202,
        response_model=IngestResponse,
        responses=problem_responses,
        summary="Ingest ML events (canonical, arrays, JSON lines, seed 001/002 payloads)",
        openapi_extra={
            **secured,
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": body_schema},
                    "application/x-ndjson": {"schema": {"type": "string"}},
                },
            },
        },
    )
    async def ingest_events(
        request: Request,
        model_run_id: str | None = Query(
            None,
            min_length=1,
            max_length=256,
            description="model_run_id for seed 001 posts that name none",
        ),
    ) -> Response:
        """Validate, commit (group commit) and answer 202 once the events are durable."""
        result = await ingest(request.scope, request.receive)
        return Response(
            json.dumps(result.as_dict()), status_code=202, media_type="application/json"
        )

    @app.get(
        "/api/events",
        response_model=EventsPage,
        responses=read_responses,
        dependencies=api_dependencies,
        openapi_extra=secured,
        summary="Logged events after a sequence",
    )
    def list_events(
        after: int = Query(0, ge=0, le=_INT64_MAX), limit: int = Query(1000, ge=1, le=10_000)
    ) -> Response:
        events = read_store.events_after(after, limit, max_bytes=EVENTS_PAGE_BYTES)
        next_after = events[-1]["seq"] if events else after
        return Response(
            json.dumps({"events": events, "next_after": next_after}), media_type="application/json"
        )

    @app.get(
        "/api/trials",
        response_model=TrialsPage,
        responses=read_responses,
        dependencies=api_dependencies,
        openapi_extra=secured,
        summary="Trials, optionally filtered",
    )
    def list_trials(
        study: str | None = Query(None, max_length=256),
        model_run_id: str | None = Query(None, max_length=256),
        status: TrialStatus | None = None,
        spectral_norm: bool | None = None,
    ) -> Response:
        df = read_store.trials(
            study=study, model_run_id=model_run_id, status=status, spectral_norm=spectral_norm
        )
        return Response(
            json.dumps({"trials": trial_records(df)}, default=str), media_type="application/json"
        )

    def one_trial(model_run_id: str, trial_id: str) -> Response:
        row = read_store.trial(model_run_id, trial_id)
        if row is None:
            raise _Problem(404, f"no trial {trial_id!r} in model run {model_run_id!r}")
        # store.trial gives JSON-ready values already (SQL NULL as None)
        return Response(json.dumps(row, default=str), media_type="application/json")

    def trial_metrics(
        model_run_id: str, trial_id: str, names: str | None, max_points: int
    ) -> Response:
        wanted = None if names is None else names.split(",")
        if wanted is not None and (not all(wanted) or len(wanted) > _MAX_METRIC_NAMES):
            rule = "too_many_names" if all(wanted) else "empty_name"
            raise _Problem(
                422,
                "1 invalid request parameter",
                [
                    ErrorDetail(
                        None,
                        "query.names",
                        names,
                        rule,
                        f"1 to {_MAX_METRIC_NAMES} comma-separated metric names, none empty",
                    )
                ],
            )
        df = read_store.metric_history(model_run_id, trial_id, wanted, max_points=max_points)
        # no points: a trial without (those) metrics yet, or no such trial (the only 404)
        if df.empty and read_store.trial(model_run_id, trial_id) is None:
            raise _Problem(404, f"no trial {trial_id!r} in model run {model_run_id!r}")
        curves: dict[str, dict[str, list[Any]]] = {}
        for name, step, value in zip(
            df["name"].tolist(), df["step"].tolist(), df["value"].tolist(), strict=True
        ):
            curve = curves.setdefault(name, {"steps": [], "values": []})
            curve["steps"].append(int(step))
            curve["values"].append(float(value))
        body = {"model_run_id": model_run_id, "trial_id": trial_id, "metrics": curves}
        return Response(json.dumps(body), media_type="application/json")

    def at_trial_path(
        request: Request, names: str | None = None, max_points: int = 1000
    ) -> Response:
        """``/api/trials/{model_run_id}/{trial_id}[/metrics]``, read from the raw path.

        Ids may hold "/": sent percent-encoded (%2F), they reach the router decoded, as
        more segments than they are (``r%2F1/a%2Fb`` as ``r/1/a/b``, and ``r/t%2Fmetrics``
        as the metrics of trial ``t``), so every trial route decides on the raw path
        (:func:`_path_ids`, which also holds behind a path prefix or in a mount).
        """
        scope = request.scope
        parts = _path_ids(scope, "/api/trials/")
        metrics = len(parts) == 3 and parts[2] == "metrics"
        if metrics:
            parts = parts[:2]
        if len(parts) != 2 or not all(parts):
            raise _Problem(
                404,
                f"no trial at {scope['path']}: expected /api/trials/{{model_run_id}}/"
                "{trial_id}[/metrics], with any '/' inside an id sent as %2F",
            )
        run, trial = parts
        if metrics:
            return trial_metrics(run, trial, names, max_points)
        # names= and max_points= are the metrics' (the route of encoded ids takes them)
        _check_query(scope, ())
        return one_trial(run, trial)

    names_query = Query(
        None,
        max_length=_MAX_METRIC_NAMES * 251,
        description="comma-separated metric names (default: every metric of the trial)",
    )
    max_points_query = Query(
        1000,
        ge=2,
        le=_MAX_METRIC_POINTS,
        description="at most this many points per curve, evenly spaced in steps, "
        "the first and last always kept",
    )

    @app.get(
        "/api/trials/{model_run_id}/{trial_id}",
        responses=read_responses,
        dependencies=api_dependencies,
        openapi_extra=secured,
        summary="One trial",
    )
    def get_trial(request: Request, model_run_id: str, trial_id: str) -> Response:
        return at_trial_path(request)

    @app.get(
        "/api/trials/{model_run_id}/{trial_id}/metrics",
        response_model=MetricHistory,
        responses=read_responses,
        dependencies=api_dependencies,
        openapi_extra=secured,
        summary="A trial's metric curves, downsampled (TrialStore.metric_history)",
    )
    def get_trial_metrics(
        request: Request,
        model_run_id: str,
        trial_id: str,
        names: str | None = names_query,
        max_points: int = max_points_query,
    ) -> Response:
        return at_trial_path(request, names, max_points)

    # ids holding an encoded "/" reach the router as more segments (see at_trial_path)
    @app.get(
        "/api/trials/{ids:path}",
        responses=read_responses,
        dependencies=api_dependencies,
        openapi_extra=secured,
        include_in_schema=False,
    )
    def get_trial_encoded(
        request: Request,
        ids: str,
        names: str | None = names_query,
        max_points: int = max_points_query,
    ) -> Response:
        return at_trial_path(request, names, max_points)

    @app.get("/healthz", response_model=Health, summary="Liveness")
    def healthz() -> Health:
        return Health(
            status="ok",
            last_seq=read_store.last_seq(),
            pending_events=writer.pending_events,
            requests_committed=writer.requests,
            commits=writer.groups,
            events_committed=writer.committed,
        )

    # HEAD: monitors probe liveness without a body (the GET's headers, the body dropped);
    # a route of its own, as one route for both would name two operations alike in OpenAPI
    @app.head("/healthz", include_in_schema=False)
    def healthz_head() -> Response:
        return Response(healthz().model_dump_json(), media_type="application/json")

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = default_openapi()
            spec.setdefault("components", {}).setdefault("schemas", {}).update(_defs)
            if token_bytes:
                spec["components"]["securitySchemes"] = security_schemes
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _serve_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI from the ``swagger-ui-bundle`` package (FastAPI's default page
    loads it from a CDN, and is blank on a machine without internet)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from starlette.responses import FileResponse
    from swagger_ui_bundle import swagger_ui_path

    # a route, not a StaticFiles mount: a mount finds no file when the server sets a
    # root_path without putting it in the path (FastAPI(root_path=...) does)
    assets = {p.name: p for p in Path(swagger_ui_path).iterdir() if p.is_file()}

    @app.get("/docs/static/{name}", include_in_schema=False)
    def docs_asset(name: str) -> Response:
        if name not in assets:
            raise _Problem(404, f"no file {name!r} in /docs/static")
        return FileResponse(assets[name])

    @app.get("/docs", include_in_schema=False)
    def docs(request: Request) -> Response:
        # the browser's URLs carry the prefix the app is served under (a reverse proxy's
        # path, uvicorn --root-path, a mount), as FastAPI's own /docs does
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=root + (app.openapi_url or "/openapi.json"),
            title=f"{app.title} — API",
            swagger_js_url=f"{root}/docs/static/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/docs/static/swagger-ui.css",
            swagger_favicon_url=f"{root}/docs/static/favicon-32x32.png",
        )


# ---------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _foreign_origin(headers: Mapping[bytes, bytes]) -> bool:
    """Whether a request comes from a web page of another origin than the gateway's: an
    ``Origin`` header (browsers send one with every cross-origin POST; HTTP clients none)
    that is ``null`` or names another host and port than the request's ``Host``. For browsers
    that do not send ``Sec-Fetch-Site``; only asked when the gateway has no token."""
    origin = headers.get(b"origin")
    if origin is None:
        return False
    text = origin.decode("latin-1").strip().lower()
    if text == "null":
        return True  # a sandboxed frame, a file:// page, a redirect across origins
    parts = urllib.parse.urlsplit(text)
    host = headers.get(b"host", b"").decode("latin-1").strip().lower()
    default = {"http": ":80", "https": ":443"}.get(parts.scheme, "")
    return not parts.netloc or parts.netloc.removesuffix(default) != host.removesuffix(default)


class LoopbackHostOnly:
    """ASGI middleware: answer only requests addressed to a loopback name (403 otherwise).

    A gateway without a token trusts whatever reaches loopback. A web page can still reach
    it by DNS rebinding: ``attacker.example`` is re-pointed at 127.0.0.1 after the page
    loaded, and the page's requests then count as same-origin (``Sec-Fetch-Site`` does not
    tell), but they still carry ``Host: attacker.example``. :func:`serve` wraps a gateway
    that runs without a token in this, as Jupyter checks the Host of a local server.
    ``localhost``, ``*.localhost``, loopback addresses and the names in ``allowed`` pass
    (a proxy that passes on the public name: ``--allow-host NAME``, or use a token).
    """

    def __init__(self, app: Any, allowed: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed = {h.strip().lower() for h in allowed if h.strip()}

    @property
    def state(self) -> Any:
        """The wrapped app's state (its writer, its store)."""
        return self.app.state

    def host_allowed(self, value: str) -> bool:
        """Whether a ``Host`` header value names a loopback host or an allowed name."""
        try:
            name = urllib.parse.urlsplit("//" + value.strip()).hostname or ""
        except ValueError:
            return False
        return is_loopback(name) or name.endswith(".localhost") or name in self.allowed

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raw = dict(scope["headers"]).get(b"host")
            value = raw.decode("latin-1") if raw is not None else ""
            if raw is not None and not self.host_allowed(value):
                shown = value[:100]
                response = _problem_response(
                    403,
                    f"not a loopback host: {shown}",
                    [
                        ErrorDetail(
                            None,
                            "header.host",
                            shown,
                            "host",
                            "a gateway without a token answers requests to localhost or a "
                            "loopback address only (DNS rebinding); start it with a token, "
                            "or --allow-host NAME for a proxy that passes this name on",
                        )
                    ],
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def serve(
    lab: Lab | str | os.PathLike[str] | None = None,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token: str | None = None,
    log_level: str = "warning",
    root_path: str = "",
    allowed_hosts: Iterable[str] = (),
    **app_options: Any,
) -> None:
    """Run the gateway with uvicorn until interrupted.

    Without a token the gateway answers only requests addressed to a loopback name
    (:class:`LoopbackHostOnly`: another web page reaching it by DNS rebinding gets 403).

    Args:
        allowed_hosts: more ``Host`` names a gateway without a token answers (a proxy on
            this machine that passes its public name on).
        root_path: the path prefix a reverse proxy serves the gateway under (e.g.
            ``/thundergate``, the proxy stripping it before passing requests on), as
            uvicorn's ``--root-path``: ``/docs`` and OpenAPI then name the public URLs.

    Raises:
        GatewayError: a non-loopback ``host`` without a token (refused), or a bad port.
    """
    import uvicorn

    token = token or None
    if not is_loopback(host) and not token:
        raise GatewayError(
            f"refusing to listen on {host} without a token: pass --token or set ${ENV_TOKEN} "
            f"(or bind {DEFAULT_HOST})"
        )
    if token is not None and len(token) < 8:
        raise GatewayError("the token is too short (use at least 8 characters)")
    if token is not None and token != token.strip():
        # a Bearer value arrives stripped: such a token could never be matched
        raise GatewayError("the token has leading or trailing whitespace")
    if token is not None and not (token.isascii() and token.isprintable()):
        # HTTP clients (httpx, so EventClient) refuse to send anything else in a header
        raise GatewayError("the token must be printable ASCII")
    if not 0 <= port <= 65535:
        raise GatewayError(f"bad port {port}")
    root_path = "/" + root_path.strip("/") if root_path.strip("/") else ""
    resolved = lab if isinstance(lab, Lab) else Lab.resolve(lab)
    # Bound here, not by uvicorn: a busy port is refused before the lab is created or
    # anything is said "on …", and port 0 is logged as the port the system chose.
    sock = _listen(host, port)
    try:
        app: Any = create_app(resolved, token, **app_options)
    except BaseException:
        sock.close()
        raise
    if token is None:
        app = LoopbackHostOnly(app, allowed_hosts)
    url_host = f"[{host}]" if ":" in host else host
    log.warning(
        "ThunderGate on http://%s:%d (lab %s, token %s%s)",
        url_host,
        sock.getsockname()[1],
        resolved.root,
        "required" if token else "off",
        f", served at {root_path} behind a proxy" if root_path else "",
    )
    # The process is the gateway's: its writer thread, back from each SQLite statement
    # (run without the GIL), waits for the GIL at most this long while other threads parse
    # requests, instead of Python's 5 ms (measured: batch ingest ~5% faster).
    sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL))
    with sock:
        uvicorn.run(
            app,
            fd=sock.fileno(),
            root_path=root_path,
            log_level=log_level,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=10,
        )


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (as uvicorn would make it).

    Raises:
        GatewayError: the address cannot be used (port taken, unknown host, ...).
    """
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise GatewayError(f"cannot listen on {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise GatewayError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------


@dataclass
class SendResult:
    """What a send or a spool replay did."""

    sent: int = 0
    accepted: int = 0
    duplicates: int = 0
    spooled: int = 0
    rejected: int = 0

    def __iadd__(self, other: SendResult) -> SendResult:
        self.sent += other.sent
        self.accepted += other.accepted
        self.duplicates += other.duplicates
        self.spooled += other.spooled
        self.rejected += other.rejected
        return self


class SendError(GatewayError):
    """:meth:`EventClient.send` could not deliver every event.

    The other events were still sent (or spooled), so nothing but what is listed here is
    left to the caller.

    Attributes:
        result: what the send did (sent, accepted, duplicates, spooled), failures aside.
        rejected: the caller's indexes (positions in the events given to ``send``) of the
            events the gateway refused (4xx): fix them and send them again.
        errors: the gateway's error items about them (``index``, ``path``, ``message``,
            ``rule``, ``status``), each ``index`` the caller's.
        unsent: the caller's indexes of events neither delivered nor spooled (the gateway
            unreachable and no spool, or a refused token): send them again later.
    """

    def __init__(
        self,
        message: str,
        result: SendResult,
        rejected: Sequence[int] = (),
        errors: Sequence[Mapping[str, Any]] = (),
        unsent: Sequence[int] = (),
    ) -> None:
        super().__init__(message)
        self.result = result
        self.rejected = list(rejected)
        self.errors = [dict(e) for e in errors]
        self.unsent = list(unsent)


class _Unreachable(Exception):
    """The gateway did not answer usefully after every retry.

    ``done`` leading records of the batch were delivered before (``delivered``: a batch
    split after a 413), the rest were not."""

    def __init__(self, reason: str, done: int = 0, delivered: SendResult | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.done = done
        self.delivered = delivered or SendResult()

    def after(self, n: int, delivered: SendResult) -> _Unreachable:
        """This failure of a batch's tail that follows ``n`` delivered records."""
        total = SendResult()
        total += delivered
        total += self.delivered
        return _Unreachable(self.reason, n + self.done, total)


class _Undelivered(Exception):
    """Records that could not be delivered and have no spool to wait in."""

    def __init__(self, records: list[str], reason: str) -> None:
        super().__init__(reason)
        self.records = records
        self.reason = reason


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except (ValueError, RecursionError):  # torn by a crash, or nested too deeply to read
        return False
    return True


class _Rejected(Exception):
    """A 4xx answer; ``done`` leading records were delivered before (as for
    :class:`_Unreachable`), and the errors' indexes count from the batch's start."""

    def __init__(
        self, status: int, body: Any, done: int = 0, delivered: SendResult | None = None
    ) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.done = done
        self.delivered = delivered or SendResult()

    def after(self, n: int, delivered: SendResult) -> _Rejected:
        """This rejection of a batch's tail that follows ``n`` delivered records."""
        body = self.body
        if isinstance(body, Mapping):
            items = [
                {**e, "index": e["index"] + n}
                if isinstance(e, Mapping) and isinstance(e.get("index"), int)
                else e
                for e in body.get("errors") or []
            ]
            body = {**body, "errors": items}
        total = SendResult()
        total += delivered
        total += self.delivered
        return _Rejected(self.status, body, n + self.done, total)


@dataclass
class _Sorted:
    """What posting one batch came to. Positions count in the batch.

    ``refused``: the positions the gateway will not accept (4xx), and ``errors`` its error
    items about them (``index`` a position, ``status`` the answer's); ``pending``: the
    positions neither delivered nor refused, because the gateway became unreachable or
    refused the token (``reason``, ``token_refused``)."""

    result: SendResult = field(default_factory=lambda: SendResult())
    refused: list[int] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    reason: str | None = None
    token_refused: bool = False


_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def _check_url(url: object) -> str:
    """Refuse a gateway URL that could never be reached: without ``http://``/``https://`` or
    a host, every attempt would fail like a gateway that is down, and events would be
    spooled without a word (``127.0.0.1:8765`` parses as a scheme ``127.0.0.1``). A query
    or fragment is refused too (the ingest path would be appended after it), as is
    whitespace or a control character (a host with a space in it cannot be looked up).

    Returns:
        ``url``, known to be a ``str``.

    Raises:
        GatewayError: naming the URL and what is wrong with it.
    """
    if not isinstance(url, str):
        raise GatewayError(
            f"bad gateway URL {url!r}: url must be a str such as 'http://127.0.0.1:8765', "
            f"not {type(url).__name__}"
        )
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        _ = parts.port  # a port that is not a number
    except ValueError as exc:
        raise GatewayError(f"bad gateway URL {url!r}: {exc}") from None
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise GatewayError(
            f"bad gateway URL {url!r}: it needs http:// or https:// and a host "
            "(e.g. http://127.0.0.1:8765)"
        )
    if any(c.isspace() or not c.isprintable() for c in url):
        raise GatewayError(
            f"bad gateway URL {url!r}: it holds whitespace or a control character "
            "(percent-encode them in a path, and a host cannot hold them)"
        )
    if parts.query or parts.fragment or url.rstrip("/").endswith(("?", "#")):
        raise GatewayError(
            f"bad gateway URL {url!r}: it must not hold a query (?...) or a fragment (#...): "
            f"the client appends {INGEST_PATH} to it"
        )
    return url


def _check_token(token: object, source: str) -> str:
    """Refuse a token that could never be accepted, instead of sending it and leaving the
    user to puzzle over a 401: not a ``str`` (``Bearer 5``, ``Bearer b'abc'``), not printable
    ASCII (a newline would break or inject a header), or with leading or trailing
    whitespace. Whitespace is refused, not stripped, as :func:`serve` refuses it: a padded
    value is a copy-paste slip the user should see, and the token passed to both stays the
    same string. ``source`` names where the token came from.

    Raises:
        GatewayError: naming ``source`` and what is wrong (never the token itself).
    """
    if not isinstance(token, str):
        raise GatewayError(f"{source} must be a str, not {type(token).__name__}")
    if token != token.strip():
        raise GatewayError(
            f"{source} has leading or trailing whitespace (a copy-paste slip? "
            "the gateway would refuse it)"
        )
    if not (token.isascii() and token.isprintable()):
        raise GatewayError(
            f"{source} must be printable ASCII (it holds a control character such as a "
            "newline, or a non-ASCII one)"
        )
    return token


def _check_int(name: str, value: object, minimum: int) -> int:
    """``value`` if it is an ``int`` (not a ``bool``) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise GatewayError(f"{name} must be an integer, not {type(value).__name__} {value!r}")
    if value < minimum:
        raise GatewayError(f"{name} must be at least {minimum}, not {value}")
    return value


def _check_seconds(name: str, value: object, *, zero: bool) -> float:
    """``value`` if it is a finite real number (not a ``bool``), positive (or 0 if ``zero``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise GatewayError(
            f"{name} must be a number of seconds, not {type(value).__name__} {value!r}"
        )
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        least = "0 or more" if zero else "more than 0"
        raise GatewayError(f"{name} must be a finite number of seconds, {least}, not {value}")
    return float(value)


def _check_spool(spool: object) -> Path | None:
    """The spool file's path; refuse what is not a path, or names a folder (every spooled
    batch would then fail with ``IsADirectoryError``)."""
    if spool is None:
        return None
    if not isinstance(spool, str | os.PathLike) or isinstance(os.fspath(spool), bytes):
        raise GatewayError(
            f"spool must be a file path (a str or a Path), not {type(spool).__name__}"
        )
    path = Path(spool)
    if str(spool) == "" or path.is_dir():
        raise GatewayError(f"spool must name a file, not a folder: {str(spool)!r}")
    return path


_EVENT_KINDS = "an event (an Event, a dict in an accepted wire shape, or a JSON string)"


def _record_json(item: object, what: str = "the event") -> str:
    """One event as a JSON record; ``what`` names it in the error.

    Raises:
        GatewayError: ``item`` is not an event.
    """
    if isinstance(item, str):
        return item
    if isinstance(item, Mapping):
        return json.dumps(item, default=str, separators=(",", ":"))
    if isinstance(item, Event):
        return item.model_dump_json()
    raise GatewayError(f"{what} must be {_EVENT_KINDS}, not {type(item).__name__}")


def _records_json(events: object) -> list[str]:
    """The JSON records of ``send``'s ``events``: an iterable of events, never one event
    (iterating an event object yields its fields, a dict its keys, a string its letters).

    Raises:
        GatewayError: ``events`` is not an iterable of events, naming the first bad item.
    """
    if isinstance(events, str | bytes | Mapping | Event) or not isinstance(events, Iterable):
        one = " (to send one event, pass [event])" if isinstance(events, Mapping | Event) else ""
        raise GatewayError(
            f"events must be an iterable (a list) of events, not {type(events).__name__}{one}"
        )
    return [_record_json(e, f"events[{i}]") for i, e in enumerate(events)]


class EventClient:
    """Report events to a ThunderGate over HTTP: batching, retry with backoff, local spool.

    Events (objects, or dicts in any accepted wire shape) are sent as JSON arrays of at
    most ``batch_size``. Connection errors, timeouts and 408/429/5xx answers are retried
    ``max_retries`` times with exponential backoff and jitter (honouring ``Retry-After``).
    If the gateway stays unreachable, the batch is appended to ``spool`` (JSON lines,
    fsynced) and replayed on the next successful contact, at :meth:`close`, or by
    :meth:`replay_spool`. Event ids are idempotency keys, so replays and retries can only
    make duplicates, which the gateway counts and ignores. Events the gateway rejects
    (4xx) raise :class:`SendError` from :meth:`send` (once, naming each by its index, after
    the rest is sent); during a
    replay, and from the background sender, they are moved to ``<spool>.rejected`` (the
    reason is logged) so they cannot block the rest; a spooled line that is not JSON (torn
    by a crash) goes there too.

    As a bus subscriber (:meth:`attach`, or ``bus.subscribe("ml.*", client)``) events are
    buffered and sent by a background thread every ``flush_interval`` seconds or once
    ``batch_size`` are waiting. A refused token (401) counts as unreachable: the events are
    spooled, not rejected. Without a spool, undeliverable events stay buffered (up to
    ``max_buffer``) and are retried at the next flush, and rejected ones are dropped with an
    error logged.

    The settings are checked at construction, and a bad one raises :class:`GatewayError`
    naming it: the URL (``http://`` or ``https://``, a host, no query or fragment), the
    token (a ``str`` of printable ASCII without surrounding whitespace: refused, not
    stripped, as :func:`serve` refuses it; ``""`` sends none), the spool (a file path, not
    a folder), the counts (``batch_size`` and ``max_buffer`` at least 1, ``max_retries`` at
    least 0) and the seconds (``timeout`` and ``flush_interval`` above 0, ``backoff`` and
    ``max_backoff`` at least 0); a ``bool`` is not a number.

    Example:
        >>> client = EventClient("http://127.0.0.1:8765", spool="lab/gateway-spool.jsonl")
        >>> # client.send([events.trial_start(...)])       # synchronous, returns SendResult
        >>> # client.attach(bus)                            # report a training process
        >>> # client.close()                                # flush + replay the spool
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        spool: str | os.PathLike[str] | None = None,
        batch_size: int = 1000,
        flush_interval: float = 0.5,
        timeout: float = 30.0,
        max_retries: int = 4,
        backoff: float = 0.1,
        max_backoff: float = 5.0,
        max_buffer: int = 200_000,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        base = _check_url(url).rstrip("/")
        self.endpoint = base if base.endswith(INGEST_PATH) else base + INGEST_PATH
        if token is None:
            env = os.environ.get(ENV_TOKEN) or None
            self.token = _check_token(env, f"${ENV_TOKEN}") if env is not None else None
        else:
            self.token = _check_token(token, "token") if token != "" else token
        self.spool = _check_spool(spool)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.flush_interval = _check_seconds("flush_interval", flush_interval, zero=False)
        timeout = _check_seconds("timeout", timeout, zero=False)
        self.max_retries = _check_int("max_retries", max_retries, 0)
        self.backoff = _check_seconds("backoff", backoff, zero=True)
        self.max_backoff = _check_seconds("max_backoff", max_backoff, zero=True)
        self.max_buffer = _check_int("max_buffer", max_buffer, 1)
        headers = {"content-type": "application/json"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        self._http = httpx.Client(timeout=timeout, headers=headers, transport=transport)
        self._buffer: list[str] = []
        self._cond = threading.Condition()
        self._send_lock = threading.RLock()
        self._spool_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._subs: list[tuple[EventBus, Subscription]] = []
        self.stats = SendResult()
        self.retries = 0
        self.last_error: str | None = None

    # -- synchronous sending ----------------------------------------------------------------

    def send(self, events: Iterable[Event | Mapping[str, Any] | str]) -> SendResult:
        """Send events now (in batches); spool what cannot be delivered.

        Events the gateway rejects (4xx) do not stop the rest: every batch is sent, the
        valid events of a batch that held rejected ones are sent again without them (event
        ids are idempotency keys), and one :class:`SendError` at the end names each
        rejected event by its index in ``events``. Once the gateway is unreachable, the
        remaining batches are spooled without further attempts.

        Returns:
            Counts of sent / accepted / duplicate / spooled events.

        Raises:
            SendError: the gateway rejected events (4xx: invalid events, wrong token), or
                it is unreachable and there is no spool; its ``result`` says what was
                delivered, ``rejected`` and ``unsent`` which events (by index) were not.
        """
        records = _records_json(events)
        total = SendResult()
        rejected: list[int] = []
        errors: list[dict[str, Any]] = []
        unsent: list[int] = []
        reason: str | None = None  # why the gateway stopped taking events, if it did
        with self._send_lock:
            for start in range(0, len(records), self.batch_size):
                batch = records[start : start + self.batch_size]
                if reason is not None:
                    if self.spool is not None and not unsent:
                        total += self._spool_batch(batch)
                    else:
                        unsent.extend(range(start, start + len(batch)))
                    continue
                out = self._post_sorted(batch)
                refused = SendResult(rejected=len(out.refused))
                self.stats += refused
                total += out.result
                total += refused
                rejected.extend(start + p for p in out.refused)
                errors.extend({**e, "index": e["index"] + start} for e in out.errors)
                if out.pending:
                    reason = out.reason
                    if self.spool is not None and not out.token_refused:
                        total += self._spool_batch([batch[p] for p in out.pending])
                    else:
                        unsent.extend(start + p for p in out.pending)
            if total.sent and not total.spooled:
                total += self._maybe_replay()
        if rejected or unsent:
            raise SendError(
                _send_failure_message(self.endpoint, len(records), total, errors, unsent, reason),
                total,
                rejected,
                errors,
                unsent,
            )
        return total

    def _spool_batch(self, records: list[str]) -> SendResult:
        self._append_spool(records)
        result = SendResult(spooled=len(records))
        self.stats += result
        return result

    def _post_sorted(self, records: list[str]) -> _Sorted:
        """POST one batch, sorting out what the gateway refuses.

        Records a 409/422 names by index are taken out and the rest posted again (nothing of
        a refused request is written); any other 4xx refuses every record still to send. A
        refused token (401) and an unreachable gateway leave the records still to send
        pending. Never raises for an answer of the gateway.
        """
        out = _Sorted()
        todo = list(range(len(records)))
        while todo:
            try:
                out.result += self._post([records[p] for p in todo])
                return out
            except _Unreachable as exc:
                out.result += exc.delivered
                out.pending = todo[exc.done :]
                out.reason = f"gateway unreachable: {exc.reason}"
                return out
            except _Rejected as exc:
                out.result += exc.delivered
                rest = todo[exc.done :]
                if exc.status == 401:
                    out.pending = rest
                    out.reason = "the gateway refused the token (HTTP 401)"
                    out.token_refused = True
                    return out
                body = exc.body if isinstance(exc.body, Mapping) else {"detail": str(exc.body)}
                detail = str(body.get("detail") or f"HTTP {exc.status}")
                items = [dict(e) for e in body.get("errors") or [] if isinstance(e, Mapping)] or [
                    {"index": None, "path": "<body>", "message": detail, "rule": "refused"}
                ]
                bad = {i for i in _rejected_indexes(body, len(todo)) if i >= exc.done}
                if not bad or exc.status not in (409, 422):
                    bad = set(range(exc.done, len(todo)))
                    # refused as a whole: every record gets the request's errors
                    per_record = {i: [e for e in items if e.get("index") in (None, i)] for i in bad}
                else:
                    per_record = {i: [e for e in items if e.get("index") == i] for i in bad}
                for i in sorted(bad):
                    out.refused.append(todo[i])
                    for e in per_record[i]:
                        out.errors.append({**e, "index": todo[i], "status": exc.status})
                todo = [p for i, p in enumerate(todo) if i >= exc.done and i not in bad]
        return out

    def _log_refused(self, out: _Sorted, records: int) -> None:
        if out.errors:
            log.warning(
                "%s",
                _send_failure_message(self.endpoint, records, out.result, out.errors, [], None),
            )

    def _post(self, records: list[str]) -> SendResult:
        """POST one batch with retries; split it if the gateway says it is too large."""
        body = ("[" + ",".join(records) + "]").encode()
        attempt = 0
        while True:
            wait: float | None = None
            try:
                resp = self._http.post(self.endpoint, content=body)
            except httpx.HTTPError as exc:  # connect, timeout, protocol errors
                self.last_error = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code == 202:
                    answer = resp.json()
                    result = SendResult(
                        sent=len(records),
                        accepted=answer["accepted"],
                        duplicates=answer["duplicates"],
                    )
                    self.stats += result
                    return result
                if resp.status_code == 413 and len(records) > 1:
                    half = len(records) // 2
                    first = self._post(records[:half])
                    try:
                        first += self._post(records[half:])
                    except (_Rejected, _Unreachable) as exc:
                        raise exc.after(half, first) from None
                    return first
                if resp.status_code not in _RETRY_STATUS:
                    raise _Rejected(resp.status_code, _json_or_text(resp))
                self.last_error = f"HTTP {resp.status_code}"
                retry_after = resp.headers.get("retry-after", "")
                if retry_after.isdigit():
                    wait = min(float(retry_after), self.max_backoff)
            if attempt >= self.max_retries:
                raise _Unreachable(self.last_error)
            if wait is None:
                wait = min(self.max_backoff, self.backoff * 2**attempt)
                wait *= 0.5 + random.random() / 2
            attempt += 1
            self.retries += 1
            time.sleep(wait)

    # -- the spool ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked_spool(self) -> Iterator[None]:
        assert self.spool is not None
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        with self._spool_lock, open(self.spool.with_name(self.spool.name + ".lock"), "a") as lf:
            try:
                import fcntl

                fcntl.flock(lf, fcntl.LOCK_EX)
            except ImportError:  # pragma: no cover - not POSIX: process-local lock only
                pass
            yield

    def _append_spool(self, records: list[str], path: Path | None = None) -> None:
        target = path or self.spool
        assert target is not None
        with self._locked_spool(), open(target, "a", encoding="utf-8") as fh:
            fh.write("".join(r.replace("\n", " ") + "\n" for r in records))
            fh.flush()
            os.fsync(fh.fileno())

    def spooled(self) -> int:
        """How many events wait in the spool file."""
        if self.spool is None or not self.spool.exists():
            return 0
        with self._locked_spool(), open(self.spool, encoding="utf-8") as fh:
            return sum(1 for line in fh if line.strip())

    def _maybe_replay(self) -> SendResult:
        if self.spool is None:
            return SendResult()
        try:
            if self.spool.stat().st_size == 0:
                return SendResult()
        except FileNotFoundError:
            return SendResult()
        try:
            return self.replay_spool()
        except GatewayError as exc:
            log.warning("spool replay deferred: %s", exc)
            return SendResult()

    def replay_spool(self) -> SendResult:
        """Send every spooled event; keep what still cannot be delivered.

        Events the gateway rejects (4xx), and lines that are not JSON, go to
        ``<spool>.rejected``; the reason is logged.

        Raises:
            GatewayError: the gateway is still unreachable (the spool is kept intact).
        """
        if self.spool is None:
            return SendResult()
        total = SendResult()
        with self._send_lock, self._locked_spool():
            if not self.spool.exists():
                return total
            # split on "\n" alone: str.splitlines would also cut at U+2028, U+2029 and NEL,
            # which JSON allows unescaped inside strings
            lines = [ln for ln in self.spool.read_text(encoding="utf-8").split("\n") if ln.strip()]
            remaining: list[str] = []
            # a line that is not JSON (torn by a crash mid-write) is set aside on its own
            # instead of making the gateway refuse its whole batch with a 400
            rejected: list[str] = []
            parsed: list[str] = []
            for ln in lines:
                (parsed if _is_json(ln) else rejected).append(ln)
            if rejected:
                log.warning(
                    "%s: %d spooled lines are not JSON; moved aside", self.spool, len(rejected)
                )
            lines = parsed
            error: str | None = None
            for i in range(0, len(lines), self.batch_size):
                batch = lines[i : i + self.batch_size]
                if error is not None:
                    remaining.extend(batch)
                    continue
                out = self._post_sorted(batch)
                self._log_refused(out, len(batch))
                total += out.result
                rejected.extend(batch[p] for p in out.refused)
                if out.pending:
                    error = out.reason
                    remaining.extend(batch[p] for p in out.pending)
            tmp = self.spool.with_name(self.spool.name + ".tmp")
            tmp.write_text("".join(r + "\n" for r in remaining), encoding="utf-8")
            os.replace(tmp, self.spool)
            if rejected:
                with open(
                    self.spool.with_name(self.spool.name + ".rejected"), "a", encoding="utf-8"
                ) as fh:
                    fh.write("".join(r + "\n" for r in rejected))
                total.rejected += len(rejected)
        if error is not None:
            raise GatewayError(
                f"{self.endpoint}: gateway unreachable, {len(remaining)} events "
                f"kept in {self.spool}: {error}"
            )
        return total

    def _set_aside(self, rejected: list[str]) -> SendResult:
        """Records the gateway will never accept: to ``<spool>.rejected`` (JSON lines, to
        be mended and sent again), or, without a spool, dropped with an error logged."""
        if self.spool is not None:
            self._append_spool(rejected, self.spool.with_name(self.spool.name + ".rejected"))
        else:
            log.error(
                "event client: %d events rejected by %s and dropped (no spool to keep them)",
                len(rejected),
                self.endpoint,
            )
        result = SendResult(rejected=len(rejected))
        self.stats += result
        return result

    def _deliver_background(self, records: list[str]) -> SendResult:
        """Deliver buffered events: rejected ones are set aside so that they cannot block
        the rest; undeliverable ones (unreachable, refused token) go to the spool, or, with
        none, raise :class:`_Undelivered` for the caller to keep them buffered."""
        out = self._post_sorted(records)
        self._log_refused(out, len(records))
        result = out.result
        if out.refused:
            result += self._set_aside([records[p] for p in out.refused])
        if out.pending:
            kept = [records[p] for p in out.pending]
            if self.spool is None:
                raise _Undelivered(kept, f"{self.endpoint}: {out.reason}")
            result += self._spool_batch(kept)
        return result

    # -- bus subscriber -----------------------------------------------------------------------

    def emit(self, event: Event | Mapping[str, Any]) -> None:
        """Buffer one event for the background sender (the bus handler).

        Raises:
            GatewayError: ``event`` is not an event, or the buffer is full (no spool and
                the gateway is unreachable).
        """
        record = _record_json(event, "emit's event")
        with self._cond:
            if self._closed:
                raise GatewayError("the event client is closed")
            if len(self._buffer) >= self.max_buffer:
                raise GatewayError(
                    f"{len(self._buffer)} events are waiting for "
                    f"{self.endpoint}; dropping {_event_name(event)}"
                )
            self._buffer.append(record)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="thundergate-client", daemon=True
                )
                self._thread.start()
            if len(self._buffer) >= self.batch_size:
                self._cond.notify()

    __call__ = emit

    def attach(self, bus: EventBus, pattern: str = "ml.*") -> Subscription:
        """Subscribe to ``bus`` so every matching event is reported through the gateway.

        Raises:
            GatewayError: ``bus`` is not an :class:`~thunderline_lab.bus.EventBus`, or
                ``pattern`` not a string.
        """
        from thunderline_lab.bus import EventBus

        if not isinstance(bus, EventBus):
            raise GatewayError(f"bus must be an EventBus, not {type(bus).__name__}")
        if not isinstance(pattern, str):
            raise GatewayError(
                f"pattern must be a str such as 'ml.*', not {type(pattern).__name__}"
            )
        sub = bus.subscribe(pattern, self.emit, name="EventClient")
        self._subs.append((bus, sub))
        return sub

    def detach(self) -> None:
        """Unsubscribe from every bus this client was attached to."""
        for bus, sub in self._subs:
            bus.unsubscribe(sub)
        self._subs.clear()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._closed and len(self._buffer) < self.batch_size:
                    self._cond.wait(self.flush_interval)
                closed = self._closed
            try:
                self.flush()
            except GatewayError as exc:
                log.warning("event client: %s", exc)
            if closed:
                return

    def flush(self) -> SendResult:
        """Send everything buffered now, and replay the spool (if it holds events) once
        the gateway takes events again.

        Raises:
            GatewayError: as :meth:`send`; without a spool, undelivered events stay buffered.
        """
        with self._send_lock:
            with self._cond:
                batch, self._buffer = self._buffer, []
            if not batch:
                return self._maybe_replay()
            total = SendResult()
            for i in range(0, len(batch), self.batch_size):
                chunk = batch[i : i + self.batch_size]
                try:
                    total += self._deliver_background(chunk)
                except _Undelivered as exc:
                    with self._cond:  # keep the undelivered for the next attempt
                        self._buffer[:0] = exc.records + batch[i + self.batch_size :]
                    raise GatewayError(
                        f"gateway unreachable, {len(self._buffer)} events kept buffered "
                        f"(no spool): {exc.reason}"
                    ) from None
            if total.sent and not total.spooled:
                total += self._maybe_replay()
            return total

    def close(self) -> None:
        """Detach, send what is buffered, replay the spool if the gateway answers, close.

        Raises:
            GatewayError: events could not be delivered and there is no spool to keep them.
        """
        self.detach()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        try:
            self.flush()
            self._maybe_replay()
        finally:
            self._http.close()
        if self._buffer:
            raise GatewayError(
                f"{len(self._buffer)} events could not be delivered to "
                f"{self.endpoint} (no spool configured)"
            )

    def __enter__(self) -> EventClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _event_name(event: Event | Mapping[str, Any]) -> str:
    if isinstance(event, Mapping):
        return str(event.get("name") or event.get("event") or "event")
    return event.name


def _json_or_text(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return resp.text[:500]


def _send_failure_message(
    endpoint: str,
    n: int,
    result: SendResult,
    errors: Sequence[Mapping[str, Any]],
    unsent: Sequence[int],
    reason: str | None,
) -> str:
    """One line: which events were refused (the first errors, by record and field), which
    were not sent, and what was delivered."""
    parts = []
    refused = {e.get("index") for e in errors}
    if refused:
        shown = []
        for e in errors[:5]:
            where = f"record {e.get('index')}: " if e.get("index") is not None else ""
            shown.append(f"HTTP {e.get('status')}: {where}{e.get('path')}: {e.get('message')}")
        more = f"; ... {len(errors) - 5} more errors" if len(errors) > 5 else ""
        parts.append(f"{len(refused)} of {n} events rejected: " + "; ".join(shown) + more)
    if unsent:
        parts.append(
            f"{reason}: {len(unsent)} events not sent (records {unsent[0]} to {unsent[-1]})"
        )
    done = (
        f"{result.sent} sent ({result.accepted} accepted, {result.duplicates} duplicates), "
        f"{result.spooled} spooled"
    )
    return f"{endpoint}: " + "; ".join(parts) + f" [{done}]"


def _rejected_indexes(body: Any, n: int) -> set[int]:
    if not isinstance(body, Mapping):
        return set()
    out = set()
    for e in body.get("errors") or []:
        idx = e.get("index") if isinstance(e, Mapping) else None
        if isinstance(idx, int) and 0 <= idx < n:
            out.add(idx)
    return out

"""The trial store: one SQLite file per lab holding the event log and tables derived from it.

Tables (all but ``events`` are projections, rebuilt exactly by :meth:`TrialStore.replay`)::

    events      append-only log: seq, unique event id, name, timestamp, run/trial, JSON body
    model_runs  one row per model run (= Optuna study): study name, first/last event time
    trials      one row per trial: status, spectral_norm, coeff, mlflow_run_id, parameters,
                metrics, duration_ms, rank, artifact_uri, error, timestamps
    metrics     metric series: (model_run_id, trial_id, name, step) -> value
    artifacts   artifact URIs reported by trials and runs

Projections are order-independent: a trial row is a fold of that trial's lifecycle events
sorted by (timestamp, id), and a metric point keeps the value of the latest event by
(timestamp, id). So duplicate, reordered or replayed delivery converge to the same tables.

Several processes may append to one lab at once: writes take SQLite's write lock up front
(``BEGIN IMMEDIATE``) in WAL mode with a generous busy timeout, and retry if it is still
contended, so they queue instead of failing with "database is locked".

Example:
    >>> from thunderline_lab.store import TrialStore
    >>> from thunderline_lab import events
    >>> store = TrialStore(":memory:")
    >>> store.append([events.trial_start(model_run_id="r", trial_id="t0", spectral_norm=True)])
    AppendResult(accepted=1, duplicates=0, ids=[...], last_seq=1)
    >>> store.trials()[["trial_id", "status", "spectral_norm"]].to_dict("records")
    [{'trial_id': 't0', 'status': 'running', 'spectral_norm': True}]
"""

from __future__ import annotations

import functools
import json
import logging
import math
import numbers
import os
import reprlib
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from itertools import chain
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any

import msgspec
import pandas as pd
import sqlite_utils
from pydantic_core import PydanticSerializationError, to_json, to_jsonable_python

from thunderline_lab.bus import EventBus, Subscription
from thunderline_lab.errors import StoreError
from thunderline_lab.events import (
    FAST_NAMES,
    FAST_PAYLOADS,
    ErrorDetail,
    Event,
    EventConflictError,
    EventValidationError,
    dump_events,
    encode_fast_all,
    fast_events,
    gc_paused,
    is_fast,
    to_event,
    validate_events,
    validate_records,
)

__all__ = [
    "AppendResult",
    "PreparedBatch",
    "StoreWriter",
    "TrialStore",
    "fold_trial",
    "format_ts",
    "snapshot_dir",
    "trial_records",
]

log = logging.getLogger(__name__)

LIFECYCLE_EVENTS = (
    "ml.run.start",
    "ml.run.stop",
    "ml.trial.start",
    "ml.trial.complete",
    "ml.trial.failed",
)
TRIAL_COLUMNS = (
    "model_run_id",
    "trial_id",
    "study",
    "status",
    "spectral_norm",
    "spectral_norm_coeff",
    "mlflow_run_id",
    "parameters",
    "metrics",
    "duration_ms",
    "rank",
    "artifact_uri",
    "error_type",
    "error_message",
    "started_at",
    "ended_at",
    "updated_at",
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    timestamp TEXT NOT NULL,
    model_run_id TEXT,
    trial_id TEXT,
    body TEXT NOT NULL
);
DROP INDEX IF EXISTS idx_events_trial;
CREATE INDEX IF NOT EXISTS idx_events_lifecycle ON events (model_run_id, trial_id)
    WHERE name IN ('ml.run.start', 'ml.run.stop', 'ml.trial.start', 'ml.trial.complete',
                   'ml.trial.failed');
CREATE TABLE IF NOT EXISTS model_runs (
    model_run_id TEXT PRIMARY KEY,
    study TEXT,
    first_event_at TEXT,
    last_event_at TEXT
);
CREATE TABLE IF NOT EXISTS trials (
    model_run_id TEXT NOT NULL,
    trial_id TEXT NOT NULL,
    study TEXT,
    status TEXT NOT NULL,
    spectral_norm INTEGER,
    spectral_norm_coeff REAL,
    mlflow_run_id TEXT,
    parameters TEXT NOT NULL DEFAULT '{}',
    metrics TEXT NOT NULL DEFAULT '{}',
    duration_ms INTEGER,
    rank INTEGER,
    artifact_uri TEXT,
    error_type TEXT,
    error_message TEXT,
    started_at TEXT,
    ended_at TEXT,
    updated_at TEXT,
    PRIMARY KEY (model_run_id, trial_id)
);
CREATE INDEX IF NOT EXISTS idx_trials_spectral_norm ON trials (spectral_norm);
CREATE INDEX IF NOT EXISTS idx_trials_mlflow_run_id ON trials (mlflow_run_id);
CREATE INDEX IF NOT EXISTS idx_trials_status ON trials (status);
CREATE INDEX IF NOT EXISTS idx_trials_study ON trials (study);
CREATE TABLE IF NOT EXISTS metrics (
    model_run_id TEXT NOT NULL,
    trial_id TEXT NOT NULL,
    name TEXT NOT NULL,
    step INTEGER NOT NULL,
    value REAL NOT NULL,
    timestamp TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (model_run_id, trial_id, name, step)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS artifacts (
    model_run_id TEXT NOT NULL,
    trial_id TEXT NOT NULL,
    uri TEXT NOT NULL,
    kind TEXT NOT NULL,
    timestamp TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (model_run_id, trial_id, uri)
);
"""
_PROJECTIONS = ("model_runs", "trials", "metrics", "artifacts")
PAGE_SIZE = 8192
WAL_CHECKPOINT_PAGES = 8000  # the writer's own checkpoints: a backstop (64 MB of 8 KiB pages)
# Literal names (not parameters), so that SQLite can use the partial lifecycle index.
_LIFECYCLE_NAMES = ", ".join(f"'{n}'" for n in LIFECYCLE_EVENTS)


@functools.cache
def _lifecycle_sql(n: int) -> str:
    """The lifecycle events of ``n`` trials (2n parameters: run, trial), by index seeks."""
    keys = ", ".join(["(?, ?)"] * n)
    return (
        f"SELECT e.model_run_id, e.trial_id, e.body, e.seq FROM (VALUES {keys}) k JOIN events e "
        f"ON e.model_run_id = k.column1 AND e.trial_id = k.column2 "
        f"AND e.name IN ({_LIFECYCLE_NAMES})"
    )


_REFOLD_TRIALS = 256  # trials per statement when trials are refolded


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """``items`` in chunks of ``size``, the rest in chunks of powers of two: a statement
    per chunk, of a few sizes only (each one's SQL is made and compiled once)."""
    i, n = 0, len(items)
    while i < n:
        step = size if n - i >= size else 1 << ((n - i).bit_length() - 1)
        yield items[i : i + step]
        i += step


# Metric points are projected inside SQLite, straight from the logged bodies of the metric
# events in a seq range (about 1.5x faster than binding one row per point from Python). The
# single ``metric_name``/``metric_value`` overrides the same name in ``measurements``.
_POINT_CONFLICT = """
ON CONFLICT (model_run_id, trial_id, name, step) DO UPDATE SET
    value = excluded.value, timestamp = excluded.timestamp, event_id = excluded.event_id
WHERE (excluded.timestamp, excluded.event_id) > (metrics.timestamp, metrics.event_id)
"""
_PROJECT_SINGLE_METRICS = (
    """
INSERT INTO metrics (model_run_id, trial_id, name, step, value, timestamp, event_id)
SELECT model_run_id, trial_id, json_extract(body, '$.payload.metric_name'),
       json_extract(body, '$.payload.step'), json_extract(body, '$.payload.metric_value'),
       timestamp, id
FROM events
WHERE seq > ?1 AND seq <= ?2 AND name = 'ml.run.metric'
  AND json_extract(body, '$.payload.metric_name') IS NOT NULL
"""
    + _POINT_CONFLICT
)
_MEASUREMENTS_SELECT = """
INSERT INTO metrics (model_run_id, trial_id, name, step, value, timestamp, event_id)
SELECT e.model_run_id, e.trial_id, j.key, json_extract(e.body, '$.payload.step'), j.value,
       e.timestamp, e.id
FROM events e, json_each(e.body, '$.payload.measurements') j
WHERE e.seq > ?1 AND e.seq <= ?2 AND e.name = 'ml.run.metric'
"""
_PROJECT_MEASUREMENTS = (
    _MEASUREMENTS_SELECT
    + "  AND j.key IS NOT json_extract(e.body, '$.payload.metric_name')"
    + _POINT_CONFLICT
)
# A range without single metrics: nothing overrides a measurement, one lookup less a point.
_PROJECT_ONLY_MEASUREMENTS = _MEASUREMENTS_SELECT + _POINT_CONFLICT
_UPSERT_RUN = """
INSERT INTO model_runs (model_run_id, study, first_event_at, last_event_at) VALUES (?, ?, ?, ?)
ON CONFLICT (model_run_id) DO UPDATE SET
    study = COALESCE(model_runs.study, excluded.study),
    first_event_at = MIN(model_runs.first_event_at, excluded.first_event_at),
    last_event_at = MAX(model_runs.last_event_at, excluded.last_event_at)
"""
_UPSERT_ARTIFACT = """
INSERT INTO artifacts (model_run_id, trial_id, uri, kind, timestamp, event_id)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (model_run_id, trial_id, uri) DO UPDATE SET
    kind = excluded.kind, timestamp = excluded.timestamp, event_id = excluded.event_id
WHERE (excluded.timestamp, excluded.event_id) > (artifacts.timestamp, artifacts.event_id)
"""


@functools.cache
def _insert_events_sql(n: int) -> str:
    """INSERT OR IGNORE ``n`` rows into the log."""
    return (
        "INSERT OR IGNORE INTO events (id, name, timestamp, model_run_id, trial_id, body) "
        f"VALUES {', '.join(['(?, ?, ?, ?, ?, ?)'] * n)}"
    )


_INSERT_ROWS = 512  # rows per INSERT (6 parameters each; SQLite allows 32,766)


# A trial's row is updated in place: it keeps its rowid, so the table lists trials in the
# order they first appeared (REPLACE would delete it and append it as the newest row).
@functools.cache
def _upsert_trials_sql(n: int) -> str:
    """Insert or update ``n`` trials' rows (in the order given)."""
    one = f"({', '.join('?' * len(TRIAL_COLUMNS))})"
    return (
        f"INSERT INTO trials ({', '.join(TRIAL_COLUMNS)}) VALUES {', '.join([one] * n)} "
        "ON CONFLICT (model_run_id, trial_id) DO UPDATE SET "
        + ", ".join(f"{c} = excluded.{c}" for c in TRIAL_COLUMNS[2:])  # all but the key
    )


# Evenly spaced steps of one long curve, each found by an index seek (the first step at or
# after each target), so downsampling costs O(max_points · log n), not O(n).
_SEEK_SQL = """
WITH RECURSIVE k(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM k WHERE i + 1 < ?4)
SELECT DISTINCT m.step, m.value FROM k JOIN metrics m
  ON m.model_run_id = ?1 AND m.trial_id = ?2 AND m.name = ?3
 AND m.step = (SELECT s.step FROM metrics s
               WHERE s.model_run_id = ?1 AND s.trial_id = ?2 AND s.name = ?3
                 AND s.step >= ?5 + ((?6 - ?5) * k.i) / (?4 - 1)
               ORDER BY s.step LIMIT 1)
ORDER BY m.step
"""


def _while_busy(action: Any, path: str, timeout: float) -> Any:
    """``action()``, retried with backoff while another connection holds the lab's lock
    (SQLite's "database is locked" / "busy"), for up to ``timeout`` seconds.

    Raises:
        StoreError: the lab stayed locked.
    """
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            return action()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() > deadline:
                raise StoreError(f"{path}: lab database stayed locked: {exc}") from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


# Bumped whenever _SCHEMA changes; a lab at this version is opened without a write.
SCHEMA_VERSION = 1
# Tables thunderline_lab.tracking keeps in the lab's file (its MLflow outbox). It makes
# them on a connection of its own, so a lab's file may hold them before the store's.
_OUTBOX_TABLES = frozenset({"mlflow_studies", "mlflow_outbox", "mlflow_artifacts"})


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[0] for r in conn.execute("SELECT name FROM pragma_table_info(?)", (table,))]


@functools.cache
def _schema_columns() -> dict[str, list[str]]:
    """Each table of ``_SCHEMA`` and its columns, as SQLite reads them (from a scratch
    database: what a lab's file must hold is never written down twice)."""
    conn = sqlite3.connect(":memory:")
    try:
        _run_schema(conn)
        tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {t: _columns(conn, t) for (t,) in tables.fetchall() if not t.startswith("sqlite_")}
    finally:
        conn.close()


def _run_schema(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)


def _needs_schema(conn: sqlite3.Connection, path: str) -> bool:
    """Whether the lab's schema is to be made (a new database: no tables, or only the MLflow
    outbox's) or brought up to date (a lab of an older version; 0: made before the version
    was kept); False for a lab of this version. Only reads.

    Anything else is refused before the store writes to it (the schema, the version and the
    switch to WAL all write): a lab's path may name another application's SQLite file (an
    MLflow database opened by mistake), and a newer thunderline-lab's lab must not be
    stamped with this version.

    Raises:
        StoreError: not a lab, or a lab of a newer version.
    """
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    # (type, name, table): an index or trigger names the table it belongs to
    found = [
        row
        for row in conn.execute("SELECT type, name, tbl_name FROM sqlite_master").fetchall()
        if not row[1].startswith("sqlite_")  # SQLite's own: sequences, statistics
    ]
    tables = sorted({table for _, _, table in found})
    expected = _schema_columns()
    unlike = [t for t in tables if t in expected and _columns(conn, t) != expected[t]]
    if version == SCHEMA_VERSION and "events" in tables and not unlike:
        return False
    # an old lab's log, or only tables a lab holds (none: a new database)
    lab = "events" in tables or set(tables) <= expected.keys() | _OUTBOX_TABLES
    if 0 <= version < SCHEMA_VERSION and lab and not unlike:
        return True
    if version > SCHEMA_VERSION and "events" in tables:
        raise StoreError(
            f"{path}: written by a newer thunderline-lab (store format {version}; this "
            f"version reads {SCHEMA_VERSION}); nothing was changed"
        )
    held = f"tables {', '.join(tables[:8])}" if tables else "no tables"
    if len(tables) > 8:
        held += f", ... ({len(tables)} in all)"
    if unlike:
        held += f"; columns of {', '.join(unlike)} differ from the store's"
    raise StoreError(
        f"{path}: not a thunderline-lab trial store (it holds {held}; user_version "
        f"{version}); nothing was changed"
    )


def _create_schema(conn: sqlite3.Connection, path: str) -> None:
    # Checked again under the write lock: another process may have just done it.
    if _needs_schema(conn, path):
        _run_schema(conn)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def format_ts(event: Event) -> str:
    """The event's timestamp as fixed-width UTC text (sorts as it compares)."""
    return _format_dt(event.timestamp)


_ENCODE_JSON = msgspec.json.Encoder().encode


def _format_dt(ts: datetime) -> str:
    text = _ENCODE_JSON(ts)  # '"2026-11-22T12:34:56.789000Z"' for UTC with microseconds
    if len(text) == 29 and text[27] == 90:  # ord("Z"): already the fixed-width form
        return text[1:28].decode()
    if ts.utcoffset():
        ts = ts.astimezone(UTC)
    return ts.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _format_stamps(stamps: Sequence[datetime]) -> list[str]:
    """``_format_dt`` of many timestamps: one msgspec encode and decode of the whole list
    (UTC stamps with microseconds come out fixed-width already: 27 characters)."""
    texts = msgspec.json.decode(_ENCODE_JSON(stamps), type=list[str])
    if set(map(len, texts)) == {27}:
        return texts
    return [t if len(t) == 27 else _format_dt(ts) for t, ts in zip(texts, stamps, strict=True)]


def _ids_of(payload: Any) -> tuple[str | None, str | None]:
    if isinstance(payload, Mapping):  # a record, or a GenericEvent's free-form payload
        run_id, trial_id = payload.get("model_run_id"), payload.get("trial_id")
        return (
            run_id if isinstance(run_id, str) else None,
            trial_id if isinstance(trial_id, str) else None,
        )
    return payload.model_run_id, payload.trial_id


def _projection_row(ev_id: str, name: str, ts: str, p: Any) -> _Row:
    """What the projections read of an ``ml.*`` event's payload (a mapping or a model)."""
    if isinstance(p, Mapping):
        get = p.get
        return (
            ev_id,
            name,
            ts,
            get("model_run_id"),
            get("trial_id"),
            get("study"),
            get("artifact_uri"),
            get("metric_name"),
        )
    return (
        ev_id,
        name,
        ts,
        p.model_run_id,
        p.trial_id,
        p.study,
        getattr(p, "artifact_uri", None),
        getattr(p, "metric_name", None),
    )


@dataclass(frozen=True)
class AppendResult:
    """What :meth:`TrialStore.append` did: new events, duplicates skipped, their ids."""

    accepted: int
    duplicates: int
    ids: list[str] = field(repr=False)
    last_seq: int


# One logged ``ml.*`` event as the projections need it (same shape live and on replay):
# (event id, name, formatted timestamp, model_run_id, trial_id, study, artifact_uri,
# metric_name). A metric event's points are projected from the log in SQL; its single
# ``metric_name`` only says whether that statement has anything to find.
_Row = tuple[str, str, str, Any, Any, Any, Any, Any]


# An event ready to log: its events-table row, and its projection row (None outside ml.*).
_Pending = tuple[tuple[Any, ...], _Row | None]


def _unique(items: Sequence[Any], id_of: Any) -> tuple[Sequence[Any], list[int]]:
    """First occurrence of each event id, and each one's index in the batch."""
    if len(set(map(id_of, items))) == len(items):  # the usual batch: no repeated id
        return items, list(range(len(items)))
    seen: set[str] = set()
    out, position = [], []
    for i, item in enumerate(items):
        ev_id = id_of(item)
        if ev_id not in seen:
            seen.add(ev_id)
            out.append(item)
            position.append(i)
    return out, position


# A later record of a batch whose id an earlier one has, with other content: (its index,
# the id, the first record's index, the first record's content, its content).
_Variant = tuple[int, str, int, dict[str, Any], dict[str, Any]]


@dataclass(frozen=True, eq=False)
class PreparedBatch:
    """A batch validated and serialised by :meth:`TrialStore.prepare`, ready to append."""

    items: list[Any] = field(repr=False)  # the records as given (errors index them)
    pending: list[_Pending] = field(repr=False)  # one row pair per distinct event id
    variants: list[_Variant] = field(repr=False)  # repeated ids with other content

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    def join(cls, batches: Sequence[PreparedBatch]) -> PreparedBatch | None:
        """The batches as one (for one transaction), or None when an event id is in more
        than one of them: such a group must be prepared again as one batch, so that the
        repeats are skipped (or their differences found) as within a batch."""
        if len(batches) == 1:
            return batches[0]
        pending = [p for b in batches for p in b.pending]
        if len({p[0][0] for p in pending}) < len(pending):
            return None
        items = [item for b in batches for item in b.items]
        variants: list[_Variant] = []
        offset = 0
        for b in batches:
            variants += [
                (i + offset, ev_id, j + offset, first, content)
                for i, ev_id, j, first, content in b.variants
            ]
            offset += len(b.items)
        return cls(items, pending, variants)


def _variants(items: Sequence[Any]) -> list[_Variant]:
    """The batch's repeated ids that come with other content than their first record's.

    Which record is wrong is decided in the transaction: the one that differs from the
    logged event if the id is logged already, else the later one.
    """
    first: dict[str, int] = {}
    out: list[_Variant] = []
    for i, item in enumerate(items):
        ev_id = _item_id(item)
        if ev_id is None:
            continue
        j = first.setdefault(ev_id, i)
        if j != i:
            before, content = _content(items[j]), _content(item)
            if _difference(before, content) is not None:
                out.append((i, ev_id, j, before, content))
    return out


def _content(item: Any) -> dict[str, Any]:
    """An event's name and payload as plain JSON values (a record, a struct or a model)."""
    if isinstance(item, Mapping):
        return {"name": item.get("name"), "payload": item.get("payload")}
    if isinstance(item, Event):  # a generic event's payload is a plain dict already
        return {"name": item.name, "payload": to_jsonable_python(item.payload)}
    return {"name": item.name, "payload": msgspec.to_builtins(item.payload)}


def _plain(value: Any) -> Any:
    """``value`` without the empty fields two encoders may write or leave out (None, {}, [])."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items() if v is not None and v != {} and v != []}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _difference(a: Any, b: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """The first field where two events' contents differ: (path, a's value, b's value)."""
    a, b = _plain(a), _plain(b)
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys()):
            found = _difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
            if found is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _difference(x, y, f"{path}[{k}]")
            if found is not None:
                return found
        return None
    same = a == b and (type(a) is type(b) or _both_numbers(a, b))
    return None if same else (path, a, b)


def _both_numbers(a: Any, b: Any) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in (a, b))


def _conflict(index: int, ev_id: str, found: tuple[str, Any, Any], where: str) -> ErrorDetail:
    path, before, now = found
    shown = "absent" if before is None else _shown(before)
    return ErrorDetail(
        index,
        path or "id",
        now,
        "id_conflict",
        f"event id {ev_id!r} already names another event ({where} has {path or 'it'} = "
        f"{shown}): an id names one event, send a new event with a new id",
    )


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


class _Conflicts(Exception):
    """Ids of a batch that name other events: (index or None for the id's first record,
    id, (path, other value, this value), where the other event is)."""

    def __init__(self, found: list[tuple[int | None, str, tuple[str, Any, Any], str]]) -> None:
        super().__init__(f"{len(found)} conflicting ids")
        self.found = found


class _TrialConflicts(Exception):
    """Events of a batch that contradict what their trial's logged events state:
    (event id, path, the value given, the rule, the message)."""

    def __init__(self, found: list[tuple[str, str, Any, str, str]]) -> None:
        super().__init__(f"{len(found)} events contradict their trials")
        self.found = found


# What a trial is, stated by its lifecycle events: once stated, a later event of the trial
# may repeat it but not change it (a trial does not change arm, SN coefficient or study).
CONFLICT_RULES = frozenset({"id_conflict", "trial_conflict", "trial_finished"})
"""The rules of an :class:`~thunderline_lab.events.EventConflictError`: events that are
valid alone but contradict what the store holds (HTTP 409 at the gateway)."""
_TRIAL_IDENTITY = ("spectral_norm", "spectral_norm_coeff", "study")
_TERMINAL_TRIAL_EVENTS = frozenset({"ml.trial.complete", "ml.trial.failed"})


def _trial_conflicts(
    bodies: Mapping[tuple[str, str], list[tuple[int, dict[str, Any]]]], after_seq: int
) -> list[tuple[str, str, Any, str, str]]:
    """The events logged after ``after_seq`` (this append's) that contradict an earlier
    logged event of their trial, each trial's events taken in log order:

    * ``trial_finished``: a ``ml.trial.complete``/``ml.trial.failed`` with another status
      than the trial finished with (completed, then failed; failed, then completed): the
      outcome of a trial does not change. The same status again with other values (a late
      evaluation's metrics) is a correction, folded in as any later event;
    * ``trial_conflict``: a stated ``spectral_norm``, ``spectral_norm_coeff`` or
      ``study`` other than the one an earlier event stated; or, once the trial finished, a
      ``study`` or ``spectral_norm_coeff`` its events had not stated (a finished trial is
      filed under its run's study, with its parameters' coefficient or none).

    The log itself is never judged again: a replay folds whatever it holds.
    """
    found: list[tuple[str, str, Any, str, str]] = []
    for (run_id, trial_id), events in bodies.items():
        where = f"trial {run_id}/{trial_id}"
        stated: dict[str, tuple[Any, str]] = {}
        finished: tuple[str, str, str] | None = None  # (status, event id, its timestamp)
        params_coeff: Any = None  # the coefficient the trial's parameters give, if any
        for seq, body in sorted(events, key=lambda e: e[0]):
            p, name, ev_id = body["payload"], body["name"], body["id"]
            fresh = seq > after_seq
            for key in _TRIAL_IDENTITY:
                value = p.get(key)
                if value is None:
                    continue
                if key not in stated:
                    stated[key] = (value, ev_id)
                    moved = (
                        value != run_id
                        if key == "study"
                        else key == "spectral_norm_coeff"
                        and _difference(params_coeff, value) is not None
                    )
                    if fresh and moved and finished is not None and _ts(body) > finished[2]:
                        # a finished trial filed without it (under its run's study, with
                        # no coefficient or its parameters'): stating it in an event after
                        # the finish would move the trial after the fact (an event from
                        # before it, delivered late, is only out of order)
                        found.append(
                            (
                                ev_id,
                                f"payload.{key}",
                                value,
                                "trial_conflict",
                                f"{where} finished (event {finished[1]}) without "
                                + (
                                    "a study: it is filed under its run's study"
                                    if key == "study"
                                    else "this spectral_norm_coeff"
                                )
                                + "; a finished trial keeps what it was logged with; log "
                                "another setting as a new trial",
                            )
                        )
                elif fresh and _difference(stated[key][0], value) is not None:
                    # (the comparison of an id's resend: 2 and 2.0 agree, True and 1 do not)
                    before, by = stated[key]
                    found.append(
                        (
                            ev_id,
                            f"payload.{key}",
                            value,
                            "trial_conflict",
                            f"{where} is logged with {key} = {_shown(before)} (event {by}): "
                            "a trial keeps what it was started with; log another setting as "
                            "a new trial",
                        )
                    )
            parameters = p.get("parameters")
            if isinstance(parameters, Mapping) and params_coeff is None:
                params_coeff = parameters.get("spectral_norm_coeff")
            if name in _TERMINAL_TRIAL_EVENTS:
                status = p.get("status", "completed") if name == "ml.trial.complete" else "failed"
                if finished is None:
                    finished = (status, ev_id, _ts(body))
                elif fresh and status != finished[0]:
                    found.append(
                        (
                            ev_id,
                            "name" if name == "ml.trial.failed" else "payload.status",
                            name if name == "ml.trial.failed" else status,
                            "trial_finished",
                            f"{where} already finished as {finished[0]} (event "
                            f"{finished[1]}): its outcome does not change to {status}; run "
                            "it again as a new trial",
                        )
                    )
    return found


def _body_content(body: str) -> dict[str, Any]:
    event = json.loads(body)
    return {"name": event.get("name"), "payload": event.get("payload")}


def _item_id(item: Any) -> Any:
    return item.get("id") if isinstance(item, Mapping) else getattr(item, "id", None)


def _unserializable(errors: list[tuple[int, Exception]]) -> EventValidationError:
    return EventValidationError(
        [
            ErrorDetail(i, "", None, "unserializable", f"cannot be written as JSON: {exc}")
            for i, exc in errors
        ]
    )


def _pending_from_records(records: Sequence[dict[str, Any]]) -> list[_Pending]:
    unique, position = _unique(records, itemgetter("id"))
    out: list[_Pending] = []
    errors: list[tuple[int, Exception]] = []
    for i, r in zip(position, unique, strict=True):
        try:
            body = to_json(r).decode()
        except (ValueError, PydanticSerializationError) as exc:
            errors.append((i, exc))
            continue
        p, name = r["payload"], r["name"]
        ts = _format_dt(r["timestamp"])
        run_id, trial_id = _ids_of(p)
        row = _projection_row(r["id"], name, ts, p) if name.startswith("ml.") else None
        out.append(((r["id"], name, ts, run_id, trial_id, body), row))
    if errors:
        raise _unserializable(errors)
    return out


def _pending_from_fast(events: Sequence[Any]) -> list[_Pending] | None:
    """Rows of events validated by :func:`events.fast_events` (None: one cannot be written
    as JSON; the models then name it).

    Built column by column with ``map`` and ``zip`` (no per-event Python statement): every
    struct is an ``ml.*`` event with a typed payload.
    """
    unique, _ = _unique(events, _ID_OF)
    try:
        bodies = encode_fast_all(unique)
    except (msgspec.EncodeError, TypeError, ValueError, OverflowError):
        return None
    payloads = list(map(_PAYLOAD_OF, unique))
    ids, names = list(map(_ID_OF, unique)), list(map(_NAME_OF, unique))
    stamps = _format_stamps(list(map(_TIMESTAMP_OF, unique)))
    runs, trials = list(map(_RUN_OF, payloads)), list(map(_TRIAL_OF, payloads))
    studies = list(map(_STUDY_OF, payloads))
    kinds = set(map(type, payloads))
    artifacts: list[str | None] = [None] * len(payloads)
    if not _WITH_ARTIFACT.isdisjoint(kinds):
        artifacts = [getattr(p, "artifact_uri", None) for p in payloads]
    singles: list[str | None] = [None] * len(payloads)
    if _METRIC_PAYLOAD in kinds:
        singles = [getattr(p, "metric_name", None) for p in payloads]
    logged = zip(ids, names, stamps, runs, trials, bodies, strict=True)
    rows = zip(ids, names, stamps, runs, trials, studies, artifacts, singles, strict=True)
    return list(zip(logged, rows, strict=True))


_ID_OF, _NAME_OF, _TIMESTAMP_OF = attrgetter("id"), attrgetter("name"), attrgetter("timestamp")
_PAYLOAD_OF, _STUDY_OF = attrgetter("payload"), attrgetter("study")
_RUN_OF, _TRIAL_OF = attrgetter("model_run_id"), attrgetter("trial_id")
_WITH_ARTIFACT = frozenset(
    t for t in FAST_PAYLOADS.values() if "artifact_uri" in t.__struct_fields__
)
_METRIC_PAYLOAD = FAST_PAYLOADS["ml.run.metric"]
_FAST_TYPES = frozenset(FAST_NAMES)  # the struct types fast_events makes


def _pending_from_events(events: Sequence[Event]) -> list[_Pending]:
    unique, position = _unique(events, attrgetter("id"))
    try:
        bodies = dump_events(unique)
    except EventValidationError as exc:
        raise EventValidationError(
            [replace(e, index=position[e.index or 0]) for e in exc.errors]
        ) from None
    return _pending_rows(unique, bodies)


def _pending_rows(unique: Sequence[Event], bodies: Sequence[str]) -> list[_Pending]:
    """The rows of distinct event objects."""
    out: list[_Pending] = []
    for ev, body in zip(unique, bodies, strict=True):
        ts = _format_dt(ev.timestamp)
        run_id, trial_id = _ids_of(ev.payload)
        row = _projection_row(ev.id, ev.name, ts, ev.payload) if ev.name.startswith("ml.") else None
        out.append(((ev.id, ev.name, ts, run_id, trial_id, body), row))
    return out


_NUDGE_EVENTS = 1000


class _Checkpointer:
    """Copies a lab's WAL back into its database from a thread of its own.

    A writer that checkpoints itself stops appending while it copies the WAL back and
    syncs the database; here the copy runs on another core, ``interval`` seconds after the
    store asks (every ``_NUDGE_EVENTS`` events appended; PASSIVE: it never blocks a writer
    or a reader). The writer's own autocheckpoint stays on at a higher mark, so the WAL
    stays bounded if this thread falls behind.
    """

    def __init__(self, path: str, interval: float = 0.05) -> None:
        self._path = path
        self._interval = interval
        self._wake = threading.Event()
        self._stopping = False
        self.checkpoints = 0  # passes made (for tests and diagnostics)
        self._pid = os.getpid()
        self._thread = threading.Thread(
            target=self._run, name="thunderline-checkpoint", daemon=True
        )
        self._thread.start()

    def alive(self) -> bool:
        """Whether the thread runs in this process (a forked child has none)."""
        return self._pid == os.getpid() and self._thread.is_alive()

    def nudge(self) -> None:
        """A commit added to the WAL: checkpoint soon."""
        self._wake.set()

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        if self.alive():
            self._thread.join()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            log.warning("%s: no background checkpoints: %s", self._path, exc)
            return
        try:
            while True:
                self._wake.wait()
                if self._stopping:
                    return
                time.sleep(self._interval)  # commits meanwhile are copied in one pass
                self._wake.clear()
                if self._stopping:
                    return
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    self.checkpoints += 1
                except sqlite3.Error as exc:  # busy: another process checkpoints
                    log.debug("%s: checkpoint skipped: %s", self._path, exc)
        finally:
            conn.close()


def snapshot_dir(db: str) -> Path | None:
    """The folder of the comparison snapshots of the store at ``db``
    (:mod:`thunderline_lab.compare`): ``cache/compare/`` beside it; None in memory."""
    if db == ":memory:" or not db:
        return None
    return Path(db).resolve().parent / "cache" / "compare"


def _tell_keeper(path: str, studies: set[str], events: int) -> None:
    """Tell the comparison snapshot keeper that ``studies`` of the store at ``path`` changed
    with ``events`` new events (imported here: the keeper's comparison module imports this
    one)."""
    from thunderline_lab import keeper

    keeper.note(path, studies, events)


_INT64_MAX = 2**63 - 1  # SQLite's largest integer


def _whole(name: str, value: Any, least: int) -> int:
    """``value``, a whole number from ``least`` up to SQLite's largest integer.

    Checked before the query: SQLite compares a number with text or NULL without a word
    (no rows), reads ``LIMIT 0`` as none and a negative LIMIT as no limit at all; and a bool
    is no count.

    Raises:
        StoreError: naming the argument.
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        number = int(value)
        if least <= number <= _INT64_MAX:
            return number
        if number > _INT64_MAX:
            raise StoreError(f"{name}: a whole number <= {_INT64_MAX} (got {number})")
    raise StoreError(f"{name}: a whole number >= {least} (got {reprlib.repr(value)})")


def _string(name: str, value: Any) -> str:
    """``value``, a string (a number would match no row without a word).

    Raises:
        StoreError: naming the argument.
    """
    if not isinstance(value, str):
        raise StoreError(f"{name}: a string (got {reprlib.repr(value)})")
    return value


def _strings(name: str, value: Any) -> list[str]:
    """One string, or an iterable of them, as a list (a query's ``IN (...)`` values).

    Raises:
        StoreError: naming the argument, for anything else (a number would match no row).
    """
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, bytes | Mapping):
        values = list(value)
        if all(isinstance(v, str) for v in values):
            return values
    raise StoreError(f"{name}: a string or a list of strings (got {reprlib.repr(value)})")


class TrialStore:
    """The lab's SQLite trial store: append-only event log plus derived tables.

    Args:
        path: the database file (created with its parent folder), or ``":memory:"``.
        timeout: seconds a writer waits for another process's write lock before giving up.

    Raises:
        StoreError: ``path`` is not a path, or ``timeout`` not a number of seconds; or its
            file is not a lab of this version, nor empty (another application's database,
            a newer lab's: it is left unchanged).
    """

    def __init__(
        self, path: str | os.PathLike[str] = ":memory:", *, timeout: float = 120.0
    ) -> None:
        # (str() of anything is a file name: None would open a lab called ./None)
        db = os.fspath(path) if isinstance(path, os.PathLike) else path
        if not isinstance(db, str):
            raise StoreError(
                f"path must be a file path (str or os.PathLike) or ':memory:' (got {path!r})"
            )
        real = isinstance(timeout, numbers.Real) and not isinstance(timeout, bool)
        if not real or not 0 <= float(timeout) < math.inf:  # (NaN compares false)
            raise StoreError(f"timeout: a finite number of seconds >= 0 (got {timeout!r})")
        self.path = db
        self.timeout = float(timeout)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(
                self.path, timeout=timeout, isolation_level=None, check_same_thread=False
            )
            try:
                self._set_up(conn)
            except BaseException:
                conn.close()  # a refused file is not held open either
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the trial store: {exc}") from exc
        self.conn = conn
        self.db = sqlite_utils.Database(conn)
        self._lock = threading.RLock()
        self._checkpointer: _Checkpointer | None = None  # started by the first write
        self._since_nudge = 0
        # studies whose trial rows the current append changed: told to the comparison
        # snapshot keeper once it commits (thunderline_lab.keeper)
        self._touched: set[str] = set()
        self._told = False

    def _set_up(self, conn: sqlite3.Connection) -> None:
        """Tune the connection, and make or update the lab's schema if it needs it.

        Raises:
            StoreError: the file is not a lab of this version (it is left as it was), or
                another process kept it locked.
        """
        # (SQLite takes a 32-bit count of ms and reads a larger one as 0: no wait at all)
        conn.execute(f"PRAGMA busy_timeout = {min(int(self.timeout * 1000), 2**31 - 1)}")
        # 8 KiB pages for a new lab (an existing one keeps its own): half as many page
        # splits and WAL frames per batch; about 1.2x the committed append rate here
        # (benchmarks/bench_core.py), where 16 KiB measured no better.
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        # What the file holds is looked at before anything is written to it (the switch to
        # WAL writes too), waiting like a writer while another process creates the lab.
        needs_schema = _while_busy(lambda: _needs_schema(conn, self.path), self.path, self.timeout)
        if self.path != ":memory:":
            # Switching a new lab to WAL needs its exclusive lock, and SQLite answers
            # "locked" at once, without its busy timeout, while another process is
            # still creating the lab's tables: wait for it like any writer.
            _while_busy(lambda: conn.execute("PRAGMA journal_mode = WAL"), self.path, self.timeout)
        conn.execute("PRAGMA synchronous = NORMAL")
        # The WAL is copied back by a thread of this store's (``_Checkpointer``) after
        # commits; the writer checkpoints itself only past 64 MB, if that thread lags.
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
        # A lab whose schema is current is opened without taking the write lock, so
        # reading (`trials`, a monitor, a report) never waits for a writer's commit.
        if needs_schema:
            self._with_write_lock(lambda: _create_schema(conn, self.path), conn)

    # -- connection plumbing --------------------------------------------------------------

    def close(self) -> None:
        """Close the database connection (after the background checkpointer, if any)."""
        with self._lock:
            if self._checkpointer is not None:
                self._checkpointer.close()
                self._checkpointer = None
            self.conn.close()

    def _after_commit(self, appended: int) -> None:
        # Checkpoint after every _NUDGE_EVENTS events: each bulk batch, while a stream of
        # single-event commits (the gateway's) is not interrupted by a sync every 50 ms.
        if self.path == ":memory:":
            return
        self._since_nudge += appended
        if self._since_nudge < _NUDGE_EVENTS:
            return
        self._since_nudge = 0
        if self._checkpointer is None or not self._checkpointer.alive():
            self._checkpointer = _Checkpointer(self.path)
        self._checkpointer.nudge()

    def __enter__(self) -> TrialStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _with_write_lock(self, fn: Any, conn: sqlite3.Connection | None = None) -> Any:
        """Run ``fn`` in one ``BEGIN IMMEDIATE`` transaction, retrying while the lab is busy."""
        conn = conn or self.conn
        _while_busy(lambda: conn.execute("BEGIN IMMEDIATE"), self.path, self.timeout)
        try:
            result = fn()
            conn.execute("COMMIT")
            return result
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # -- writing --------------------------------------------------------------------------

    def append(self, events: Iterable[Event | Mapping[str, Any]]) -> AppendResult:
        """Validate, skip duplicates (by event id), append and project, in one transaction.

        Parsed JSON (dicts) takes the ingest fast path (:func:`events.fast_events`, else
        the models); event objects and fast-path structs are already valid and are only
        serialised. The same as ``append_prepared(prepare(events))``.

        Raises:
            EventValidationError: if any event is invalid; nothing is written then.
            EventConflictError: an event's id already names another event (logged, or
                earlier in the batch) with another name or payload; nothing is written.
            StoreError: ``events`` is not an iterable of events (one event, say), or the
                database cannot be written.
        """
        return self.append_prepared(self.prepare(events))

    def prepare(self, events: Iterable[Event | Mapping[str, Any]]) -> PreparedBatch:
        """Validate and serialise a batch for :meth:`append_prepared`, without touching the
        database: the CPU work of an append, which a writer can leave to other threads
        (the gateway prepares each request as it parses it, so its one writer thread only
        runs transactions).

        Raises:
            EventValidationError: if any event is invalid.
            StoreError: ``events`` is not an iterable of events.
        """
        # one event (a model iterates as its fields), a record (its keys) or text (its
        # characters) would otherwise be taken as a batch and refused item by item
        if (
            isinstance(events, str | bytes | Mapping | Event)
            or is_fast(events)
            or not isinstance(events, Iterable)
        ):
            raise StoreError(
                f"append takes a list (an iterable) of events, got {type(events).__name__}"
            )
        items = list(events)
        with gc_paused():  # CPU-bound batch work only: never while waiting for the lock
            kinds = set(map(type, items))  # one C pass; ABC checks only for other types
            if kinds <= {dict} or all(isinstance(e, Mapping) for e in items):
                fast = fast_events(items)
                pending = _pending_from_fast(fast) if fast is not None else None
                if pending is None:
                    pending = _pending_from_records(validate_records(items))
            else:  # event objects, or fast-path structs already validated (the gateway's)
                pending = _pending_from_fast(items) if kinds <= _FAST_TYPES else None
                if pending is None:  # mixed, or a struct cannot be written: the models name it
                    objects = [to_event(e) if is_fast(e) else e for e in items]
                    pending = _pending_from_events(validate_events(objects))
            # repeated ids (a retried batch sent twice over): their records must agree
            variants = _variants(items) if len(pending) < len(items) else []
        return PreparedBatch(items, pending, variants)

    def append_prepared(self, batch: PreparedBatch) -> AppendResult:
        """Append a batch made by :meth:`prepare` (of this store or another) in one
        transaction: duplicates (by event id) skipped, the rest logged and projected.

        Raises:
            EventConflictError: an event's id already names another event (logged, or
                earlier in the batch) with another name or payload; nothing is written.
            StoreError: if the database cannot be written.
        """
        items, pending, variants = batch.items, batch.pending, batch.variants
        with self._lock:
            try:
                result = self._with_write_lock(
                    lambda: self._append_locked(pending, len(items), variants)
                )
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: append failed: {exc}") from exc
            except _Conflicts as exc:  # rolled back: nothing of the batch is written
                ids = list(map(_item_id, items))
                errors = [
                    _conflict(ids.index(ev_id) if i is None else i, ev_id, found, where)
                    for i, ev_id, found, where in exc.found
                ]
                raise EventConflictError(sorted(errors, key=lambda e: e.index or 0)) from None
            except _TrialConflicts as exc:  # rolled back: nothing of the batch is written
                ids = list(map(_item_id, items))
                errors = [
                    ErrorDetail(ids.index(ev_id), path, value, rule, message)
                    for ev_id, path, value, rule, message in exc.found
                ]
                raise EventConflictError(sorted(errors, key=lambda e: e.index or 0)) from None
            self._after_commit(result.accepted)
            # the keeper hears of every append once one changed trial rows: a stream of
            # metric points moves the snapshots' watermarks on too
            if (self._touched or self._told) and self.path != ":memory:":
                touched, self._touched = self._touched, set()
                self._told = True
                _tell_keeper(self.path, touched, result.accepted)
            return result

    def _append_locked(
        self, pending: list[_Pending], n_in: int, variants: Sequence[_Variant] = ()
    ) -> AppendResult:
        self._touched = set()  # a rolled-back attempt's studies are not told
        # INSERT OR IGNORE skips ids already logged; what this transaction added is exactly
        # the rows after the previous highest seq (the write lock is held).
        before = self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
        if self._insert_events([p[0] for p in pending]) == len(pending):
            fresh = pending
            if variants:
                self._check_duplicates([], variants)
        else:
            added = {
                ev_id
                for (ev_id,) in self.conn.execute("SELECT id FROM events WHERE seq > ?", (before,))
            }
            fresh = [p for p in pending if p[0][0] in added]
            self._check_duplicates([p[0] for p in pending if p[0][0] not in added], variants)
        last_seq = self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
        with gc_paused():
            rows = [p[1] for p in fresh if p[1] is not None]
            # the lifecycle events of the trials this append gives one: checked against what
            # their trials' logged events state, then folded (read once for both)
            lifecycle = self._lifecycle_bodies(
                list(dict.fromkeys((r[3], r[4]) for r in rows if r[1] in LIFECYCLE_EVENTS))
            )
            conflicts = _trial_conflicts(lifecycle, before)
            if conflicts:
                raise _TrialConflicts(conflicts)  # rolled back with the whole transaction
            self._project(rows, before, last_seq, lifecycle)
        ids = [p[0][0] for p in fresh]
        return AppendResult(len(fresh), n_in - len(fresh), ids, last_seq)

    def _insert_events(self, rows: Sequence[tuple[Any, ...]]) -> int:
        """INSERT OR IGNORE the rows into the log; returns how many were inserted.

        Many rows per statement, not one statement per row: sqlite3 lets go of the GIL
        once per statement, so a gateway's other threads parse the next requests on the
        other core while the log is written, instead of taking turns with the writer at
        every row (measured: 48,000 → 56,000 events/s through the gateway).
        """
        inserted = 0
        for chunk in _chunks(rows, _INSERT_ROWS):
            sql = _insert_events_sql(len(chunk))
            inserted += self.conn.execute(sql, list(chain.from_iterable(chunk))).rowcount
        return inserted

    def _check_duplicates(
        self, logged_rows: Sequence[tuple[Any, ...]], variants: Sequence[_Variant]
    ) -> None:
        """Raise :class:`_Conflicts` if a batch's id names another event than the logged
        one, or (an id new to the log) than the batch's first record with it.

        Only batches with duplicates pay for this (a retried post, a replayed spool): the
        logged bodies of their ids are read back and compared field by field.
        """
        found: list[tuple[int | None, str, tuple[str, Any, Any], str]] = []
        logged: dict[str, str] = {}
        for i in range(0, len(logged_rows), 500):
            chunk = logged_rows[i : i + 500]
            logged.update(
                self.conn.execute(
                    f"SELECT id, body FROM events WHERE id IN ({', '.join('?' * len(chunk))})",
                    [r[0] for r in chunk],
                ).fetchall()
            )
        for row in logged_rows:
            ev_id, body = row[0], row[5]
            if logged[ev_id] != body:  # the same text is the same event: the usual resend
                diff = _difference(_body_content(logged[ev_id]), _body_content(body))
                if diff is not None:
                    found.append((None, ev_id, diff, "the logged event"))
        for index, ev_id, first, first_content, content in variants:
            if ev_id in logged:
                diff = _difference(_body_content(logged[ev_id]), content)
                where = "the logged event"
            else:  # the batch's first record of the id was logged now
                diff = _difference(first_content, content)
                where = f"record {first} of this batch"
            if diff is not None:
                found.append((index, ev_id, diff, where))
        if found:
            raise _Conflicts(found)

    def _project(
        self,
        rows: Sequence[_Row],
        after_seq: int,
        upto_seq: int,
        lifecycle: Mapping[tuple[str, str], list[tuple[int, dict[str, Any]]]] | None = None,
    ) -> None:
        """Project logged events into the derived tables (shared by append and replay).

        ``rows`` are the ``ml.*`` events logged with sequence numbers in
        ``(after_seq, upto_seq]``; their metric points are projected in SQL from the log.
        ``lifecycle`` holds the logged lifecycle events of trials already read
        (:meth:`_lifecycle_bodies`), which are not read again.
        """
        runs: dict[str, list[Any]] = {}
        # trials in order of first appearance: a new trial's row is created (its rowid
        # given) in log order, so the table's order does not depend on how the log was
        # cut into batches (an append's or a replay's)
        trials: dict[tuple[str, str], None] = {}
        artifact_rows = []
        any_metric = any_single = False
        for ev_id, ev_name, ts, run_id, trial_id, study, artifact_uri, single in rows:
            r = runs.get(run_id)
            if r is None:
                runs[run_id] = [run_id, study, ts, ts]
            else:
                r[1] = r[1] or study
                if ts < r[2]:
                    r[2] = ts
                elif ts > r[3]:
                    r[3] = ts
            if ev_name == "ml.run.metric":
                any_metric = True
                any_single = any_single or single is not None
            else:
                trials[run_id, trial_id] = None
                if artifact_uri:
                    kind = "trial" if ev_name.startswith("ml.trial.") else "run"
                    artifact_rows.append((run_id, trial_id, artifact_uri, kind, ts, ev_id))
        if any_single:
            self.conn.execute(_PROJECT_SINGLE_METRICS, (after_seq, upto_seq))
            self.conn.execute(_PROJECT_MEASUREMENTS, (after_seq, upto_seq))
        elif any_metric:  # no single metric in the range: nothing for it to override
            self.conn.execute(_PROJECT_ONLY_MEASUREMENTS, (after_seq, upto_seq))
        if runs:
            self.conn.executemany(_UPSERT_RUN, list(runs.values()))
        if artifact_rows:
            self.conn.executemany(_UPSERT_ARTIFACT, artifact_rows)
        if trials:
            keys = list(trials)
            if lifecycle is None:  # (a replay: read here; an append read them to check them)
                lifecycle = self._lifecycle_bodies(keys)
            self._refold_trials(keys, lifecycle)

    def _lifecycle_bodies(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], list[tuple[int, dict[str, Any]]]]:
        """The logged lifecycle events of each trial of ``keys``: (seq, parsed body). A few
        statements for many trials, not a few per trial (sqlite3 lets go of the GIL once
        per statement)."""
        bodies: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = {k: [] for k in keys}
        for chunk in _chunks(keys, _REFOLD_TRIALS):
            cur = self.conn.execute(_lifecycle_sql(len(chunk)), list(chain.from_iterable(chunk)))
            for run_id, trial_id, body, seq in cur:
                bodies[run_id, trial_id].append((seq, json.loads(body)))
        return bodies

    def _refold_trials(
        self,
        keys: Sequence[tuple[str, str]],
        lifecycle: Mapping[tuple[str, str], list[tuple[int, dict[str, Any]]]],
    ) -> None:
        """Fold each trial's logged lifecycle events (``lifecycle``: of every key, as
        :meth:`_lifecycle_bodies` reads them) into its row, in the order given (a new trial's
        row is created in that order)."""
        rows = []
        for key in keys:
            run_id = key[0]
            row = fold_trial(body for _, body in lifecycle[key])
            if row["study"] is None:
                known = self.conn.execute(
                    "SELECT study FROM model_runs WHERE model_run_id = ?", (run_id,)
                ).fetchone()
                row["study"] = (known and known[0]) or run_id
            rows.append([row[c] for c in TRIAL_COLUMNS])
            self._touched.add(row["study"])
        for chunk in _chunks(rows, _REFOLD_TRIALS):
            self.conn.execute(_upsert_trials_sql(len(chunk)), list(chain.from_iterable(chunk)))

    def replay(self, batch_size: int = 20_000) -> dict[str, int]:
        """Rebuild every projection from the event log (one transaction).

        Returns:
            Row counts of the rebuilt tables.

        Raises:
            StoreError: ``batch_size`` is not a whole number >= 1 (nothing is changed), or
                the database cannot be written.
        """
        batch_size = _whole("batch_size", batch_size, 1)  # 0 would empty every projection
        with self._lock:
            try:
                self._with_write_lock(lambda: self._replay_locked(batch_size))
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: replay failed: {exc}") from exc
            return self.counts()

    def _replay_locked(self, batch_size: int) -> None:
        for table in _PROJECTIONS:
            self.conn.execute(f"DELETE FROM {table}")
        after = 0
        while True:
            chunk = self.conn.execute(
                "SELECT seq, id, name, timestamp, body FROM events "
                "WHERE seq > ? AND name LIKE 'ml.%' ORDER BY seq LIMIT ?",
                (after, batch_size),
            ).fetchall()
            if not chunk:
                return
            rows = [
                _projection_row(ev_id, name, ts, json.loads(body)["payload"])
                for _seq, ev_id, name, ts, body in chunk
            ]
            self._project(rows, after, chunk[-1][0])
            after = chunk[-1][0]

    # -- reading --------------------------------------------------------------------------

    def _read(self, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
        with self._lock:
            try:
                return pd.read_sql_query(sql, self.conn, params=list(params))
            except (sqlite3.Error, pd.errors.DatabaseError) as exc:
                raise StoreError(f"{self.path}: query failed: {exc}") from exc

    def counts(self) -> dict[str, int]:
        """Row counts of the log and every projection."""
        with self._lock:
            return {
                t: self.conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                for t in ("events", *_PROJECTIONS)
            }

    def last_seq(self) -> int:
        """The sequence number of the newest logged event (0 for an empty store)."""
        with self._lock:
            return int(self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])

    def trials(
        self,
        *,
        study: str | None = None,
        model_run_id: str | None = None,
        status: str | Sequence[str] | None = None,
        spectral_norm: bool | None = None,
        expand: bool = False,
    ) -> pd.DataFrame:
        """Trials as a DataFrame, optionally filtered; ``parameters``/``metrics`` are dicts.

        Args:
            expand: also add one column per metric (``metrics.NAME``) and parameter
                (``params.NAME``).

        Raises:
            StoreError: a filter of the wrong type (it would match no row, or every one).
        """
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("study", study), ("model_run_id", model_run_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(_string(column, value))
        if status is not None:
            statuses = _strings("status", status)
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            params.extend(statuses)
        if spectral_norm is not None:
            if not pd.api.types.is_bool(spectral_norm):
                raise StoreError(f"spectral_norm: True, False or None (got {spectral_norm!r})")
            where.append("spectral_norm = ?")
            params.append(int(spectral_norm))
        if not pd.api.types.is_bool(expand):  # "no" would expand
            raise StoreError(f"expand: True or False (got {expand!r})")
        sql = "SELECT * FROM trials"
        if where:
            sql += " WHERE " + " AND ".join(where)
        df = self._read(sql + " ORDER BY model_run_id, started_at, trial_id", params)
        return _decode_trials(df, expand=expand)

    def trial(self, model_run_id: str, trial_id: str) -> dict[str, Any] | None:
        """One trial as a dict, or None."""
        df = _decode_trials(
            self._read(
                "SELECT * FROM trials WHERE model_run_id = ? AND trial_id = ?",
                (model_run_id, trial_id),
            ),
            expand=False,
        )
        return None if df.empty else _jsonable(df.iloc[0].to_dict())

    def model_runs(self) -> pd.DataFrame:
        """Model runs (studies) with their trial counts by status."""
        return self._read(
            "SELECT r.model_run_id, r.study, r.first_event_at, r.last_event_at, "
            "COUNT(t.trial_id) AS n_trials, "
            "SUM(t.status = 'completed') AS n_completed, SUM(t.status = 'failed') AS n_failed, "
            "SUM(t.status = 'pruned') AS n_pruned, SUM(t.status = 'running') AS n_running "
            "FROM model_runs r LEFT JOIN trials t USING (model_run_id) "
            "GROUP BY r.model_run_id ORDER BY r.first_event_at"
        )

    def metric_history(
        self,
        model_run_id: str,
        trial_id: str | Sequence[str] | None = None,
        name: str | Sequence[str] | None = None,
        *,
        max_points: int | None = None,
    ) -> pd.DataFrame:
        """Metric series (``trial_id, name, step, value``) ordered by trial, name and step.

        Args:
            trial_id: one trial, several (one query for all), or None for every trial.
            name: one metric, several, or None for all.
            max_points: downsample each (trial, metric) curve to at most this many points,
                evenly spaced in steps and always keeping the first and last; a long curve
                is read by index seeks, so the cost grows with ``max_points``, not its length.

        Raises:
            StoreError: an argument of the wrong type (it would match no row), or
                ``max_points`` not a whole number >= 2.
        """
        where: list[str] = ["model_run_id = ?"]
        params: list[Any] = [_string("model_run_id", model_run_id)]
        if max_points is not None:
            max_points = _whole("max_points", max_points, 2)
        for column, value in (("trial_id", trial_id), ("name", name)):
            if value is None:
                continue
            values = _strings(column, value)
            where.append(f"{column} IN ({','.join('?' * len(values))})")
            params.extend(values)
        cond = " AND ".join(where)
        if max_points is None:
            return self._read(
                f"SELECT trial_id, name, step, value FROM metrics WHERE {cond} "
                "ORDER BY trial_id, name, step",
                params,
            )
        with self._lock:
            curves = self.conn.execute(
                f"SELECT trial_id, name, COUNT(*), MIN(step), MAX(step) FROM metrics "
                f"WHERE {cond} GROUP BY trial_id, name",
                params,
            ).fetchall()
            short = [(t, n) for t, n, count, _, _ in curves if count <= max_points]
            rows: list[tuple[Any, ...]] = []
            for i in range(0, len(short), 400):  # whole short curves, many per query
                chunk = short[i : i + 400]
                pairs = " OR ".join("(trial_id = ? AND name = ?)" for _ in chunk)
                rows += self.conn.execute(
                    "SELECT trial_id, name, step, value FROM metrics "
                    f"WHERE model_run_id = ? AND ({pairs})",
                    [model_run_id, *(x for pair in chunk for x in pair)],
                ).fetchall()
            for t, n, count, lo, hi in curves:
                if count > max_points:
                    rows += [
                        (t, n, step, value)
                        for step, value in self.conn.execute(
                            _SEEK_SQL, (model_run_id, t, n, max_points, lo, hi)
                        )
                    ]
        rows.sort(key=lambda r: (r[0], r[1], r[2]))
        return pd.DataFrame(rows, columns=["trial_id", "name", "step", "value"])

    def events_after(
        self, seq: int = 0, limit: int = 1000, *, max_bytes: int | None = None
    ) -> list[dict[str, Any]]:
        """Logged events with sequence number > ``seq`` (oldest first), each with its ``seq``.

        ``max_bytes`` bounds the page by the events' JSON size as well (a page of 10,000
        large events would otherwise all be held at once): the page ends with the event that
        reaches it, and holds at least one event.

        Raises:
            StoreError: ``seq`` is not a whole number >= 0, or ``limit`` or ``max_bytes``
                not one >= 1 (SQLite would quietly answer no page, or every event).
        """
        seq, limit = _whole("seq", seq, 0), _whole("limit", limit, 1)
        if max_bytes is not None:
            max_bytes = _whole("max_bytes", max_bytes, 1)
        with self._lock:
            cur = self.conn.execute(
                "SELECT seq, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
            )
            page: list[dict[str, Any]] = []
            size, limit_bytes = 0, math.inf if max_bytes is None else max_bytes
            for s, b in cur:
                page.append({"seq": s, **json.loads(b)})
                size += len(b)
                if size >= limit_bytes:
                    break
            return page

    def iter_events(self, batch_size: int = 10_000) -> Iterator[dict[str, Any]]:
        """Every logged event in sequence order, read ``batch_size`` at a time.

        Raises:
            StoreError: ``batch_size`` is not a whole number >= 1 (at the call, not at the
                first event).
        """
        return self._iter_events(_whole("batch_size", batch_size, 1))

    def _iter_events(self, batch_size: int) -> Iterator[dict[str, Any]]:
        after = 0
        while True:
            batch = self.events_after(after, batch_size)
            if not batch:
                return
            yield from batch
            after = batch[-1]["seq"]

    def studies(self) -> list[str]:
        """The names of the studies the lab has trials of, sorted."""
        df = self._read("SELECT DISTINCT study FROM trials WHERE study IS NOT NULL ORDER BY 1")
        return [str(s) for s in df["study"]]

    def mean_by_spectral_norm(
        self, metric: str = "val_accuracy", *, study: str | None = None
    ) -> pd.DataFrame:
        """Seed 001's aggregate: mean (and std, count) of a metric by spectral_norm.

        Only completed trials that report the metric count.
        """
        sql = (
            "SELECT spectral_norm, json_extract(metrics, '$.' || ?) AS value FROM trials "
            "WHERE status = 'completed' AND value IS NOT NULL"
        )
        params: list[Any] = [json.dumps(metric)]
        if study is not None:
            sql += " AND study = ?"
            params.append(study)
        df = self._read(sql, params)
        df["spectral_norm"] = df["spectral_norm"].astype(bool)
        out = df.groupby("spectral_norm")["value"].agg(["count", "mean", "std"]).reset_index()
        return out.rename(columns={"count": "n", "mean": f"mean_{metric}", "std": f"std_{metric}"})

    def table(self, name: str) -> pd.DataFrame:
        """A whole projection, sorted by its key (used to compare stores)."""
        if name not in _PROJECTIONS:
            raise StoreError(f"no such table: {name} (expected one of {', '.join(_PROJECTIONS)})")
        keys = {
            "model_runs": "model_run_id",
            "trials": "model_run_id, trial_id",
            "metrics": "model_run_id, trial_id, name, step",
            "artifacts": "model_run_id, trial_id, uri",
        }
        return self._read(f"SELECT * FROM {name} ORDER BY {keys[name]}")


def fold_trial(bodies: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Fold one trial's lifecycle events into its row, independent of arrival order.

    Events are taken in (timestamp, id) order; a later stated value overrides an earlier
    one. A terminal ``ml.trial.*`` status beats one derived from ``ml.run.stop``, which
    beats ``running``.
    """
    ordered = sorted(bodies, key=lambda b: (_ts(b), b["id"]))
    row: dict[str, Any] = dict.fromkeys(TRIAL_COLUMNS)
    params: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    trial_status: str | None = None
    run_status: str | None = None
    run_ended: str | None = None
    for body in ordered:
        p = body["payload"]
        name, ts = body["name"], _ts(body)
        row["model_run_id"], row["trial_id"] = p["model_run_id"], p["trial_id"]
        for key in (
            "study",
            "spectral_norm",
            "spectral_norm_coeff",
            "mlflow_run_id",
            "duration_ms",
            "rank",
            "artifact_uri",
        ):
            if p.get(key) is not None:
                row[key] = p[key]
        params.update(p.get("parameters") or {})
        metrics.update(p.get("metrics") or {})
        if name in ("ml.trial.start", "ml.run.start"):
            row["started_at"] = min(row["started_at"] or ts, ts)
        elif name == "ml.trial.complete":
            trial_status, row["ended_at"] = p.get("status", "completed"), ts
        elif name == "ml.trial.failed":
            trial_status, row["ended_at"] = "failed", ts
            row["error_type"], row["error_message"] = p["error_type"], p["error_message"]
        elif name == "ml.run.stop":
            run_status = "completed" if p.get("success", True) else "failed"
            run_ended = ts
        row["updated_at"] = ts
    row["status"] = trial_status or run_status or "running"
    if trial_status is None and run_status is not None:
        row["ended_at"] = run_ended
    if row["spectral_norm_coeff"] is None and isinstance(
        params.get("spectral_norm_coeff"), int | float
    ):
        row["spectral_norm_coeff"] = float(params["spectral_norm_coeff"])
    if row["spectral_norm"] is not None:
        row["spectral_norm"] = int(row["spectral_norm"])
    row["parameters"] = json.dumps(params, sort_keys=True)
    row["metrics"] = json.dumps(metrics, sort_keys=True)
    return row


def _ts(body: Mapping[str, Any]) -> str:
    ts = body["timestamp"]
    if isinstance(ts, str) and ts.endswith("Z") and len(ts) == 27:
        return ts
    utc = datetime.fromisoformat(ts).astimezone(UTC)  # (strftime's %Y does not pad year 1)
    return utc.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _decode_trials(df: pd.DataFrame, *, expand: bool) -> pd.DataFrame:
    for col in ("parameters", "metrics"):
        df[col] = df[col].map(json.loads) if len(df) else df[col]
    df["spectral_norm"] = df["spectral_norm"].map(lambda v: None if pd.isna(v) else bool(v))
    for col in ("duration_ms", "rank"):
        df[col] = df[col].astype("Int64")
    if expand and len(df):
        metrics = pd.json_normalize(df["metrics"].tolist()).add_prefix("metrics.")
        params = pd.json_normalize(df["parameters"].tolist()).add_prefix("params.")
        df = pd.concat([df.reset_index(drop=True), metrics, params], axis=1)
    return df


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        if hasattr(v, "item") and not isinstance(v, dict | list):
            v = v.item()
        if v is pd.NA or (isinstance(v, float) and v != v):  # pandas' marks of SQL NULL
            v = None
        out[k] = v
    return out


def trial_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows of a :meth:`TrialStore.trials` frame as plain JSON-ready dicts (SQL NULL as
    ``None``), every float kept exactly (``DataFrame.to_json`` rounds to 10 digits)."""
    return [_jsonable(row) for row in df.to_dict("records")]


class StoreWriter:
    """Subscribes a :class:`TrialStore` to a bus and appends events in batches.

    Events are buffered and appended from a background thread every ``interval`` seconds
    (or when ``batch_size`` are waiting), so publishing costs the producer a list append.
    Call :meth:`flush` to commit everything buffered, :meth:`close` at the end. An append
    failure is logged and the batch kept for the next attempt; an event the store refuses
    is dropped and logged alone, never its batch: events never get lost silently while the
    process lives.
    """

    def __init__(
        self,
        store: TrialStore,
        bus: EventBus,
        *,
        pattern: str = "*",
        batch_size: int = 2000,
        interval: float = 0.25,
        background: bool = True,
    ) -> None:
        self.store = store
        self.bus = bus
        self.batch_size = batch_size
        self.interval = interval
        self._buffer: list[Event] = []
        self._cond = threading.Condition()
        self._flush_lock = threading.Lock()
        self._closed = False
        self.errors = 0
        self.appended = 0
        self._sub: Subscription = bus.subscribe(pattern, self._on_event, name="StoreWriter")
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name="thunderline-store", daemon=True)
            self._thread.start()

    def _on_event(self, event: Event) -> None:
        with self._cond:
            self._buffer.append(event)
            if len(self._buffer) >= self.batch_size:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._closed and len(self._buffer) < self.batch_size:
                    self._cond.wait(self.interval)
                closed = self._closed
            self.flush(raise_errors=False)
            if closed:
                return

    def flush(self, *, raise_errors: bool = True) -> int:
        """Append everything buffered now; returns how many events were new.

        An event the store refuses (invalid, not storable as JSON, or an id that names
        another event) is dropped and reported on its own: the rest of its batch is
        appended all the same.

        Raises:
            EventValidationError: (``raise_errors``) events were dropped; the errors name
                each by its index in the flushed batch. The others were appended.
            Exception: (``raise_errors``) the append failed; the batch is kept for the
                next flush (less any events dropped, which are logged).
        """
        with self._flush_lock:
            with self._cond:
                batch, self._buffer = self._buffer, []
            if not batch:
                return 0
            refused: list[ErrorDetail] = []
            try:
                accepted = self._append_storable(batch, refused)
            except Exception:
                self.errors += 1
                dropped = {e.index for e in refused}
                kept = [ev for i, ev in enumerate(batch) if i not in dropped]
                with self._cond:
                    self._buffer[:0] = kept  # keep them for the next attempt
                if refused:
                    self._report(batch, refused)
                log.exception("store writer could not append %d events; will retry", len(kept))
                if raise_errors:
                    raise
                return 0
            self.appended += accepted
            if refused:
                self.errors += 1
                error = self._report(batch, refused)
                if raise_errors:
                    raise error
            return accepted

    def _append_storable(self, batch: list[Event], refused: list[ErrorDetail]) -> int:
        """Append the events of ``batch`` that the store takes, in one transaction; returns
        how many were new. Why each other one was refused is added to ``refused`` (indexed
        in ``batch``).

        A good batch costs one append; a refused one, another append per round of refusals
        (the store's errors name the records to leave out), never one per event.
        """
        keep = list(range(len(batch)))  # the batch's index of each event still to append
        while keep:
            try:
                return self.store.append([batch[i] for i in keep]).accepted
            except EventValidationError as exc:
                bad = {e.index for e in exc.errors}
                if not bad or not bad <= set(range(len(keep))):  # not said which: one by one
                    accepted = 0
                    for i in keep:
                        try:
                            accepted += self.store.append([batch[i]]).accepted
                        except EventValidationError as one:
                            refused += [replace(e, index=i) for e in one.errors]
                    return accepted
                refused += [replace(e, index=keep[e.index or 0]) for e in exc.errors]
                keep = [k for j, k in enumerate(keep) if j not in bad]
        return 0

    @staticmethod
    def _report(batch: list[Event], refused: list[ErrorDetail]) -> EventValidationError:
        """Log the events dropped from ``batch``, each by its index, what is wrong and its
        id (the batch is gone after); the error to raise for them (an
        :class:`EventConflictError` if only ids clashed)."""
        log.error(
            "store writer dropped %d invalid events of %d (the others were kept): %s",
            len({e.index for e in refused}),
            len(batch),
            "; ".join(f"{e.line()} (event id {_item_id(batch[e.index or 0])})" for e in refused),
        )
        conflicts = all(e.rule in CONFLICT_RULES for e in refused)
        return (EventConflictError if conflicts else EventValidationError)(refused)

    def close(self) -> None:
        """Stop listening, flush what is buffered and end the background thread."""
        self.bus.unsubscribe(self._sub)
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        self.flush()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""ML events: the canonical envelope, the six ``ml.*`` payloads, constructors and validation.

Every fact of a study enters the lab as one of these events (seed 000's taxonomy)::

    ml.run.start       a training run of a trial began           priority high
    ml.run.metric      metrics at a step (one, or a map)          priority normal
    ml.run.stop        the training run ended                    priority high
    ml.trial.start     an Optuna trial began                      priority high
    ml.trial.complete  a trial ended: completed/pruned/cancelled  priority high
    ml.trial.failed    a trial failed (error_type, error_message) priority high

All route to the ``realtime`` pipeline. Names outside ``ml.*`` must carry one of the
reserved prefixes (``system. reactor. ui. audit. evt. ml. ai. flow. grid.``); such
events are kept in the log with a free-form payload but project nothing.

Constructors are strict (a string where an int belongs is an error); leniency for other
producers' wire formats lives in :mod:`thunderline_lab.wire`.

Example:
    >>> from thunderline_lab import events
    >>> ev = events.run_metric(model_run_id="study-1", trial_id="trial_003",
    ...                        metric_name="val_accuracy", metric_value=0.8765, step=42)
    >>> ev.name, ev.priority, ev.pipeline
    ('ml.run.metric', 'normal', 'realtime')
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from itertools import chain, compress, repeat
from operator import attrgetter, is_, itemgetter
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import msgspec
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic.json_schema import JsonSchemaValue
from pydantic.types import AllowInfNan, Strict
from pydantic_core import PydanticCustomError, PydanticSerializationError, core_schema, to_json

from thunderline_lab.errors import ThunderlineLabError

__all__ = [
    "FAST_NAMES",
    "FAST_PAYLOADS",
    "ML_EVENT_NAMES",
    "RESERVED_PREFIXES",
    "TERMINAL_STATUSES",
    "ErrorDetail",
    "Event",
    "EventConflictError",
    "EventValidationError",
    "GenericEvent",
    "MLEvent",
    "RunMetric",
    "RunMetricEvent",
    "RunStart",
    "RunStartEvent",
    "RunStop",
    "RunStopEvent",
    "TrialComplete",
    "TrialCompleteEvent",
    "TrialFailed",
    "TrialFailedEvent",
    "TrialStart",
    "TrialStartEvent",
    "dump_events",
    "encode_fast",
    "encode_fast_all",
    "event_json_schema",
    "fast_events",
    "gc_paused",
    "is_fast",
    "make_event",
    "new_event_id",
    "run_metric",
    "run_start",
    "run_stop",
    "to_event",
    "trial_complete",
    "trial_failed",
    "trial_start",
    "utcnow",
    "validate_event",
    "validate_events",
    "validate_events_json",
    "validate_records",
]

RESERVED_PREFIXES: tuple[str, ...] = (
    "system.",
    "reactor.",
    "ui.",
    "audit.",
    "evt.",
    "ml.",
    "ai.",
    "flow.",
    "grid.",
)
ML_EVENT_NAMES: tuple[str, ...] = (
    "ml.run.start",
    "ml.run.stop",
    "ml.run.metric",
    "ml.trial.start",
    "ml.trial.complete",
    "ml.trial.failed",
)
TERMINAL_STATUSES: tuple[str, ...] = ("completed", "pruned", "cancelled", "failed")
DEFAULT_SOURCE = "thunderline_lab"

# ---------------------------------------------------------------------------------------------
# Field types
# ---------------------------------------------------------------------------------------------

Identifier = Annotated[str, StringConstraints(min_length=1, max_length=256)]
# MLflow's rule for metric names: alphanumerics, underscores, dashes, periods, spaces, slashes.
_METRIC_NAME_RULE = "1 to 250 letters, digits, spaces or _ - . /"
MetricName = Annotated[
    str, StringConstraints(min_length=1, max_length=250, pattern=r"^[A-Za-z0-9_\-. /]+$")
]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Metrics = dict[MetricName, FiniteFloat]
INT64_MAX = 2**63 - 1  # SQLite's INTEGER: a larger count cannot be stored
Step = Annotated[int, Field(ge=0, le=INT64_MAX)]
DurationMs = Annotated[int, Field(ge=0, le=INT64_MAX)]
Rank = Annotated[int, Field(ge=1, le=INT64_MAX)]
Coeff = Annotated[float, Field(gt=0, allow_inf_nan=False)]


def _utc_representable(ts: datetime) -> datetime:
    # Only the first and last years can overflow when shifted to UTC; skip the cost otherwise.
    if ts.year in (1, 9999):
        try:
            ts.astimezone(UTC)
        except OverflowError:
            raise ValueError("is out of range once converted to UTC") from None
    return ts


class _DateTimeText:
    """A timestamp's gate: a datetime, or text that begins as an RFC 3339 date does
    (``2026-11-22``). The models read text laxly, and pydantic's lax reading also takes a
    number or numeric text (``5``, ``"5"``, ``1700000000000``) as a Unix time, in seconds or
    milliseconds by its size: a guess the schema (``format: date-time``) does not promise.
    Checked in pydantic-core (no Python call per event); msgspec, the fast path's reader,
    takes only RFC 3339 text already.
    """

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        text = core_schema.str_schema(pattern=r"^[0-9]{4}-", strict=True)
        gate = core_schema.json_or_python_schema(
            json_schema=text,
            python_schema=core_schema.union_schema(
                [core_schema.is_instance_schema(datetime), text]
            ),
        )
        return core_schema.chain_schema(
            [core_schema.custom_error_schema(gate, "datetime_type"), handler(source)]
        )

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return handler(schema["steps"][1])  # the datetime's: a string, format date-time


Timestamp = Annotated[
    AwareDatetime, Field(strict=False), AfterValidator(_utc_representable), _DateTimeText()
]

_PLAIN_OR_FLOAT = frozenset((str, int, bool, float, type(None)))
_IS_FLOAT = float.__instancecheck__
# A free-form value may nest this many levels of objects and arrays, itself included:
# pydantic's serializer (the store's writer) refuses a deeper one.
_FREE_FORM_MAX_LEVELS = 256
_NESTED_TOO_DEEPLY = (
    f"nested too deeply (more than {_FREE_FORM_MAX_LEVELS} levels of objects and arrays)"
)


def _non_finite_at(value: Mapping[str, Any] | list[Any]) -> str | None:
    """Where a free-form value holds a NaN or an infinity (``.lr``, ``.a[0].b``), or None."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        entries = item.items() if isinstance(item, Mapping) else enumerate(item)
        for key, sub in entries:
            where = f"{path}.{key}" if isinstance(item, Mapping) else f"{path}[{key}]"
            if isinstance(sub, float):
                if not math.isfinite(sub):
                    return where
            elif isinstance(sub, Mapping | list | tuple):
                stack.append((where, sub))
    return None


def _plain_json(value: Any, np: Any, path: str = "", level: int = 1) -> Any:
    """``value`` with numpy's scalars as the Python numbers they hold (``np.int64(3)`` as 3,
    ``np.float32(0.1)`` as the float it is, ``np.bool_`` as bool), the same object when it
    holds none (``np``: the numpy module, None before it is imported: then none can exist).

    numpy's scalars are what a notebook's parameters often are (``grid[i]``), and JSON (the
    store's log) has no type for them: the writer failed on them later, unnamed.

    Raises:
        PydanticCustomError: ``json_type`` where a value is none JSON can hold (a numpy
            array, whose list is the caller's to say; an ``object()``), by its path;
            ``json_depth`` for objects and arrays nested more than ``_FREE_FORM_MAX_LEVELS``
            levels (``level``: the level of ``value``), which the store could not write.
    """
    if np is not None and isinstance(value, np.generic | np.ndarray):
        if isinstance(value, np.ndarray):
            raise PydanticCustomError(
                "json_type",
                "a numpy array is no JSON value (give a list: .tolist())",
                {"where": path},
            )
        if not isinstance(value, np.str_ | np.bytes_):
            return value.item()
    if isinstance(value, Mapping):
        if level > _FREE_FORM_MAX_LEVELS:  # said of the field: a path inside is too long
            raise PydanticCustomError("json_depth", _NESTED_TOO_DEEPLY)
        out = {k: _plain_json(v, np, f"{path}.{k}", level + 1) for k, v in value.items()}
        return value if all(out[k] is v for k, v in value.items()) else out
    if isinstance(value, list | tuple):
        if level > _FREE_FORM_MAX_LEVELS:
            raise PydanticCustomError("json_depth", _NESTED_TOO_DEEPLY)
        items = [_plain_json(v, np, f"{path}[{i}]", level + 1) for i, v in enumerate(value)]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    if type(value) not in _PLAIN_OR_FLOAT:
        try:
            to_json(value)
        except (PydanticSerializationError, ValueError, TypeError):
            raise PydanticCustomError(  # found now, by field, not by the store's writer later
                "json_type",
                "no JSON value (text, number, bool, null, list or object)",
                {"where": path},
            ) from None
    return value


def _finite_free_form(value: dict[str, Any]) -> dict[str, Any]:
    # NaN and infinity are not JSON: the store would write them as null without a word.
    # Flat maps of plain values (the usual case) cost a pass over the types and the floats.
    if not value:
        return value
    types = set(map(type, value.values()))
    if types <= _PLAIN_OR_FLOAT and (
        float not in types or all(map(math.isfinite, filter(_IS_FLOAT, value.values())))
    ):
        return value
    value = _plain_json(value, sys.modules.get("numpy"))
    where = _non_finite_at(value)
    if where is not None:
        raise PydanticCustomError(
            "finite_number",
            "must be a finite number (NaN and infinity are rejected)",
            {"where": where},
        )
    return value


# free-form maps (metadata, parameters, other events' payloads): any JSON, finite numbers
FreeForm = Annotated[dict[str, Any], AfterValidator(_finite_free_form)]
Priority = Literal["high", "normal", "low"]
Pipeline = Literal["realtime", "batch"]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


# ---------------------------------------------------------------------------------------------
# Payloads (field names follow seed 000's constructors; seed 001's measurements map on metrics)
# ---------------------------------------------------------------------------------------------


class _TrialRef(_Strict):
    model_run_id: Identifier
    trial_id: Identifier
    study: Identifier | None = None
    metadata: FreeForm = Field(default_factory=dict)


class RunStart(_TrialRef):
    """``ml.run.start``: a training run of a trial began."""

    spectral_norm: bool | None = None
    spectral_norm_coeff: Coeff | None = None
    parameters: FreeForm = Field(default_factory=dict)
    mlflow_run_id: Identifier | None = None


def _metric_fault(
    name: str | None, value: float | None, measurements: Mapping[str, float]
) -> str | None:
    """What is wrong with a metric event's metric fields, if anything (one rule, two paths)."""
    if (name is None) != (value is None):
        given, missing = (
            ("metric_name", "metric_value")
            if value is None
            else (
                "metric_value",
                "metric_name",
            )
        )
        return f"{missing} is required with {given} (give both, or neither and measurements)"
    if name is None and not measurements:
        return "no metric: give metric_name and metric_value, or measurements"
    return None


class RunMetric(_TrialRef):
    """``ml.run.metric``: one metric (``metric_name``/``metric_value``) and/or a map at a step."""

    step: Step
    metric_name: MetricName | None = None
    metric_value: FiniteFloat | None = None
    measurements: Metrics = Field(default_factory=dict)
    spectral_norm: bool | None = None

    @model_validator(mode="after")
    def _one_metric_at_least(self) -> RunMetric:
        fault = _metric_fault(self.metric_name, self.metric_value, self.measurements)
        if fault is not None:
            raise ValueError(fault)
        return self

    def points(self) -> dict[str, float]:
        """All metric values of this event, by name."""
        if self.metric_name is None or self.metric_value is None:
            return dict(self.measurements)
        return {**self.measurements, self.metric_name: self.metric_value}


class RunStop(_TrialRef):
    """``ml.run.stop``: the training run ended (``success`` false for a failed run)."""

    success: bool = True
    epochs: Step | None = None
    duration_ms: DurationMs | None = None
    mlflow_run_id: Identifier | None = None
    metrics: Metrics = Field(default_factory=dict)
    artifact_uri: str | None = None


class TrialStart(_TrialRef):
    """``ml.trial.start``: a trial began with these parameters."""

    spectral_norm: bool
    spectral_norm_coeff: Coeff | None = None
    parameters: FreeForm = Field(default_factory=dict)
    mlflow_run_id: Identifier | None = None


class TrialComplete(_TrialRef):
    """``ml.trial.complete``: the primary event; status completed, pruned or cancelled."""

    spectral_norm: bool
    spectral_norm_coeff: Coeff | None = None
    status: Literal["completed", "pruned", "cancelled"] = "completed"
    mlflow_run_id: Identifier | None = None
    metrics: Metrics = Field(default_factory=dict)
    parameters: FreeForm = Field(default_factory=dict)
    artifact_uri: str | None = None
    duration_ms: DurationMs | None = None
    rank: Rank | None = None


class TrialFailed(_TrialRef):
    """``ml.trial.failed``: the trial failed; ``error_type`` says how (e.g. ``diverged``)."""

    error_message: str
    error_type: Identifier
    spectral_norm: bool | None = None
    spectral_norm_coeff: Coeff | None = None
    mlflow_run_id: Identifier | None = None
    metrics: Metrics = Field(default_factory=dict)
    parameters: FreeForm = Field(default_factory=dict)
    duration_ms: DurationMs | None = None


# ---------------------------------------------------------------------------------------------
# Envelope
# ---------------------------------------------------------------------------------------------


def new_event_id() -> str:
    """A fresh event id (the idempotency key): a UUIDv7 (RFC 9562) as 32 hex characters.

    The first 48 bits are the Unix time in milliseconds, the rest random (74 bits), so ids
    made later sort later: the log's unique id index grows at its right edge instead of
    at random pages, and appends stay as fast in a lab of millions of events as in a new
    one (a random id costs 2x per insert once the index outgrows SQLite's page cache;
    ``benchmarks/bench_gateway.py``'s bare-insert floor shows it).

    Example:
        >>> import uuid
        >>> uuid.UUID(new_event_id()).version
        7
    """
    rand = int.from_bytes(os.urandom(10), "big")  # 80 random bits, 74 of them kept
    value = (
        (time.time_ns() // 1_000_000) << 80  # unix_ts_ms (48 bits)
        | 0x7 << 76  # version 7
        | (rand >> 68) << 64  # rand_a (12 bits)
        | 0b10 << 62  # variant
        | (rand & (1 << 62) - 1)  # rand_b (62 bits)
    )
    return f"{value:032x}"


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class _Envelope(_Strict):
    id: Identifier
    timestamp: Timestamp
    source: Identifier = DEFAULT_SOURCE
    correlation_id: Identifier | None = None
    taxonomy_version: Literal[1] = 1
    event_version: Literal[1] = 1
    pipeline: Pipeline = "realtime"

    def to_json(self) -> str:
        """The canonical JSON text of this event."""
        return self.model_dump_json()


class RunStartEvent(_Envelope):
    name: Literal["ml.run.start"]
    priority: Priority = "high"
    payload: RunStart


class RunMetricEvent(_Envelope):
    name: Literal["ml.run.metric"]
    priority: Priority = "normal"
    payload: RunMetric


class RunStopEvent(_Envelope):
    name: Literal["ml.run.stop"]
    priority: Priority = "high"
    payload: RunStop


class TrialStartEvent(_Envelope):
    name: Literal["ml.trial.start"]
    priority: Priority = "high"
    payload: TrialStart


class TrialCompleteEvent(_Envelope):
    name: Literal["ml.trial.complete"]
    priority: Priority = "high"
    payload: TrialComplete


class TrialFailedEvent(_Envelope):
    name: Literal["ml.trial.failed"]
    priority: Priority = "high"
    payload: TrialFailed


class GenericEvent(_Envelope):
    """An event outside ``ml.*`` under another reserved prefix: logged, not projected."""

    name: Annotated[
        str,
        StringConstraints(
            pattern=r"^(system|reactor|ui|audit|evt|ai|flow|grid)\.[a-z0-9_]+(\.[a-z0-9_]+)*$"
        ),
    ]
    priority: Priority = "normal"
    payload: FreeForm = Field(default_factory=dict)


MLEvent = Annotated[
    Union[  # noqa: UP007 - a discriminated union reads better spelled out
        RunStartEvent,
        RunMetricEvent,
        RunStopEvent,
        TrialStartEvent,
        TrialCompleteEvent,
        TrialFailedEvent,
    ],
    Field(discriminator="name"),
]
Event = (
    RunStartEvent
    | RunMetricEvent
    | RunStopEvent
    | TrialStartEvent
    | TrialCompleteEvent
    | TrialFailedEvent
    | GenericEvent
)

_EVENT_CLASSES: dict[str, type[_Envelope]] = {
    "ml.run.start": RunStartEvent,
    "ml.run.metric": RunMetricEvent,
    "ml.run.stop": RunStopEvent,
    "ml.trial.start": TrialStartEvent,
    "ml.trial.complete": TrialCompleteEvent,
    "ml.trial.failed": TrialFailedEvent,
}
_ML_ADAPTER: TypeAdapter[Any] = TypeAdapter(MLEvent)
_ML_LIST_ADAPTER: TypeAdapter[list[Any]] = TypeAdapter(list[MLEvent])
_ANY_LIST_ADAPTER: TypeAdapter[list[Any]] = TypeAdapter(list[Event])


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorDetail:
    """One broken rule: which record, which field, the value and the rule.

    ``index`` counts records from 0 (an array's index, the gateway's ``index``); ``line``,
    when known, is the record's 1-based line in a JSON lines file, and is what a message
    for that file names.
    """

    index: int | None
    path: str
    value: Any
    rule: str
    message: str
    source_line: int | None = None

    def line(self, source: str | None = None) -> str:
        """One line naming the file (if any), the record, the field and what is wrong."""
        where = [source] if source else []
        if self.source_line is not None:
            where.append(f"line {self.source_line}")
        elif self.index is not None:
            where.append(f"record {self.index}")
        if self.path:
            where.append(self.path)
        shown = _show(self.value)
        value = f" (got {shown})" if shown is not None else ""
        return f"{': '.join(where)}: {self.message}{value} [{self.rule}]"

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (the gateway's 422 body); ``line`` only where known."""
        out = {
            "index": self.index,
            "path": self.path,
            "message": self.message,
            "rule": self.rule,
            "value": _show(self.value),
        }
        if self.source_line is not None:
            out["line"] = self.source_line
        return out


def _show(value: Any) -> str | None:
    if value is _MISSING:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if not isinstance(value, str | int | float | list | tuple | dict | type(None)):
        text = repr(value)  # np.int64(3), not "3" (as if text had been given)
    else:
        try:
            text = json.dumps(value, default=repr)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_MISSING: Any = object()


class EventValidationError(ThunderlineLabError):
    """One or more events broke the rules; ``errors`` lists every one of them."""

    def __init__(self, errors: Sequence[ErrorDetail], source: str | None = None) -> None:
        self.errors = list(errors)
        self.source = source
        super().__init__(self._summary())

    def _summary(self) -> str:
        n = len(self.errors)
        head = f"{n} invalid field{'s' if n != 1 else ''}"
        if self.source:
            head = f"{self.source}: {head}"
        return head + ": " + "; ".join(e.line() for e in self.errors[:5])

    def lines(self) -> list[str]:
        """One line per error, each naming the file, record and field."""
        return [e.line(self.source) for e in self.errors]

    def with_source(self, source: str) -> EventValidationError:
        """The same errors, attributed to a file (or other source)."""
        return type(self)(self.errors, source)

    def offset(self, by: int) -> EventValidationError:
        """The same errors with record indexes shifted (for batches of a larger input)."""
        shifted = [e if e.index is None else replace(e, index=e.index + by) for e in self.errors]
        return type(self)(shifted, self.source)


class EventConflictError(EventValidationError):
    """Events valid alone that contradict what the store holds; nothing of the batch is
    written then. Rules:

    * ``id_conflict``: an event id already names another event (logged, or earlier in the
      same batch). An id is the event's idempotency key: sending the same event again is
      harmless and counted as a duplicate, but the same id with another name or payload is
      a second, different event that would otherwise be dropped without a word. The
      timestamp does not count: a retried post may be stamped anew.
    * ``trial_finished``: an outcome (``ml.trial.complete``/``ml.trial.failed``) with another
      status than the one the trial finished with, which would silently rewrite it.
    * ``trial_conflict``: a trial's ``spectral_norm``, ``spectral_norm_coeff`` or ``study``
      stated otherwise than its earlier events did (a trial moved to the other arm).
    """


_COMPARISONS = frozenset(
    {"greater_than_equal", "greater_than", "less_than_equal", "less_than", "literal_error"}
)
_FRIENDLY = {
    "finite_number": "must be a finite number (NaN and infinity are rejected)",
    "missing": "field required",
    "extra_forbidden": "unknown field",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be a boolean (true or false)",
    "string_type": "must be a string",
    "dict_type": "must be an object",
    "timezone_aware": "must carry a timezone (e.g. 2026-11-22T12:34:56Z)",
    "datetime_type": "must be an RFC 3339 date-time string (e.g. 2026-11-22T12:34:56Z)",
}


# rules a free-form map's check raises with the key they are about ("where": ".lr")
_AT_KEY = frozenset({"finite_number", "json_type"})


def _details_from_pydantic(
    exc: ValidationError, index: int | None, *, tagged: bool, prefix: tuple[Any, ...] = ()
) -> list[ErrorDetail]:
    out = []
    for err in exc.errors(include_url=False):
        loc = list(err["loc"])
        idx = index
        if idx is None and loc and isinstance(loc[0], int):
            idx = int(loc.pop(0))
        if tagged and loc and isinstance(loc[0], str) and loc[0] in _EVENT_CLASSES:
            loc.pop(0)  # the discriminator's tag is not part of the field path
        rule = err["type"]
        key_error = bool(loc) and loc[-1] == "[key]"  # a map's key itself is refused
        if key_error:
            loc.pop()
            key = loc.pop() if loc else ""
            path = ".".join(str(p) for p in (*prefix, *loc)) + f"[{json.dumps(key)}]"
        else:
            path = ".".join(str(p) for p in (*prefix, *loc))
        if rule in _AT_KEY and "where" in err.get("ctx", {}):
            path += str(err["ctx"]["where"])  # the key inside a free-form map
        message = _FRIENDLY.get(rule, err["msg"])
        if key_error and rule.startswith("string_") and rule != "string_type":
            message = f"not a metric name: {_METRIC_NAME_RULE}"  # the only keys with rules
        elif key_error:
            message = f"key: {message}"
        elif rule == "value_error":
            message = str(err["ctx"]["error"]) if "ctx" in err else err["msg"]
            rule = "constraint"
        elif rule == "union_tag_invalid":
            path = ".".join(str(p) for p in (*prefix, "name"))
            rule, message = (
                "unknown_event",
                f"unknown ml event name (expected one of {', '.join(ML_EVENT_NAMES)})",
            )
        elif rule in _COMPARISONS:
            message = "must be " + err["msg"].removeprefix("Input should be ")
        value = err.get("input", _MISSING) if rule != "missing" else _MISSING
        if rule == "json_depth" or (rule in _AT_KEY and "where" in err.get("ctx", {})):
            value = _MISSING  # the input is the whole map
        out.append(ErrorDetail(idx, path, value, rule, message))
    return out


def _name_error(record: Mapping[str, Any], index: int | None) -> ErrorDetail | None:
    name = record.get("name", _MISSING)
    if name is _MISSING:
        return ErrorDetail(index, "name", _MISSING, "missing", "field required")
    if not isinstance(name, str):
        return ErrorDetail(index, "name", name, "string_type", "must be a string")
    if not name.startswith(RESERVED_PREFIXES):
        return ErrorDetail(
            index,
            "name",
            name,
            "reserved_prefix",
            "event name must start with a reserved prefix (" + " ".join(RESERVED_PREFIXES) + ")",
        )
    if name.startswith("ml.") and name not in _EVENT_CLASSES:
        return ErrorDetail(
            index,
            "name",
            name,
            "unknown_event",
            f"unknown ml event name (expected one of {', '.join(ML_EVENT_NAMES)})",
        )
    return None


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def validate_event(record: Mapping[str, Any] | Event, index: int | None = None) -> Event:
    """Validate one canonical event (a dict parsed from JSON, or an event object).

    Raises:
        EventValidationError: listing every broken rule with its field path.
    """
    if isinstance(record, _Envelope):
        return record
    if not isinstance(record, Mapping):
        raise EventValidationError(
            [ErrorDetail(index, "", record, "dict_type", "an event must be a JSON object")]
        )
    name_err = _name_error(record, index)
    if name_err is not None:
        # Report the name and anything else wrong with the envelope in one go.
        errors = [name_err]
        try:
            _Envelope.model_validate(
                {k: v for k, v in record.items() if k in _Envelope.model_fields}
            )
        except ValidationError as exc:
            errors += _details_from_pydantic(exc, index, tagged=False)
        raise EventValidationError(errors)
    try:
        if record["name"].startswith("ml."):
            return _ML_ADAPTER.validate_python(record)
        return GenericEvent.model_validate(record)
    except ValidationError as exc:
        raise EventValidationError(_details_from_pydantic(exc, index, tagged=True)) from None


def validate_events(records: Iterable[Mapping[str, Any] | Event]) -> list[Event]:
    """Validate many canonical events; all errors of all records are reported together.

    The fast path validates the whole batch in pydantic-core; only a batch with errors is
    walked record by record to name every fault.

    Raises:
        EventValidationError: with one :class:`ErrorDetail` per broken rule.
    """
    items = list(records)
    if all(isinstance(r, _Envelope) for r in items):
        return items  # type: ignore[return-value]
    try:
        with gc_paused():
            return _ML_LIST_ADAPTER.validate_python(items)
    except ValidationError:
        pass
    out: list[Event] = []
    errors: list[ErrorDetail] = []
    for i, rec in enumerate(items):
        try:
            out.append(validate_event(rec, i))
        except EventValidationError as exc:
            errors.extend(exc.errors)
    if errors:
        raise EventValidationError(errors)
    return out


def validate_events_json(data: str | bytes) -> list[Event]:
    """Validate a JSON array (or one object) of canonical events straight from text.

    Raises:
        EventValidationError: for unparseable JSON (rule ``json_invalid``) or invalid events.
    """
    try:
        with gc_paused():
            return _ML_LIST_ADAPTER.validate_json(data)
    except ValidationError:
        pass
    try:
        parsed = json.loads(data)
    except ValueError as exc:
        raise EventValidationError(
            [ErrorDetail(None, "", _MISSING, "json_invalid", f"invalid JSON: {exc}")]
        ) from None
    return validate_events(parsed if isinstance(parsed, list) else [parsed])


# ---------------------------------------------------------------------------------------------
# Records: the ingest fast path
# ---------------------------------------------------------------------------------------------
# Ingest (the store, the gateway, ``ingest``) needs the validated fields, not event objects.
# The fast path validates with msgspec structs that are generated from the models' own field
# definitions (types, bounds, lengths, patterns, defaults), so there is one definition of the
# rules; a rule the generator cannot translate stops the import instead of being dropped.
# The rules written as Python validators are checked after the batch, in whole-batch passes
# (``_any_fault``). The fast path only ever accepts: a batch it refuses, or one whose input
# it could read differently from the models (sub-microsecond timestamps, which msgspec
# rounds and pydantic truncates), is re-validated by the models, which name every fault.
# ``tests/test_events.py`` checks on random inputs that both paths agree.

_RECHECKED_IN_PYTHON = (_utc_representable, _finite_free_form, RunMetric._one_metric_at_least)
_FLOAT_MAX = sys.float_info.max


def _fast_pattern(pattern: str) -> str:
    # pydantic matches with Rust's regex, where ``$`` is the very end of the text; Python's
    # ``$`` also matches before a final newline, so ``"loss\n"`` would slip through.
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        return pattern[:-1] + r"\Z"
    return pattern


def _fast_type(
    tp: Any,
    metadata: Sequence[Any] = (),
    patterns: list[tuple[str, str]] | None = None,
    where: str = "value",
) -> Any:
    """The msgspec type of a pydantic field type with its constraints (strict, as the models).

    String patterns are not given to msgspec (its per-string ``re`` call would cost more
    than all the rest of the validation); they are collected in ``patterns`` as
    ``(where, pattern)`` — ``where`` is ``"value"`` or ``"key"`` (of a dict) — and checked
    after the batch against a cache of names already seen (``_any_fault``).
    """
    if patterns is None:
        patterns = []
    if get_origin(tp) is Annotated:
        base, *extra = get_args(tp)
        return _fast_type(base, [*metadata, *extra], patterns, where)
    meta: dict[str, Any] = {}
    tz = False
    for m in metadata:
        if isinstance(m, FieldInfo):
            rest = [*m.metadata, *(x for x in metadata if x is not m)]
            return _fast_type(tp, rest, patterns, where)
        if isinstance(m, StringConstraints):
            if m.strip_whitespace or m.to_upper or m.to_lower or m.ascii_only:
                raise TypeError(f"the fast path cannot translate {m!r}")
            for key in ("min_length", "max_length"):
                if getattr(m, key) is not None:
                    meta[key] = getattr(m, key)
            if m.pattern is not None:
                if where not in ("value", "key"):
                    raise TypeError(f"the fast path cannot check a pattern in a {where}")
                patterns.append((where, _fast_pattern(str(m.pattern))))
        elif isinstance(m, annotated_types.Ge | annotated_types.Gt | annotated_types.Le):
            key = type(m).__name__.lower()
            meta[key] = getattr(m, key)
        elif isinstance(m, AllowInfNan) and not m.allow_inf_nan:
            pass  # every float is finite below (the models' config says so too)
        elif isinstance(m, Strict) and m.strict is False and tp is AwareDatetime:
            pass  # a datetime may be given as text
        elif isinstance(m, AfterValidator) and m.func in _RECHECKED_IN_PYTHON:
            pass
        elif isinstance(m, _DateTimeText) and tp is AwareDatetime:
            pass  # msgspec reads a datetime from RFC 3339 text alone (no number)
        else:
            raise TypeError(f"the fast path cannot translate {m!r} on {tp!r}")
    origin = get_origin(tp)
    if origin in (Union, UnionType):
        return Union[tuple(_fast_type(a, (), patterns, where) for a in get_args(tp))]  # noqa: UP007
    if origin is Literal:
        return tp
    if origin is dict:
        key, value = get_args(tp)
        fast_key = _fast_type(key, (), patterns, "key")
        return dict[fast_key, _fast_type(value, (), patterns, "dict value")]  # type: ignore[valid-type,misc]
    if tp is AwareDatetime:
        tp, tz = datetime, True
    elif tp is float:  # finite: NaN fails both bounds, infinity one
        if "gt" not in meta:
            meta.setdefault("ge", -_FLOAT_MAX)
        meta.setdefault("le", _FLOAT_MAX)
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        return _fast_struct(tp)
    elif tp not in (str, int, bool, type(None), Any):
        raise TypeError(f"the fast path cannot translate type {tp!r}")
    if tz:
        meta["tz"] = True
    return Annotated[tp, msgspec.Meta(**meta)] if meta else tp


_FAST_BY_MODEL: dict[type[BaseModel], Any] = {}
# struct -> (field, "value" | "key", compiled pattern): the patterns checked after a batch
_PATTERN_CHECKS: dict[Any, list[tuple[str, str, re.Pattern[str]]]] = {}
# Strings that matched their pattern already (metric names repeat in every event); bounded.
_MATCHED: dict[re.Pattern[str], set[str]] = {}
_MATCHED_MAX = 100_000


def _fast_struct(model: type[BaseModel], tag: str | None = None) -> Any:
    """A msgspec struct with the model's fields, in the model's order, forbidding extras."""
    if tag is None and model in _FAST_BY_MODEL:
        return _FAST_BY_MODEL[model]
    decorators = model.__pydantic_decorators__
    validators: list[Any] = [*decorators.model_validators.values()]
    validators += decorators.field_validators.values()
    for dec in validators:
        if dec.func not in _RECHECKED_IN_PYTHON:  # a rule the structs would silently drop
            raise TypeError(f"the fast path cannot translate validator {dec.func!r}")
    fields: list[Any] = []
    checks: list[tuple[str, str, re.Pattern[str]]] = []
    for name, info in model.model_fields.items():
        if name == "name" and tag is not None:
            continue  # the struct's tag
        found: list[tuple[str, str]] = []
        tp = _fast_type(info.annotation, info.metadata, found)
        checks += [(name, where, re.compile(pattern)) for where, pattern in found]
        if info.default_factory is not None:
            factory: Any = info.default_factory
            fields.append((name, tp, msgspec.field(default_factory=factory)))
        elif info.is_required():
            fields.append((name, tp))
        else:
            fields.append((name, tp, info.default))
    struct = msgspec.defstruct(
        f"Fast{model.__name__}",
        fields,
        kw_only=True,
        forbid_unknown_fields=True,
        # Not tracked by the cyclic GC: a struct made from JSON or from parsed JSON refers
        # to no object that refers back to it, and tracking 2 structs per event made the
        # collection after each batch cost half as much as validating it.
        gc=False,
        tag_field="name" if tag else None,
        tag=tag,
        module=__name__,
        namespace={"name": tag} if tag else None,  # read like an event: ``ev.name``
    )
    if tag is None:
        _FAST_BY_MODEL[model] = struct
    if checks:
        _PATTERN_CHECKS[struct] = checks
    return struct


_FAST_STRUCTS: dict[str, Any] = {
    name: _fast_struct(cls, name) for name, cls in _EVENT_CLASSES.items()
}
_FAST_TYPE: Any = list[Union[tuple(_FAST_STRUCTS.values())]]  # type: ignore[misc]  # noqa: UP007
_FAST_JSON = msgspec.json.Decoder(_FAST_TYPE)
_FAST_ENCODER = msgspec.json.Encoder()
_SUB_MICROSECOND = re.compile(r":\d\d\.\d{7}")
_SUB_MICROSECOND_BYTES = re.compile(rb":\d\d\.\d{7}")
_ENVELOPE_KEYS = {name: tuple(cls.model_fields) for name, cls in _EVENT_CLASSES.items()}


# Free-form values (``metadata``, ``parameters``) nested deeper than this are left to the
# models: they refuse more than _FREE_FORM_MAX_LEVELS (their serializer's limit), and
# msgspec's encoder would write what they refuse.
_FREE_FORM_DEPTH = 200


def _nests_deeper(value: dict[str, Any], limit: int) -> bool:
    """Whether containers nest more than ``limit`` levels (flat values cost one look)."""
    stack: list[tuple[Any, int]] = [(v, 1) for v in value.values() if type(v) in (dict, list)]
    while stack:
        item, depth = stack.pop()
        if depth >= limit:
            return True
        children = item.values() if type(item) is dict else item
        stack.extend((c, depth + 1) for c in children if type(c) in (dict, list))
    return False


def _any_too_deep(maps: list[dict[str, Any]]) -> bool:
    """Whether any free-form map nests deeper than ``_FREE_FORM_DEPTH`` or holds a NaN or
    an infinity (``_finite_free_form``): one pass over all the values' types first (flat
    maps, the usual case, cost no per-map Python call)."""
    if not any(maps):
        return False
    values = list(chain.from_iterable(map(dict.values, maps)))
    types = set(map(type, values))
    if float in types and not all(map(math.isfinite, filter(_IS_FLOAT, values))):
        return True
    if not _CONTAINERS.intersection(types):
        return False
    return any(
        _nests_deeper(m, _FREE_FORM_DEPTH) or _non_finite_at(m) is not None for m in maps if m
    )


_CONTAINERS = frozenset((dict, list))


def _names_unmatched(seen: dict[re.Pattern[str], set[str]]) -> bool:
    """Whether any string collected for a pattern fails it; matches are cached."""
    for pattern, texts in seen.items():
        matched = _MATCHED.setdefault(pattern, set())
        new = texts - matched  # metric names repeat: usually nothing is new
        for text in new:
            if pattern.search(text) is None:
                return True
        if len(matched) + len(new) > _MATCHED_MAX:
            matched.clear()
        matched |= new
    return False


def _any_fault(events: Sequence[Any]) -> bool:
    """Whether any validated event breaks a rule the models check in Python
    (``_utc_representable``, ``_metric_fault``, string patterns, free-form depth).

    Written as whole-batch passes (comprehensions, ``map``, set unions) rather than one
    loop over the events: per-event Python statements would cost as much as msgspec's
    own validation of the batch.
    """
    if not events:
        return False
    years = set(map(_YEAR_OF, events))
    if 1 in years or 9999 in years:  # only the calendar's ends can overflow in UTC
        for ev in events:
            try:
                ev.timestamp.astimezone(UTC)
            except OverflowError:
                return True
    payloads = list(map(_PAYLOAD_OF, events))
    if _any_too_deep(list(map(_METADATA_OF, payloads))):
        return True
    kinds = {type(p) for p in payloads}
    groups = (
        {kinds.pop(): payloads}
        if len(kinds) == 1
        else {k: [p for p in payloads if type(p) is k] for k in kinds}
    )
    seen: dict[re.Pattern[str], set[str]] = {}
    for kind, group in groups.items():
        for field_name, where, pattern in _PATTERN_CHECKS.get(kind, ()):
            values = map(attrgetter(field_name), group)
            texts = seen.setdefault(pattern, set())
            if where == "key":
                texts.update(*values)  # the keys of every map
            else:
                texts.update(values)
                texts.discard(None)
        if kind is _FAST_METRIC_PAYLOAD:
            # the models' _one_metric_at_least: a name and a value together, or neither and
            # a non-empty measurements map
            no_name = list(map(is_, map(_METRIC_NAME_OF, group), repeat(None)))
            if no_name != list(map(is_, map(_METRIC_VALUE_OF, group), repeat(None))):
                return True
            if any(no_name) and not all(compress(map(_MEASUREMENTS_OF, group), no_name)):
                return True
        elif kind in _WITH_PARAMETERS and _any_too_deep(list(map(_PARAMETERS_OF, group))):
            return True
    return _names_unmatched(seen)


_FAST_METRIC_PAYLOAD = _FAST_BY_MODEL[RunMetric]
_YEAR_OF = attrgetter("timestamp.year")
_PAYLOAD_OF = attrgetter("payload")
_METADATA_OF = attrgetter("metadata")
_PARAMETERS_OF = attrgetter("parameters")
_METRIC_NAME_OF = attrgetter("metric_name")
_METRIC_VALUE_OF = attrgetter("metric_value")
_MEASUREMENTS_OF = attrgetter("measurements")
_WITH_PARAMETERS = frozenset(
    struct for struct in _FAST_BY_MODEL.values() if "parameters" in struct.__struct_fields__
)


def _sub_microsecond(stamps: list[Any]) -> bool:
    """Whether a timestamp given as text has more than six decimal places (whole-list
    passes: a batch of texts no longer than ``2026-01-01T00:00:00.123456Z`` needs no regex)."""
    texts = stamps if set(map(type, stamps)) == {str} else [s for s in stamps if type(s) is str]
    if not texts or max(map(len, texts)) <= 27:
        return False
    return any(_SUB_MICROSECOND.search(s) for s in texts if len(s) > 27)


_TIMESTAMP_OF = itemgetter("timestamp")


def fast_events(items: Sequence[Any] | bytes) -> list[Any] | None:
    """Canonical ``ml.*`` events validated into msgspec structs, or None.

    ``items`` is parsed JSON (a list of dicts) or JSON text (an array). None means the fast
    path does not vouch for the batch — it breaks a rule, holds other event kinds, or needs
    the models' reading — and the caller must validate it with the models, which accept it
    or name every fault. Each struct has the model's fields and reads like an event for
    what ingest needs (``ev.name``, ``ev.id``, ``ev.timestamp``, ``ev.payload.step``); it
    has none of the models' methods: :func:`to_event` makes the model.
    """
    with gc_paused():
        try:
            if isinstance(items, bytes | bytearray | memoryview):
                if _SUB_MICROSECOND_BYTES.search(items):
                    return None
                out = _FAST_JSON.decode(items)
            else:
                if _sub_microsecond(list(map(_TIMESTAMP_OF, items))):
                    return None
                out = msgspec.convert(items, _FAST_TYPE)
        except (msgspec.MsgspecError, RecursionError, TypeError, ValueError, KeyError):
            return None  # KeyError: a record without a timestamp, which the models name
        return None if _any_fault(out) else out


FAST_NAMES: dict[type, str] = {cls: name for name, cls in _FAST_STRUCTS.items()}
# event name -> the struct of its payload
FAST_PAYLOADS: dict[str, Any] = {
    name: next(f.type for f in msgspec.structs.fields(struct) if f.name == "payload")
    for name, struct in _FAST_STRUCTS.items()
}


def _fast_record(ev: Any) -> dict[str, Any]:
    name = FAST_NAMES[type(ev)]
    out = {k: (name if k == "name" else getattr(ev, k)) for k in _ENVELOPE_KEYS[name]}
    out["payload"] = msgspec.structs.asdict(ev.payload)
    return out


def is_fast(ev: Any) -> bool:
    """Whether ``ev`` is a struct made by :func:`fast_events`."""
    return type(ev) in FAST_NAMES


def to_event(ev: Any) -> Event:
    """The event object (pydantic model) of a struct made by :func:`fast_events`."""
    return validate_event(_fast_record(ev))


def encode_fast(ev: Any) -> str:
    """Canonical JSON text of a fast-path event (the name comes first)."""
    return _FAST_ENCODER.encode(ev).decode()


def encode_fast_all(events: Iterable[Any]) -> list[str]:
    """:func:`encode_fast` of every event, in one pass with no per-event Python call."""
    return list(map(bytes.decode, map(_FAST_ENCODER.encode, events)))


_GC_PAUSE_LOCK = threading.Lock()
_gc_pauses = 0  # batches in flight (any thread) holding the collector paused
_gc_was_enabled = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a batch builds many acyclic objects.

    Building thousands of small dicts or models trips generation-0 collections every few
    hundred records, each walking the growing result: about half the cost of validating a
    batch. The objects made here hold no reference cycles, so nothing is left uncollected.
    Pauses nest across threads: the collector is restored to its prior state when the last
    batch in flight ends.
    """
    global _gc_pauses, _gc_was_enabled
    with _GC_PAUSE_LOCK:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _GC_PAUSE_LOCK:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


def validate_records(records: Iterable[Mapping[str, Any] | Event]) -> list[dict[str, Any]]:
    """Validate canonical events into plain dicts: the ingest fast path.

    Same rules and the same errors as :func:`validate_events`; the result holds each event's
    fields with defaults filled in (``timestamp`` a timezone-aware datetime), as
    ``event.model_dump()`` would give them. Events outside ``ml.*`` and event objects are
    accepted too, through the models.

    Raises:
        EventValidationError: with one :class:`ErrorDetail` per broken rule.
    """
    items = list(records)
    if not any(isinstance(r, _Envelope) for r in items):
        fast = fast_events(items)
        if fast is not None:
            with gc_paused():
                return [_fast_record(ev) for ev in fast]
    with gc_paused():
        return [ev.model_dump() for ev in validate_events(items)]


def dump_events(events: Iterable[Event]) -> list[str]:
    """Canonical JSON text of each event.

    Raises:
        EventValidationError: naming each event that cannot be written as JSON (for example a
            string holding a lone UTF-16 surrogate, which JSON decoding lets through).
    """
    out: list[str] = []
    errors: list[ErrorDetail] = []
    for i, ev in enumerate(events):
        try:
            out.append(ev.model_dump_json())
        except (ValueError, PydanticSerializationError) as exc:
            errors.append(
                ErrorDetail(i, "", _MISSING, "unserializable", f"cannot be written as JSON: {exc}")
            )
    if errors:
        raise EventValidationError(errors)
    return out


def event_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of every event the lab accepts."""
    schema = _ANY_LIST_ADAPTER.json_schema()
    items = schema.pop("items")
    schema.update(
        {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "thunderline-lab events",
            "description": "One canonical event, or an array of them. ml.* names: "
            + ", ".join(ML_EVENT_NAMES),
            "oneOf": [items, {"type": "array", "items": items}],
        }
    )
    schema.pop("type", None)
    return schema


# ---------------------------------------------------------------------------------------------
# Smart constructors
# ---------------------------------------------------------------------------------------------


def make_event(
    name: str,
    *,
    source: str = DEFAULT_SOURCE,
    correlation_id: str | None = None,
    id: str | None = None,
    timestamp: datetime | None = None,
    priority: Priority | None = None,
    **payload: Any,
) -> Event:
    """Build and validate an event: fills id, timestamp, source, priority, pipeline, versions.

    Example:
        >>> ev = make_event("ml.trial.start", model_run_id="r", trial_id="t", spectral_norm=True)
        >>> ev.priority
        'high'

    Raises:
        EventValidationError: a missing or wrong-typed field, an unknown name.
    """
    record: dict[str, Any] = {
        # only None means "make one": id="" or timestamp=0 are validated (and refused) as given
        "id": new_event_id() if id is None else id,
        "name": name,
        "timestamp": utcnow() if timestamp is None else timestamp,
        "source": source,
        "correlation_id": correlation_id,
        "payload": payload,
    }
    if priority is not None:
        record["priority"] = priority
    cls = _EVENT_CLASSES.get(name)
    if cls is None:
        return validate_event(record)
    try:  # a known ml.* name: validate against its class directly (the emit hot path)
        return cls.model_validate(record)  # type: ignore[return-value]
    except ValidationError as exc:
        raise EventValidationError(_details_from_pydantic(exc, None, tagged=False)) from None


def run_start(**payload: Any) -> Event:
    """``ml.run.start`` (see :class:`RunStart` for fields)."""
    return make_event("ml.run.start", **payload)


def run_metric(**payload: Any) -> Event:
    """``ml.run.metric`` (see :class:`RunMetric` for fields)."""
    return make_event("ml.run.metric", **payload)


def run_stop(**payload: Any) -> Event:
    """``ml.run.stop`` (see :class:`RunStop` for fields)."""
    return make_event("ml.run.stop", **payload)


def trial_start(**payload: Any) -> Event:
    """``ml.trial.start`` (see :class:`TrialStart` for fields)."""
    return make_event("ml.trial.start", **payload)


def trial_complete(**payload: Any) -> Event:
    """``ml.trial.complete`` (see :class:`TrialComplete` for fields)."""
    return make_event("ml.trial.complete", **payload)


def trial_failed(**payload: Any) -> Event:
    """``ml.trial.failed`` (see :class:`TrialFailed` for fields)."""
    return make_event("ml.trial.failed", **payload)

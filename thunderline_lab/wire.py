"""Reading events off the wire: JSON / JSON lines, and the seeds' Cerebros payloads.

Three shapes are accepted, record by record:

* a canonical event: ``{"id", "name", "timestamp", "payload", ...}`` (strict);
* a seed 001 post: ``{"event": "ml.run.metric", "trial_id", "metadata", "measurements"}``;
* a seed 002 trial report: ``{"trials": [{"trial_id", "status": "succeeded", ...}]}``.

Leniency lives here and only here: booleans may arrive as ``true``/``"true"``/``1`` (and
their false forms), durations as whole floats, and seed 002's ``succeeded`` means
``completed``. Anything else wrong is an error naming the record and field.

Attribution of seed 001 posts: they carry no ``model_run_id``. A post is attributed to
``metadata.model_run_id`` (or a top-level ``model_run_id``) when present, else to the
``default_model_run_id`` the caller names (``thunderline-lab ingest --model-run NAME``, the
gateway's ``?model_run_id=``), which defaults to ``"cerebros"``. Seed 002 reports use their
``run_id`` the same way. An empty run id given is refused, not taken as none given.

Translated events get deterministic ids (a UUID5 of the record's content), so posting the
same payload twice is a harmless duplicate.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from thunderline_lab.events import (
    _MISSING,
    _NESTED_TOO_DEEPLY,
    ML_EVENT_NAMES,
    ErrorDetail,
    Event,
    EventValidationError,
    utcnow,
    validate_events,
)

__all__ = [
    "DEFAULT_MODEL_RUN_ID",
    "JsonInput",
    "LoadedEvents",
    "at_lines",
    "lenient_bool",
    "load_events",
    "parse_json_records",
    "read_json_records",
    "seed_field_path",
    "to_events",
    "translate_record",
]

DEFAULT_MODEL_RUN_ID = "cerebros"
_NAMESPACE = uuid.UUID("6f1c1f0e-4d0b-4e55-9a51-7468756e6465")
_TRUE = {"true", "1", "yes", "y", "t", "on"}
_FALSE = {"false", "0", "no", "n", "f", "off"}
_STATUS = {
    "succeeded": "completed",
    "success": "completed",
    "completed": "completed",
    "failed": "failed",
}


class _Errors:
    def __init__(self, index: int | None) -> None:
        self.index = index
        self.items: list[ErrorDetail] = []

    def add(self, path: str, value: Any, rule: str, message: str) -> None:
        self.items.append(ErrorDetail(self.index, path, value, rule, message))


def lenient_bool(value: Any, default: bool = False) -> bool:
    """Seed 002's booleans: true/false, "true"/"false" (any case), 1/0, "yes"/"no"; None → default.

    Raises:
        ValueError: for anything else (e.g. ``"maybe"`` or ``2``).
    """
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError('must be a boolean (true/false, "true"/"false", 1/0)')


@dataclass(frozen=True)
class JsonInput:
    """Records read from JSON text, and where each came from.

    Attributes:
        records: the parsed records, in order.
        lines: for JSON lines input, each record's 1-based line in the text; None for one
            JSON document (an object or an array).
        errors: the lines of JSON lines input that are not JSON, one error each (a line
            with integers too long to read: one per such number, by field).
    """

    records: list[Any]
    lines: list[int] | None
    errors: list[ErrorDetail]


def read_json_records(text: str | bytes, source: str = "<input>") -> JsonInput:
    """Read a JSON document (one object or an array) or JSON lines, keeping going past
    malformed lines so that every one of them is reported.

    Text counts as JSON lines when its first non-blank line is JSON by itself; otherwise
    it is one document, and a syntax error is reported at its own line and column (a
    pretty-printed file broken on line 7 is not reported as "line 1").

    Raises:
        EventValidationError: text that is not UTF-8, is empty, or is one broken document.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EventValidationError(
                [ErrorDetail(None, "", _MISSING, "encoding", f"not UTF-8 text: {exc}")], source
            ) from None
    text = text.removeprefix("\ufeff")  # a byte order mark (Windows editors write one)
    if not text.strip():
        raise EventValidationError(
            [ErrorDetail(None, "", _MISSING, "empty", "no events (empty input)")], source
        )
    try:
        doc = json.loads(text)
        if isinstance(doc, list):
            return JsonInput(doc, None, [])
        # one object: a JSON-lines file of one record is said by its line, as longer ones are
        rows = [n for n, ln in enumerate(text.split("\n"), start=1) if ln.strip()]
        return JsonInput([doc], rows if len(rows) == 1 else None, [])
    except RecursionError:
        lines = [ln.removesuffix("\r") for ln in text.split("\n")]
        rows = [n for n, ln in enumerate(lines, start=1) if ln.strip()]
        if len(rows) == 1 or not any(_is_record_line(lines[n - 1]) for n in rows):
            deep = _depth_errors(text)
            if len(rows) == 1 and text.lstrip()[:1] == "{":  # one record: said by its line
                deep = [e if e.index is None else replace(e, source_line=rows[0]) for e in deep]
            raise EventValidationError(deep, source) from None
        # JSON lines whose first record is nested too deeply: each line is read below
    except json.JSONDecodeError as whole_exc:
        # JSON lines are split on "\n" alone: str.splitlines would also split on U+2028
        # and other separators that JSON allows inside strings.
        lines = [ln.removesuffix("\r") for ln in text.split("\n")]
        # JSON lines when one line holds a whole record by itself (a broken first line
        # must not hide the others); else one document, broken where the parser says
        if not any(_is_record_line(ln) for ln in lines if ln.strip()):
            where = f"line {whole_exc.lineno}" if "\n" in text.strip() else ""
            message = f"invalid JSON: {whole_exc}"
            if whole_exc.msg == "Extra data" and "\n" not in text.strip():
                # records run together on one line: JSON lines whose newlines were lost
                message += (
                    "; records one after another need a newline between them (JSON lines) "
                    "or an array around them (curl -d drops a file's newlines: use "
                    "--data-binary @file)"
                )
            raise EventValidationError(
                [ErrorDetail(None, where, _MISSING, "json_invalid", message)], source
            ) from None
    except ValueError:  # an integer longer than int() reads: not a JSON syntax error
        raise EventValidationError(_long_number_errors(text), source) from None
    records: list[Any] = []
    numbers: list[int] = []
    errors: list[ErrorDetail] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
            numbers.append(lineno)
        except json.JSONDecodeError as exc:
            message = f"invalid JSON: {exc.msg} (column {exc.colno})"
            errors.append(ErrorDetail(None, "", _MISSING, "json_invalid", message, lineno))
        except RecursionError:  # named by its field, as the models name a line they read;
            # no index: like a line that is not JSON, it is no record
            errors += [replace(e, index=None, source_line=lineno) for e in _depth_errors(line)]
        except ValueError:  # an integer longer than int() reads: not a JSON syntax error
            errors += _long_number_line_errors(line, len(records), lineno)
    return JsonInput(records, numbers, errors)


def _long_number_line_errors(line: str, index: int, lineno: int) -> list[ErrorDetail]:
    """The errors of one JSON line that ``json.loads`` refused for an integer too long to
    read: each such number by field (the line is record ``index``), or the line's syntax
    error found past it; the other lines are read on (one long number hid them all)."""
    try:
        record = json.loads(line, parse_int=_read_int)
    except json.JSONDecodeError as exc:
        message = f"invalid JSON: {exc.msg} (column {exc.colno})"
        return [ErrorDetail(None, "", _MISSING, "json_invalid", message, lineno)]
    except RecursionError:
        return [ErrorDetail(None, "", _MISSING, "json_depth", _TOO_DEEP, lineno)]
    found = _long_numbers(record, index) or [
        ErrorDetail(index, "<event>", _MISSING, "number_too_long", "a number is too long to read")
    ]
    return [replace(e, source_line=lineno) for e in found]


def at_lines(errors: Sequence[ErrorDetail], lines: list[int] | None) -> list[ErrorDetail]:
    """A JSON-lines body's errors with their records' lines (``index`` counts records, and
    blank lines are skipped, so the index alone does not find a line in the body)."""
    if lines is None:
        return list(errors)
    return [
        e
        if e.index is None or not 0 <= e.index < len(lines)
        else replace(e, source_line=lines[e.index])
        for e in errors
    ]


class _LongNumber(str):
    """A JSON integer with more digits than ``int()`` reads (``sys.get_int_max_str_digits``,
    4300 by default: Python's guard against quadratic-time parsing)."""


def _read_int(digits: str) -> int | _LongNumber:
    try:
        return int(digits)
    except ValueError:
        return _LongNumber(digits)


def _long_number_errors(text: str) -> list[ErrorDetail]:
    """Where a body holds integers too long to read, by record and field (slow path: only
    after the body failed to parse for that reason)."""
    records: list[Any] = []
    lines: list[int] | None = None
    try:
        doc = json.loads(text, parse_int=_read_int)
        records = doc if isinstance(doc, list) else [doc]
    except (ValueError, RecursionError):  # JSON lines (as read_json_records reads them)
        lines = []
        for lineno, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                with contextlib.suppress(ValueError, RecursionError):
                    records.append(json.loads(line, parse_int=_read_int))
                    lines.append(lineno)
    errors = [e for i, rec in enumerate(records) for e in _long_numbers(rec, i)]
    if not errors:
        errors.append(
            ErrorDetail(None, "<body>", _MISSING, "number_too_long", "a number is too long to read")
        )
    return at_lines(errors, lines)


def _long_numbers(record: Any, index: int) -> list[ErrorDetail]:
    """Each integer too long to read (:class:`_LongNumber`) in ``record``, by field."""
    errors: list[ErrorDetail] = []

    def walk(value: Any, path: str) -> None:
        if isinstance(value, _LongNumber):
            n = len(value.lstrip("-"))
            errors.append(
                ErrorDetail(
                    index,
                    path or "<event>",
                    f"{value[:12]}…",
                    "number_too_long",
                    f"a number of {n} digits: too long to read (at most 4300)",
                )
            )
        elif isinstance(value, Mapping):
            for key, sub in value.items():
                walk(sub, f"{path}.{key}" if path else str(key))
        elif isinstance(value, list):
            for j, sub in enumerate(value):
                walk(sub, f"{path}[{j}]")

    walk(record, "")
    return errors


def _is_record_line(line: str) -> bool:
    """Whether ``line`` alone is a non-empty JSON object or array (a record of JSON lines;
    a line of a pretty-printed document hardly ever is)."""
    try:
        value = json.loads(line)
    except ValueError:
        return False
    except RecursionError:  # a record nested too deeply to read, if it closes on its line
        return line.lstrip()[:1] in ("{", "[") and _closes(line)
    return isinstance(value, dict | list) and len(value) > 0


def _closes(text: str) -> bool:
    """Whether every object and array opened in ``text`` closes in it, none too early."""
    depth = 0
    for match in _JSON_TOKEN.finditer(text):
        tok = match.group()
        if tok in ("{", "["):
            depth += 1
        elif tok in ("}", "]"):
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


_TOO_DEEP = "invalid JSON: nested too deeply"
# A record nested deeper than this is refused by its index and field (slow path: only once
# the body failed to parse for its depth). The field named then nests more than the 256
# levels a free-form value may (events._FREE_FORM_MAX_LEVELS), which is what the error
# says: the same words as the models' for a record Python could read.
_MAX_RECORD_DEPTH = 300
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\],:]')


def _depth_errors(text: str, limit: int = _MAX_RECORD_DEPTH) -> list[ErrorDetail]:
    """Which records of a document too deep to parse nest deeper than ``limit``, each named
    by its index and the field holding the depth (``payload.metadata``).

    Only an object (a record), given alone or as an element of the top-level array, is
    named; anything else (the top level itself nested too deeply) is one error about the
    whole text, as is a text in which no record is found too deep.
    """
    errors: list[ErrorDetail] = []
    # one frame per open container: [kind, key or element index, expecting a key]
    stack: list[list[Any]] = []
    top_array = False
    flagged = -1  # the last record named
    record = 0
    for match in _JSON_TOKEN.finditer(text):
        tok = match.group()
        if tok[0] == '"':
            if stack and stack[-1][0] == "{" and stack[-1][2]:
                stack[-1][1] = tok[1:-1]
                stack[-1][2] = False
            continue
        if tok in "{[":
            if not stack:
                top_array = tok == "["
            stack.append([tok, None if tok == "{" else 0, tok == "{"])
            inside = len(stack) - (1 if top_array else 0)  # levels inside the record
            if inside > limit and record != flagged:
                first = 1 if top_array else 0
                if stack[first][0] == "{":
                    keys = [str(f[1]) for f in stack[first:-1] if f[0] == "{"]
                    flagged = record
                    errors.append(
                        ErrorDetail(
                            record,
                            ".".join(keys[:2]) or "<event>",
                            _MISSING,
                            "json_depth",
                            _NESTED_TOO_DEEPLY,
                        )
                    )
        elif tok in "}]":
            if stack:
                stack.pop()
        elif tok == "," and stack:
            if stack[-1][0] == "{":
                stack[-1][2] = True
            else:
                stack[-1][1] += 1
                if len(stack) == 1:
                    record += 1
    if not errors:
        errors.append(ErrorDetail(None, "", _MISSING, "json_depth", _TOO_DEEP))
    return errors


def parse_json_records(text: str | bytes, source: str = "<input>") -> list[Any]:
    """Parse a JSON document (one object or an array) or JSON lines into records.

    Raises:
        EventValidationError: naming the source and every line that is not JSON.
    """
    parsed = read_json_records(text, source)
    if parsed.errors:
        raise EventValidationError(parsed.errors, source)
    return parsed.records


@dataclass(frozen=True)
class LoadedEvents:
    """A file's events, with the record (and, for JSON lines, the line) each came from."""

    events: list[Event]
    source: str
    origin: list[int]  # each event's record index (a seed 002 report gives several events)
    lines: list[int] | None  # each record's 1-based line (JSON lines input), else None

    def locate(self, exc: EventValidationError) -> EventValidationError:
        """Errors about ``events`` (say, from the store) named by the file's record or line."""
        located = [
            _at_record(e, self.origin[e.index], self.lines)
            if e.index is not None and 0 <= e.index < len(self.origin)
            else e
            for e in exc.errors
        ]
        return EventValidationError(located, self.source)


def _at_record(e: ErrorDetail, record: int, lines: list[int] | None) -> ErrorDetail:
    """``e`` as an error of the input's ``record`` (and of its line, for JSON lines)."""
    return replace(e, index=record, source_line=None if lines is None else lines[record])


def load_events(
    text: str | bytes, source: str, *, default_model_run_id: str = DEFAULT_MODEL_RUN_ID
) -> LoadedEvents:
    """Read, translate and validate a file's events; errors name the file and the record
    (for JSON lines, its line), every malformed line and every broken rule at once.

    Raises:
        EventValidationError: with every error, attributed to ``source``.
    """
    parsed = read_json_records(text, source)
    found: list[tuple[int, ErrorDetail]] = [(e.source_line or 0, e) for e in parsed.errors]
    events, origin, errors = _translate(parsed.records, default_model_run_id)
    for e in errors:
        if e.index is not None:
            e = _at_record(e, e.index, parsed.lines)
        found.append(((e.index or 0) if e.source_line is None else e.source_line, e))
    if found:
        found.sort(key=lambda item: item[0])  # stable: a record's errors keep their order
        raise EventValidationError([e for _, e in found], source)
    return LoadedEvents(events, source, origin, parsed.lines)


def _event_id(record: Any, salt: str = "") -> str:
    # ASCII-escaped JSON (json.dumps' default), so even a lone surrogate hashes cleanly.
    text = json.dumps([record, salt], sort_keys=True, default=str)
    return uuid.uuid5(_NAMESPACE, text).hex


_SEED001_FIELDS = frozenset(
    {"event", "trial_id", "metadata", "measurements", "model_run_id", "timestamp", "id"}
)
_SEED002_REPORT_FIELDS = frozenset({"trials", "run_id", "model_run_id"})
_SEED002_TRIAL_FIELDS = frozenset(
    {
        "trial_id",
        "run_id",
        "model_run_id",
        "status",
        "spectral_norm",
        "mlflow_run_id",
        "metrics",
        "parameters",
        "duration_ms",
        "artifact_uri",
        "rank",
        "warnings",
        "error",
        "error_message",
        "error_type",
        "timestamp",
    }
)


def _unknown_fields(
    errs: _Errors, record: Mapping[str, Any], known: frozenset[str], prefix: str
) -> None:
    """Report each key of ``record`` outside ``known`` (a misspelt ``metrcs`` would
    otherwise be dropped silently, and a misspelt ``spectral_norm`` put a trial in the
    wrong arm)."""
    for key in sorted(set(record) - known, key=str):
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        expected = ", ".join(sorted(known))
        errs.add(
            f"{prefix}{key}",
            record[key],
            "extra_forbidden",
            f"unknown field{hint}; expected {expected}",
        )


def _misspelt(key: Any, name: str) -> bool:
    """Whether ``key`` looks like ``name`` misspelt (``spectral_nrom``, ``SpectralNorm``,
    ``spectral-norm``, ``use_spectral_norm``) without being it or a longer name of its own
    (``spectral_norm_coeff``)."""
    text = str(key)
    if text == name:
        return False
    if re.sub(r"[^a-z0-9]", "", text.lower()) == name.replace("_", ""):
        return True
    return difflib.SequenceMatcher(None, text.lower(), name).ratio() >= 0.85


def _bool_field(
    errs: _Errors, container: Mapping[str, Any], key: str, path: str, default: bool | None
) -> bool | None:
    value = container.get(key)
    if value is None:
        return default
    try:
        return lenient_bool(value)
    except ValueError as exc:
        errs.add(path, value, "bool_type", str(exc))
        return default


def _duration(errs: _Errors, value: Any, path: str) -> int | None:
    """A seed's duration: whole milliseconds, given as an int or a whole float (2000.0); a
    fraction is refused, not rounded (the seeds send whole ones, and rounding would change
    the value without a word)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        errs.add(path, value, "int_type", "must be a number of milliseconds")
        return None
    if isinstance(value, float) and not math.isfinite(value):
        errs.add(path, value, "finite_number", "must be a finite number")
        return None
    if isinstance(value, float) and not value.is_integer():
        errs.add(path, value, "int_from_float", "must be a whole number of milliseconds")
        return None
    return int(value)


def _given_run(errs: _Errors, value: Any, path: str) -> Any:
    """A run id as a seed payload gives it (None: none given); an empty one is refused
    rather than taken as none given (the post would be filed under the default run)."""
    if value == "":
        errs.add(
            path,
            value,
            "string_too_short",
            "must be 1 to 256 characters (an empty one is not replaced by the default run)",
        )
        return None
    return value


def _first_given(container: Mapping[str, Any], keys: Sequence[str]) -> tuple[str, Any]:
    """The first of ``keys`` whose value ``container`` gives (not None), and that value;
    else the last key and None."""
    for key in keys:
        if container.get(key) is not None:
            return key, container[key]
    return keys[-1], None


def _envelope(name: str, payload: dict[str, Any], ev_id: str, timestamp: Any) -> dict[str, Any]:
    return {
        "id": ev_id,
        "name": name,
        # only None means "now": a timestamp given (0, "") is validated, and refused
        "timestamp": utcnow() if timestamp is None else timestamp,
        "source": "cerebros",
        "payload": payload,
    }


def _from_seed001(rec: Mapping[str, Any], index: int | None, default_run: str) -> list[dict]:
    errs = _Errors(index)
    name = rec.get("event")
    if name not in ML_EVENT_NAMES:
        errs.add(
            "event",
            name,
            "unknown_event",
            f"unknown ml event name (expected one of {', '.join(ML_EVENT_NAMES)})",
        )
    trial_id = rec.get("trial_id")
    if trial_id is None:
        errs.add("trial_id", _MISSING, "missing", "field required")
    metadata = rec.get("metadata") or {}
    measurements = rec.get("measurements") or {}
    for key, val in (("metadata", metadata), ("measurements", measurements)):
        if not isinstance(val, Mapping):
            errs.add(key, val, "dict_type", "must be an object")
    _unknown_fields(errs, rec, _SEED001_FIELDS, "")
    if isinstance(metadata, Mapping) and "spectral_norm" not in metadata:
        for key in metadata:  # free-form, but a misspelt arm must not pass as "no SN"
            if _misspelt(key, "spectral_norm"):
                errs.add(
                    f"metadata.{key}",
                    metadata[key],
                    "extra_forbidden",
                    "unknown field (did you mean 'spectral_norm'?): the trial's arm is read "
                    "from metadata.spectral_norm, and without it the trial is filed as no SN",
                )
    if errs.items:
        raise EventValidationError(errs.items)
    meta = dict(metadata)
    meas = dict(measurements)
    own_run = meta.pop("model_run_id", None)
    if own_run is not None:
        own_run = _given_run(errs, own_run, "metadata.model_run_id")
    else:
        own_run = _given_run(errs, rec.get("model_run_id"), "model_run_id")
    payload: dict[str, Any] = {
        "model_run_id": default_run if own_run is None else own_run,
        "trial_id": trial_id,
    }
    # A post that names no run of its own is told apart by the run it is ingested into
    # (every Cerebros run has a trial_0); the default run keeps the unsalted id, so logs
    # ingested before stay idempotent.
    salt = "" if own_run or default_run == DEFAULT_MODEL_RUN_ID else str(default_run)
    if "study" in meta:
        payload["study"] = meta.pop("study")
    sn_default = False if name in ("ml.trial.start", "ml.trial.complete") else None
    spectral_norm = _bool_field(errs, meta, "spectral_norm", "metadata.spectral_norm", sn_default)
    meta.pop("spectral_norm", None)
    if spectral_norm is not None:
        payload["spectral_norm"] = spectral_norm
    if meta.get("mlflow_run_id") is not None and name != "ml.run.metric":
        payload["mlflow_run_id"] = meta.pop("mlflow_run_id")
    params = meta.pop("hyperparams", None) or meta.pop("parameters", None)
    if params is not None and name not in ("ml.run.metric", "ml.run.stop"):
        payload["parameters"] = params
    if name == "ml.run.metric":
        epoch, step = meta.pop("epoch", None), meta.pop("step", None)
        if epoch is not None and step is not None and epoch != step:
            errs.add(
                "metadata.step",
                step,
                "conflict",
                f"metadata.epoch ({epoch!r}) is the step of these measurements: give one of them",
            )
        step = step if epoch is None else epoch
        if step is None:
            errs.add(
                "metadata.epoch",
                _MISSING,
                "missing",
                "field required (the step of these measurements)",
            )
        payload["step"] = step
        payload["measurements"] = meas
    elif name == "ml.run.stop":
        payload["success"] = _bool_field(errs, meta, "success", "metadata.success", True)
        meta.pop("success", None)
        if "epochs" in meta:
            payload["epochs"] = meta.pop("epochs")
        payload["duration_ms"] = _duration(
            errs, meas.pop("duration_ms", None), "measurements.duration_ms"
        )
        payload["metrics"] = meas
    elif name == "ml.trial.complete":
        payload["duration_ms"] = _duration(
            errs, meas.pop("duration_ms", None), "measurements.duration_ms"
        )
        payload["metrics"] = meas
        for key in ("status", "rank", "artifact_uri"):
            if key in meta:
                payload[key] = meta.pop(key)
    elif name == "ml.trial.failed":
        message, error = meta.pop("error_message", None), meta.pop("error", None)
        kind = meta.pop("error_type", None)
        payload["error_message"] = str(message if message is not None else error or "trial failed")
        payload["error_type"] = str(kind if kind is not None else "trial_failed")
        payload["metrics"] = meas
    elif meas:
        errs.add("measurements", meas, "extra_forbidden", f"{name} carries no measurements")
    if errs.items:
        raise EventValidationError(errs.items)
    payload["metadata"] = meta
    return [
        _envelope(
            str(name),
            payload,
            rec["id"] if rec.get("id") is not None else _event_id(rec, salt),
            rec["timestamp"] if rec.get("timestamp") is not None else meta.get("timestamp"),
        )
    ]


def seed_field_path(rec: Any, j: int, path: str) -> str:
    """The field of wire record ``rec`` that an error about ``path`` of the ``j``-th event
    it was translated into is about: a seed 001 post's ``metadata.epoch`` or
    ``measurements.loss``, a seed 002 report's ``trials[j].metrics.loss``; a canonical
    event's own ``path``."""
    if not isinstance(rec, Mapping) or "name" in rec:
        return path
    field_name = path.removeprefix("payload.")
    if "trials" in rec:
        # a report's event name and outcome both come from the trial's status
        return f"trials[{j}].{'status' if field_name == 'name' else field_name}"
    if path == "name":  # a post's event name
        return "event"
    raw_meta = rec.get("metadata")
    meta: Mapping[str, Any] = raw_meta if isinstance(raw_meta, Mapping) else {}
    if path == "timestamp":
        return "timestamp" if rec.get("timestamp") is not None else "metadata.timestamp"
    if path == "payload":  # the payload as a whole: what it measured, or said
        return "measurements" if rec.get("event") == "ml.run.metric" else "metadata"
    if not path.startswith("payload."):
        return path
    split = min((i for i in (field_name.find("."), field_name.find("[")) if i >= 0), default=-1)
    head, tail = (field_name, "") if split < 0 else (field_name[:split], field_name[split:])
    if head == "trial_id":
        return "trial_id" + tail
    if head == "model_run_id":
        return ("metadata.model_run_id" if "model_run_id" in meta else "model_run_id") + tail
    if head == "step":
        return "metadata.epoch" if "epoch" in meta else "metadata.step"
    if head in ("measurements", "metrics", "duration_ms"):
        return "measurements" + (tail if head != "duration_ms" else ".duration_ms")
    if head == "metadata":
        return "metadata" + tail
    if head == "parameters":
        return ("metadata.hyperparams" if "hyperparams" in meta else "metadata.parameters") + tail
    if head == "error_message" and "error_message" not in meta and "error" in meta:
        return "metadata.error"
    return f"metadata.{field_name}"


def _from_seed002(rec: Mapping[str, Any], index: int | None, default_run: str) -> list[dict]:
    errs = _Errors(index)
    trials = rec.get("trials")
    if not isinstance(trials, list):
        raise EventValidationError(
            [ErrorDetail(index, "trials", trials, "list_type", "must be a list of trial reports")]
        )
    top_key, given_top = _first_given(rec, ("run_id", "model_run_id"))
    top_run = _given_run(errs, given_top, top_key)
    if top_run is None:
        top_run = default_run
    _unknown_fields(errs, rec, _SEED002_REPORT_FIELDS, "")
    out: list[dict[str, Any]] = []
    position: list[int] = []  # each event's trial in the report
    for j, t in enumerate(trials):
        base = f"trials[{j}]"
        if not isinstance(t, Mapping):
            errs.add(base, t, "dict_type", "a trial report must be an object")
            continue
        _unknown_fields(errs, t, _SEED002_TRIAL_FIELDS, f"{base}.")
        if t.get("trial_id") is None:
            errs.add(f"{base}.trial_id", _MISSING, "missing", "field required")
        # the fields read here are checked before the status, so that a trial with an
        # unknown status also has its other faults named (one line per broken rule)
        sn = _bool_field(errs, t, "spectral_norm", f"{base}.spectral_norm", False)
        duration = _duration(errs, t.get("duration_ms"), f"{base}.duration_ms")
        run_key, given_run = _first_given(t, ("run_id", "model_run_id"))
        run = _given_run(errs, given_run, f"{base}.{run_key}")
        raw_status = t.get("status")
        status = _STATUS.get(str(raw_status).lower()) if isinstance(raw_status, str) else None
        if status is None:
            errs.add(
                f"{base}.status",
                raw_status if raw_status is not None else _MISSING,
                "unknown_status",
                "unknown trial status (expected succeeded or failed)",
            )
            continue
        payload: dict[str, Any] = {
            "model_run_id": top_run if run is None else run,
            "trial_id": t.get("trial_id"),
            "spectral_norm": sn,
            "mlflow_run_id": t.get("mlflow_run_id"),
            "metrics": t.get("metrics") or {},
            "parameters": t.get("parameters") or {},
            "duration_ms": duration,
        }
        if status == "completed":
            name = "ml.trial.complete"
            for key in ("artifact_uri", "rank"):
                if t.get(key) is not None:
                    payload[key] = t[key]
        else:
            name = "ml.trial.failed"
            warnings = t.get("warnings") or []
            message = t.get("error") or t.get("error_message") or "; ".join(map(str, warnings))
            payload["error_message"] = str(message or "trial failed")
            payload["error_type"] = str(t.get("error_type") or "trial_failed")
        out.append(_envelope(name, payload, _event_id(t, salt=str(top_run)), t.get("timestamp")))
        position.append(j)
    # Every fault of every trial at once: the events are validated even when a field was
    # already refused above (it stands at its default there), with field paths that point
    # back into the trials list; a field refused above is not named twice (a missing
    # trial_id is no "must be a string (got null)" as well).
    errors = list(errs.items)
    refused = {e.path for e in errors}
    try:
        validate_events(out)
    except EventValidationError as exc:
        for e in exc.errors:
            trial = position[e.index] if e.index is not None else "?"
            path = f"trials[{trial}].{e.path.removeprefix('payload.')}"
            if path not in refused:
                errors.append(ErrorDetail(index, path, e.value, e.rule, e.message))
    if errors:
        raise EventValidationError(errors)
    return out


# The keys of a canonical event besides its name: a record with any of them and no name is
# an event whose name is missing (not a record of another shape).
_CANONICAL_KEYS = frozenset({"id", "timestamp", "payload", "source", "priority", "pipeline"})


def translate_record(
    record: Any, index: int | None = None, *, default_model_run_id: str = DEFAULT_MODEL_RUN_ID
) -> list[Any]:
    """Turn one wire record into canonical event records (dicts, or the event itself).

    Raises:
        EventValidationError: the record is none of the accepted shapes, or breaks a rule.
    """
    if isinstance(record, Mapping):
        if "trials" in record:
            return _from_seed002(record, index, default_model_run_id)
        if "event" in record and "name" not in record:
            return _from_seed001(record, index, default_model_run_id)
        if "name" in record:
            return [record]
        if _CANONICAL_KEYS & set(record):  # a canonical event without its name: say which
            raise EventValidationError(
                [
                    ErrorDetail(
                        index,
                        "name",
                        _MISSING,
                        "missing",
                        "field required (the event name, e.g. ml.trial.complete)",
                    )
                ]
            )
    raise EventValidationError(
        [
            ErrorDetail(
                index,
                "",
                record if not isinstance(record, Mapping) else _MISSING,
                "unknown_shape",
                "not an event: expected a canonical event {name, payload, ...}, a seed 001 post "
                "{event, trial_id, metadata, measurements} or a seed 002 report {trials: [...]}",
            )
        ]
    )


def to_events(
    records: Sequence[Any], *, default_model_run_id: str = DEFAULT_MODEL_RUN_ID
) -> list[Event]:
    """Translate and validate wire records; every error of every record is reported.

    Raises:
        EventValidationError: with each error's record index and field path.
    """
    events, _, errors = _translate(records, default_model_run_id)
    if errors:
        raise EventValidationError(errors)
    return events


def _translate(
    records: Sequence[Any], default_model_run_id: str
) -> tuple[list[Event], list[int], list[ErrorDetail]]:
    """(events, each event's record index, errors by record index in record order)."""
    canonical: list[Any] = []
    origin: list[int] = []
    first: dict[int, int] = {}  # record index -> the index of its first translated event
    errors: list[ErrorDetail] = []
    for i, rec in enumerate(records):
        try:
            translated = translate_record(rec, i, default_model_run_id=default_model_run_id)
        except EventValidationError as exc:
            errors.extend(exc.errors)
            continue
        first[i] = len(canonical)
        canonical.extend(translated)
        origin.extend([i] * len(translated))
    try:
        events = validate_events(canonical)
    except EventValidationError as exc:
        for e in exc.errors:
            if e.index is None:
                errors.append(e)
                continue
            i = origin[e.index]  # said by the posted record's own fields
            path = seed_field_path(records[i], e.index - first[i], e.path)
            errors.append(replace(e, index=i, path=path))
        events = []
    errors.sort(key=lambda e: e.index or 0)
    return (events, origin, []) if not errors else ([], [], errors)

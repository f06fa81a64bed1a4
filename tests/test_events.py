from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic_core import to_json

from thunderline_lab import events as E
from thunderline_lab.events import EventValidationError


def canonical(name: str = "ml.run.metric", **payload: Any) -> dict[str, Any]:
    base = {"model_run_id": "run-1", "trial_id": "trial_001"}
    if name == "ml.run.metric":
        base.update(step=3, metric_name="val_accuracy", metric_value=0.9)
    if name in ("ml.trial.start", "ml.trial.complete"):
        base["spectral_norm"] = True
    if name == "ml.trial.failed":
        base.update(error_message="boom", error_type="diverged")
    base.update(payload)
    return {
        "id": "ev-1",
        "name": name,
        "timestamp": "2026-11-22T12:34:56.789Z",
        "payload": base,
    }


def errors_of(record: dict[str, Any]) -> list[E.ErrorDetail]:
    with pytest.raises(EventValidationError) as info:
        E.validate_event(record)
    return info.value.errors


def only_error(record: dict[str, Any]) -> E.ErrorDetail:
    errs = errors_of(record)
    assert len(errs) == 1, errs
    return errs[0]


# -- event ids ---------------------------------------------------------------------------------


def test_new_event_ids_are_uuid7_hex_and_unique() -> None:
    ids = [E.new_event_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    for ev_id in ids[:100]:
        assert len(ev_id) == 32 and int(ev_id, 16) >= 0
        u = uuid.UUID(ev_id)
        assert (u.version, u.variant) == (7, uuid.RFC_4122)


def test_new_event_ids_sort_by_creation_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # The millisecond prefix orders ids made in different milliseconds (the log's id index
    # then grows at its right edge); within one millisecond the order is random.
    clock = iter([1_700_000_000_000_000_000 + k * 1_000_000 for k in range(50)])
    monkeypatch.setattr(E.time, "time_ns", lambda: next(clock))
    ids = [E.new_event_id() for _ in range(50)]
    assert ids == sorted(ids)
    assert uuid.UUID(ids[0]).int >> 80 == 1_700_000_000_000


def test_constructors_fill_a_fresh_uuid7_id() -> None:
    a = E.trial_start(model_run_id="r", trial_id="t", spectral_norm=True)
    b = E.trial_start(model_run_id="r", trial_id="t", spectral_norm=True)
    assert a.id != b.id and uuid.UUID(a.id).version == 7


# -- seed 000's examples validate as written, inside the canonical envelope -------------------


def test_seed000_trial_complete_example_validates() -> None:
    ev = E.trial_complete(
        model_run_id="550e8400-e29b-41d4-a716-446655440000",
        trial_id="trial_007",
        spectral_norm=True,
        mlflow_run_id="mlflow_abc123",
        metrics={"val_accuracy": 0.9234, "val_loss": 0.0876, "test_accuracy": 0.9187},
        parameters={
            "hidden_size": 256,
            "num_layers": 4,
            "dropout": 0.3,
            "spectral_norm_coeff": 1.0,
        },
        artifact_uri="s3://thunderline-models/run_123/trial_007",
        duration_ms=45_000,
        rank=3,
    )
    assert ev.name == "ml.trial.complete"
    assert ev.priority == "high" and ev.pipeline == "realtime"
    assert ev.payload.spectral_norm is True
    assert ev.payload.status == "completed"
    assert ev.source == "thunderline_lab"
    assert ev.taxonomy_version == 1 and ev.event_version == 1
    assert len(ev.id) == 32 and ev.timestamp.tzinfo is not None
    # the canonical JSON round-trips through validation
    again = E.validate_event(json.loads(ev.to_json()))
    assert again == ev


def test_seed000_run_metric_example_validates() -> None:
    ev = E.run_metric(
        model_run_id="test-run",
        trial_id="trial_003",
        metric_name="val_accuracy",
        metric_value=0.8765,
        step=42,
        spectral_norm=True,
        metadata={"learning_rate": 0.001},
    )
    assert ev.priority == "normal" and ev.pipeline == "realtime"
    assert ev.payload.points() == {"val_accuracy": 0.8765}


def test_run_metric_accepts_seed001_measurements_map() -> None:
    ev = E.run_metric(
        model_run_id="r",
        trial_id="t",
        step=1,
        measurements={"train_loss": 0.1, "val_accuracy": 0.8},
    )
    assert ev.payload.points() == {"train_loss": 0.1, "val_accuracy": 0.8}


def test_every_ml_event_has_a_constructor_with_right_priority() -> None:
    built = [
        E.run_start(model_run_id="r", trial_id="t"),
        E.run_metric(model_run_id="r", trial_id="t", step=0, measurements={"a": 1.0}),
        E.run_stop(model_run_id="r", trial_id="t"),
        E.trial_start(model_run_id="r", trial_id="t", spectral_norm=False),
        E.trial_complete(model_run_id="r", trial_id="t", spectral_norm=False),
        E.trial_failed(model_run_id="r", trial_id="t", error_message="x", error_type="y"),
    ]
    assert [e.name for e in built] == [
        "ml.run.start",
        "ml.run.metric",
        "ml.run.stop",
        "ml.trial.start",
        "ml.trial.complete",
        "ml.trial.failed",
    ]
    assert [e.priority for e in built] == ["high", "normal", "high", "high", "high", "high"]
    assert len({e.id for e in built}) == 6


# -- one test per rule; each asserts the message names the field ---------------------------


def test_required_field_missing_is_named() -> None:
    rec = canonical()
    del rec["payload"]["trial_id"]
    err = only_error(rec)
    assert err.path == "payload.trial_id" and err.rule == "missing"


def test_required_envelope_field_missing_is_named() -> None:
    rec = canonical()
    del rec["timestamp"]
    assert only_error(rec).path == "timestamp"


def test_wrong_type_is_rejected_strictly() -> None:
    err = only_error(canonical(step="3"))
    assert err.path == "payload.step" and err.rule == "int_type"


def test_bool_is_not_a_metric_value() -> None:
    err = only_error(canonical(metric_value=True))
    assert err.path == "payload.metric_value"


def test_constructor_is_strict_about_types() -> None:
    with pytest.raises(EventValidationError) as info:
        E.trial_start(model_run_id="r", trial_id="t", spectral_norm="true")
    assert info.value.errors[0].path == "payload.spectral_norm"


def test_negative_step_is_rejected() -> None:
    err = only_error(canonical(step=-1))
    assert err.path == "payload.step" and "greater than or equal to 0" in err.message


def test_negative_duration_is_rejected() -> None:
    err = only_error(canonical("ml.trial.complete", duration_ms=-5))
    assert err.path == "payload.duration_ms" and err.rule == "greater_than_equal"


def test_rank_below_one_is_rejected() -> None:
    err = only_error(canonical("ml.trial.complete", rank=0))
    assert err.path == "payload.rank" and "greater than or equal to 1" in err.message


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_metric_value_is_rejected_and_says_so(bad: float) -> None:
    err = only_error(canonical(metric_value=bad))
    assert err.path == "payload.metric_value"
    assert "finite" in err.message and "NaN" in err.message
    assert str(bad) in err.line()


def test_non_finite_measurement_names_the_metric() -> None:
    rec = canonical(measurements={"val_loss": math.nan})
    err = only_error(rec)
    assert err.path == "payload.measurements.val_loss" and err.rule == "finite_number"


def test_non_finite_trial_metric_is_rejected() -> None:
    err = only_error(canonical("ml.trial.complete", metrics={"val_accuracy": math.inf}))
    assert err.path == "payload.metrics.val_accuracy"


def test_metric_event_without_any_metric_is_rejected() -> None:
    rec = canonical()
    del rec["payload"]["metric_name"], rec["payload"]["metric_value"]
    err = only_error(rec)
    assert "no metric" in err.message


def test_metric_name_without_value_is_rejected() -> None:
    rec = canonical()
    del rec["payload"]["metric_value"]
    assert "metric_value is required" in only_error(rec).message


def test_trial_status_values() -> None:
    for status in ("completed", "pruned", "cancelled"):
        ev = E.validate_event(canonical("ml.trial.complete", status=status))
        assert ev.payload.status == status
    err = only_error(canonical("ml.trial.complete", status="exploded"))
    assert err.path == "payload.status" and "completed" in err.message


def test_pruned_is_kept_distinct_from_failed() -> None:
    pruned = E.validate_event(canonical("ml.trial.complete", status="pruned"))
    failed = E.validate_event(canonical("ml.trial.failed"))
    assert pruned.payload.status == "pruned"
    assert failed.name == "ml.trial.failed"


def test_trial_events_require_spectral_norm() -> None:
    rec = canonical("ml.trial.start")
    del rec["payload"]["spectral_norm"]
    assert only_error(rec).path == "payload.spectral_norm"


def test_name_without_reserved_prefix_is_rejected() -> None:
    err = errors_of(canonical() | {"name": "training.metric"})[0]
    assert err.path == "name" and err.rule == "reserved_prefix"
    assert "system." in err.message


def test_unknown_ml_name_is_rejected() -> None:
    err = only_error(canonical() | {"name": "ml.run.metrc"})
    assert err.path == "name" and err.rule == "unknown_event"
    assert "ml.run.metric" in err.message


def test_other_reserved_prefix_is_a_generic_event() -> None:
    ev = E.validate_event(canonical() | {"name": "system.heartbeat", "payload": {"host": "a"}})
    assert isinstance(ev, E.GenericEvent) and ev.payload == {"host": "a"}


def test_unknown_payload_field_is_rejected() -> None:
    err = only_error(canonical(metric_vale=1.0))
    assert err.path == "payload.metric_vale" and err.rule == "extra_forbidden"


def test_naive_timestamp_is_rejected() -> None:
    err = only_error(canonical() | {"timestamp": "2026-11-22T12:34:56"})
    assert err.path == "timestamp" and "timezone" in err.message


def test_spectral_norm_coeff_must_be_positive() -> None:
    err = only_error(canonical("ml.trial.start", spectral_norm_coeff=0.0))
    assert err.path == "payload.spectral_norm_coeff"


def test_metric_name_must_be_mlflow_safe() -> None:
    err = only_error(canonical(metric_name="val acc?"))
    assert err.path == "payload.metric_name"


def test_numpy_scalars_in_free_form_maps_are_taken_as_the_numbers_they_hold() -> None:
    # a notebook's parameters are often numpy's (grid[i]): JSON has no type for them, and
    # the store's writer failed on them later, unnamed
    params = {"n": np.int64(3), "lr": np.float32(0.5), "on": np.bool_(True), "s": np.str_("a")}
    params["nested"] = [np.int32(1), {"w": np.float64(0.25)}]
    ev = E.trial_start(model_run_id="r", trial_id="t", spectral_norm=True, parameters=params)
    got = json.loads(ev.to_json())["payload"]["parameters"]
    assert got == {"n": 3, "lr": 0.5, "on": True, "s": "a", "nested": [1, {"w": 0.25}]}
    assert type(ev.payload.parameters["n"]) is int


@pytest.mark.parametrize(
    ("value", "path", "rule"),
    [
        (float("nan"), "payload.parameters.x", "finite_number"),
        (np.float32("nan"), "payload.parameters.x", "finite_number"),  # was let through
        (np.arange(3), "payload.parameters.x", "json_type"),
        (object(), "payload.parameters.x", "json_type"),
        ([1, {"y": object()}], "payload.parameters.x[1].y", "json_type"),
        (b"\xff", "payload.parameters.x", "json_type"),
    ],
)
def test_a_free_form_value_json_cannot_hold_is_refused_by_field_at_construction(
    value: Any, path: str, rule: str
) -> None:
    with pytest.raises(EventValidationError) as info:
        E.trial_start(model_run_id="r", trial_id="t", spectral_norm=True, parameters={"x": value})
    (err,) = info.value.errors
    assert (err.path, err.rule) == (path, rule)


@pytest.mark.parametrize("key", ["", "val acc?", "x" * 251])
def test_a_bad_metric_name_as_a_key_is_named_by_the_key(key: str) -> None:
    # pydantic locates a refused key as (..., key, "[key]"): it was named
    # "payload.measurements..[key]" with pydantic's own wording
    record = canonical(metric_name=None, metric_value=None, measurements={"ok": 1.0, key: 2.0})
    err = only_error(record)
    assert err.path == f"payload.measurements[{json.dumps(key)}]"
    assert err.message.startswith("not a metric name: 1 to 250 letters")
    assert err.value == key


def test_all_errors_of_all_records_are_reported_with_index() -> None:
    good = canonical()
    bad1 = canonical(step=-1, metric_value=math.nan) | {"id": "b1"}
    bad2 = canonical() | {"id": "b2", "name": "nope"}
    with pytest.raises(EventValidationError) as info:
        E.validate_events([good, bad1, bad2])
    got = {(e.index, e.path) for e in info.value.errors}
    assert got >= {(1, "payload.step"), (1, "payload.metric_value"), (2, "name")}
    lines = info.value.with_source("events.json").lines()
    assert all(line.startswith("events.json: record ") for line in lines)


def test_validate_events_json_reports_bad_json() -> None:
    with pytest.raises(EventValidationError) as info:
        E.validate_events_json("[{")
    assert info.value.errors[0].rule == "json_invalid"


def test_validate_events_json_fast_path() -> None:
    evs = [
        E.run_metric(model_run_id="r", trial_id="t", step=i, metric_name="a", metric_value=1.0)
        for i in range(3)
    ]
    text = "[" + ",".join(e.to_json() for e in evs) + "]"
    assert E.validate_events_json(text) == evs


def test_make_event_fills_envelope() -> None:
    ts = datetime(2026, 1, 2, tzinfo=UTC)
    ev = E.make_event(
        "ml.run.start",
        model_run_id="r",
        trial_id="t",
        timestamp=ts,
        correlation_id="c1",
        id="fixed",
    )
    assert (ev.id, ev.timestamp, ev.correlation_id) == ("fixed", ts, "c1")


def test_json_schema_covers_every_ml_event() -> None:
    schema = E.event_json_schema()
    text = json.dumps(schema)
    for name in E.ML_EVENT_NAMES:
        assert name in text
    assert schema["$schema"].startswith("https://json-schema.org/")


# -- property tests -------------------------------------------------------------------------

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=12)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@st.composite
def metric_events(draw: st.DrawFn) -> E.Event:
    measurements = draw(st.dictionaries(names, finite, max_size=5))
    single = draw(st.booleans()) or not measurements
    kwargs: dict[str, Any] = {"measurements": measurements}
    if single:
        kwargs.update(metric_name=draw(names), metric_value=draw(finite))
    return E.run_metric(
        model_run_id=draw(names),
        trial_id=draw(names),
        step=draw(st.integers(min_value=0, max_value=2**40)),
        spectral_norm=draw(st.none() | st.booleans()),
        **kwargs,
    )


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(metric_events())
def test_random_valid_events_round_trip(ev: E.Event) -> None:
    assert E.validate_event(json.loads(ev.to_json())) == ev
    assert E.validate_events_json("[" + ev.to_json() + "]") == [ev]


mutation_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(metric_events(), st.data())
def test_random_mutations_are_rejected_or_valid_never_crash(
    ev: E.Event, data: st.DataObject
) -> None:
    record = json.loads(ev.to_json())
    target = data.draw(st.sampled_from(["envelope", "payload"]))
    container = record if target == "envelope" else record["payload"]
    key = data.draw(st.sampled_from(sorted(container)) | names)
    if data.draw(st.booleans()) and key in container:
        del container[key]
    else:
        container[key] = data.draw(mutation_values)
    try:
        E.validate_event(record)
    except EventValidationError as exc:
        assert exc.errors
        for err in exc.errors:
            assert err.rule and err.message
            assert isinstance(err.line(), str)


def test_counts_beyond_sqlite_int64_are_rejected() -> None:
    err = only_error(canonical(step=2**63))
    assert err.path == "payload.step" and err.rule == "less_than_equal"
    assert E.validate_event(canonical(step=2**63 - 1)).payload.step == 2**63 - 1


def test_timestamp_that_overflows_in_utc_is_rejected() -> None:
    err = only_error(canonical() | {"timestamp": "0001-01-01T00:00:00+05:00"})
    assert err.path == "timestamp" and "out of range" in err.message


def test_unserializable_text_is_named_by_record() -> None:
    ok = E.run_metric(model_run_id="r", trial_id="t", step=0, metric_name="a", metric_value=1.0)
    bad = E.run_metric(
        model_run_id="r",
        trial_id="t",
        step=1,
        metric_name="a",
        metric_value=1.0,
        metadata={"note": "\ud800"},  # a lone surrogate: json.loads lets it through
    )
    with pytest.raises(EventValidationError) as info:
        E.dump_events([ok, bad])
    assert [(e.index, e.rule) for e in info.value.errors] == [(1, "unserializable")]


# -- the records fast path agrees with the models ----------------------------------------------

idents = names | st.text(min_size=1, max_size=4)
maybe_metrics = st.dictionaries(names, finite, max_size=3)


@st.composite
def any_ml_event(draw: st.DrawFn) -> dict[str, Any]:
    """A canonical ml.* event as parsed JSON, from every constructor, optional fields drawn."""
    name = draw(st.sampled_from(E.ML_EVENT_NAMES))
    if name == "ml.run.metric":
        return json.loads(draw(metric_events()).to_json())
    payload: dict[str, Any] = {"model_run_id": draw(idents), "trial_id": draw(idents)}
    optional = {
        "study": idents,
        "spectral_norm_coeff": st.floats(min_value=0.01, max_value=10),
        "mlflow_run_id": idents,
        "metrics": maybe_metrics,
        "parameters": st.dictionaries(names, finite | st.integers() | names, max_size=3),
        "duration_ms": st.integers(min_value=0, max_value=10**9),
    }
    if name in ("ml.trial.start", "ml.trial.complete"):
        payload["spectral_norm"] = draw(st.booleans())
    if name == "ml.trial.complete":
        payload["status"] = draw(st.sampled_from(["completed", "pruned", "cancelled"]))
        payload["rank"] = draw(st.integers(min_value=1, max_value=50))
    if name == "ml.trial.failed":
        payload.update(error_message=draw(st.text(max_size=20)), error_type=draw(idents))
    allowed = set(E._EVENT_CLASSES[name].model_fields["payload"].annotation.model_fields)
    for key, strategy in optional.items():
        if key in allowed and draw(st.booleans()):
            payload[key] = draw(strategy)
    return json.loads(E.make_event(name, **payload).to_json())


def both_ways(record: Any) -> tuple[Any, Any]:
    """(model result or error lines, records result or error lines) for one input."""
    results = []
    for validate in (E.validate_events, E.validate_records):
        try:
            results.append(validate([record]))
        except EventValidationError as exc:
            results.append(sorted(exc.lines()))
    return results[0], results[1]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(any_ml_event(), st.data())
def test_records_fast_path_agrees_with_the_models(
    record: dict[str, Any], data: st.DataObject
) -> None:
    if data.draw(st.booleans()):  # mutate one field of the envelope or the payload
        container = data.draw(st.sampled_from([record, record["payload"]]))
        key = data.draw(st.sampled_from(sorted(container)) | names)
        if data.draw(st.booleans()) and key in container:
            del container[key]
        else:
            container[key] = data.draw(mutation_values | st.floats())
    models, records = both_ways(record)
    if isinstance(models[0], str):  # rejected: the same errors, named the same way
        assert records == models
    else:
        assert records == [models[0].model_dump()]
        assert to_json(records[0]).decode() == models[0].model_dump_json()


def fast_or_models(record: Any) -> tuple[Any, Any]:
    """(the fast path's records or None, the models' events or error lines) for one input."""
    fast = E.fast_events([record])
    try:
        models: Any = E.validate_events([record])
    except EventValidationError as exc:
        models = sorted(exc.lines())
    return fast, models


def assert_fast_agrees(record: Any) -> None:
    """The fast path only accepts what the models accept, and reads it the same way."""
    fast, models = fast_or_models(record)
    if E.fast_events(json.dumps(record, default=str).encode()) is not None:  # from JSON text
        assert not isinstance(models[0], str), (record, models)
    if fast is None:
        return
    assert not isinstance(models[0], str), (record, models)
    assert [E._fast_record(ev) for ev in fast] == [models[0].model_dump()]
    assert json.loads(E.encode_fast(fast[0])) == json.loads(models[0].model_dump_json())


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(any_ml_event(), st.data())
def test_msgspec_fast_path_never_accepts_what_the_models_refuse(
    record: dict[str, Any], data: st.DataObject
) -> None:
    if data.draw(st.booleans()):
        container = data.draw(st.sampled_from([record, record["payload"]]))
        key = data.draw(st.sampled_from(sorted(container)) | names)
        if data.draw(st.booleans()) and key in container:
            del container[key]
        else:
            container[key] = data.draw(mutation_values | st.floats() | st.text(max_size=30))
    assert_fast_agrees(record)


def test_the_fast_path_accepts_every_canonical_event() -> None:
    # not vacuous: canonical events of every kind really take the fast path, dicts and text
    batch = [canonical(name) for name in E.ML_EVENT_NAMES]
    for i, r in enumerate(batch):
        r["id"] = f"ev-{i}"
    assert E.fast_events(batch) is not None
    fast = E.fast_events(json.dumps(batch).encode())
    assert fast is not None and [E.FAST_NAMES[type(ev)] for ev in fast] == list(E.ML_EVENT_NAMES)
    assert [E._fast_record(ev) for ev in fast] == [
        ev.model_dump() for ev in E.validate_events(batch)
    ]


@pytest.mark.parametrize(
    "record",
    [
        canonical(metric_name="loss\n"),  # Python's $ would match before the newline
        canonical(metric_name="loss\n", metric_value=1.0, measurements={"a\n": 1.0}),
        canonical() | {"timestamp": "2026-11-22T12:34:56.7899999Z"},  # models truncate
        canonical() | {"timestamp": "2026-11-22T12:34:56.789+05:00"},
        canonical() | {"timestamp": "2026-11-22 12:34:56Z"},
        canonical() | {"timestamp": "2026-11-22T12:34Z"},
        canonical() | {"timestamp": "2026-11-22T12:34:56"},  # no timezone
        canonical() | {"timestamp": 1764000000},  # a Unix time: refused by both
        canonical() | {"timestamp": "1764000000"},
        canonical() | {"timestamp": "9999-12-31T23:59:59-05:00"},  # overflows in UTC
        canonical(metric_value=1),  # an int where a float belongs: accepted as 1.0
        canonical(metric_value=True),
        canonical(step=3.0),
        canonical(step=True),
        canonical(step=2**63),
        canonical(metric_value=1e308 * 10),
        canonical(spectral_norm=1),
        canonical() | {"taxonomy_version": True},
        canonical() | {"extra": 1},
        canonical("ml.trial.complete", status="failed"),
        canonical("ml.trial.complete", spectral_norm_coeff=0.0),
        canonical("ml.trial.complete", rank=0),
        canonical("ml.run.stop", metrics={"a": math.inf}),
        canonical("ml.trial.start", parameters={"lr": math.nan}),  # free-form: kept as given
        canonical() | {"id": ""},
        canonical() | {"id": "x" * 257},
        canonical() | {"name": "ml.run.bogus"},
        canonical() | {"name": "system.heartbeat", "payload": {"x": 1}},
        canonical(metadata={"deep": json.loads("[" * 300 + "]" * 300)}),  # models can't write it
        canonical(metadata={"deep": json.loads("[" * 50 + "]" * 50)}),
    ],
)
def test_msgspec_fast_path_edge_cases_agree_with_the_models(record: dict[str, Any]) -> None:
    assert_fast_agrees(record)


def test_a_rule_the_fast_path_cannot_translate_stops_the_import() -> None:
    from typing import Annotated

    from pydantic import StringConstraints, field_validator

    with pytest.raises(TypeError, match="cannot translate"):
        E._fast_type(str, [StringConstraints(to_lower=True)])
    with pytest.raises(TypeError, match="cannot check a pattern"):
        E._fast_type(dict[str, Annotated[str, StringConstraints(pattern="^a$")]])

    class Checked(E.TrialStart):
        @field_validator("trial_id")
        @classmethod
        def _no_spaces(cls, v: str) -> str:
            return v

    with pytest.raises(TypeError, match="cannot translate validator"):
        E._fast_struct(Checked)


def test_metric_names_are_checked_after_the_batch_and_the_cache_admits_no_bad_name() -> None:
    good = canonical(measurements={"val_loss": 0.5, "lr": 0.1})
    assert E.fast_events([good]) is not None  # caches both names as matching
    for bad_name in ("val_loss\n", "val loss!", "λ"):
        bad = canonical(measurements={"val_loss": 0.5, bad_name: 0.1})
        assert E.fast_events([good, bad]) is None
        with pytest.raises(EventValidationError) as info:
            E.validate_records([good, bad])
        assert [e.index for e in info.value.errors] == [1]
        assert E.fast_events([canonical(metric_name=bad_name)]) is None


@pytest.mark.parametrize(
    "record",
    [
        canonical(metric_value=None),  # metric_name without a value (a Python-side rule)
        canonical(metric_name=None, metric_value=None),  # no metric at all
        canonical() | {"timestamp": "0001-01-01T00:00:00+05:00"},  # overflows in UTC
        canonical() | {"name": "ml.run.bogus"},
        canonical() | {"name": "system.heartbeat", "payload": {"x": 1}},  # generic: accepted
    ],
)
def test_records_fast_path_checks_the_python_side_rules(record: dict[str, Any]) -> None:
    models, records = both_ways(record)
    if isinstance(models[0], str):
        assert records == models
    else:
        assert records == [models[0].model_dump()]


def test_records_of_a_mixed_batch_name_every_bad_record() -> None:
    good = canonical()
    with pytest.raises(EventValidationError) as info:
        E.validate_records([good, canonical(step=-1), good, canonical(metric_value=math.nan)])
    assert [(e.index, e.path) for e in info.value.errors] == [
        (1, "payload.step"),
        (3, "payload.metric_value"),
    ]


def test_gc_pause_restores_the_collector_and_nests() -> None:
    import gc

    assert gc.isenabled()
    with E.gc_paused():
        with E.gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer batch is still in flight
    assert gc.isenabled()
    gc.disable()  # a caller that turned the collector off keeps it off
    try:
        with E.gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize(
    "make, path",
    [
        (
            lambda v: E.trial_start(
                model_run_id="r", trial_id="t", spectral_norm=True, parameters={"lr": v}
            ),
            "payload.parameters.lr",
        ),
        (
            lambda v: E.run_metric(
                model_run_id="r",
                trial_id="t",
                step=1,
                measurements={"a": 1.0},
                metadata={"x": [1, {"y": v}]},
            ),
            "payload.metadata.x[1].y",
        ),
        (lambda v: E.make_event("system.note", v={"w": v}), "payload.v.w"),
    ],
)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_free_form_fields_refuse_nan_and_infinity(make: Any, path: str, value: float) -> None:
    # the store would write them as null without a word
    with pytest.raises(EventValidationError) as info:
        make(value)
    [err] = info.value.errors
    assert (err.path, err.rule) == (path, "finite_number")


def test_both_paths_refuse_nan_in_free_form_maps() -> None:
    ev = E.trial_start(model_run_id="r", trial_id="t", spectral_norm=True, metadata={"x": 1.5})
    record = ev.model_dump(mode="json")
    assert E.fast_events([record]) is not None
    for bad in ({"x": math.nan}, {"x": {"y": [math.inf]}}):
        broken = {**record, "payload": {**record["payload"], "metadata": bad}}
        assert E.fast_events([broken]) is None
        with pytest.raises(EventValidationError) as info:
            E.validate_records([broken])
        assert info.value.errors[0].rule == "finite_number"
        assert info.value.errors[0].path.startswith("payload.metadata.x")


@pytest.mark.parametrize(
    "given, missing",
    [({"metric_name": "loss"}, "metric_value"), ({"metric_value": 0.5}, "metric_name")],
)
def test_a_metric_name_without_its_value_is_named_plainly(
    given: dict[str, Any], missing: str
) -> None:
    with pytest.raises(EventValidationError) as info:
        E.run_metric(model_run_id="r", trial_id="t", step=1, **given)
    [err] = info.value.errors
    other = next(iter(given))
    assert err.message == (
        f"{missing} is required with {other} (give both, or neither and measurements)"
    )


def test_an_empty_id_or_timestamp_given_is_validated_not_replaced() -> None:
    # make_event(id="") and timestamp="" were silently replaced by a new id and "now"
    for field in ({"id": ""}, {"timestamp": ""}, {"timestamp": 0}):  # 0: not a Unix time
        with pytest.raises(EventValidationError) as info:
            E.trial_start(model_run_id="r", trial_id="t", spectral_norm=True, **field)
        assert [e.path for e in info.value.errors] == list(field)


def test_a_numpy_integer_in_a_typed_field_is_shown_as_what_it_is() -> None:
    # it was shown as (got "3"): text, which the user had not given
    with pytest.raises(EventValidationError) as info:
        E.run_metric(
            model_run_id="r", trial_id="t", step=np.int64(3), metric_name="a", metric_value=1.0
        )
    assert "payload.step: must be an integer (got np.int64(3))" in str(info.value)


def _nested_lists(levels: int) -> list[Any]:
    """``levels`` arrays one inside the other (as parsed JSON: Python's json reads them)."""
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


@pytest.mark.parametrize("levels", [E._FREE_FORM_MAX_LEVELS + 1, 299, 480, 490, 980])
def test_a_free_form_value_nested_too_deeply_is_one_clean_error_by_field(levels: int) -> None:
    # metadata {"a": <levels - 1 arrays>} nests ``levels`` levels: it was a RecursionError
    # (490 and more), or "cannot be written as JSON" with no field once validated
    record = canonical("ml.trial.start", metadata={"a": _nested_lists(levels - 1)})
    err = only_error(record)
    assert (err.path, err.rule) == ("payload.metadata", "json_depth")
    assert err.line() == (
        f"payload.metadata: nested too deeply (more than {E._FREE_FORM_MAX_LEVELS} levels "
        "of objects and arrays) [json_depth]"
    )
    with pytest.raises(EventValidationError) as info:  # the ingest fast path's models
        E.validate_records([canonical(), record])
    assert [(e.index, e.path, e.rule) for e in info.value.errors] == [
        (1, "payload.metadata", "json_depth")
    ]
    with pytest.raises(EventValidationError) as info:  # a generic event's payload
        E.make_event("system.note", deep=_nested_lists(levels - 1))
    assert [(e.path, e.rule) for e in info.value.errors] == [("payload", "json_depth")]


def test_a_free_form_value_at_the_depth_limit_is_accepted_and_can_be_written() -> None:
    deep = {"a": _nested_lists(E._FREE_FORM_MAX_LEVELS - 1)}  # the limit, itself included
    record = canonical("ml.trial.start", parameters=deep)
    ev = E.validate_event(record)
    assert E.dump_events([ev]) == [ev.to_json()]  # the store's writer takes it
    assert E.validate_records([record])[0]["payload"]["parameters"] == deep


@pytest.mark.parametrize(
    "stamp", [5, 0, -1, 1700000000000, 5.5, True, "5", "-1", "1700000000000", "yesterday"]
)
def test_a_timestamp_must_be_date_time_text_not_a_unix_time(stamp: Any) -> None:
    # numbers (and numeric text) were read as Unix times: 5 as 1970-01-01T00:00:05Z
    record = canonical() | {"timestamp": stamp}
    err = only_error(record)
    assert err.line() == (
        "timestamp: must be an RFC 3339 date-time string (e.g. 2026-11-22T12:34:56Z) "
        f"(got {json.dumps(stamp)}) [datetime_type]"
    )
    assert E.fast_events([record]) is None
    for validate in (E.validate_records, lambda r: E.validate_events_json(json.dumps(r))):
        with pytest.raises(EventValidationError) as info:
            validate([canonical(), record])
        assert [(e.index, e.path, e.rule) for e in info.value.errors] == [
            (1, "timestamp", "datetime_type")
        ]
    with pytest.raises(EventValidationError) as info:
        E.trial_start(model_run_id="r", trial_id="t", spectral_norm=True, timestamp=stamp)
    assert [(e.path, e.rule) for e in info.value.errors] == [("timestamp", "datetime_type")]


def test_a_timestamp_as_a_datetime_or_date_time_text_is_still_read() -> None:
    at = datetime(2026, 11, 22, 12, 34, 56, tzinfo=UTC)
    for stamp in (at, "2026-11-22T12:34:56Z", "2026-11-22T13:34:56+01:00"):
        assert E.validate_event(canonical() | {"timestamp": stamp}).timestamp == at
        assert E.validate_records([canonical() | {"timestamp": stamp}])[0]["timestamp"] == at
    assert only_error(canonical() | {"timestamp": "2026-11-22T12:34:56"}).rule == ("timezone_aware")
    schema = E.event_json_schema()["$defs"]["RunMetricEvent"]["properties"]["timestamp"]
    assert schema == {"format": "date-time", "title": "Timestamp", "type": "string"}

from __future__ import annotations

import json
from typing import Any

import pytest

from thunderline_lab.events import EventValidationError
from thunderline_lab.store import TrialStore
from thunderline_lab.wire import (
    lenient_bool,
    load_events,
    parse_json_records,
    read_json_records,
    to_events,
)

SEED001_START = {
    "event": "ml.run.start",
    "trial_id": "abc-123",
    "metadata": {"spectral_norm": True, "hyperparams": {"learning_rate": 0.001, "n_layers": 4}},
}
SEED001_METRIC = {
    "event": "ml.run.metric",
    "trial_id": "abc-123",
    "metadata": {"epoch": 3},
    "measurements": {"train_loss": 0.123, "val_accuracy": 0.891},
}
SEED001_STOP = {
    "event": "ml.run.stop",
    "trial_id": "abc-123",
    "metadata": {"success": True, "epochs": 10, "mlflow_run_id": "mlf-1"},
    "measurements": {"duration_ms": 45000, "final_val_accuracy": 0.9},
}
SEED002 = {
    "trials": [
        {
            "trial_id": "trial_007",
            "status": "succeeded",
            "spectral_norm": True,
            "mlflow_run_id": "mlflow_abc",
            "metrics": {"accuracy": 0.95},
            "parameters": {"lr": 0.001},
        },
        {"trial_id": "trial_008", "status": "failed", "warnings": ["out of memory"]},
    ]
}


def errors(records: list[Any]) -> list[tuple[int | None, str, str]]:
    with pytest.raises(EventValidationError) as info:
        to_events(records)
    return [(e.index, e.path, e.rule) for e in info.value.errors]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (True, True),
        (False, False),
        ("true", True),
        ("False", False),
        (1, True),
        (0, False),
        ("1", True),
        ("0", False),
        ("yes", True),
        (None, False),
    ],
)
def test_lenient_booleans(raw: Any, expected: bool) -> None:
    assert lenient_bool(raw) is expected


@pytest.mark.parametrize("raw", ["maybe", 2, [], {}])
def test_lenient_booleans_still_reject_garbage(raw: Any) -> None:
    with pytest.raises(ValueError, match="boolean"):
        lenient_bool(raw)


def test_seed001_posts_translate_and_attribute_to_default_run() -> None:
    evs = to_events([SEED001_START, SEED001_METRIC, SEED001_STOP], default_model_run_id="exp-9")
    start, metric, stop = evs
    assert start.name == "ml.run.start" and start.payload.model_run_id == "exp-9"
    assert start.payload.spectral_norm is True
    assert start.payload.parameters == {"learning_rate": 0.001, "n_layers": 4}
    assert metric.payload.step == 3
    assert metric.payload.points() == {"train_loss": 0.123, "val_accuracy": 0.891}
    assert stop.payload.success is True and stop.payload.duration_ms == 45000
    assert stop.payload.mlflow_run_id == "mlf-1"
    assert stop.payload.metrics == {"final_val_accuracy": 0.9}


def test_seed001_metadata_model_run_id_wins() -> None:
    post = {**SEED001_METRIC, "metadata": {"epoch": 1, "model_run_id": "explicit"}}
    assert to_events([post])[0].payload.model_run_id == "explicit"


def test_seed001_ids_are_deterministic_so_reposts_are_duplicates() -> None:
    a = to_events([SEED001_METRIC])[0]
    b = to_events([json.loads(json.dumps(SEED001_METRIC))])[0]
    assert a.id == b.id
    store = TrialStore()
    assert store.append([a]).accepted == 1
    assert store.append([b]).duplicates == 1


def test_seed001_metric_without_epoch_names_the_field() -> None:
    post = {**SEED001_METRIC, "metadata": {}}
    assert errors([post]) == [(0, "metadata.epoch", "missing")]


def test_seed001_unknown_event_name() -> None:
    assert errors([{**SEED001_METRIC, "event": "ml.run.metrics"}])[0][1:] == (
        "event",
        "unknown_event",
    )


def test_seed001_lenient_boolean_field_error_names_path() -> None:
    post = {**SEED001_START, "metadata": {"spectral_norm": "perhaps"}}
    assert errors([post]) == [(0, "metadata.spectral_norm", "bool_type")]


def test_seed001_nan_measurement_is_rejected_with_record_index() -> None:
    post = {**SEED001_METRIC, "measurements": {"train_loss": float("nan")}}
    errs = errors([SEED001_START, post])
    assert errs == [(1, "measurements.train_loss", "finite_number")]


@pytest.mark.parametrize(
    ("post", "path"),
    [
        ({"event": "ml.run.metric", "metadata": {"epoch": "3"}}, "metadata.epoch"),
        ({"event": "ml.run.metric", "metadata": {"step": -1}}, "metadata.step"),
        ({"event": "ml.run.metric", "metadata": {"epoch": 1}, "measurements": {}}, "measurements"),
        ({"event": "ml.trial.complete", "metadata": {"status": "done"}}, "metadata.status"),
        ({"event": "ml.trial.complete", "metadata": {"rank": "first"}}, "metadata.rank"),
        (
            {"event": "ml.trial.start", "metadata": {"hyperparams": "lr=0.1"}},
            "metadata.hyperparams",
        ),
        (
            {"event": "ml.trial.start", "metadata": {"parameters": {"lr": float("inf")}}},
            "metadata.parameters.lr",
        ),
        ({"event": "ml.trial.start", "metadata": {"note": float("nan")}}, "metadata.note"),
        ({"event": "ml.trial.start", "trial_id": ""}, "trial_id"),
        ({"event": "ml.trial.start", "metadata": {"model_run_id": 5}}, "metadata.model_run_id"),
        ({"event": "ml.trial.complete", "measurements": {"acc": float("nan")}}, "measurements.acc"),
        ({"event": "ml.run.metric", "measurements": {"": 1.0}}, 'measurements[""]'),
        ({"event": "ml.trial.complete", "measurements": {"a*b": 1.0}}, 'measurements["a*b"]'),
    ],
)
def test_seed001_errors_name_the_posts_own_fields(post: dict[str, Any], path: str) -> None:
    # the post's fields, not those of the canonical event it is translated into
    # (payload.step, payload.measurements.x): what the user wrote is what is named
    record: dict[str, Any] = {"trial_id": "t1", **post}
    if post["event"] == "ml.run.metric":
        record.setdefault("measurements", {"loss": 0.5})
        if "step" not in post.get("metadata", {}):
            record["metadata"] = {"epoch": 0, **post.get("metadata", {})}
    found = errors([SEED001_START, record])
    assert [p for i, p, _ in found if i == 1] == [path], found


def test_seed001_epoch_and_step_that_disagree_are_refused_not_one_dropped() -> None:
    both = {**SEED001_METRIC, "metadata": {"epoch": 3, "step": 300}}
    assert errors([both]) == [(0, "metadata.step", "conflict")]
    same = {**SEED001_METRIC, "metadata": {"epoch": 3, "step": 3}}
    assert to_events([same])[0].payload.step == 3


def test_seed001_a_null_error_message_is_no_message_not_the_text_none() -> None:
    failed = {"event": "ml.trial.failed", "trial_id": "t", "metadata": {"error_message": None}}
    payload = to_events([failed])[0].payload
    assert (payload.error_message, payload.error_type) == ("trial failed", "trial_failed")
    failed["metadata"] = {"error": "out of memory"}
    assert to_events([failed])[0].payload.error_message == "out of memory"


@pytest.mark.parametrize(
    "key", ["spectral_nrom", "SpectralNorm", "spectral-norm", "use_spectral_norm"]
)
def test_seed001_a_misspelt_spectral_norm_is_refused_not_filed_as_no_sn(key: str) -> None:
    post = {**SEED001_START, "metadata": {key: True}}
    assert errors([post]) == [(0, f"metadata.{key}", "extra_forbidden")]
    # free-form metadata stays free-form, and a longer name of its own is no misspelling
    ok = {**SEED001_START, "metadata": {"spectral_norm": True, "spectral_norm_coeff": 2.0}}
    assert to_events([ok])[0].payload.spectral_norm is True


def test_seed002_report_maps_statuses_and_defaults() -> None:
    done, failed = to_events([SEED002])
    assert done.name == "ml.trial.complete" and done.payload.status == "completed"
    assert done.payload.spectral_norm is True and done.payload.mlflow_run_id == "mlflow_abc"
    assert failed.name == "ml.trial.failed" and failed.payload.error_message == "out of memory"
    # backward-compatible defaults: spectral_norm false, mlflow_run_id null
    assert failed.payload.spectral_norm is False and failed.payload.mlflow_run_id is None


@pytest.mark.parametrize("flag", ["true", 1, "1", True])
def test_seed002_lenient_spectral_norm(flag: Any) -> None:
    report = {"trials": [{"trial_id": "t", "status": "succeeded", "spectral_norm": flag}]}
    assert to_events([report])[0].payload.spectral_norm is True


def test_seed002_unknown_status_is_rejected_clearly() -> None:
    report = {
        "trials": [{"trial_id": "t", "status": "succeeded"}, {"trial_id": "u", "status": "skipped"}]
    }
    assert errors([report]) == [(0, "trials[1].status", "unknown_status")]


def test_seed002_error_paths_point_into_trials() -> None:
    report = {
        "trials": [{"trial_id": "t", "status": "succeeded", "metrics": {"acc": float("inf")}}]
    }
    assert errors([report]) == [(0, "trials[0].metrics.acc", "finite_number")]


def test_seed002_names_every_fault_of_every_trial_at_once() -> None:
    # a refused flag does not hide the NaN beside it, and a trial left out (its status
    # unknown) does not shift the trials[...] of those after it
    report = {
        "trials": [
            {
                "trial_id": "t0",
                "status": "succeeded",
                "spectral_norm": "yes please",
                "metrics": {"acc": float("nan")},
            },
            {"trial_id": "t1", "status": "skipped"},
            {"trial_id": "t2", "status": "succeeded", "metrics": {"acc": float("inf")}},
        ]
    }
    assert sorted(errors([report])) == [
        (0, "trials[0].metrics.acc", "finite_number"),
        (0, "trials[0].spectral_norm", "bool_type"),
        (0, "trials[1].status", "unknown_status"),
        (0, "trials[2].metrics.acc", "finite_number"),
    ]


def test_seed002_a_trial_with_an_unknown_status_has_its_other_faults_named_too() -> None:
    # only the status was reported; the flag and duration beside it came to light on the
    # next attempt, one at a time
    report = {
        "trials": [
            {"trial_id": "t", "status": "crashed", "spectral_norm": "maybe", "duration_ms": "slow"}
        ]
    }
    assert sorted(errors([report])) == [
        (0, "trials[0].duration_ms", "int_type"),
        (0, "trials[0].spectral_norm", "bool_type"),
        (0, "trials[0].status", "unknown_status"),
    ]


def test_seed002_a_missing_trial_id_is_one_error_not_two() -> None:
    # it was also named "must be a string (got null)" by the translated event's check
    report = {"trials": [{"status": "failed", "metrics": {"acc": "high"}}]}
    assert sorted(errors([report])) == [
        (0, "trials[0].metrics.acc", "float_type"),
        (0, "trials[0].trial_id", "missing"),
    ]


def test_unknown_record_shape() -> None:
    assert errors([[1, 2]])[0][2] == "unknown_shape"
    assert errors([{"foo": 1}])[0][2] == "unknown_shape"


def test_parse_json_array_object_and_lines() -> None:
    assert parse_json_records('{"a": 1}') == [{"a": 1}]
    assert parse_json_records('[{"a": 1}, {"b": 2}]') == [{"a": 1}, {"b": 2}]
    assert parse_json_records('{"a": 1}\n\n{"b": 2}\n') == [{"a": 1}, {"b": 2}]


def test_parse_errors_name_source_and_line() -> None:
    with pytest.raises(EventValidationError) as info:
        parse_json_records('{"a": 1}\n{"b": \n', source="posts.jsonl")
    assert info.value.lines()[0].startswith("posts.jsonl: line 2: invalid JSON")
    with pytest.raises(EventValidationError, match="empty"):
        parse_json_records("  ")


def test_lone_surrogate_in_seed_payload_is_a_clean_error() -> None:
    report = {"run_id": "run-\ud800", "trials": [{"trial_id": "t", "status": "succeeded"}]}
    # hashing the content for the event id must not crash; validation names the field
    assert errors([report]) == [(0, "trials[0].model_run_id", "string_unicode")]


def test_a_broken_multiline_document_is_reported_at_its_own_line() -> None:
    text = '[\n  {"id": "a",\n   "name": "ml.run.start"\n   "payload": {}}\n]\n'
    with pytest.raises(EventValidationError) as info:
        parse_json_records(text, source="pretty.json")
    (line,) = info.value.lines()
    assert line.startswith("pretty.json: line 4: invalid JSON: Expecting ','")


def test_records_run_together_on_one_line_are_told_to_keep_their_newlines() -> None:
    # `curl -d @events.jsonl` strips the newlines: the gateway said only "Extra data"
    text = '{"event": "ml.run.start"} {"event": "ml.run.stop"}'
    with pytest.raises(EventValidationError) as info:
        read_json_records(text, source="<body>")
    (err,) = info.value.errors
    assert err.message.startswith("invalid JSON: Extra data")
    assert "a newline between them" in err.message and "--data-binary @file" in err.message
    with pytest.raises(EventValidationError) as other:  # not for other broken documents
        read_json_records('{"event": "ml.run.start",}', source="<body>")
    assert "newline" not in other.value.errors[0].message


def test_json_lines_keep_each_record_line_and_every_malformed_line() -> None:
    text = '\n{"a": 1}\n{"b": \n\n{"c": "x\u2028y"}\nnope\n'
    parsed = read_json_records(text, source="posts.jsonl")
    assert parsed.records == [{"a": 1}, {"c": "x\u2028y"}]  # U+2028 inside a string
    assert parsed.lines == [2, 5]
    assert [e.line("posts.jsonl") for e in parsed.errors] == [
        "posts.jsonl: line 3: invalid JSON: Expecting value (column 7) [json_invalid]",
        "posts.jsonl: line 6: invalid JSON: Expecting value (column 1) [json_invalid]",
    ]
    assert read_json_records('[{"a": 1}]').lines is None  # one document: records by index


def test_seed001_posts_into_different_runs_are_different_events() -> None:
    post = {"event": "ml.trial.start", "trial_id": "trial_0"}
    (a,) = to_events([post], default_model_run_id="runA")
    (b,) = to_events([post], default_model_run_id="runB")
    assert (a.payload.model_run_id, b.payload.model_run_id) == ("runA", "runB")
    assert a.id != b.id
    # the same post into the same run is still the same event (a harmless duplicate)
    assert to_events([post], default_model_run_id="runA")[0].id == a.id


def test_seed002_misspelt_fields_are_rejected_with_a_suggestion() -> None:
    report = {
        "rnu_id": "x",
        "trials": [
            {
                "trial_id": "a",
                "status": "succeeded",
                "metrcs": {"accuracy": 0.9},
                "spectral_nrom": True,
            }
        ],
    }
    with pytest.raises(EventValidationError) as info:
        to_events([report])
    found = {e.path: e.message for e in info.value.errors}
    assert set(found) == {"rnu_id", "trials[0].metrcs", "trials[0].spectral_nrom"}
    assert "did you mean 'run_id'?" in found["rnu_id"]
    assert "did you mean 'metrics'?" in found["trials[0].metrcs"]
    assert "did you mean 'spectral_norm'?" in found["trials[0].spectral_nrom"]


def test_json_lines_with_a_broken_first_line_report_every_line() -> None:
    good = json.dumps(SEED001_START)
    text = "{bad\n" + good + '\n{"x":\n{"event": "ml.nope", "trial_id": "t"}\n'
    with pytest.raises(EventValidationError) as info:
        load_events(text, "events.jsonl")
    found = [(e.source_line or e.path, e.rule) for e in info.value.errors]
    assert (1, "json_invalid") in found and (3, "json_invalid") in found
    assert (4, "unknown_event") in found


def test_too_deep_json_is_a_clean_error_in_documents_and_lines() -> None:
    deep = "[" * 5000 + "]" * 5000
    with pytest.raises(EventValidationError) as info:
        parse_json_records(deep, "deep.json")
    assert info.value.errors[0].rule == "json_depth"
    with pytest.raises(EventValidationError) as info:
        parse_json_records(json.dumps(SEED001_START) + "\n" + deep + "\n", "deep.jsonl")
    assert [(e.source_line, e.path, e.rule) for e in info.value.errors] == [(2, "", "json_depth")]


def test_a_byte_order_mark_is_ignored() -> None:
    text = "\ufeff" + json.dumps(SEED001_START)
    assert parse_json_records(text) == [SEED001_START]
    assert parse_json_records(text.encode("utf-8")) == [SEED001_START]


@pytest.mark.parametrize("jsonl", [False, True], ids=["document", "json-lines"])
def test_an_integer_too_long_to_read_names_its_record_and_field(jsonl: bool) -> None:
    start = '{"name": "ml.run.start", "model_run_id": "r"}'
    metric = '{"name": "ml.run.metric", "payload": {"step": ' + "9" * 5000 + "}}"
    text = f"{start}\n{metric}\n" if jsonl else f"[{start}, {metric}]"
    with pytest.raises(EventValidationError) as info:
        parse_json_records(text, "events.jsonl")
    (err,) = info.value.errors
    assert (err.index, err.path, err.rule) == (1, "payload.step", "number_too_long")
    assert err.source_line == (2 if jsonl else None)
    assert "events.jsonl" in str(info.value) and "5000 digits" in str(info.value)


def test_an_integer_too_long_to_read_does_not_hide_the_other_lines_errors() -> None:
    start = '{"name": "ml.run.start", "model_run_id": "r"}'
    metric = '{"name": "ml.run.metric", "payload": {"step": ' + "9" * 5000 + "}}"
    both = '{"name": "ml.run.metric", "payload": {"step": -' + "9" * 4400 + ', "x": [1, 2'
    text = "\n".join([start, metric, "{bad", start, both, metric]) + "\n"
    parsed = read_json_records(text, "events.jsonl")
    assert len(parsed.records) == 2 and parsed.lines == [1, 4]
    found = [(e.index, e.path, e.rule, e.source_line) for e in parsed.errors]
    assert found == [
        (1, "payload.step", "number_too_long", 2),
        (None, "", "json_invalid", 3),
        (None, "", "json_invalid", 5),  # its syntax error, found past its long number
        (2, "payload.step", "number_too_long", 6),
    ]


NAN_START = (
    '{"id": "uf-15", "timestamp": "2026-12-04T00:00:00Z", "name": "ml.trial.start", '
    '"payload": {"model_run_id": "uf", "trial_id": "t5", "spectral_norm": true, '
    '"parameters": {"lr": NaN}, "metadata": {"x": Infinity}}}'
)


@pytest.mark.parametrize("jsonl", [False, True], ids=["document", "json-lines"])
def test_nan_and_infinity_literals_are_refused_by_record_and_field(jsonl: bool) -> None:
    # not JSON, but Python's json reads them; the store would write them as null (the
    # models refuse them, in free-form fields too)
    ok = json.dumps(SEED001_METRIC)
    other = '{"event": "ml.run.start", "trial_id": "t", '
    other += '"metadata": {"hyperparams": {"w": [1, -Infinity]}}}'
    text = f"{ok}\n{NAN_START}\n{other}\n" if jsonl else f"[{ok}, {NAN_START}, {other}]"
    with pytest.raises(EventValidationError) as info:
        load_events(text, "events.jsonl")  # what ``thunderline-lab validate`` reads with
    found = [(e.index, e.path, e.rule, e.source_line) for e in info.value.errors]
    line = (lambda n: n) if jsonl else (lambda n: None)
    assert sorted(found) == [
        (1, "payload.metadata.x", "finite_number", line(2)),
        (1, "payload.parameters.lr", "finite_number", line(2)),
        (2, "metadata.hyperparams.w[1]", "finite_number", line(3)),  # the post's own field
    ]
    # a string that merely reads "NaN" is text, not a number
    assert parse_json_records('{"name": "NaN", "x": "Infinity"}') == [
        {"name": "NaN", "x": "Infinity"}
    ]


def test_a_record_nested_too_deeply_is_named_by_its_index_and_field() -> None:
    ok = json.dumps(SEED001_METRIC)
    deep = '{"event": "ml.run.start", "trial_id": "t", "metadata": {"m": ' + '{"a": ' * 5000
    deep += "1" + "}" * 5000 + "}}"
    with pytest.raises(EventValidationError) as info:
        read_json_records(f"[{ok}, {ok}, {deep}]")
    [err] = info.value.errors
    assert (err.index, err.path, err.rule) == (2, "metadata.m", "json_depth")
    # escaped quotes and brackets inside strings do not confuse the scan
    tricky = '{"name": "a\\"[{", "payload": {"k,": ' + "[" * 5000 + "]" * 5000 + "}}"
    with pytest.raises(EventValidationError) as info:
        read_json_records(f'[{ok}, {{"x": "]}},"}}, {tricky}]')
    [err] = info.value.errors
    assert (err.index, err.path) == (2, "payload.k,")


def _deep_line(levels: int, trial: str = "tdeep") -> str:
    """A canonical trial.start on one line whose metadata.a nests ``levels`` arrays."""
    return (
        '{"id": "deep", "name": "ml.trial.start", "timestamp": "2026-11-22T12:00:00Z", '
        f'"payload": {{"model_run_id": "r1", "trial_id": "{trial}", "spectral_norm": true, '
        f'"metadata": {{"a": {"[" * levels}{"]" * levels}}}}}}}'
    )


@pytest.mark.parametrize("levels", [299, 480, 490, 980, 990, 5000])
def test_a_json_lines_record_nested_too_deeply_is_named_by_line_and_field(levels: int) -> None:
    # 490-980 levels were a RecursionError traceback, 299-480 "cannot be written as JSON"
    # with no field, and from 990 on the line was "record 0"
    with pytest.raises(EventValidationError) as info:
        load_events(_deep_line(levels) + "\n", "deep.jsonl")
    assert info.value.lines() == [
        "deep.jsonl: line 1: payload.metadata: nested too deeply (more than 256 levels of "
        "objects and arrays) [json_depth]"
    ]


@pytest.mark.parametrize("levels", [490, 5000])
def test_a_deep_line_does_not_hide_the_other_lines_errors(levels: int) -> None:
    bad = json.dumps({**SEED001_START, "event": "ml.nope"})
    for text, deep_at, bad_at in (
        (f"{_deep_line(levels)}\n{bad}\n", 1, 2),
        (f"{json.dumps(SEED001_START)}\n{_deep_line(levels)}\n\n{bad}\n", 2, 4),
    ):
        with pytest.raises(EventValidationError) as info:
            load_events(text, "deep.jsonl")
        found = [(e.source_line, e.path, e.rule) for e in info.value.errors]
        assert found == [
            (deep_at, "payload.metadata", "json_depth"),
            (bad_at, "event", "unknown_event"),
        ]


def _messages(records: list[Any]) -> list[str]:
    with pytest.raises(EventValidationError) as info:
        to_events(records)
    return [e.line() for e in info.value.errors]


_EMPTY_RUN = (
    'must be 1 to 256 characters (an empty one is not replaced by the default run) (got "")'
    " [string_too_short]"
)


@pytest.mark.parametrize(
    ("record", "path"),
    [
        (
            {
                "event": "ml.run.start",
                "trial_id": "t",
                "metadata": {"spectral_norm": True, "model_run_id": ""},
            },
            "metadata.model_run_id",
        ),
        ({"event": "ml.trial.start", "trial_id": "t", "model_run_id": ""}, "model_run_id"),
        (
            {"trials": [{"trial_id": "t", "status": "succeeded", "model_run_id": ""}]},
            "trials[0].model_run_id",
        ),
        ({"trials": [{"trial_id": "t", "status": "failed", "run_id": ""}]}, "trials[0].run_id"),
        ({"run_id": "", "trials": [{"trial_id": "t", "status": "succeeded"}]}, "run_id"),
        ({"model_run_id": "", "trials": [{"trial_id": "t", "status": "failed"}]}, "model_run_id"),
    ],
)
def test_an_empty_model_run_id_in_a_seed_payload_is_refused_not_defaulted(
    record: dict[str, Any], path: str
) -> None:
    # it was filed under the default run ("cerebros"), as if none had been given
    assert _messages([SEED001_START, record]) == [f"record 1: {path}: {_EMPTY_RUN}"]


def test_a_seed_run_id_given_as_null_is_none_given() -> None:
    post = {**SEED001_METRIC, "model_run_id": None, "metadata": {"epoch": 1, "model_run_id": None}}
    report = {"run_id": None, "trials": [{"trial_id": "t", "status": "failed", "run_id": None}]}
    evs = to_events([post, report], default_model_run_id="exp-9")
    assert [ev.payload.model_run_id for ev in evs] == ["exp-9", "exp-9"]


@pytest.mark.parametrize("stamp", [5, 0, -1, "5", "1700000000000", 1700000000000, ""])
def test_a_seed_timestamp_must_be_date_time_text_not_a_unix_time(stamp: Any) -> None:
    # numbers were read as Unix times, and 0 or "" replaced by the time of ingest
    got = f"(got {json.dumps(stamp)})"
    for record, path in (
        ({**SEED001_START, "timestamp": stamp}, "timestamp"),
        ({**SEED001_START, "metadata": {"timestamp": stamp}}, "metadata.timestamp"),
        (
            {"trials": [{"trial_id": "t", "status": "succeeded", "timestamp": stamp}]},
            "trials[0].timestamp",
        ),
    ):
        [line] = _messages([record])
        assert line.startswith(f"record 0: {path}: ")
        assert line.endswith(f"{got} [datetime_type]")
        assert "must be an RFC 3339 date-time string (e.g. 2026-11-22T12:34:56Z)" in line
    ok = {**SEED001_START, "timestamp": "2026-11-22T12:00:00Z"}
    assert to_events([ok])[0].timestamp.isoformat() == "2026-11-22T12:00:00+00:00"


@pytest.mark.parametrize("duration", [1999.9, 2.7, 0.5, -0.5])
def test_a_fractional_seed_duration_is_refused_not_rounded(duration: float) -> None:
    # seed 001's measurements.duration_ms 1999.9 was stored as 2000, seed 002's 2.7 as 3;
    # the seeds send whole milliseconds (45000), as a canonical event must
    stop = {**SEED001_STOP, "measurements": {"duration_ms": duration}}
    report = {"trials": [{"trial_id": "t", "status": "succeeded", "duration_ms": duration}]}
    message = f"must be a whole number of milliseconds (got {duration}) [int_from_float]"
    assert _messages([stop, report]) == [
        f"record 0: measurements.duration_ms: {message}",
        f"record 1: trials[0].duration_ms: {message}",
    ]


def test_a_whole_seed_duration_given_as_a_float_is_read_as_its_integer() -> None:
    stop = {**SEED001_STOP, "measurements": {"duration_ms": 2000.0}}
    report = {"trials": [{"trial_id": "t", "status": "succeeded", "duration_ms": 3.0}]}
    got = [ev.payload.duration_ms for ev in to_events([stop, report])]
    assert got == [2000, 3] and all(type(d) is int for d in got)


def test_an_empty_id_in_a_seed_post_is_refused_not_replaced() -> None:
    # an empty id was replaced by a generated one, as if none had been given
    (message,) = _messages([{**SEED001_START, "id": ""}])
    assert message.startswith("record 0: id: ")
    evs = to_events([{**SEED001_START, "id": None}])  # null: none given, one is made
    assert evs[0].id

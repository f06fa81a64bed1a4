from __future__ import annotations

import json
import math
import multiprocessing as mp
import random
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from thunderline_lab import events as E
from thunderline_lab.bus import EventBus
from thunderline_lab.errors import StoreError
from thunderline_lab.events import EventConflictError, EventValidationError
from thunderline_lab.store import (
    SCHEMA_VERSION,
    PreparedBatch,
    StoreWriter,
    TrialStore,
    _create_schema,
    format_ts,
)

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
TABLES = ("model_runs", "trials", "metrics", "artifacts")


def study_events(run: str = "study-a", n_trials: int = 4, epochs: int = 3) -> list[E.Event]:
    """A small, realistic study: trial start, per-epoch metrics, completion or failure."""
    out: list[E.Event] = []
    t = T0
    for i in range(n_trials):
        tid = f"trial_{i:04d}"
        sn = i % 2 == 0
        params = {
            "lr": 0.01 * (i + 1),
            "spectral_norm": sn,
            "spectral_norm_coeff": 2.0 if sn else None,
        }
        t += timedelta(seconds=1)
        out.append(
            E.trial_start(
                model_run_id=run,
                trial_id=tid,
                spectral_norm=sn,
                study=run,
                parameters=params,
                timestamp=t,
            )
        )
        t += timedelta(milliseconds=1)
        out.append(E.run_start(model_run_id=run, trial_id=tid, spectral_norm=sn, timestamp=t))
        for step in range(epochs):
            t += timedelta(milliseconds=10)
            out.append(
                E.run_metric(
                    model_run_id=run,
                    trial_id=tid,
                    step=step,
                    timestamp=t,
                    measurements={
                        "val_loss": 1.0 / (step + 1 + i),
                        "val_accuracy": 0.5 + 0.1 * step,
                    },
                )
            )
        t += timedelta(milliseconds=10)
        out.append(E.run_stop(model_run_id=run, trial_id=tid, duration_ms=30, timestamp=t))
        t += timedelta(milliseconds=1)
        if i == 3:
            out.append(
                E.trial_failed(
                    model_run_id=run,
                    trial_id=tid,
                    error_type="diverged",
                    error_message="loss is nan",
                    spectral_norm=sn,
                    timestamp=t,
                )
            )
        else:
            out.append(
                E.trial_complete(
                    model_run_id=run,
                    trial_id=tid,
                    spectral_norm=sn,
                    timestamp=t,
                    duration_ms=31,
                    status="pruned" if i == 2 else "completed",
                    metrics={"val_accuracy": 0.7 + i / 100},
                    parameters=params,
                    artifact_uri=f"file:///lab/{tid}.pt",
                    rank=i + 1,
                )
            )
    return out


def snapshot(store: TrialStore) -> dict[str, pd.DataFrame]:
    return {t: store.table(t) for t in TABLES}


def assert_same(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> None:
    for table in TABLES:
        pd.testing.assert_frame_equal(a[table], b[table], obj=table)


@pytest.fixture(params=["memory", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> TrialStore:
    path = ":memory:" if request.param == "memory" else tmp_path / "lab" / "lab.db"
    return TrialStore(path)


def test_append_projects_trials(store: TrialStore) -> None:
    result = store.append(study_events())
    assert result.accepted == 4 * 7 and result.duplicates == 0 and result.last_seq == 28
    trials = store.trials().set_index("trial_id")
    assert list(trials["status"]) == ["completed", "completed", "pruned", "failed"]
    assert list(trials["spectral_norm"]) == [True, False, True, False]
    assert trials.loc["trial_0000", "spectral_norm_coeff"] == 2.0
    assert math.isnan(trials.loc["trial_0001", "spectral_norm_coeff"])
    assert trials.loc["trial_0003", "error_type"] == "diverged"
    assert trials.loc["trial_0000", "metrics"] == {"val_accuracy": 0.7}
    assert trials.loc["trial_0000", "parameters"]["lr"] == 0.01
    assert trials.loc["trial_0000", "rank"] == 1
    assert trials.loc["trial_0000", "started_at"] < trials.loc["trial_0000", "ended_at"]


def test_a_trials_times_before_year_1000_are_fixed_width_as_the_logs(store: TrialStore) -> None:
    # strftime's %Y wrote year 1 as "1-01-01T...": not a timestamp, and it sorted wrongly
    start = json.loads(E.trial_start(model_run_id="r", trial_id="t", spectral_norm=True).to_json())
    start["timestamp"] = "0001-01-01T12:00:00+01:00"
    store.append([start])
    (row,) = store.trials().to_dict("records")
    assert row["started_at"] == "0001-01-01T11:00:00.000000Z" == row["updated_at"]
    (logged,) = store.conn.execute("SELECT timestamp FROM events").fetchone()
    assert logged == row["started_at"]


def test_duplicates_are_skipped_by_id(store: TrialStore) -> None:
    evs = study_events()
    store.append(evs)
    again = store.append(evs[:5] + evs[:2])
    assert (again.accepted, again.duplicates) == (0, 7)
    assert store.counts()["events"] == len(evs)


def test_duplicate_ids_within_one_batch_are_stored_once(store: TrialStore) -> None:
    ev = study_events()[0]
    result = store.append([ev, ev, ev])
    assert (result.accepted, result.duplicates) == (1, 2)


def test_a_large_batch_is_logged_in_order_and_counted_across_statements(tmp_path: Path) -> None:
    """Over 512 events (rows per INSERT) and 256 trials (rows per refold), in sizes that
    are no multiple of either: every event once, in the batch's order, and the same
    tables as event-by-event appends."""
    evs = study_events(n_trials=301, epochs=1)  # 5 events a trial: 1,505
    big, small = TrialStore(tmp_path / "big.db"), TrialStore(tmp_path / "small.db")
    first = big.append(evs[:37])
    result = big.append(evs[:700] + evs[1000:])  # 37 logged, 300 left for later
    assert (result.accepted, result.duplicates) == (1505 - 37 - 300, 37)
    assert big.append(evs).accepted == 300
    for ev in evs:
        small.append([ev])
    logged = [r["id"] for r in big.iter_events()]
    assert logged[:37] == [e.id for e in evs[:37]] and len(logged) == len(set(logged)) == 1505
    assert logged[37 : 1505 - 300] == [e.id for e in evs[37:700] + evs[1000:]]
    assert first.accepted == 37
    trials = big.trials()
    assert len(trials) == 301 and list(trials["trial_id"]) == [f"trial_{i:04d}" for i in range(301)]
    assert_same(snapshot(big), snapshot(small))
    big.close()  # their WAL checkpoint threads with them
    small.close()


def test_prepared_batches_append_as_the_events_would(tmp_path: Path) -> None:
    evs = study_events()
    direct, prepared = TrialStore(tmp_path / "a.db"), TrialStore(tmp_path / "b.db")
    direct.append(evs)
    batch = prepared.prepare(evs[:7])
    assert len(batch) == 7 and prepared.counts()["events"] == 0  # nothing written yet
    halves = PreparedBatch.join([batch, prepared.prepare(evs[7:])])
    assert halves is not None
    result = prepared.append_prepared(halves)
    assert (result.accepted, result.duplicates) == (len(evs), 0)
    assert_same(snapshot(direct), snapshot(prepared))
    direct.close()
    prepared.close()


def test_prepared_batches_sharing_an_id_are_not_joined(store: TrialStore) -> None:
    evs = study_events()
    a, b = store.prepare(evs[:3]), store.prepare(evs[2:5])
    assert PreparedBatch.join([a, b]) is None  # the repeat must be checked as in one batch
    assert PreparedBatch.join([a]) is a


def test_a_joined_batch_names_the_conflicting_record_by_its_joined_index(
    store: TrialStore,
) -> None:
    evs = study_events()
    other = evs[0].model_dump(mode="json")
    other["name"] = "ml.run.start"
    joined = PreparedBatch.join([store.prepare(evs[1:4]), store.prepare([evs[0], evs[0], other])])
    assert joined is not None
    with pytest.raises(EventConflictError) as info:
        store.append_prepared(joined)
    (err,) = info.value.errors
    assert (err.index, err.rule) == (5, "id_conflict") and "record 3" in err.message
    assert store.counts()["events"] == 0


def test_an_id_that_names_another_event_is_refused_and_nothing_is_written(
    store: TrialStore,
) -> None:
    evs = study_events()
    store.append(evs[:6])
    before = snapshot(store)
    metric = next(e for e in evs[:6] if e.name == "ml.run.metric")
    changed = metric.model_dump(mode="json")
    key = next(iter(changed["payload"]["measurements"]))
    changed["payload"]["measurements"][key] = 123.0
    fresh = study_events("other")[:3]
    for batch in ([*fresh, changed], [*fresh, *E.validate_events([changed])]):
        with pytest.raises(EventConflictError) as info:
            store.append(batch)
        (err,) = info.value.errors
        assert (err.index, err.path, err.rule) == (3, f"payload.measurements.{key}", "id_conflict")
        assert metric.id in err.message and "logged event" in err.message
        assert err.value == 123.0
        assert_same(before, snapshot(store))  # the fresh events of the batch are not written


def test_a_finished_trials_outcome_does_not_change_and_nothing_is_written(
    store: TrialStore,
) -> None:
    # a new ml.trial.failed (new id) for the completed trial_0000 was accepted and turned it
    # into a failure (and a completion of the failed trial_0003 into a success)
    evs = study_events()
    store.append(evs)
    before = snapshot(store)
    later = T0 + timedelta(hours=1)
    changed = [
        (
            E.trial_failed(
                model_run_id="study-a",
                trial_id="trial_0000",
                error_type="stale",
                error_message="no heartbeat",
                timestamp=later,
            ),
            "name",
            "completed",
        ),
        (
            E.trial_complete(
                model_run_id="study-a",
                trial_id="trial_0003",
                spectral_norm=False,
                timestamp=later,
                metrics={"val_accuracy": 0.99},
            ),
            "payload.status",
            "failed",
        ),
    ]
    fresh = study_events("other")[:3]
    for ev, path, was in changed:
        for batch in ([*fresh, ev], [*fresh, ev.model_dump(mode="json")]):
            with pytest.raises(EventConflictError) as info:
                store.append(batch)
            (err,) = info.value.errors
            assert (err.index, err.path, err.rule) == (3, path, "trial_finished")
            trial = ev.payload.trial_id
            assert err.message.startswith(f"trial study-a/{trial} already finished as {was}")
            assert_same(before, snapshot(store))  # nothing of the batch is written
    # the same outcome resent (its id) is a duplicate, as ever; the same status with other
    # metrics (a late evaluation) is a correction
    assert store.append([evs[-1]]).duplicates == 1
    correction = E.trial_complete(
        model_run_id="study-a",
        trial_id="trial_0000",
        spectral_norm=True,
        timestamp=later,
        metrics={"test_accuracy": 0.5},
    )
    assert store.append([correction]).accepted == 1
    row = store.trial("study-a", "trial_0000")
    assert row is not None and row["status"] == "completed"
    assert row["metrics"]["test_accuracy"] == 0.5


def test_an_event_moving_a_trial_to_the_other_arm_is_refused(store: TrialStore) -> None:
    evs = study_events()
    store.append(evs[:2])  # trial_0000 started with SN on, coefficient 2.0 (parameters)
    before = snapshot(store)
    at = T0 + timedelta(minutes=5)
    moved = [
        (
            "spectral_norm",
            False,
            E.run_start(
                model_run_id="study-a", trial_id="trial_0000", spectral_norm=False, timestamp=at
            ),
        ),
        (
            "study",
            "study-b",
            E.trial_start(
                model_run_id="study-a",
                trial_id="trial_0000",
                spectral_norm=True,
                study="study-b",
                timestamp=at,
            ),
        ),
    ]
    for key, value, ev in moved:
        with pytest.raises(EventConflictError) as info:
            store.append([ev])
        (err,) = info.value.errors
        assert (err.index, err.path, err.rule, err.value) == (
            0,
            f"payload.{key}",
            "trial_conflict",
            value,
        )
        assert f"trial study-a/trial_0000 is logged with {key} = " in err.message
        assert_same(before, snapshot(store))
    # restating what the trial is, and finishing it once, are accepted
    assert store.append(evs[2:]).accepted == len(evs) - 2
    assert store.trials()["spectral_norm"].tolist()[0] == 1


def test_a_finished_trial_logged_without_a_study_or_coeff_is_not_moved_later(
    store: TrialStore,
) -> None:
    """A trial whose events never stated a study (filed under its run's) or a coefficient
    cannot be given one once it finished: that too would move it after the fact."""
    ids = {"model_run_id": "r1", "trial_id": "t1"}
    at = T0 + timedelta(minutes=5)
    store.append(
        [
            E.trial_start(**ids, spectral_norm=True, timestamp=T0),
            E.trial_complete(
                **ids, spectral_norm=True, metrics={"val_accuracy": 0.9}, timestamp=T0
            ),
        ]
    )
    before = snapshot(store)
    for key, value in (("study", "other"), ("spectral_norm_coeff", 2.0)):
        late = E.trial_complete(**ids, spectral_norm=True, timestamp=at, **{key: value})
        with pytest.raises(EventConflictError) as info:
            store.append([late])
        (err,) = info.value.errors
        assert (err.path, err.rule, err.value) == (f"payload.{key}", "trial_conflict", value)
        assert "trial r1/t1 finished (event " in err.message
        assert_same(before, snapshot(store))
    assert store.studies() == ["r1"]
    # while it runs, a later event may still state them (events may arrive out of order)
    other = {"model_run_id": "r1", "trial_id": "t2"}
    store.append([E.trial_start(**other, spectral_norm=True, timestamp=T0)])
    store.append(
        [E.trial_complete(**other, spectral_norm=True, spectral_norm_coeff=2.0, timestamp=at)]
    )
    row = store.trial("r1", "t2")
    assert row is not None and row["spectral_norm_coeff"] == 2.0


def test_a_contradiction_in_one_batch_is_refused_too(store: TrialStore) -> None:
    start, run_start = study_events()[:2]
    other = E.run_start(
        model_run_id="study-a", trial_id="trial_0000", spectral_norm=False, timestamp=T0
    )
    with pytest.raises(EventConflictError) as info:
        store.append([start, run_start, other])
    assert [(e.index, e.rule) for e in info.value.errors] == [(2, "trial_conflict")]
    assert store.counts()["events"] == 0


def test_a_log_holding_contradictions_still_replays(store: TrialStore) -> None:
    # a lab written before they were refused: replay folds whatever the log holds
    evs = study_events()
    store.append(evs)
    store.conn.execute(
        "UPDATE events SET body = json_set(body, '$.payload.spectral_norm', json('false')) "
        "WHERE id = ?",
        (evs[-1].id,),
    )
    store.conn.commit()
    store.replay()
    assert store.counts()["trials"] == 4


def test_a_resent_event_restamped_or_encoded_otherwise_is_a_duplicate(store: TrialStore) -> None:
    evs = study_events()
    store.append(evs)
    restamped = [e.model_dump(mode="json") | {"timestamp": "2031-01-01T00:00:00Z"} for e in evs]
    again = store.append(restamped)  # dicts take the fast path, the first were models
    assert (again.accepted, again.duplicates) == (0, len(evs))


def test_an_id_repeated_with_other_content_in_one_batch_is_refused(store: TrialStore) -> None:
    ev = study_events()[0]
    other = ev.model_dump(mode="json")
    other["name"] = "ml.run.start"
    with pytest.raises(EventConflictError) as info:
        store.append([ev, ev, other])
    (err,) = info.value.errors
    assert (err.index, err.path) == (2, "name")
    assert "record 0 of this batch" in err.message
    assert store.counts()["events"] == 0


def test_invalid_batch_stores_nothing_and_keeps_existing(store: TrialStore) -> None:
    store.append(study_events()[:7])
    before = snapshot(store)
    bad = E.run_metric(model_run_id="r", trial_id="t", step=1, metric_name="a", metric_value=1.0)
    record = bad.model_dump(mode="json")
    record["payload"]["metric_value"] = float("nan")
    with pytest.raises(EventValidationError) as info:
        store.append([*study_events("other")[:3], record])
    assert info.value.errors[0].path == "payload.metric_value"
    assert store.counts()["events"] == 7
    assert_same(before, snapshot(store))


def test_replay_rebuilds_identical_tables(store: TrialStore) -> None:
    store.append(study_events("a"))
    store.append(study_events("b"))
    live = snapshot(store)
    counts = store.replay()
    assert counts["events"] == 56 and counts["trials"] == 8
    assert_same(live, snapshot(store))


def test_trials_keep_the_order_they_first_appeared_in(store: TrialStore) -> None:
    """A trial's row is updated in place: the table lists trials in order of first
    appearance in the log, however the log was cut into batches, and a replay agrees."""

    def trial(tid: str, *, done: bool) -> E.Event:
        make = E.trial_complete if done else E.trial_start
        return make(model_run_id="r", trial_id=tid, study="s", spectral_norm=True)

    def order() -> list[str]:
        return [t for (t,) in store.conn.execute("SELECT trial_id FROM trials ORDER BY rowid")]

    store.append([trial("b", done=False), trial("a", done=False)])
    store.append([trial("a", done=True)])  # a's row is updated, not moved to the end
    store.append([trial("c", done=False), trial("b", done=True), trial("d", done=True)])
    assert order() == ["b", "a", "c", "d"]
    assert store.trial("r", "a")["status"] == "completed"
    store.replay()  # one batch: the same order
    assert order() == ["b", "a", "c", "d"]


def test_shuffled_and_duplicated_delivery_converges() -> None:
    evs = study_events()
    ordered = TrialStore()
    ordered.append(evs)
    for seed in range(5):
        shuffled = evs + random.Random(seed).sample(evs, k=10)
        random.Random(seed).shuffle(shuffled)
        other = TrialStore()
        for i in range(0, len(shuffled), 3):
            other.append(shuffled[i : i + 3])
        assert_same(snapshot(ordered), snapshot(other))


def test_complete_before_start_converges_to_same_row() -> None:
    start = E.trial_start(
        model_run_id="r", trial_id="t", spectral_norm=True, parameters={"lr": 0.1}, timestamp=T0
    )
    done = E.trial_complete(
        model_run_id="r",
        trial_id="t",
        spectral_norm=True,
        metrics={"val_accuracy": 0.9},
        timestamp=T0 + timedelta(seconds=5),
    )
    a, b = TrialStore(), TrialStore()
    a.append([start])
    a.append([done])
    b.append([done])
    b.append([start])
    assert_same(snapshot(a), snapshot(b))
    assert a.trial("r", "t")["status"] == "completed"


def test_later_metric_value_wins_regardless_of_arrival() -> None:
    first = E.run_metric(
        model_run_id="r", trial_id="t", step=1, metric_name="loss", metric_value=1.0, timestamp=T0
    )
    second = E.run_metric(
        model_run_id="r",
        trial_id="t",
        step=1,
        metric_name="loss",
        metric_value=2.0,
        timestamp=T0 + timedelta(seconds=1),
    )
    for order in ([first, second], [second, first]):
        s = TrialStore()
        for ev in order:
            s.append([ev])
        assert s.metric_history("r", "t", "loss")["value"].tolist() == [2.0]


def test_single_metric_overrides_the_same_name_in_measurements_on_every_path() -> None:
    ev = E.run_metric(
        model_run_id="r",
        trial_id="t",
        step=4,
        metric_name="loss",
        metric_value=0.25,
        measurements={"loss": 9.0, "acc": 0.5},
        timestamp=T0,
    )
    as_object, as_dict = TrialStore(), TrialStore()
    as_object.append([ev])
    as_dict.append([json.loads(ev.to_json())])  # the msgspec fast path
    for s in (as_object, as_dict):
        hist = s.metric_history("r", "t")
        assert dict(zip(hist["name"], hist["value"], strict=True)) == {"acc": 0.5, "loss": 0.25}
        s.replay()
        assert s.metric_history("r", "t")["value"].tolist() == hist["value"].tolist()
    assert_same(snapshot(as_object), snapshot(as_dict))


def test_batches_with_and_without_single_metrics_project_every_point() -> None:
    def metric(step: int, **kw: Any) -> dict[str, Any]:
        ev = E.run_metric(model_run_id="r", trial_id="t", step=step, timestamp=T0, **kw)
        return json.loads(ev.to_json())

    s = TrialStore()
    s.append([metric(0, measurements={"loss": 1.0, "acc": 0.1})])  # measurements only
    s.append(
        [metric(1, measurements={"loss": 0.5}), metric(1, metric_name="acc", metric_value=0.2)]
    )
    hist = s.metric_history("r", "t")
    points = set(zip(hist["name"], hist["step"], hist["value"], strict=True))
    assert points == {("loss", 0, 1.0), ("acc", 0, 0.1), ("loss", 1, 0.5), ("acc", 1, 0.2)}
    before = snapshot(s)
    s.replay()
    assert_same(snapshot(s), before)


def test_dict_and_object_delivery_give_identical_stores() -> None:
    evs = study_events()
    objects, dicts = TrialStore(), TrialStore()
    objects.append(evs)
    dicts.append([json.loads(ev.to_json()) for ev in evs])
    assert_same(snapshot(objects), snapshot(dicts))


@pytest.mark.parametrize(
    "ts",
    [
        datetime(2026, 1, 1, tzinfo=UTC),  # no microseconds
        datetime(2026, 1, 1, 1, 2, 3, 4, tzinfo=UTC),
        datetime(5, 1, 1, 0, 0, 0, 7, tzinfo=UTC),
        datetime(2026, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))),
        datetime(2026, 1, 1, 23, 30, 0, 9, tzinfo=timezone(timedelta(hours=-1))),
    ],
)
def test_timestamps_are_stored_as_fixed_width_utc(ts: datetime) -> None:
    text = format_ts(
        E.trial_start(model_run_id="r", trial_id="t", spectral_norm=True, timestamp=ts)
    )
    assert len(text) == 27 and text.endswith("Z")
    assert datetime.fromisoformat(text) == ts


def test_run_stop_alone_marks_trial_completed_or_failed() -> None:
    s = TrialStore()
    s.append(
        [
            E.run_stop(model_run_id="r", trial_id="ok", success=True, mlflow_run_id="m1"),
            E.run_stop(model_run_id="r", trial_id="bad", success=False),
        ]
    )
    trials = s.trials().set_index("trial_id")
    assert trials.loc["ok", "status"] == "completed" and trials.loc["ok", "mlflow_run_id"] == "m1"
    assert trials.loc["bad", "status"] == "failed"


def test_queries(store: TrialStore) -> None:
    store.append(study_events("a"))
    store.append(study_events("b", n_trials=2))
    assert len(store.trials(study="a")) == 4
    assert set(store.trials(status="completed")["trial_id"]) == {"trial_0000", "trial_0001"}
    assert store.trials(spectral_norm=True)["spectral_norm"].all()
    assert len(store.trials(status=["pruned", "failed"])) == 2
    expanded = store.trials(study="a", expand=True)
    assert "metrics.val_accuracy" in expanded and "params.lr" in expanded
    hist = store.metric_history("a", "trial_0000", "val_loss")
    assert hist["step"].tolist() == [0, 1, 2]
    assert store.trial("a", "nope") is None
    runs = store.model_runs().set_index("model_run_id")
    assert runs.loc["a", "n_trials"] == 4 and runs.loc["a", "n_failed"] == 1


def test_mean_by_spectral_norm_is_seed001_aggregate(store: TrialStore) -> None:
    store.append(study_events("a"))
    agg = store.mean_by_spectral_norm("val_accuracy", study="a").set_index("spectral_norm")
    # completed only: trial 0 (SN on, 0.70) and trial 1 (SN off, 0.71)
    assert agg.loc[True, "mean_val_accuracy"] == pytest.approx(0.70)
    assert agg.loc[False, "mean_val_accuracy"] == pytest.approx(0.71)
    assert agg["n"].tolist() == [1, 1]


def test_metric_history_downsamples_keeping_last_point() -> None:
    s = TrialStore()
    s.append(
        [
            E.run_metric(
                model_run_id="r", trial_id="t", step=i, metric_name="loss", metric_value=float(i)
            )
            for i in range(5000)
        ]
    )
    full = s.metric_history("r", "t", "loss")
    small = s.metric_history("r", "t", "loss", max_points=1000)
    assert len(full) == 5000
    assert 500 <= len(small) <= 1000
    assert small["step"].iloc[0] == 0 and small["step"].iloc[-1] == 4999


def test_events_after_sequence(store: TrialStore) -> None:
    evs = study_events()
    store.append(evs)
    page = store.events_after(5, limit=3)
    assert [e["seq"] for e in page] == [6, 7, 8]
    assert page[0]["id"] == evs[5].id
    assert len(list(store.iter_events(batch_size=7))) == len(evs)
    assert store.last_seq() == len(evs)


def test_events_after_ends_a_page_at_max_bytes(store: TrialStore) -> None:
    evs = study_events()
    store.append(evs)
    bodies = [len(b) for (b,) in store.conn.execute("SELECT body FROM events ORDER BY seq")]
    page = store.events_after(0, limit=100, max_bytes=bodies[0] + bodies[1])
    assert [e["seq"] for e in page] == [1, 2]  # ends with the event that reaches the budget
    assert [e["seq"] for e in store.events_after(0, limit=100, max_bytes=1)] == [1]  # >= 1
    assert len(store.events_after(0, limit=5, max_bytes=10**9)) == 5  # limit still applies


def test_generic_events_are_logged_not_projected(store: TrialStore) -> None:
    ev = E.validate_event(
        {
            "id": "g1",
            "name": "system.heartbeat",
            "timestamp": T0.isoformat(),
            "payload": {"host": "w1"},
        }
    )
    store.append([ev])
    assert store.counts()["events"] == 1 and store.counts()["trials"] == 0
    assert store.replay()["events"] == 1


def test_store_writer_batches_from_the_bus(tmp_path: Path) -> None:
    store = TrialStore(tmp_path / "lab.db")
    bus = EventBus()
    with StoreWriter(store, bus, interval=0.05) as writer:
        for ev in study_events():
            bus.publish(ev)
    assert writer.appended == 28 and writer.errors == 0
    assert store.counts()["events"] == 28


def test_store_writer_retries_after_a_failed_append(tmp_path: Path) -> None:
    store = TrialStore(tmp_path / "lab.db")
    bus = EventBus()
    writer = StoreWriter(store, bus, background=False)
    real_append = store.append
    calls: list[int] = []

    def flaky(events: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return real_append(events)

    store.append = flaky  # type: ignore[method-assign]
    bus.publish(study_events()[0])
    with pytest.raises(sqlite3.OperationalError):
        writer.flush()
    assert writer.flush() == 1
    assert writer.errors == 1 and store.counts()["events"] == 1
    writer.close()


def _append_worker(path: str, worker: int, n_batches: int) -> None:
    store = TrialStore(path)
    for b in range(n_batches):
        evs = [
            E.run_metric(
                model_run_id=f"w{worker}", trial_id=f"t{b}", step=s, measurements={"loss": float(s)}
            )
            for s in range(50)
        ]
        store.append(evs)
    store.close()


@pytest.mark.slow
def test_many_processes_append_without_loss_or_lock_errors(tmp_path: Path) -> None:
    path = str(tmp_path / "lab.db")
    TrialStore(path).close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_worker, args=(path, w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    store = TrialStore(path)
    assert store.counts()["events"] == 4 * 40 * 50
    assert store.counts()["metrics"] == 4 * 40 * 50


def test_unstorable_event_is_rejected_by_record_and_nothing_is_written(store: TrialStore) -> None:
    store.append(study_events()[:3])
    before = snapshot(store)
    good = E.run_metric(model_run_id="r", trial_id="t", step=0, metric_name="a", metric_value=1.0)
    bad = E.run_metric(
        model_run_id="r",
        trial_id="t",
        step=1,
        metric_name="a",
        metric_value=1.0,
        metadata={"note": "\ud800"},
    )
    with pytest.raises(EventValidationError) as info:
        store.append([good, good, bad])  # the duplicate shifts positions; the index must not
    assert [(e.index, e.rule) for e in info.value.errors] == [(2, "unserializable")]
    assert store.counts()["events"] == 3
    assert_same(before, snapshot(store))


def test_a_writer_checkpoints_the_wal_in_the_background_and_stops_on_close(
    tmp_path: Path,
) -> None:
    s = TrialStore(tmp_path / "lab.db")
    s.append(study_events(n_trials=4, epochs=3))  # a few events: no pass asked for yet
    assert s._checkpointer is None
    s.append(study_events(run="study-b", n_trials=40, epochs=30))  # over 1,000 events
    checkpointer = s._checkpointer
    assert checkpointer is not None and checkpointer.alive()
    for _ in range(200):  # the pass follows the commit shortly, on its own thread
        if checkpointer.checkpoints:
            break
        time.sleep(0.05)
    assert checkpointer.checkpoints >= 1
    s.close()
    assert not checkpointer.alive()
    assert "thunderline-checkpoint" not in {t.name for t in threading.enumerate()}
    reopened = TrialStore(tmp_path / "lab.db")
    assert reopened.counts()["trials"] == 44


# The log as labs made before the schema version was kept (user_version 0) hold it.
OLD_EVENTS = """CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
    timestamp TEXT NOT NULL, model_run_id TEXT, trial_id TEXT, body TEXT NOT NULL)"""


def test_a_new_lab_has_8_kib_pages_and_an_older_lab_keeps_its_own(tmp_path: Path) -> None:
    new = TrialStore(tmp_path / "new.db")
    assert new.conn.execute("PRAGMA page_size").fetchone()[0] == 8192
    new.close()
    old_path = tmp_path / "old.db"
    conn = sqlite3.connect(old_path)
    conn.execute("PRAGMA page_size = 4096")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(OLD_EVENTS)
    conn.close()
    old = TrialStore(old_path)
    assert old.conn.execute("PRAGMA page_size").fetchone()[0] == 4096
    assert old.append(study_events()).accepted == len(study_events())
    assert old.counts()["trials"] == 4


def test_opening_a_lab_waits_while_another_process_is_creating_it(tmp_path: Path) -> None:
    # Another connection is mid-way through creating the lab (a write transaction on the
    # new file): switching to WAL needs its exclusive lock, which SQLite refuses at once,
    # without its busy timeout. The store waits for it as for any other writer.
    path = tmp_path / "lab.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    _create_schema(other, str(path))  # as the other process's store does
    other.execute("CREATE TABLE from_the_other_process (x)")
    releaser = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    releaser.start()
    try:
        store = TrialStore(path, timeout=30)
    finally:
        releaser.join()
        other.close()
    with store:
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        store.append([E.trial_start(model_run_id="r", trial_id="t", spectral_norm=True)])
        assert store.counts()["trials"] == 1
        tables = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master")}
        assert "from_the_other_process" in tables


def test_an_existing_lab_opens_for_reading_while_a_writer_holds_the_lock(tmp_path: Path) -> None:
    db = tmp_path / "lab.db"
    with TrialStore(db) as first:
        first.append([E.trial_start(model_run_id="r", trial_id="t", spectral_norm=True)])
        first.conn.execute("BEGIN IMMEDIATE")  # a writer in the middle of its transaction
        try:
            reader = TrialStore(db, timeout=0.2)  # would raise "stayed locked" if it wrote
            assert reader.trials()["trial_id"].tolist() == ["t"]
            reader.close()
        finally:
            first.conn.execute("ROLLBACK")


def test_a_lab_of_an_older_schema_version_is_brought_up_to_date(tmp_path: Path) -> None:
    db = tmp_path / "lab.db"
    TrialStore(db).close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 0")  # as labs made before the version was kept
    conn.execute("DROP TABLE artifacts")
    conn.close()
    with TrialStore(db) as store:
        assert store.counts()["artifacts"] == 0
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def sqlite_file(path: Path, script: str) -> Path:
    conn = sqlite3.connect(path)
    conn.executescript(script)
    conn.close()
    return path


def file_state(path: Path) -> tuple[bytes, list[str]]:
    """A database's bytes, and the files SQLite keeps beside it (journal, WAL, shared memory)."""
    return path.read_bytes(), sorted(p.name for p in path.parent.glob(f"{path.name}-*"))


@pytest.mark.parametrize(
    ("script", "held"),
    [
        ("CREATE TABLE notes (t TEXT); INSERT INTO notes VALUES ('keep')", "tables notes"),
        (  # a log of another shape: it used to fail half-way, switched to WAL
            "CREATE TABLE events (id TEXT, body TEXT); INSERT INTO events VALUES ('e', 'x')",
            "tables events; columns of events differ from the store's",
        ),
        (  # a lab's MLflow outbox beside a table no lab holds
            "CREATE TABLE mlflow_outbox (x); CREATE TABLE runs (x); CREATE VIEW v AS SELECT 1",
            "tables mlflow_outbox, runs, v",
        ),
        ("CREATE VIEW answer AS SELECT 42", "tables answer"),
    ],
)
def test_a_sqlite_file_that_is_not_a_lab_is_refused_and_left_as_it_was(
    tmp_path: Path, script: str, held: str
) -> None:
    path = sqlite_file(tmp_path / "lab.db", script)
    before = file_state(path)
    with pytest.raises(StoreError) as info:
        TrialStore(path)
    assert str(info.value) == (
        f"{path}: not a thunderline-lab trial store (it holds {held}; user_version 0); "
        "nothing was changed"
    )
    assert file_state(path) == before  # no schema, no WAL switch, no version, no side files


def test_a_file_with_a_version_but_no_log_is_not_a_lab(tmp_path: Path) -> None:
    path = sqlite_file(tmp_path / "app.db", "PRAGMA user_version = 1; CREATE TABLE t (x)")
    before = file_state(path)
    with pytest.raises(StoreError, match=r"not a thunderline-lab trial store .*user_version 1"):
        TrialStore(path)
    assert file_state(path) == before


def test_a_lab_of_a_newer_version_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "lab.db"
    with TrialStore(path) as store:
        store.append(study_events())
    sqlite_file(path, "PRAGMA user_version = 7")
    before = file_state(path)
    with pytest.raises(StoreError) as info:
        TrialStore(path)
    assert str(info.value) == (
        f"{path}: written by a newer thunderline-lab (store format 7; this version reads "
        f"{SCHEMA_VERSION}); nothing was changed"
    )
    assert file_state(path) == before


def test_a_file_that_is_not_a_database_gets_a_clear_error_and_is_left_as_it_was(
    tmp_path: Path,
) -> None:
    path = tmp_path / "lab.db"
    path.write_text("trial,accuracy\n0,0.9\n" * 100)
    before = file_state(path)
    with pytest.raises(StoreError, match=r"cannot open the trial store: file is not a database"):
        TrialStore(path)
    assert file_state(path) == before


@pytest.mark.parametrize("made", ["nothing", "an empty file", "the MLflow outbox"])
def test_a_new_or_empty_file_becomes_a_lab(tmp_path: Path, made: str) -> None:
    path = tmp_path / "lab.db"
    if made == "an empty file":
        path.touch()
    elif made == "the MLflow outbox":  # tracking makes its tables on a connection of its own
        sqlite_file(path, "CREATE TABLE mlflow_outbox (x); INSERT INTO mlflow_outbox VALUES (1)")
    with TrialStore(path) as store:
        store.append(study_events())
        assert store.counts()["trials"] == 4
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        if made == "the MLflow outbox":
            assert store.conn.execute("SELECT x FROM mlflow_outbox").fetchall() == [(1,)]


def test_an_existing_lab_reopens_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "lab.db"
    with TrialStore(path) as store:
        store.append(study_events())
        tables = snapshot(store)
        store.conn.execute("CREATE TABLE notes (t TEXT)")  # a table of the user's own
    with TrialStore(path) as store:
        assert store.counts()["events"] == len(study_events())
        assert_same(tables, snapshot(store))


def test_a_lab_made_before_the_version_was_kept_is_brought_up_to_date_with_all_it_holds(
    tmp_path: Path,
) -> None:
    path = sqlite_file(
        tmp_path / "lab.db",
        f"{OLD_EVENTS}; CREATE INDEX idx_events_trial ON events (model_run_id, trial_id, name);"
        "CREATE TABLE mlflow_studies (study TEXT PRIMARY KEY); CREATE TABLE notes (t TEXT);"
        "INSERT INTO notes VALUES ('keep')",
    )
    with TrialStore(path) as store:
        store.append(study_events())
        assert store.counts()["trials"] == 4
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert store.conn.execute("SELECT t FROM notes").fetchall() == [("keep",)]
        indexes = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master")}
        assert "idx_events_trial" not in indexes and "idx_events_lifecycle" in indexes


@pytest.mark.parametrize("path", [None, 5, b"lab.db"])
def test_a_path_that_is_not_a_file_path_is_refused_and_nothing_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError) as info:
        TrialStore(path)
    assert str(info.value) == (
        f"path must be a file path (str or os.PathLike) or ':memory:' (got {path!r})"
    )
    assert list(tmp_path.iterdir()) == []


def _open_when_told(path: Path, start: threading.Barrier, opened: list[Any]) -> None:
    start.wait()
    try:
        with TrialStore(path, timeout=30) as store:
            opened.append(store.counts()["events"])
    except Exception as exc:  # kept: an exception in a thread fails no test
        opened.append(exc)


def test_stores_opening_a_new_lab_at_once_all_open_it(tmp_path: Path) -> None:
    # Each finds a new database, and each makes the schema under the write lock unless it
    # finds that another just made it there: then that lab is its own.
    for round_ in range(5):
        path, start, opened = tmp_path / f"lab{round_}.db", threading.Barrier(3), []
        threads = [
            threading.Thread(target=_open_when_told, args=(path, start, opened)) for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert opened == [0, 0, 0]


def _writer_batch(bad: str) -> tuple[list[E.Event], E.Event]:
    """50 storable metric events and one the store refuses (``bad``), placed at index 25."""
    good = [
        E.run_metric(model_run_id="r", trial_id="t", step=i, metric_name="a", metric_value=1.0)
        for i in range(50)
    ]
    if bad == "unserializable":
        refused = E.run_metric(
            model_run_id="r",
            trial_id="t",
            step=99,
            metric_name="a",
            metric_value=1.0,
            metadata={"note": "\ud800"},  # a lone surrogate: no JSON text holds it
        )
    else:  # the id of an event earlier in the batch, with another payload
        refused = good[3].model_copy(update={"payload": good[4].payload})
    return [*good[:25], refused, *good[25:]], refused


@pytest.mark.parametrize("bad", ["unserializable", "id_conflict"])
@pytest.mark.parametrize("background", [False, True])
def test_store_writer_keeps_every_storable_event_of_a_batch_with_a_bad_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: str, background: bool
) -> None:
    store, bus = TrialStore(tmp_path / "lab.db"), EventBus()
    # one batch, flushed by the background thread when the writer closes
    writer = StoreWriter(store, bus, batch_size=10_000, interval=600, background=background)
    batch, refused = _writer_batch(bad)
    for ev in batch:
        bus.publish(ev)
    if background:
        writer.close()
    else:
        assert writer.flush(raise_errors=False) == 50
    assert store.counts()["events"] == 50 and store.counts()["metrics"] == 50
    assert writer.appended == 50 and writer.errors == 1
    (message,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "dropped 1 invalid events of 51" in message
    assert "record 25: " in message and f"[{bad}]" in message and refused.id in message


@pytest.mark.parametrize("bad", ["unserializable", "id_conflict"])
def test_store_writer_raises_for_the_bad_event_only_after_appending_the_others(
    tmp_path: Path, bad: str
) -> None:
    store, bus = TrialStore(tmp_path / "lab.db"), EventBus()
    writer = StoreWriter(store, bus, background=False)
    for ev in _writer_batch(bad)[0]:
        bus.publish(ev)
    with pytest.raises(EventValidationError) as info:
        writer.flush()
    assert [(e.index, e.rule) for e in info.value.errors] == [(25, bad)]
    assert isinstance(info.value, EventConflictError) == (bad == "id_conflict")
    assert store.counts()["events"] == 50 and writer.flush() == 0  # the bad one is gone


def test_store_writer_drops_bad_events_found_at_each_stage_of_one_batch(tmp_path: Path) -> None:
    store, bus = TrialStore(tmp_path / "lab.db"), EventBus()
    writer = StoreWriter(store, bus, background=False)
    batch, _ = _writer_batch("unserializable")  # refused as it is serialised (index 25)
    clash = batch[3].model_copy(update={"payload": batch[4].payload})  # refused on writing
    for ev in [*batch, clash]:
        bus.publish(ev)
    with pytest.raises(EventValidationError) as info:
        writer.flush()
    assert [(e.index, e.rule) for e in info.value.errors] == [
        (25, "unserializable"),
        (51, "id_conflict"),
    ]
    assert store.counts()["events"] == 50 and writer.appended == 50


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.replay(batch_size=0), "batch_size: a whole number >= 1 (got 0)"),
        (lambda s: s.replay(batch_size=True), "batch_size: a whole number >= 1 (got True)"),
        (lambda s: s.iter_events(0), "batch_size: a whole number >= 1 (got 0)"),
        (lambda s: s.iter_events(-1), "batch_size: a whole number >= 1 (got -1)"),
        (lambda s: s.events_after(limit=0), "limit: a whole number >= 1 (got 0)"),
        (lambda s: s.events_after(limit=-1), "limit: a whole number >= 1 (got -1)"),
        (lambda s: s.events_after(0, None), "limit: a whole number >= 1 (got None)"),
        (lambda s: s.events_after("a"), "seq: a whole number >= 0 (got 'a')"),
        (lambda s: s.events_after(None), "seq: a whole number >= 0 (got None)"),
        (lambda s: s.events_after(2**70), f"seq: a whole number <= {2**63 - 1} (got {2**70})"),
        (lambda s: s.events_after(max_bytes="x"), "max_bytes: a whole number >= 1 (got 'x')"),
        (
            lambda s: s.metric_history("a", max_points=float("nan")),
            "max_points: a whole number >= 2 (got nan)",
        ),
        (lambda s: s.metric_history("a", max_points="3"), "max_points: a whole number >= 2"),
        (lambda s: s.metric_history("a", max_points=1), "max_points: a whole number >= 2"),
        (lambda s: s.metric_history("a", name=5), "name: a string or a list of strings (got 5)"),
        (lambda s: s.metric_history("a", trial_id=5), "trial_id: a string or a list of strings"),
        (lambda s: s.metric_history("a", name=["x", 5]), "name: a string or a list of strings"),
        (lambda s: s.metric_history(5), "model_run_id: a string (got 5)"),
        (lambda s: s.trials(status=5), "status: a string or a list of strings (got 5)"),
        (lambda s: s.trials(study=5), "study: a string (got 5)"),
        (lambda s: s.trials(spectral_norm="false"), "spectral_norm: True, False or None"),
        (lambda s: s.trials(expand="no"), "expand: True or False"),  # it expanded
        (lambda s: s.trials(spectral_norm=1), "spectral_norm: True, False or None (got 1)"),
    ],
)
def test_a_wrong_argument_to_a_read_or_replay_is_named_and_nothing_changes(
    store: TrialStore, call: Any, message: str
) -> None:
    store.append(study_events("a"))
    before = snapshot(store)
    with pytest.raises(StoreError) as info:
        call(store)
    assert str(info.value).startswith(message)
    assert_same(before, snapshot(store))  # (replay(batch_size=0) emptied every projection)


@pytest.mark.parametrize("timeout", ["x", None, True, -1, float("nan"), float("inf")])
def test_a_timeout_that_is_not_a_number_of_seconds_is_refused(timeout: Any) -> None:
    with pytest.raises(StoreError) as info:
        TrialStore(":memory:", timeout=timeout)
    assert str(info.value) == f"timeout: a finite number of seconds >= 0 (got {timeout!r})"


def test_a_timeout_past_sqlites_busy_timeout_still_waits() -> None:
    # SQLite reads a busy timeout over 2**31 - 1 ms as 0: no wait at all
    store = TrialStore(":memory:", timeout=10**8)
    assert store.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 2**31 - 1


@pytest.mark.parametrize(
    ("events", "kind"),
    [
        (lambda: study_events()[0], "TrialStartEvent"),
        (lambda: {"foo": 1}, "dict"),
        (lambda: "abc", "str"),
        (lambda: None, "NoneType"),
        (lambda: 5, "int"),
    ],
)
def test_append_takes_an_iterable_of_events_not_one_event(
    store: TrialStore, events: Any, kind: str
) -> None:
    with pytest.raises(StoreError) as info:
        store.append(events())
    assert str(info.value) == f"append takes a list (an iterable) of events, got {kind}"
    assert store.counts()["events"] == 0


def test_append_takes_a_generator_of_events_or_records(store: TrialStore) -> None:
    evs = study_events()
    store.append(ev for ev in evs[:5])
    store.append(json.loads(ev.to_json()) for ev in evs[5:])
    assert store.counts()["events"] == len(evs)

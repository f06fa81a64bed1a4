"""Tests of thunderline_lab.notebook (the helpers the notebooks call) and of the notebooks'
shape: thin cells that call the package, saved without outputs, examples that match the API."""

from __future__ import annotations

import ast
import doctest
import inspect
import json
import math
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from thunderline_lab import events
from thunderline_lab import monitor as monitor_mod
from thunderline_lab import notebook as notebook_mod
from thunderline_lab.bus import EventBus
from thunderline_lab.errors import ConfigError, StudyError
from thunderline_lab.lab import Lab
from thunderline_lab.monitor import LiveMonitor, simulate_study, synthetic_study
from thunderline_lab.notebook import (
    TRIAL_TABLE_COLUMNS,
    apply_profile,
    arm_means,
    background_demo_study,
    ensure_studies,
    flag,
    follow,
    results_store,
    start_study,
    study_names,
    trials_table,
)
from thunderline_lab.training import TrialResult

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


@pytest.fixture(autouse=True)
def _no_forced_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("THUNDERLINE_MONITOR", raising=False)
    monkeypatch.delenv("THUNDERLINE_LAB_PROFILE", raising=False)


# ---------------------------------------------------------------------------------------------
# study_names: one name or a list, never a string taken letter by letter
# ---------------------------------------------------------------------------------------------


def test_study_names_accepts_a_name_or_a_list() -> None:
    assert study_names("smoke") == ["smoke"]  # papermill -p studies smoke
    assert study_names(["a", "b", "a"]) == ["a", "b"]
    assert study_names(("a",)) == ["a"]
    assert study_names('["spectral_norm_ab", "smoke"]') == ["spectral_norm_ab", "smoke"]


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (2.5, "got float 2.5"),
        (True, "got bool True"),
        ({"a": 1}, "got dict"),
        (None, "got NoneType"),
        ([], "no study named"),
        (["ok", 7.0], "non-empty string (or an integer, taken as its text), got 7.0"),
        (["ok", False], "non-empty string (or an integer, taken as its text), got False"),
        ([""], "non-empty string"),
        ('["unclosed"', "not a JSON list"),
        ('{"a": 1}', None),  # a string that is not a list: one (odd) name, kept as given
    ],
)
def test_study_names_rejects_everything_else_clearly(value: Any, words: str | None) -> None:
    if words is None:
        assert study_names(value) == [value]
        return
    with pytest.raises(ConfigError, match=re.escape(words)):
        study_names(value)


def test_a_study_name_given_as_an_integer_is_taken_as_its_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # papermill -p studies 2024 (or -p study_name 2024) makes the int 2024: the study "2024"
    assert study_names(2024) == ["2024"]
    assert study_names([2024, "smoke", "2024"]) == ["2024", "smoke"]
    assert study_names("[2024]") == ["2024"]
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr("thunderline_lab.study.run_study", lambda name, **kw: calls.append(name))
    lab = Lab.resolve(tmp_path / "lab")
    start_study(2024, lab=lab, monitor=False).wait()
    assert calls == ["2024"]  # as the monitor and the results cells name it
    assert background_demo_study(lab, 2024, "full") is None


@pytest.mark.parametrize("value", [2.5, True, None, ["a"], ""])
def test_a_study_name_that_is_no_name_is_refused_naming_the_argument(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: Any
) -> None:
    calls: list[Any] = []
    monkeypatch.setattr("thunderline_lab.study.run_study", lambda name, **kw: calls.append(name))
    lab = Lab.resolve(tmp_path / "lab")
    words = "expected a study name (text; an integer is taken as its text), got "
    with pytest.raises(ConfigError, match=re.escape(f"name: {words}")):
        start_study(value, lab=lab, monitor=False)
    with pytest.raises(ConfigError, match=re.escape(f"study: {words}")):
        background_demo_study(lab, value, "full")
    assert not calls and not lab.root.exists()  # no study run, no lab created


# ---------------------------------------------------------------------------------------------
# flag: papermill's -p monitor false is the text 'false', which is truthy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "said"),
    [
        (
            "false",
            "got the text 'false' (papermill: -p monitor False, capitalised, "
            "or -y 'monitor: false')",
        ),
        (
            "true",
            "got the text 'true' (papermill: -p monitor True, capitalised, or -y 'monitor: true')",
        ),
        (0, "got the int 0 (papermill: -p monitor False"),
        (None, "got None (papermill: -p monitor False"),
    ],
)
def test_flag_refuses_anything_but_true_or_false_saying_how_to_pass_it(
    value: Any, said: str
) -> None:
    assert flag("monitor", True) is True and flag("monitor", False) is False
    with pytest.raises(ConfigError, match=re.escape(f"monitor: expected True or False, {said}")):
        flag("monitor", value)


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ({"monitor": "false"}, "monitor: expected True or False, got the text 'false'"),
        ({"monitor": False, "mlflow": "false"}, "mlflow: expected True or False, got the text"),
        ({"mlflow": "False "}, "mlflow: expected True or False, got the text 'False '"),
    ],
)
def test_start_study_refuses_a_monitor_or_mlflow_flag_that_is_not_a_bool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: dict[str, Any], said: str
) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr("thunderline_lab.study.run_study", _fake_run_study(calls))
    lab = Lab.resolve(tmp_path / "lab")
    with pytest.raises(ConfigError, match=re.escape(said)) as err:
        start_study("s", lab=lab, **given)
    assert "(papermill: -p " in str(err.value)
    assert not calls and not lab.root.exists()  # no study run, no monitor, no lab


def test_ensure_studies_takes_a_single_name_as_one_study(tmp_path: Path) -> None:
    lab = Lab.resolve(tmp_path / "lab")
    with lab.store() as store:
        store.append(synthetic_study("smokey", n_pairs=1, epochs=1))
    with pytest.raises(ConfigError, match=r"no trials for 'smoke' \(did you mean") as err:
        ensure_studies(lab, "smoke", profile="full")
    assert "s, m" not in str(err.value) and "studies in this lab: smokey" in str(err.value)


def test_ensure_studies_in_a_mistyped_lab_creates_nothing(tmp_path: Path) -> None:
    lab = Lab.resolve(tmp_path / "no-such-lab")
    with pytest.raises(ConfigError, match=r"no trial store at .*check lab_dir"):
        ensure_studies(lab, "smoke", profile="full")
    assert not lab.root.exists()


# ---------------------------------------------------------------------------------------------
# follow: until the study finishes, with the timeout as an upper bound
# ---------------------------------------------------------------------------------------------


def _text_monitor(bus: EventBus, study: str = "f") -> LiveMonitor:
    return LiveMonitor.from_bus(bus, study, mode="text", text_interval=1e9).start(display=False)


def test_follow_ends_when_the_study_has_finished(capsys: pytest.CaptureFixture[str]) -> None:
    bus = EventBus()
    mon = _text_monitor(bus)
    bus.publish_many(synthetic_study("f", n_pairs=1, epochs=2))
    assert follow(mon, timeout=None, quiet=0.05, poll=0.01) == "finished"
    assert mon._finished and mon.state.summary()["n_done"] == 2
    assert "[finished · 8 events" in capsys.readouterr().out
    mon.close()


def test_follow_keeps_following_a_running_trial_until_the_timeout(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bus = EventBus()
    mon = _text_monitor(bus)
    bus.publish_many(synthetic_study("f", n_pairs=1, epochs=2)[:-1])  # a trial still runs
    assert follow(mon, timeout=0.3, quiet=0.0, poll=0.01) == "timeout"
    assert "stopped following after 0.3 s (the study may still run)" in capsys.readouterr().out
    mon.close()


def test_following_a_study_none_of_whose_trials_appears_ends_in_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # live_monitor.ipynb -p study_name audit_mediun: waited, then ended as if all was well
    lab = Lab.resolve(tmp_path / "lab")
    with lab.store() as store:
        store.append(synthetic_study("audit_medium", n_pairs=1, epochs=1))
        store.append(synthetic_study("smoke", n_pairs=1, epochs=1))
    mon = LiveMonitor.from_store(lab, "audit_mediun", mode="text", text_interval=1e9)
    with pytest.raises(ConfigError) as err:
        follow(mon, timeout=0.2, quiet=0.0, poll=0.01)
    assert str(err.value) == (
        "no trial of study 'audit_mediun' appeared in 0.2 s (did you mean 'audit_medium'?); "
        "studies in this lab: audit_medium, smoke"
    )
    assert mon._finished  # the final line says why, then the error
    assert "no trial of the study appeared" in capsys.readouterr().out
    mon.close()


def test_following_a_study_on_a_bus_that_never_shows_ends_in_an_error() -> None:
    mon = _text_monitor(EventBus(), "nothing")
    with pytest.raises(ConfigError) as err:
        follow(mon, timeout=0.1, quiet=0.0, poll=0.01, finish=False)
    assert str(err.value) == "no trial of study 'nothing' appeared in 0.1 s"  # no lab to list
    mon.close()


def test_following_a_study_that_ended_without_a_trial_ends_in_an_error() -> None:
    # the test profile's demo study dying before its first trial: follow said "finished"
    # over an empty monitor, and the notebook passed having checked nothing
    mon = _text_monitor(EventBus(), "died")
    with pytest.raises(ConfigError) as err:
        follow(mon, quiet=0.0, poll=0.01, until=lambda: True, finish=False)
    assert str(err.value) == "no trial of study 'died' appeared before the study ended"
    mon.close()


def test_follow_until_wins_over_the_quiet_rule() -> None:
    bus = EventBus()
    mon = _text_monitor(bus)
    bus.publish_many(synthetic_study("f", n_pairs=1, epochs=2))
    ended = threading.Event()
    threading.Timer(0.2, ended.set).start()
    assert follow(mon, quiet=0.0, poll=0.01, until=ended.is_set, finish=False) == "finished"
    assert ended.is_set() and not mon._finished
    mon.close()


# ---------------------------------------------------------------------------------------------
# start_study: the study notebook's study, in the background under a monitor
# ---------------------------------------------------------------------------------------------


def fake_trainer(config: Any, dataset: Any, **kw: Any) -> TrialResult:
    """Publishes per-epoch metrics like train_trial (no torch): milliseconds per trial."""
    ids = {"model_run_id": kw["model_run_id"], "trial_id": kw["trial_id"], "study": kw["study"]}
    history = []
    for epoch in range(kw["epochs"]):
        loss = 1.0 / (epoch + 1) + (0.05 if config.spectral_norm else 0.0)
        point = {"val_loss": loss, "val_accuracy": 1 - loss / 2}
        history.append({"epoch": float(epoch), **point})
        kw["bus"].publish(events.run_metric(**ids, step=epoch, measurements=point))
    metrics = {"val_accuracy": 1 - loss / 2, "best_val_accuracy": 1 - loss / 2}
    return TrialResult("completed", {**metrics, "best_val_loss": loss}, history, duration_ms=1)


def _other_worker(lab: Lab, study: str, n: int) -> None:
    """Another worker's finished trials of the same study, as its events reach the store."""
    with lab.store() as store:
        for i in range(n):
            store.append(_other_workers_trial(study, i))


def _other_workers_trial(study: str, i: int) -> list[Any]:
    ids = {"model_run_id": study, "trial_id": f"w1_trial_{i:04d}", "study": study}
    return [
        events.trial_start(**ids, spectral_norm=bool(i % 2)),
        events.trial_complete(**ids, spectral_norm=bool(i % 2), metrics={"best_val_accuracy": 0.9}),
    ]


def _other_worker_still_running(lab: Lab, study: str, ours: int) -> threading.Thread:
    """Another worker's trial that runs on until this worker's ``ours`` trials completed."""
    ids = {"model_run_id": study, "trial_id": "w1_trial_late", "study": study}
    with lab.store() as store:
        store.append([events.trial_start(**ids, spectral_norm=True)])

    def finish_late() -> None:
        with lab.store() as store:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                done = store.trials(study=study, status="completed")
                if (~done["trial_id"].str.startswith("w1_")).sum() >= ours:
                    break
                time.sleep(0.05)
            time.sleep(0.3)
            store.append(
                [events.trial_complete(**ids, spectral_norm=True, metrics={"val_accuracy": 0.5})]
            )

    thread = threading.Thread(target=finish_late, daemon=True)
    thread.start()
    return thread


def test_start_study_follows_every_workers_trials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lab = Lab.resolve(tmp_path / "lab").ensure()
    _other_worker(lab, "multi", 3)
    late = _other_worker_still_running(lab, "multi", ours=4)
    run = start_study(
        "multi",
        lab=lab,
        worker_index=0,
        n_trials=4,
        epochs=2,
        dataset="wine",
        trainer=fake_trainer,
        monitor_options={"text_interval": 1e9},
    )
    assert not run.running  # no frontend here: the call waited for the study
    result = run.wait()
    assert result.counts["completed"] == 4
    mon = run.monitor
    assert mon is not None and "bus + store" in mon.source.label
    ids = {r.trial_id for r in mon.state.rows.values()}
    assert {f"w1_trial_{i:04d}" for i in range(3)} <= ids  # the other worker's trials
    # ... including the one that ended after this worker's share: the view waited for it
    assert not late.is_alive() and mon.state.rows[("multi", "w1_trial_late")].status == (
        "completed"
    )
    assert len(ids) == 8 and mon.state.summary()["n_done"] == 8
    final = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[monitor")][-1]
    assert "8 trials so far (budget 4): 8 done" in final  # (the fake worker keeps no budget)
    assert "4 trials loaded from the store" in final


def _fake_run_study(calls: list[dict[str, Any]]) -> Any:
    def run_study(name: str, *, bus: EventBus | None = None, **kw: Any) -> dict[str, int]:
        calls.append({"name": name, "bus": bus, **kw})
        if bus is None:
            return {"completed": 0}
        stop = kw["should_stop"]
        assert isinstance(stop, threading.Event)  # the monitor's: the Stop button sets it
        return simulate_study(
            bus,
            name,
            n_pairs=kw.get("n_pairs", 1),
            epochs=5,
            delay=kw.get("delay", 0.0),
            stop_event=stop,
        )

    return run_study


def test_a_study_reporting_through_a_gateway_is_followed_and_read_back_from_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The monitor follows the gateway (every worker's trials) and this kernel's bus; the
    results cells read the study back from the lab's mirror of the gateway's log."""
    from test_monitor import GW_TOKEN, _Gateway

    from thunderline_lab.gateway import EventClient
    from thunderline_lab.store import TrialStore

    served = TrialStore(tmp_path / "served.db")
    for i in range(2):  # another worker's trials, already at the gateway
        served.append(_other_workers_trial("gw", i))
    monkeypatch.setenv("THUNDERLINE_LAB_TOKEN", GW_TOKEN)

    def run_study(name: str, *, bus: EventBus, gateway: str, **kw: Any) -> dict[str, int]:
        client = EventClient(gateway, spool=tmp_path / "spool.jsonl")  # as run_study does
        client.attach(bus)
        try:
            return simulate_study(bus, name, n_pairs=1, epochs=3, stop_event=kw["should_stop"])
        finally:
            client.close()

    monkeypatch.setattr("thunderline_lab.study.run_study", run_study)
    lab = Lab.resolve(tmp_path / "lab")
    with _Gateway(served) as gw:
        run = start_study("gw", lab=lab, gateway=gw.url, monitor_options={"text_interval": 1e9})
        assert run.wait()["completed"] == 2
        mon = run.monitor
        assert mon is not None and f"bus + gateway {gw.url}" in mon.source.label
        ids = {r.trial_id for r in mon.state.rows.values()}
        assert len(ids) == 4 and any(t.startswith("w1_") for t in ids)  # the whole study
        with results_store(lab, gw.url) as store:
            assert len(store.trials(study="gw")) == 4
            assert store.trials(study="gw").equals(served.trials(study="gw"))
    assert not lab.db_path.exists()  # nothing was written to a local store


def test_start_study_without_a_monitor_runs_in_the_foreground(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr("thunderline_lab.study.run_study", _fake_run_study(calls))
    run = start_study("fg", lab=Lab.resolve(tmp_path / "lab"), monitor=False, n_trials=2)
    assert not run.running and run.thread is None and run.monitor is None
    assert run.wait() == {"completed": 0} and calls[0]["n_trials"] == 2


def test_in_jupyterlab_the_stop_button_shows_and_stops_the_running_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The documented path: run the study cell, watch, press Stop, run the results cells."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr("thunderline_lab.study.run_study", _fake_run_study(calls))
    monkeypatch.setattr(LiveMonitor, "_show_widget", lambda self: None)  # no frontend here
    run = start_study(
        "ui",
        lab=Lab.resolve(tmp_path / "lab"),
        n_pairs=200,
        delay=0.001,
        monitor_options={"mode": "widget", "min_interval": 0.01},
    )
    mon = run.monitor
    assert mon is not None and run.running  # the cell returned while the study runs
    button = mon._widgets["stop"]
    assert button.layout.display == ""  # visible
    deadline = time.monotonic() + 30
    while not mon.state.summary()["n_running"]:  # watch until a trial runs
        assert run.running and time.monotonic() < deadline
        time.sleep(0.005)
    button.click()  # the kernel is idle: the click is handled at once
    counts = run.wait(60)  # the results cell
    assert mon.should_stop() and counts["cancelled"] <= 1  # mid-trial or between trials
    assert sum(counts.values()) < 400  # ended early: no trial started after the click
    assert button.layout.display == "none" and "stopped" in mon._status


# ---------------------------------------------------------------------------------------------
# trials_table, arm_means: the study notebook's results, computed by the package
# ---------------------------------------------------------------------------------------------


def _results_store(tmp_path: Path) -> Any:
    lab = Lab.resolve(tmp_path / "lab")
    with lab.store() as store:
        store.append(synthetic_study("r", n_pairs=3, epochs=2, failed=1))
        store.append(synthetic_study("other", n_pairs=4, epochs=1, seed=1))
    return lab.store()


def test_trials_table_is_the_studys_trials_best_first(tmp_path: Path) -> None:
    with _results_store(tmp_path) as store:
        table = trials_table(store, "r", top=4)
        trials = store.trials(study="r", expand=True)
    assert list(table.columns) == [c for c in TRIAL_TABLE_COLUMNS if c in trials]
    assert "metrics.val_accuracy" in table and "params.pair_id" in table
    assert len(trials) == 6 and len(table) == 4  # the first 4 of the study's 6
    scores = trials["metrics.val_accuracy"].dropna().sort_values(ascending=False).tolist()
    assert table["metrics.val_accuracy"].tolist() == scores[:4]  # best first


def test_trials_table_puts_trials_without_a_score_last_and_top_none_keeps_all(
    tmp_path: Path,
) -> None:
    with _results_store(tmp_path) as store:
        table = trials_table(store, "r", top=None)
    assert len(table) == 6
    failed = table["status"] == "failed"
    assert failed.any() and failed.tolist()[-int(failed.sum()) :] == [True] * int(failed.sum())


def test_trials_table_ranks_a_pruned_trial_by_its_best_epoch(tmp_path: Path) -> None:
    """A pruned trial reports only best_val_accuracy: it was shown without a score, last."""
    lab = Lab.resolve(tmp_path / "lab")
    ids = {"model_run_id": "run", "study": "run", "spectral_norm": False}
    with lab.store() as store:
        store.append(
            [
                events.trial_complete(**ids, trial_id="low", metrics={"val_accuracy": 0.4}),
                events.trial_complete(
                    **ids, trial_id="cut", status="pruned", metrics={"best_val_accuracy": 0.51}
                ),
            ]
        )
        table = trials_table(store, "run")
    assert table["trial_id"].tolist() == ["cut", "low"]
    assert table["metrics.val_accuracy"].tolist() == [0.51, 0.4]


def test_trials_table_of_a_study_with_no_completed_trial_is_by_trial_id(tmp_path: Path) -> None:
    lab = Lab.resolve(tmp_path / "lab")
    with lab.store() as store:
        for i in (2, 0, 1):
            ids = {"model_run_id": "run", "trial_id": f"trial_{i:04d}", "study": "run"}
            store.append([events.trial_start(**ids, spectral_norm=bool(i % 2))])
        table = trials_table(store, "run")
    assert table["trial_id"].tolist() == ["trial_0000", "trial_0001", "trial_0002"]
    assert "metrics.val_accuracy" not in table


@pytest.mark.parametrize("top", [0, -1, 2.5, True, "20"])
def test_trials_table_refuses_a_top_that_is_no_number_of_rows(tmp_path: Path, top: Any) -> None:
    with (
        _results_store(tmp_path) as store,
        pytest.raises(ConfigError, match=re.escape("top: expected a number of rows >= 1")),
    ):
        trials_table(store, "r", top=top)


def test_arm_means_puts_each_metric_of_the_arms_side_by_side(tmp_path: Path) -> None:
    with _results_store(tmp_path) as store:
        means = arm_means(store, "r")
        val = store.mean_by_spectral_norm("val_accuracy", study="r")
        test = store.mean_by_spectral_norm("test_accuracy", study="r")
    assert list(means.columns) == [
        "spectral_norm",
        "n",
        "mean_val_accuracy",
        "std_val_accuracy",
        "mean_test_accuracy",
        "std_test_accuracy",
    ]
    assert means["spectral_norm"].tolist() == [False, True]
    expected = val.merge(test.drop(columns="n"), on="spectral_norm")
    assert means.equals(expected)


def test_arm_means_keeps_an_arm_whose_metrics_have_different_counts(tmp_path: Path) -> None:
    # merged on (spectral_norm, n), an arm where some trial lacks test_accuracy vanished
    with _results_store(tmp_path) as store:
        ids = {"model_run_id": "r", "trial_id": "trial_0100", "study": "r"}
        store.append(
            [
                events.trial_start(**ids, spectral_norm=True),
                events.trial_complete(**ids, spectral_norm=True, metrics={"val_accuracy": 0.5}),
            ]
        )
        means = arm_means(store, "r", metrics=["val_accuracy", "test_accuracy"])
    assert means["spectral_norm"].tolist() == [False, True]  # both arms
    assert "n" not in means
    assert means["n_val_accuracy"].tolist() == [means["n_test_accuracy"][0], 3]
    assert means["n_test_accuracy"].tolist()[1] == 2


@pytest.mark.parametrize("metrics", [[], None, ["val_accuracy", 3], ""])
def test_arm_means_refuses_metrics_that_are_no_names(tmp_path: Path, metrics: Any) -> None:
    with (
        _results_store(tmp_path) as store,
        pytest.raises(ConfigError, match="metrics: expected a metric name or a list of names"),
    ):
        arm_means(store, "r", metrics=metrics)


# ---------------------------------------------------------------------------------------------
# The notebooks: thin, saved clean, calling the real API
# ---------------------------------------------------------------------------------------------


def _cells(name: str) -> list[dict[str, Any]]:
    cells: list[dict[str, Any]] = json.loads((NOTEBOOKS / name).read_text())["cells"]
    return cells


def _source(cell: dict[str, Any]) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebooks_are_saved_without_outputs_and_keep_their_parameters(name: str) -> None:
    cells = _cells(name)
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    params = [c for c in code if "parameters" in c["metadata"].get("tags", [])]
    assert len(params) == 1
    ast.parse(_source(params[0]))  # plain assignments papermill can override


def _calls(source: str, func: str) -> list[ast.Call]:
    tree = ast.parse(source)
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", getattr(node.func, "attr", None)) == func
    ]


def test_the_study_notebook_runs_the_study_in_the_background_and_waits_later() -> None:
    from thunderline_lab.study import run_study

    code = [_source(c) for c in _cells("spectral_norm_study.ipynb") if c["cell_type"] == "code"]
    starts = [i for i, src in enumerate(code) if _calls(src, "start_study")]
    waits = [i for i, src in enumerate(code) if "run.wait()" in src]
    assert len(starts) == 1 and waits and min(waits) > starts[0]
    assert not any(_calls(src, "run_study") for src in code)  # the package runs it
    (call,) = _calls(code[starts[0]], "start_study")
    accepted = set(inspect.signature(start_study).parameters) | set(
        inspect.signature(run_study).parameters
    )
    given = {k.arg for k in call.keywords if k.arg is not None}
    assert given <= accepted, given - accepted


def test_the_study_notebooks_results_cells_are_calls_of_the_package() -> None:
    code = [_source(c) for c in _cells("spectral_norm_study.ipynb") if c["cell_type"] == "code"]
    assert any(_calls(src, "trials_table") for src in code)
    assert any(_calls(src, "arm_means") for src in code)
    for method in ("sort_values", "merge", "head", "mean_by_spectral_norm"):  # no munging
        assert not any(_calls(src, method) for src in code), method


def test_the_compare_notebook_normalises_its_studies_parameter() -> None:
    code = [_source(c) for c in _cells("compare_constraints.ipynb") if c["cell_type"] == "code"]
    first_use = next(i for i, src in enumerate(code) if "ensure_studies(" in src)
    assert "studies = study_names(studies)" in code[first_use]
    # a mistyped lab_dir is refused by ensure_studies before lab.store() could create it
    assert code[first_use].index("ensure_studies(") < code[first_use].index("lab.store()")


def _unchecked_flags(name: str) -> set[str]:
    """The notebook's on/off parameters (a bool default) that reach its code unchecked: not
    through flag(), nor passed as start_study's monitor or mlflow (which it checks)."""
    cells = [c for c in _cells(name) if c["cell_type"] == "code"]
    (params,) = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
    flags = {
        node.targets[0].id
        for node in ast.parse(_source(params)).body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, bool)
    }
    code = "\n".join(_source(c) for c in cells if c is not params)
    checked = {
        call.args[0].value
        for call in _calls(code, "flag")
        if isinstance(call.args[0], ast.Constant)
        and isinstance(call.args[1], ast.Name)
        and call.args[1].id == call.args[0].value
    }
    checked |= {
        k.arg
        for call in _calls(code, "start_study")
        for k in call.keywords
        if k.arg in ("monitor", "mlflow") and isinstance(k.value, ast.Name) and k.value.id == k.arg
    }
    assert flags, name
    return flags - checked


def test_every_on_off_parameter_of_the_notebooks_is_checked_to_be_a_bool() -> None:
    # papermill -p write_reports false gives the text 'false', which `if write_reports:` and
    # create=new_lab take as on
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    unchecked = {name: _unchecked_flags(name) for name in names}
    assert not any(unchecked.values()), unchecked


def test_the_live_monitor_notebook_follows_until_the_study_finishes() -> None:
    code = [_source(c) for c in _cells("live_monitor.ipynb") if c["cell_type"] == "code"]
    (call,) = [c for src in code for c in _calls(src, "follow")]
    given = {k.arg for k in call.keywords}
    assert {"timeout", "quiet"} <= given <= set(inspect.signature(follow).parameters)
    assert ".ensure()" not in "".join(code)  # a mistyped lab is an error, not a new lab


@pytest.mark.parametrize("module", [monitor_mod, notebook_mod])
def test_doc_examples_run(module: Any) -> None:
    failed, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failed == 0


def test_run_study_calls_in_the_docs_use_its_real_keywords() -> None:
    from thunderline_lab.study import run_study

    accepted = set(inspect.signature(run_study).parameters)
    texts = [inspect.getsource(monitor_mod), inspect.getsource(notebook_mod)]
    found = 0
    for text in texts:
        for call in re.finditer(r"run_study\(([^()]*(?:\([^()]*\)[^()]*)*)\)", text):
            keywords = set(re.findall(r"(\w+)=", call.group(1))) - {"lambda"}
            found += 1
            assert keywords <= accepted, (call.group(0), keywords - accepted)
    assert found >= 2


# ---------------------------------------------------------------------------------------------
# What a researcher runs into: odd parameters, re-run cells, interrupts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "profile", "words"),
    [
        ({"n_trials": 24}, "nope", "profile: unknown profile 'nope' (expected full, test)"),
        ({"n_trials": 24}, ["test"], "profile: expected a profile name (full, test), got list"),
        ({"n_trials": 24}, 3, "profile: expected a profile name (full, test), got int 3"),
        (None, "test", "params: expected a mapping of parameter names to values, got NoneType"),
        ([("n_trials", 24)], "test", "params: expected a mapping of parameter names"),
        ("n_trials", "test", "params: expected a mapping of parameter names to values, got str"),
    ],
)
def test_apply_profile_names_the_parameter_at_fault(params: Any, profile: Any, words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        apply_profile(params, profile)


def test_an_unknown_profile_from_the_environment_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THUNDERLINE_LAB_PROFILE", "tset")
    with pytest.raises(ConfigError, match=r"\$THUNDERLINE_LAB_PROFILE: unknown profile 'tset'"):
        apply_profile({"n_trials": 24}, "test")


@pytest.mark.parametrize(
    ("value", "names"),
    [
        ("smoke,spectral_norm_ab", ["smoke", "spectral_norm_ab"]),  # papermill -p studies a,b
        ("smoke, spectral_norm_ab ", ["smoke", "spectral_norm_ab"]),
        (" smoke ", ["smoke"]),
        ("a,b,a", ["a", "b"]),
        (["a,b"], ["a,b"]),  # a list says exactly which names: kept as given
    ],
)
def test_study_names_splits_a_comma_separated_string(value: Any, names: list[str]) -> None:
    assert study_names(value) == names


def test_study_names_refuses_an_empty_name_in_a_comma_separated_string() -> None:
    with pytest.raises(ConfigError, match=re.escape("studies: an empty name in 'a,,b'")):
        study_names("a,,b")


def _hold_until(release: threading.Event, calls: list[dict[str, Any]]) -> Any:
    def run_study(name: str, **kw: Any) -> dict[str, int]:
        calls.append({"name": name, **kw})
        while not (release.is_set() or kw["should_stop"].is_set()):
            time.sleep(0.005)
        return {"completed": 0, "stopped": int(kw["should_stop"].is_set())}

    return run_study


def test_re_running_the_study_cell_while_the_study_runs_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    release = threading.Event()
    monkeypatch.setattr("thunderline_lab.study.run_study", _hold_until(release, calls))
    monkeypatch.setattr(LiveMonitor, "_show_widget", lambda self: None)  # JupyterLab-like
    lab = Lab.resolve(tmp_path / "lab")
    widget = {"mode": "widget", "min_interval": 0.01}
    run = start_study("cell", lab=lab, monitor_options=widget)
    try:
        assert run.running  # the cell returned; the study runs on
        for again in (
            {"name": "cell", "monitor_options": widget},
            {"name": "other", "monitor_options": widget},
            {"name": "cell", "monitor": False},
        ):
            with pytest.raises(StudyError, match=r"study 'cell' .*still running") as err:
                start_study(lab=lab, **again)
            assert "run.stop()" in str(err.value)
        assert len(calls) == 1  # no second, competing study
        assert run.running
    finally:
        assert run.stop is not None
        run.stop()
        result = run.wait(60)
    assert result["stopped"] == 1
    release.set()  # the next study returns at once
    again = start_study("cell", lab=lab, monitor_options={"mode": "text", "text_interval": 1e9})
    assert not again.running and len(calls) == 2  # once stopped, the cell may run again
    assert again.wait()["stopped"] == 0


def test_follow_starts_a_monitor_that_was_not_started() -> None:
    bus = EventBus()
    mon = LiveMonitor.from_bus(bus, "f", mode="text", text_interval=1e9)
    bus.publish_many(synthetic_study("f", n_pairs=1, epochs=2))
    assert follow(mon, timeout=60, quiet=0.0, poll=0.01) == "finished"
    assert mon.state.summary()["n_done"] == 2
    mon.close()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("timeout", "60"),
        ("timeout", -1),
        ("timeout", math.nan),
        ("quiet", None),
        ("quiet", True),
        ("poll", 0),
        ("poll", math.inf),
        ("until", True),
    ],
)
def test_follow_refuses_bad_durations_before_starting_the_monitor(option: str, value: Any) -> None:
    bus = EventBus()
    mon = LiveMonitor.from_bus(bus, "f", mode="text", text_interval=1e9)
    with pytest.raises(ConfigError, match=f"follow: {option} must be"):
        follow(mon, **{option: value})
    assert not mon._started  # refused before anything ran
    mon.close()


def test_an_interrupt_ends_following_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    bus = EventBus()
    mon = _text_monitor(bus)
    bus.publish_many(synthetic_study("f", n_pairs=1, epochs=2)[:-1])  # a trial still runs

    def interrupt() -> bool:
        raise KeyboardInterrupt  # the kernel's ■, while follow() waits

    assert follow(mon, quiet=0.0, poll=0.01, until=interrupt) == "interrupted"
    assert mon._finished
    out = capsys.readouterr().out
    assert "stopped following (interrupted; the study may still run)" in out
    assert "trial_0000" in out  # the final table
    mon.close()


@pytest.mark.slow
def test_following_under_papermill_leaves_a_png_and_a_table(tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    lab = Lab.resolve(tmp_path / "lab")
    with lab.store() as store:
        store.append(synthetic_study("pm", n_pairs=2, epochs=3))
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "from thunderline_lab.monitor import LiveMonitor\n"
            "from thunderline_lab.notebook import follow\n"
            f"mon = LiveMonitor.from_store({str(lab.root)!r}, study='pm').start()\n"
            "print(mon.mode)\n"
            "follow(mon, timeout=60, quiet=0.0, poll=0.05)"
        )
    ]
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    outputs = nb.cells[0].outputs
    text = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    lines = text.splitlines()
    assert "text" in lines  # headless: text lines, no widget
    assert lines[-1].startswith("[monitor pm] 4 trials so far: 4 done") and "finished" in lines[-1]
    data = [o["data"] for o in outputs if o["output_type"] in ("display_data", "execute_result")]
    assert any(bytes(d.get("image/png", ""), "ascii")[:8] for d in data)
    assert any(d.get("text/html", "").count('class="tl-trial"') == 4 for d in data)
    assert any(d.get("text/plain") == "'finished'" for d in data)


def test_results_of_a_gateway_study_while_the_gateway_is_down_say_where_the_events_wait(
    tmp_path: Path,
) -> None:
    from test_monitor import _free_port

    from thunderline_lab.errors import GatewayError

    lab = Lab.resolve(tmp_path / "lab").ensure()
    url = f"http://127.0.0.1:{_free_port()}"  # nothing answers there
    with pytest.raises(GatewayError, match="cannot fetch") as err:
        results_store(lab, url)
    assert "wait in" not in str(err.value)  # nothing spooled: the plain error
    (lab.root / "gateway-spool.jsonl").write_text('{"a": 1}\n{"b": 2}\n')
    with pytest.raises(GatewayError, match=r"2 event\(s\) of this lab's studies wait in"):
        results_store(lab, url)

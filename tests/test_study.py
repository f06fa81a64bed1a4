"""Tests of thunderline_lab.study: search space, paired twins, pruning, resume, workers, storage.

Most studies here run a fake trainer (same signature and events as ``train_trial``, no torch)
so they take milliseconds per trial; one test runs the real loop on a small dataset.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
from click.testing import CliRunner

from thunderline_lab import study as study_module
from thunderline_lab.bus import EventBus
from thunderline_lab.cli import main as cli
from thunderline_lab.data import load_dataset
from thunderline_lab.errors import ConfigError, StudyError
from thunderline_lab.lab import Lab
from thunderline_lab.study import (
    ParamSpec,
    SearchSpace,
    _complete_open_pairs,
    _Context,
    _group_lock,
    _member_attrs,
    _retry,
    check_study_parameters,
    make_storage,
    run_study,
    trial_id_for,
)
from thunderline_lab.training import EPOCH_MEASUREMENTS, TrialResult, _Emitter

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wine():
    return load_dataset("wine", seed=0)


def fake_trainer(config: Any, dataset: Any, **kw: Any) -> TrialResult:
    """Publishes what train_trial publishes; the loss depends on lr, SN and seed only."""
    emit = _Emitter(
        kw["bus"], kw["model_run_id"], kw["trial_id"], kw.get("study"), config.spectral_norm
    )
    emit.publish("ml.run.start", spectral_norm=config.spectral_norm, parameters=kw["parameters"])
    base = kw["lr"] * 100 + (0.1 if config.spectral_norm else 0.0) + kw["seed"] / 1000
    history = []
    for epoch in range(kw["epochs"]):
        loss = base / (epoch + 1)
        history.append({"epoch": float(epoch), "val_loss": loss})
        emit.publish(
            "ml.run.metric", step=epoch, measurements=dict.fromkeys(EPOCH_MEASUREMENTS, loss)
        )
        if kw["report"](epoch, loss):
            emit.publish("ml.run.stop", epochs=epoch + 1, metrics={"best_val_loss": loss})
            return TrialResult("pruned", {"best_val_loss": loss}, history, duration_ms=1)
    metrics = {"best_val_loss": loss, "val_accuracy": 1 - loss / 10, "test_accuracy": 0.5}
    emit.publish("ml.run.stop", epochs=kw["epochs"], metrics=metrics)
    return TrialResult("completed", metrics, history, duration_ms=1)


def diverging_trainer(config: Any, dataset: Any, **kw: Any) -> TrialResult:
    if config.spectral_norm:
        return fake_trainer(config, dataset, **kw)
    return TrialResult(
        "failed",
        {"epochs": 0.0},
        error="non-finite training loss",
        error_type="diverged",
        duration_ms=1,
    )


def _run(tmp_path: Path, name: str = "s", **kw: Any):
    kw.setdefault("dataset", load_dataset("wine", seed=0))
    kw.setdefault("trainer", fake_trainer)
    kw.setdefault("epochs", 3)
    kw.setdefault("sampler", optuna.samplers.RandomSampler(seed=0))
    return run_study(name, lab=tmp_path / "lab", **kw)


# -------------------------------------------------------------------------- search space


def test_param_spec_forms():
    assert ParamSpec.parse("lr", [1e-4, 1e-2]) == ParamSpec("float", low=1e-4, high=1e-2, log=True)
    assert ParamSpec.parse("dropout", [0.0, 0.5]).log is False
    assert ParamSpec.parse("depth", [1, 4]).kind == "int"
    assert ParamSpec.parse("width", {"choices": [32, 64]}).choices == (32, 64)
    assert ParamSpec.parse("activation", ["relu", "gelu"]).kind == "categorical"
    assert ParamSpec.parse("depth", 2) == ParamSpec("fixed", value=2)
    assert ParamSpec.parse("lr", {"low": 0.1, "high": 1.0, "log": False}).log is False


@pytest.mark.parametrize(
    "name, spec",
    [
        ("lr", [0.0, 1e-2]),  # log-uniform needs low > 0
        ("lr", [1e-2, 1e-3]),  # low > high
        ("depth", [1.5, 3]),  # integer bounds
        ("lr", {"lo": 1}),  # unknown key
        ("lr", []),
    ],
)
def test_param_spec_errors_name_the_parameter(name, spec):
    with pytest.raises(ConfigError, match=name):
        ParamSpec.parse(name, spec)


def test_search_space_from_toml_and_unknown_names(tmp_path):
    cfg = tmp_path / "study.toml"
    cfg.write_text("[search_space]\nlr = [1e-3, 1e-2]\ndepth = 2\nspectral_norm_coeff = [1, 3]\n")
    space = SearchSpace.from_toml(cfg)
    assert space.depth.kind == "fixed" and space.spectral_norm_coeff.log
    assert SearchSpace.from_dict(space.to_dict()) == space
    with pytest.raises(ConfigError, match="unknown parameter"):
        SearchSpace.from_dict({"learning_rate": 0.1})
    bad = tmp_path / "bad.toml"
    bad.write_text("[search_space]\nlr = [0, 1]\n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        SearchSpace.from_toml(bad)


KNOWN_PARAMETERS = (
    "activation, batch_size, batchnorm, conv_sn_mode, depth, dropout, lr, n_power_iterations, "
    "spectral_norm, spectral_norm_coeff, weight_decay, width"
)


def test_a_misspelt_search_space_name_gets_a_did_you_mean():
    # "search_space: unknown parameter(s) ['depht']; known: [...]", with no hint
    with pytest.raises(ConfigError) as err:
        check_study_parameters({"search_space": {"depht": [1, 3]}})
    assert str(err.value) == (
        f"search_space.depht: unknown parameter (did you mean 'depth'?); known: {KNOWN_PARAMETERS}"
    )
    with pytest.raises(ConfigError) as err:
        SearchSpace.from_dict({"wdth": 64, "depht": 2})
    assert str(err.value).startswith(
        "search_space.depht: unknown parameter (did you mean 'depth'?); "
        "search_space.wdth: unknown parameter (did you mean 'width'?); known: activation, "
    )
    with pytest.raises(ConfigError) as err:
        SearchSpace().with_fixed(spectral_nrom=True)
    assert str(err.value).startswith(
        "search_space.spectral_nrom: unknown parameter (did you mean 'spectral_norm'?); known: "
    )
    with pytest.raises(ConfigError) as err:
        ParamSpec.parse("lr", {"lwo": 1e-4, "high": 1e-2})
    assert str(err.value) == (
        "search_space.lr.lwo: unknown key (did you mean 'low'?); "
        "known: choices, high, log, low, value"
    )


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        # "search_space.lr: 'fast': lr must be a finite number > 0, got 'fast'"
        ({"lr": "fast"}, "search_space.lr: 'fast': lr must be a finite number > 0"),
        ({"batch_size": [0, 8]}, "search_space.batch_size: 0: batch_size must be an integer >= 1"),
        # as the model holds the value: 5 -> 5.0, 200.0 -> 200
        ({"dropout": 5}, "search_space.dropout: 5: ModelConfig.dropout must be in [0, 1)"),
        ({"depth": 200.0}, "search_space.depth: 200.0: ModelConfig.depth must be between 1 and"),
        ({"activation": "swishy"}, "search_space.activation: 'swishy': ModelConfig.activation"),
    ],
)
def test_a_search_space_value_no_trial_could_run_with_is_said_once(space, expected):
    with pytest.raises(ConfigError) as err:
        check_study_parameters({"search_space": space})
    assert str(err.value).startswith(expected)
    value = str(err.value).split(": ")[1]
    assert str(err.value).count(value) == 1 and ", got " not in str(err.value), str(err.value)


@pytest.mark.parametrize("architecture", ["mlp", "cnn"])
def test_coefficient_and_conv_mode_only_suggested_when_sn_is_on(architecture):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        values = SearchSpace().suggest(trial, architecture)
        sn = values["spectral_norm"]
        seen.add(sn)
        assert ("spectral_norm_coeff" in trial.params) == sn
        assert ("conv_sn_mode" in trial.params) == (sn and architecture == "cnn")
        assert {"lr", "depth", "width", "dropout", "weight_decay"} <= set(trial.params)
        study.tell(trial, 0.0)
    assert seen == {False, True}


def test_fixed_values_are_not_suggested():
    study = optuna.create_study()
    trial = study.ask()
    space = SearchSpace.from_dict({"depth": 2, "spectral_norm": True})
    values = space.suggest(trial)
    assert values["depth"] == 2 and "depth" not in trial.params
    assert values["spectral_norm"] is True and "spectral_norm_coeff" in trial.params


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ({"lr": "fast"}, "search_space.lr: 'fast': lr must be a finite number > 0"),
        ({"batch_size": [0, 8]}, "search_space.batch_size: 0: batch_size must be an integer >= 1"),
        ({"activation": ["relu", "swishy"]}, "search_space.activation: 'swishy': ModelConfig"),
        ({"width": [8, 100000]}, "search_space.width: 100000: ModelConfig.width must be between"),
    ],
)
def test_a_search_space_no_trial_could_run_with_is_refused_before_any_trial(
    tmp_path, space, expected
):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        _run(tmp_path, n_trials=2, search_space=space)
    assert not (tmp_path / "lab").exists()  # nothing started, no study made


# -------------------------------------------------------------------------- designs


def test_paired_twins_share_everything_but_sn(tmp_path):
    result = _run(tmp_path, n_trials=6)
    assert result.counts["completed"] == 6 and result.n_run == 6
    trials = result.study.get_trials()
    pairs: dict[str, list] = {}
    for t in trials:
        pairs.setdefault(t.user_attrs["pair_id"], []).append(t)
    assert len(pairs) == 3
    for members in pairs.values():
        a, b = members
        assert {a.params["spectral_norm"], b.params["spectral_norm"]} == {False, True}
        assert a.user_attrs["seed"] == b.user_attrs["seed"] == 0
        shared = lambda t: {  # noqa: E731
            k: v for k, v in t.params.items() if k not in ("spectral_norm", "spectral_norm_coeff")
        }
        assert shared(a) == shared(b)
        on = a if a.params["spectral_norm"] else b
        assert "spectral_norm_coeff" in on.params
        assert {a.user_attrs["arm"], b.user_attrs["arm"]} == {"sn_on", "sn_off"}


def test_paired_with_two_seeds_runs_every_arm_at_every_seed(tmp_path):
    result = _run(tmp_path, n_trials=8, seeds=(0, 1))
    groups: dict[str, list] = {}
    for t in result.study.get_trials():
        groups.setdefault(t.user_attrs["group_id"], []).append(t)
    assert len(groups) == 2
    for members in groups.values():
        arms = sorted((t.user_attrs["seed"], t.params["spectral_norm"]) for t in members)
        assert arms == [(0, False), (0, True), (1, False), (1, True)]
        coeffs = {t.params.get("spectral_norm_coeff") for t in members if t.params["spectral_norm"]}
        assert len(coeffs) == 1  # the SN arm keeps its coefficient across seeds


def test_tpe_design_samples_every_trial(tmp_path):
    result = _run(tmp_path, n_trials=4, design="tpe", sampler=None, sampler_seed=3)
    trials = result.study.get_trials()
    assert len(trials) == 4
    assert all("pair_id" not in t.user_attrs for t in trials)
    assert len({t.params["lr"] for t in trials}) == 4


def test_paired_design_refuses_a_fixed_spectral_norm(tmp_path):
    with pytest.raises(ConfigError, match="paired"):
        _run(tmp_path, n_trials=2, search_space={"spectral_norm": True})


# -------------------------------------------------------------------------- events, failures


def test_small_real_study_lands_its_events_in_the_store(tmp_path, wine):
    bus = EventBus()
    result = run_study(
        "real",
        lab=tmp_path / "lab",
        dataset=wine,
        n_trials=2,
        epochs=2,
        bus=bus,
        search_space={"depth": 1, "width": 8},
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    assert result.counts["completed"] == 2
    df = result.trials
    assert sorted(df["trial_id"]) == ["trial_0000", "trial_0001"]
    assert set(df["status"]) == {"completed"}
    assert set(df["spectral_norm"]) == {True, False}
    assert (df["study"] == "real").all() and (df["model_run_id"] == "real").all()
    assert df["metrics.test_accuracy"].notna().all()
    assert df["metrics.lipschitz_upper"].notna().all()
    with Lab.resolve(tmp_path / "lab").store() as store:
        counts = store.counts()
        events = list(store.iter_events())
        history = store.metric_history("real", "trial_0000")
    names = [e["name"] for e in events]
    assert names.count("ml.trial.start") == 2 and names.count("ml.trial.complete") == 2
    assert names.count("ml.run.start") == 2 and names.count("ml.run.stop") == 2
    assert names.count("ml.run.metric") == 4
    assert set(history["name"]) >= set(EPOCH_MEASUREMENTS)
    assert counts  # projections built
    # Optuna's user attrs carry ids and metrics for optuna-dashboard.
    t0 = result.study.get_trials()[0]
    assert t0.user_attrs["trial_id"] == trial_id_for(t0.number)
    assert t0.user_attrs["model_run_id"] == "real"
    assert "test_accuracy" in t0.user_attrs and "lipschitz_lower" in t0.user_attrs
    complete = next(e for e in events if e["name"] == "ml.trial.complete")
    params = complete["payload"]["parameters"]
    assert {
        "lr",
        "depth",
        "width",
        "dropout",
        "weight_decay",
        "spectral_norm",
        "seed",
        "pair_id",
        "arm",
        "spectral_norm_coeff",
    } <= set(params)


def test_diverged_trials_are_failed_not_crashes(tmp_path):
    result = _run(tmp_path, n_trials=4, trainer=diverging_trainer)
    c = result.counts
    assert c["completed"] == 2 and c["failed"] == 2 and c["finished"] == 4
    df = result.trials
    failed = df[df["status"] == "failed"]
    assert set(failed["error_type"]) == {"diverged"}
    assert not failed["spectral_norm"].any()


def test_pruned_trials_are_recorded_as_pruned(tmp_path):
    pruner = optuna.pruners.ThresholdPruner(upper=-1.0)  # every reported loss is above
    result = _run(tmp_path, n_trials=4, pruner=pruner, pruning=True)
    assert result.counts["pruned"] == 4
    assert set(result.trials["status"]) == {"pruned"}
    assert all(t.state == optuna.trial.TrialState.PRUNED for t in result.study.get_trials())


def test_paired_design_does_not_prune_by_default(tmp_path):
    # Pruning one twin on the study-wide median would break its pair.
    pruner = optuna.pruners.ThresholdPruner(upper=-1.0)  # would prune every trial
    paired = _run(tmp_path, "paired", n_trials=4, pruner=pruner)
    assert paired.counts["pruned"] == 0 and paired.counts["completed"] == 4
    tpe = _run(tmp_path, "tpe", n_trials=2, pruner=pruner, design="tpe")
    assert tpe.counts["pruned"] == 2


def test_errors_stop_the_study_after_repeated_failures(tmp_path):
    def broken(config: Any, dataset: Any, **kw: Any) -> TrialResult:
        raise RuntimeError("bug in the trainer")

    with pytest.raises(StudyError, match="in a row"):
        _run(tmp_path, n_trials=10, trainer=broken, max_consecutive_errors=3)
    df = _run(tmp_path, n_trials=1, trainer=fake_trainer).trials  # resumes, store intact
    assert set(df[df["status"] == "failed"]["error_type"]) == {"RuntimeError"}


# -------------------------------------------------------------------------- resume, stop


def test_rerun_resumes_and_does_nothing_when_done(tmp_path):
    first = _run(tmp_path, n_trials=4)
    assert first.n_run == 4
    again = _run(tmp_path, n_trials=4)
    assert again.n_run == 0 and again.counts["finished"] == 4
    more = _run(tmp_path, n_trials=6)
    assert more.n_run == 2 and more.counts["finished"] == 6


def test_trials_carry_the_batch_run_that_ran_them_only_under_one(tmp_path, monkeypatch):
    """`thunderline-lab run` names its run in the kernel's environment; the run then counts
    the trials carrying that id as its own (another run of the study may finish others)."""
    monkeypatch.delenv(study_module.BATCH_ENV, raising=False)
    _run(tmp_path, n_trials=2)  # a pair run from Python, not by a batch run
    monkeypatch.setenv(study_module.BATCH_ENV, "3f2a")
    result = _run(tmp_path, n_trials=4)
    attrs = [t.user_attrs for t in result.study.get_trials()]
    assert [a.get(study_module.BATCH_ATTR) for a in attrs] == [None, None, "3f2a", "3f2a"]
    assert all(a["worker_pid"] == os.getpid() for a in attrs)


def test_should_stop_ends_cleanly_and_the_next_run_resumes(tmp_path):
    stop = threading.Event()
    result = _run(
        tmp_path, n_trials=6, should_stop=stop, progress=lambda done, total, t: stop.set()
    )
    assert result.stopped == "should_stop" and result.n_run == 1
    assert result.counts["finished"] == 1 and result.counts["waiting"] == 1  # its twin
    stop2 = threading.Event()
    stop2.set()
    idle = _run(tmp_path, n_trials=6, should_stop=stop2)
    assert idle.n_run == 0 and idle.stopped == "should_stop"
    done = _run(tmp_path, n_trials=6)
    assert done.n_run == 5 and done.counts["finished"] == 6
    pairs = {t.user_attrs["pair_id"] for t in done.study.get_trials()}
    assert len(pairs) == 3  # the twin enqueued before the stop ran in the next call


def test_should_stop_during_a_trial_cancels_and_retries_it(tmp_path):
    stop = threading.Event()

    def stopping(config: Any, dataset: Any, **kw: Any) -> TrialResult:
        stop.set()
        return TrialResult("cancelled", {}, [], duration_ms=1)

    result = _run(tmp_path, n_trials=4, trainer=stopping, should_stop=stop)
    assert result.stopped == "should_stop"
    assert result.counts["cancelled"] == 1 and result.counts["waiting"] >= 1
    assert set(result.trials["status"]) == {"cancelled"}
    resumed = _run(tmp_path, n_trials=4)
    assert resumed.counts["finished"] == 4
    retried = [t for t in resumed.study.get_trials() if "retry_of" in t.user_attrs]
    assert retried and retried[0].user_attrs["retry_of"] == 0


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_stop_or_a_recorded_failure_leaves_no_optuna_traceback(tmp_path):
    """A Stop (should_stop) cancels the trial and a diverged one is recorded as failed by
    the lab; Optuna's "Trial N failed ... because of the following error" warning with its
    traceback read as a crash in the notebook. Other Optuna warnings still come through."""
    optimize_log = logging.getLogger("optuna.study._optimize")
    seen = _Collect()
    optimize_log.addHandler(seen)
    try:
        stop = threading.Event()

        def stopping(config: Any, dataset: Any, **kw: Any) -> TrialResult:
            stop.set()
            return TrialResult("cancelled", {}, [], duration_ms=1)

        stopped = _run(tmp_path, n_trials=4, trainer=stopping, should_stop=stop)
        diverged = _run(tmp_path, "diverging", n_trials=4, trainer=diverging_trainer)
        optimize_log.warning("Trial 99 failed with value None.")  # not one of ours
    finally:
        optimize_log.removeHandler(seen)
    assert stopped.counts["cancelled"] == 1 and diverged.counts["failed"] == 2
    assert seen.messages == ["Trial 99 failed with value None."]
    assert not optimize_log.filters  # the filter lives as long as the study runs


def test_keyboard_interrupt_records_the_trial_as_cancelled_and_resumes(tmp_path):
    calls = []

    def interrupted(config: Any, dataset: Any, **kw: Any) -> TrialResult:
        calls.append(kw["trial_id"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return fake_trainer(config, dataset, **kw)

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, n_trials=4, trainer=interrupted)
    resumed = _run(tmp_path, n_trials=4)
    c = resumed.counts
    assert c["finished"] == 4 and c["cancelled"] == 1
    df = resumed.trials
    assert df.set_index("trial_id").loc["trial_0001", "status"] == "cancelled"
    retried = [t for t in resumed.study.get_trials() if t.user_attrs.get("retry_of") == 1]
    assert len(retried) == 1


_WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import optuna
    from test_study import fake_trainer
    from thunderline_lab.data import load_dataset
    from thunderline_lab.study import run_study

    def slow(config, dataset, **kw):
        time.sleep(float({sleep!r}))
        return fake_trainer(config, dataset, **kw)

    ready, go = Path({lab!r}).parent / "ready_{tag}", Path({lab!r}).parent / "go"
    ready.touch()
    while {wait!r} and not go.exists():
        time.sleep(0.05)
    r = run_study("mp", lab={lab!r}, dataset=load_dataset("wine", seed=0), n_trials={n},
                  epochs=2, trainer=slow, heartbeat_interval={heartbeat!r}, grace_period=600)
    print("finished", r.counts["finished"], "ran", r.n_run, flush=True)
    """
)


def _worker(
    tmp_path: Path, n: int, sleep: float, tag: str, wait: bool = False, heartbeat: float = 1
) -> subprocess.Popen:
    script = tmp_path / f"worker_{tag}.py"
    script.write_text(
        _WORKER.format(
            tests=str(Path(__file__).parent),
            lab=str(tmp_path / "lab"),
            n=n,
            sleep=sleep,
            tag=tag,
            wait=wait,
            heartbeat=heartbeat,
        )
    )
    return subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def _running_trials(tmp_path: Path) -> int:
    journal = Lab.resolve(tmp_path / "lab").optuna_journal
    if not journal.exists():
        return 0
    try:
        study = optuna.load_study(study_name="mp", storage=make_storage(journal))
    except KeyError:
        return 0
    running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    # its worker is on record and it has drawn parameters: killed mid-trial (a kill between
    # the two leaves nothing to retry with, and the retry draws afresh; a kill between two
    # suggestions leaves some, which the retry keeps, drawing the others)
    return sum("worker_pid" in t.user_attrs and bool(t.params) for t in running)


@pytest.mark.parametrize("heartbeat", [1, 3600], ids=["beating", "killed-before-a-beat"])
def test_worker_killed_mid_trial_leaves_a_stale_trial_that_is_failed_and_retried(
    tmp_path, heartbeat
):
    # killed before its first heartbeat, the trial's deferred attributes are never written:
    # its worker's pid is written at once, so the next run knows it dead at once (the grace
    # period is 600 s)
    proc = _worker(tmp_path, n=3, sleep=120, tag="victim", heartbeat=heartbeat)
    deadline = time.monotonic() + 90
    while _running_trials(tmp_path) == 0:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the worker never started a trial"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()  # reaped: its pid is gone

    result = _run(tmp_path, name="mp", n_trials=3, epochs=2)
    assert result.counts["stale"] == 1
    assert result.counts["finished"] == 3 and result.counts["running"] == 0
    stale = result.trials[result.trials["error_type"] == "stale"]
    assert len(stale) == 1 and (stale["status"] == "failed").all()
    retried = [t for t in result.study.get_trials() if "retry_of" in t.user_attrs]
    assert len(retried) == 1
    dead = result.study.get_trials()[retried[0].user_attrs["retry_of"]]
    assert dead.params and dead.params.items() <= retried[0].params.items()


def _side_by_side(tmp_path: Path, workers: int, n: int, sleep: float) -> list[tuple[str, str]]:
    """Worker processes that start their study at the same instant; each must exit 0.
    Returns their (stdout, stderr)."""
    procs = [_worker(tmp_path, n=n, sleep=sleep, tag=str(i), wait=True) for i in range(workers)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready_{i}").exists() for i in range(workers)):
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    return outs


@pytest.mark.slow
def test_several_worker_processes_share_one_study_without_lock_errors(tmp_path):
    outs = _side_by_side(tmp_path, workers=2, n=12, sleep=0.2)
    for _out, err in outs:
        assert "locked" not in err.lower()
    ran = [int(out.split()[-1]) for out, _ in outs]
    assert all(r > 0 for r in ran), ran  # both did work
    result = _run(tmp_path, name="mp", n_trials=12, epochs=2)
    assert result.n_run == 0
    c = result.counts
    assert c["finished"] == 12 and c["running"] == 0 and c["failed"] == 0  # the budget, exactly
    df = result.trials
    assert len(df) == 12 and set(df["status"]) == {"completed"}
    _assert_whole_pairs(result.study)


def _assert_whole_pairs(study: optuna.Study) -> None:
    """Every completed trial has its twin: the same pair_id in the other arm."""
    arms: dict[str, list[str]] = {}
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        arms.setdefault(t.user_attrs["pair_id"], []).append(t.user_attrs["arm"])
    assert all(sorted(a) == ["sn_off", "sn_on"] for a in arms.values()), arms


@pytest.mark.slow
def test_more_workers_than_the_budget_run_the_budget_and_whole_pairs(tmp_path):
    """Three workers asking for trials at the same instant, for a budget of 2: one pair
    runs; a worker that finds the budget taken stands down (its Optuna trial, marked
    surplus, is not part of the study: not counted, no event, no row in the store)."""
    _side_by_side(tmp_path, workers=3, n=2, sleep=0.5)
    result = _run(tmp_path, name="mp", n_trials=2, epochs=2)
    assert result.n_run == 0
    assert result.counts["finished"] == 2 and result.counts["stale"] == 0
    assert len(result.trials) == 2  # the store: the pair, nothing of the surplus trials
    _assert_whole_pairs(result.study)
    surplus = [t for t in result.study.get_trials() if t.user_attrs.get("status") == "surplus"]
    assert all(t.state == optuna.trial.TrialState.FAIL for t in surplus)
    assert len(result.study.get_trials()) == 2 + len(surplus)


# -------------------------------------------------------------------------- storage, CLI


# Database servers the RDB tests run against: (the variable naming one, its name in words).
_SERVERS = {
    "postgresql": ("TL_TEST_POSTGRES_URL", "PostgreSQL"),
    "mysql": ("TL_TEST_MYSQL_URL", "MariaDB"),
}
_SERVER_PARAMS = [
    pytest.param("postgresql", marks=pytest.mark.postgres),
    pytest.param("mysql", marks=pytest.mark.mysql),
]


def _server_url(server: str) -> str:
    variable, what = _SERVERS[server]
    url = os.environ.get(variable)
    if not url:
        pytest.skip(f"{variable} is not set (.ci/run starts {what} and sets it)")
    return url


def test_journal_is_the_default_storage(tmp_path):
    result = _run(tmp_path, n_trials=1)
    assert result.storage == str(Lab.resolve(tmp_path / "lab").optuna_journal)
    assert Path(result.storage).stat().st_size > 0


@pytest.mark.parametrize("server", _SERVER_PARAMS)
def test_rdb_server_storage(tmp_path, server):
    url = _server_url(server)
    name = f"rdb-{uuid.uuid4().hex[:8]}"
    result = _run(tmp_path, name=name, n_trials=4, storage=url)
    assert result.counts["completed"] == 4
    assert result.storage.endswith(url.rsplit("@", 1)[-1])
    assert len(result.trials) == 4
    again = _run(tmp_path, name=name, n_trials=6, storage=url)
    assert again.n_run == 2 and again.counts["finished"] == 6
    loaded = optuna.load_study(study_name=name, storage=url)
    t = loaded.get_trials()[0]
    assert t.user_attrs["trial_id"] == "trial_0000" and "pair_id" in t.user_attrs
    optuna.delete_study(study_name=name, storage=url)


def test_unreachable_rdb_storage_is_a_study_error_without_the_password(tmp_path):
    with pytest.raises(StudyError, match="cannot open") as info:
        make_storage("postgresql+psycopg2://nobody:secret@127.0.0.1:1/none")
    assert "secret" not in str(info.value) and "nobody:***@127.0.0.1:1" in str(info.value)


def test_study_of_another_dataset_is_refused(tmp_path):
    _run(tmp_path, n_trials=1)
    with pytest.raises(ConfigError, match="dataset"):
        _run(tmp_path, n_trials=2, dataset=load_dataset("moons", seed=0))


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"epochs": 5}, "epochs=3, not 5:"),
        ({"seeds": (0, 1)}, "seeds=[0], not [0, 1]:"),
        # only what differs, not two whole search spaces
        ({"search_space": {"lr": [1e-3, 1e-2]}}, "search_space.lr.low=0.0003, not 0.001:"),
    ],
)
def test_resuming_with_other_epochs_seeds_or_space_is_refused(tmp_path, change, said):
    _run(tmp_path, n_trials=2)
    with pytest.raises(ConfigError, match=re.escape(f"made with {said} its trials would not")):
        _run(tmp_path, n_trials=4, **change)
    assert _run(tmp_path, n_trials=4).counts["completed"] == 4  # the same settings resume


def test_a_budget_that_splits_a_pair_is_warned_about(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="thunderline_lab.study"):
        _run(tmp_path, n_trials=3)
    (msg,) = [r.getMessage() for r in caplog.records if "not a multiple" in r.getMessage()]
    assert "n_trials=3 is not a multiple of 2" in msg and "n_trials=4 keeps" in msg
    caplog.clear()
    with caplog.at_level("WARNING", logger="thunderline_lab.study"):
        _run(tmp_path, name="whole", n_trials=4)
    assert not [r for r in caplog.records if "not a multiple" in r.getMessage()]


def test_resuming_completes_a_pair_that_an_odd_budget_cut(tmp_path):
    first = _run(tmp_path, name="odd", n_trials=3)
    arms = {(t.user_attrs["group_id"], t.user_attrs["arm"]) for t in first.study.get_trials()}
    (orphan,) = [g for g, _ in arms if sum(1 for h, _ in arms if h == g) == 1]
    resumed = _run(tmp_path, name="odd", n_trials=4)
    groups: dict[str, set[str]] = {}
    for t in resumed.study.get_trials():
        groups.setdefault(t.user_attrs["group_id"], set()).add(t.user_attrs["arm"])
    assert groups[orphan] == {"sn_on", "sn_off"}  # its twin ran, not a new configuration
    assert all(arms == {"sn_on", "sn_off"} for arms in groups.values())
    twin = [t for t in resumed.study.get_trials() if t.user_attrs["group_id"] == orphan]
    hyper = [{k: v for k, v in t.params.items() if "spectral" not in k} for t in twin]
    assert hyper[0] == hyper[1]  # the same configuration, SN flipped


_COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _members(study: optuna.Study) -> dict[str, list[tuple[int, str]]]:
    """(seed, arm) of each group's counted trials, sorted; a member run twice shows twice."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for t in study.get_trials():
        if t.state in _COUNTED:
            member = (t.user_attrs["seed"], t.user_attrs["arm"])
            groups.setdefault(t.user_attrs["group_id"], []).append(member)
    return {g: sorted(m) for g, m in groups.items()}


def _whole(seeds: tuple[int, ...], arms: tuple[str, ...]) -> list[tuple[int, str]]:
    return sorted((s, a) for s in seeds for a in arms)


def _hyper(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return {k: v for k, v in t.params.items() if not k.startswith("spectral_norm")}


def _context(study: optuna.Study, n_trials: int, seeds: tuple[int, ...] = (0, 1)) -> _Context:
    return _Context(
        name=study.study_name,
        study=study,
        bus=EventBus(),
        space=SearchSpace(),
        design="paired",
        seeds=seeds,
        n_trials=n_trials,
        architecture="mlp",
        dataset="wine",
        epochs=3,
        patience=None,
        pruning=False,
        should_stop=None,
        trainer=fake_trainer,
        evaluation=None,
        train_kwargs={},
    )


@pytest.mark.parametrize("sampler_seed", [0, 1])  # the cut configuration starts SN off / on
@pytest.mark.parametrize("cut", [5, 6, 7])
def test_resuming_completes_every_seed_and_arm_of_a_group_the_budget_cut(
    tmp_path, caplog, cut, sampler_seed
):
    seeds = (0, 1)
    sampler = optuna.samplers.RandomSampler(seed=sampler_seed)
    first = _run(tmp_path, name="cut", n_trials=cut, seeds=seeds, sampler=sampler)
    before = _members(first.study)
    (short,) = [g for g, m in before.items() if len(m) < 4]
    with caplog.at_level("INFO", logger="thunderline_lab.study"):
        resumed = _run(tmp_path, name="cut", n_trials=8, seeds=seeds, sampler=sampler)
    assert "enqueued to complete groups" in caplog.text
    assert resumed.n_run == 8 - cut and resumed.counts["finished"] == 8
    # the cut group is whole, each member once, and no new configuration was started
    assert _members(resumed.study) == {g: _whole(seeds, ("sn_off", "sn_on")) for g in before}
    group = [t for t in resumed.study.get_trials() if t.user_attrs["group_id"] == short]
    assert all(t.user_attrs["pair_id"] == f"{short}_s{t.user_attrs['seed']}" for t in group)
    assert len({tuple(sorted(_hyper(t).items())) for t in group}) == 1
    on = [t for t in group if t.params["spectral_norm"]]
    assert len({t.params["spectral_norm_coeff"] for t in on}) == 1  # one coefficient per arm
    assert not any("spectral_norm_coeff" in t.params for t in group if t not in on)


def test_resuming_an_unpaired_study_completes_the_seeds_of_a_cut_configuration(tmp_path):
    # Seeds draw different data splits: a configuration seen at its first seed only would
    # weigh that split more in its arm. Its parameters, coefficient included, are known.
    seeds = (0, 1, 2)
    first = _run(tmp_path, name="tpe", design="tpe", seeds=seeds, n_trials=4)
    assert sorted(len(m) for m in _members(first.study).values()) == [1, 3]
    resumed = _run(tmp_path, name="tpe", design="tpe", seeds=seeds, n_trials=6)
    assert resumed.n_run == 2
    members = _members(resumed.study)
    assert members.keys() == _members(first.study).keys()
    for group_id, m in members.items():
        (arm,) = {a for _, a in m}
        assert m == _whole(seeds, (arm,))
        group = [t for t in resumed.study.get_trials() if t.user_attrs["group_id"] == group_id]
        assert all(t.params == group[0].params for t in group)
        assert not any("pair_id" in t.user_attrs for t in group)


def test_a_cut_group_with_a_waiting_member_is_completed_without_running_it_twice(tmp_path):
    stop = threading.Event()
    first = _run(
        tmp_path,
        name="w",
        n_trials=6,
        seeds=(0, 1),
        should_stop=stop,
        progress=lambda done, total, t: stop.set() if done == 5 else None,
    )
    # the cut configuration's twin waits; its other seed is beyond the budget
    assert first.counts["finished"] == 5 and first.counts["waiting"] == 1
    resumed = _run(tmp_path, name="w", n_trials=8, seeds=(0, 1))
    assert resumed.n_run == 3 and resumed.counts["waiting"] == 0
    whole = _whole((0, 1), ("sn_off", "sn_on"))
    assert _members(resumed.study) == {"g0000": whole, "g0004": whole}


def test_completing_groups_respects_the_budget_busy_groups_and_waiting_members(tmp_path):
    first = _run(tmp_path, name="b", n_trials=6, seeds=(0, 1))
    study = first.study
    assert _members(study)["g0004"] == [(0, "sn_off"), (0, "sn_on")]
    # a member running (another worker's): the group is busy, nothing is enqueued
    study.enqueue_trial({}, user_attrs=_member_attrs("g0004", 1, False, "paired"))
    running = study.ask()
    assert _complete_open_pairs(study, _context(study, n_trials=10)) == 0
    # failed without a verdict (stale): it stands for nothing, so its member is missing
    study.tell(running, state=optuna.trial.TrialState.FAIL)
    assert _complete_open_pairs(study, _context(study, n_trials=7)) == 1  # budget: one
    assert _complete_open_pairs(study, _context(study, n_trials=8)) == 1  # the other one
    assert _complete_open_pairs(study, _context(study, n_trials=12)) == 0  # both wait
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert sorted((t.user_attrs["arm"], t.user_attrs["pair_id"]) for t in waiting) == [
        ("sn_off", "g0004_s1"),
        ("sn_on", "g0004_s1"),
    ]
    resumed = _run(tmp_path, name="b", n_trials=8, seeds=(0, 1))
    assert resumed.n_run == 2
    assert _members(resumed.study)["g0004"] == _whole((0, 1), ("sn_off", "sn_on"))
    by_arm = {t.user_attrs["pair_id"] + t.user_attrs["arm"]: t for t in resumed.study.get_trials()}
    for arm in ("sn_off", "sn_on"):  # the seed-1 members run the seed-0 member's parameters
        assert by_arm[f"g0004_s1{arm}"].params == by_arm[f"g0004_s0{arm}"].params


def test_workers_resuming_side_by_side_take_turns_to_complete_groups(tmp_path):
    first = _run(tmp_path, name="side", n_trials=6, seeds=(0, 1))
    study = first.study
    found: list[int] = []
    other = threading.Thread(
        target=lambda: found.append(_complete_open_pairs(study, _context(study, n_trials=8)))
    )
    with _group_lock(study._storage, "side"):  # one worker's turn: it completes the group
        other.start()
        other.join(timeout=0.5)
        assert other.is_alive()  # the other worker waits for it ...
        for sn in (False, True):
            study.enqueue_trial({}, user_attrs=_member_attrs("g0004", 1, sn, "paired"))
    other.join(timeout=60)
    assert found == [0]  # ... and then finds the members waiting
    stale = threading.Thread(target=study._storage.fail_stale, args=(study,))
    with _group_lock(study._storage, "side"):  # failing and retrying stale trials takes turns too
        stale.start()
        stale.join(timeout=0.5)
        assert stale.is_alive()
    stale.join(timeout=60)
    assert not stale.is_alive()


def _shared_storage(backend: str, tmp_path: Path) -> Any:
    """What every worker of a test passes as ``storage`` (one object for in-memory)."""
    if backend == "journal":
        return str(tmp_path / "optuna.journal")
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'optuna.db'}"
    if backend in _SERVERS:
        return _server_url(backend)
    return optuna.storages.InMemoryStorage()


_BACKENDS = ["journal", "sqlite", *_SERVER_PARAMS, "memory"]


def test_a_new_configuration_reserves_its_whole_group_side_by_side_workers_stand_down():
    """Two workers ask at the same instant (paired, seeds 0 and 1, a budget of one group).
    The first to plan reserves all 4 of its group's trials, the replicate its SN leader
    enqueues later included, so the second stands down (surplus); the leader then finds
    its replicate's room. Both configurations taking part split both."""
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), study_name="x")
    ctx = _context(study, n_trials=4, seeds=(0, 1))
    a, b = study.ask(), study.ask()
    a.suggest_categorical("spectral_norm", [False, True])
    study_module._plan_group(ctx, a, {"spectral_norm": False})
    b.suggest_categorical("spectral_norm", [False, True])
    with pytest.raises(study_module._OverBudget):
        study_module._plan_group(ctx, b, {"spectral_norm": True})
    study.tell(b, state=optuna.trial.TrialState.FAIL)  # (as Optuna does with the error)
    assert study.get_trials()[b.number].user_attrs["status"] == "surplus"
    leader = study.ask()  # the SN twin, which enqueues SN's seed-1 replicate
    assert leader.user_attrs["leader"] is True
    study_module._plan_group(ctx, leader, {"spectral_norm": True})
    groups = study_module._group_states(study.get_trials())
    assert sorted(groups) == ["g0000"]
    # A's own seed and arm are written by its objective (not called here): its 3 members
    assert sorted(groups["g0000"].members) == [(0, "sn_on"), (1, "sn_off"), (1, "sn_on")]


def test_a_worker_does_not_stop_while_a_twin_waits():
    """A's trial finished while B's new trial has not planned yet (it will stand down): the
    budget counts B's trial only once it planned, so A stops only when no trial waits."""
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), study_name="x")
    ctx = _context(study, n_trials=2, seeds=(0,))
    a, b = study.ask(), study.ask()
    study_module._plan_group(ctx, a, {"spectral_norm": False})  # its twin waits
    study.tell(a, 0.5)
    stops: list[str] = []

    class Recording:
        def __getattr__(self, name: str) -> Any:
            return getattr(study, name)

        def stop(self) -> None:
            stops.append("stop")

    stop_rule = study_module._StopCallback(ctx, 3)
    stop_rule(Recording(), study.get_trials()[a.number])
    assert stops == []  # the twin waits: A asks again
    with pytest.raises(study_module._OverBudget):
        study_module._plan_group(ctx, b, {"spectral_norm": True})
    study.tell(b, state=optuna.trial.TrialState.FAIL)
    twin = study.ask()
    assert twin.user_attrs["arm"] == "sn_on"
    study.tell(twin, 0.4)
    stop_rule(Recording(), study.get_trials()[twin.number])
    assert stops == ["stop"]
    assert study_module.count_trials(study.get_trials())["finished"] == 2


@pytest.mark.parametrize("backend", _BACKENDS)
def test_workers_resuming_at_the_same_instant_enqueue_each_missing_member_once(
    tmp_path, monkeypatch, backend
):
    shared = _shared_storage(backend, tmp_path)
    name = f"race-{uuid.uuid4().hex[:8]}"
    first = _run(tmp_path, name=name, n_trials=6, seeds=(0, 1), storage=shared)
    assert _members(first.study)["g0004"] == [(0, "sn_off"), (0, "sn_on")]
    try:
        # Each worker, having read the groups, waits for the other to have read them too:
        # without the lock both read before either enqueues, and both enqueue the two
        # members. With it the second reads only after the first enqueued (its wait times out).
        has_read = [threading.Event(), threading.Event()]
        me = threading.local()
        read_groups = study_module._group_states

        def read_then_wait(trials):
            groups = read_groups(trials)
            has_read[me.i].set()
            has_read[1 - me.i].wait(timeout=1)
            return groups

        monkeypatch.setattr(study_module, "_group_states", read_then_wait)
        start = threading.Barrier(2)
        added: list[int] = []

        def worker(i: int) -> None:
            me.i = i
            storage = shared if backend == "memory" else make_storage(shared)
            study = optuna.load_study(study_name=name, storage=storage)
            start.wait()
            # (a budget with room for the members twice: it does not stop the second)
            added.append(_complete_open_pairs(study, _context(study, n_trials=12)))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert sorted(added) == [0, 2]
        monkeypatch.undo()
        waiting = first.study.get_trials(states=(optuna.trial.TrialState.WAITING,))
        assert sorted((t.user_attrs["pair_id"], t.user_attrs["arm"]) for t in waiting) == [
            ("g0004_s1", "sn_off"),
            ("g0004_s1", "sn_on"),
        ]
        resumed = _run(tmp_path, name=name, n_trials=8, seeds=(0, 1), storage=shared)
        assert resumed.n_run == 2 and resumed.counts["waiting"] == 0
        whole = _whole((0, 1), ("sn_off", "sn_on"))
        assert _members(resumed.study) == {"g0000": whole, "g0004": whole}
    finally:
        if backend in _SERVERS:
            optuna.delete_study(study_name=name, storage=shared)


@pytest.mark.parametrize("retry_first", [False, True])
def test_a_retry_and_a_worker_completing_groups_enqueue_a_failed_member_once(tmp_path, retry_first):
    # A stale member failed (e.g. by Optuna before a trial starts, on RDB storages) and not
    # yet retried is missing from its group: the retry and a resuming worker completing the
    # group must not both enqueue it.
    first = _run(tmp_path, name="f", n_trials=6, seeds=(0, 1))
    study = first.study
    study.enqueue_trial({}, user_attrs=_member_attrs("g0004", 1, False, "paired"))
    running = study.ask()
    study.tell(running, state=optuna.trial.TrialState.FAIL)
    failed = study.get_trials()[running.number]
    ctx = _context(study, n_trials=8)
    if retry_first:
        assert _retry(study, failed, ctx) is True
        assert _complete_open_pairs(study, ctx) == 1  # only the SN-on member
    else:
        assert _complete_open_pairs(study, ctx) == 2
        assert _retry(study, failed, ctx) is False  # the member waits already
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert sorted(t.user_attrs["arm"] for t in waiting) == ["sn_off", "sn_on"]


@pytest.mark.parametrize("backend", _BACKENDS)
def test_the_group_lock_is_released_when_its_holder_raises(tmp_path, monkeypatch, caplog, backend):
    shared = _shared_storage(backend, tmp_path)
    if backend == "memory":
        mine = theirs = shared
    else:
        mine, theirs = make_storage(shared), make_storage(shared)
    monkeypatch.setattr(study_module, "_GROUP_LOCK_TIMEOUT", 5)
    with pytest.raises(RuntimeError, match="boom"), _group_lock(mine, "s"):
        raise RuntimeError("boom")
    got: list[bool] = []
    other = threading.Thread(target=lambda: got.append(_take_group_lock(theirs, "s")))
    with caplog.at_level("WARNING"):
        other.start()
        other.join(timeout=60)
    assert got == [True]
    assert "going ahead without it" not in caplog.text
    assert "Forcibly releasing" not in caplog.text  # (a lock file left behind is broken)
    assert not list(tmp_path.glob("*.lock"))


def _take_group_lock(storage: Any, name: str) -> bool:
    with _group_lock(storage, name):
        return True


_LOCK_HOLDER = textwrap.dedent(
    """
    import sys, time
    from thunderline_lab.study import _group_lock, make_storage
    with _group_lock(make_storage(sys.argv[1]), sys.argv[2]):
        print("held", flush=True)
        time.sleep(600)
    """
)


@pytest.mark.parametrize("server", _SERVER_PARAMS)
def test_a_server_group_lock_is_per_study_and_dies_with_its_holder(
    tmp_path, monkeypatch, caplog, server
):
    url = _server_url(server)
    name = f"rdb-lock-{uuid.uuid4().hex[:8]}"
    with subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, url, name],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    ) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            storage = make_storage(url)
            monkeypatch.setattr(study_module, "_GROUP_LOCK_TIMEOUT", 1)
            with caplog.at_level("WARNING"):
                with _group_lock(storage, f"{name}-other"):  # another study: not held
                    pass
                assert "going ahead without it" not in caplog.text
                with _group_lock(storage, name):  # held by the other process: waits, goes ahead
                    pass
                assert f"study {name!r}: the group lock" in caplog.text
                assert "going ahead without it" in caplog.text
            holder.kill()  # dies holding it: the server ends its session and frees the lock
            holder.wait(timeout=60)
            caplog.clear()
            monkeypatch.setattr(study_module, "_GROUP_LOCK_TIMEOUT", 30)
            with caplog.at_level("WARNING"), _group_lock(storage, name):
                pass
            assert "going ahead without it" not in caplog.text
        finally:
            holder.kill()  # (a no-op once it is dead)


def test_a_retried_leader_does_not_enqueue_its_replicates_again(tmp_path):
    # The SN-on twin of an SN-off configuration (the leader) enqueues the SN-on members of
    # the other seeds; cancelled and retried, it must not enqueue them a second time.
    stop = threading.Event()

    def stop_at_the_leader(config: Any, dataset: Any, **kw: Any) -> TrialResult:
        group = kw["parameters"]["group_id"]
        twin = kw["trial_id"] != trial_id_for(int(group[1:]))
        if config.spectral_norm and twin and kw["seed"] == 0 and not stop.is_set():
            stop.set()
            return TrialResult("cancelled", {}, [], duration_ms=1)
        return fake_trainer(config, dataset, **kw)

    first = _run(
        tmp_path,
        name="lead",
        n_trials=12,
        seeds=(0, 1),
        trainer=stop_at_the_leader,
        should_stop=stop,
    )
    assert first.counts["cancelled"] == 1
    resumed = _run(tmp_path, name="lead", n_trials=12, seeds=(0, 1))
    assert resumed.counts["finished"] == 12 and resumed.counts["waiting"] == 0
    whole = _whole((0, 1), ("sn_off", "sn_on"))
    assert list(_members(resumed.study).values()) == [whole] * 3


def test_unknown_dataset_is_refused_before_any_trial_runs(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown dataset 'cifar'; available: .*digits"):
        _run(tmp_path, n_trials=2, dataset="cifar")
    assert not (tmp_path / "lab" / "optuna.journal").exists()


@pytest.mark.parametrize(
    ("value", "got"),
    [("false", "the text 'false'"), (0, "the int 0"), (None, "None")],
)
def test_an_mlflow_flag_that_is_not_a_bool_is_refused_before_anything_runs(tmp_path, value, got):
    # papermill's -p mlflow false is the text "false": truthy, it would log to MLflow anyway
    with pytest.raises(ConfigError) as err:
        _run(tmp_path, n_trials=2, mlflow=value)
    assert str(err.value) == f"mlflow: expected True or False, got {got}"
    assert not (tmp_path / "lab").exists()


@pytest.mark.parametrize(
    ("seeds", "got"),
    [
        (0, "the int 0"),  # papermill -p seeds 0
        ("[0,1]", "the text '[0,1]'"),  # papermill -p seeds "[0,1]"
        (None, "None"),
        ({"a": 0}, "the dict {'a': 0}"),
    ],
)
def test_seeds_that_are_not_a_list_say_a_list_is_expected_and_how_to_give_one(tmp_path, seeds, got):
    said = (
        f"seeds: expected a list of distinct integers such as [0, 1], got {got} "
        "(papermill: -y 'seeds: [0, 1]'; thunderline-lab run: -p seeds '[0, 1]')"
    )
    with pytest.raises(ConfigError) as err:
        _run(tmp_path, n_trials=2, seeds=seeds)
    assert str(err.value) == said
    assert not (tmp_path / "lab").exists()
    with pytest.raises(ConfigError) as err:
        check_study_parameters({"seeds": seeds})
    assert str(err.value) == said


def test_dashboard_with_an_unreachable_storage_is_one_clean_line(tmp_path):
    url = "postgresql+psycopg2://u:pw@127.0.0.1:9/x"
    out = CliRunner().invoke(cli, ["dashboard", "--storage", url, "--port", "8124"])
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert (
        "error: cannot open Optuna storage postgresql+psycopg2://u:***@127.0.0.1:9/x" in out.output
    )
    assert "pw@" not in out.output


def test_dashboard_command_prints_the_optuna_dashboard_call(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(cli, ["dashboard", "--lab", str(tmp_path / "lab"), "--print-command"])
    assert missing.exit_code == 1 and "no Optuna journal" in missing.output
    _run(tmp_path, n_trials=1)
    out = runner.invoke(
        cli,
        ["dashboard", "--lab", str(tmp_path / "lab"), "--port", "8123", "--print-command"],
    )
    assert out.exit_code == 0, out.output
    argv = out.output.split()
    assert argv[0].endswith("optuna-dashboard")
    assert argv[argv.index("--port") + 1] == "8123"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[-2:] == ["JournalFileStorage", str(tmp_path / "lab" / "optuna.journal")]


def _lab_with_a_store(root: Path) -> Lab:
    from thunderline_lab import events as E

    lab = Lab.resolve(root)
    with lab.store() as store:
        store.append([E.trial_start(model_run_id="s", trial_id="t0", spectral_norm=True)])
    return lab


@pytest.fixture()
def no_exec(monkeypatch):
    """``dashboard`` would replace the test process by optuna-dashboard: record it instead."""
    calls: list[list[str]] = []

    def execvp(file: str, argv: list[str]) -> None:
        calls.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(os, "execvp", execvp)
    return calls


def test_dashboard_on_a_trial_store_is_refused_and_writes_nothing(
    db_state, tmp_path, monkeypatch, no_exec
):
    # optuna-dashboard (and the reachability check before it) added Optuna's tables to lab.db
    lab = _lab_with_a_store(tmp_path / "lab")
    other = _lab_with_a_store(tmp_path / "other")  # any lab's store, in WAL mode, closed
    (tmp_path / "link.db").symlink_to(lab.db_path)
    monkeypatch.chdir(tmp_path)
    before = db_state(lab.db_path), db_state(other.db_path)
    own = "that is the lab's trial store (lab.db), not an Optuna"
    cases = {
        f"sqlite:///{lab.db_path}": f"{own} storage",  # sqlite:////abs/lab/lab.db
        "sqlite:///lab/lab.db": f"{own} storage",
        "sqlite:///lab/../lab/lab.db": f"{own} storage",
        "sqlite:///link.db": f"{own} storage",
        "lab/lab.db": f"{own} journal file",
        f"sqlite:///{other.db_path}": "that is a thunderline-lab trial store (its events table), "
        "not an Optuna storage",
    }
    for storage, why in cases.items():
        for extra in ([], ["--print-command"]):
            out = CliRunner().invoke(
                cli, ["dashboard", "--lab", "lab", "--storage", storage, "--port", "0", *extra]
            )
            assert out.exit_code == 1, (storage, out.output)
            assert out.output == f"error: --storage {storage}: {why}; nothing was written\n"
    assert not no_exec
    with pytest.raises(StudyError, match="not an Optuna storage; nothing was written"):
        make_storage(f"sqlite:///{other.db_path}")
    with pytest.raises(StudyError, match=r"trial store \(lab.db\), not an Optuna journal file"):
        run_study("s", lab=lab.root, storage="lab/lab.db", n_trials=1, trainer=fake_trainer)
    assert (db_state(lab.db_path), db_state(other.db_path)) == before
    assert sorted(p.name for p in other.root.iterdir()) == ["lab.db"]  # no -wal, -shm made


def test_dashboard_storage_must_be_a_url_or_a_journal_file(tmp_path, monkeypatch, no_exec):
    # `--storage bogus` made an empty file ./bogus and ran optuna-dashboard on RDBStorage
    # "bogus", which died in a traceback
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a journal\n")
    import sqlite3

    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t (x)").connection.close()
    bad = {
        "bogus": "not a URL (no ://) and no journal file",
        "notes.txt": "is not an Optuna journal file",
        "other.db": "it is an SQLite database, not an Optuna journal file",
        "sqlite:///nothere.db": "no database file",
        "sqlite:///other.db": "holds no Optuna storage",
        f"sqlite:///{tmp_path}": "is a folder, not a database file",
    }
    for storage, why in bad.items():
        for extra in ([], ["--print-command"]):
            out = CliRunner().invoke(
                cli, ["dashboard", "--storage", storage, "--port", "0", *extra]
            )
            assert out.exit_code == 1 and "Traceback" not in out.output, out.output
            assert out.output.startswith(f"error: --storage {storage}: ") and why in out.output
            assert len(out.output.splitlines()) == 1
    assert not no_exec
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "other.db"]
    empty = CliRunner().invoke(cli, ["dashboard", "--storage", "", "--print-command"])
    assert empty.exit_code == 2 and "Invalid value for '--storage': is empty" in empty.output
    # what make_storage takes, the dashboard shows: a journal file, an Optuna database
    journal = tmp_path / "studies.journal"
    _run(tmp_path, n_trials=1, storage=str(journal))
    optuna.create_study(study_name="x", storage=make_storage("sqlite:///optuna.db"))
    for storage, tail in (
        ("studies.journal", ["JournalFileStorage", str(journal)]),
        ("sqlite:///optuna.db", ["RDBStorage", "sqlite:///optuna.db"]),
    ):
        out = CliRunner().invoke(cli, ["dashboard", "--storage", storage, "--print-command"])
        assert out.exit_code == 0 and out.output.split()[-2:] == tail, out.output
        out = CliRunner().invoke(cli, ["dashboard", "--storage", storage, "--port", "0"])
        assert out.exit_code == 0 and no_exec[-1][-2:] == tail, out.output


def test_dashboard_on_a_port_in_use_is_one_clean_line(tmp_path, no_exec):
    # gunicorn logged "Connection in use" five times over seconds, then exited 1
    import socket

    lab = Lab.resolve(tmp_path / "lab")
    lab.root.mkdir()
    lab.optuna_journal.write_text("")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = CliRunner().invoke(cli, ["dashboard", "--lab", str(lab.root), "--port", str(port)])
    assert out.exit_code == 1 and not no_exec
    assert out.output == f"error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_one_waiting_trial_goes_to_one_worker_on_an_sqlite_file(tmp_path):
    """Optuna takes a waiting trial with SELECT ... FOR UPDATE, which SQLite ignores: two
    workers could both take it (and the second's tell fail). On an SQLite file the lab's
    storage takes it under a lock file: each waiting trial goes to exactly one worker."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="pop", storage=make_storage(url))
    workers = 4
    studies = [
        optuna.load_study(study_name="pop", storage=make_storage(url)) for _ in range(workers)
    ]
    for _round in range(15):
        studies[0].enqueue_trial({"x": 1})
        start = threading.Barrier(workers)
        got: list[int | None] = []

        def take(study: optuna.Study, start: threading.Barrier, got: list[int | None]) -> None:
            start.wait()
            got.append(study._pop_waiting_trial_id())

        threads = [threading.Thread(target=take, args=(s, start, got)) for s in studies]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(got) == workers and sum(g is not None for g in got) == 1, got

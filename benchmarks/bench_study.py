"""P5: the workbench's per-trial overhead over bare Optuna, and the default study's pace.

Part 1 (overhead). The same objective runs under bare Optuna and under
:func:`thunderline_lab.study.run_study`, both on the same kind of persistent storage (Optuna's
``JournalStorage`` on a ``JournalFileBackend``, the lab's default) with the same sampler
(``RandomSampler``, so sampling cost does not depend on history) and the same pruner:

* bare: suggest the default search space, ``trial.report`` + ``trial.should_prune`` 10 times,
  return a value;
* lab: ``run_study(trainer=fake)`` where ``fake`` does the same 10 reports through the
  ``report`` callback and publishes what :func:`train_trial` publishes (``ml.run.start``, 10
  ``ml.run.metric``, ``ml.run.stop``) and returns 30 metrics. On top the lab does everything
  it always does: paired twins, user attrs (ids, worker, all metrics), heartbeat storage,
  ``ml.trial.*`` events and the store writer committing every event to ``lab.db``.

Runs are interleaved (bare, lab, bare, lab, ...) in fresh directories; each run is a whole
call (study creation and the final store flush included) divided by its trials. Goal:
lab − bare ≤ 10 ms/trial.

Part 2 (pace). The default study (digits, MLP, paired, 24 trials, 30 epochs, full research
metrics) with 1 worker process and with 2 worker processes sharing the study; trials per
minute. ``--quick`` skips it.

Usage:
    python benchmarks/bench_study.py [--trials 60] [--reps 7] [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna

from thunderline_lab.bus import EventBus
from thunderline_lab.study import DEFAULT_SEARCH_SPACE, run_study
from thunderline_lab.training import EPOCH_MEASUREMENTS, TrialResult, _Emitter

N_REPORTS = 10
DATASET = None  # loaded once in main (the lab would load it per call; bare Optuna never does)
METRICS = {f"metric_{i:02d}": 0.5 + i / 100 for i in range(30)}


def _pruner() -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner(n_startup_trials=10**9)  # consulted, never prunes


def bare_objective(trial: optuna.Trial) -> float:
    values = DEFAULT_SEARCH_SPACE.suggest(trial, "mlp")
    lr = float(values["lr"])
    for epoch in range(N_REPORTS):
        trial.report(lr * (N_REPORTS - epoch), epoch)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return lr


def fake_trainer(config: Any, dataset: Any, **kw: Any) -> TrialResult:
    bus: EventBus = kw["bus"]
    emit = _Emitter(bus, kw["model_run_id"], kw["trial_id"], kw.get("study"), config.spectral_norm)
    emit.publish("ml.run.start", spectral_norm=config.spectral_norm, parameters=kw["parameters"])
    report = kw["report"]
    lr = kw["lr"]
    for epoch in range(N_REPORTS):
        loss = lr * (N_REPORTS - epoch)
        emit.publish(
            "ml.run.metric",
            step=epoch,
            measurements=dict.fromkeys(EPOCH_MEASUREMENTS, loss),
            spectral_norm=config.spectral_norm,
        )
        if report(epoch, loss):
            break
    metrics = {**METRICS, "best_val_loss": lr}
    emit.publish("ml.run.stop", success=True, epochs=N_REPORTS, duration_ms=0, metrics=metrics)
    return TrialResult(status="completed", metrics=metrics, duration_ms=1)


def run_bare(root: Path, n: int) -> tuple[float, float]:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    t0, c0 = time.perf_counter(), time.process_time()
    storage = JournalStorage(JournalFileBackend(str(root / "optuna.journal")))
    study = optuna.create_study(
        study_name="bench",
        storage=storage,
        sampler=optuna.samplers.RandomSampler(seed=0),
        pruner=_pruner(),
    )
    study.optimize(bare_objective, n_trials=n)
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def run_lab(root: Path, n: int) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    result = run_study(
        "bench",
        lab=root,
        dataset=DATASET,
        n_trials=n,
        epochs=N_REPORTS,
        sampler=optuna.samplers.RandomSampler(seed=0),
        pruner=_pruner(),
        trainer=fake_trainer,
        threads=None,
    )
    elapsed = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n
    assert result.counts["finished"] == n, result.counts
    assert len(result.trials) == n, len(result.trials)
    return elapsed


def overhead(n: int, reps: int) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    global DATASET
    from thunderline_lab.data import load_dataset

    DATASET = load_dataset("digits", seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        run_lab(Path(tmp) / "warm-lab", 4)
        (Path(tmp) / "warm-bare").mkdir()
        run_bare(Path(tmp) / "warm-bare", 4)
    bare: list[tuple[float, float]] = []
    lab: list[tuple[float, float]] = []
    for rep in range(reps):
        with tempfile.TemporaryDirectory() as tmp:
            b, lab_dir = Path(tmp) / "bare", Path(tmp) / "lab"
            b.mkdir()
            bare.append(run_bare(b, n))
            lab.append(run_lab(lab_dir, n))
        print(
            f"  rep {rep}: bare {1000 * bare[-1][0]:.2f} ms/trial (cpu {1000 * bare[-1][1]:.2f}), "
            f"lab {1000 * lab[-1][0]:.2f} ms/trial (cpu {1000 * lab[-1][1]:.2f})"
        )
    print(f"P5 overhead ({n} trials x {reps} interleaved reps, {N_REPORTS} reports/trial, journal)")
    for i, what in ((0, "wall"), (1, "cpu ")):
        mb = 1000 * statistics.median(x[i] for x in bare)
        ml = 1000 * statistics.median(x[i] for x in lab)
        diff = 1000 * statistics.median(y[i] - x[i] for x, y in zip(bare, lab, strict=True))
        print(
            f"  {what}: bare Optuna median {mb:.2f} ms/trial, workbench median {ml:.2f} ms/trial"
            f" -> overhead {ml - mb:.2f} ms/trial (median of paired differences {diff:.2f};"
            f" ratio {ml / mb:.2f}); goal <= 10 ms/trial"
        )


def _worker(lab: str, n: int, epochs: int) -> None:
    run_study("default", lab=lab, n_trials=n, epochs=epochs)


def pace(n: int, epochs: int) -> None:
    print(f"default study pace (digits, MLP, paired, {n} trials, {epochs} epochs, 2 cores)")
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            ctx = mp.get_context("spawn")
            t0 = time.perf_counter()
            procs = [ctx.Process(target=_worker, args=(tmp, n, epochs)) for _ in range(workers)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            elapsed = time.perf_counter() - t0
            storage = optuna.storages.JournalStorage(
                optuna.storages.journal.JournalFileBackend(os.path.join(tmp, "optuna.journal"))
            )
            trials = optuna.load_study(study_name="default", storage=storage).get_trials()
            done = sum(t.state.is_finished() for t in trials)
            print(
                f"  {workers} worker(s): {done} trials in {elapsed:.1f} s "
                f"-> {60 * done / elapsed:.1f} trials/min (process start-up included)"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="skip the default-study pace")
    ap.add_argument("--pace-only", action="store_true")
    args = ap.parse_args()
    if not args.pace_only:
        overhead(args.trials, args.reps)
    if not args.quick:
        pace(24, 30)
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""P7: the SN-vs-none comparison at scale, the monitor's history query, the monitor's event rate.

Goals (issue "Live training monitor ... and the SN-vs-none comparison"):

* comparison over 100,000 trials and 10 M metric points ≤ 100 ms;
* the monitor's history query (downsampled to ≤ 1,000 points per curve) ≤ 50 ms;
* the monitor takes 10,000 events/s with ≤ 4 redraws/s and bounded memory.

Setup (cached in ``--db``, rebuilt with ``--rebuild``): one lab store with study ``p7`` of
100,000 paired trials (50,000 pairs; each trial's ``metrics`` carries the study layer's ~30
summary metrics incl. ``sigma/<layer>``) and 20 epochs x 5 measurements of history each
(10 M metric points), bulk-inserted into the store's tables; plus study ``p7-long``: 4
trials x 5 curves x 50,000 steps (1 M points) for the downsampling query.

Measured, medians of ``--repeats`` interleaved runs:

* ``compare_study`` headline (val_accuracy; then the default 8-metric set), each repeat running
  every case once. A comparison reads the study's columnar snapshot, the projection that the
  writers of this workbench keep (:mod:`thunderline_lab.keeper`), and the event log since;
  every case of a study as those writers leave it is held to the ≤ 100 ms goal:

  - from scratch, printed beside the goal, not held to it: no snapshot on disk and nothing in
    the process (``clear_cache(store)``; a lab whose cache was deleted, or written with the
    keeper off): SQL ``json_extract`` over the trials, every statistic computed, the snapshot
    written: the snapshot's rebuild, paid once. Two floors show that no read of rows goes
    under 100 ms for 100,000 trials: SQLite extracting the keys from every trial's JSON in C
    (no row reaches Python), and a row-wise projection without JSON (the same columns copied
    into a table of their own, its rows fetched into Python);
  - cold, new process with snapshot: the in-process cache cleared (``clear_cache()``), the
    study's snapshot on disk (``<dir of the db>/cache/compare/``) loaded, validated against
    the event log and refreshed from it, the remembered statistics reused (study unchanged);
  - cold with snapshot after 1 new pair: the same, with one pair logged since the snapshot,
    both trials reporting every summary metric as the study's do (refreshed incrementally;
    every asked metric's statistics recomputed, since its pairs changed), also timed inside a
    real new Python process (imports not timed; first calls and lazily imported modules
    are); and after 25 new pairs (more than a refresh scans for: found in one vectorised
    pass);
  - warm (in-process columnar cache; the arms, counts and statistics derived from an
    unchanged frame are reused) and warm recomputed (the frame kept, everything derived from
    it and every remembered statistic dropped: what a comparison costs after a refresh
    changed rows);

  - as this workbench's writers leave a study: no snapshot on disk, a pair appended, the
    writer's snapshot keeper (:mod:`thunderline_lab.keeper`, run at idle or exit) brings the
    snapshot up to the store, then a new process compares (headline, 8 metrics, details);
    with the keeper's own cost, from scratch and after one more pair;

  against the store's own SQL aggregate ``mean_by_spectral_norm`` (``json_extract`` +
  ``GROUP BY``, no CI, no pairing), and against the floor of any first read of the trials'
  JSON: SQLite extracting the keys that first comparison read, of every trial, and summing
  them in C (no row reaches Python); plus the snapshot's size on disk and one save's cost;
* the comparison's details (group learning curves over a 200-trial-per-arm sample, per-layer σ);
* the incremental refresh after new trials arrive (headline, then the default 8 metrics), and
  what no cache can save then: the headline's bootstrap and Wilcoxon test on their own;
* the monitor's history query: ``TrialStore.metric_history(..., max_points=1000)`` for the 40
  trials the monitor shows, and for 50,000-step curves, against an index-seek prototype;
* the monitor fed 10,000 events/s on a bus (widget mode, no frontend): redraws/s, lag, memory.

Usage: python benchmarks/bench_monitor_compare.py [--db PATH] [--rebuild] [--quick]
       [--repeats 5] [--seconds 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from thunderline_lab import compare as cmp
from thunderline_lab import events as E
from thunderline_lab import keeper
from thunderline_lab.bus import EventBus
from thunderline_lab.monitor import LiveMonitor, MonitorState
from thunderline_lab.store import TrialStore

STUDY = "p7"
LONG = "p7-long"
EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy", "lr", "max_sigma")
TS = "2026-01-01T00:00:00.000000Z"
N_TEST = 2000  # accuracies are k / N_TEST, as on a finite test set


def _summary_metrics(rng: random.Random, sn: bool, pair_skill: float) -> dict[str, float]:
    def acc(mean: float) -> float:
        return round(min(1.0, max(0.0, rng.gauss(mean, 0.01))) * N_TEST) / N_TEST

    base = 0.85 + pair_skill + (0.004 if sn else 0.0)
    sig = [rng.uniform(0.9, 1.0) if sn else rng.uniform(1.2, 3.0) for _ in range(3)]
    m = {
        "train_accuracy": acc(base + 0.05),
        "val_accuracy": acc(base - 0.005),
        "best_val_accuracy": acc(base),
        "test_accuracy": acc(base - 0.01),
        "generalization_gap": rng.gauss(0.02 if sn else 0.05, 0.01),
        "test_nll": rng.gauss(0.33 if sn else 0.36, 0.02),
        "test_ece": abs(rng.gauss(0.02 if sn else 0.03, 0.005)),
        "test_brier": rng.gauss(0.12, 0.01),
        "noise_acc_0.1": acc(base - 0.03),
        "noise_acc_0.3": acc(base - 0.1),
        "fgsm_acc_0.01": acc(base - 0.05),
        "fgsm_acc_0.05": acc(base - (0.15 if sn else 0.25)),
        "fgsm_acc_0.1": acc(base - (0.3 if sn else 0.45)),
        "lipschitz_upper": float(np.prod(sig)),
        "lipschitz_lower": float(np.prod(sig)) * 0.2,
        "max_sigma": max(sig),
        "mean_sigma": sum(sig) / 3,
        "min_sigma": min(sig),
        "step_time_ms": rng.gauss(5.0 if sn else 4.5, 0.3),
        "n_params": 9354.0,
        "epochs": 20.0,
        "best_val_loss": rng.gauss(0.3, 0.02),
        **{f"sigma/net.{2 * i}": s for i, s in enumerate(sig)},
    }
    return m


def build(db: Path, n_trials: int, epochs: int, long_steps: int) -> None:
    """Bulk-insert the benchmark study into a fresh store (the store's own tables)."""
    if db.exists():
        db.unlink()
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    store = TrialStore(db)
    conn = store.conn
    rng = random.Random(0)
    t0 = time.perf_counter()
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO model_runs VALUES (?, ?, ?, ?)", [(STUDY, STUDY, TS, TS), (LONG, LONG, TS, TS)]
    )
    rows = []
    for i in range(n_trials):
        pair, sn = divmod(i, 2)
        sn_on = bool(sn)
        skill = random.Random(pair).gauss(0, 0.03)
        params = {
            "lr": 3e-3,
            "depth": 3,
            "width": 64,
            "dropout": 0.1,
            "weight_decay": 1e-4,
            "spectral_norm": sn_on,
            "spectral_norm_coeff": 1.0 if sn_on else None,
            "seed": pair,
            "pair_id": f"pair_{pair:06d}",
            "arm": "sn_on" if sn_on else "sn_off",
        }
        metrics = _summary_metrics(rng, sn_on, skill)
        rows.append(
            (
                STUDY,
                f"trial_{i:06d}",
                STUDY,
                "completed",
                int(sn_on),
                1.0 if sn_on else None,
                None,
                json.dumps(params, sort_keys=True),
                json.dumps(metrics, sort_keys=True),
                1000,
                None,
                None,
                None,
                None,
                TS,
                TS,
                TS,
            )
        )
    conn.executemany(f"INSERT INTO trials VALUES ({', '.join('?' * 17)})", rows)
    conn.execute("COMMIT")
    print(f"  trials: {n_trials:,} in {time.perf_counter() - t0:.1f} s", flush=True)

    def points() -> Any:
        for i in range(n_trials):
            trial = f"trial_{i:06d}"
            for step in range(epochs):
                for name in EPOCH_METRICS:
                    yield (STUDY, trial, name, step, 0.5 + step / (4 * epochs), TS, "bench")

    conn.execute("BEGIN")
    conn.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?, ?)", points())
    conn.execute("COMMIT")
    print(
        f"  + {n_trials * epochs * len(EPOCH_METRICS):,} metric points in "
        f"{time.perf_counter() - t0:.1f} s",
        flush=True,
    )

    def long_points() -> Any:
        for t in range(4):
            for name in EPOCH_METRICS:
                for step in range(long_steps):
                    yield (LONG, f"trial_{t:04d}", name, step, 1.0 / (1 + step), TS, "bench")

    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO trials (model_run_id, trial_id, study, status, spectral_norm) "
        "VALUES (?, ?, ?, 'running', ?)",
        [(LONG, f"trial_{t:04d}", LONG, t % 2) for t in range(4)],
    )
    conn.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?, ?)", long_points())
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    print(
        f"  + {4 * 5 * long_steps:,} points of {LONG} in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    store.close()


def median_ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:8.1f} ms"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


# -- the monitor's history query ------------------------------------------------------------

_SEEK_SQL = """
WITH RECURSIVE k(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM k WHERE i + 1 < ?4),
b(lo, hi) AS (SELECT MIN(step), MAX(step) FROM metrics
              WHERE model_run_id = ?1 AND trial_id = ?2 AND name = ?3),
s(step) AS (SELECT DISTINCT (SELECT m.step FROM metrics m
                             WHERE m.model_run_id = ?1 AND m.trial_id = ?2 AND m.name = ?3
                               AND m.step >= b.lo + ((b.hi - b.lo) * k.i) / (?4 - 1)
                             ORDER BY m.step LIMIT 1)
            FROM k, b WHERE b.lo IS NOT NULL)
SELECT m.step, m.value FROM s JOIN metrics m
  ON m.model_run_id = ?1 AND m.trial_id = ?2 AND m.name = ?3 AND m.step = s.step
ORDER BY m.step
"""


def seek_history(store: TrialStore, run: str, trial: str, names: Any, max_points: int) -> int:
    """Prototype: ≤ max_points per curve by index seeks (O(max_points log n) per curve)."""
    n = 0
    for name in names:
        n += len(store.conn.execute(_SEEK_SQL, (run, trial, name, max_points)).fetchall())
    return n


def one_query_history(store: TrialStore, run: str, trials: list[str], names: Any) -> int:
    """Floor: every curve the monitor shows in one query (IN lists, no downsampling, no
    pandas, not folded into a monitor)."""
    sql = (
        "SELECT trial_id, name, step, value FROM metrics WHERE model_run_id = ? "
        f"AND trial_id IN ({','.join('?' * len(trials))}) "
        f"AND name IN ({','.join('?' * len(names))}) ORDER BY trial_id, name, step"
    )
    return len(store.conn.execute(sql, [run, *trials, *names]).fetchall())


def bench_history(store: TrialStore, repeats: int) -> None:
    print("\nP7 monitor history query (downsampled to ≤ 1,000 points per curve)")
    # the last 40 of the bulk-built trials (the comparison's new pairs have no history)
    (n,) = store.conn.execute(
        "SELECT COUNT(*) FROM trials WHERE study = ? AND trial_id LIKE 'trial_%'", (STUDY,)
    ).fetchone()
    recent = [f"trial_{i:06d}" for i in range(n - 40, n)]
    curves = ("val_accuracy", "val_loss", "train_loss")
    long_trials = [f"trial_{t:04d}" for t in range(4)]
    steps = store.conn.execute(
        "SELECT MAX(step) + 1 FROM metrics WHERE model_run_id = ? AND trial_id = ? AND name = ?",
        (LONG, long_trials[0], "val_loss"),
    ).fetchone()[0]
    results: dict[str, list[float]] = {k: [] for k in "abcdef"}
    counts: dict[str, int] = {}
    cases: dict[str, Callable[[], int]] = {
        "a": lambda: MonitorState(STUDY).load_history(store, STUDY, recent, max_points=1000),
        "b": lambda: one_query_history(store, STUDY, recent, curves),
        "c": lambda: len(store.metric_history(LONG, long_trials[0], "val_loss", max_points=1000)),
        "d": lambda: seek_history(store, LONG, long_trials[0], ["val_loss"], 1000),
        "e": lambda: sum(
            len(store.metric_history(LONG, t, None, max_points=1000)) for t in long_trials
        ),
        "f": lambda: sum(seek_history(store, LONG, t, EPOCH_METRICS, 1000) for t in long_trials),
    }
    for _ in range(repeats):
        for key, fn in cases.items():
            dt, counts[key] = timed(fn)
            results[key].append(dt)

    def med(k: str) -> float:
        return statistics.median(results[k])

    print(
        f"  1 curve of {steps:,} steps: metric_history(max_points=1000)  {median_ms(results['c'])}"
        f"  ({counts['c']:,} points)"
    )
    print(
        f"    index-seek prototype                                  {median_ms(results['d'])}"
        f"  ({counts['d']:,} points)  ratio {med('c') / med('d'):.1f}x"
    )
    print(
        f"  20 curves of {steps:,} steps: metric_history per trial      {median_ms(results['e'])}"
        f"  ({counts['e']:,} points)"
    )
    print(
        f"    index-seek prototype                                  {median_ms(results['f'])}"
        f"  ({counts['f']:,} points)  ratio {med('e') / med('f'):.1f}x"
    )
    print(
        f"  monitor attach, 40 trials x 3 curves of {STUDY}: load_history {median_ms(results['a'])}"
        f"  ({counts['a']:,} points; one metric_history call, folded into the monitor)"
    )
    print(
        f"    one raw query, not folded (IN lists)                  {median_ms(results['b'])}"
        f"  ({counts['b']:,} points)  ratio {med('a') / med('b'):.1f}x"
    )


def store_trials(store: TrialStore) -> int:
    return int(
        store.conn.execute("SELECT COUNT(*) FROM trials WHERE study = ?", (STUDY,)).fetchone()[0]
    )


# -- the comparison -------------------------------------------------------------------------


def bench_compare(store: TrialStore, repeats: int) -> None:
    n = store_trials(store)
    points = store.conn.execute("SELECT COUNT(*) FROM metrics").fetchone()[0]
    print(
        f"\nP7 comparison: {n:,} trials ({n // 2:,} pairs), {points:,} metric points in the store"
    )
    import scipy.stats  # (import time is not the comparison's)

    headline = ["val_accuracy"]
    keys = (
        "first",
        "snap",
        "snap_new",
        "snap_new_proc",
        "snap_new25",
        "warm",
        "recomputed",
        "sql",
        "floor",
        "floor_all",
        "rows",
        "rows_all",
        "first_all",
        "snap_all",
        "snap_new_all",
        "snap_new_proc_all",
        "snap_new25_all",
        "warm_all",
        "recomputed_all",
        "first_details",
        "snap_details",
        "warm_details",
        "written",
        "written_all",
        "written_details",
        "keep_first",
        "keep_next",
        "written_proc",
        "written_proc_all",
        "written_proc_details",
    )
    t: dict[str, list[float]] = {k: [] for k in keys}
    used: dict[str, int] = {}
    nkeys: dict[str, int] = {}
    row_tables: dict[str, RowTable] = {}
    for _ in range(repeats):  # interleaved: each repeat runs every case once
        for suffix, metrics in (("", headline), ("_all", None)):
            cmp.clear_cache(store)  # first ever: no snapshot on disk, nothing in the process
            dt, res = timed(lambda m=metrics: compare_study(store, m, details=False))
            t["first" + suffix].append(dt)
            first_keys = sorted(cmp._CACHE[cmp._store_key(store, STUDY)].columns)
            nkeys[suffix] = len(first_keys)
            dt, res = timed(lambda m=metrics: compare_study(store, m, details=False))
            t["warm" + suffix].append(dt)
            forget_statistics()
            dt, res = timed(lambda m=metrics: compare_study(store, m, details=False))
            t["recomputed" + suffix].append(dt)
            if not suffix:
                dt, _ = timed(lambda: store.mean_by_spectral_norm("val_accuracy", study=STUDY))
                t["sql"].append(dt)
            dt, _ = timed(lambda k=first_keys: sql_floor(store, k))
            t["floor" + suffix].append(dt)
            if suffix not in row_tables:  # built once, untimed; its fetch timed each repeat
                row_tables[suffix] = RowTable(store, first_keys)
            dt, n_rows = timed(row_tables[suffix].fetch)
            assert n_rows >= n, f"the row table holds {n_rows} of {n} trials"
            t["rows" + suffix].append(dt)
            cmp.clear_cache()  # a new process: the snapshot on disk, the study unchanged
            before = dict(cmp.snapshot_counts)
            dt, res = timed(lambda m=metrics: compare_study(store, m, details=False))
            t["snap" + suffix].append(dt)
            used["snap" + suffix] = cmp.snapshot_counts["loaded"] - before["loaded"]
            append_pair(store)  # one new pair logged since the snapshot
            cmp.clear_cache()
            before = dict(cmp.snapshot_counts)
            dt, res = timed(lambda m=metrics: compare_study(store, m, details=False))
            t["snap_new" + suffix].append(dt)
            used["snap_new" + suffix] = cmp.snapshot_counts["loaded"] - before["loaded"]
            # the same in a real new Python process (its imports not timed): what a new
            # kernel or `thunderline-lab compare` pays, first calls and lazy imports included
            t["snap_new_proc" + suffix].append(new_process_compare(store.path, metrics, False))
            for _ in range(24):  # 25 pairs logged since the snapshot (a live study's minute)
                append_pair(store)
            cmp.clear_cache()
            dt, _ = timed(lambda m=metrics: compare_study(store, m, details=False))
            t["snap_new25" + suffix].append(dt)
            if suffix:
                res_all = res
            else:
                res_one = res
        cmp.clear_cache(store)
        dt, _ = timed(lambda: compare_study(store, None, details=True))
        t["first_details"].append(dt)
        cmp.clear_cache()
        dt, _ = timed(lambda: compare_study(store, None, details=True))
        t["snap_details"].append(dt)
        dt, _ = timed(lambda: compare_study(store, None, details=True))
        t["warm_details"].append(dt)
        # As a writer of this workbench leaves the study: no snapshot on disk, then a writer
        # appends a pair, and its keeper (at idle or exit, off the append path) brings the
        # snapshot up to the store; the next process compares.
        cmp.clear_cache(store)
        with keeper.keeping(keeper.MIN_TRIALS):
            append_pair(store)
            dt, saved = timed(keeper.flush)
        assert saved, "the keeper saved no snapshot"
        t["keep_first"].append(dt)
        for suffix, metrics, details in (
            ("", headline, False),
            ("_all", None, False),
            ("_details", None, True),
        ):
            cmp.clear_cache()  # a new process
            before = dict(cmp.snapshot_counts)
            dt, _ = timed(lambda m=metrics, d=details: compare_study(store, m, d))
            t["written" + suffix].append(dt)
            used["written" + suffix] = cmp.snapshot_counts["loaded"] - before["loaded"]
            # and in a real new Python process (its imports not timed)
            t["written_proc" + suffix].append(new_process_compare(store.path, metrics, details))
        with keeper.keeping(keeper.MIN_TRIALS):  # a live writer: one more pair, then idle
            append_pair(store)
            dt, _ = timed(keeper.flush)
        t["keep_next"].append(dt)
    med = {k: statistics.median(v) for k, v in t.items()}
    goal = 0.100

    def line(label: str, k: str) -> None:
        verdict = f"goal ≤ {goal * 1000:.0f} ms: {'met' if med[k] <= goal else 'NOT met'}"
        print(f"  {label:<58} {median_ms(t[k])}  {verdict}")
        held.append(k)

    def rebuild(label: str, k: str) -> None:
        over = "over" if med[k] > goal else "within"
        rebuilt = f"{over} {goal * 1000:.0f} ms: the snapshot's rebuild"
        print(f"  {label:<58} {median_ms(t[k])}  {rebuilt}")

    held: list[str] = []
    nm = len(res_all.headline)
    print(
        f"  medians of {repeats} interleaved repeats. A comparison reads the study's\n"
        "  columnar snapshot, which every writer of this workbench keeps (its keeper), and\n"
        "  the event log since. 'new process' = in-process cache cleared\n"
        "  (compare.clear_cache()); 'from scratch' = the snapshot on disk deleted too (a\n"
        "  deleted cache, or a store written with the keeper off): the snapshot's rebuild,\n"
        "  paid once, which no read of rows brings under 100 ms (the two floors below)"
    )
    for suffix, what in (("", "headline val_accuracy"), ("_all", f"default {nm} metrics")):
        rebuild(f"{what}, from scratch (no snapshot)", "first" + suffix)
        print(
            f"    {'floor of any read of the JSON: SQLite json_extract of the':<56} "
            f"{median_ms(t['floor' + suffix])}  (the {nkeys[suffix]} key"
            f"{'s' if nkeys[suffix] > 1 else ''} that first read extracts, of every trial, "
            "summed inside SQLite: no row reaches Python)"
        )
        print(
            f"    {'floor of a row-wise projection: those columns, no JSON,':<56} "
            f"{median_ms(t['rows' + suffix])}  (run, trial, status, SN, coeff, unit and the "
            f"key{'s' if nkeys[suffix] > 1 else ''} of every trial in a table of their own, "
            "its rows fetched into Python)"
        )
        line(f"{what}, cold, new process with snapshot", "snap" + suffix)
        line(f"{what}, cold with snapshot after 1 new pair", "snap_new" + suffix)
        line("  the same in a new Python process", "snap_new_proc" + suffix)
        line(f"{what}, cold with snapshot after 25 new pairs", "snap_new25" + suffix)
        line(f"{what}, warm", "warm" + suffix)
        line(f"{what}, warm recomputed", "recomputed" + suffix)
        if not suffix:
            print(
                f"  {'store.mean_by_spectral_norm (SQL GROUP BY)':<58} {median_ms(t['sql'])}"
                f"  ratio SQL/warm {med['sql'] / med['warm']:.1f}x"
            )
    rebuild("+ details (curves of 400 trials, layer σ), from scratch", "first_details")
    line("+ details, cold, new process with snapshot", "snap_details")
    line("+ details, warm", "warm_details")
    print(
        "  as this workbench's writers leave a study (a pair appended to a lab with no snapshot;"
        "\n  the writer's keeper brought the snapshot up to the store; then a new process):"
    )
    line("headline val_accuracy, first comparison after the writer", "written")
    line("  the same in a new Python process", "written_proc")
    line(f"default {nm} metrics, first comparison after the writer", "written_all")
    line("  the same in a new Python process", "written_proc_all")
    line("+ details, first comparison after the writer", "written_details")
    line("  the same in a new Python process", "written_proc_details")
    print(
        f"    {'the keeper in the writer (off the append path: idle or exit)':<56} "
        f"{median_ms(t['keep_first'])} from scratch; {median_ms(t['keep_next'])} after one "
        "more pair"
    )
    worst = max(held, key=lambda k: med[k])
    print(
        f"  P7 comparison ≤ {goal * 1000:.0f} ms: "
        f"{'met' if med[worst] <= goal else 'NOT met'} in all {len(held)} cases of a study as "
        f"this workbench's writers leave it (slowest: {worst}, {med[worst] * 1000:.1f} ms); "
        f"the snapshot's rebuild from scratch {med['first'] * 1000:,.0f} / "
        f"{med['first_all'] * 1000:,.0f} / {med['first_details'] * 1000:,.0f} ms (headline / "
        f"{nm} metrics / details), against the row-wise floor of {med['rows'] * 1000:.0f} / "
        f"{med['rows_all'] * 1000:.0f} ms"
    )
    print(
        "  snapshot loaded in the 'with snapshot' cases: "
        + ", ".join(f"{k} {v}/1" for k, v in used.items())
        + f"; counts this run: {cmp.snapshot_counts}"
    )
    print(
        "  cold samples (ms): "
        + ", ".join(
            f"{k} " + "/".join(f"{x * 1000:.0f}" for x in t[k])
            for k in (
                "first",
                "snap",
                "snap_new",
                "snap_new_proc",
                "snap_new25",
                "first_all",
                "snap_all",
                "snap_new_all",
                "snap_new_proc_all",
                "snap_new25_all",
                "written_proc",
                "written_proc_all",
                "written_proc_details",
            )
        )
    )
    # the snapshot itself: size on disk, and what one save costs (once per change)
    frame = cmp._CACHE[cmp._store_key(store, STUDY)]
    path = cmp._snapshot_path(store, STUDY)
    saves = []
    for _ in range(3):
        frame.saved = None
        dt, _ = timed(lambda: cmp._save_snapshot(store, STUDY, frame))
        saves.append(dt)
    assert path is not None and path.exists()
    print(
        f"  snapshot {path.name}: {path.stat().st_size / 2**20:.1f} MB on disk "
        f"({frame.n:,} rows, {len(frame.columns)} metric columns, {len(frame.memo)} statistic "
        f"rows); save {median_ms(saves)} (median of 3; written once per change)"
    )
    row = res_one.headline.iloc[0]
    print(
        f"  result: Δ val_accuracy {row['diff']:+.5f} [{row['ci_low']:+.5f}, "
        f"{row['ci_high']:+.5f}], n_pairs {row['n_pairs']:,}, CI by {row['ci_method']} "
        f"(B {row['n_boot']}), p {row['p_value']:.2g}"
    )
    print(
        "  CI per metric: "
        + ", ".join(
            f"{r.metric} {r.ci_method}" + (f" (B {r.n_boot})" if r.n_boot else "")
            for r in res_all.headline.itertuples()
        )
    )

    # incremental, in process: one new pair arrives through the ordinary append path
    append_pair(store)
    dt, res2 = timed(lambda: compare_study(store, headline, details=False))
    print(
        f"  after 1 new pair (in-process refresh from the event log) {dt * 1000:8.1f} ms"
        f"  (n_pairs {res2.headline.iloc[0]['n_pairs']:,})"
    )
    append_pair(store)
    dt_all, _ = timed(lambda: compare_study(store, None, details=False))
    print(
        f"  after 1 new pair, default 8 metrics (in-process)        {dt_all * 1000:8.1f} ms"
        f"  goal ≤ 100 ms: {'met' if dt_all <= 0.1 else 'NOT met'}"
    )
    # what no cache can save after new trials: the headline's statistics over the new pairs
    d = res2.pairs["val_accuracy"].to_numpy()
    d = d[~np.isnan(d)]
    boot, resampled, wilcoxon, scipy_w = [], [], [], []
    for _ in range(repeats):
        boot.append(timed(lambda: cmp.bootstrap_mean_ci(d, seed=0, name="val_accuracy"))[0])
        resampled.append(
            timed(lambda: cmp.bootstrap_mean_ci(d, seed=0, name="val_accuracy", method="resample"))[
                0
            ]
        )
        wilcoxon.append(timed(lambda: cmp._wilcoxon(d))[0])
        scipy_w.append(timed(lambda: scipy.stats.wilcoxon(d, method="approx"))[0])
    print(
        f"    of which no cache can save: the bootstrap CI of the {len(d):,} pair differences "
        f"{median_ms(boot)} (saddlepoint; 2,000 multinomial resamples {median_ms(resampled)}, "
        f"ratio {statistics.median(resampled) / statistics.median(boot):.0f}x), the Wilcoxon "
        f"test {median_ms(wilcoxon)} (scipy.stats.wilcoxon {median_ms(scipy_w)}, ratio "
        f"{statistics.median(scipy_w) / statistics.median(wilcoxon):.1f}x)"
    )
    x = np.random.default_rng(0).lognormal(0, 1, len(d))  # continuous: 50,000 levels
    sp_c, rs_c = [], []
    for _ in range(repeats):
        sp_c.append(timed(lambda: cmp.bootstrap_mean_ci(x))[0])
        rs_c.append(timed(lambda: cmp.bootstrap_mean_ci(x, method="resample"))[0])
    print(
        f"    continuous values ({len(x):,}): saddlepoint {median_ms(sp_c)}, resampled "
        f"(200 resamples under the 10 M-draw cap) {median_ms(rs_c)}, ratio "
        f"{statistics.median(rs_c) / statistics.median(sp_c):.0f}x"
    )


def append_pair(store: TrialStore) -> None:
    """Two new completed trials (one pair) through the ordinary append path, each reporting
    every summary metric that the study's trials of its arm report (a real pair does: every
    metric's statistics change, not only the headline's)."""
    new, stamp = [], time.time_ns()
    for j, sn in enumerate((False, True)):
        (text,) = store.conn.execute(
            "SELECT metrics FROM trials WHERE study = ? AND status = 'completed' "
            "AND spectral_norm = ? LIMIT 1",
            [STUDY, int(sn)],
        ).fetchone()
        metrics = json.loads(text)
        common = {"model_run_id": STUDY, "trial_id": f"new_{stamp}_{j}", "study": STUDY}
        params = {"pair_id": f"pair_new_{stamp}", "spectral_norm": sn}
        new.append(E.trial_start(**common, spectral_norm=sn, parameters=params))
        new.append(E.trial_complete(**common, spectral_norm=sn, parameters=params, metrics=metrics))
    store.append(new)


_NEW_PROCESS = """
import sys, time
from thunderline_lab import compare
from thunderline_lab.store import TrialStore
db, metrics, details = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
with TrialStore(db) as store:
    start = time.perf_counter()
    compare.compare_study(store, "p7", metrics=metrics or None, details=details)
    took = time.perf_counter() - start
    print(took, compare.snapshot_counts["loaded"])
"""


def new_process_compare(db: str, metrics: Any, details: bool) -> float:
    """One comparison timed inside a new Python process (its imports and the store's
    opening not timed); the process must have loaded the study's snapshot."""
    out = subprocess.run(
        [sys.executable, "-c", _NEW_PROCESS, db, ",".join(metrics or ()), "1" if details else "0"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, keeper.ENV_KEEP: "off"},
    ).stdout.split()
    assert out[1] == "1", "the new process did not load the snapshot"
    return float(out[0])


def forget_statistics() -> None:
    """Keep the cached frames (the read) but drop what the comparison derived from them and
    the statistics it remembers: the cost of a comparison after a refresh changed rows."""
    cmp._ROW_MEMO.clear()
    for frame in cmp._CACHE.values():
        frame.derived.clear()


def sql_floor(store: TrialStore, keys: list[str]) -> float:
    """What a first comparison can not go under while it reads the trials' JSON: SQLite
    extracting ``keys`` from every trial's metrics of the study and summing them in C (no
    row built in Python, no statistic)."""
    terms = " + ".join("COALESCE(json_extract(metrics, ?), 0)" for _ in keys)
    sql = f"SELECT SUM({terms}) FROM trials WHERE study = ?"
    paths = [cmp._json_path(k) for k in keys]
    return float(store.conn.execute(sql, [*paths, STUDY]).fetchone()[0] or 0.0)


class RowTable:
    """The floor of a row-wise projection: the comparison's columns of every trial of the
    study (run, trial, status, SN, coefficient, pairing unit, and ``keys``' values) copied
    once, untimed, into a table of their own in an in-memory SQLite database, so that no
    JSON is read; :meth:`fetch` times only bringing its rows into Python, the least any
    comparison that reads rows (not a columnar projection) pays before it computes."""

    def __init__(self, store: TrialStore, keys: list[str]) -> None:
        import sqlite3

        self.conn = sqlite3.connect(":memory:")
        self.conn.execute("ATTACH DATABASE ? AS s", [store.path])
        values = "".join(f", json_extract(metrics, ?) AS v{i}" for i in range(len(keys)))
        self.conn.execute(
            "CREATE TABLE t AS SELECT model_run_id, trial_id, status, spectral_norm, "
            f"spectral_norm_coeff, {cmp._UNIT_SQL} AS unit{values} FROM s.trials "
            "WHERE study = ? ORDER BY rowid",
            [*(cmp._json_path(k) for k in keys), STUDY],
        )
        self.conn.commit()
        self.conn.execute("DETACH DATABASE s")

    def fetch(self) -> int:
        return len(self.conn.execute("SELECT * FROM t ORDER BY rowid").fetchall())


def compare_study(store: TrialStore, metrics: Any, details: bool) -> Any:
    return cmp.compare_study(store, STUDY, metrics=metrics, details=details)


# -- the monitor under load -----------------------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def bench_monitor(seconds: float, rate: int) -> None:
    print(f"\nP7 monitor fed {rate:,} events/s for {seconds:g} s (bus, widget mode, no frontend)")
    n = int(seconds * rate)
    trials = 50
    steps = n // trials
    evs: list[Any] = []
    for t in range(trials):
        common = {"model_run_id": "live", "trial_id": f"trial_{t:04d}", "study": "live"}
        evs.append(E.trial_start(**common, spectral_norm=t % 2 == 0))
    for step in range(steps):
        for t in range(trials):
            evs.append(
                E.run_metric(
                    model_run_id="live",
                    trial_id=f"trial_{t:04d}",
                    study="live",
                    step=step,
                    measurements={
                        "train_loss": 1 / (step + 1),
                        "val_loss": 1.1 / (step + 1),
                        "val_accuracy": 1 - 1 / (step + 2),
                        "lr": 1e-3,
                        "max_sigma": 1.0,
                    },
                )
            )
    print(f"  {len(evs):,} events prebuilt ({trials} trials x {steps:,} epochs)")

    # the fold alone, unpaced
    state = MonitorState("live")
    dt, _ = timed(lambda: state.apply_many(evs))
    as_dicts = [e.model_dump(mode="json") for e in evs[:20_000]]
    dt_d, _ = timed(lambda: MonitorState("live").apply_many(as_dicts))
    print(
        f"  fold rate: {len(evs) / dt:,.0f} events/s (Event objects), "
        f"{len(as_dicts) / dt_d:,.0f} events/s (JSON dicts)"
    )

    gc.collect()
    bus = EventBus()
    mon = LiveMonitor.from_bus(
        bus, "live", mode="widget", min_interval=0.25, plot_interval=1.0, snapshot_on_finish=False
    )
    mon.start(display=False)
    rss0 = rss_mb()
    samples: list[tuple[float, int, float]] = []
    t0 = time.monotonic()
    batch = max(1, rate // 100)
    for i in range(0, len(evs), batch):
        target = t0 + i / rate
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        for ev in evs[i : i + batch]:
            bus.publish(ev)
        if i % rate < batch:
            samples.append((time.monotonic() - t0, mon.state.n_points(), rss_mb()))
    publish_s = time.monotonic() - t0
    while mon.state.events < len(evs) and time.monotonic() - t0 < publish_s + 10:
        time.sleep(0.01)
    lag = time.monotonic() - t0 - publish_s
    mon.close()
    draws = list(mon.redraw_times)
    per_window = [sum(1 for d in draws if w <= d < w + 1.0) for w in draws] or [0]
    print(
        f"  published {len(evs):,} events in {publish_s:.2f} s "
        f"= {len(evs) / publish_s:,.0f} events/s; all folded {lag * 1000:.0f} ms after the "
        f"last publish; dropped {getattr(mon.source, 'dropped', 0)}"
    )
    # the rate between the first and the last redraw (n redraws span n - 1 intervals; the
    # last ones fold what arrived by the end and draw the final state after publishing ends)
    span = draws[-1] - draws[0] if len(draws) > 1 else 0.0
    rate_txt = f"{(len(draws) - 1) / span:.2f}/s" if span > 0 else "-"
    print(
        f"  redraws: {mon.redraws} while publishing for {publish_s:.1f} s and folding the rest; "
        f"{rate_txt} from the first to the last; max in any 1 s window: {max(per_window)}"
    )
    print(
        "  curve points held: "
        + ", ".join(f"{p:,}" for _, p, _ in samples[::2])
        + f" (bound {trials} x 3 curves x 501)"
    )
    print(
        f"  RSS: {rss0:.0f} MB at start, "
        + ", ".join(f"{r:.0f}" for _, _, r in samples[::2])
        + " MB during"
        + f"; peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--db", type=Path, default=Path("/tmp/thunderline-bench-p7/lab.db"))
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--quick", action="store_true", help="10,000 trials / 1 M points")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rate", type=int, default=10_000)
    args = ap.parse_args()
    # the snapshot keeper runs only where a case asks for it (keeper.keeping), never behind
    # another case's back
    os.environ[keeper.ENV_KEEP] = "off"
    n_trials, epochs, long_steps = (10_000, 20, 5_000) if args.quick else (100_000, 20, 50_000)
    db = args.db if not args.quick else args.db.with_name("lab-quick.db")
    meta = db.with_suffix(".json")
    want = {"trials": n_trials, "epochs": epochs, "long": long_steps, "version": 1}
    if args.rebuild or not db.exists() or not meta.exists() or json.loads(meta.read_text()) != want:
        print(f"building {db} ({n_trials:,} trials, {n_trials * epochs * 5:,} points) ...")
        db.parent.mkdir(parents=True, exist_ok=True)
        build(db, n_trials, epochs, long_steps)
        cmp.clear_cache(db)  # bulk-inserted, not logged: no older snapshot may describe it
        meta.write_text(json.dumps(want))
    print(f"machine: {os.cpu_count()} CPUs, load average {load()} (shared machine)")
    store = TrialStore(db)
    try:
        bench_compare(store, args.repeats)
        bench_history(store, args.repeats)
    finally:
        store.close()
    # keep the benchmark's own extra trials out of the next run; they are deleted out of band
    # (not through the event log), so the comparison's snapshot of the study goes with them
    with TrialStore(db) as st:
        st.conn.execute("DELETE FROM trials WHERE trial_id LIKE 'new_%'")
        cmp.clear_cache(st)
    bench_monitor(args.seconds, args.rate)


if __name__ == "__main__":
    main()

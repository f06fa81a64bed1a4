"""Tests of thunderline_lab.compare: pairing, bootstrap CIs, tests, modes, cache, report, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import stats

from thunderline_lab import compare as cmp
from thunderline_lab import events
from thunderline_lab.cli import main
from thunderline_lab.compare import (
    bootstrap_mean_ci,
    compare_arrays,
    compare_study,
    format_headline,
    higher_is_better,
    report_folder,
    write_report,
)
from thunderline_lab.errors import ConfigError, StudyError
from thunderline_lab.lab import Lab
from thunderline_lab.monitor import synthetic_study
from thunderline_lab.store import TrialStore

STUDY = "cmp-study"


def _trial(
    number: int,
    sn: bool,
    metrics: dict[str, float],
    *,
    pair: str | None = None,
    coeff: float | None = None,
    status: str = "completed",
    study: str = STUDY,
    curve: Sequence[float] = (),
    group: str | None = None,
    extra: dict[str, Any] | None = None,
) -> list[Any]:
    common = {"model_run_id": study, "trial_id": f"trial_{number:04d}", "study": study}
    params: dict[str, Any] = {"spectral_norm": sn, **(extra or {})}
    if pair is not None:
        params["pair_id"] = pair
    if group is not None:
        params["group_id"] = group
    out = [events.trial_start(**common, spectral_norm=sn, parameters=params)]
    out += [
        events.run_metric(**common, step=s, measurements={"val_accuracy": v, "train_loss": 1 - v})
        for s, v in enumerate(curve)
    ]
    if status == "failed":
        failed = events.trial_failed(
            **common, spectral_norm=sn, error_message="nan loss", error_type="diverged"
        )
        return [*out, failed]
    out.append(
        events.trial_complete(
            **common,
            spectral_norm=sn,
            spectral_norm_coeff=coeff if sn else None,
            status=status,
            metrics=metrics,
            parameters=params,
        )
    )
    return out


def _paired_store(diffs: Sequence[float] | np.ndarray, base: float = 0.8) -> TrialStore:
    store = TrialStore(":memory:")
    evs = []
    for i, d in enumerate(diffs):
        evs += _trial(2 * i, False, {"acc": base + 0.01 * i}, pair=f"p{i}")
        evs += _trial(2 * i + 1, True, {"acc": base + 0.01 * i + d}, pair=f"p{i}")
    store.append(evs)
    return store


@pytest.fixture
def synthetic_store() -> TrialStore:
    store = TrialStore(":memory:")
    store.append(synthetic_study(STUDY, n_pairs=12, epochs=6, pruned=1, failed=1))
    return store


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def test_paired_comparison_matches_known_answers() -> None:
    diffs = [0.01, 0.03, -0.005, 0.02, 0.04, 0.015, 0.025, 0.002, 0.035, 0.012]
    res = compare_study(_paired_store(diffs), STUDY, metrics=["acc"], details=False)
    row = res.headline.iloc[0]
    assert res.design == "paired" and row["test"] == "wilcoxon"
    assert row["n_pairs"] == 10
    assert row["diff"] == pytest.approx(np.mean(diffs))
    expected = stats.wilcoxon(np.array(diffs))
    assert row["p_value"] == pytest.approx(expected.pvalue)  # no ties: exact, as scipy's
    assert row["test_method"] == "exact"
    assert row["ci_low"] < row["diff"] < row["ci_high"]
    assert row["ci_low"] > 0 and row["favours"] == "SN"
    assert list(res.pairs.columns) == ["pair_id", "acc"]
    assert sorted(res.pairs["pair_id"]) == sorted(f"p{i}" for i in range(10))
    got = dict(zip(res.pairs["pair_id"], res.pairs["acc"], strict=True))
    assert got == pytest.approx({f"p{i}": d for i, d in enumerate(diffs)}, abs=1e-12)


def test_rank_test_sees_ties_and_zeros_through_float_noise() -> None:
    diffs = [0.01, 0.03, -0.01, 0.02, 0.0, 0.01, 0.03, 0.0, 0.02, 0.01, 0.02, -0.01]
    res = compare_study(_paired_store(diffs, base=0.7), STUDY, metrics=["acc"], details=False)
    row = res.headline.iloc[0]
    assert row["test_method"] == "approx"
    assert row["p_value"] == pytest.approx(stats.wilcoxon(diffs, method="approx").pvalue)
    few = compare_arrays(
        "acc", np.array([0.81, 0.8, 0.83, 0.82]), np.array([0.8, 0.8, 0.82, 0.81]), paired=True
    )
    assert few["test_method"] == "permutation"
    assert few["p_value"] == pytest.approx(stats.wilcoxon([0.01, 0.0, 0.01, 0.01]).pvalue)


def test_no_difference_gives_a_ci_around_zero_and_no_winner() -> None:
    rng = np.random.default_rng(3)
    diffs = rng.normal(0, 0.01, 40)
    diffs -= diffs.mean()
    res = compare_study(_paired_store(diffs), STUDY, metrics=["acc"], details=False)
    row = res.headline.iloc[0]
    assert row["ci_low"] < 0 < row["ci_high"]
    assert row["favours"] == "—" and row["p_value"] > 0.05


def test_pairs_identical_in_every_metric_are_pointed_out() -> None:
    store = TrialStore(":memory:")
    evs = []
    for i, d in enumerate([0.0, 0.02, 0.0]):
        # wall-clock times differ between twins even when SN changed nothing
        none = {"acc": 0.8, "loss": 0.5, "step_time_ms": 3.0 + i}
        evs += _trial(2 * i, False, none, pair=f"p{i}")
        evs += _trial(2 * i + 1, True, {**none, "acc": 0.8 + d, "step_time_ms": 9.0}, pair=f"p{i}")
    store.append(evs)
    res = compare_study(store, STUDY, metrics=["acc", "loss"], details=False)
    (note,) = [n for n in res.notes if "SN left those trials unchanged" in n]
    assert note.startswith(
        "2 of 3 pairs report the same value in both arms for every summary metric"
    )
    res = compare_study(_paired_store([0.01, 0.02, 0.03]), STUDY, metrics=["acc"], details=False)
    assert not [n for n in res.notes if "unchanged" in n]


def test_twins_equal_in_the_metrics_compared_only_are_not_called_unchanged() -> None:
    # n_params and lr are equal between twins by design; the accuracy differs in every pair
    store = TrialStore(":memory:")
    evs = []
    for i in range(4):
        same = {"n_params": 1000.0 + i, "lr": 0.01}
        evs += _trial(2 * i, False, {**same, "acc": 0.8}, pair=f"p{i}")
        evs += _trial(2 * i + 1, True, {**same, "acc": 0.82 + i / 100}, pair=f"p{i}")
    store.append(evs)
    for metrics in (["n_params"], ["n_params", "lr"]):
        res = compare_study(store, STUDY, metrics=metrics, details=False)
        assert not [n for n in res.notes if "unchanged" in n], res.notes
        for row in res.headline.itertuples():
            # every difference is 0: the rank test is undefined, not p = 1
            assert row.diff == 0 and np.isnan(row.p_value) and np.isnan(row.p_holm)
            assert row.favours == "n/a"
            assert row.note.startswith("every pair's difference is zero")
        assert "p_holm: no metric has a p-value" in cmp._holm_note(res.headline)
    # beside a metric that differs, the all-zero one is left out of Holm's family
    res = compare_study(store, STUDY, metrics=["acc", "n_params"], details=False)
    p, p_holm = res.headline["p_value"].tolist(), res.headline["p_holm"].tolist()
    assert p_holm[0] == p[0] and np.isnan(p_holm[1])  # a family of one test


def test_lower_is_better_metrics_flip_the_verdict() -> None:
    assert not higher_is_better("test_nll") and not higher_is_better("lipschitz_upper")
    assert higher_is_better("fgsm_acc_0.05") and higher_is_better("ood_auroc")
    sn = np.array([0.3, 0.31, 0.29, 0.3, 0.32, 0.28, 0.3, 0.31])
    none = np.array([0.4, 0.42, 0.41, 0.39, 0.43, 0.38, 0.41, 0.4])
    row = compare_arrays("test_nll", sn, none, paired=True)
    assert row["diff"] < 0 and row["p_value"] < 0.05 and row["favours"] == "SN"


def test_a_verdict_needs_the_ci_and_the_test_to_agree() -> None:
    # Four pairs that all favour SN: the percentile CI excludes zero, but no Wilcoxon test
    # of four pairs can reach p < 0.05 (its smallest p is 0.125), so no arm is named.
    sn, none = np.array([0.3, 0.31, 0.29, 0.3]), np.array([0.4, 0.42, 0.41, 0.39])
    row = compare_arrays("test_nll", sn, none, paired=True)
    assert row["ci_high"] < 0 and row["p_value"] == pytest.approx(0.125)
    assert row["favours"] == "—"
    # the same differences eight times over: both agree, SN is named
    row = compare_arrays("test_nll", np.tile(sn, 2), np.tile(none, 2), paired=True)
    assert row["ci_high"] < 0 and row["p_value"] < 0.05 and row["favours"] == "SN"
    # six pairs (p = 2/64): named at 95%, not at 99%, where the test must reach p < 0.01
    sn6, none6 = np.append(sn, [0.32, 0.28]), np.append(none, [0.43, 0.38])
    assert compare_arrays("test_nll", sn6, none6, paired=True)["favours"] == "SN"
    strict = compare_arrays("test_nll", sn6, none6, paired=True, confidence=0.99)
    assert strict["p_value"] == pytest.approx(2 / 64) and strict["favours"] == "—"


def test_unpaired_fallback_uses_welch() -> None:
    store = TrialStore(":memory:")
    rng = np.random.default_rng(0)
    evs = []
    for i in range(30):
        sn = i % 2 == 1
        evs += _trial(i, sn, {"acc": float(rng.normal(0.85 if sn else 0.80, 0.02))})
    store.append(evs)
    res = compare_study(store, STUDY, metrics=["acc"], details=False)
    row = res.headline.iloc[0]
    assert res.design == "unpaired" and row["test"] == "welch"
    trials = res.trials
    sn_v = trials.loc[trials["arm"] == "SN", "acc"].to_numpy()
    none_v = trials.loc[trials["arm"] == "none", "acc"].to_numpy()
    assert row["p_value"] == pytest.approx(stats.ttest_ind(sn_v, none_v, equal_var=False).pvalue)
    assert row["diff"] == pytest.approx(sn_v.mean() - none_v.mean())
    assert any("unpaired" in n for n in res.notes)
    forced = compare_study(store, STUDY, metrics=["acc"], details=False, paired=False)
    assert forced.design == "unpaired"


def test_unpaired_replicates_are_one_sample_per_configuration() -> None:
    """A tpe study run on 3 seeds: a configuration's seeds share every hyperparameter, so
    Welch's test compares the configurations' means (6 + 6), not 18 + 18 trials."""
    store = TrialStore(":memory:")
    rng = np.random.default_rng(8)
    evs, means = [], {"SN": [], "none": []}
    number = 0
    for g in range(12):
        sn = g % 2 == 1
        level = float(rng.normal(0.82 if sn else 0.80, 0.02))  # the configuration's skill
        seeds = [level + float(rng.normal(0, 0.002)) for _ in range(3)]
        means["SN" if sn else "none"].append(np.mean(seeds))
        for v in seeds:
            evs += _trial(number, sn, {"acc": v}, group=f"g{g:04d}")
            number += 1
    evs += _trial(number, True, {"acc": 0.9})  # a trial of no configuration: its own sample
    means["SN"].append(0.9)
    store.append(evs)
    res = compare_study(store, STUDY, metrics=["acc"], details=False)
    row = res.headline.iloc[0]
    assert res.design == "unpaired" and (row["n_sn"], row["n_none"]) == (7, 6)
    ref = stats.ttest_ind(means["SN"], means["none"], equal_var=False)
    assert row["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert row["diff"] == pytest.approx(np.mean(means["SN"]) - np.mean(means["none"]))
    assert any("replicates" in n and "6 SN, 6 none" in n for n in res.notes)
    # one trial per configuration: nothing to average, no note, the trials as they are
    single = TrialStore(":memory:")
    single.append(
        [e for g in range(8) for e in _trial(g, g % 2 == 1, {"acc": 0.8 + g / 100}, group=f"g{g}")]
    )
    res1 = compare_study(single, STUDY, metrics=["acc"], details=False)
    assert res1.headline.loc[0, "n_sn"] == 4 and not any("replicates" in n for n in res1.notes)


def test_a_cnn_study_searching_the_sn_mode_is_also_compared_per_mode(tmp_path: Path) -> None:
    """The SN arm pools operator and matrix mode; by_mode compares each mode's SN trials
    with their own twins, and the report shows it."""
    store = TrialStore(":memory:")
    rng = np.random.default_rng(9)
    evs, effect = [], {"operator": 0.05, "matrix": -0.02}
    for i in range(16):
        mode = "operator" if i % 2 else "matrix"
        base = 0.8 + float(rng.normal(0, 0.01))
        d = effect[mode] + float(rng.normal(0, 0.002))
        evs += _trial(2 * i, False, {"acc": base}, pair=f"p{i}")
        evs += _trial(
            2 * i + 1, True, {"acc": base + d}, pair=f"p{i}", extra={"conv_sn_mode": mode}
        )
    store.append(evs)
    res = compare_study(store, STUDY, metrics=["acc"], details=False)
    by_mode = res.by_mode.set_index("sn_mode")
    assert sorted(by_mode.index) == ["matrix", "operator"]
    assert by_mode.loc["operator", "n_pairs"] == 8 and by_mode.loc["matrix", "n_pairs"] == 8
    assert by_mode.loc["operator", "diff"] == pytest.approx(0.05, abs=0.003)
    assert by_mode.loc["matrix", "diff"] == pytest.approx(-0.02, abs=0.003)
    assert by_mode.loc["operator", "favours"] == "SN" and by_mode.loc["matrix", "favours"] == "none"
    assert res.headline.loc[0, "n_pairs"] == 16  # the headline pools both modes
    text = write_report(res, tmp_path / "r").read_text()
    assert "## By conv SN mode" in text and "| operator" in text
    assert "within each SN mode's comparison" in text
    assert "By conv SN mode" in res.to_html(figures=False)
    # the CLI prints the per-mode table under the headline
    lab = Lab(tmp_path / "lab")
    with lab.store() as lab_store:
        lab_store.append(evs)
    out = CliRunner().invoke(
        main, ["compare", "--study", STUDY, "--lab", str(lab.root), "--metric", "acc"]
    )
    assert out.exit_code == 0, out.output
    printed = out.output.split("By conv SN mode", 1)[1]
    assert printed.splitlines()[1].startswith("SN mode") and "operator" in printed
    # one mode only (or an MLP study): no breakdown
    assert compare_study(
        _paired_store([0.01] * 6), STUDY, metrics=["acc"], details=False
    ).by_mode.empty


def test_bootstrap_is_seeded_and_vectorised_paths_agree() -> None:
    rng = np.random.default_rng(1)
    discrete = rng.integers(0, 40, 4000) / 2000  # accuracies on a 2,000-example test set
    a = bootstrap_mean_ci(discrete, seed=5, name="m", method="resample")
    assert a == bootstrap_mean_ci(discrete, seed=5, name="m", method="resample")
    assert a != bootstrap_mean_ci(discrete, seed=6, name="m", method="resample")
    # multinomial over distinct levels vs resampling indices: the same distribution
    continuous = discrete + rng.normal(0, 1e-9, len(discrete))
    b = bootstrap_mean_ci(continuous, seed=5, name="m", n_boot=4000, method="resample")
    se = discrete.std() / np.sqrt(len(discrete))
    assert a[1] == pytest.approx(b[1], abs=0.25 * se)
    assert a[2] == pytest.approx(b[2], abs=0.25 * se)
    assert (a[2] - a[1]) == pytest.approx(2 * 1.96 * se, rel=0.1)


@pytest.mark.parametrize("discrete", [True, False])
def test_bootstrap_gives_the_same_result_on_one_thread_or_many(
    discrete: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from thunderline_lab import compare as cmp

    rng = np.random.default_rng(4)
    x = rng.integers(0, 30, 3000) / 1000 if discrete else rng.normal(size=3000)
    monkeypatch.setattr(cmp, "_PARALLEL_DRAWS", 10**12)  # never in parallel
    serial = bootstrap_mean_ci(x, seed=3, name="acc", n_boot=1000, method="resample")
    assert serial[3] == 1000
    monkeypatch.setattr(cmp, "_PARALLEL_DRAWS", 0)  # always, on every core
    monkeypatch.setattr(cmp.os, "cpu_count", lambda: 4)
    assert bootstrap_mean_ci(x, seed=3, name="acc", n_boot=1000, method="resample") == serial


def test_bootstrap_work_cap_reduces_resamples_and_says_so() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=5000)
    est, lo, hi, b = bootstrap_mean_ci(x, n_boot=2000, max_draws=1_000_000, method="resample")
    assert b == 200 and lo < est < hi
    diffs = rng.normal(0.01, 0.02, 1500)  # under SADDLEPOINT_MIN pairs: resampled
    res = compare_study(
        _paired_store(diffs), STUDY, metrics=["acc"], details=False, max_draws=1_000_000
    )
    assert res.headline.loc[0, "n_boot"] == 666
    assert res.headline.loc[0, "ci_method"] == "resampling"
    assert any("bootstrap resamples" in n for n in res.notes)


def test_large_rows_are_remembered_by_content_and_equal_recomputed_ones() -> None:
    rng = np.random.default_rng(7)
    sn, none = rng.integers(0, 400, 6000) / 400, rng.integers(0, 400, 6000) / 400
    cmp.clear_cache()
    first = compare_arrays("acc", sn, none, paired=True)
    first["favours"] = "changed by the caller"  # a copy: the remembered row is untouched
    again = compare_arrays("acc", sn.copy(), none.copy(), paired=True)  # equal values
    cmp.clear_cache()
    recomputed = compare_arrays("acc", sn, none, paired=True)
    assert again == recomputed != first
    shifted = sn.copy()
    shifted[0] += 0.5  # one value differs: a different row
    assert compare_arrays("acc", shifted, none, paired=True)["diff"] != recomputed["diff"]
    assert compare_arrays("acc", sn, none, paired=True, confidence=0.9) != recomputed


@pytest.mark.parametrize(
    "kind", ["normal", "lognormal", "zero-inflated", "lattice", "two-sample lognormal"]
)
def test_saddlepoint_bounds_agree_with_many_resamples(kind: str) -> None:
    """The saddlepoint's bounds are the bootstrap distribution's quantiles: they agree with
    20,000 resamples to well under the Monte-Carlo error of the 200 resamples a 10 M-draw
    budget allows at 50,000 pairs (~0.2 standard errors per bound)."""
    rng = np.random.default_rng(11)
    n = cmp.SADDLEPOINT_MIN
    y = None
    if kind == "normal":
        x = rng.normal(0.01, 0.02, n)
    elif kind == "lognormal":
        x = rng.lognormal(0, 1.5, n)  # strongly skewed: its CI is not symmetric
    elif kind == "zero-inflated":
        x = np.where(rng.random(n) < 0.9, 0.0, rng.normal(0.01, 0.02, n))
    elif kind == "lattice":  # accuracy differences on a 200-example test set
        x = (rng.binomial(200, 0.85, n) - rng.binomial(200, 0.85, n)) / 200
    else:
        x, y = rng.lognormal(0, 1, n), rng.lognormal(0.1, 1.2, n + 500)
    est, lo, hi, b = bootstrap_mean_ci(x, y)
    assert b == 0  # "auto": no resample drawn
    ref = bootstrap_mean_ci(x, y, n_boot=20_000, max_draws=10**9, method="resample", seed=2)
    se = x.std() / np.sqrt(len(x)) if y is None else np.sqrt(x.var() / n + y.var() / len(y))
    assert ref[0] == est and ref[3] == 20_000
    assert lo == pytest.approx(ref[1], abs=0.08 * se)
    assert hi == pytest.approx(ref[2], abs=0.08 * se)
    if kind == "lognormal":  # right-skewed: the upper bound lies further from the mean
        assert hi - est > 1.05 * (est - lo)
    # deterministic: no seed enters
    assert bootstrap_mean_ci(x, y, seed=9) == (est, lo, hi, 0)


@pytest.mark.parametrize("kind", ["normal", "lognormal", "lattice", "heavy tails", "two samples"])
def test_saddlepoint_roots_by_newton_steps_match_the_secant_in_fewer_passes(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Newton steps (slope from the saddlepoint density) find the bounds the secant
    steps and bracket find, to 1e-7 standard errors, from fewer passes over the values."""
    rng = np.random.default_rng(21)
    n = 20_000
    x = {
        "normal": rng.normal(0.01, 0.02, n),
        "lognormal": rng.lognormal(0, 1.5, n),
        "lattice": (rng.binomial(200, 0.85, n) - rng.binomial(200, 0.85, n)) / 200,
        "heavy tails": rng.standard_t(3, n),
        "two samples": rng.lognormal(0, 1, n),
    }[kind]
    samples = [(x, 1.0)]
    if kind == "two samples":
        samples.append((rng.lognormal(0.1, 1.2, n + 500), -1.0))
    se = math.sqrt(sum(float(s.var()) / len(s) for s, _ in samples))
    passes = [0]
    cgf = cmp._cgf

    def counted(*args: Any) -> Any:
        passes[0] += 1
        return cgf(*args)

    monkeypatch.setattr(cmp, "_cgf", counted)
    for alpha in (0.025, 0.005, 0.1):
        passes[0] = 0
        newton = cmp._saddlepoint_bounds(samples, alpha)
        by_newton = passes[0]
        with monkeypatch.context() as m:
            m.setattr(cmp, "_saddle_newton", lambda *args: None)  # the secant and bracket
            passes[0] = 0
            secant = cmp._saddlepoint_bounds(samples, alpha)
        assert newton is not None and secant is not None
        assert newton == pytest.approx(secant, abs=1e-7 * se)
        assert by_newton <= 6 < passes[0]


def test_auto_resamples_small_discrete_and_lattice_samples() -> None:
    rng = np.random.default_rng(12)
    n = cmp.SADDLEPOINT_MIN
    assert bootstrap_mean_ci(rng.normal(size=n - 1))[3] == 2000  # too few values
    assert bootstrap_mean_ci(rng.normal(size=n))[3] == 0
    few_levels = rng.integers(0, 5, 50_000).astype(float)  # 5 levels: multinomial, cheap
    assert bootstrap_mean_ci(few_levels)[3] == 2000
    assert bootstrap_mean_ci(few_levels, method="saddlepoint")[3] == 0  # when asked for
    # the most lattice-like sample "auto" takes: 19 values 1, 2, ..., 19, the rest 0
    coarse = np.zeros(n)
    coarse[:19] = np.arange(1, 20)
    _, lo, hi, b = bootstrap_mean_ci(coarse)
    ref = bootstrap_mean_ci(coarse, n_boot=20_000, max_draws=10**9, method="resample")
    se = coarse.std() / np.sqrt(n)
    assert b == 0 and lo == pytest.approx(ref[1], abs=0.08 * se)
    assert hi == pytest.approx(ref[2], abs=0.08 * se)
    # a CI level whose bounds sit near the centre: the formula cancels there
    assert bootstrap_mean_ci(rng.normal(size=n), confidence=0.2)[3] == 2000
    # no spread: resampled, a zero-width CI at the value
    assert bootstrap_mean_ci(np.full(n, 0.5), method="saddlepoint") == (0.5, 0.5, 0.5, 2000)


def test_large_comparison_says_its_cis_come_from_the_saddlepoint() -> None:
    rng = np.random.default_rng(13)
    diffs = rng.normal(0.01, 0.02, cmp.SADDLEPOINT_MIN)
    res = compare_study(_paired_store(diffs), STUDY, metrics=["acc"], details=False)
    row = res.headline.iloc[0]
    assert row["ci_method"] == "saddlepoint" and row["n_boot"] == 0
    assert row["ci_low"] < row["diff"] < row["ci_high"]
    assert any("saddlepoint" in n and n.startswith("acc:") for n in res.notes)
    small = compare_study(_paired_store(diffs[:50]), STUDY, metrics=["acc"], details=False)
    assert small.headline.loc[0, "ci_method"] == "resampling"
    assert not any("saddlepoint" in n for n in small.notes)


def test_auto_resamples_when_one_value_makes_the_bootstrap_distribution_lumpy() -> None:
    """One diverged run (1e6 x the others) is drawn Poisson(1) times per resample: the
    resampled mean moves in steps of ~1 standard error, which the saddlepoint smooths over
    (its upper bound was 0.38 se above the resampled quantile). "auto" resamples then."""
    rng = np.random.default_rng(21)
    x = rng.normal(1, 0.1, cmp.SADDLEPOINT_MIN)
    x[0] = 1e6
    se = x.std() / np.sqrt(len(x))
    ref = bootstrap_mean_ci(x, n_boot=20_000, max_draws=10**9, method="resample")
    forced = bootstrap_mean_ci(x, method="saddlepoint")
    assert forced[3] == 0 and abs(forced[2] - ref[2]) > 0.25 * se  # why it is not taken
    est, lo, hi, b = bootstrap_mean_ci(x)
    assert b > 0 and (est, lo, hi, b) == bootstrap_mean_ci(x, method="resample")
    several = rng.normal(1, 0.1, 3 * cmp.SADDLEPOINT_MIN)
    several[:3] = 1e6  # three copies of the same value: one level, steps as lumpy
    assert bootstrap_mean_ci(several, max_draws=10**8)[3] > 0
    two = rng.normal(1, 0.1, cmp.SADDLEPOINT_MIN)
    two[:2] = 1e6, 2e6  # the larger's step is 2x the smaller's spread, the smaller's huge
    assert bootstrap_mean_ci(two)[3] > 0
    # a second sample whose own spread smooths the steps out: the saddlepoint again
    assert bootstrap_mean_ci(x, rng.normal(0, 2e4, cmp.SADDLEPOINT_MIN))[3] == 0
    # heavy tails whose large values are many and distinct stay with the saddlepoint
    assert bootstrap_mean_ci(rng.standard_cauchy(cmp.SADDLEPOINT_MIN))[3] == 0
    assert bootstrap_mean_ci(rng.pareto(1.5, cmp.SADDLEPOINT_MIN))[3] == 0


def test_auto_resamples_every_ci_level_under_40_percent() -> None:
    x = np.random.default_rng(22).normal(size=cmp.SADDLEPOINT_MIN)
    assert bootstrap_mean_ci(x, confidence=0.39)[3] == 2000
    assert bootstrap_mean_ci(x, confidence=0.4)[3] == 0


def test_report_header_names_the_seed_only_for_resampled_cis(tmp_path: Path) -> None:
    rng = np.random.default_rng(23)
    diffs = rng.normal(0.01, 0.02, cmp.SADDLEPOINT_MIN)
    res = compare_study(_paired_store(diffs), STUDY, metrics=["acc"], details=False, seed=7)
    assert res.headline.loc[0, "ci_method"] == "saddlepoint"
    header = write_report(res, tmp_path / "big").read_text().splitlines()[2]
    assert "saddlepoint" in header and "seed 7" not in header
    assert "saddlepoint" in res.to_html(figures=False).split("</p>")[0]
    assert not any("the same percentile CI" in n for n in res.notes)
    small = compare_study(_paired_store(diffs[:50]), STUDY, metrics=["acc"], details=False)
    header = write_report(small, tmp_path / "small").read_text().splitlines()[2]
    assert "(seed 0)" in header and "saddlepoint" not in header


@pytest.mark.parametrize(
    "d",
    [
        np.random.default_rng(14).normal(size=300),
        np.round(np.random.default_rng(15).normal(size=500), 1),  # ties
        np.r_[np.zeros(40), np.random.default_rng(16).integers(-3, 4, 200)].astype(float),
    ],
    ids=["continuous", "ties", "zeros and ties"],
)
def test_signed_rank_normal_approximation_is_scipys(d: np.ndarray) -> None:
    statistic, p = cmp._signed_rank_normal(d[d != 0])
    ref = stats.wilcoxon(d, method="approx")
    assert statistic == pytest.approx(float(ref.statistic), rel=1e-12)
    assert p == pytest.approx(float(ref.pvalue), rel=1e-9)


@pytest.mark.parametrize(
    "d",
    [
        np.random.default_rng(20).normal(size=3000),  # every level once
        np.round(np.random.default_rng(21).normal(size=5000), 1),  # ties, both signs
        np.r_[np.zeros(400), np.random.default_rng(22).integers(-3, 4, 2000)].astype(float),
        # an accuracy's differences on 360 test points, with float noise: 0.85 - 0.84
        (np.random.default_rng(23).integers(300, 340, 4000) / 360)
        - (np.random.default_rng(24).integers(300, 340, 4000) / 360),
        np.r_[np.full(60, 1e-12), np.zeros(10)],  # tiny, and zeros
        np.zeros(80),  # no nonzero difference: no test
        np.full(70, -0.25),  # one level
    ],
    ids=["continuous", "ties", "zeros", "accuracy", "tiny", "all zero", "one level"],
)
def test_wilcoxon_from_the_levels_is_the_test_from_the_differences(d: np.ndarray) -> None:
    # the ranks found from np.unique's levels (the sort the saddlepoint CI already made)
    # give the very statistic and p of the ranks found from the differences themselves
    direct = cmp._wilcoxon(d)
    from_levels = cmp._wilcoxon(d, cmp._levels(d))
    assert from_levels[2] == direct[2]
    np.testing.assert_array_equal(from_levels[:2], direct[:2])
    if np.any(np.round(d, 12) != 0):
        ref = stats.wilcoxon(np.round(d, 12), method="approx")
        assert from_levels[0] == pytest.approx(float(ref.statistic), rel=1e-12)


def test_first_rows_of_codes_in_order_of_appearance() -> None:
    ids = np.array([None, "b", "a", "b", None, "c", "a", "c", "d"], dtype=object)
    codes = np.full(len(ids), -1)
    has = ids != None  # noqa: E711  (elementwise)
    codes[has] = pd.factorize(ids[has])[0]
    expected = np.unique(codes[has], return_index=True)[1]  # first rows within has
    assert cmp._first_rows(codes).tolist() == np.flatnonzero(has)[expected].tolist()
    assert cmp._first_rows(np.array([], dtype=np.int64)).tolist() == []


def test_degenerate_inputs() -> None:
    assert np.isnan(bootstrap_mean_ci([])[0])
    row = compare_arrays("acc", np.array([0.5, 0.5]), np.array([0.5, 0.5]), paired=True)
    # no nonzero difference: the Wilcoxon test is undefined (was p = 1.0, favours "—")
    assert np.isnan(row["p_value"]) and row["diff"] == 0.0 and row["favours"] == "n/a"
    assert np.isnan(row["statistic"]) and "every pair's difference is zero" in row["note"]
    noise = compare_arrays(  # differences equal to 0 up to float noise
        "acc", np.array([0.85, 0.75, 0.65]), np.array([0.84, 0.74, 0.64]) + 0.01, paired=True
    )
    assert np.isnan(noise["p_value"]) and noise["favours"] == "n/a"
    one = compare_arrays("acc", np.array([0.5]), np.array([0.5]), paired=True)
    assert np.isnan(one["p_value"]) and one["note"].startswith("a single pair, whose difference")
    row = compare_arrays("acc", np.array([]), np.array([]), paired=True)
    assert row["favours"] == "n/a" and np.isnan(row["p_value"])


def test_one_value_gives_no_bootstrap_ci_and_no_verdict() -> None:
    est, lo, hi, b = bootstrap_mean_ci([0.3])
    assert est == 0.3 and np.isnan(lo) and np.isnan(hi) and b == 0
    est, lo, hi, b = bootstrap_mean_ci([0.9, 0.8, 0.85], [0.7])  # one value in an arm
    assert est == pytest.approx(0.85 - 0.7) and np.isnan(lo) and np.isnan(hi) and b == 0
    one_pair = compare_arrays("acc", np.array([0.85]), np.array([0.8]), paired=True)
    assert one_pair["diff"] == pytest.approx(0.05) and one_pair["n_pairs"] == 1
    assert np.isnan(one_pair["ci_low"]) and np.isnan(one_pair["ci_high"])
    assert one_pair["favours"] == "n/a"
    shown = cmp._headline_display(pd.DataFrame([{**one_pair, "source": "acc"}]))
    assert shown.loc[0, "95% CI"] == "n/a" and shown.loc[0, "n"] == "1 pair"
    unpaired = compare_arrays("acc", np.array([0.9]), np.array([0.8]), paired=False)
    assert np.isnan(unpaired["ci_low"]) and np.isnan(unpaired["p_value"])
    assert unpaired["favours"] == "n/a"
    two = compare_arrays("acc", np.array([0.85, 0.9]), np.array([0.8, 0.8]), paired=True)
    assert two["ci_low"] < two["ci_high"]  # two pairs: a CI (if a wide one), no verdict
    assert two["favours"] == "—"


def test_welch_is_undefined_for_two_constant_arms() -> None:
    store = TrialStore(":memory:")
    evs = []
    for i in range(4):  # two trials per arm, each arm constant, no pair ids
        evs += _trial(i, i % 2 == 1, {"acc": 0.9 if i % 2 else 0.8})
    store.append(evs)
    row = compare_study(store, STUDY, metrics=["acc"], details=False).headline.iloc[0]
    assert row["test"] == "welch" and row["diff"] == pytest.approx(0.1)
    assert np.isnan(row["statistic"]) and np.isnan(row["p_value"])
    assert row["favours"] == "n/a"  # no test, no verdict
    equal = compare_arrays("acc", np.array([0.8, 0.8]), np.array([0.8, 0.8]), paired=False)
    assert np.isnan(equal["p_value"]) and equal["favours"] == "n/a"
    # one constant arm still has a defined t: the other arm's variance, its n - 1 d.o.f.
    sn, none = np.array([0.75, 0.75, 0.75]), np.array([0.6, 0.62, 0.59])
    row2 = compare_arrays("acc", sn, none, paired=False)
    t = (sn.mean() - none.mean()) / np.sqrt(none.var(ddof=1) / 3)
    assert row2["statistic"] == pytest.approx(t)
    assert row2["p_value"] == pytest.approx(2 * stats.t.sf(t, 2))


# ---------------------------------------------------------------------------------------------
# Multiple comparisons: Holm over the metrics of one comparison
# ---------------------------------------------------------------------------------------------

NAN = float("nan")


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        # sorted 0.005·4, 0.01·3, 0.03·2, 0.04·1 = 0.02, 0.03, 0.06, 0.04 -> max-so-far 0.06
        ([0.01, 0.04, 0.03, 0.005], [0.03, 0.06, 0.06, 0.02]),
        # monotonicity: 0.02·1 < 0.019·2, raised to it
        ([0.001, 0.02, 0.019], [0.003, 0.038, 0.038]),
        # ties share one value whatever their order
        ([0.02, 0.02, 0.04], [0.06, 0.06, 0.06]),
        ([0.01, 0.5, 0.01], [0.03, 0.5, 0.03]),
        # NaN: no test, out of the family (m = 2) and left NaN
        ([NAN, 0.01, 0.02, NAN], [NAN, 0.02, 0.02, NAN]),
        # capped at 1
        ([0.4, 0.7, 0.9], [1.0, 1.0, 1.0]),
        ([0.3, 0.6], [0.6, 0.6]),
        # a family of one is unadjusted; none at all stays empty / NaN
        ([0.03], [0.03]),
        ([NAN, 0.03], [NAN, 0.03]),
        ([NAN], [NAN]),
        ([], []),
    ],
)
def test_holm_matches_hand_computed_values(p: list[float], expected: list[float]) -> None:
    got = cmp._holm(p)
    assert got.shape == (len(p),)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)  # NaN where NaN


def test_holm_follows_its_definition_on_random_families() -> None:
    rng = np.random.default_rng(11)
    for _ in range(200):
        m = int(rng.integers(1, 10))
        p = rng.choice([0.001, 0.01, 0.02, 0.04, 0.2, 0.9], m)  # ties, small and large
        p = np.where(rng.random(m) < 0.2, np.nan, p * rng.choice([1.0, 0.5], m))
        tested = [i for i in range(m) if p[i] == p[i]]
        order = sorted(tested, key=lambda i: p[i])
        k = len(order)
        # step-down: p(i) adjusted = min(1, max over j <= i of (k - j) * p(j)), j from 0
        want = np.full(m, np.nan)
        for i, idx in enumerate(order):
            want[idx] = min(1.0, max((k - j) * p[order[j]] for j in range(i + 1)))
        got = cmp._holm(p)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
        assert all(got[i] >= p[i] for i in tested)  # never below the raw p


def _family_store(path: str | Path = ":memory:") -> TrialStore:
    """8 pairs and three higher-is-better metrics, each's differences distinct in size (the
    exact Wilcoxon test): ``acc_a`` all positive (p = 2/256); ``acc_b`` and ``acc_c`` with
    the third smallest negative (p = 10/256 each, a tie); ``sn_only`` reported by SN trials
    only (no pair, no p-value). Every CI lies above zero."""
    store = TrialStore(path)
    evs = []
    for i in range(8):
        base = 0.7 + 0.01 * i
        step = 0.001 * (i + 1) * (-1 if i == 2 else 1)
        none = {"acc_a": base, "acc_b": base, "acc_c": base}
        sn = {
            "acc_a": base + abs(step),
            "acc_b": base + step,
            "acc_c": base + 2 * step,
            "sn_only": 0.5,
        }
        evs += _trial(2 * i, False, none, pair=f"p{i}")
        evs += _trial(2 * i + 1, True, sn, pair=f"p{i}")
    store.append(evs)
    return store


FAMILY = ["acc_a", "acc_b", "acc_c", "sn_only"]


def test_compare_study_adjusts_p_over_its_metrics_and_judges_on_it() -> None:
    res = compare_study(_family_store(), STUDY, metrics=FAMILY, details=False)
    head = res.headline.set_index("metric")
    cols = list(res.headline.columns)
    assert cols[cols.index("p_value") + 1] == "p_holm"
    assert head["p_value"].tolist()[:3] == pytest.approx([2 / 256, 10 / 256, 10 / 256])
    # 3 tests (sn_only has none): 3·2/256; 2·10/256 (the tie); max(1·10/256, 2·10/256)
    assert head["p_holm"].tolist()[:3] == pytest.approx([6 / 256, 20 / 256, 20 / 256])
    assert np.isnan(head.loc["sn_only", "p_value"]) and np.isnan(head.loc["sn_only", "p_holm"])
    assert (head.loc[["acc_a", "acc_b", "acc_c"], "ci_low"] > 0).all()
    # raw p < 0.05 everywhere, but only acc_a survives the adjustment
    assert head["favours"].tolist() == ["SN", "—", "—", "n/a"]

    text = res.format_table()
    assert text.splitlines()[0].split()[-3:] == ["p", "p_holm", "favours"]
    assert text.splitlines()[-1].startswith("p_holm: p adjusted by Holm's step-down method")
    assert "over 3 tests" in text.splitlines()[-1] and "family-wise" in text
    assert cmp.format_headline(res.headline) == text
    assert "over 3 tests" in res.to_html(figures=False)
    shown = cmp._headline_display(res.headline)
    assert shown["p_holm"].tolist() == ["0.023", "0.078", "0.078", "n/a"]
    fig = cmp.fig_differences(res)
    assert "(Holm 0.078)" in fig.axes[1].get_title()


def test_report_states_the_family_and_judges_on_the_adjusted_p(tmp_path: Path) -> None:
    res = compare_study(_family_store(), STUDY, metrics=FAMILY, details=False)
    text = write_report(res, tmp_path).read_text()
    lines = text.splitlines()
    header = next(ln for ln in lines if ln.startswith("| metric |"))
    assert "| p | p_holm | favours |" in header
    assert "| acc_b | acc_b | 8 pairs |" in text and "| 0.039 | 0.078 | — |" in text
    note = [ln for ln in lines if ln.startswith("p_holm:")]
    assert len(note) == 1 and "Holm's step-down method over 3 tests" in note[0]
    assert "(p_holm < 0.05)" in text and "(p < 0.05)" not in text


@pytest.mark.usefixtures("remember_small_rows")
def test_a_single_metric_is_not_adjusted_and_remembered_rows_stay_raw() -> None:
    store = _family_store()
    family = compare_study(store, STUDY, metrics=FAMILY, details=False)
    # the same row compared alone, through the remembered statistics: p_holm = p, and
    # the verdict on its own p (the family's adjustment never reaches the cached row)
    alone = compare_study(store, STUDY, metrics=["acc_b"], details=False)
    row = alone.headline.iloc[0]
    assert row["p_holm"] == row["p_value"] == pytest.approx(10 / 256)
    assert row["favours"] == "SN"
    assert alone.format_table().splitlines()[-1] == (
        "p_holm: one test (one metric with a p-value): p_holm = p, unadjusted."
    )
    again = compare_study(store, STUDY, metrics=FAMILY, details=False)
    _assert_same_result(again, family)
    _assert_same_result(family, _fresh(store, metrics=FAMILY, details=False))


def test_per_coefficient_rows_are_adjusted_within_each_coefficient(tmp_path: Path) -> None:
    store = TrialStore(":memory:")
    evs = []
    for i in range(8):
        base = {"acc": 0.8 + 0.01 * i, "acc2": 0.6 + 0.01 * i}
        up = {k: v + 0.001 * (i + 1) for k, v in base.items()}
        down = {k: v - 0.002 * (i + 1) for k, v in base.items()}
        evs += _trial(3 * i, False, base, pair=f"p{i}")
        evs += _trial(3 * i + 1, True, up, pair=f"p{i}", coeff=1.0)
        evs += _trial(3 * i + 2, True, down, pair=f"p{i}", coeff=4.0)
    store.append(evs)
    res = compare_study(store, STUDY, metrics=["acc", "acc2"], details=False)
    by = res.by_coeff
    assert len(by) == 4 and by["p_value"].tolist() == pytest.approx([2 / 256] * 4)
    assert by["p_holm"].tolist() == pytest.approx([4 / 256] * 4)  # 2 tests per coefficient
    assert by["favours"].tolist() == ["SN", "SN", "none", "none"]
    report = write_report(res, tmp_path).read_text()
    assert "within each coefficient's comparison (not across them), over 2 tests" in report


def test_a_table_of_rows_put_together_by_hand_is_adjusted_when_shown() -> None:
    sn = np.array([0.71, 0.72, 0.73, 0.74, 0.75, 0.76])
    none = sn - np.array([0.001, 0.002, 0.003, 0.004, 0.005, 0.006])
    rows = [{**compare_arrays(m, sn, none, paired=True), "source": m} for m in ("acc_x", "acc_y")]
    assert [r["favours"] for r in rows] == ["SN", "SN"]  # p = 2/64 each, alone
    table = pd.DataFrame(rows)
    shown = cmp._headline_display(table, 0.95)
    assert shown["p_holm"].tolist() == ["0.062", "0.062"]
    assert shown["favours"].tolist() == ["—", "—"]
    assert "over 2 tests" in cmp.format_headline(table, confidence=0.95)
    assert "p_holm" not in table.columns  # the caller's table is left as it was


# ---------------------------------------------------------------------------------------------
# Study semantics
# ---------------------------------------------------------------------------------------------


def test_synthetic_study_default_metrics(synthetic_store: TrialStore) -> None:
    res = compare_study(synthetic_store, STUDY)
    metrics = res.headline["metric"].tolist()
    assert metrics == [m for m in cmp.DEFAULT_METRICS if m != "ood_auroc"]
    assert (res.headline["n_pairs"] == 11).all()  # the failed/pruned trials broke two pairs
    assert res.sources["val_accuracy"] == "best_val_accuracy"
    counts = res.counts.set_index(["status", "arm"])["n"].to_dict()
    assert counts == {
        ("completed", "SN"): 11,
        ("completed", "none"): 11,
        ("failed", "SN"): 1,
        ("pruned", "none"): 1,
    }
    assert any("pruned" in n for n in res.notes) and any("failed" in n for n in res.notes)
    lip = res.headline.set_index("metric").loc["lipschitz_upper"]
    assert lip["diff"] < 0 and lip["favours"] == "SN"


def test_best_and_final_modes_and_history_fallback(synthetic_store: TrialStore) -> None:
    best = compare_study(
        synthetic_store, STUDY, metrics=["val_accuracy", "val_loss"], details=False
    )
    final = compare_study(
        synthetic_store, STUDY, metrics=["val_accuracy", "val_loss"], mode="final", details=False
    )
    assert best.sources == {"val_accuracy": "best_val_accuracy", "val_loss": "best_val_loss"}
    assert final.sources == {"val_accuracy": "val_accuracy", "val_loss": "history last(val_loss)"}
    b = best.trials.set_index("trial_id")["val_accuracy"]
    f = final.trials.set_index("trial_id")["val_accuracy"]
    assert (b >= f - 1e-12).all()
    hist = synthetic_store.metric_history(STUDY, "trial_0000", "val_loss")
    assert final.trials.set_index("trial_id").loc["trial_0000", "val_loss"] == pytest.approx(
        hist["value"].iloc[-1]
    )
    train = compare_study(synthetic_store, STUDY, metrics=["train_loss"], details=False)
    assert train.sources["train_loss"] == "history min(train_loss)"
    with pytest.raises(StudyError, match="mode"):
        compare_study(synthetic_store, STUDY, mode="last")  # type: ignore[arg-type]
    # no final_val_accuracy in these trials: the summary is used, and the notes say so
    assert any("final_<metric>" in n and "val_accuracy" in n for n in final.notes)
    assert not any("final_<metric>" in n for n in best.notes)


def _early_stopped_summary(epoch_val_acc: Sequence[float], best: int, test_acc: float) -> dict:
    """A trial summary as the trainer reports it after early stopping: the research metrics
    measured on the restored best epoch, ``best_*`` at it and ``final_*`` at the last."""
    return {
        "val_accuracy": epoch_val_acc[best],
        "best_val_accuracy": epoch_val_acc[best],
        "final_val_accuracy": epoch_val_acc[-1],
        "best_val_loss": 0.3,
        "final_val_loss": 0.5,
        "test_accuracy": test_acc,
    }


def test_final_mode_reads_the_last_epoch_and_best_mode_the_best_one() -> None:
    store = TrialStore(":memory:")
    evs = []
    for i in range(5):
        none = _early_stopped_summary([0.70, 0.80, 0.78 - 0.01 * i], 1, 0.79)
        sn = _early_stopped_summary([0.72, 0.84, 0.83, 0.80 - 0.01 * i], 1, 0.82)
        evs += _trial(2 * i, False, none, pair=f"p{i}") + _trial(2 * i + 1, True, sn, pair=f"p{i}")
    store.append(evs)
    wanted = ["val_accuracy", "val_loss", "test_accuracy"]
    best = compare_study(store, STUDY, metrics=wanted, mode="best", details=False)
    final = compare_study(store, STUDY, metrics=wanted, mode="final", details=False)
    assert best.sources == {
        "val_accuracy": "best_val_accuracy",
        "val_loss": "best_val_loss",
        "test_accuracy": "test_accuracy",
    }
    assert final.sources == {
        "val_accuracy": "final_val_accuracy",
        "val_loss": "final_val_loss",
        "test_accuracy": "test_accuracy",
    }
    b, f = best.headline.set_index("metric"), final.headline.set_index("metric")
    assert b.loc["val_accuracy", "diff"] == pytest.approx(0.04)  # 0.84 - 0.80 at the best
    assert f.loc["val_accuracy", "diff"] == pytest.approx(0.02)  # 0.80 - 0.78 at the last
    assert b.loc["val_loss", "mean_sn"] == 0.3 and f.loc["val_loss", "mean_sn"] == 0.5
    # measured once after training, on the restored model: the same in both modes
    cols = ["diff", "ci_low", "ci_high", "p_value"]
    assert b.loc["test_accuracy", cols].equals(f.loc["test_accuracy", cols])
    assert not any("final_<metric>" in n for n in final.notes)
    # the details' accuracy column follows the mode too (no plain val_accuracy read)
    detailed = compare_study(store, STUDY, metrics=["val_accuracy"], mode="final")
    assert detailed.trials["val_accuracy"].tolist() == final.trials["val_accuracy"].tolist()


def test_a_trial_without_the_modes_value_takes_its_summary_value() -> None:
    """best_<m> per trial, else the trial's summary value of m (as documented): a study
    where half the pairs come from an older run without best_/final_ values compares every
    pair, and says how many trials took the summary value."""
    store = TrialStore(":memory:")
    evs = []
    for i in range(8):
        for sn in (False, True):
            acc = 0.80 + 0.01 * i + (0.02 if sn else 0.0)
            m = {"val_accuracy": acc}
            if i < 4:  # the newer runs: the best epoch's value differs from the summary
                m |= {"best_val_accuracy": acc + 0.005, "final_val_accuracy": acc - 0.005}
            evs += _trial(2 * i + sn, sn, m, pair=f"p{i}")
    store.append(evs)
    for mode in ("best", "final"):
        res = compare_study(store, STUDY, metrics=["val_accuracy"], mode=mode, details=False)
        row = res.headline.iloc[0]
        assert row["n_pairs"] == 8, mode
        assert row["diff"] == pytest.approx(0.02)
        assert res.sources == {"val_accuracy": f"{mode}_val_accuracy"}
        assert f"val_accuracy: 8 trials report no {mode}_val_accuracy" in " ".join(res.notes)
        assert not any("lack a value" in n for n in res.notes)
        got = res.trials.sort_values("trial_id")["val_accuracy"].to_numpy()
        shift = 0.005 if mode == "best" else -0.005
        expected = [
            0.80 + 0.01 * (t // 2) + 0.02 * (t % 2) + (shift if t < 8 else 0.0) for t in range(16)
        ]
        assert got == pytest.approx(expected)
    # every trial reports best_<m>: the summary column is never read
    full = _paired_store([0.01] * 6)
    res = compare_study(full, STUDY, metrics=["acc"], details=False)
    assert not any("report no" in n for n in res.notes)


def test_final_mode_of_trainer_results_is_the_last_epoch_trained() -> None:
    """End to end: the trainer stops early and restores its best epoch; ``final`` compares
    the last epoch's validation values, ``best`` the best epoch's, ``test_accuracy`` is
    the restored model's in both."""
    import torch

    from thunderline_lab.data import load_dataset
    from thunderline_lab.models import ModelConfig
    from thunderline_lab.training import EvalSettings, train_trial

    wine = load_dataset("wine", seed=0)
    quick = EvalSettings(noise_sigmas=(), fgsm_eps=(), lipschitz=False, layer_sigmas=False)
    store, results = TrialStore(":memory:"), {}
    before = torch.get_num_threads()
    try:
        for sn in (False, True):
            # lr far too high: the validation loss jumps about and patience 1 stops early
            r = train_trial(
                ModelConfig(depth=2, width=64, spectral_norm=sn),
                wine,
                epochs=30,
                lr=0.5,
                patience=1,
                seed=0,
                evaluation=quick,
                keep_model=False,
                threads=1,
            )
            assert r.status == "completed" and r.best_epoch < len(r.history) - 1
            store.append(_trial(int(sn), sn, r.metrics, pair="p0"))
            results["SN" if sn else "none"] = r
    finally:
        torch.set_num_threads(before)
    wanted = ["val_accuracy", "val_loss", "test_accuracy"]
    best = compare_study(store, STUDY, metrics=wanted, details=False)
    final = compare_study(store, STUDY, metrics=wanted, mode="final", details=False)
    assert final.sources["val_accuracy"] == "final_val_accuracy"
    for arm, r in results.items():
        last, at_best = r.history[-1], r.history[r.best_epoch]
        b = best.trials.set_index("arm").loc[arm]
        f = final.trials.set_index("arm").loc[arm]
        assert f["val_loss"] == last["val_loss"] != b["val_loss"] == at_best["val_loss"]
        assert f["val_accuracy"] == last["val_accuracy"]
        assert b["val_accuracy"] == at_best["val_accuracy"]
        assert f["test_accuracy"] == b["test_accuracy"] == r.metrics["test_accuracy"]


def append_trial(
    store: TrialStore, trial_id: str, pair_id: Any, sn: bool, metrics: dict[str, float]
) -> None:
    """One completed trial of study ``ab`` in a pair, with the given summary metrics."""
    common = {"model_run_id": "ab", "trial_id": trial_id, "study": "ab"}
    params = {"pair_id": pair_id, "spectral_norm": sn}
    store.append(
        [
            events.trial_start(**common, spectral_norm=sn, parameters=params),
            events.trial_complete(
                **common, spectral_norm=sn, parameters=params, duration_ms=5, metrics=metrics
            ),
        ]
    )


def test_pairs_that_report_only_some_metrics_line_up_in_the_pairs_table() -> None:
    store = TrialStore()
    store.append(synthetic_study("ab", n_pairs=8, epochs=3))
    for i, sn in enumerate((True, False)):  # a ninth pair reporting val_accuracy only
        metrics = {"best_val_accuracy": 0.9 + i / 100, "val_accuracy": 0.9}
        append_trial(store, f"late_{i}", "late", sn, metrics)
    res = compare_study(store, "ab", details=False)
    n_pairs = dict(zip(res.headline["metric"], res.headline["n_pairs"], strict=True))
    assert n_pairs["val_accuracy"] == 9 and n_pairs["test_accuracy"] == 8
    assert len(res.pairs) == 9
    late = res.pairs[res.pairs["pair_id"] == "late"].iloc[0]
    assert late["val_accuracy"] == pytest.approx(0.9 - 0.91)
    assert np.isnan(late["test_accuracy"])
    assert res.pairs["test_accuracy"].notna().sum() == 8


def test_difference_figure_draws_differences_equal_up_to_float_noise() -> None:
    store = TrialStore()
    # accuracies on a 360-image set: both differences are 46/360, 4 ulps apart
    for pair, (sn_acc, none_acc) in enumerate(((246 / 360, 200 / 360), (254 / 360, 208 / 360))):
        for sn, acc in ((True, sn_acc), (False, none_acc)):
            append_trial(store, f"t{pair}{int(sn)}", pair, sn, {"val_accuracy": acc})
    res = compare_study(store, "ab", metrics=["val_accuracy"], details=False)
    d = res.pairs["val_accuracy"].to_numpy()
    assert len(d) == 2 and d[0] != d[1] and np.allclose(d, 46 / 360)
    fig = cmp.fig_differences(res)  # numpy cannot make 5 equal bins over a 1e-16 range
    assert fig is not None and fig.axes[0].patches  # one bar (and the CI's span)


def test_unknown_metrics_are_noted_and_unknown_studies_refused(
    synthetic_store: TrialStore,
) -> None:
    # a known metric this study does not report (no OOD points): noted, not refused
    res = compare_study(
        synthetic_store, STUDY, metrics=["val_accuracy", "ood_auroc"], details=False
    )
    assert res.headline["metric"].tolist() == ["val_accuracy"]
    assert "not reported by any trial: ood_auroc" in res.notes
    with pytest.raises(StudyError, match="none of the metrics"):
        compare_study(synthetic_store, STUDY, metrics=["ood_auroc"], details=False)
    # a name that is no metric at all: refused, alone or beside valid ones
    for metrics in (["nope"], ["val_accuracy", "nope"]):
        with pytest.raises(StudyError, match="no trial reports the metric 'nope'"):
            compare_study(synthetic_store, STUDY, metrics=metrics, details=False)
    with pytest.raises(StudyError, match=f"studies: {STUDY}"):
        compare_study(synthetic_store, "missing")
    with pytest.raises(StudyError, match="empty"):
        compare_study(TrialStore(":memory:"), "missing")


def _coeff_store(n_pairs: int, coeffs: tuple[float, float]) -> TrialStore:
    """Each pair: a none trial (acc 0.8) and two SN trials, acc 0.82 at ``coeffs[0]`` and
    0.78 at ``coeffs[1]``."""
    store = TrialStore(":memory:")
    evs = []
    for i in range(n_pairs):
        evs += _trial(3 * i, False, {"acc": 0.8}, pair=f"p{i}")
        evs += _trial(3 * i + 1, True, {"acc": 0.82}, pair=f"p{i}", coeff=coeffs[0])
        evs += _trial(3 * i + 2, True, {"acc": 0.78}, pair=f"p{i}", coeff=coeffs[1])
    store.append(evs)
    return store


def test_multiple_coefficients_get_their_own_rows() -> None:
    store = _coeff_store(8, (1.0, 4.0))
    res = compare_study(store, STUDY, metrics=["acc"], details=False)
    assert res.headline.loc[0, "diff"] == pytest.approx(0.0)  # SN arm: mean within each pair
    by = res.by_coeff.set_index("coeff")["diff"]
    assert by[1.0] == pytest.approx(0.02) and by[4.0] == pytest.approx(-0.02)


def test_a_searched_coefficient_of_a_few_trials_gets_no_row_per_trial() -> None:
    def study(n_pairs: int) -> TrialStore:
        store = TrialStore(":memory:")
        evs = []
        for i in range(n_pairs):  # every SN trial its own coefficient (a searched one)
            evs += _trial(2 * i, False, {"acc": 0.8}, pair=f"p{i}")
            evs += _trial(2 * i + 1, True, {"acc": 0.81}, pair=f"p{i}", coeff=0.5 + 0.1 * i)
        store.append(evs)
        return store

    few = compare_study(study(4), STUDY, metrics=["acc"], details=False)
    assert few.by_coeff.empty  # 4 trials, 4 coefficients: no table of single trials
    many = compare_study(study(9), STUDY, metrics=["acc"], details=False)
    assert len(many.by_coeff) == 3 and (many.by_coeff["n_pairs"] == 3).all()  # terciles


def test_details_curves_layers_and_sampling(synthetic_store: TrialStore) -> None:
    res = compare_study(synthetic_store, STUDY)
    assert set(res.curves["name"]) == {"val_accuracy", "val_loss", "train_loss"}
    c = res.curves[(res.curves["name"] == "val_accuracy") & (res.curves["arm"] == "SN")]
    assert list(c["step"]) == list(range(6)) and (c["n"] == 11).all()
    assert (c["ci_low"] <= c["mean"]).all() and (c["mean"] <= c["ci_high"]).all()
    assert set(res.layer_sigma["layer"]) == {"net.0", "net.2", "net.4"}
    sn_sigma = res.layer_sigma[res.layer_sigma["arm"] == "SN"]["mean"]
    assert (sn_sigma <= 1.0).all()
    assert res.accuracy_metric == "test_accuracy" and "lipschitz_upper" in res.trials
    sampled = compare_study(synthetic_store, STUDY, curve_trials=3)
    assert (sampled.curves["n"] <= 3).all()
    assert any("random sample of 3 trials" in n for n in sampled.notes)


# ---------------------------------------------------------------------------------------------
# The incremental cache
# ---------------------------------------------------------------------------------------------


def test_cache_refreshes_from_new_events_only(tmp_path: Path) -> None:
    store = TrialStore(tmp_path / "lab.db")
    evs = synthetic_study(STUDY, n_pairs=6, epochs=3)
    half = len(evs) // 2
    store.append(evs[:half])
    cmp.clear_cache()
    first = compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    as_compared = compare_study(
        store, STUDY, metrics=["test_accuracy"], details=False, use_cache=False
    ).trials
    frame = cmp._CACHE[cmp._store_key(store, STUDY)]
    store.append(evs[half:])
    second = compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    assert cmp._CACHE[cmp._store_key(store, STUDY)] is frame  # patched, not rebuilt
    # the first result's trials table, made only now, holds the trials it compared (its
    # run ids and arms made when read, from arrays the refresh did not change)
    pd.testing.assert_frame_equal(first.trials, as_compared)
    assert len(second.trials) > len(first.trials)
    assert first.headline.loc[0, "n_pairs"] < second.headline.loc[0, "n_pairs"] == 6
    fresh = compare_study(store, STUDY, metrics=["test_accuracy"], details=False, use_cache=False)
    cols = ["diff", "ci_low", "ci_high", "p_value", "n_pairs"]
    assert second.headline[cols].equals(fresh.headline[cols])
    # a trial whose metrics change (a late duplicate-id-free correction) is re-read
    store.append(_trial(0, False, {"test_accuracy": 0.0}, pair="pair_0000"))
    third = compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    assert third.trials.set_index("trial_id").loc["trial_0000", "test_accuracy"] == 0.0


def test_repeated_comparisons_reuse_derived_state_until_a_refresh(tmp_path: Path) -> None:
    store = TrialStore(tmp_path / "lab.db")
    store.append(synthetic_study(STUDY, n_pairs=8, epochs=3, pruned=1))
    cmp.clear_cache()
    first = compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    frame = cmp._CACHE[cmp._store_key(store, STUDY)]
    assert frame.derived  # arms, counts and rows kept with the frame
    second = compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    pd.testing.assert_frame_equal(first.headline, second.headline)
    pd.testing.assert_frame_equal(first.pairs, second.pairs)
    pd.testing.assert_frame_equal(first.counts, second.counts)
    assert first.notes == second.notes
    # shared arrays are read-only; the trials table is the caller's own copy
    trial_ids = second.trial_columns["trial_id"]
    assert isinstance(trial_ids, cmp._Later)  # made when the trials table is read
    assert not trial_ids().flags.writeable and trial_ids() is trial_ids()
    second.trials.loc[0, "arm"] = "edited"
    second.counts.loc[0, "n"] = -1
    third = compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    assert "edited" not in set(third.trials["arm"]) and (third.counts["n"] >= 0).all()
    # a new pair: the derived state is rebuilt and agrees with an uncached comparison
    store.append(_trial(900, False, {"test_accuracy": 0.5}, pair="late"))
    store.append(_trial(901, True, {"test_accuracy": 0.9}, pair="late"))
    after = compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    fresh = compare_study(store, STUDY, metrics=["test_accuracy"], details=False, use_cache=False)
    assert after.headline.loc[0, "n_pairs"] == first.headline.loc[0, "n_pairs"] + 1
    pd.testing.assert_frame_equal(after.headline, fresh.headline)
    pd.testing.assert_frame_equal(after.pairs, fresh.pairs)
    assert "late" in set(after.pairs["pair_id"]) and after.notes == fresh.notes


def test_cache_does_not_confuse_in_memory_stores() -> None:
    cmp.clear_cache()
    for diff in (0.01, -0.02, 0.03):
        res = compare_study(_paired_store([diff] * 5), STUDY, metrics=["acc"], details=False)
        assert res.headline.loc[0, "diff"] == pytest.approx(diff)


# ---------------------------------------------------------------------------------------------
# Report and CLI
# ---------------------------------------------------------------------------------------------


def test_write_report(synthetic_store: TrialStore, tmp_path: Path) -> None:
    res = compare_study(synthetic_store, STUDY)
    report = write_report(res, tmp_path / "out")
    text = report.read_text()
    assert report.name == "report.md"
    assert "| val_accuracy | best_val_accuracy | 11 pairs |" in text
    for fig in (
        "paired_differences",
        "distributions",
        "learning_curves",
        "accuracy_vs_lipschitz",
        "layer_sigma",
    ):
        assert f"![{fig}]({fig}.png)" in text
        assert (tmp_path / "out" / f"{fig}.png").read_bytes().startswith(b"\x89PNG")
    assert "| completed | 11 | 11 |" in text
    assert "<table" in res.to_html(figures=False) and "11 pairs" in res.to_html(figures=False)


def test_the_ci_column_is_named_by_the_confidence(
    synthetic_store: TrialStore, tmp_path: Path
) -> None:
    res = compare_study(synthetic_store, STUDY, confidence=0.9)
    report = write_report(res, tmp_path / "out").read_text()
    shown = {
        "text": res.format_table(),
        "markdown": res.to_markdown(),
        "html": res.to_html(figures=False),
        "report": report,
        "format_headline": cmp.format_headline(res.headline),  # the headline knows its level
    }
    for where, text in shown.items():
        assert "90% CI" in text and "95%" not in text, where
    assert "90% CI" in cmp.format_headline(res.headline, confidence=0.9)
    assert "99% CI" in cmp.format_headline(res.headline, confidence=0.99)
    assert cmp._percent(0.975) == "97.5%" and cmp._percent(0.29) == "29%"
    fig = cmp.fig_differences(res)
    assert "90% CI" in fig.get_suptitle()


def test_headline_numbers_share_one_format_and_pairs_are_counted_in_words() -> None:
    row = {
        "metric": "acc",
        "source": "acc",
        "design": "paired",
        "n_pairs": 1,
        "n_sn": 1,
        "n_none": 1,
        "mean_sn": 0.5,
        "mean_none": 0.6,
        "diff": -0.13333333,
        "ci_low": -0.26666667,
        "ci_high": 0.0,
        "test": "wilcoxon",
        "p_value": float("nan"),
        "favours": "n/a",
    }
    rows = [row, {**row, "n_pairs": 3, "diff": -0.0, "ci_low": -2e-5, "ci_high": 3e-5}]
    shown = cmp._headline_display(pd.DataFrame(rows), 0.95)
    assert shown["95% CI"].tolist() == ["[-0.2667, +0.0000]", "[-2.00e-05, +3.00e-05]"]
    assert shown["Δ SN−none"].tolist() == ["-0.1333", "+0.00e+00"]  # no "-0", one format
    assert shown["n"].tolist() == ["1 pair", "3 pairs"]
    assert shown["p"].tolist() == ["n/a", "n/a"]


def _curve_store(n_per_arm: int, spread: float) -> TrialStore:
    """Pairs whose learning curves spread widely at epoch 1 (one pair: SN high, none low)."""
    store = TrialStore(":memory:")
    evs = []
    for i in range(n_per_arm):
        hi = i % 2 == 0
        for sn in (False, True):
            acc1 = 0.5 + (spread if hi == sn else -spread)
            evs += _trial(
                2 * i + sn,
                sn,
                {"acc": 0.8 + 0.01 * i, "sigma/fc": 0.05 if hi else 2.0},
                pair=f"p{i}",
                curve=[0.1, acc1, 0.98, 0.99],
            )
    store.append(evs)
    return store


def test_small_samples_get_no_bands_and_bands_stay_in_range() -> None:
    two = compare_study(_curve_store(2, 0.45), STUDY, metrics=["acc"])
    assert (two.curves["n"] == 2).all()
    assert two.curves[["ci_low", "ci_high"]].isna().all().all()  # t ≈ 12.7: no band at all
    assert two.layer_sigma[["ci_low", "ci_high"]].isna().all().all()
    fig = cmp.fig_learning_curves(two)
    assert "no band below 3 trials" in fig.get_suptitle()
    assert cmp.fig_layer_sigma(two) is not None  # NaN error bars: none drawn, no warning

    res = compare_study(_curve_store(3, 0.45), STUDY, metrics=["acc"])
    c = res.curves.set_index(["name", "arm", "step"])
    assert not c[["ci_low", "ci_high"]].isna().any().any()
    acc, loss = c.loc["val_accuracy"], c.loc["train_loss"]
    assert (acc["ci_low"] >= 0).all() and (acc["ci_high"] <= 1).all()
    assert acc.loc[("SN", 1), "ci_low"] == 0.0 and acc.loc[("SN", 1), "ci_high"] == 1.0
    assert (loss["ci_low"] >= 0).all() and loss.loc[("SN", 1), "ci_low"] == 0.0
    assert (c["ci_low"] <= c["mean"]).all() and (c["mean"] <= c["ci_high"]).all()
    sigma = res.layer_sigma
    assert (sigma["ci_low"] >= 0).all() and (sigma["ci_low"] == 0).any()  # clipped, not < 0
    # epochs are whole numbers on the curves' axis; counts on the histograms' y axis
    fig = cmp.fig_learning_curves(res)
    fig.canvas.draw()
    for ax in fig.axes:
        assert ax.get_xlabel() == "epoch"
        assert all(float(t).is_integer() for t in ax.get_xticks())


def test_difference_figure_labels_counts_and_explains_empty_axes() -> None:
    store = TrialStore(":memory:")
    evs = []
    for i in range(3):  # every pair: no difference at all
        evs += _trial(2 * i, False, {"acc": 0.8}, pair=f"p{i}")
        evs += _trial(2 * i + 1, True, {"acc": 0.8, "sn_only": 1.0}, pair=f"p{i}")
    store.append(evs)
    res = compare_study(store, STUDY, metrics=["acc", "sn_only"], details=False)
    fig = cmp.fig_differences(res)
    fig.canvas.draw()
    zero, empty = fig.axes[0], fig.axes[1]
    assert zero.get_ylabel() == "pairs" and zero.patches
    lo, hi = zero.get_xlim()
    assert hi - lo > 1e-3  # a readable axis around 0, not a ×1e-14 one
    assert all(float(t).is_integer() for t in zero.get_yticks())
    assert [t.get_text() for t in empty.texts] == ["no complete pairs"]

    unpaired = TrialStore(":memory:")
    unpaired.append(_trial(0, True, {"acc": 0.9}) + _trial(1, False, {"acc": 0.8}))
    one_each = compare_study(unpaired, STUDY, metrics=["acc"], details=False)
    assert one_each.headline.loc[0, "favours"] == "n/a"
    assert cmp.fig_differences(one_each).axes[0].get_ylabel() == "trials"


def test_cli_compare(tmp_path: Path) -> None:
    lab = Lab(tmp_path / "lab")
    with lab.store() as store:
        store.append(synthetic_study("cli/ab", n_pairs=6, epochs=4))
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "compare",
            "--study",
            "cli/ab",
            "--lab",
            str(lab.root),
            "--metric",
            "val_accuracy",
            "--metric",
            "test_nll",
            "--mode",
            "final",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "paired design, final values" in result.output
    assert "val_accuracy  val_accuracy" in result.output and "test_nll" in result.output
    report = lab.reports_dir / "cli_ab-b5b00e4e" / "report.md"  # report_folder("cli/ab")
    assert f"report: {report}" in result.output and report.exists()
    out = tmp_path / "elsewhere"
    result = runner.invoke(
        main,
        [
            "compare",
            "--study",
            "cli/ab",
            "--lab",
            str(lab.root),
            "--out",
            str(out),
            "--metric",
            "test_accuracy",
        ],
    )
    assert result.exit_code == 0 and (out / "report.md").exists()
    bad = runner.invoke(main, ["compare", "--study", "nope", "--lab", str(lab.root)])
    assert bad.exit_code == 1 and "error: no trials for study 'nope'" in bad.output
    missing = runner.invoke(main, ["compare", "--study", "x", "--lab", str(tmp_path / "none")])
    assert missing.exit_code != 0 and "no trial store" in missing.output


def test_report_lists_mlflow_runs(tmp_path: Path) -> None:
    import pandas as pd

    from thunderline_lab.compare import compare_study, write_report
    from thunderline_lab.monitor import synthetic_study
    from thunderline_lab.store import TrialStore

    store = TrialStore(":memory:")
    store.append(synthetic_study("links", n_pairs=3, epochs=3))
    res = compare_study(store, "links", metrics=["val_accuracy"], details=False)
    links = pd.DataFrame(
        {
            "trial_id": ["trial_0000", "trial_0001", "trial_0002"],
            "mlflow_run_id": ["abc123", None, None],
            "run_url": ["http://127.0.0.1:5000/#/experiments/1/runs/abc123", None, None],
            "artifacts_uri": ["file:///lab/mlartifacts/x", None, None],
            "sync_state": ["synced", "not mirrored", "pending"],
        }
    )
    text = write_report(res, tmp_path, mlflow_links=links).read_text()
    assert "## MLflow runs" in text
    runs = text.split("## MLflow runs")[1]
    assert "[abc123](http://127.0.0.1:5000/#/experiments/1/runs/abc123)" in runs
    assert "trial_0001" not in runs  # runs without MLflow are left out
    # a trial still in the outbox was left out too, as if MLflow never had it
    assert "| trial_0002 | (none yet) | | pending: `thunderline-lab mlflow-sync` |" in runs


def test_searched_coefficient_is_grouped_in_terciles() -> None:
    store = TrialStore(":memory:")
    evs = []
    for i in range(9):
        coeff = 0.5 + i * 0.25  # nine distinct coefficients, as a search produces
        evs += _trial(2 * i, False, {"acc": 0.8}, pair=f"p{i}")
        evs += _trial(2 * i + 1, True, {"acc": 0.8 + 0.01 * i}, pair=f"p{i}", coeff=coeff)
    store.append(evs)
    res = compare_study(store, STUDY, metrics=["acc"], details=False)
    assert len(res.by_coeff) == 3 and list(res.by_coeff["n_pairs"]) == [3, 3, 3]
    assert res.by_coeff["coeff_range"].iloc[0].startswith("[0.5, ")
    assert list(res.by_coeff["diff"]) == pytest.approx([0.01, 0.04, 0.07])


def test_first_read_extracts_only_the_keys_used_and_adds_others_on_demand(
    synthetic_store: TrialStore,
) -> None:
    cmp.clear_cache()
    best = compare_study(synthetic_store, STUDY, metrics=["val_accuracy"], details=False)
    frame = cmp._CACHE[cmp._store_key(synthetic_store, STUDY)]
    assert "best_val_accuracy" in frame.columns and "val_accuracy" not in frame.columns
    final = compare_study(
        synthetic_store, STUDY, metrics=["val_accuracy"], mode="final", details=False
    )
    assert cmp._CACHE[cmp._store_key(synthetic_store, STUDY)] is frame
    assert "val_accuracy" in frame.columns  # added to the cached frame, in its row order
    cols = ["diff", "ci_low", "ci_high", "p_value", "n_pairs", "source"]
    for res, mode in ((best, "best"), (final, "final")):
        fresh = compare_study(
            synthetic_store,
            STUDY,
            metrics=["val_accuracy"],
            mode=mode,  # type: ignore[arg-type]
            details=False,
            use_cache=False,
        )
        assert res.headline[cols].equals(fresh.headline[cols])
        assert np.array_equal(
            res.trials["val_accuracy"].to_numpy(), fresh.trials["val_accuracy"].to_numpy()
        )
    assert best.sources["val_accuracy"] == "best_val_accuracy"
    assert final.sources["val_accuracy"] == "val_accuracy"


def test_vectorised_row_conversions_match_the_per_value_ones() -> None:
    mixed = [0.5, 3, None, True, "0.25", "n/a", '{"a": 1}', 10**400, -2.5]
    expected = [cmp._as_float(v) for v in mixed[:-2]]
    assert np.array_equal(cmp._floats(mixed[:-2]), np.array(expected), equal_nan=True)
    with pytest.raises(OverflowError):  # as float() itself
        cmp._floats(mixed)
    numeric = [0.5, 3, None, -2.5, 2**70]
    assert np.array_equal(
        cmp._floats(numeric), np.array([0.5, 3.0, np.nan, -2.5, 2.0**70]), equal_nan=True
    )
    assert np.array_equal(
        cmp._floats([1, None, 0.25, "2"], cmp._nan_or_float),
        np.array([1.0, np.nan, 0.25, 2.0]),
        equal_nan=True,
    )
    statuses = np.array(["pruned", "completed", "failed", "completed", "running"], dtype=object)
    pairs = np.array(["b", None, "a", "b", 7], dtype=object)
    frame = cmp._Frame(
        run=statuses,
        trial=statuses,
        status=statuses,
        sn=np.zeros(5),
        coeff=np.zeros(5),
        pair=pairs,
        columns={},
        keys=set(),
        watermark=0,
    )
    names, codes = frame.status_codes()
    ref_names, ref_codes = np.unique(statuses.astype(str), return_inverse=True)
    assert names.tolist() == ref_names.tolist() and codes.tolist() == ref_codes.tolist()
    assert frame.pair_codes().tolist() == [0, -1, 1, 0, 2]
    frame.pair = np.array(["b", None, "a", "b", "c"], dtype=object)  # all str: no astype
    frame._pair_codes = None
    assert frame.pair_codes().tolist() == [0, -1, 1, 0, 2]


# ---------------------------------------------------------------------------------------------
# The snapshot on disk (a new process's first comparison)
# ---------------------------------------------------------------------------------------------


class _Spy:
    """Counts the bulk reads of a study's trials and the statistics computed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bulk_reads = 0
        self.reads = 0
        self.statistics = 0
        fetch, stats_of = cmp._fetch_rows, cmp._compare_arrays

        def spy_fetch(*args: Any, **kwargs: Any) -> Any:
            self.reads += 1
            subset = kwargs.get("subset", args[3] if len(args) > 3 else None)
            self.bulk_reads += subset is None
            return fetch(*args, **kwargs)

        def spy_stats(*args: Any, **kwargs: Any) -> Any:
            self.statistics += 1
            return stats_of(*args, **kwargs)

        monkeypatch.setattr(cmp, "_fetch_rows", spy_fetch)
        monkeypatch.setattr(cmp, "_compare_arrays", spy_stats)


def _assert_same_result(res: cmp.ComparisonResult, fresh: cmp.ComparisonResult) -> None:
    """Equal results; floats (CIs, p values, differences) bit for bit."""
    pd.testing.assert_frame_equal(res.headline, fresh.headline, check_exact=True)
    pd.testing.assert_frame_equal(res.pairs, fresh.pairs, check_exact=True)
    pd.testing.assert_frame_equal(res.trials, fresh.trials, check_exact=True)
    pd.testing.assert_frame_equal(res.counts, fresh.counts, check_exact=True)
    pd.testing.assert_frame_equal(res.by_coeff, fresh.by_coeff, check_exact=True)
    assert res.notes == fresh.notes and res.sources == fresh.sources
    for col in ("pair_id", "trial_id", "status"):
        assert [type(v) for v in res.trials[col]] == [type(v) for v in fresh.trials[col]]
    if len(res.pairs):
        assert [type(v) for v in res.pairs["pair_id"]] == [type(v) for v in fresh.pairs["pair_id"]]


def _fresh(store: TrialStore, study: str = STUDY, **kwargs: Any) -> cmp.ComparisonResult:
    return compare_study(store, study, use_cache=False, **kwargs)


@pytest.fixture
def remember_small_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remember statistic rows of test-sized inputs too (normally only ≥ 5,000 values)."""
    monkeypatch.setattr(cmp, "_ROW_MEMO_MIN", 0)


def _lab_store(tmp_path: Path, **study: Any) -> TrialStore:
    """A lab's store holding a synthetic study, with no comparison snapshot on disk yet."""
    store = TrialStore(tmp_path / "lab.db")
    store.append(synthetic_study(STUDY, **study))
    cmp.clear_cache(store)
    return store


def _snapshot_file_of(store: TrialStore, study: str = STUDY) -> Path:
    path = cmp._snapshot_path(store, study)
    assert path is not None
    return path


@pytest.mark.usefixtures("remember_small_rows")
def test_a_new_process_reads_the_snapshot_and_gets_the_same_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _lab_store(tmp_path, n_pairs=10, epochs=3, pruned=1, failed=1)
    path = _snapshot_file_of(store)
    assert not path.exists()
    first = compare_study(store, STUDY)
    assert path.exists() and path.parent == tmp_path / "cache" / "compare"
    mtime = path.stat().st_mtime_ns
    compare_study(store, STUDY)  # nothing changed: not written again
    assert path.stat().st_mtime_ns == mtime

    cmp.clear_cache()  # a new process: nothing in memory, the snapshot on disk
    spy = _Spy(monkeypatch)
    loaded = cmp.snapshot_counts["loaded"]
    again = compare_study(store, STUDY)
    assert cmp.snapshot_counts["loaded"] == loaded + 1
    assert spy.reads == 0  # no trial re-read: the frame came from the snapshot
    assert spy.statistics == 0  # every CI and test remembered by the snapshot
    frame = cmp._CACHE[cmp._store_key(store, STUDY)]
    n = store.conn.execute("SELECT COUNT(*) FROM trials WHERE study = ?", [STUDY]).fetchone()[0]
    assert frame.n == n == 20 and frame.memo
    # the codes restored with the frame are those the frame would compute
    pair_codes, status_codes = frame.pair_codes().copy(), frame.status_codes()
    frame._pair_codes = frame._status_codes = None
    assert np.array_equal(pair_codes, frame.pair_codes())
    assert [c.tolist() for c in status_codes] == [c.tolist() for c in frame.status_codes()]

    fresh = _fresh(store, STUDY)  # use_cache=False: read and computed from scratch
    assert spy.bulk_reads >= 1 and spy.statistics > 0
    _assert_same_result(again, fresh)
    _assert_same_result(first, fresh)
    pd.testing.assert_frame_equal(again.curves, fresh.curves, check_exact=True)
    pd.testing.assert_frame_equal(again.layer_sigma, fresh.layer_sigma, check_exact=True)
    assert cmp.snapshot_counts["loaded"] == loaded + 1  # use_cache=False: the disk untouched


def _count_curve_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one each time the comparison reads learning curves."""
    reads: list[int] = []
    real = cmp._group_curves

    def counting(*args: Any, **kwargs: Any) -> Any:
        reads.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cmp, "_group_curves", counting)
    return reads


def test_a_new_process_gets_the_details_from_the_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _lab_store(tmp_path, n_pairs=10, epochs=3, pruned=1, failed=1)
    first = compare_study(store, STUDY, curve_trials=4)  # sampled curves: 4 of 10 per arm
    reads = _count_curve_reads(monkeypatch)
    cmp.clear_cache()  # a new process: the snapshot on disk
    again = compare_study(store, STUDY, curve_trials=4)
    assert reads == []  # the curves came with the snapshot, not from the metrics table
    pd.testing.assert_frame_equal(again.curves, first.curves, check_exact=True)
    pd.testing.assert_frame_equal(again.layer_sigma, first.layer_sigma, check_exact=True)
    assert any("random sample of 4 trials" in n for n in again.notes)
    assert len(first.curves) and len(first.layer_sigma)

    cmp.clear_cache()  # other details than the snapshot's: computed, then kept in turn
    other = compare_study(store, STUDY, curve_trials=200)
    assert len(reads) == 1 and not any("random sample" in n for n in other.notes)
    cmp.clear_cache()
    compare_study(store, STUDY, curve_trials=200)
    assert len(reads) == 1


def test_a_snapshot_with_malformed_details_recomputes_them(tmp_path: Path) -> None:
    store = _lab_store(tmp_path, n_pairs=6, epochs=3)
    first = compare_study(store, STUDY)
    path = _snapshot_file_of(store)
    with np.load(path) as npz:
        data = {k: npz[k] for k in npz.files}
    meta = json.loads(data["meta"].tobytes())
    meta["details"]["curves"]["data"] = meta["details"]["curves"]["data"][:-1]
    data["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **data)
    cmp.clear_cache()
    loaded = cmp.snapshot_counts["loaded"]
    again = compare_study(store, STUDY)
    assert cmp.snapshot_counts["loaded"] == loaded + 1  # the frame is still used
    pd.testing.assert_frame_equal(again.curves, first.curves, check_exact=True)


@pytest.mark.usefixtures("remember_small_rows")
def test_the_snapshot_is_refreshed_from_events_logged_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    evs = synthetic_study(STUDY, n_pairs=8, epochs=3)
    (outcome,) = [
        e for e in evs if e.name == "ml.trial.complete" and e.payload.trial_id == "trial_0000"
    ]
    store = TrialStore(tmp_path / "lab.db")
    store.append([e for e in evs if e is not outcome])  # trial_0000 still running
    cmp.clear_cache(store)
    before = compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    # a new pair, and the running trial ending pruned, logged after the snapshot
    store.append(_trial(900, False, {"test_accuracy": 0.5}, pair="late"))
    store.append(_trial(901, True, {"test_accuracy": 0.9}, pair="late"))
    pruned = outcome.payload.model_copy(update={"status": "pruned"})
    store.append([outcome.model_copy(update={"payload": pruned})])
    cmp.clear_cache()
    spy = _Spy(monkeypatch)
    loaded = cmp.snapshot_counts["loaded"]
    after = compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    assert cmp.snapshot_counts["loaded"] == loaded + 1
    assert spy.bulk_reads == 0 and spy.reads == 1  # only the trials with new events
    fresh = _fresh(store, metrics=["test_accuracy"], details=False)
    _assert_same_result(after, fresh)
    assert after.headline.loc[0, "n_pairs"] == before.headline.loc[0, "n_pairs"] + 1
    assert "late" in set(after.pairs["pair_id"]) and "pair_0000" not in set(after.pairs["pair_id"])
    assert any("1 pruned" in n for n in after.notes)
    # the refreshed frame was saved: the next process reads nothing from the store
    cmp.clear_cache()
    spy.reads = spy.statistics = 0
    again = compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    assert spy.reads == 0 and spy.statistics == 0
    _assert_same_result(again, fresh)


def test_refreshes_append_into_the_room_a_snapshot_keeps_after_its_columns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cmp, "_SPARE_ROWS", 3)  # room for 3 rows after each column
    store = _lab_store(tmp_path, n_pairs=8, epochs=3)
    compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    cmp.clear_cache()  # the next comparison loads the snapshot
    first = compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    frame = cmp._CACHE[cmp._store_key(store, STUDY)]
    column = frame.columns["test_accuracy"]
    n = len(column)
    assert len(frame.spare["col:test_accuracy"]) == n + 3
    before = column.copy()
    # a new pair: its two rows are written into the room, the rows before stay as they were
    store.append(_trial(900, False, {"test_accuracy": 0.5}, pair="late"))
    store.append(_trial(901, True, {"test_accuracy": 0.9}, pair="late"))
    second = compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    grown = frame.columns["test_accuracy"]
    assert len(grown) == n + 2 and np.shares_memory(grown, column)
    assert np.shares_memory(frame.sn, frame.spare["sn"])
    np.testing.assert_array_equal(grown[:n], before)
    np.testing.assert_array_equal(column, before)  # a view of the old rows reads the same
    assert list(grown[n:]) == [0.5, 0.9]
    assert np.shares_memory(frame.pair_codes(), frame.spare["pair_codes"])
    _assert_same_result(second, _fresh(store, metrics=["test_accuracy"], details=False))
    assert second.headline.loc[0, "n_pairs"] == first.headline.loc[0, "n_pairs"] + 1
    # the next pair does not fit: a new array, as before
    store.append(_trial(902, False, {"test_accuracy": 0.4}, pair="later"))
    store.append(_trial(903, True, {"test_accuracy": 0.8}, pair="later"))
    third = compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    assert len(frame.columns["test_accuracy"]) == n + 4
    assert not np.shares_memory(frame.columns["test_accuracy"], column)
    _assert_same_result(third, _fresh(store, metrics=["test_accuracy"], details=False))
    # saved again (with its room) and read by the next process: the same result
    cmp.clear_cache()
    _assert_same_result(
        compare_study(store, STUDY, metrics=["test_accuracy"], details=False), third
    )


def test_a_recreated_store_at_the_same_path_rejects_the_snapshot(tmp_path: Path) -> None:
    db = tmp_path / "lab.db"
    store = TrialStore(db)
    store.append(synthetic_study(STUDY, n_pairs=6, epochs=3, seed=1))
    cmp.clear_cache(store)
    compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    watermark = store.last_seq()
    store.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    store = TrialStore(db)  # the same path, the same number of events, other values
    store.append(synthetic_study(STUDY, n_pairs=6, epochs=3, seed=2))
    assert store.last_seq() == watermark
    cmp.clear_cache()
    rejected = cmp.snapshot_counts["rejected"]
    res = compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    assert cmp.snapshot_counts["rejected"] == rejected + 1
    _assert_same_result(res, _fresh(store, metrics=["test_accuracy"], details=False))
    # a store whose log is shorter than the snapshot's watermark: rejected too
    cmp.clear_cache()
    store.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    store = TrialStore(db)
    store.append(synthetic_study(STUDY, n_pairs=2, epochs=1, seed=3))
    res = compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    assert cmp.snapshot_counts["rejected"] == rejected + 2
    _assert_same_result(res, _fresh(store, metrics=["test_accuracy"], details=False))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "foreign npz"])
def test_a_corrupt_snapshot_is_ignored_and_rebuilt(tmp_path: Path, damage: str) -> None:
    store = _lab_store(tmp_path, n_pairs=6, epochs=3)
    compare_study(store, STUDY, details=False)
    path = _snapshot_file_of(store)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(bytes(range(256)) * 64)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        with path.open("wb") as f:
            np.savez(f, meta=np.frombuffer(b'{"format": 1}', dtype=np.uint8), sn=np.zeros(3))
    cmp.clear_cache()
    rejected, loaded = cmp.snapshot_counts["rejected"], cmp.snapshot_counts["loaded"]
    res = compare_study(store, STUDY, details=False)
    assert cmp.snapshot_counts["rejected"] == rejected + 1
    _assert_same_result(res, _fresh(store, details=False))
    cmp.clear_cache()  # rewritten by the rebuild: the next process loads it
    compare_study(store, STUDY, details=False)
    assert cmp.snapshot_counts["loaded"] == loaded + 1


def test_results_stay_equal_across_a_replay(tmp_path: Path) -> None:
    store = _lab_store(tmp_path, n_pairs=6, epochs=3, pruned=1)
    compare_study(store, STUDY, details=False)
    store.replay()
    cmp.clear_cache()
    res = compare_study(store, STUDY, details=False)
    _assert_same_result(res, _fresh(store, details=False))
    store.replay()  # in process, too
    _assert_same_result(compare_study(store, STUDY, details=False), _fresh(store, details=False))


@pytest.mark.parametrize("change", ["bulk insert", "newest deleted"])
def test_trials_changed_without_events_reject_the_snapshot(tmp_path: Path, change: str) -> None:
    """A heuristic guard (the study's highest trials rowid when no event was logged since):
    bulk-inserted trials and deleted newest ones, as the P7 benchmark's, are seen."""
    store = _lab_store(tmp_path, n_pairs=6, epochs=3)
    compare_study(store, STUDY, details=False)
    # trials written out of band (not through the event log)
    if change == "bulk insert":
        columns = ", ".join(c for c in store_columns(store) if c != "trial_id")
        store.conn.execute(
            f"INSERT INTO trials (trial_id, {columns}) SELECT 'bulk', {columns} FROM trials "
            "WHERE trial_id = 'trial_0001'"
        )
    else:
        store.conn.execute("DELETE FROM trials WHERE rowid = (SELECT MAX(rowid) FROM trials)")
    cmp.clear_cache()
    rejected = cmp.snapshot_counts["rejected"]
    res = compare_study(store, STUDY, details=False)
    assert cmp.snapshot_counts["rejected"] == rejected + 1
    _assert_same_result(res, _fresh(store, details=False))


def store_columns(store: TrialStore) -> list[str]:
    return [r[1] for r in store.conn.execute("PRAGMA table_info(trials)")]


def test_an_unwritable_cache_folder_only_costs_the_snapshot(tmp_path: Path) -> None:
    store = TrialStore(tmp_path / "lab.db")
    store.append(synthetic_study(STUDY, n_pairs=6, epochs=3))
    (tmp_path / "cache").write_text("a file where the cache folder would go")
    cmp.clear_cache()
    unwritten = cmp.snapshot_counts["unwritten"]
    res = compare_study(store, STUDY, details=False)
    assert cmp.snapshot_counts["unwritten"] == unwritten + 1
    compare_study(store, STUDY, details=False)  # unchanged: not attempted again
    assert cmp.snapshot_counts["unwritten"] == unwritten + 1
    _assert_same_result(res, _fresh(store, details=False))
    cmp.clear_cache()
    _assert_same_result(compare_study(store, STUDY, details=False), _fresh(store, details=False))
    cmp.clear_cache(store)  # nothing to delete: no error either
    assert not list(tmp_path.glob("**/*.npz")) and not list(tmp_path.glob("**/*.tmp"))


def test_use_cache_false_neither_reads_nor_writes_the_snapshot(tmp_path: Path) -> None:
    store = _lab_store(tmp_path, n_pairs=6, epochs=3)
    _fresh(store, details=False)
    path = _snapshot_file_of(store)
    assert not path.exists()
    compare_study(store, STUDY, details=False)
    assert path.exists()
    counts = dict(cmp.snapshot_counts)
    path.write_bytes(b"not read")
    _fresh(store, details=False)
    assert cmp.snapshot_counts == counts and path.read_bytes() == b"not read"
    cmp.clear_cache(store, study=STUDY)
    assert not path.exists()
    mem = TrialStore(":memory:")
    mem.append(synthetic_study(STUDY, n_pairs=3, epochs=2))
    assert cmp._snapshot_path(mem, STUDY) is None
    compare_study(mem, STUDY, details=False)
    assert cmp.snapshot_counts == counts


def test_snapshot_files_are_npz_whose_arrays_are_mapped_in_place(tmp_path: Path) -> None:
    arrays = {
        "floats": np.array([0.5, np.nan, -np.inf, 1e300]),
        "codes": np.arange(7, dtype=np.int32),
        "text": np.frombuffer("a\0é".encode(), dtype=np.uint8),
        "empty": np.zeros(0),
        "grid": np.arange(6.0).reshape(2, 3),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "scalar": np.array(2.5),
    }
    path = tmp_path / "a.npz"
    with path.open("wb") as f:
        cmp._write_npz(f, arrays)
    on_disk = path.read_bytes()
    for read in (cmp._np_load(path), cmp._read_npz(path)):  # np.load reads it as well
        assert sorted(read) == sorted(arrays)
        for name, arr in arrays.items():
            assert read[name].dtype == arr.dtype and read[name].shape == arr.shape
            np.testing.assert_array_equal(read[name], arr)
    mapped = cmp._read_npz(path)
    for name in ("floats", "codes", "text", "grid"):  # views of the file's map, aligned
        assert not mapped[name].flags.owndata and mapped[name].ctypes.data % 64 == 0
    assert all(a.flags.writeable for a in mapped.values())
    mapped["floats"][0] = 42.0  # a refresh patches in place: the file stays as it was
    assert path.read_bytes() == on_disk and cmp._read_npz(path)["floats"][0] == 0.5

    for save in (np.savez, np.savez_compressed):  # unaligned members copied; deflated: np.load
        other = tmp_path / f"{save.__name__}.npz"
        with other.open("wb") as f:
            save(f, **arrays)
        read = cmp._read_npz(other)
        for name, arr in arrays.items():
            np.testing.assert_array_equal(read[name], arr)
            assert read[name].flags.aligned


@pytest.mark.usefixtures("remember_small_rows")
def test_a_loaded_snapshot_decodes_trial_and_pair_ids_only_when_they_are_read(
    tmp_path: Path,
) -> None:
    store = _lab_store(tmp_path, n_pairs=8, epochs=3, pruned=1)
    compare_study(store, STUDY, details=False)
    cmp.clear_cache()
    loaded = compare_study(store, STUDY, details=False)
    frame = cmp._CACHE[cmp._store_key(store, STUDY)]
    assert set(frame.deferred) == {"trial", "pair"} and "trial" not in vars(frame)
    fresh = _fresh(store, details=False)
    _assert_same_result(loaded, fresh)  # its ids decoded for the result's tables only
    assert set(frame.deferred) == {"trial", "pair"}

    # saved again with its ids never decoded: they are copied as the snapshot held them
    compare_study(store, STUDY, confidence=0.9, details=False)  # new statistic rows to keep
    assert set(frame.deferred) == {"trial", "pair"}
    saved = cmp.snapshot_counts["saved"]
    cmp.clear_cache()
    assert cmp.snapshot_counts["saved"] == saved + 1
    again = compare_study(store, STUDY, confidence=0.9, details=False)
    frame = cmp._CACHE[cmp._store_key(store, STUDY)]
    assert set(frame.deferred) == {"trial", "pair"}
    _assert_same_result(again, _fresh(store, confidence=0.9, details=False))

    # a refresh that only appends (a new pair; a twin for the pruned trial of pair_0007), of
    # trials reporting what the others do: the ids stay encoded, the new rows' beside them
    (text,) = store.conn.execute(
        "SELECT metrics FROM trials WHERE study = ? AND status = 'completed'", [STUDY]
    ).fetchone()
    reported = json.loads(text)
    store.append(_trial(900, False, reported, pair="late"))
    compare_study(store, STUDY, confidence=0.9, details=False)
    store.append(_trial(901, True, {**reported, "val_accuracy": 0.9}, pair="late"))
    store.append(_trial(902, False, {**reported, "val_accuracy": 0.7}, pair="pair_0007"))
    appended = compare_study(store, STUDY, confidence=0.9, details=False)
    assert set(frame.deferred) == {"trial", "pair"} and len(frame.deferred["pair"].tail) == 3
    _assert_same_result(appended, _fresh(store, confidence=0.9, details=False))
    assert "late" in set(appended.pairs["pair_id"])

    unread = compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    before = _fresh(store, metrics=["test_accuracy"], details=False)
    # a refresh that patches a trial's pair id in place, and appends a pair
    store.append(_trial(0, False, {"test_accuracy": 0.1}, pair="moved"))
    store.append(_trial(903, False, {"test_accuracy": 0.5}, pair="later"))
    store.append(_trial(904, True, {"test_accuracy": 0.9}, pair="later"))
    after = compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    assert "pair" not in frame.deferred  # decoded to be changed
    assert frame.pair[0] == "moved" and frame.trial[0] == "trial_0000"
    _assert_same_result(after, _fresh(store, metrics=["test_accuracy"], details=False))
    _assert_same_result(unread, before)  # the older result still shows what it compared
    cmp.clear_cache()  # saved with its ids encoded again
    again = compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    assert cmp._CACHE[cmp._store_key(store, STUDY)].saved == (0, store.last_seq())  # loaded
    _assert_same_result(again, _fresh(store, metrics=["test_accuracy"], details=False))


def test_ids_kept_encoded_are_found_by_their_crc_even_when_crcs_collide() -> None:
    ids = np.array(["t1", "t2", "é3", "t1", "", "t22"], dtype=object)
    arrays: dict[str, np.ndarray] = {}
    how = cmp._encode_objects("trial", ids, arrays)
    encoded = cmp._Encoded("trial", how, arrays, len(ids))
    assert how == {"kind": "joined", "index": "crc32"} and encoded.check()
    for value, rows in (("t1", [0, 3]), ("é3", [2]), ("", [4]), ("t2", [1]), ("t", []), (3, [])):
        assert encoded.rows_of(value).tolist() == rows
    tail = encoded.extended(np.array(["t9", "t1"], dtype=object))
    assert tail.rows_of("t1").tolist() == [0, 3, 7] and tail.rows_of("t9").tolist() == [6]
    assert tail.take(np.array([7, 2, 0])).tolist() == ["t1", "é3", "t1"]
    assert tail.decode().tolist() == [*ids.tolist(), "t9", "t1"]
    # two ids with one CRC (a known CRC-32 collision): each is compared, not taken on its CRC
    assert zlib.crc32(b"plumless") == zlib.crc32(b"buckeroo")
    ids = np.array(["plumless", "x", "buckeroo", "plumless"], dtype=object)
    arrays = {}
    collided = cmp._Encoded("trial", cmp._encode_objects("trial", ids, arrays), arrays, len(ids))
    assert collided.check()
    assert collided.rows_of("buckeroo").tolist() == [2]
    assert collided.rows_of("plumless").tolist() == [0, 3]


@pytest.mark.parametrize("damage", ["count", "codes", "utf-8", "nul", "order", "crc"])
def test_a_snapshot_with_damaged_ids_is_rejected_when_loaded(tmp_path: Path, damage: str) -> None:
    """Ids a snapshot leaves encoded are checked when it is loaded: a later decode of them
    cannot fail in the middle of a comparison. A damaged lookup of them (their CRCs) only
    has them decoded at once."""
    store = _lab_store(tmp_path, n_pairs=6, epochs=3)
    compare_study(store, STUDY, details=False)
    path = _snapshot_file_of(store)
    data = cmp._np_load(path)
    meta = json.loads(data["meta"].tobytes())
    joined = {"text": "joined", "index": "crc32"}
    assert meta["objects"]["pair"] == {"kind": "first", "count": 6, **joined}
    assert meta["objects"]["trial"] == {"kind": "joined", "index": "crc32"}
    if damage == "count":
        meta["objects"]["pair"]["count"] = 7
    elif damage == "codes":
        data["pair.codes"] = data["pair.codes"].copy()
        data["pair.codes"][3] = 6
    elif damage == "utf-8":
        data["trial.text"] = np.concatenate([data["trial.text"][:-1], [0xFF]]).astype(np.uint8)
    elif damage == "nul":
        data["trial.text"] = np.concatenate([data["trial.text"], [0, 65]]).astype(np.uint8)
    elif damage == "order":
        data["trial.order"] = data["trial.order"] + 1
    else:
        data["pair.crc"] = data["pair.crc"][::-1].copy()
    data["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with path.open("wb") as f:
        cmp._write_npz(f, data)
    cmp.clear_cache()
    rejected = cmp.snapshot_counts["rejected"]
    res = compare_study(store, STUDY, details=False)
    if damage in ("order", "crc"):  # only their lookup: loaded, those ids decoded at once
        assert cmp.snapshot_counts["rejected"] == rejected
        deferred = set(cmp._CACHE[cmp._store_key(store, STUDY)].deferred)
        assert deferred == ({"pair"} if damage == "order" else {"trial"})
    else:
        assert cmp.snapshot_counts["rejected"] == rejected + 1
    _assert_same_result(res, _fresh(store, details=False))


def test_pair_ids_of_mixed_types_round_trip(tmp_path: Path) -> None:
    values = np.empty(9, dtype=object)
    values[:] = [3, "3", None, 1, 1.0, 2**40, "é/ü", 2.5, "3"]
    arrays: dict[str, np.ndarray] = {}
    how = cmp._encode_objects("pair", values, arrays)
    decoded, codes = cmp._decode_objects("pair", how, arrays, len(values))
    assert decoded.tolist() == values.tolist() and codes is None
    assert [type(v) for v in decoded] == [type(v) for v in values]
    for plain in (["b", None, "a", "b", None], ["x", "y", "z"]):  # codes: the frame's own
        values = np.array(plain, dtype=object)
        frame = cmp._Frame(
            run=values,
            trial=values,
            status=np.array([v or "none" for v in plain], dtype=object),
            sn=np.zeros(len(values)),
            coeff=np.zeros(len(values)),
            pair=values,
            columns={},
            keys=set(),
            watermark=0,
        )
        for name, expected in (("pair", frame.pair_codes()), ("status", frame.status_codes()[1])):
            column = getattr(frame, name)
            how = cmp._encode_objects(name, column, arrays, cmp._known_codes(frame, name))
            decoded, codes = cmp._decode_objects(name, how, arrays, len(values))
            assert decoded.tolist() == column.tolist()
            assert codes is not None and codes.tolist() == expected.tolist()

    store = TrialStore(tmp_path / "lab.db")
    ids: list[Any] = [3, "3", "a", 7, 2.5, None, "b"]  # 3 and "3" pair (pair codes are str)
    for i, pair_id in enumerate(ids):
        for sn in (True, False):
            append_trial(store, f"t{i}_{int(sn)}", pair_id, sn, {"acc": 0.5 + 0.01 * i + 0.02 * sn})
    cmp.clear_cache(store)
    first = compare_study(store, "ab", metrics=["acc"], details=False)
    cmp.clear_cache()
    again = compare_study(store, "ab", metrics=["acc"], details=False)
    assert cmp._CACHE[cmp._store_key(store, "ab")].saved == (0, store.last_seq())  # loaded
    fresh = _fresh(store, "ab", metrics=["acc"], details=False)
    _assert_same_result(again, fresh)
    _assert_same_result(first, fresh)
    assert {type(v) for v in again.trials["pair_id"]} == {int, str, float, type(None)}


@pytest.mark.usefixtures("remember_small_rows")
def test_a_live_study_does_not_rewrite_its_snapshot_on_every_comparison(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _lab_store(tmp_path, n_pairs=6, epochs=3)
    saved = cmp.snapshot_counts["saved"]
    compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    assert cmp.snapshot_counts["saved"] == saved + 1  # a read from scratch: saved at once
    for k in range(3):  # new pairs while the study runs: compared, not written each time
        store.append(_trial(700 + 2 * k, False, {"test_accuracy": 0.5}, pair=f"live{k}"))
        store.append(_trial(701 + 2 * k, True, {"test_accuracy": 0.8}, pair=f"live{k}"))
        res = compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
        assert res.headline.loc[0, "n_pairs"] == 7 + k
    assert cmp.snapshot_counts["saved"] == saved + 1
    # forgetting the study (as a process exit does) writes what changed, once
    cmp.clear_cache()
    assert cmp.snapshot_counts["saved"] == saved + 2
    spy = _Spy(monkeypatch)
    again = compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    assert spy.reads == 0 and spy.statistics == 0 and again.headline.loc[0, "n_pairs"] == 9
    # a snapshot older than a minute is rewritten by the next changed comparison
    store.append(_trial(800, False, {"test_accuracy": 0.4}, pair="late"))
    store.append(_trial(801, True, {"test_accuracy": 0.9}, pair="late"))
    clock = cmp.time.monotonic() + 61
    monkeypatch.setattr(cmp.time, "monotonic", lambda: clock)
    compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    assert cmp.snapshot_counts["saved"] == saved + 3
    # a pending save for a store closed before exit is dropped quietly
    store.append(_trial(802, False, {"test_accuracy": 0.4}, pair="last"))
    compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    store.close()
    assert cmp.flush_snapshots() == 0


@pytest.mark.parametrize("seed", range(6))
def test_pair_means_by_gather_equal_the_sums_bit_for_bit(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_pairs = 300
    codes = np.repeat(np.arange(n_pairs), 2)
    is_sn = np.tile([True, False], n_pairs)
    values = rng.choice([0.25, 0.5, -0.0, 0.0, 1 / 3, np.nan], size=len(codes))
    drop = rng.random(len(codes)) < 0.1  # some pairs lack an arm, some trials a pair id
    codes[drop & (rng.random(len(codes)) < 0.5)] = -1
    is_none = ~is_sn & ~drop
    frame = cmp._Frame(
        run=np.array(["r"] * len(codes), dtype=object),
        trial=np.array([f"t{i}" for i in range(len(codes))], dtype=object),
        status=np.array(["completed"] * len(codes), dtype=object),
        sn=np.where(is_sn, 1.0, np.where(is_none, 0.0, np.nan)),
        coeff=np.full(len(codes), np.nan),
        pair=np.array([None if c < 0 else f"p{c}" for c in codes], dtype=object),
        columns={"m": values},
        keys={"m"},
        watermark=0,
    )
    arms = cmp._arms(frame, ["completed"])
    rows = arms.pair_rows
    assert rows is not None
    pc = frame.pair_codes()
    gathered = cmp._paired_diffs(values, pc, arms.is_sn, arms.is_none, rows)
    summed = cmp._paired_diffs(values, pc, arms.is_sn, arms.is_none)
    for a, b in zip(gathered, summed, strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()  # -0.0 and NaN alike
    # a pair with two SN trials: no gather, the sums
    frame.pair[2] = frame.pair[0]
    frame._pair_codes = None
    frame.derived.clear()
    assert cmp._arms(frame, ["completed"]).pair_rows is None


def _codes_recomputed(frame: cmp._Frame) -> tuple[list[int], list[str], list[int]]:
    pair_codes, status_codes = frame._pair_codes, frame._status_codes
    frame._pair_codes = frame._status_codes = None
    try:
        names, codes = frame.status_codes()
        return frame.pair_codes().tolist(), names.tolist(), codes.tolist()
    finally:
        frame._pair_codes, frame._status_codes = pair_codes, status_codes


def test_a_refresh_of_many_changed_trials_finds_them_without_indexing_every_trial(
    tmp_path: Path,
) -> None:
    """More changed trials than a scan is for: the rows are found in one vectorised pass
    (no dict of every trial of the study), patched where they exist and appended where
    not, and the comparison equals one computed from scratch."""
    store = TrialStore(tmp_path / "lab.db")
    store.append(synthetic_study(STUDY, n_pairs=12, epochs=2))
    cmp.clear_cache()
    compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    frame = cmp._CACHE[cmp._store_key(store, STUDY)]
    trials = store.trials(study=STUDY)
    redone = []
    for k, rec in enumerate(trials.head(cmp._SCAN_ROWS + 2).itertuples()):
        redone += _trial(
            int(str(rec.trial_id).rsplit("_", 1)[1]),
            bool(rec.spectral_norm),
            {"test_accuracy": 0.3 + k / 100},
            pair=json.loads(rec.parameters)["pair_id"]
            if isinstance(rec.parameters, str)
            else rec.parameters["pair_id"],
        )
    redone += _trial(900, True, {"test_accuracy": 0.9}, pair="new")
    redone += _trial(901, False, {"test_accuracy": 0.8}, pair="new")
    before = frame.n
    store.append(redone)
    res = compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    assert cmp._CACHE[cmp._store_key(store, STUDY)] is frame and frame._index is None
    assert frame.n == before + 2
    fresh = compare_study(store, STUDY, metrics=["test_accuracy"], details=False, use_cache=False)
    pd.testing.assert_frame_equal(res.headline, fresh.headline)
    pd.testing.assert_frame_equal(res.trials, fresh.trials)


def test_codes_kept_through_refreshes_equal_recomputed_ones(tmp_path: Path) -> None:
    """A live study's new trials extend the frame's pair and status codes instead of a
    recount of every trial; a change that would renumber them (a trial moving to another
    pair, a status no trial had) recounts. Either way the codes and the comparison are
    those computed from scratch."""
    store = TrialStore(tmp_path / "lab.db")
    store.append(synthetic_study(STUDY, n_pairs=6, epochs=2))
    cmp.clear_cache()
    compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    frame = cmp._CACHE[cmp._store_key(store, STUDY)]
    start = events.trial_start(
        model_run_id=STUDY,
        trial_id="trial_0800",
        study=STUDY,
        spectral_norm=True,
        parameters={"pair_id": "late", "spectral_norm": True},
    )
    # (what arrives, pair codes extended, status codes extended)
    steps: list[tuple[str, list[Any], bool, bool]] = [
        ("a running trial with a new pair id", [start], True, False),  # a new status
        (
            "it completes; its partner arrives",
            _trial(800, True, {"test_accuracy": 0.9}, pair="late")
            + _trial(801, False, {"test_accuracy": 0.7}, pair="late"),
            True,
            False,
        ),  # none running
        (
            "a trial without a pair id, and one of an old pair",
            _trial(802, True, {"test_accuracy": 0.8})
            + _trial(803, True, {"test_accuracy": 0.6}, pair="late"),
            True,
            True,
        ),
        (
            "ten trials at once (ids found in one vectorised pass, not scanned one by one)",
            [
                ev
                for k in range(10)
                for ev in _trial(
                    810 + k,
                    k % 2 == 0,
                    {"test_accuracy": 0.5 + k / 50},
                    pair=f"batch{k // 2}" if k < 8 else "late",
                )
            ],
            True,
            True,
        ),
        (
            "a trial moves to another pair",
            _trial(802, True, {"test_accuracy": 0.8}, pair="moved"),
            False,
            True,
        ),
        (
            "a status no trial had",
            _trial(804, False, {"test_accuracy": 0.5}, pair="moved", status="pruned"),
            True,
            False,
        ),
    ]
    for label, evs, pairs_kept, statuses_kept in steps:
        names_before = frame.status_codes()[0]
        store.append(evs)
        res = compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
        assert cmp._CACHE[cmp._store_key(store, STUDY)] is frame, label  # refreshed in place
        extended = frame._pair_extended is not None and frame._pair_extended is frame._pair_codes
        assert extended is pairs_kept, label
        assert (frame.status_codes()[0] is names_before) is statuses_kept, label
        names, codes = frame.status_codes()
        assert (frame.pair_codes().tolist(), names.tolist(), codes.tolist()) == _codes_recomputed(
            frame
        ), label
        _assert_same_result(res, _fresh(store, metrics=["test_accuracy"], details=False))
    assert "pruned" in frame.status_codes()[0].tolist()


@pytest.mark.usefixtures("remember_small_rows")
def test_the_adjustment_is_made_over_rows_read_from_a_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _family_store(tmp_path / "lab.db")
    cmp.clear_cache(store)
    first = compare_study(store, STUDY, metrics=FAMILY, details=False)
    assert _snapshot_file_of(store).exists()
    # the snapshot keeps each metric's row as compare_arrays made it (no p_holm, the
    # verdict on its own p): a row does not depend on the metrics it was compared beside
    frame = cmp._CACHE[cmp._store_key(store, STUDY)]
    kept = {row["metric"]: row for row in frame.memo.values()}
    assert set(kept) == set(FAMILY) and not any("p_holm" in row for row in kept.values())
    assert kept["acc_b"]["favours"] == "SN"

    cmp.clear_cache()  # a new process: its rows come from the snapshot
    spy = _Spy(monkeypatch)
    loaded = cmp.snapshot_counts["loaded"]
    again = compare_study(store, STUDY, metrics=FAMILY, details=False)
    assert cmp.snapshot_counts["loaded"] == loaded + 1 and spy.statistics == 0
    assert again.headline.set_index("metric")["p_holm"].tolist()[:3] == pytest.approx(
        [6 / 256, 20 / 256, 20 / 256]
    )
    assert again.headline["favours"].tolist() == ["SN", "—", "—", "n/a"]
    _assert_same_result(again, first)
    _assert_same_result(again, _fresh(store, metrics=FAMILY, details=False))


# ---------------------------------------------------------------------------------------------
# Awkward studies: extreme, non-finite and missing values, one arm, typos, report folders
# ---------------------------------------------------------------------------------------------

_SN8 = np.array([1.04, 1.2, 1.1, 1.3, 1.05, 1.15, 1.25, 1.12])
_NONE8 = np.array([1.0, 0.9, 0.95, 1.02, 0.97, 1.01, 0.99, 0.93])


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("scale", [1e-300, 1e-170, 1e200, 1e300])
def test_statistics_do_not_depend_on_the_unit_of_the_values(paired: bool, scale: float) -> None:
    # Welch's variance of values ~1e-170 underflowed (p = 0: "favours SN" from nothing),
    # of values ~1e200 overflowed; the rank test's rounding of differences ~1e-300 did
    ref = compare_arrays("x", _SN8, _NONE8, paired=paired)
    got = compare_arrays("x", _SN8 * scale, _NONE8 * scale, paired=paired)
    assert 0 < ref["p_value"] < 1
    assert got["p_value"] == pytest.approx(ref["p_value"], rel=1e-9)
    assert got["statistic"] == pytest.approx(ref["statistic"], rel=1e-9)
    assert got["favours"] == ref["favours"] and got["test_method"] == ref["test_method"]
    for key in ("diff", "ci_low", "ci_high", "mean_sn", "mean_none"):
        assert got[key] == pytest.approx(ref[key] * scale, rel=1e-9, abs=0), key
    assert got["note"] == ""


@pytest.mark.filterwarnings("error")
def test_values_near_the_float_limit_give_means_and_say_when_a_difference_overflows() -> None:
    sn = np.array([1.0, 1.2, 1.1, 1.3, 1.25, 1.15]) * 1e308
    none = np.array([0.9, 1.0, 0.95, 1.05, 0.92, 0.99]) * 1e308
    row = compare_arrays("x", sn, none, paired=False)  # their sums overflow, not their means
    assert row["mean_sn"] == pytest.approx(7.0 / 6 * 1e308, rel=1e-12)
    assert row["diff"] == pytest.approx((7.0 - 5.81) * 1e308 / 6, rel=1e-12)
    assert row["ci_low"] < row["diff"] < row["ci_high"] and 0 < row["p_value"] < 1
    # SN − none itself is beyond the float64 range: no estimate, no CI, no verdict, said so
    big = compare_arrays("x", sn * 1.3, -none * 1.5, paired=True)
    assert np.isnan(big["diff"]) and np.isnan(big["ci_low"]) and np.isnan(big["ci_high"])
    assert big["p_value"] == pytest.approx(1 / 32)  # the rank test needs no sum
    assert big["favours"] == "n/a" and "beyond the float64 range" in big["note"]
    assert np.isfinite(big["mean_sn"]) and np.isfinite(big["mean_none"])
    shown = cmp._headline_display(pd.DataFrame([{**big, "source": "x"}]))
    assert shown.loc[0, "95% CI"] == "n/a" and shown.loc[0, "favours"] == "n/a"


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("paired", [True, False])
def test_non_finite_values_are_left_out_and_counted(paired: bool) -> None:
    sn, none = _SN8.copy(), _NONE8.copy()
    sn[1], none[4] = np.nan, np.inf
    row = compare_arrays("x", sn, none, paired=paired)
    if paired:  # the pairs 1 and 4 are left out
        keep = np.isfinite(sn) & np.isfinite(none)
        clean = compare_arrays("x", sn[keep], none[keep], paired=True)
        assert row["n_pairs"] == 6
    else:
        clean = compare_arrays("x", sn[np.isfinite(sn)], none[np.isfinite(none)], paired=False)
        assert (row["n_sn"], row["n_none"]) == (7, 7)
    for key in ("diff", "ci_low", "ci_high", "p_value", "mean_sn", "mean_none", "favours"):
        assert row[key] == clean[key], key
    assert "2 non-finite values (NaN or ±inf) left out" in row["note"]
    est, lo, hi, b = bootstrap_mean_ci([0.1, np.inf, 0.3])  # no mean to speak of
    assert np.isnan([est, lo, hi]).all() and b == 0


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("paired", [True, False])
def test_an_infinite_value_in_the_store_is_left_out_with_a_note(
    paired: bool, tmp_path: Path
) -> None:
    # written out of band (the event log refuses them): JSON 1e999 reads back as inf
    store = TrialStore(":memory:")
    evs = []
    for i in range(6):
        pair = f"p{i}" if paired else None
        evs += _trial(2 * i, False, {"acc": 0.8 + 0.01 * i}, pair=pair)
        evs += _trial(2 * i + 1, True, {"acc": 0.82 + 0.012 * i}, pair=pair)
    store.append(evs)
    store.conn.execute(
        "UPDATE trials SET metrics = json_set(metrics, '$.acc', json('1e999')) "
        "WHERE trial_id = 'trial_0003'"
    )
    res = compare_study(store, STUDY, metrics=["acc"], use_cache=False)
    row = res.headline.iloc[0]
    if paired:
        assert row["n_pairs"] == 5
    else:
        assert (row["n_sn"], row["n_none"]) == (5, 6)
    assert np.isfinite([row["diff"], row["ci_low"], row["ci_high"], row["p_value"]]).all()
    assert any(n.startswith("acc: 1 non-finite value (±inf) left out") for n in res.notes)
    text = write_report(res, tmp_path / "r").read_text()
    assert "1 non-finite value" in text and "1 non-finite value" in res.to_html()


def _study_store(*trials: list[Any]) -> TrialStore:
    store = TrialStore(":memory:")
    store.append([e for t in trials for e in t])
    return store


def test_an_unknown_study_is_refused_with_the_closest_names() -> None:
    store = _study_store(
        *(_trial(i, i % 2 == 0, {"acc": 0.8}, study=f"zz-{i:02d}") for i in range(30))
    )
    store.append(_trial(0, True, {"acc": 0.8}, study="cli/ab"))
    with pytest.raises(StudyError, match=r"did you mean 'cli/ab'\?") as err:
        compare_study(store, "cli/AB")
    assert "and 11 more" in str(err.value)  # 31 studies: 20 named, the rest counted
    with pytest.raises(StudyError, match=r"did you mean 'zz-07'"):
        compare_study(store, "zz_07")
    with pytest.raises(StudyError, match=r"'complete' is no trial status \(did you mean 'comp"):
        compare_study(store, "cli/ab", statuses=["complete"])
    with pytest.raises(StudyError, match=r"no failed trial .*\(trials by status: completed 1\)"):
        compare_study(store, "cli/ab", statuses=["failed"])


@pytest.mark.parametrize(
    ("option", "value"),
    [
        # confidence 0 gave a CI that missed its own estimate and a verdict for every metric
        ("confidence", 0.0),
        ("confidence", -0.5),
        ("confidence", 1.0),
        ("confidence", 95),
        ("confidence", math.nan),
        ("confidence", "0.9"),
        ("confidence", True),
        ("seed", -1),  # numpy's SeedSequence refused it with its own ValueError
        ("seed", 1.5),
        ("seed", "a"),
        ("n_boot", 0),
        ("n_boot", -5),
        ("n_boot", 199),
        ("n_boot", 1.5),
        ("n_boot", "200"),
        ("max_draws", 0),
        ("max_draws", -1),
        ("curve_trials", -1),
        ("curve_trials", 0),
        ("paired", "no"),  # ran the paired design
        ("statuses", ()),
        ("statuses", ["done"]),
        ("statuses", [None]),
        ("statuses", 5),
    ],
)
def test_an_argument_out_of_range_is_refused_by_name(
    synthetic_store: TrialStore, option: str, value: Any
) -> None:
    with pytest.raises(StudyError, match=rf"^{option}: "):
        compare_study(synthetic_store, STUDY, details=False, **{option: value})


_X = [0.1, 0.2, 0.3, 0.25]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: bootstrap_mean_ci(_X, confidence=1.5), "^confidence: "),  # numpy's ValueError
        (lambda: bootstrap_mean_ci(_X, n_boot=0), "^n_boot: "),  # an IndexError
        (lambda: bootstrap_mean_ci(_X, seed=-1), "^seed: "),
        (lambda: bootstrap_mean_ci(_X, method="bogus"), "^method: "),  # was run as "auto"
        (lambda: bootstrap_mean_ci(_X, max_draws=0), "^max_draws: "),  # was 200 resamples
        (lambda: bootstrap_mean_ci(["a", "b"]), "^x: a 1-D sequence of numbers"),
        (lambda: bootstrap_mean_ci(None), "^x: a 1-D sequence of numbers"),
        (lambda: bootstrap_mean_ci(np.zeros((3, 2))), r"^x: .*shape \(3, 2\)"),
        (lambda: bootstrap_mean_ci(_X, ["a"]), "^y: "),
        (lambda: compare_arrays("acc", _X, _X, paired=True), None),  # lists: fine
        (lambda: compare_arrays("acc", _X, _X[:3], paired=True), "^paired: sn and none must"),
        (lambda: compare_arrays(None, _X, _X, paired=True), "^metric: "),  # type: ignore[arg-type]
        (lambda: compare_arrays("acc", _X, _X, paired=False, confidence=0), "^confidence: "),
        (lambda: higher_is_better(None), "^metric: "),  # type: ignore[arg-type]
        (lambda: format_headline(None), "^headline: "),  # type: ignore[arg-type]
        (lambda: format_headline(pd.DataFrame()), "^headline: "),  # a KeyError 'diff'
        (lambda: report_folder(None), "^study: "),  # type: ignore[arg-type]
    ],
)
def test_the_public_statistics_refuse_bad_arguments_by_name(
    call: Callable[[], Any], message: str | None
) -> None:
    if message is None:
        call()
        return
    with pytest.raises(StudyError, match=message):
        call()


def test_format_headline_refuses_a_confidence_it_would_print_as_200_percent(
    synthetic_store: TrialStore,
) -> None:
    res = compare_study(synthetic_store, STUDY, details=False, n_boot=200)
    assert "95% CI" in format_headline(res.headline)
    for confidence in (2, math.nan, 0):
        with pytest.raises(StudyError, match=r"^confidence: "):
            format_headline(res.headline, confidence=confidence)


def test_write_report_refuses_what_is_no_result_or_folder(
    synthetic_store: TrialStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # write_report(res, "") wrote report.md and the figures into the current folder (and
    # deleted stale figures there); report_folder("") was "" (the reports folder itself)
    res = compare_study(synthetic_store, STUDY, details=False, n_boot=200)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^out_dir: a folder path"):
        write_report(res, "")
    with pytest.raises(StudyError, match=r"^res: a comparison"):
        write_report(res.headline, tmp_path / "r")  # type: ignore[arg-type]
    with pytest.raises(StudyError, match=r"^mlflow_links: "):
        write_report(res, tmp_path / "r", mlflow_links=[1, 2])  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
    assert report_folder("").startswith("study-")


def test_the_study_must_be_named_by_text_or_an_integer(synthetic_store: TrialStore) -> None:
    for study in (None, 5.0, True, ["a"]):
        with pytest.raises(StudyError, match=r"^study: a study's name \(text"):
            compare_study(synthetic_store, study, details=False)  # type: ignore[arg-type]
    # papermill makes -p study_name 2024 the int 2024: the study "2024"
    store = _study_store(
        *(_trial(i, i % 2 == 0, {"val_accuracy": 0.8 + i / 100}, study="2024") for i in range(8))
    )
    res = compare_study(store, 2024, details=False)  # type: ignore[arg-type]
    assert res.study == "2024" and res.headline["n_sn"].sum() == 4


def test_statuses_read_as_metrics_are_one_name_or_a_comma_separated_string(
    synthetic_store: TrialStore,
) -> None:
    # "completed" was read letter by letter: "no c/o/m/p/l/e/t/e/d trial"
    ref = compare_study(synthetic_store, STUDY, details=False, n_boot=200)
    for statuses in ("completed", " completed ", ["completed"], "completed,completed"):
        got = compare_study(synthetic_store, STUDY, details=False, n_boot=200, statuses=statuses)
        pd.testing.assert_frame_equal(got.headline, ref.headline)
    both = compare_study(
        synthetic_store, STUDY, details=False, n_boot=200, statuses="completed, failed"
    )
    listed = compare_study(
        synthetic_store, STUDY, details=False, n_boot=200, statuses=["completed", "failed"]
    )
    pd.testing.assert_frame_equal(both.headline, listed.headline)


def test_a_misspelled_metric_gets_the_closest_names(synthetic_store: TrialStore) -> None:
    with pytest.raises(StudyError, match=r"did you mean 'val_accuracy'\?") as err:
        compare_study(synthetic_store, STUDY, metrics=["val_acuracy"], details=False)
    assert "test_accuracy" in str(err.value)  # what the study reports
    # beside valid names too: a misspelling must not drop a test from Holm's family
    with pytest.raises(StudyError) as err:
        compare_study(
            synthetic_store,
            STUDY,
            metrics=["val_accuracy", "test_acurracy", "test_ecce"],
            details=False,
        )
    assert str(err.value).startswith(
        f"study {STUDY!r}: no trial reports the metrics 'test_acurracy' and 'test_ecce', and "
        "no known metric has those names (did you mean 'test_accuracy' for 'test_acurracy'; "
        "'test_ece' for 'test_ecce'?); the study reports: test_accuracy, test_ece, epochs, "
    )
    # best_/final_ variants resolve as before; a layer's σ is matched by name
    res = compare_study(synthetic_store, STUDY, metrics=["best_val_accuracy"], details=False)
    assert res.headline["metric"].tolist() == ["best_val_accuracy"]
    with pytest.raises(StudyError, match=r"did you mean 'sigma/net.2'"):
        compare_study(synthetic_store, STUDY, metrics=["sigma/net.2", "sigma/net2"])


def test_a_metric_named_by_its_start_gets_the_names_it_begins_listed_first(
    synthetic_store: TrialStore,
) -> None:
    # "val_acc" got no suggestion, and the list of the study's names, cut alphabetically at
    # 20, never showed val_accuracy; a suggestion read "'x' (did you mean 'y'?), and no ..."
    with pytest.raises(StudyError) as err:
        compare_study(synthetic_store, STUDY, metrics=["val_acc"], details=False)
    assert str(err.value).startswith(
        f"study {STUDY!r}: no trial reports the metric 'val_acc', and no known metric has "
        "that name (did you mean 'val_accuracy'?); the study reports: val_accuracy, epochs, "
    )
    assert str(err.value).endswith(" and 4 more")  # 24 names: the close one is never cut
    with pytest.raises(StudyError) as err:
        compare_study(synthetic_store, STUDY, metrics=["sigma"], details=False)
    assert "(did you mean 'sigma/net.0' or 'sigma/net.2' or 'sigma/net.4'?)" in str(err.value)
    # a known metric no trial reports: the names it begins lead the list too
    many = {f"m{j:02d}": 0.5 for j in range(25)}
    store = _study_store(*(_trial(i, i % 2 == 0, {**many, "val_nll_mean": 0.3}) for i in range(4)))
    with pytest.raises(StudyError) as err:
        compare_study(store, STUDY, metrics=["val_nll"], details=False)
    assert str(err.value).startswith(
        f"study {STUDY!r}: none of the metrics val_nll is reported (did you mean "
        "'val_nll_mean'?); it reports: val_nll_mean, m00, m01, "
    )
    # a study's name past the first 20 listed: the closest leads the list
    store = _study_store(*(_trial(i, True, {"acc": 0.8}, study=f"zz-{i:02d}") for i in range(30)))
    with pytest.raises(StudyError) as err:
        compare_study(store, "zz_29")
    assert "(did you mean 'zz-29'? studies: zz-29, zz-00, zz-01, " in str(err.value)
    assert str(err.value).endswith(" and 10 more)")


def test_cli_compare_suggests_the_metric_a_prefix_begins(tmp_path: Path) -> None:
    lab = Lab(tmp_path / "lab")
    with lab.store() as store:
        store.append(synthetic_study(STUDY, n_pairs=4, epochs=3))
    args = ["compare", "--lab", str(lab.root), "--study", STUDY, "--metric", "val_acc"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "(did you mean 'val_accuracy'?); the study reports: val_accuracy, " in result.output
    assert "report:" not in result.output


def test_cli_compare_refuses_a_misspelled_metric(tmp_path: Path) -> None:
    lab = Lab(tmp_path / "lab")
    with lab.store() as store:
        store.append(synthetic_study(STUDY, n_pairs=4, epochs=3))
    args = ["compare", "--lab", str(lab.root), "--study", STUDY, "--metric", "val_accuracy"]
    result = CliRunner().invoke(main, [*args, "--metric", "test_ecce"])
    assert result.exit_code == 1, result.output
    assert "error: study" in result.output and "did you mean 'test_ece'?" in result.output
    assert "report:" not in result.output  # nothing written for a refused comparison


def test_cli_compare_takes_comma_separated_metrics_and_refuses_a_negative_seed(
    tmp_path: Path,
) -> None:
    # "--metric val_accuracy,test_ece" was one unknown metric; the API and the notebook's
    # -p metrics read it as two
    lab = Lab(tmp_path / "lab")
    with lab.store() as store:
        store.append(synthetic_study(STUDY, n_pairs=4, epochs=3))
    args = ["compare", "--lab", str(lab.root), "--study", STUDY, "--out", str(tmp_path / "r")]
    result = CliRunner().invoke(
        main, [*args, "--metric", " val_accuracy , test_ece", "--metric", "test_nll"]
    )
    assert result.exit_code == 0, result.output
    table = (tmp_path / "r" / "report.md").read_text()
    assert all(f"| {m} " in table for m in ("val_accuracy", "test_ece", "test_nll")), table
    result = CliRunner().invoke(main, [*args, "--seed", "-1"])
    assert result.exit_code == 2, result.output  # numpy's own ValueError, in a traceback
    assert "Invalid value for '--seed'" in result.output


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ("val_accuracy", ["val_accuracy"]),
        ("val_accuracy,test_ece", ["val_accuracy", "test_ece"]),
        (" val_accuracy , test_ece ", ["val_accuracy", "test_ece"]),
        (("val_accuracy", "test_ece"), ["val_accuracy", "test_ece"]),
    ],
)
def test_metrics_as_one_name_or_a_comma_separated_string(
    synthetic_store: TrialStore, metrics: Any, expected: list[str]
) -> None:
    res = compare_study(synthetic_store, STUDY, metrics=metrics, details=False)
    assert res.headline["metric"].tolist() == expected


@pytest.mark.parametrize("metrics", ["", "val_accuracy,,test_ece", ["val_accuracy", 3], 3])
def test_metrics_that_are_no_names_are_refused(synthetic_store: TrialStore, metrics: Any) -> None:
    with pytest.raises(StudyError, match="metrics: "):
        compare_study(synthetic_store, STUDY, metrics=metrics, details=False)


def test_a_study_with_one_arm_says_there_is_nothing_to_compare() -> None:
    store = _study_store(
        *(_trial(i, True, {"acc": 0.8 + 0.01 * i}, pair=f"p{i}") for i in range(4))
    )
    res = compare_study(store, STUDY, metrics=["acc"])
    assert res.headline.loc[0, "favours"] == "n/a"
    assert any("no completed trial without SN" in n for n in res.notes)
    assert not any("Welch" in n for n in res.notes)  # no design to speak of
    assert res.headline.loc[0, "note"] == "no value in the none arm: nothing to compare"
    # the header names no test that was not run, on a design the study does not have
    assert res.design == "one arm" and res.test_name.startswith("none")
    assert "Welch" not in res.to_html(figures=False)


def test_undefined_statistics_come_with_their_reason() -> None:
    one_pair = compare_study(
        _study_store(
            _trial(0, True, {"acc": 0.9}, pair="p"), _trial(1, False, {"acc": 0.8}, pair="p")
        ),
        STUDY,
        metrics=["acc"],
    )
    assert "acc: a single pair: no CI, no verdict" in one_pair.notes[0]
    one_each = compare_study(
        _study_store(_trial(0, True, {"acc": 0.9}), _trial(1, False, {"acc": 0.8})),
        STUDY,
        metrics=["acc"],
    )
    assert any("acc: a single value in an arm: no CI, no Welch test" in n for n in one_each.notes)
    constant = _study_store(*(_trial(i, i % 2 == 0, {"acc": 0.9, "c": 3.0}) for i in range(6)))
    res = compare_study(constant, STUDY, metrics=["acc", "c"], details=False)
    assert res.headline["favours"].tolist() == ["n/a", "n/a"]
    assert any(n.startswith("c: both arms are constant") for n in res.notes)
    sn_only = _study_store(
        *(
            _trial(
                2 * i + sn,
                sn,
                # acc differs between twins: all-zero differences would get a note (no p)
                {"acc": 0.8 + i / 100 + sn / 50, **({"x": 1.0 + i} if sn else {})},
                pair=f"p{i}",
            )
            for i in range(4)
            for sn in (False, True)
        )
    )
    res = compare_study(sn_only, STUDY, metrics=["acc", "x"], details=False)
    assert any(n.startswith("x: only SN trials report it") for n in res.notes)
    assert res.headline["note"].tolist()[0] == ""


def test_pairs_missing_a_twin_a_value_or_with_repeats_are_pointed_out() -> None:
    evs = []
    for i in range(6):
        twin = "completed" if i > 1 else ("pruned" if i else "failed")
        evs += _trial(
            2 * i, True, {"acc": 0.82 + i / 100}, pair=f"p{i}", curve=[0.5, 0.6] if i != 2 else ()
        )
        evs += _trial(
            2 * i + 1, False, {"acc": 0.8 + i / 100}, pair=f"p{i}", status=twin, curve=[0.5, 0.55]
        )
    res = compare_study(_study_store(evs), STUDY, metrics=["acc", "val_accuracy"], mode="final")
    assert res.headline["n_pairs"].tolist() == [4, 3]
    assert any(n.startswith("2 pairs have a twin in one arm only") for n in res.notes)
    assert "val_accuracy: 1 of 4 pairs lacks a value in an arm: left out" in res.notes
    seeds = [
        _trial(4 * i + k, k < 2, {"acc": 0.8 + i / 100 + k / 1000}, pair=f"p{i}")
        for i in range(5)
        for k in range(4)
    ]
    res = compare_study(_study_store(*seeds), STUDY, metrics=["acc"], details=False)
    assert res.headline.loc[0, "n_pairs"] == 5
    assert any("several trials in an arm" in n for n in res.notes)


@pytest.mark.filterwarnings("error")
def test_huge_values_in_a_study_give_a_report(tmp_path: Path) -> None:
    store = _study_store(
        *(
            _trial(
                2 * i + sn,
                sn,
                {"h": (1.5 + i / 50) * 1e308 * (1 if sn else -0.9), "acc": 0.8},
                pair=f"p{i}",
            )
            for i in range(6)
            for sn in (False, True)
        )
    )
    res = compare_study(store, STUDY, metrics=["h", "acc"])
    row = res.headline.iloc[0]
    assert np.isnan(row["diff"]) and row["favours"] == "n/a"
    assert any(n.startswith("h: SN − none is beyond the float64 range") for n in res.notes)
    text = write_report(res, tmp_path / "r").read_text()
    assert "beyond the float64 range" in text and "<img" in res.to_html()


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("scale", [1e-300, 1e300])
def test_bands_of_extreme_values_are_neither_unbounded_nor_zero_width(scale: float) -> None:
    # a variance of σ ~1e300 overflowed (a band to infinity), of σ ~1e-300 underflowed
    def sigma_bands(scale: float) -> pd.DataFrame:
        store = _study_store(
            *(
                _trial(2 * i + sn, sn, {"acc": 0.8, "sigma/fc": (1 + i / 10 + sn / 20) * scale})
                for i in range(4)
                for sn in (False, True)
            )
        )
        return compare_study(store, STUDY, metrics=["acc"]).layer_sigma

    ref, got = sigma_bands(1.0), sigma_bands(scale)
    assert (ref["ci_low"] > 0).all() and (ref["ci_high"] > ref["mean"]).all()
    for col in ("mean", "ci_low", "ci_high"):
        assert got[col].tolist() == pytest.approx((ref[col] * scale).tolist(), rel=1e-9, abs=0), col


def test_write_report_refuses_a_file_in_the_way_with_one_clear_error(
    synthetic_store: TrialStore, tmp_path: Path
) -> None:
    from thunderline_lab.errors import ThunderlineLabError

    res = compare_study(synthetic_store, STUDY, metrics=["val_accuracy"], details=False)
    blocker = tmp_path / "taken"
    blocker.write_text("notes")
    for target in (blocker, blocker / "sub"):
        with pytest.raises(ThunderlineLabError, match="is not a folder") as err:
            write_report(res, target)
        assert str(blocker) in str(err.value)
    assert blocker.read_text() == "notes"
    (tmp_path / "out" / "report.md").mkdir(parents=True)
    with pytest.raises(ThunderlineLabError, match=r"report\.md"):
        write_report(res, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.png"))  # nothing half-written beside it


def test_a_report_rewritten_in_its_folder_keeps_no_stale_figures(
    synthetic_store: TrialStore, tmp_path: Path
) -> None:
    full = compare_study(synthetic_store, STUDY)
    write_report(full, tmp_path)
    assert (tmp_path / "learning_curves.png").exists()
    (tmp_path / "mine.png").write_bytes(b"x")  # not a figure of the report: left alone
    write_report(compare_study(synthetic_store, STUDY, details=False), tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["distributions.png", "mine.png", "paired_differences.png", "report.md"]


@pytest.mark.parametrize("study", ["lr $\\frac$ 1e-3", "x$^$", "étude ü 1", "a|b *c*"])
def test_any_study_name_gets_figures_and_a_report(study: str, tmp_path: Path) -> None:
    store = TrialStore(":memory:")
    store.append(synthetic_study(study, n_pairs=3, epochs=3))
    res = compare_study(store, study)
    report = write_report(res, tmp_path / cmp.report_folder(study)).read_text()
    # the title shows the name as it is: Markdown characters escaped
    assert report.startswith(f"# SN vs none: {cmp._md_text(study)}")
    assert study in res.figures()["paired_differences"].get_suptitle().replace("\\$", "$")
    assert "<img" in res.to_html()


def test_report_folders_are_safe_and_distinct_per_study() -> None:
    names = ["cli/ab", "cli ab", "cli_ab", "étude ü", "ätude ö", "../up", ".hidden", "a" * 300]
    folders = [cmp.report_folder(n) for n in names]
    assert len(set(folders)) == len(names)
    assert folders[2] == "cli_ab" and folders[3].startswith("étude_ü")  # safe names kept
    for f in folders:
        assert "/" not in f and not f.startswith(".") and 0 < len(f) <= 80
    assert cmp.report_folder("cli/ab") == cmp.report_folder("cli/ab")


def test_the_report_title_shows_a_study_name_as_it_is(tmp_path: Path) -> None:
    from thunderline_lab.compare import _md_text

    assert _md_text("spectral_norm_ab") == "spectral_norm_ab"  # plain names stay readable
    assert _md_text("a *b* [x](y)") == r"a \*b\* \[x\]\(y\)"


def test_details_are_read_once_per_state_of_the_log(
    synthetic_store: TrialStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = _count_curve_reads(monkeypatch)
    first = compare_study(synthetic_store, STUDY)
    first.curves["mean"] = -1.0  # the caller's copy to change
    again = compare_study(synthetic_store, STUDY)
    assert len(reads) == 1  # nothing new in the log: the curves were not read again
    assert len(again.curves) > 0 and (again.curves["mean"] != -1.0).all()
    # a late metric point of a compared trial (reordered delivery) moves the log on
    done = synthetic_store.trials(study=STUDY, status="completed").iloc[0]
    synthetic_store.append(
        [
            events.run_metric(
                model_run_id=done["model_run_id"],
                trial_id=done["trial_id"],
                study=STUDY,
                step=99,
                measurements={"val_loss": 0.5},
            )
        ]
    )
    late = compare_study(synthetic_store, STUDY)
    assert len(reads) == 2
    assert 99 in set(late.curves["step"])
    assert compare_study(synthetic_store, STUDY, use_cache=False).curves.equals(late.curves)


# ---------------------------------------------------------------------------------------------
# Values written to the store out of band: NaN (which SQLite's JSON functions refuse),
# values that are no number, broken JSON
# ---------------------------------------------------------------------------------------------


def _write_metric(store: TrialStore, trial_id: str, key: str, value: Any) -> None:
    """Set ``key`` of a trial's metrics as Python's json writes it (NaN as the bare token
    ``NaN``, which SQLite 3.40's json_extract refuses as malformed JSON)."""
    (text,) = store.conn.execute(
        "SELECT metrics FROM trials WHERE trial_id = ?", [trial_id]
    ).fetchone()
    metrics = json.loads(text)
    metrics[key] = value
    store.conn.execute(
        "UPDATE trials SET metrics = ? WHERE trial_id = ?", [json.dumps(metrics), trial_id]
    )


def _six_pairs(path: str | Path = ":memory:", paired: bool = True) -> TrialStore:
    store = TrialStore(str(path))
    evs = []
    for i in range(6):
        pair = f"p{i}" if paired else None
        evs += _trial(2 * i, False, {"acc": 0.8 + 0.01 * i, "loss": 0.5 + i / 50}, pair=pair)
        evs += _trial(2 * i + 1, True, {"acc": 0.82 + 0.012 * i, "loss": 0.4 + i / 40}, pair=pair)
    store.append(evs)
    return store


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("metrics", [["acc"], ["acc", "loss"]])
def test_a_nan_written_to_the_store_is_left_out_and_counted(
    paired: bool, metrics: list[str]
) -> None:
    store = _six_pairs(paired=paired)
    _write_metric(store, "trial_0003", "acc", float("nan"))
    res = compare_study(store, STUDY, metrics=metrics, use_cache=False)
    row = res.headline.set_index("metric").loc["acc"]
    if paired:
        assert row["n_pairs"] == 5
    else:
        assert (row["n_sn"], row["n_none"]) == (5, 6)
    assert np.isfinite([row["diff"], row["ci_low"], row["ci_high"], row["p_value"]]).all()
    assert row["note"].startswith("1 non-finite value (NaN) left out")
    assert any(n.startswith("acc: 1 non-finite value (NaN) left out") for n in res.notes)
    if "loss" in metrics:  # the other metric of the same trials: untouched
        loss = res.headline.set_index("metric").loc["loss"]
        assert loss["note"] == "" and loss["n_pairs" if paired else "n_sn"] == 6


def test_a_nan_in_a_metric_not_compared_or_in_the_parameters_changes_nothing() -> None:
    store = _six_pairs()
    expected = compare_study(store, STUDY, metrics=["acc"], details=False, use_cache=False)
    _write_metric(store, "trial_0002", "other", float("nan"))
    params = json.dumps({"spectral_norm": False, "pair_id": "p1", "lr": float("nan")})
    store.conn.execute("UPDATE trials SET parameters = ? WHERE trial_id = 'trial_0002'", [params])
    for metrics in (["acc"], "acc,loss"):
        res = compare_study(store, STUDY, metrics=metrics, details=False, use_cache=False)
        got = res.headline.set_index("metric").loc["acc"]
        assert got["n_pairs"] == 6 and got["note"] == ""
        assert got["p_value"] == expected.headline.loc[0, "p_value"]
        assert got["diff"] == expected.headline.loc[0, "diff"]


@pytest.mark.parametrize("paired", [True, False])
def test_values_that_are_no_number_are_counted_and_named(paired: bool) -> None:
    store = _six_pairs(paired=paired)
    _write_metric(store, "trial_0001", "acc", "abc")
    _write_metric(store, "trial_0004", "acc", [1, 2])
    res = compare_study(store, STUDY, metrics=["acc"], use_cache=False)
    row = res.headline.iloc[0]
    if paired:  # trial_0001 is SN in pair p0, trial_0004 none in pair p2
        assert row["n_pairs"] == 4
    else:
        assert (row["n_sn"], row["n_none"]) == (5, 5)
    assert row["note"].startswith(
        "2 values are not a number (trial_0001: 'abc', trial_0004: '[1,2]') and were left out"
    )
    assert np.isfinite(row["p_value"])  # the comparison goes on without them
    one = _six_pairs(paired=paired)
    _write_metric(one, "trial_0001", "acc", "abc")
    note = compare_study(one, STUDY, metrics=["acc"], use_cache=False).headline.loc[0, "note"]
    assert note.startswith("1 value is not a number (trial_0001: 'abc') and was left out")


@pytest.mark.usefixtures("remember_small_rows")
def test_odd_values_are_counted_the_same_from_a_snapshot(tmp_path: Path) -> None:
    store = _six_pairs(tmp_path / "lab.db")
    _write_metric(store, "trial_0001", "acc", "abc")
    _write_metric(store, "trial_0003", "acc", float("nan"))
    store.conn.commit()
    first = compare_study(store, STUDY, metrics=["acc"], details=False)
    cmp.clear_cache()  # a new process: the frame comes from the snapshot
    loaded = cmp.snapshot_counts["loaded"]
    again = compare_study(store, STUDY, metrics=["acc"], details=False)
    assert cmp.snapshot_counts["loaded"] == loaded + 1
    note = again.headline.loc[0, "note"]
    assert note == first.headline.loc[0, "note"]
    assert "1 non-finite value (NaN) left out" in note and "trial_0001: 'abc'" in note


def test_broken_json_in_the_store_names_the_trial_and_column() -> None:
    from thunderline_lab.errors import StoreError

    store = _six_pairs()
    store.conn.execute("UPDATE trials SET metrics = '{\"acc\": 0.8' WHERE trial_id = 'trial_0005'")
    for metrics in (["acc"], ["loss", "acc"]):
        with pytest.raises(StoreError, match="not valid JSON") as err:
            compare_study(store, STUDY, metrics=metrics, use_cache=False)
        assert (
            "trials row (model_run_id 'cmp-study', trial_id 'trial_0005'): column metrics"
            in str(err.value)
        )


def test_cli_compare_of_a_store_with_a_nan(tmp_path: Path) -> None:
    lab = Lab(tmp_path / "lab")
    with lab.store() as store:
        store.append(synthetic_study(STUDY, n_pairs=4, epochs=3))
        _write_metric(store, "trial_0002", "test_accuracy", float("nan"))
        store.conn.commit()
    args = ["compare", "--lab", str(lab.root), "--study", STUDY]
    result = CliRunner().invoke(main, args)  # was: error: ...: malformed JSON, exit 1
    assert result.exit_code == 0, result.output
    assert "note: test_accuracy: 1 non-finite value (NaN) left out" in result.output
    result = CliRunner().invoke(main, [*args, "--metric", "val_accuracy"])
    assert result.exit_code == 0, result.output


def test_wilcoxon_p_of_tied_differences_is_never_below_the_exact_minimum() -> None:
    for n in (9, 10, 15, 20):
        row = compare_arrays("acc", np.full(n, 0.9), np.full(n, 0.8), paired=True)
        assert row["test_method"] == "approx"
        # no outcome is more extreme than all n of one sign (2 * 0.5**n, two-sided): the
        # exact p is never below it; the normal approximation is, for few pairs
        approx = stats.wilcoxon(np.full(n, 0.1), method="approx").pvalue
        assert row["p_value"] == pytest.approx(max(approx, 2 * 0.5**n))
        if n <= 10:
            assert approx < 2 * 0.5**n and row["p_value"] == pytest.approx(2 * 0.5**n)
    # zeros are dropped: the floor counts the nonzero differences only
    d = np.r_[np.zeros(3), np.full(9, 0.1)]
    row = compare_arrays("acc", 0.8 + d, np.full(12, 0.8), paired=True)
    assert row["p_value"] == pytest.approx(2 * 0.5**9)
    # far from the floor, the approximation is left as it is
    diffs = np.array([0.01, 0.03, -0.01, 0.02, 0.0, 0.01, 0.03, 0.0, 0.02, 0.01, 0.02, -0.01])
    row = compare_arrays("acc", 0.7 + diffs, np.full(12, 0.7), paired=True)
    assert row["p_value"] == pytest.approx(stats.wilcoxon(diffs, method="approx").pvalue)


def test_odd_values_follow_the_trials_through_refreshes() -> None:
    store = _six_pairs()
    p6 = [_trial(12, False, {"acc": 0.9}, pair="p6"), _trial(13, True, {"acc": 0.95}, pair="p6")]
    store.append([t[0] for t in p6])  # started: running when first compared
    before = compare_study(store, STUDY, metrics=["acc"], details=False)
    assert before.headline.loc[0, "n_pairs"] == 6
    store.append([e for t in p6 for e in t[1:]])  # completed: rows patched by the refresh
    store.append(
        _trial(14, False, {"acc": 0.7}, pair="p7") + _trial(15, True, {"acc": 0.75}, pair="p7")
    )  # rows appended by the refresh
    _write_metric(store, "trial_0013", "acc", "abc")
    _write_metric(store, "trial_0014", "acc", float("nan"))
    res = compare_study(store, STUDY, metrics=["acc"], details=False)
    _assert_same_result(res, _fresh(store, metrics=["acc"], details=False))
    note = res.headline.loc[0, "note"]
    assert note.startswith("1 non-finite value (NaN) left out; 1 value is not a number")
    assert "(trial_0013: 'abc')" in note and res.headline.loc[0, "n_pairs"] == 6
    # a value put right, and its trial's next event: the refresh forgets the odd value
    _write_metric(store, "trial_0013", "acc", 0.96)
    store.append(_trial(13, True, {"acc": 0.96}, pair="p6")[1:])
    res = compare_study(store, STUDY, metrics=["acc"], details=False)
    _assert_same_result(res, _fresh(store, metrics=["acc"], details=False))
    assert "not a number" not in res.headline.loc[0, "note"]


def _count_metrics_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gets, for each read of some trials' whole metrics, how many were read."""
    read: list[int] = []
    real = cmp._trial_rows

    def counted(store: Any, study: str, columns: str, subset: Any, *params: Any) -> Any:
        if subset is not None and columns == "model_run_id, trial_id, metrics":
            read.append(len(subset))
        return real(store, study, columns, subset, *params)

    monkeypatch.setattr(cmp, "_trial_rows", counted)
    return read


def test_identical_twins_are_remembered_per_pair_through_refreshes_and_snapshots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twins are checked on their whole metrics (a store read) once per pair: a refresh
    reads only new candidate pairs, and a new process takes the verdicts from the
    snapshot; the counts are the same as computed afresh."""
    store = TrialStore(tmp_path / "lab.db")

    def pair(i: int, d: float) -> list[Any]:
        none = {"acc": 0.8, "loss": 0.5 + i / 100}
        return _trial(2 * i, False, none, pair=f"p{i}") + _trial(
            2 * i + 1, True, {**none, "loss": none["loss"] + d}, pair=f"p{i}"
        )

    store.append([e for i, d in enumerate([0.0, 0.01, 0.0]) for e in pair(i, d)])
    read = _count_metrics_reads(monkeypatch)

    def unchanged() -> str:
        res = compare_study(store, STUDY, metrics=["acc"], details=False)
        (note,) = [n for n in res.notes if "SN left those trials unchanged" in n]
        return note.split(" pairs report")[0]

    assert unchanged() == "2 of 3" and read == [6]  # acc is equal in all 3: all read
    store.append(pair(3, 0.0))
    assert unchanged() == "3 of 4" and read == [6, 2]  # only the new pair
    cmp.clear_cache()  # a new process: the verdicts come with the snapshot
    assert unchanged() == "3 of 4" and read == [6, 2]
    cmp.clear_cache(store)  # no snapshot: computed afresh, the same count
    assert unchanged() == "3 of 4" and read == [6, 2, 8]
    # verdicts alone (no new statistic) are saved too: the next process reads none again
    compare_study(store, STUDY, metrics=["acc", "loss"], details=False)  # loss read too
    cmp.clear_cache()
    unchanged()
    store.append(pair(4, 0.0))  # a new candidate pair: its verdict is the only change
    assert unchanged() == "4 of 5" and read == [6, 2, 8, 2]
    cmp.clear_cache()
    assert unchanged() == "4 of 5" and read == [6, 2, 8, 2]


def test_pairs_equal_in_the_compared_metric_but_not_in_another_value_are_not_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The twin check reads a pair's whole metrics only when its trials agree in every value
    the frame holds, not only in the metrics compared (an accuracy alone ties often)."""
    store = TrialStore(":memory:")
    evs = []
    for i in range(30):  # acc ties in every pair; loss differs except in the last two
        loss = 0.5 + i / 100
        for sn in (False, True):
            other = loss + (0.01 if sn and i < 28 else 0.0)
            evs += _trial(2 * i + sn, sn, {"acc": 0.8, "loss": other}, pair=f"p{i}")
    store.append(evs)
    compare_study(store, STUDY, metrics=["acc", "loss"], details=False)  # loss read too
    frame = cmp._CACHE[cmp._store_key(store, STUDY)]
    frame.twins.clear()  # the verdicts that comparison found: found again below
    frame.derived.clear()
    read = _count_metrics_reads(monkeypatch)
    res = compare_study(store, STUDY, metrics=["acc"], details=False)
    assert read == [4]  # the two pairs equal in loss too
    assert any(n.startswith("2 of 30 pairs report the same value") for n in res.notes)
    assert res.notes == _fresh(store, metrics=["acc"], details=False).notes


def test_the_seeds_of_one_configuration_are_one_pair_not_several() -> None:
    """Paired twins on several seeds: the configuration (group_id) is the unit, each arm's
    mean over its seeds is compared; 10 seeds of 2 configurations are 2 pairs, not 10."""
    store = TrialStore(":memory:")
    rng = np.random.default_rng(3)
    evs, n = [], 0
    per_config = {}
    for g, base in (("g0000", 0.80), ("g0001", 0.90)):
        diffs = []
        for seed in range(5):
            none, sn = base + rng.normal(0, 0.01), base + 0.01 + rng.normal(0, 0.01)
            diffs.append(sn - none)
            pair = f"{g}_s{seed}"
            evs += _trial(n, False, {"acc": none}, pair=pair, group=g)
            evs += _trial(n + 1, True, {"acc": sn}, pair=pair, group=g)
            n += 2
        per_config[g] = float(np.mean(diffs))
    store.append(evs)
    res = compare_study(store, STUDY, metrics=["acc"], details=False)
    row = res.headline.iloc[0]
    assert row["n_pairs"] == 2 and row["n_sn"] == 2 and row["n_none"] == 2
    assert row["diff"] == pytest.approx(np.mean(list(per_config.values())))
    assert sorted(res.pairs["acc"]) == pytest.approx(sorted(per_config.values()))
    assert row["p_value"] >= 0.5  # two independent units: the rank test cannot say more
    assert row["favours"] == "—"  # no side: the CI or the test does not exclude 0
    assert any("n_pairs counts configurations" in note for note in res.notes)
    # without group_id (another tool's study) the pair ids stay the unit
    plain = TrialStore(":memory:")
    plain.append(_strip_groups(evs))
    row = compare_study(plain, STUDY, metrics=["acc"], details=False).headline.iloc[0]
    assert row["n_pairs"] == 10


def test_a_seed_whose_twin_failed_is_left_out_of_its_configurations_pair() -> None:
    """Replicates: each arm's mean over a configuration's seeds takes only the seeds whose
    twin is in the other arm. Seed 1 scores 0.10 above seed 0 and SN changes nothing; when
    SN's seed-0 run fails, the none arm's seed 0 must not pull its mean down (that made SN
    look 0.05 better, with a verdict)."""
    store = TrialStore(":memory:")
    evs, n = [], 0
    for g in range(8):
        for seed in range(2):
            acc = 0.75 + 0.10 * seed + 0.005 * g
            pair, group = f"g{g}_s{seed}", f"g{g}"
            status = "failed" if seed == 0 and g < 6 else "completed"
            evs += _trial(n, False, {"acc": acc}, pair=pair, group=group)
            evs += _trial(n + 1, True, {"acc": acc}, pair=pair, group=group, status=status)
            n += 2
    store.append(evs)
    res = compare_study(store, STUDY, metrics=["acc"], details=False)
    row = res.headline.iloc[0]
    assert row["n_pairs"] == 8
    assert row["diff"] == 0.0 and row["favours"] == "n/a"  # every seed-matched difference is 0
    assert row["mean_sn"] == pytest.approx(row["mean_none"])
    assert any(note.startswith("6 pairs have a twin in one arm only") for note in res.notes)
    assert (
        compare_study(store, STUDY, metrics=["acc"], use_cache=False).headline.iloc[0]["diff"]
        == 0.0
    )
    # a real effect on the matched seeds is what is measured: +0.01 on every seed
    effect = TrialStore(":memory:")
    evs, n = [], 0
    for g in range(6):
        for seed in range(3):
            acc = 0.70 + 0.05 * seed + 0.01 * g
            pair, group = f"g{g}_s{seed}", f"g{g}"
            status = "failed" if (g, seed) == (0, 0) else "completed"
            evs += _trial(n, False, {"acc": acc}, pair=pair, group=group)
            evs += _trial(n + 1, True, {"acc": acc + 0.01}, pair=pair, group=group, status=status)
            n += 2
    effect.append(evs)
    res = compare_study(effect, STUDY, metrics=["acc"], details=False)
    assert res.pairs["acc"].to_numpy() == pytest.approx(np.full(6, 0.01))
    assert res.headline.iloc[0]["diff"] == pytest.approx(0.01)


def _strip_groups(evs: list[Any]) -> list[Any]:
    out = []
    for e in evs:
        d = e.model_dump(mode="json")
        d["payload"].get("parameters", {}).pop("group_id", None)
        out.append(d)
    return out


def test_unpaired_replicates_note_counts_trials_without_a_value_not_seeds() -> None:
    """A tpe study on 2 seeds where every trial has the metric: n counts configurations,
    and no note claims that the other seeds' trials lack a value; a trial that does lack
    one is still counted (in trials)."""
    store = TrialStore(":memory:")
    evs, number = [], 0
    for g in range(6):
        for s in range(2):
            evs += _trial(number, g % 2 == 1, {"acc": 0.8 + g / 100 + s / 1000}, group=f"g{g}")
            number += 1
    store.append(evs)
    res = compare_study(store, STUDY, metrics=["acc"], details=False)
    row = res.headline.iloc[0]
    assert (row["n_sn"], row["n_none"]) == (3, 3)
    assert not any("lack" in n for n in res.notes), res.notes
    assert "lack" not in row["note"]
    store.append(_trial(number, True, {"other": 1.0}, group="g9"))  # no acc: one SN lacks it
    res = compare_study(store, STUDY, metrics=["acc"], details=False)
    assert any("1 of 7 SN trials lack a value" in n for n in res.notes), res.notes


def test_report_header_names_the_seed_when_subgroup_cis_were_resampled(tmp_path: Path) -> None:
    """The headline's CI by the saddlepoint (2,000+ pairs) but the per-coefficient and
    per-mode rows (700 / 1,050 pairs) resampled with the seed: the header says so."""
    rng = np.random.default_rng(31)
    evs = []
    n = cmp.SADDLEPOINT_MIN + 100
    for i in range(n):
        base = 0.8 + float(rng.normal(0, 0.01))
        evs += _trial(2 * i, False, {"acc": base}, pair=f"p{i}")
        evs += _trial(
            2 * i + 1,
            True,
            {"acc": base + 0.01 + float(rng.normal(0, 0.02))},
            pair=f"p{i}",
            coeff=(0.5, 1.0, 2.0)[i % 3],
            extra={"conv_sn_mode": "operator" if i % 2 else "matrix"},
        )
    store = TrialStore(":memory:")
    store.append(evs)
    res = compare_study(store, STUDY, metrics=["acc"], details=False, seed=7)
    assert res.headline.loc[0, "ci_method"] == "saddlepoint"
    assert set(res.by_coeff["ci_method"]) == set(res.by_mode["ci_method"]) == {"resampling"}
    header = write_report(res, tmp_path / "r").read_text().splitlines()[2]
    assert "seed 7" in header and "no resample drawn" not in header
    html_header = res.to_html(figures=False).split("</p>")[0]
    assert "seed 7" in html_header and "no resample drawn" not in html_header


def test_by_coeff_rows_without_a_ci_say_why_in_the_notes() -> None:
    store = TrialStore(":memory:")
    evs = []
    for i, (coeff, d) in enumerate([(0.5, 0.01), (0.5, 0.02), (0.5, 0.015), (1.0, 0.03)]):
        evs += _trial(2 * i, False, {"acc": 0.8}, pair=f"p{i}")
        evs += _trial(2 * i + 1, True, {"acc": 0.8 + d}, pair=f"p{i}", coeff=coeff)
    store.append(evs)
    res = compare_study(store, STUDY, metrics=["acc"], details=False)
    one = res.by_coeff[res.by_coeff["coeff"] == 1.0].iloc[0]
    assert one["n_pairs"] == 1 and one["ci_low"] != one["ci_low"]  # n/a
    assert any(n.startswith("SN coefficient 1, acc: a single pair") for n in res.notes)


def test_by_mode_rows_without_a_ci_say_why_in_the_notes(tmp_path: Path) -> None:
    """The report's by-mode table has no note column, and its legend says the notes give
    the reason for each n/a: a mode with a single pair, and a mode whose twins all failed,
    are named there."""
    evs = []
    for i in range(4):
        evs += _trial(2 * i, False, {"acc": 0.8 + i / 100}, pair=f"m{i}")
        evs += _trial(
            2 * i + 1, True, {"acc": 0.81 + i / 90}, pair=f"m{i}", extra={"conv_sn_mode": "matrix"}
        )
    evs += _trial(20, False, {"acc": 0.8}, pair="o0")
    evs += _trial(21, True, {"acc": 0.85}, pair="o0", extra={"conv_sn_mode": "operator"})
    evs += _trial(22, False, {"acc": 0.8}, pair="x0", status="failed")
    evs += _trial(23, True, {"acc": 0.85}, pair="x0", extra={"conv_sn_mode": "other"})
    store = TrialStore(":memory:")
    store.append(evs)
    res = compare_study(store, STUDY, metrics=["acc"], details=False)
    by_mode = res.by_mode.set_index("sn_mode")
    assert by_mode.loc["operator", "n_pairs"] == 1 and by_mode.loc["other", "n_pairs"] == 0
    assert any(n.startswith("SN mode operator, acc: a single pair") for n in res.notes)
    assert any(n.startswith("SN mode other, acc: no pair has a value") for n in res.notes)
    assert not any(n.startswith("SN mode matrix") for n in res.notes)
    text = write_report(res, tmp_path / "r").read_text()
    assert "- SN mode operator, acc: a single pair" in text


_FIRST_COMPARISON = """
import sys
from thunderline_lab.compare import compare_study
from thunderline_lab.monitor import synthetic_study
from thunderline_lab.store import TrialStore
store = TrialStore(":memory:")
store.append(synthetic_study("ab", n_pairs=2_000, epochs=1))
assert "scipy.stats" not in sys.modules and "scipy.optimize" not in sys.modules
res = compare_study(store, "ab", details=False, use_cache=False)
assert res.design == "paired" and (res.headline["n_pairs"] == 2_000).all(), res.headline
assert "saddlepoint" in set(res.headline["ci_method"]), res.headline
print(" ".join(m for m in ("scipy.stats", "scipy.optimize", "scipy.special") if m in sys.modules))
"""


def test_a_new_processs_first_paired_comparison_does_not_import_scipy_stats() -> None:
    # importing scipy.stats costs a new process ~1 s, ten times the comparison it served
    # (a kernel or `thunderline-lab compare` run on a study past its snapshot). A large
    # study's statistics need none of scipy: the saddlepoint CI, the Wilcoxon test's normal
    # approximation (scipy's exact test serves 50 pairs or fewer)
    out = subprocess.run(
        [sys.executable, "-c", _FIRST_COMPARISON], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == []


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # scipy's, on a constant arm
def test_welch_and_the_t_quantiles_agree_with_scipy_stats() -> None:
    rng = np.random.default_rng(7)
    for i in range(300):
        n_a, n_b = (int(n) for n in rng.integers(2, 40, 2))
        a = rng.normal(rng.normal(), rng.uniform(0.01, 3), n_a)
        b = rng.normal(0, rng.uniform(0.01, 3), n_b)
        if i % 10 == 0:
            a[:] = a[0]  # one arm constant: its variance is 0
        ref = stats.ttest_ind(a, b, equal_var=False)
        t, p = cmp._welch(a, b)
        assert t == pytest.approx(ref.statistic, rel=1e-12)
        assert p == pytest.approx(ref.pvalue, rel=1e-10, abs=1e-300)
    n = np.array([1, 2, 3, 10, 400])
    assert np.array_equal(cmp._t_crit(n, 0.9), stats.t.ppf(0.95, np.maximum(n - 1, 1)))
    for q in (0.5, 0.8, 0.95, 0.975, 0.995, 1e-12):
        assert cmp._normal_quantile(q) == pytest.approx(stats.norm.ppf(q), rel=1e-14, abs=1e-300)


# ---------------------------------------------------------------------------------------------
# What the report and figures say about themselves (audit findings)
# ---------------------------------------------------------------------------------------------


def test_layer_sigma_title_states_the_band_rule_not_a_sample_size() -> None:
    # the bars average 3 trials each, but the title read "CI from 3 trials" whatever n was
    res = compare_study(_curve_store(4, 0.2), STUDY, metrics=["acc"])
    assert set(res.layer_sigma["n"]) == {4}
    title = cmp.fig_layer_sigma(res).axes[0].get_title()
    assert "95% CI where n ≥ 3" in title and "from 3 trials" not in title


def test_the_statuses_compared_are_stated_in_the_report(
    synthetic_store: TrialStore, tmp_path: Path
) -> None:
    res = compare_study(synthetic_store, STUDY, statuses="completed,pruned", n_boot=200)
    assert res.statuses == ("completed", "pruned")
    text = write_report(res, tmp_path / "r").read_text()
    header = next(ln for ln in text.splitlines() if ln.startswith("Design:"))
    assert "trials: **completed, pruned**" in header
    assert "trials: completed, pruned" in res.to_html(figures=False)
    assert any(n.startswith("trials of status completed, pruned compared") for n in res.notes)
    default = compare_study(synthetic_store, STUDY, details=False, n_boot=200)
    assert default.statuses == ("completed",)
    text = write_report(default, tmp_path / "d").read_text()
    assert "trials: **completed**" in text
    assert not any(n.startswith("trials of status") for n in default.notes)


def _cli_lab(tmp_path: Path, evs: Sequence[Any] | None = None) -> list[str]:
    lab = Lab(tmp_path / "lab")
    with lab.store() as store:
        store.append(
            list(evs) if evs is not None else synthetic_study(STUDY, n_pairs=6, epochs=3, pruned=1)
        )
    return ["compare", "--lab", str(lab.root), "--study", STUDY, "--out", str(tmp_path / "r")]


def test_cli_compare_takes_statuses_and_confidence(tmp_path: Path) -> None:
    args = _cli_lab(tmp_path)
    runner = CliRunner()
    result = runner.invoke(
        main, [*args, "--statuses", "completed,pruned", "--confidence", "0.9", "--n-boot", "200"]
    )
    assert result.exit_code == 0, result.output
    headline = result.output.splitlines()[0]
    assert "90% bootstrap CI" in headline and "completed, pruned trials" in headline
    assert "90% CI" in result.output
    assert "trials: **completed, pruned**" in (tmp_path / "r" / "report.md").read_text()
    result = runner.invoke(main, [*args, "--n-boot", "200"])
    assert result.exit_code == 0 and "completed trials" in result.output.splitlines()[0]
    for option, value, expected in [
        ("--statuses", "complete", "'complete' is no trial status (did you mean 'completed'?)"),
        ("--statuses", "completed,,pruned", "'' is no trial status"),
        ("--statuses", "", "'' is no trial status"),
        ("--confidence", "1.5", "1.5 is not in the range 0<x<1"),
        ("--confidence", "0", "0.0 is not in the range 0<x<1"),
        ("--confidence", "high", "'high' is not a valid float"),
    ]:
        result = runner.invoke(main, [*args, option, value])
        assert result.exit_code == 2, result.output
        assert f"Invalid value for '{option}'" in result.output and expected in result.output


def test_cli_compare_refuses_an_empty_metric(tmp_path: Path) -> None:
    # --metric '' (an unset variable in a script) ran the default 8-metric comparison
    args = _cli_lab(tmp_path)
    for value in ("", "  "):
        result = CliRunner().invoke(main, [*args, "--metric", value])
        assert result.exit_code == 2, result.output
        assert "Invalid value for '--metric': is empty" in result.output
    result = CliRunner().invoke(main, [*args, "--metric", "val_accuracy", "--metric", ""])
    assert result.exit_code == 2 and "is empty" in result.output
    result = CliRunner().invoke(main, [*args, "--metric", "val_accuracy,"])
    assert result.exit_code == 1 and "error: metrics: '' is not a metric name" in result.output
    assert not (tmp_path / "r").exists()


def _replicate_store(same: Sequence[str], seeds: int = 2) -> TrialStore:
    """Paired twins of 3 configurations on ``seeds`` seeds; the configurations in ``same``:
    SN changed nothing (every metric equal between a seed's twins, wall-clock aside)."""
    store = TrialStore(":memory:")
    evs, n = [], 0
    for g in range(3):
        group = f"g{g:04d}"
        for seed in range(seeds):
            none = {"acc": 0.8 + g / 100 + seed / 50, "loss": 0.5 - seed / 10, "step_time_ms": 3.0}
            sn = {**none, "step_time_ms": 4.0 + seed}
            if group not in same:
                sn["acc"] += 0.01
            pair = f"{group}_s{seed}"
            evs += _trial(n, False, none, pair=pair, group=group)
            evs += _trial(n + 1, True, sn, pair=pair, group=group)
            n += 2
    store.append(evs)
    return store


def test_identical_twins_of_a_configuration_run_on_several_seeds_are_pointed_out() -> None:
    store = _replicate_store(["g0000"])
    for _ in range(2):  # and the count kept with the arms gives the same note
        res = compare_study(store, STUDY, metrics=["acc", "loss"], details=False)
        assert res.headline.loc[0, "n_pairs"] == 3
        (note,) = [n for n in res.notes if "SN left those trials unchanged" in n]
        assert note.startswith("1 of 3 pairs report the same value in both arms")
    # every seed of every configuration unchanged
    store = _replicate_store(["g0000", "g0001", "g0002"], seeds=3)
    res = compare_study(store, STUDY, metrics="acc", details=False)
    assert any(n.startswith("3 of 3 pairs report the same") for n in res.notes), res.notes
    # seeds that differ from each other but each seed's twin changed: no note
    res = compare_study(_replicate_store([]), STUDY, metrics=["acc"], details=False)
    assert not [n for n in res.notes if "unchanged" in n]


def test_the_replicates_note_needs_several_trials_of_a_configuration_in_an_arm() -> None:
    # a paired study on one seed compared unpaired: each group_id holds one SN and one none
    # trial, nothing is averaged, and no note says n counts configurations
    store = _replicate_store([], seeds=1)
    res = compare_study(store, STUDY, paired=False, metrics="acc", details=False)
    row = res.headline.iloc[0]
    assert res.design == "unpaired" and (row["n_sn"], row["n_none"]) == (3, 3)
    assert not any("replicates" in n for n in res.notes), res.notes
    # on two seeds, each arm's configuration holds two trials: averaged, and said so
    res = compare_study(_replicate_store([]), STUDY, paired=False, metrics="acc", details=False)
    row = res.headline.iloc[0]
    assert (row["n_sn"], row["n_none"]) == (3, 3)
    assert any("replicates" in n and "3 SN, 3 none" in n for n in res.notes), res.notes


def test_difference_and_distribution_figures_name_the_mode_and_the_value_read(
    synthetic_store: TrialStore,
) -> None:
    titles, labels = {}, {}
    for mode in ("best", "final"):
        res = compare_study(synthetic_store, STUDY, mode=mode, metrics="val_accuracy")  # type: ignore[arg-type]
        fig = cmp.fig_differences(res)
        titles[mode] = fig.get_suptitle()
        labels[mode] = fig.axes[0].get_xlabel()
        assert f"{mode} values" in titles[mode]
        dist = cmp.fig_distributions(res)
        assert STUDY in dist.get_suptitle() and f"{mode} values" in dist.get_suptitle()
        # the key read: best_val_accuracy; final: the summary (no final_val_accuracy here)
        assert dist.axes[0].get_ylabel() == res.sources["val_accuracy"]
        assert res.sources["val_accuracy"] in labels[mode]
    assert titles["best"] != titles["final"]
    assert "best_val_accuracy" in labels["best"] and "best" not in labels["final"]


def _early_stop_store(n_per_arm: int = 8) -> TrialStore:
    """Paired trials whose curves end early: all train 3 epochs, 3 per arm go on to epoch
    4, and 2 of those to epoch 5 (the late means rest on few trials)."""
    store = TrialStore(":memory:")
    evs = []
    for i in range(n_per_arm):
        length = 6 if i < 2 else 5 if i < 3 else 3
        for sn in (False, True):
            curve = [0.2 + 0.1 * s + 0.01 * i + 0.02 * sn for s in range(length)]
            evs += _trial(2 * i + sn, sn, {"acc": 0.8 + 0.01 * i}, pair=f"p{i}", curve=curve)
    store.append(evs)
    return store


def test_learning_curves_show_how_few_trials_the_late_epochs_rest_on() -> None:
    res = compare_study(_early_stop_store(), STUDY, metrics=["acc"])
    sn = res.curves[(res.curves["name"] == "val_accuracy") & (res.curves["arm"] == "SN")]
    assert sn["n"].tolist() == [8, 8, 8, 3, 3, 2]
    fig = cmp.fig_learning_curves(res)
    ax = next(a for a in fig.axes if a.get_title() == "val_accuracy")
    lines = [ln for ln in ax.get_lines() if ln.get_color() == cmp.ARM_COLORS["SN"]]
    drawn = sorted({float(x) for ln in lines for x in ln.get_xdata()})
    assert drawn == [0, 1, 2, 3, 4]  # epoch 5 (2 trials): no mean drawn
    dashed = [ln for ln in lines if ln.get_linestyle() == "--"]
    assert dashed and sorted(float(x) for x in dashed[0].get_xdata()) == [2, 3, 4]
    labels = ax.get_legend_handles_labels()[1]
    assert "SN (n 8→2)" in labels  # from the most trials to those of the last epoch
    caption = " ".join(fig.get_suptitle().split())  # (wrapped to the figure's width)
    assert "dashed: fewer than half of the arm's trials" in caption
    assert "no mean nor band where fewer than 3 trials remain" in caption
    assert "clipped" not in caption
    # bands clipped to the metric's range are said to be
    clipped = compare_study(_curve_store(3, 0.45), STUDY, metrics=["acc"])
    caption = " ".join(cmp.fig_learning_curves(clipped).get_suptitle().split())
    assert "bands clipped to the metric's range" in caption


def test_report_and_cli_say_which_direction_counts_as_better(
    synthetic_store: TrialStore, tmp_path: Path
) -> None:
    res = compare_study(synthetic_store, STUDY, n_boot=200, details=False)
    text = write_report(res, tmp_path / "r").read_text()
    (line,) = [ln for ln in text.splitlines() if ln.startswith("Better:")]
    assert "higher is better for val_accuracy, test_accuracy" in line
    assert "lower is better for generalization_gap, test_nll, test_ece" in line
    assert "lipschitz_upper" in line.split("lower is better", 1)[1]
    assert "SN bounds lipschitz_upper by construction" in line
    args = _cli_lab(tmp_path / "cli")
    result = CliRunner().invoke(main, [*args, "--n-boot", "200"])
    assert result.exit_code == 0, result.output
    assert any(ln.startswith("Better: higher is better for") for ln in result.output.splitlines())


def test_an_unpaired_difference_figure_says_so() -> None:
    store = TrialStore(":memory:")
    store.append([e for i in range(8) for e in _trial(i, i % 2 == 1, {"acc": 0.8 + i / 100})])
    res = compare_study(store, STUDY, metrics=["acc"], details=False)
    assert res.design == "unpaired" and "paired_differences" in res.figures()
    fig = cmp.fig_differences(res)
    assert "unpaired: difference of the arm means" in fig.get_suptitle()
    assert all(p.get_edgecolor()[3] > 0 for p in fig.axes[0].patches)  # bars have edges


def test_difference_figure_keeps_zero_inside_and_its_key_off_the_bars() -> None:
    # two pairs, both below zero: the "no difference" line sat on the axis' right edge
    res = compare_study(_paired_store([-0.03, -0.01]), STUDY, metrics=["acc"], details=False)
    fig = cmp.fig_differences(res)
    fig.canvas.draw()
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    assert hi >= 0.1 * (hi - lo) and lo < -0.03
    assert ax.get_legend() is None and len(fig.legends) == 1  # one key, outside the panels
    assert all(p.get_edgecolor()[3] > 0 for p in ax.patches)


def test_coefficient_groups_are_labelled_half_open_with_three_digits() -> None:
    store = _coeff_store(4, (0.586854, 1.234567))
    res = compare_study(store, STUDY, metrics=["acc"], details=False)
    assert res.by_coeff["coeff_range"].tolist() == ["0.587", "1.23"]
    store = TrialStore(":memory:")
    evs = []
    for i in range(9):
        evs += _trial(2 * i, False, {"acc": 0.8}, pair=f"p{i}")
        evs += _trial(2 * i + 1, True, {"acc": 0.81}, pair=f"p{i}", coeff=0.5 + i / 3)
    store.append(evs)
    labels = compare_study(store, STUDY, metrics=["acc"], details=False).by_coeff["coeff_range"]
    assert labels.tolist() == ["[0.5, 1.39)", "[1.39, 2.28)", "[2.28, 3.17]"]


def test_p_values_share_one_format() -> None:
    assert [cmp._p(v) for v in (0.0001, 8.8e-05, 0.00123, 0.5, 1e-20)] == [
        "1.0e-04",
        "8.8e-05",
        "0.001",
        "0.500",
        "<1e-16",
    ]

"""Tests of thunderline_lab.compare: pairing, bootstrap CIs, tests, modes, cache, report, CLI."""

from __future__ import annotations

from collections.abc import Sequence
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
    higher_is_better,
    write_report,
)
from thunderline_lab.errors import StudyError
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
) -> list[Any]:
    common = {"model_run_id": study, "trial_id": f"trial_{number:04d}", "study": study}
    params: dict[str, Any] = {"spectral_norm": sn}
    if pair is not None:
        params["pair_id"] = pair
    out = [events.trial_start(**common, spectral_norm=sn, parameters=params)]
    out += [
        events.run_metric(**common, step=s, measurements={"val_accuracy": v, "train_loss": 1 - v})
        for s, v in enumerate(curve)
    ]
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


def test_lower_is_better_metrics_flip_the_verdict() -> None:
    assert not higher_is_better("test_nll") and not higher_is_better("lipschitz_upper")
    assert higher_is_better("fgsm_acc_0.05") and higher_is_better("ood_auroc")
    row = compare_arrays(
        "test_nll", np.array([0.3, 0.31, 0.29, 0.3]), np.array([0.4, 0.42, 0.41, 0.39]), paired=True
    )
    assert row["diff"] < 0 and row["favours"] == "SN"


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


def test_bootstrap_is_seeded_and_vectorised_paths_agree() -> None:
    rng = np.random.default_rng(1)
    discrete = rng.integers(0, 40, 4000) / 2000  # accuracies on a 2,000-example test set
    a = bootstrap_mean_ci(discrete, seed=5, name="m")
    assert a == bootstrap_mean_ci(discrete, seed=5, name="m")
    assert a != bootstrap_mean_ci(discrete, seed=6, name="m")
    # multinomial over distinct levels vs resampling indices: the same distribution
    continuous = discrete + rng.normal(0, 1e-9, len(discrete))
    b = bootstrap_mean_ci(continuous, seed=5, name="m", n_boot=4000)
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
    serial = bootstrap_mean_ci(x, seed=3, name="acc", n_boot=1000)
    monkeypatch.setattr(cmp, "_PARALLEL_DRAWS", 0)  # always, on every core
    monkeypatch.setattr(cmp.os, "cpu_count", lambda: 4)
    assert bootstrap_mean_ci(x, seed=3, name="acc", n_boot=1000) == serial


def test_bootstrap_work_cap_reduces_resamples_and_says_so() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=5000)
    est, lo, hi, b = bootstrap_mean_ci(x, n_boot=2000, max_draws=1_000_000)
    assert b == 200 and lo < est < hi
    diffs = rng.normal(0.01, 0.02, 3000)
    res = compare_study(
        _paired_store(diffs), STUDY, metrics=["acc"], details=False, max_draws=1_000_000
    )
    assert res.headline.loc[0, "n_boot"] == 333
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
    assert compare_arrays("acc", sn, none, paired=True, seed=1) != recomputed


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
    assert row["p_value"] == 1.0 and row["diff"] == 0.0 and row["favours"] == "—"
    row = compare_arrays("acc", np.array([]), np.array([]), paired=True)
    assert row["favours"] == "n/a" and np.isnan(row["p_value"])


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
    res = compare_study(synthetic_store, STUDY, metrics=["val_accuracy", "nope"], details=False)
    assert res.headline["metric"].tolist() == ["val_accuracy"]
    assert any("nope" in n for n in res.notes)
    with pytest.raises(StudyError, match="none of the metrics"):
        compare_study(synthetic_store, STUDY, metrics=["nope"], details=False)
    with pytest.raises(StudyError, match=f"studies: {STUDY}"):
        compare_study(synthetic_store, "missing")
    with pytest.raises(StudyError, match="empty"):
        compare_study(TrialStore(":memory:"), "missing")


def test_multiple_coefficients_get_their_own_rows() -> None:
    store = TrialStore(":memory:")
    evs = []
    for i in range(8):
        evs += _trial(3 * i, False, {"acc": 0.8}, pair=f"p{i}")
        evs += _trial(3 * i + 1, True, {"acc": 0.82}, pair=f"p{i}", coeff=1.0)
        evs += _trial(3 * i + 2, True, {"acc": 0.78}, pair=f"p{i}", coeff=4.0)
    store.append(evs)
    res = compare_study(store, STUDY, metrics=["acc"], details=False)
    assert res.headline.loc[0, "diff"] == pytest.approx(0.0)  # SN arm: mean within each pair
    by = res.by_coeff.set_index("coeff")["diff"]
    assert by[1.0] == pytest.approx(0.02) and by[4.0] == pytest.approx(-0.02)


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
    frame = cmp._CACHE[cmp._store_key(store, STUDY)]
    store.append(evs[half:])
    second = compare_study(store, STUDY, metrics=["test_accuracy"], details=False)
    assert cmp._CACHE[cmp._store_key(store, STUDY)] is frame  # patched, not rebuilt
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
    assert not second.trial_columns["trial_id"].flags.writeable
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
    report = lab.reports_dir / "cli_ab" / "report.md"
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
            "trial_id": ["trial_0000", "trial_0001"],
            "mlflow_run_id": ["abc123", None],
            "run_url": ["http://127.0.0.1:5000/#/experiments/1/runs/abc123", None],
            "artifacts_uri": ["file:///lab/mlartifacts/x", None],
            "sync_state": ["synced", "not mirrored"],
        }
    )
    text = write_report(res, tmp_path, mlflow_links=links).read_text()
    assert "## MLflow runs" in text
    assert "[abc123](http://127.0.0.1:5000/#/experiments/1/runs/abc123)" in text
    assert "trial_0001" not in text.split("## MLflow runs")[1]  # runs without MLflow are left out


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
    assert res.by_coeff["coeff_range"].iloc[0].startswith("0.5–")
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

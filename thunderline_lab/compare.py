"""SN vs none: paired differences with bootstrap CIs and rank tests, curves and figures.

For a study, :func:`compare_study` compares spectrally normalized trials with their
unconstrained twins, metric by metric:

* **paired** (twins share ``parameters["pair_id"]``): per pair, SN − none (each arm's mean
  within the pair); the mean difference with a percentile bootstrap CI (seeded numpy
  Generator, vectorised; from 2,000 pairs its quantiles are computed by the saddlepoint
  approximation instead, with no resample and no seed: see :func:`bootstrap_mean_ci`) and
  the Wilcoxon signed-rank test (exact, permutation, or its normal approximation);
* **unpaired** fall-back (no pair ids): difference of the arm means with a bootstrap CI
  (each arm resampled; the saddlepoint from 2,000 values per arm) and Welch's t-test. A
  configuration run on several seeds (``tpe`` with replicates: its ``group_id``) is one
  value per arm, the mean over its seeds, as it is one pair in the paired design.

Every metric is tested at once, so each p-value comes with ``p_holm``: adjusted by Holm's
step-down method over the comparison's metrics that have a p-value (the family-wise error
rate, whatever the dependence between the metrics, which is strong here), and a verdict
(``favours``) is read from it. Tables and the report say how many tests the family holds.

``mode`` picks each trial's value. The trainer stops early on the validation loss and
restores the best epoch's weights (:mod:`thunderline_lab.training`):

* ``best``: the value at the best epoch (the lowest validation loss, whose weights are
  restored): ``best_<metric>`` when the trial reports it (``best_val_accuracy``), else the
  metric's summary value;
* ``final``: the value at the last epoch trained: ``final_<metric>`` when the trial reports
  it (``final_val_accuracy``), else the metric's summary value.

Metrics measured once after training, on the restored model (``test_*``, robustness,
calibration, Lipschitz bounds, σ) have no per-epoch value: they are the same in both modes.
Metrics a trial never summarised fall back to its metric history (its max/min in ``best``
mode, its last step in ``final`` mode). Only completed trials count by default;
pruned/failed ones are tallied.

Uncertainty is shown only where it is defined: a bootstrap CI needs two values per resampled
sample (a single pair gives none), Welch's test some variance, and the t-interval bands of
the learning curves and per-layer σ three trials; bands are clipped to the metric's range
(accuracies in [0, 1], losses and σ ≥ 0). Undefined values are NaN, shown as ``n/a``, and
each headline row's ``note`` (also one of the result's notes) says why: one arm without
values, a single pair or value, constant arms, a difference beyond the float64 range. A
NaN or ±inf value (written to a store out of band) is left out and counted, never averaged
in; values of extreme magnitude (1e300, 1e-300) are compared in units of a power of two, so
no mean overflows and no variance underflows into a spurious p = 0.

The result also carries group learning curves (mean ± CI bands per arm), metric
distributions, accuracy vs Lipschitz bound and per-layer σ (``sigma/<layer>`` metrics), and
:func:`write_report` turns it into ``report.md`` plus PNG figures.

Reading is columnar and incremental: the study's trial values are extracted with SQL
(``json_extract`` on ``trials.metrics``) once, cached in-process by (store, study), and
refreshed from the event log's sequence numbers (only trials with new lifecycle events are
re-read), so repeated comparisons over a large or live study stay fast. What a comparison
derives from the frame (the arms per statuses, counts, each metric's row) is kept with it
until a refresh changes a row, and :func:`compare_arrays` remembers the rows of large inputs
by a digest of their values: statistics are pure functions of the values and arguments, so a
repeated comparison returns exactly what recomputing would.

The frame also persists across processes (a restarted kernel, each ``thunderline-lab
compare``): a columnar snapshot beside the store, ``cache/compare/<study>.<tag>.npz`` (numpy
arrays, no pickles), with the statistic rows computed over its values. A new process maps
it (copy-on-write: only the pages used are read), leaves its trial and pair ids encoded
until something reads them (a comparison of an unchanged study reads none), checks it
against the store (format, the event id at its watermark and the log's first one, the
study's newest trials row) and refreshes it from the event log as above; a snapshot
that does not match, or cannot be read, is ignored and rewritten. It is saved (atomically,
last writer wins) after a read from scratch, and after changes (new trials, statistics) once
it is a minute or 10,000 events behind, or when the process forgets the study or exits, so a
live study's comparisons do not rewrite it each time; an unwritable folder only means no
snapshot. Like the store's projections it never changes a result, only
its cost; ``use_cache=False`` neither reads nor writes it (nor any remembered statistic),
and ``clear_cache(store)`` deletes it.

Example:
    >>> from thunderline_lab.store import TrialStore
    >>> from thunderline_lab.monitor import synthetic_study
    >>> store = TrialStore(":memory:")
    >>> _ = store.append(synthetic_study("ab", n_pairs=8, epochs=5))
    >>> res = compare_study(store, "ab", metrics=["val_accuracy"], details=False)
    >>> res.design, int(res.headline.loc[0, "n_pairs"])
    ('paired', 8)
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import functools
import hashlib
import io
import itertools
import json
import logging
import math
import mmap
import numbers
import os
import re
import secrets
import statistics
import struct
import threading
import time
import weakref
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import numpy as np
import pandas as pd

from thunderline_lab.errors import ConfigError, StudyError, closest_names, did_you_mean
from thunderline_lab.events import TERMINAL_STATUSES, gc_paused
from thunderline_lab.lab import study_name
from thunderline_lab.store import TrialStore, snapshot_dir

__all__ = [
    "DEFAULT_METRICS",
    "ComparisonResult",
    "bootstrap_mean_ci",
    "clear_cache",
    "compare_arrays",
    "compare_study",
    "fig_accuracy_vs_lipschitz",
    "fig_differences",
    "fig_distributions",
    "fig_layer_sigma",
    "fig_learning_curves",
    "flush_snapshots",
    "format_headline",
    "higher_is_better",
    "report_folder",
    "update_snapshot",
    "write_report",
]

Mode = Literal["best", "final"]
BootMethod = Literal["auto", "resample", "saddlepoint"]
DEFAULT_METRICS: tuple[str, ...] = (
    "val_accuracy",
    "test_accuracy",
    "generalization_gap",
    "test_nll",
    "test_ece",
    "noise_acc_0.1",
    "fgsm_acc_0.05",
    "ood_auroc",
    "lipschitz_upper",
)
CURVE_METRICS: tuple[str, ...] = ("val_accuracy", "val_loss", "train_loss")
# Per-epoch measurements of the training loop: the only default metrics looked up in the
# metric history when trials do not summarise them (an explicit --metric always may be).
HISTORY_METRICS: tuple[str, ...] = ("train_loss", "val_loss", "val_accuracy", "lr", "max_sigma")
_LOWER_IS_BETTER = re.compile(
    r"(loss|nll|ece|brier|gap|lipschitz|sigma|time|duration|n_params)", re.IGNORECASE
)
_LIFECYCLE = (
    "ml.trial.start",
    "ml.trial.complete",
    "ml.trial.failed",
    "ml.run.start",
    "ml.run.stop",
)
ARM_COLORS = {"SN": "#1f77b4", "none": "#d62728"}


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better (losses, calibration errors, gaps,
    Lipschitz bounds, σ and costs are lower-is-better).

    Example:
        >>> higher_is_better("test_accuracy"), higher_is_better("test_nll")
        (True, False)
    """
    if not isinstance(metric, str):
        raise StudyError(f"metric: a metric's name (text), not {metric!r}")
    return _LOWER_IS_BETTER.search(metric) is None


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def _seed_seq(seed: int, name: str, arm: int) -> np.random.SeedSequence:
    """A seed per (seed, metric, arm): a metric's CI does not depend on the others asked."""
    return np.random.SeedSequence([seed, zlib.crc32(name.encode()), arm])


_BOOT_TASK = 128  # resamples per task; fixed, so results never depend on the thread count
_MIN_BOOT = 200  # resamples: fewer leave the 2.5% tail of a 95% CI a handful of draws
_PARALLEL_DRAWS = 2_000_000  # below this much work (index draws) one thread is quicker
_CHUNK_DRAWS = 4_000_000  # indices drawn at once (memory bound per thread)


def _boot_means(
    x: np.ndarray, n_boot: int, seed: np.random.SeedSequence, max_draws: int
) -> tuple[np.ndarray, int]:
    """Means of ``n_boot`` resamples (with replacement) of ``x``; returns (means, B used).

    Values with few distinct levels (accuracies on a finite test set) are resampled as
    multinomial counts over the levels: the same distribution, far fewer draws. Otherwise
    indices are drawn in chunks; when ``n * n_boot`` exceeds ``max_draws`` the number of
    resamples is reduced (never below 200) and reported.

    Resamples are drawn in fixed tasks of ``_BOOT_TASK``, each from its own child of
    ``seed``; large jobs run the tasks on every core (numpy draws without the GIL), and the
    result is the same whatever the number of threads.
    """
    n = len(x)
    levels, counts = np.unique(x, return_counts=True)
    multinomial = len(levels) * 16 <= n
    b = n_boot if multinomial or n * n_boot <= max_draws else max(_MIN_BOOT, max_draws // n)
    out = np.empty(b)
    tasks = [(start, min(b, start + _BOOT_TASK)) for start in range(0, b, _BOOT_TASK)]
    seeds = seed.spawn(len(tasks))
    dtype = _index_dtype(n)
    rows = max(1, _CHUNK_DRAWS // n)

    def run(k: int) -> None:
        rng = np.random.default_rng(seeds[k])
        start, stop = tasks[k]
        if multinomial:
            weights = rng.multinomial(n, counts / n, size=stop - start)
            out[start:stop] = weights @ levels / n
            return
        for lo in range(start, stop, rows):
            hi = min(stop, lo + rows)
            idx = rng.integers(0, n, size=(hi - lo, n), dtype=dtype)
            out[lo:hi] = x[idx].mean(axis=1)

    # a binomial draw (one per level and resample) costs about ten index draws
    work = b * (10 * len(levels) if multinomial else n)
    workers = min(len(tasks), os.cpu_count() or 1)
    if workers > 1 and work >= _PARALLEL_DRAWS:
        with ThreadPoolExecutor(workers, thread_name_prefix="thunderline-bootstrap") as pool:
            list(pool.map(run, range(len(tasks))))
    else:
        for k in range(len(tasks)):
            run(k)
    return out, b


def _index_dtype(n: int) -> type[np.integer[Any]]:
    # 32-bit bounded draws are numpy's quick path: 2.9x quicker than uint16 ones (numpy 2.4,
    # 10 M draws: 28 vs 82 ms), though these carry half the bits
    return np.uint32 if n <= np.iinfo(np.uint32).max else np.int64


def bootstrap_mean_ci(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray | None = None,
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    name: str = "",
    max_draws: int = 10_000_000,
    method: BootMethod = "auto",
) -> tuple[float, float, float, int]:
    """Percentile bootstrap CI of ``mean(x)`` (or ``mean(x) - mean(y)``, arms resampled
    independently): ``(estimate, low, high, resamples)``.

    ``method`` says how the quantiles of the bootstrap distribution are found:
    ``"resample"`` draws ``n_boot`` resamples (Monte Carlo); ``"saddlepoint"`` computes them
    from the resampled mean's cumulant generating function (the Lugannani–Rice formula,
    Davison & Hinkley 1988): no resample is drawn (``resamples`` 0), the result does not
    depend on ``seed``, and it costs a few passes over the distinct values. ``"auto"`` (the
    default) takes the saddlepoint from :data:`SADDLEPOINT_MIN` values per sample, where
    2,000 resamples would cost ~n x 2,000 draws and still carry Monte-Carlo error
    (≈ 0.2 standard errors on each bound at 200 resamples, the most a 10 M-draw budget
    allows for 50,000 pairs), while the saddlepoint's error there is below 0.05 standard
    errors (checked against 20,000 resamples of normal, exponential, lognormal, Pareto,
    Cauchy, zero-inflated and lattice data). Samples with under 20 distinct values
    (resampled as multinomial counts, which is cheap), a CI level below 40% (whose
    bounds sit where the formula cancels), or a value so far from the others (one
    diverged run) that each draw of it moves the mean by more than twice the others'
    standard error (a lumpy bootstrap distribution, which the formula smooths over: its
    bounds were up to 0.4 standard errors off) are resampled whatever the size. When the
    saddlepoint cannot be solved for, the quantiles are resampled (``resamples`` > 0 says
    so), also under ``"saddlepoint"``.

    A sample of one value says nothing about its spread: with fewer than two values in
    ``x`` (or in ``y``) the CI is ``(nan, nan)`` and no resample is drawn (``resamples`` 0),
    never a zero-width interval. The mean of values that are not all finite is undefined:
    a NaN or ±inf anywhere gives ``(nan, nan, nan, 0)``. Values of extreme magnitude
    (1e300, 1e-300) are resampled in units of a power of two, so no sum overflows; an
    estimate or bound beyond the float64 range itself is ±inf.

    Raises:
        StudyError: naming the argument: ``x`` or ``y`` no 1-D sequence of numbers, an
            unknown ``method``, or ``n_boot`` (≥ 200), ``confidence`` (in (0, 1)), ``seed``
            (≥ 0) or ``max_draws`` (≥ 1) out of range.

    Example:
        >>> est, lo, hi, b = bootstrap_mean_ci([0.1, 0.2, 0.15, 0.3, 0.25], seed=1)
        >>> lo < est < hi, b
        (True, 2000)
    """
    _check_boot_options(n_boot, confidence, seed, max_draws)
    if method not in ("auto", "saddlepoint", "resample"):
        raise StudyError(f"method: 'auto', 'saddlepoint' or 'resample', not {method!r}")
    xa = _sample("x", x)
    ya = None if y is None else _sample("y", y)
    return _bootstrap_ci(xa, ya, n_boot, confidence, seed, name, max_draws, method)


_Levels = tuple[np.ndarray, np.ndarray]  # a sample's distinct values (sorted), their counts


def _levels(x: np.ndarray) -> _Levels:
    """``np.unique(x, return_counts=True)``: one sort, shared by the saddlepoint CI and the
    Wilcoxon test of the same differences."""
    levels, counts = np.unique(x, return_counts=True)
    return levels, counts


def _bootstrap_ci(
    xa: np.ndarray,
    ya: np.ndarray | None,
    n_boot: int,
    confidence: float,
    seed: int,
    name: str,
    max_draws: int,
    method: BootMethod,
    known: _Levels | None = None,
) -> tuple[float, float, float, int]:
    """:func:`bootstrap_mean_ci` of float arrays; ``known``: :func:`_levels` of ``xa``
    (one sample only), when the caller has them."""
    if len(xa) == 0 or (ya is not None and len(ya) == 0):
        return math.nan, math.nan, math.nan, 0
    arrays = (xa,) if ya is None else (xa, ya)
    k = _exponent(*arrays)
    if k is None:
        return math.nan, math.nan, math.nan, 0
    if k:
        xa = np.ldexp(xa, -k)
        ya = None if ya is None else np.ldexp(ya, -k)
        known = None  # of the unscaled values
    estimate = float(xa.mean()) - (0.0 if ya is None else float(ya.mean()))
    if len(xa) < 2 or (ya is not None and len(ya) < 2):
        return _unscaled(estimate, k), math.nan, math.nan, 0
    alpha = (1 - confidence) / 2
    if method != "resample":
        samples = [(xa, 1.0)] if ya is None else [(xa, 1.0), (ya, -1.0)]
        bounds = _saddlepoint_bounds(
            samples, alpha, forced=method == "saddlepoint", known=None if ya is not None else known
        )
        if bounds is not None:
            lo, hi = bounds
            return _unscaled(estimate, k), _unscaled(lo, k), _unscaled(hi, k), 0
    means, b = _boot_means(xa, n_boot, _seed_seq(seed, name, 0), max_draws)
    if ya is not None:
        means_y, b_y = _boot_means(ya, n_boot, _seed_seq(seed, name, 1), max_draws)
        b = min(b, b_y)
        means = means[:b] - means_y[:b]
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return _unscaled(estimate, k), _unscaled(float(lo), k), _unscaled(float(hi), k), b


SADDLEPOINT_MIN = 2_000  # values per sample from which "auto" takes the saddlepoint
_SADDLE_LEVELS = 20  # fewer distinct values: resampled (multinomial over levels, cheap)
# |z| of the bounds below which 1/w - 1/u cancels: resampled. ndtri(0.7), so that exactly
# the CI levels under 40% are resampled, as documented
_SADDLE_MIN_Z = 0.5244005127080407
# A value far from the others (one diverged run: 1e6 x the rest) makes the bootstrap
# distribution lumpy: the mean moves by v / n each time that value is drawn (Poisson(1)
# times per resample), and the other values' spread does not smooth the steps out. The
# formula is for a smooth distribution: with steps of 3, 5, 18 times the others' standard
# error its bounds were 0.04, 0.15, 0.3-0.4 standard errors off the resampled quantiles
# (2 times: < 0.02). "auto" resamples beyond this ratio.
_SADDLE_MAX_STEP = 2.0
_SADDLE_FAR_LEVELS = 8  # farthest levels checked so (smooth data: ratios 0.1-1.7 there)


@dataclass(frozen=True)
class _Sample:
    """One sample of the statistic ``sum(sign * mean(resample))``: its distinct values
    (centred on its mean) and their squares, their frequencies (None: each value once), its
    size and sign."""

    values: np.ndarray
    squares: np.ndarray
    freq: np.ndarray | None
    n: int
    sign: float
    scratch: np.ndarray  # room for exp(c * values - top), reused by each evaluation


def _saddlepoint_samples(
    samples: Sequence[tuple[np.ndarray, float]], forced: bool, known: _Levels | None = None
) -> tuple[list[_Sample], float, float] | None:
    """The samples as :class:`_Sample`, the statistic's centre (``sum(sign * mean)``) and
    standard error; None when ``auto`` should resample them instead (too few values or
    distinct values, no spread, a value so far from the others that the bootstrap
    distribution is lumpy: see :data:`_SADDLE_MAX_STEP`). ``known``: :func:`_levels` of
    the one sample, when the caller has them."""
    out, centre, var = [], 0.0, 0.0
    steps: list[tuple[float, float]] = []
    for x, sign in samples:
        n = len(x)
        levels, counts = known if known is not None and len(samples) == 1 else _levels(x)
        mean = float(x.mean())
        values = levels - mean
        squares = values * values
        freq = None if len(levels) == n else counts / n
        sd = math.sqrt(float(squares.mean() if freq is None else freq @ squares))
        if sd == 0 or not math.isfinite(sd):
            return None
        # The formula is for a continuous distribution; on a lattice of span h the
        # resampled mean moves in steps of h / n against a standard error sd / sqrt(n),
        # and a bound can be off by half a step. With 20 distinct values, two at most
        # are within h of the mean, two more within 2h, ...: sd * sqrt(n) (the root of
        # the sum of squared deviations) ≥ h * sqrt(2 * (1² + ... + 9²)) ≈ 24 h, so a step
        # is ≤ 0.04 standard errors, at any n.
        if not forced and (n < SADDLEPOINT_MIN or len(levels) < _SADDLE_LEVELS):
            return None
        out.append(_Sample(values, squares, freq, n, sign, np.empty_like(values)))
        centre += sign * mean
        var += sd * sd / n
        # the levels farthest from the mean (all copies of each): their steps in the
        # resampled mean, and their shares of the resampled mean's variance
        k = min(_SADDLE_FAR_LEVELS, len(squares))
        far = np.argpartition(squares, len(squares) - k)[-k:]  # O(n): no full sort
        shares = counts[far] * squares[far] / n**2
        steps += zip((np.abs(values[far]) / n).tolist(), shares.tolist(), strict=True)
    if not forced:
        # farthest first: each step against what the nearer values contribute, so that two
        # outliers (1e6 and 2e6: the first's step is only 2x the second's spread) are seen
        rest = var
        for step, share in sorted(steps, reverse=True):
            rest -= share
            if step > _SADDLE_MAX_STEP * math.sqrt(max(rest, 0.0)):
                return None
    return out, centre, math.sqrt(var)


def _cgf(samples: Sequence[_Sample], t: float) -> tuple[float, float, float]:
    """The statistic's cumulant generating function and its first two derivatives at
    ``t``: ``K(t) = sum n * k(sign * t / n)`` with ``k(s) = log sum f exp(s v)`` the CGF of
    one draw from a sample (log-sum-exp, so no exp overflows; values are centred, so
    ``E[v²] - E[v]²`` loses nothing: the tilted mean is a few standard errors)."""
    big_k = d1 = d2 = 0.0
    for smp in samples:
        c = smp.sign * t / smp.n
        top = c * float(smp.values[-1] if c > 0 else smp.values[0])  # values are sorted
        e = np.multiply(smp.values, c, out=smp.scratch)  # in place: no temporaries
        e -= top
        np.exp(e, out=e)
        if smp.freq is not None:
            e *= smp.freq
        z = float(e.sum())
        k1 = float(e @ smp.values) / z
        k2 = float(e @ smp.squares) / z - k1 * k1
        if smp.freq is None:
            z /= smp.n
        big_k += smp.n * (top + math.log(z))
        d1 += smp.sign * k1
        d2 += k2 / smp.n
    return big_k, d1, d2


def _lugannani_rice(samples: Sequence[_Sample], t: float) -> tuple[float, float, float, float]:
    """(P(statistic ≤ K'(t)), K'(t), K''(t), dP/dt) by the Lugannani–Rice formula, for
    ``t`` ≠ 0. The slope is the saddlepoint density's, ``φ(w) / sqrt(K''(t))``, times
    ``dK'/dt = K''(t)``: the formula's own slope to a relative O(1/n)."""
    big_k, d1, d2 = _cgf(samples, t)
    w = math.copysign(math.sqrt(2 * max(0.0, t * d1 - big_k)), t)
    root = math.sqrt(max(0.0, d2))
    u = t * root
    if w == 0 or u == 0:
        raise ArithmeticError("saddlepoint at the centre")
    density = math.exp(-w * w / 2) / math.sqrt(2 * math.pi)
    p = 0.5 * math.erfc(-w / math.sqrt(2)) + density * (1 / w - 1 / u)
    return p, d1, d2, density * root


# Newton steps on tau end when the next one is this small (in standard errors, relative to
# tau beyond 1): it is taken on the tangent of K' instead of evaluated (see _saddle_newton)
_NEWTON_LAST = 1e-5


def _saddle_newton(
    samples: Sequence[_Sample], se: float, target: float, tau: float, sign: float
) -> float | None:
    """K'(t) where the Lugannani–Rice tail probability is ``target``, by Newton steps on
    ``tau = t * se`` from ``tau`` (on the side ``sign`` of 0); None when a step fails (the
    caller then takes secant steps and a bracket).

    The slope is the saddlepoint density's (:func:`_lugannani_rice`), off the formula's by
    a relative O(1/n), so each step leaves about that share of the error, plus its square.
    From the Cornish-Fisher start (~1e-3 standard errors off) the second evaluation is
    usually within :data:`_NEWTON_LAST`; that last step is taken on the tangent,
    ``K'(t) + K''(t) dt``, whose error is ``K'''(t) dt ** 2 / 2``, ~1e-10 standard errors.
    The bounds are as close as the secant's tolerance made them (1e-7 standard errors),
    from 2-3 passes over the values per bound instead of 4-5."""
    for _ in range(8):
        t = tau / se
        p, tilted, curvature, slope = _lugannani_rice(samples, t)
        step = -(p - target) * se / slope if slope > 0 else math.nan
        if not math.isfinite(step):
            return None
        if abs(step) <= _NEWTON_LAST * max(1.0, abs(tau)):
            return tilted + curvature * (step / se)
        tau += step
        if tau * sign <= 0:
            return None
    return None


def _saddle_root(gap: Callable[[float], float], start: float, sign: float) -> float | None:
    """The root of ``gap`` (increasing in ``tau``) on the side ``sign`` of 0, from
    ``start``: secant steps, which take 3-5 evaluations on these smooth, nearly linear
    functions, else Brent's method in a bracket (where :func:`_saddle_newton` failed)."""
    from scipy import optimize

    a, b = start, start * 1.02
    fa, fb = gap(a), gap(b)
    for _ in range(12):
        if abs(fb) < 1e-10 and b * sign > 0:
            return b  # on the root (it used to leave for the bracket: 9 evaluations more)
        if fb == fa:
            break
        c = b - fb * (b - a) / (fb - fa)
        if not (c * sign > 0 and math.isfinite(c)):
            break
        a, fa, b = b, fb, c
        fb = gap(b)
        if abs(b - a) <= 1e-7 * max(1.0, abs(b)):  # tau: bounds to 1e-7 standard errors
            return b
    near, far = sign * 1e-3, start
    for _ in range(40):  # widen until the bracket holds the root
        if gap(far) * sign > 0:
            break
        near, far = far, far + sign * max(1.0, abs(far))
    else:
        return None
    while gap(near) * sign > 0:  # the near end past the root: towards 0
        near /= 4
        if abs(near) < 1e-9:
            return None
    return float(optimize.brentq(gap, min(near, far), max(near, far), xtol=1e-7))


def _normal_quantile(p: float) -> float:
    """The standard normal's ``p`` quantile (``scipy.special.ndtri``, within an ulp or two;
    the standard library's, so that a new process's first comparison does not import
    scipy.special)."""
    return statistics.NormalDist().inv_cdf(p) if 0 < p < 1 else math.copysign(math.inf, p - 0.5)


def _saddlepoint_bounds(
    samples: Sequence[tuple[np.ndarray, float]],
    alpha: float,
    forced: bool = False,
    known: _Levels | None = None,
) -> tuple[float, float] | None:
    """The ``alpha`` and ``1 - alpha`` quantiles of the bootstrap distribution of
    ``sum(sign * mean(resample of x))`` (samples resampled independently), by the
    saddlepoint approximation; None when it does not apply (then: resample).

    For each bound, the saddlepoint ``t`` whose tail probability is ``alpha`` is solved
    for in units of 1 / standard error (``tau = t * se``), where the normal
    approximation puts it at ``±z``."""
    z = _normal_quantile(1 - alpha)
    if not (forced and z > 0) and not z >= _SADDLE_MIN_Z:
        return None
    prepared = _saddlepoint_samples(samples, forced, known)
    if prepared is None:
        return None
    smps, centre, se = prepared
    # Each root is started where the Cornish-Fisher expansion puts it, not at the normal's
    # ±z: a skewed statistic's tilt is off ±z by about -skew (2 z² + 1) / 6 (the first
    # terms of K'(t) = se² t + K3 t² / 2 set equal to the skewed quantile), so the secant
    # steps start within a few thousandths and take 2 evaluations fewer per bound.
    third = sum(
        smp.sign
        * float(
            (smp.values @ smp.squares) / smp.n
            if smp.freq is None
            else smp.freq @ (smp.values * smp.squares)
        )
        / smp.n**2
        for smp in smps
    )
    skew = third / se**3
    shift = -skew * (2 * z * z + 1) / 6 if math.isfinite(skew) and abs(skew) < 1 else 0.0
    bounds = []
    try:
        with np.errstate(over="raise", divide="raise", invalid="raise", under="ignore"):
            for target, sign in ((alpha, -1.0), (1 - alpha, 1.0)):
                tilted: dict[float, float] = {}  # tau -> K'(t): the root's is the bound

                def gap(
                    tau: float, target: float = target, tilted: dict[float, float] = tilted
                ) -> float:
                    p, tilted[tau], _, _ = _lugannani_rice(smps, tau / se)
                    return p - target

                start = sign * z + shift
                start = start if start * sign > 0 else sign * z
                found = _saddle_newton(smps, se, target, start, sign)
                if found is None:
                    tau = _saddle_root(gap, start, sign)
                    if tau is None:
                        return None
                    if tau not in tilted:
                        gap(tau)
                    found = tilted[tau]
                bounds.append(centre + found)
    except (ArithmeticError, ValueError, RuntimeError, FloatingPointError):
        return None
    lo, hi = bounds
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        return None
    return lo, hi


# Magnitudes beyond which values are handled in units of a power of two: squares (a
# variance) and sums of up to 2**500 values stay within the float64 range.
_EXTREME = 2.0**200


def _exponent(*arrays: np.ndarray) -> int | None:
    """The power of two ``k`` to divide finite values by (``np.ldexp(x, -k)``, exact) so
    that their largest magnitude is about 1, or 0 when it is not extreme (below 2**200
    and above 2**-200: no scaling, results bit for bit as computed directly); None when
    a value is NaN or ±inf. Every statistic here is computed in those units and scaled
    back: means and differences are scale-equivariant, the t and rank tests invariant."""
    m = 0.0
    for a in arrays:
        if len(a):
            m = max(m, abs(float(a.max())), abs(float(a.min())))  # NaN propagates
    if not math.isfinite(m):
        return None
    if m == 0.0 or 1 / _EXTREME <= m <= _EXTREME:
        return 0
    return math.frexp(m)[1]


def _unscaled(v: float, k: int) -> float:
    """``v * 2**k``: ±inf where the result is beyond the float64 range, NaN stays NaN."""
    if not k or v != v:
        return v
    try:
        return math.ldexp(v, k)
    except OverflowError:
        return math.copysign(math.inf, v)


def _mean(x: np.ndarray) -> float:
    """``x.mean()`` of finite values, without overflow of their sum (NaN when empty)."""
    if not len(x):
        return math.nan
    k = _exponent(x)
    if not k:
        return float(x.mean())
    return _unscaled(float(np.ldexp(x, -k).mean()), k)


def _wilcoxon(d: np.ndarray, known: _Levels | None = None) -> tuple[float, float, str]:
    """Wilcoxon signed-rank: (statistic, p, method).

    Exact without ties/zeros up to n = 50; with ties or zeros, scipy's permutation version
    up to n = 8 (its cost doubles per pair: seconds by n = 12), else the normal
    approximation with tie correction. ``known``: :func:`_levels` of ``d``, when the
    caller has them: beyond 50 differences the ranks are then found from the distinct
    values (no second sort; a pass over the levels, few for an accuracy's differences).

    Differences that are all zero (up to float noise) leave the test undefined: zeros are
    dropped, and no signed rank is left to test (scipy's p = 1 would read as evidence of
    no effect). They give ``(nan, nan, "—")``, as other undefined statistics do.
    """
    if len(d) == 0:
        return math.nan, math.nan, "—"
    k = _exponent(d)
    if k is None:  # compare_arrays passes finite differences only
        return math.nan, math.nan, "—"
    if k:  # 1e-300 or 1e300: ranks and signs are the same in units of 2**k
        d = np.ldexp(d, -k)
        known = None  # of the unscaled values
    if known is not None:
        scale = max(abs(float(known[0][0])), abs(float(known[0][-1])))
    else:
        scale = float(np.max(np.abs(d)))
    if scale == 0:
        return math.nan, math.nan, "—"
    # Differences of floats carry rounding noise (0.85 - 0.84 != 0.01): keep 10 significant
    # digits so true zeros and ties are seen as such.
    decimals = int(9 - math.floor(math.log10(scale)))
    if known is not None and len(d) > 50:  # the normal approximation, whatever the ties
        twice_r_plus, tied, n = _signed_ranks_of_levels(np.round(known[0], decimals), known[1])
        if n == 0:
            return math.nan, math.nan, "—"
        statistic, p = _signed_rank_z(twice_r_plus, tied, n)
        return statistic, max(p, min(1.0, 2.0 * 0.5**n)), "approx"  # the floor: see below
    d = np.round(d, decimals)
    if not np.any(d != 0):
        return math.nan, math.nan, "—"
    nonzero = d[d != 0]
    ranks = _signed_ranks(nonzero)  # |d|'s ranks, tied
    ties = len(ranks[1]) < len(nonzero) or len(nonzero) < len(d)
    if not ties and len(d) <= 50:
        method = "exact"
    elif ties and len(d) <= 8:
        method = "auto"
    else:
        method = "approx"
    if method != "approx":
        from scipy import stats  # (imported here: a new process's first import costs ~1 s)

        res = stats.wilcoxon(d, method=method)
        statistic, p = float(res.statistic), float(res.pvalue)
    else:
        statistic, p = _signed_rank_normal(nonzero, ranks)
        # The normal approximation is anti-conservative in the tail for few pairs with ties
        # (10 equal differences: p = 0.0016). Whatever the ties, no sign assignment of the
        # n nonzero differences (zeros are dropped) is rarer than all n of one sign, which
        # has probability 0.5**n per tail: the exact (permutation) p-value, two-sided, is
        # never below 2 * 0.5**n. Raising the approximation to that floor only moves it
        # towards the exact value, costs nothing, and is negligible beyond a few dozen
        # pairs; the permutation test itself costs 2**n (seconds by n = 12).
        p = max(p, min(1.0, 2.0 * 0.5 ** len(nonzero)))
    return statistic, p, "permutation" if method == "auto" else method


def _signed_ranks(nonzero: np.ndarray) -> tuple[int, np.ndarray]:
    """(twice the sum of the positive differences' average ranks among all |d|, the size
    of each group of tied |d|): :func:`_signed_ranks_of_levels` of their distinct values
    (the sum is an exact integer over 2)."""
    twice_r_plus, tied, _ = _signed_ranks_of_levels(*_levels(nonzero))
    return twice_r_plus, tied


def _signed_ranks_of_levels(levels: np.ndarray, counts: np.ndarray) -> tuple[int, np.ndarray, int]:
    """(twice the sum of the positive differences' average ranks among all |d|, the size
    of each group of tied |d|, the number of nonzero differences) from the differences'
    distinct values (sorted, rounded as the test rounds them, so neighbours may now be
    equal) and their counts: zeros dropped, a level's |d| given its sign in the lowest bit,
    the negative levels reversed (ascending |d|) and merged with the positive ones (a
    stable sort of two sorted runs is one merge), each group of equal |d| then ranked
    ``below + (size + 1) / 2``. O(levels), not O(differences)."""
    if len(levels) > 1 and not (distinct := levels[1:] != levels[:-1]).all():
        starts = np.flatnonzero(np.concatenate([[True], distinct]))
        levels, counts = levels[starts], np.add.reduceat(counts, starts)
    m = int(np.searchsorted(levels, 0.0))  # the negative levels come first
    p = m + 1 if m < len(levels) and levels[m] == 0 else m  # zeros are dropped
    keys = np.concatenate(
        [np.abs(levels[:m][::-1]).view(np.uint64), levels[p:].view(np.uint64)]
    ) << np.uint64(1)
    keys[m:] |= np.uint64(1)
    n = int(counts.sum()) - int(counts[m:p].sum())
    if n == len(keys):  # each nonzero difference its own level (continuous values)
        keys.sort(kind="stable")
        magnitude = keys >> np.uint64(1)
        if not len(keys) or (magnitude[1:] != magnitude[:-1]).all():  # no |d| tied: ranks 1..n
            positive = (keys & np.uint64(1)).astype(np.float64)
            r_plus = positive @ np.arange(1.0, n + 1.0)  # exact: an integer below 2**53
            return 2 * int(r_plus), np.ones(n, dtype=np.int64), n
    counts = np.concatenate([counts[:m][::-1], counts[p:]]).astype(np.int64, copy=False)
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    magnitude = keys >> np.uint64(1)
    starts = np.flatnonzero(np.concatenate([[True], magnitude[1:] != magnitude[:-1]]))
    tied = np.add.reduceat(counts, starts)
    positive = np.add.reduceat(counts * (keys & np.uint64(1)).astype(np.int64), starts)
    below = np.cumsum(tied) - tied
    return int((2 * below + tied + 1) @ positive), tied, n


def _signed_rank_normal(
    nonzero: np.ndarray, ranks: tuple[int, np.ndarray] | None = None
) -> tuple[float, float]:
    """``scipy.stats.wilcoxon(d, method="approx")``'s (statistic, p) for the nonzero
    differences of ``d``, from one sort instead of scipy's stable argsort (4 ms for
    50,000 differences; this costs a fifth of that): tied |d| given their average rank,
    the variance tie-corrected, no continuity correction, two-sided. ``ranks``:
    :func:`_signed_ranks` of them, when the caller has it."""
    twice_r_plus, tied = _signed_ranks(nonzero) if ranks is None else ranks
    return _signed_rank_z(twice_r_plus, tied, len(nonzero))


def _signed_rank_z(twice_r_plus: int, tied: np.ndarray, n_nonzero: int) -> tuple[float, float]:
    """(statistic, p) of the normal approximation from twice R+, the sizes of the groups of
    tied |d| and the number of nonzero differences (see :func:`_signed_rank_normal`)."""
    r_plus = twice_r_plus / 2
    n = float(n_nonzero)
    r_minus = n * (n + 1) / 2 - r_plus
    ties = tied.astype(float)
    var = (n * (n + 1) * (2 * n + 1) - float(ties @ (ties * ties - 1)) / 2) / 24
    z = (r_plus - n * (n + 1) / 4) / math.sqrt(var)
    return min(r_plus, r_minus), min(1.0, math.erfc(abs(z) / math.sqrt(2)))


def _welch(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Welch's t-test: (statistic, p); NaN where it is undefined (fewer than two values in
    an arm, or no variance in either arm: t would be 0/0 or ±∞ whatever the data).

    ``scipy.stats.ttest_ind(a, b, equal_var=False)``'s formulas, with the p from the same
    Student t function (``scipy.special.stdtr``): a new process's first comparison then
    imports scipy.special (0.2-0.5 s), not scipy.stats (~1 s)."""
    from scipy import special

    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan
    k = _exponent(a, b)
    if k is None:
        return math.nan, math.nan
    if k:  # t is the same in units of 2**k; variances of 1e-170 or 1e200 are not
        a, b = np.ldexp(a, -k), np.ldexp(b, -k)
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return math.nan, math.nan
    vn_a, vn_b = float(np.var(a, ddof=1)) / len(a), float(np.var(b, ddof=1)) / len(b)
    df = (vn_a + vn_b) ** 2 / (vn_a**2 / (len(a) - 1) + vn_b**2 / (len(b) - 1))
    t = (float(np.mean(a)) - float(np.mean(b))) / math.sqrt(vn_a + vn_b)
    return t, float(special.stdtr(df, -abs(t))) * 2


def compare_arrays(
    metric: str,
    sn: np.ndarray,
    none: np.ndarray,
    *,
    paired: bool,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    max_draws: int = 10_000_000,
) -> dict[str, Any]:
    """One headline row from values of the two arms (aligned pairs when ``paired``).

    The row is a pure function of the arguments; for large inputs (≥ 5,000 values) it is
    remembered by a digest of the values and arguments and a copy returned when asked again
    (:func:`clear_cache` forgets it).

    Non-finite values (NaN, ±inf) are left out (paired: the pairs with one), and counted in
    ``n_nonfinite``; ``note`` says in words why a statistic is undefined ("" when none is),
    and ``overflow`` is True when SN − none is beyond the float64 range (no estimate, no CI,
    no verdict; the rank or t test, being scale-free, still has its p).

    Raises:
        StudyError: naming the argument: a ``metric`` that is no text, arms that are no 1-D
            sequences of numbers, paired arms of different lengths, or a bootstrap argument
            out of range (as :func:`compare_study` says).

    Example:
        >>> row = compare_arrays("acc", np.array([.9, .8, .85]), np.array([.85, .8, .8]),
        ...                      paired=True)
        >>> row["test"], round(row["diff"], 4)
        ('wilcoxon', 0.0333)
    """
    if not isinstance(metric, str):
        raise StudyError(f"metric: a metric's name (text), not {metric!r}")
    _check_boot_options(n_boot, confidence, seed, max_draws)
    sn, none = _sample("sn", sn), _sample("none", none)
    if paired and len(sn) != len(none):
        raise StudyError(
            f"paired: sn and none must hold one value per pair each, not {len(sn)} and "
            f"{len(none)} values"
        )
    key = None
    sink = _ROW_SINK.get()
    if len(sn) + len(none) >= _ROW_MEMO_MIN and (sink is None or sink.use_memo):
        key = (metric, paired, n_boot, confidence, seed, max_draws, _digest(sn, none))
        with _ROW_MEMO_LOCK:
            cached = _ROW_MEMO.get(key)
            if cached is not None:
                _ROW_MEMO.move_to_end(key)
        if cached is not None:
            if sink is not None:
                sink.rows.append((key, cached))
            return dict(cached)
    row = _compare_arrays(metric, sn, none, paired, n_boot, confidence, seed, max_draws)
    if key is not None:
        kept = dict(row)
        with _ROW_MEMO_LOCK:
            _ROW_MEMO[key] = kept
            while len(_ROW_MEMO) > _ROW_MEMO_SIZE:
                _ROW_MEMO.popitem(last=False)
        if sink is not None:
            sink.rows.append((key, kept))
    return row


# compare_arrays is a pure function of its arguments: large inputs' rows are remembered by
# a digest of the values (a live study's refresh rarely changes every metric's arms)
_ROW_MEMO: OrderedDict[tuple[Any, ...], dict[str, Any]] = OrderedDict()
_ROW_MEMO_LOCK = threading.Lock()
_ROW_MEMO_SIZE = 256
_ROW_MEMO_MIN = 5_000  # values; below this the row is about as quick to recompute as to hash


@dataclass
class _RowSink:
    """What one comparison asks of :func:`compare_arrays`: whether remembered rows may be
    used, and the (key, row) pairs it used or made (kept with the study's snapshot)."""

    use_memo: bool = True
    rows: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)


_ROW_SINK: contextvars.ContextVar[_RowSink | None] = contextvars.ContextVar(
    "thunderline_compare_rows", default=None
)


def _digest(*arrays: np.ndarray) -> bytes:
    """A digest of the arrays' dtypes, shapes and bytes."""
    h = hashlib.sha256()  # SHA-NI: twice blake2b's rate, and a comparison hashes 1.6 MB
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.data)
    return h.digest()


def _compare_arrays(
    metric: str,
    sn: np.ndarray,
    none: np.ndarray,
    paired: bool,
    n_boot: int,
    confidence: float,
    seed: int,
    max_draws: int,
) -> dict[str, Any]:
    hib = higher_is_better(metric)
    row: dict[str, Any] = {"metric": metric, "design": "paired" if paired else "unpaired"}
    sn, none, n_nonfinite = _finite_values(sn, none, paired)
    if paired:
        with np.errstate(over="ignore"):
            d = sn - none
        k = 0
        if not np.isfinite(d).all():  # finite values whose difference is beyond float64
            k = _exponent(sn, none) or 0
            d = np.ldexp(sn, -k) - np.ldexp(none, -k)  # in units of 2**k: |d| <= 2
        d = np.asarray(d, dtype=float)
        known = _levels(d) if len(d) > 50 else None  # one sort for the CI and the test
        est, lo, hi, b = _bootstrap_ci(
            d, None, n_boot, confidence, seed, metric, max_draws, "auto", known
        )
        est, lo, hi = (_unscaled(v, k) for v in (est, lo, hi))
        stat, p, method = _wilcoxon(d, known)  # ranks: the same in any unit
        row.update(
            n_pairs=len(d), n_sn=len(sn), n_none=len(none), test="wilcoxon", test_method=method
        )
    else:
        est, lo, hi, b = bootstrap_mean_ci(
            sn,
            none,
            n_boot=n_boot,
            confidence=confidence,
            seed=seed,
            name=metric,
            max_draws=max_draws,
        )
        stat, p = _welch(sn, none)
        row.update(n_pairs=0, n_sn=len(sn), n_none=len(none), test="welch", test_method="t")
    # an estimate or bound beyond the float64 range is ±inf: shown and judged as undefined
    overflow = any(math.isinf(v) for v in (est, lo, hi))
    if overflow:
        est, lo, hi = math.nan, math.nan, math.nan
    row.update(
        mean_sn=_mean(sn),
        mean_none=_mean(none),
        diff=est,
        ci_low=lo,
        ci_high=hi,
        statistic=stat,
        p_value=p,
        n_boot=b,
        ci_method="resampling" if b else ("saddlepoint" if lo == lo else ""),
        higher_is_better=hib,
        n_nonfinite=n_nonfinite,
        overflow=overflow,
    )
    row["favours"] = _verdict(lo, hi, p, confidence, hib)
    row["note"] = _row_note(row)
    return row


def _finite_values(
    sn: np.ndarray, none: np.ndarray, paired: bool
) -> tuple[np.ndarray, np.ndarray, int]:
    """The finite values of each arm (paired: the pairs finite in both), and how many
    values were left out (NaN or ±inf: no mean, no rank)."""
    ok_sn, ok_none = np.isfinite(sn), np.isfinite(none)
    if ok_sn.all() and ok_none.all():
        return sn, none, 0
    if paired:
        keep = ok_sn & ok_none
        left_out = int(np.count_nonzero(~ok_sn) + np.count_nonzero(~ok_none))
        return sn[keep], none[keep], left_out
    left_out = len(sn) + len(none) - int(np.count_nonzero(ok_sn) + np.count_nonzero(ok_none))
    return sn[ok_sn], none[ok_none], left_out


def _left_out(n: int, kind: str) -> str:
    return f"{n} non-finite value{'s' if n > 1 else ''} ({kind}) left out"


def _row_note(row: Mapping[str, Any]) -> str:
    """Why a row's statistics are undefined or rest on fewer values than given ("" when
    nothing needs saying): what tables show as n/a, in words."""
    why = []
    left_out = int(row.get("n_nonfinite") or 0)
    if left_out:
        why.append(_left_out(left_out, "NaN or ±inf"))
    n_sn, n_none = int(row["n_sn"]), int(row["n_none"])
    if row["design"] == "paired":
        if row["n_pairs"] == 0:
            why.append("no pair has a value in both arms: nothing to compare")
        elif row["n_pairs"] == 1:
            if row["p_value"] != row["p_value"]:
                why.append("a single pair, whose difference is zero: no CI, no test, no verdict")
            else:
                why.append("a single pair: no CI, no verdict (its rank test cannot give p < 1)")
        elif row["p_value"] != row["p_value"]:  # finite differences: no p only when all 0
            why.append(
                "every pair's difference is zero: the Wilcoxon test is undefined (no signed "
                "rank to test), no p-value, no verdict"
            )
    elif n_sn == 0 or n_none == 0:
        empty = " or ".join(arm for arm, n in (("SN", n_sn), ("none", n_none)) if n == 0)
        why.append(f"no value in the {empty} arm: nothing to compare")
    elif min(n_sn, n_none) < 2:
        why.append("a single value in an arm: no CI, no Welch test")
    elif row["p_value"] != row["p_value"]:
        why.append("both arms are constant: Welch's t is undefined (0/0), no verdict")
    if row.get("overflow"):
        why.append("SN − none is beyond the float64 range (±1.8e308): no estimate, no CI")
    return "; ".join(why)


def _verdict(lo: float, hi: float, p: float, confidence: float, hib: bool) -> str:
    """The arm a CI ``[lo, hi]`` of SN − none and a test's ``p`` agree on: SN, none, — (no
    agreement) or n/a (no CI or no test).

    A verdict needs the CI and the test to agree at the same level: with a handful of
    pairs the percentile bootstrap CI is too narrow (4 pairs: 35 distinct resample means)
    while the exact Wilcoxon p cannot fall below 0.125, so a CI alone would name a winner.
    Without a CI or a test (a single pair, constant arms) there is nothing to judge: n/a.
    A comparison of several metrics passes each one's multiplicity-adjusted p
    (:func:`_holm_rows`): with eight metrics tested, a raw p < 0.05 somewhere is no news.
    """
    if lo != lo or p != p:
        return "n/a"
    if (lo > 0 or hi < 0) and p < 1 - confidence:
        return "SN" if (lo > 0) == hib else "none"
    return "—"


def _holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of one family of p-values; NaN (no test) is left out of
    the family and stays NaN.

    The headline tests every metric at once, and its metrics are strongly correlated (the
    accuracies, NLL and ECE of the same models): Holm controls the family-wise error rate
    under any dependence between the tests, and rejects at least what Bonferroni does.
    Benjamini–Hochberg (``scipy.stats.false_discovery_control``) controls the false
    discovery rate instead, a weaker promise than "no false verdict" for a table this small.

    With ``m`` p-values in increasing order ``p(1) ≤ … ≤ p(m)``, ``p(k)`` becomes
    ``max over j ≤ k of (m − j + 1)·p(j)``, capped at 1: monotone in ``p``, so tied p-values
    share one adjusted value, and a family of one is left as it is.

    Example:
        >>> _holm([0.01, 0.04, 0.02, float("nan")]).tolist()
        [0.03, 0.04, 0.04, nan]
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    m = len(tested)
    order = tested[np.argsort(p[tested], kind="stable")]
    out[order] = np.minimum(np.maximum.accumulate((m - np.arange(m)) * p[order]), 1.0)
    return out


def _families(table: pd.DataFrame) -> list[np.ndarray]:
    """The rows of each family of tests in a table of comparison rows: the whole table (one
    comparison, a row per metric), or each SN coefficient's rows of a per-coefficient table
    (each group is its own comparison of SN at that coefficient with none, adjusted as one
    family by :func:`_subset_rows`)."""
    keys = [c for c in ("coeff", "coeff_range", "sn_mode") if c in table.columns]
    if not keys or table.empty:
        return [np.arange(len(table))]
    groups = table.groupby(keys, sort=False, dropna=False).indices
    return [np.asarray(rows) for rows in groups.values()]


def _holm_rows(rows: Sequence[Mapping[str, Any]], confidence: float) -> list[dict[str, Any]]:
    """The rows of one comparison (one family of tests, a row per metric) with ``p_holm``,
    their ``p_value`` adjusted by :func:`_holm`, beside it, and ``favours`` judged on it.

    Computed over the rows a comparison assembled, never stored with them: a metric's row
    is remembered (in memory, in the snapshot) whatever metrics it was compared beside, and
    its family is only known here; the remembered row keeps its verdict on its own p.
    """
    adjusted = _holm([row["p_value"] for row in rows]).tolist()
    out = []
    for row, q in zip(rows, adjusted, strict=True):
        new: dict[str, Any] = {}
        for key, value in row.items():
            if key != "p_holm":
                new[key] = value
            if key == "p_value":
                new["p_holm"] = q
        hib = row.get("higher_is_better")
        hib = higher_is_better(str(row["metric"])) if hib is None else bool(hib)
        new["favours"] = _verdict(row["ci_low"], row["ci_high"], q, confidence, hib)
        out.append(new)
    return out


def _with_holm(table: pd.DataFrame, confidence: float) -> pd.DataFrame:
    """``table`` with ``p_holm`` over each of its families (:func:`_families`), and
    ``favours`` judged on it (:func:`_holm_rows`)."""
    if not len(table):
        return table.assign(p_holm=pd.Series(dtype=float))
    records = table.to_dict("records")
    for family in _families(table):
        adjusted = _holm_rows([records[i] for i in family], confidence)
        for i, row in zip(family, adjusted, strict=True):
            records[i] = row
    out = pd.DataFrame(records, index=table.index)
    out.attrs.update(table.attrs)
    return out


def _ci_text(tables: Sequence[pd.DataFrame], confidence: float, seed: int) -> str:
    """How the tables' CIs were computed, for a report's header (every table the report
    shows: the headline, by coefficient, by SN mode): the seed only where resamples were
    drawn, the saddlepoint where they were not."""
    methods: set[str] = set()
    for table in tables:
        if table.empty:
            continue
        methods |= set(table["ci_method"]) if "ci_method" in table.columns else {"resampling"}
    methods = methods or {"resampling"}
    text = f"{_percent(confidence)} percentile bootstrap CI"
    if "saddlepoint" not in methods:
        return f"{text} (seed {seed})"
    if "resampling" not in methods:
        return f"{text} (saddlepoint approximation: no resample drawn, no seed)"
    return f"{text} (resampled with seed {seed}; saddlepoint approximation where the notes say)"


def _holm_note(table: pd.DataFrame) -> str:
    """One line saying what ``p_holm`` adjusts for in ``table``: the family (how many tests)
    and the method."""
    p = table["p_value"].to_numpy(dtype=float) if "p_value" in table.columns else np.array([])
    sizes = sorted({int(np.count_nonzero(~np.isnan(p[rows]))) for rows in _families(table)})
    sizes = [m for m in sizes if m] or [0]  # a coefficient without any test: no family
    where = ""
    if "coeff_range" in table.columns:
        where = "within each coefficient's comparison (not across them), "
    elif "sn_mode" in table.columns:
        where = "within each SN mode's comparison (not across them), "
    if sizes[-1] == 0:
        return "p_holm: no metric has a p-value: nothing to adjust."
    if sizes[-1] == 1:
        return f"p_holm: {where}one test (one metric with a p-value): p_holm = p, unadjusted."
    count = f"{sizes[0]}–{sizes[-1]}" if len(sizes) > 1 else f"{sizes[0]}"
    return (
        f"p_holm: p adjusted by Holm's step-down method {where}over {count} tests (one per "
        "metric with a p-value), controlling the family-wise error rate however the metrics "
        "correlate; favours uses p_holm; CIs are per metric, not adjusted."
    )


# what SN bounds by construction: a verdict for SN on these is the constraint at work
_BOUNDED_BY_SN = re.compile(r"(lipschitz_upper|sigma)", re.IGNORECASE)


def _direction_note(table: pd.DataFrame) -> str:
    """One line saying which direction of each metric of ``table`` counts as better (what
    ``favours`` is read by: :func:`higher_is_better`), and which metrics SN bounds by
    construction (the Lipschitz upper bound, σ), where favouring SN is no better model."""
    metrics = list(dict.fromkeys(str(m) for m in table["metric"])) if "metric" in table else []
    if not metrics:
        return "Better: no metric compared."
    higher = [m for m in metrics if higher_is_better(m)]
    lower = [m for m in metrics if not higher_is_better(m)]
    parts = [f"higher is better for {', '.join(higher)}"] if higher else []
    if lower:
        parts.append(f"lower is better for {', '.join(lower)}")
    text = f"Better: {'; '.join(parts)} (favours names the arm better in that direction)."
    bounded = [m for m in metrics if _BOUNDED_BY_SN.search(m)]
    if bounded:
        text += (
            f" SN bounds {', '.join(bounded)} by construction (each layer's σ is held to its "
            "coefficient): favouring SN there shows the constraint at work, not a better model."
        )
    return text


# ---------------------------------------------------------------------------------------------
# Columnar, incrementally refreshed view of a study's trials
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Encoded:
    """An object column as a snapshot holds it (:func:`_encode_objects`): ``arrays`` its
    members (views of the mapped file), ``how`` their encoding, ``n`` its rows; ``tail``
    the values of rows a refresh appended since (kept as they came). Each :meth:`decode`
    gives a new array, so a result's column decoded later shows the values it compared
    even after a refresh patched the frame's own copy. Only columns :meth:`check` accepts
    are kept so: NUL-joined strings (``joined``: trial ids) or ``first`` codes over
    NUL-joined distinct strings (pair ids)."""

    name: str
    how: Mapping[str, Any]
    arrays: Mapping[str, np.ndarray]
    n: int
    tail: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=object))

    def decode(self) -> np.ndarray:
        head = _decode_objects(self.name, self.how, self.arrays, self.n)[0]
        return np.concatenate([head, self.tail]) if len(self.tail) else head

    def extended(self, values: np.ndarray) -> _Encoded:
        """The column with the rows of ``values`` appended (what it derived from its
        stored members kept: a live study's refreshes do not derive it again)."""
        tail = np.concatenate([self.tail, values])
        more = _Encoded(self.name, self.how, self.arrays, self.n, tail)
        for cached in ("_text", "_nuls", "_stored"):
            if cached in self.__dict__:
                more.__dict__[cached] = self.__dict__[cached]
        return more

    def check(self) -> bool:
        """Whether the column can stay encoded: NUL-joined text that is valid UTF-8 and
        holds as many values as it says, with codes in range, so that a later decode
        cannot fail (checked in ~1 ms, not decoded). False: decode it now."""
        how, text = self.how, self.arrays.get(f"{self.name}.text")
        if text is None:
            return False
        count: Any
        if how["kind"] == "joined":
            count = self.n
        elif how["kind"] == "first" and how.get("text") == "joined":
            count = how.get("count")
            codes = self.arrays.get(f"{self.name}.codes")
            if not isinstance(count, int) or codes is None or codes.shape != (self.n,):
                return False
            if self.n and (codes.min() < -1 or codes.max() >= count):
                return False
        else:
            return False
        if text.dtype != np.uint8 or text.ndim != 1:
            return False
        top, nuls = _byte_max_and_nuls(text)
        if top >= 0x80:  # not ASCII: valid UTF-8?
            try:
                text.tobytes().decode()
            except UnicodeDecodeError:
                return False
        if how.get("index") is not None:
            crc = self.arrays.get(f"{self.name}.crc")
            order = self.arrays.get(f"{self.name}.order")
            if how["index"] != "crc32" or crc is None or order is None:
                return False
            if crc.shape != (count,) or order.shape != (count,) or crc.dtype != np.uint32:
                return False
            if count and (order.min() < 0 or order.max() >= count or (crc[1:] < crc[:-1]).any()):
                return False
        return nuls == count - 1 if count else not len(text)

    @functools.cached_property
    def _text(self) -> bytes:
        """The joined text between two NULs: each value is then found as NUL value NUL."""
        return b"\0" + self.arrays[f"{self.name}.text"].tobytes() + b"\0"

    def _positions(self, value: Any) -> list[int]:
        """Where ``value`` sits among the joined strings (row or code), found in the text
        (a few rows' lookups cost less than decoding 100,000 strings)."""
        if not isinstance(value, str) or "\0" in value:
            return []
        if self.how.get("index") == "crc32":  # the strings with its CRC: one of them, or none
            crc = self.arrays[f"{self.name}.crc"]
            key = np.uint32(zlib.crc32(value.encode()))
            lo, hi = np.searchsorted(crc, key, "left"), np.searchsorted(crc, key, "right")
            if lo == hi:  # no string has its CRC (a new id): the text is not read
                return []
            nuls, text = self._nuls, self._text
            same = sorted(self.arrays[f"{self.name}.order"][lo:hi].tolist())
            return [k for k in same if text[nuls[k] + 1 : nuls[k + 1]].decode() == value]
        text, needle, found = self._text, b"\0" + value.encode() + b"\0", []
        at = text.find(needle)
        while at >= 0:
            found.append(int(np.searchsorted(self._nuls, at)))  # the NUL before it: its index
            at = text.find(needle, at + 1)
        return found

    def rows_of(self, value: Any) -> np.ndarray:
        """The rows holding ``value`` (a ``joined`` column)."""
        tail = np.flatnonzero(self.tail == value) + self.n if len(self.tail) else ()
        return np.asarray([*self._positions(value), *tail], dtype=np.intp)

    def code_of(self, value: Any, codes: np.ndarray) -> int | None:
        """``value``'s code in ``codes`` (the frame's codes of a ``first`` column: the
        stored ones, then those of the tail), or None when no row holds it."""
        found = self._positions(value)
        if found:
            return found[0]
        tail = self.tail[: len(codes) - self.n]  # (not the rows being coded)
        hits = np.flatnonzero(tail == value)
        return int(codes[self.n + hits[0]]) if len(hits) else None

    def table(self, codes: np.ndarray) -> np.ndarray:
        """Each code's value, in code order, then None (code -1's slot), for the frame's
        ``codes`` of a ``first`` column: the stored distinct values, then the ids of new
        codes the tail brought."""
        table = self._stored
        tail_codes = np.asarray(codes[self.n :])
        count = len(table) - 1
        new = tail_codes >= count
        if not new.any():
            return table
        extra = np.empty(int(tail_codes.max()) + 1 - count, dtype=object)
        extra[tail_codes[new] - count] = self.tail[new]
        return np.concatenate([table[:-1], extra, table[-1:]])

    @functools.cached_property
    def _stored(self) -> np.ndarray:
        """The stored distinct values in code order, then None: decoded once (the pairs'
        labels, a result's pair ids and the twin check each ask)."""
        table = _code_table(self.name, self.how, self.arrays)
        table.flags.writeable = False
        return table

    @functools.cached_property
    def _nuls(self) -> np.ndarray:
        """The positions of the NULs in :attr:`_text`: value ``k`` lies between the
        ``k``-th and the next."""
        return np.flatnonzero(np.frombuffer(self._text, dtype=np.uint8) == 0)

    def take(self, rows: np.ndarray, codes: np.ndarray | None = None) -> np.ndarray:
        """The values of ``rows``: through ``codes`` and the distinct values of a ``first``
        column (only those decoded); a few rows of a ``joined`` column cut from its text;
        else from the whole column decoded."""
        if codes is not None and self.how["kind"] == "first":
            return self.table(codes)[codes[rows]]
        if self.how["kind"] != "joined" or len(rows) * 8 > self.n:
            return self.decode()[rows]
        text, nuls, out = self._text, self._nuls, np.empty(len(rows), dtype=object)
        for j, row in enumerate(rows.tolist()):
            out[j] = (
                self.tail[row - self.n]
                if row >= self.n
                else text[nuls[row] + 1 : nuls[row + 1]].decode()
            )
        return out


def _byte_max_and_nuls(text: np.ndarray, chunk: int = 1 << 18) -> tuple[int, int]:
    """The largest byte of ``text`` (uint8) and how many are NUL, read a chunk at a time
    (no copy of the text, no text-sized temporary)."""
    top = nuls = 0
    for start in range(0, len(text), chunk):
        part = text[start : start + chunk]
        top = max(top, int(part.max()))
        nuls += len(part) - int(np.count_nonzero(part))
    return top, nuls


class _Later:
    """A result's column made when first read: ``make(*args)``, once (a snapshot's trial
    and pair ids, decoded only if the result's trials table is asked for)."""

    def __init__(self, make: Callable[..., np.ndarray], *args: Any) -> None:
        self._make, self._args = make, args
        self._value: np.ndarray | None = None
        self._lock = threading.Lock()

    def __call__(self) -> np.ndarray:
        with self._lock:
            if self._value is None:
                value = self._make(*self._args)
                value.flags.writeable = False
                self._value = value
            return self._value


# Rows of room after each float column of a snapshot (NaN on disk) and after a loaded
# frame's pair codes: a refresh appends its rows there (a live study's next hours) instead of
# copying every 100,000-row column into a new array. The file is mapped copy-on-write, so
# appending touches a page or two per column, not ~200 new ones.
_SPARE_ROWS = 4096


def _appended(frame: _Frame, name: str, arr: np.ndarray, more: np.ndarray) -> np.ndarray:
    """``arr`` with the rows of ``more`` after it: written into the room after ``arr``
    when it is the start of ``frame.spare[name]`` and that has room (the rows before are
    not changed, so arrays that hold them still read the same), else a new array."""
    full = frame.spare.get(name)
    n, k = len(arr), len(more)
    if (
        full is not None
        and n + k <= len(full)
        and arr.dtype == full.dtype
        and arr.ndim == full.ndim == 1
        and arr.strides == full.strides
        and arr.__array_interface__["data"][0] == full.__array_interface__["data"][0]
        and full.flags.writeable
    ):
        full[n : n + k] = more
        return full[: n + k]
    frame.spare.pop(name, None)
    return np.concatenate([arr, more])


@dataclass(frozen=True)
class _Room:
    """A float column stored with :data:`_SPARE_ROWS` NaN rows after it (:func:`_write_npz`)."""

    values: np.ndarray


@dataclass
class _Frame:
    run: np.ndarray
    trial: np.ndarray
    status: np.ndarray
    sn: np.ndarray  # 1.0 / 0.0 / nan
    coeff: np.ndarray
    pair: np.ndarray  # object: pair_id or None
    columns: dict[str, np.ndarray]  # metric key -> float values (nan: missing)
    keys: set[str]  # metric keys seen in the study's trials (sampled)
    watermark: int
    # metric key -> {row: description} of stored values that are no usable number: "nan"
    # (NaN written out of band), else the value's repr ('abc', '[1,2]'); read as nan in
    # ``columns``, counted and named by each row's note. Empty in a healthy study.
    odd: dict[str, dict[int, str]] = field(default_factory=dict)
    # pair id -> whether its trials are identical twins (_identical_twins), for the pairs
    # asked about; a refresh forgets the pairs of the trials it changed
    twins: dict[Any, bool] = field(default_factory=dict)
    store_ref: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    _index: dict[tuple[str, str], int] | None = None
    _pair_codes: np.ndarray | None = None
    _pair_extended: np.ndarray | None = None  # the pair codes a refresh last extended
    _status_codes: tuple[np.ndarray, np.ndarray] | None = None
    _str_codes: set[str] = field(default_factory=set)  # codes computed from str (and None)
    # metric-history fallbacks: (metric, mode) -> (watermark, values or None)
    history: dict[tuple[str, str], tuple[int, np.ndarray | None]] = field(default_factory=dict)
    # what the comparison derives from the rows (arms per statuses, counts): cleared whenever
    # a refresh changes a row
    derived: dict[Any, Any] = field(default_factory=dict)
    # the on-disk snapshot: ``version`` counts changes of rows, columns or keys; ``saved`` is
    # the (version, watermark) last saved or loaded; ``memo`` the statistic rows computed
    # over the frame's values (kept with the snapshot, most recently used last)
    version: int = 0
    saved: tuple[int, int] | None = None
    saved_time: float = 0.0  # time.monotonic() of the last save or load
    memo: OrderedDict[tuple[Any, ...], dict[str, Any]] = field(default_factory=OrderedDict)
    memo_dirty: bool = False
    # object columns a snapshot left encoded (trial ids, pair ids): decoded when first read
    # (``frame.trial``); a comparison of an unchanged snapshot reads none of them
    deferred: dict[str, _Encoded] = field(default_factory=dict, repr=False)
    # column -> the buffer it is the first rows of, with room after them that a refresh
    # appends its rows into (:func:`_appended`): a snapshot's float columns and pair codes
    spare: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    if not TYPE_CHECKING:  # (mypy still checks every attribute against the fields)

        def __getattr__(self, name: str) -> Any:
            encoded = self.__dict__.get("deferred", {}).get(name)
            if encoded is None:
                raise AttributeError(f"'_Frame' object has no attribute {name!r}")
            value = self.__dict__[name] = encoded.decode()
            self.deferred.pop(name, None)
            return value

    def values(self, name: str, rows: np.ndarray) -> np.ndarray:
        """``getattr(self, name)[rows]``, without decoding a column left encoded."""
        encoded = self.deferred.get(name)
        if encoded is None:
            return np.asarray(getattr(self, name)[rows])
        return encoded.take(rows, self.pair_codes() if name == "pair" else None)

    def defer(self, name: str, encoded: _Encoded) -> None:
        """Leave the object column ``name`` encoded until it is first read."""
        self.__dict__.pop(name, None)
        self.deferred[name] = encoded

    @property
    def n(self) -> int:
        return len(self.sn)

    def index(self) -> dict[tuple[str, str], int]:
        if self._index is None:
            self._index = {k: i for i, k in enumerate(zip(self.run, self.trial, strict=True))}
        return self._index

    def status_codes(self) -> tuple[np.ndarray, np.ndarray]:
        """(distinct statuses, each trial's index into them), cached until a refresh."""
        if self._status_codes is None:
            if _all_str(self.status):  # hash, then sort the few distinct (np.unique's answer)
                first, uniq = pd.factorize(self.status)
                self._status_codes = _sorted_codes(first, uniq)
                self._str_codes.add("status")
            else:
                self._str_codes.discard("status")
                names, codes = np.unique(self.status.astype(str), return_inverse=True)
                self._status_codes = (names, codes.reshape(-1))
        return self._status_codes

    def pair_codes(self) -> np.ndarray:
        if self._pair_codes is None:
            has = np.array([p is not None for p in self.pair], dtype=bool)
            codes = np.full(self.n, -1, dtype=np.int64)
            self._str_codes.add("pair")
            if has.any():
                ids = self.pair[has]
                if not _all_str(ids):
                    ids = pd.Series(ids).astype(str).to_numpy()
                    self._str_codes.discard("pair")
                codes[has] = pd.factorize(ids)[0]
            self._pair_codes = codes
        return self._pair_codes

    def codes_after_refresh(self, start: int, patched: Mapping[int, Any]) -> None:
        """Keep the pair and status codes through a refresh that appended the rows from
        ``start`` and changed the rows of ``patched`` (row -> its pair id before): each is
        extended where that gives exactly what :meth:`pair_codes` / :meth:`status_codes`
        would compute again (a live study's new trials), else dropped and recomputed."""
        self._pair_codes = self._extended_pair_codes(start, patched)
        self._status_codes = self._extended_status_codes(start, patched)

    def _extended_pair_codes(self, start: int, patched: Mapping[int, Any]) -> np.ndarray | None:
        codes = self._pair_codes
        if codes is None or "pair" not in self._str_codes:
            return None  # not computed, or ids of mixed types (compared as their str)
        encoded = None if patched else self.deferred.get("pair")
        if encoded is not None:  # still the snapshot's text: the new rows end its tail
            new = encoded.tail[start - encoded.n :].tolist()
        elif any(
            type(self.pair[i]) is not type(old) or self.pair[i] != old for i, old in patched.items()
        ):
            return None  # a trial changed pair: codes after it would be renumbered
        else:
            new = self.pair[start:].tolist()
        if not {str, type(None)}.issuperset(map(type, new)):
            return None
        found: dict[Any, int] = {}
        # a few new rows: each id is looked for among the known (in the snapshot's text)
        scan = len(new) <= (_SCAN_ROWS if encoded is None else _TEXT_SCAN_ROWS)
        if not scan:
            known = self.pair[:start]
            # many: the known rows holding their ids, in one vectorised pass (a dict of every
            # id would cost 4x that at 50,000 pairs); the ids not found are new
            wanted = {pid for pid in new if pid is not None}
            hits = np.flatnonzero(pd.Series(known, copy=False).isin(wanted).to_numpy())
            for i, code in zip(hits.tolist(), codes[hits].tolist(), strict=True):
                found.setdefault(known[i], code)
        next_code = int(codes[:start].max(initial=-1)) + 1
        extra = np.empty(len(new), dtype=np.int64)
        for j, pid in enumerate(new):
            if pid is None:
                extra[j] = -1
                continue
            code = found.get(pid)
            if code is None and scan and encoded is not None:
                code = encoded.code_of(pid, codes)
            elif code is None and scan:
                hits = np.flatnonzero(self.pair[:start] == pid)
                code = int(codes[hits[0]]) if len(hits) else None
            if code is None:  # a new id takes the next code, as pd.factorize numbers them
                code, next_code = next_code, next_code + 1
            found[pid] = extra[j] = code
        out = _appended(self, "pair_codes", codes[:start], extra)
        self._pair_extended = out
        return out

    def _extended_status_codes(
        self, start: int, patched: Mapping[int, Any]
    ) -> tuple[np.ndarray, np.ndarray] | None:
        known = self._status_codes
        if known is None or "status" not in self._str_codes:
            return None
        names, codes = known
        index = {name: k for k, name in enumerate(names.tolist())}
        try:  # KeyError: a status not seen before (names change), or not a str
            extra = np.array([index[s] for s in self.status[start:].tolist()], dtype=codes.dtype)
            fixed = [(i, index[self.status[i]]) for i in patched]
        except (KeyError, TypeError):
            return None
        out = np.concatenate([codes[:start], extra])
        for i, k in fixed:
            out[i] = k
        if fixed and np.bincount(out, minlength=len(names)).min() == 0:
            return None  # a status that no trial has any more: the names change
        return names, out


def _sorted_codes(first: np.ndarray, uniq: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values sorted, each row's index into them) from codes in order of first
    appearance (``pd.factorize``) and their distinct values: ``np.unique``'s answer."""
    names = np.asarray(uniq, dtype=object).astype(str)
    order = np.argsort(names, kind="stable")
    rank = np.empty(len(order), dtype=np.intp)
    rank[order] = np.arange(len(order))
    return names[order], rank[first]


_CACHE: OrderedDict[tuple[Any, ...], _Frame] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 4
_REBUILD_EVENTS = 250_000  # beyond this many new events, rebuild instead of diffing
_REBUILD_TRIALS = 20_000
_SCAN_ROWS = 8  # up to this many changed trials a refresh scans for them (no 100k-key dict)
# ... and up to this many it finds in a snapshot's ids (each by a binary search over their
# CRCs, ~10 us) instead of decoding them (~10 ms at 100,000 trials)
_TEXT_SCAN_ROWS = 512


_STUDY_LOCKS: dict[tuple[Any, ...], Any] = {}  # a few hundred bytes per study compared


def _study_lock(store: TrialStore, study: str) -> Any:
    """One comparison of a study at a time in this process: threads comparing it share its
    frame (a notebook's cell and a background run's, a server's requests)."""
    key = _store_key(store, study)
    with _CACHE_LOCK:
        lock = _STUDY_LOCKS.get(key)
        if lock is None:
            lock = _STUDY_LOCKS[key] = threading.RLock()
        return lock


def _store_key(store: TrialStore, study: str) -> tuple[Any, ...]:
    if store.path == ":memory:":
        return ("mem", id(store), study)
    return ("file", str(Path(store.path).resolve()), study)


def _read(store: TrialStore, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    import sqlite3

    try:
        return store.conn.execute(sql, list(params)).fetchall()
    except sqlite3.Error as exc:
        from thunderline_lab.errors import StoreError

        raise StoreError(f"{store.path}: comparison query failed: {exc}") from exc


def _json_path(key: str) -> str:
    return '$."' + key.replace('"', "") + '"'


def _malformed_json(exc: BaseException) -> bool:
    """Whether ``exc`` (a :class:`StoreError` from :func:`_read`) is SQLite refusing a JSON
    text: ``NaN`` or ``Infinity`` written into a trial's metrics out of band (SQLite before
    3.42 rejects those tokens; Python's json writes and reads them), or broken JSON."""
    import sqlite3

    cause = exc.__cause__
    return isinstance(cause, sqlite3.Error) and "malformed JSON" in str(cause)


class _StoredNaN:
    """A NaN read from a trial's JSON by the Python fallback (:func:`_fetch_rows_parsed`):
    a value written to the store, unlike a missing key; it becomes nan in the frame and is
    counted (:attr:`_Frame.odd`)."""

    def __repr__(self) -> str:
        return "NaN"


_STORED_NAN = _StoredNaN()


def _parse_json(store: TrialStore, text: Any, run: Any, trial: Any, column: str) -> Any:
    """``text``, a JSON column of a trials row, parsed as Python's json reads it (``NaN``,
    ``Infinity`` accepted); None for NULL.

    Raises:
        StoreError: the text is not JSON, naming the row (model_run_id, trial_id) and the
            column.
    """
    if text is None:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError) as exc:
        from thunderline_lab.errors import StoreError

        raise StoreError(
            f"{store.path}: trials row (model_run_id {run!r}, trial_id {trial!r}): "
            f"column {column} is not valid JSON: {exc}"
        ) from None


def _json_value(obj: Any, key: str) -> Any:
    """What ``json_extract(text, _json_path(key))`` gives for the parsed ``obj``: None when
    missing or null, 1/0 for true/false, numbers as they are, arrays and objects as JSON
    text; a NaN as :data:`_STORED_NAN`."""
    if not isinstance(obj, dict):
        return None
    v = obj.get(key.replace('"', ""))
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float) and v != v:
        return _STORED_NAN
    if isinstance(v, list | dict):
        return json.dumps(v, separators=(",", ":"))
    return v


def _as_float(v: Any) -> float:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float):
        return float(v)
    return math.nan


def _odd_value(v: Any) -> str | None:
    """How a stored metric value that is no usable number is described: ``"nan"`` for a
    NaN (:data:`_STORED_NAN`), else its repr, shortened ('abc', '[1,2]'); None for a
    number (±inf included: counted apart) or a missing value."""
    if v is None or isinstance(v, int | float):
        return None
    if v is _STORED_NAN:
        return "nan"
    text = repr(v)
    return text if len(text) <= 40 else text[:36] + "…" + text[-1]


def _set_odd(odd: dict[str, dict[int, str]], key: str, i: int, v: Any) -> None:
    """Record (or forget) row ``i``'s value ``v`` of ``key`` in a frame's ``odd``."""
    what = _odd_value(v)
    if what is not None:
        odd.setdefault(key, {})[i] = what
    elif key in odd:
        odd[key].pop(i, None)
        if not odd[key]:
            del odd[key]


_NUMERIC_TYPES = frozenset({float, int, type(None)})


def _all_str(values: Iterable[Any]) -> bool:
    return {str}.issuperset(map(type, values))


def _floats(
    values: Sequence[Any],
    convert: Callable[[Any], float] | None = None,
    odd: dict[int, str] | None = None,
) -> np.ndarray:
    """``[convert(v) for v in values]`` as a float array (``convert`` defaults to
    :func:`_as_float`), vectorised when every value is a float, an int or None (what SQLite
    returns for numbers and missing keys; None becomes nan).

    ``odd``: filled with {position: description} of the values that are no usable number
    (:func:`_odd_value`: text, a list, a stored NaN); only values of other types than those
    can be, so the vectorised path has none to look for.
    """
    if _NUMERIC_TYPES.issuperset(map(type, values)):
        with contextlib.suppress(OverflowError):
            return np.array(values, dtype=float)
    if odd is not None:
        for i, v in enumerate(values):
            if (what := _odd_value(v)) is not None:
                odd[i] = what
    return np.array([(convert or _as_float)(v) for v in values], dtype=float)


def _nan_or_float(v: Any) -> float:
    return math.nan if v is None else float(v)


def _fetch_rows(
    store: TrialStore,
    study: str,
    keys: Sequence[str],
    subset: Sequence[tuple[str, str]] | None = None,
    with_metrics_text: bool = False,
    ids_only: bool = False,
) -> list[tuple[Any, ...]]:
    """Rows of (run, trial, status, sn, coeff, pair_id[, metrics text], *values of keys),
    in the trials table's order (its rowid: the order trials first appeared in the log).

    ``ids_only`` leaves status .. pair_id NULL (no JSON read of the parameters): for adding
    metric columns to a frame that already has them.

    When SQLite refuses a row's JSON (a NaN written out of band, or broken JSON), and only
    then, the rows are read again and their JSON parsed in Python
    (:func:`_fetch_rows_parsed`): NaN values arrive as :data:`_STORED_NAN`, broken JSON is
    an error naming the row.
    """
    try:
        return _fetch_rows_sql(store, study, keys, subset, with_metrics_text, ids_only)
    except Exception as exc:
        if not _malformed_json(exc):
            raise
        _log.debug("comparison of %r: %s; parsing the trials' JSON in Python", study, exc)
    return _fetch_rows_parsed(store, study, keys, subset, with_metrics_text, ids_only)


# The pairing unit of a trial: its configuration (``group_id``) when it has a twin
# (``pair_id``). A configuration run on several seeds is one unit, not one per seed: its
# seeds share every hyperparameter, so their pairs are not independent samples, and counting
# them as such would let 10 seeds of 1 configuration look like 10 pairs of evidence. Each
# arm's mean over the seeds is taken first (:func:`_pair_means`). Studies that give no
# ``group_id`` are paired by ``pair_id`` as they are.
_UNIT_SQL = (
    "CASE WHEN json_extract(parameters, '$.pair_id') IS NULL THEN NULL ELSE "
    "COALESCE(json_extract(parameters, '$.group_id'), json_extract(parameters, '$.pair_id')) END"
)


def _fetch_rows_sql(
    store: TrialStore,
    study: str,
    keys: Sequence[str],
    subset: Sequence[tuple[str, str]] | None,
    with_metrics_text: bool,
    ids_only: bool,
) -> list[tuple[Any, ...]]:
    """:func:`_fetch_rows` with ``json_extract`` (the usual path)."""
    columns = (
        (
            "model_run_id, trial_id, NULL, NULL, NULL, NULL"
            if ids_only
            else "model_run_id, trial_id, status, spectral_norm, spectral_norm_coeff, " + _UNIT_SQL
        )
        + (", metrics" if with_metrics_text else "")
        + "".join(", json_extract(metrics, ?)" for _ in keys)
    )
    paths = [_json_path(k) for k in keys]
    if subset is None:
        return _read(store, f"SELECT {columns} FROM trials WHERE study = ?", [*paths, study])
    return [row[1:] for row in _trial_rows(store, study, columns, subset, paths)]


def _trial_rows(
    store: TrialStore,
    study: str,
    columns: str,
    subset: Sequence[tuple[str, str]] | None,
    params: Sequence[Any] = (),
) -> list[tuple[Any, ...]]:
    """(rowid, ``columns``...) of the study's trials (``subset``: those (run, trial), by
    primary-key lookups, not a scan of the study), in rowid order; ``params`` fill the
    placeholders of ``columns``."""
    if subset is None:
        return _read(
            store,
            f"SELECT rowid, {columns} FROM trials WHERE study = ? ORDER BY rowid",
            [*params, study],
        )
    by_run: dict[str, list[str]] = {}
    for run, trial in subset:
        by_run.setdefault(run, []).append(trial)
    out: list[tuple[Any, ...]] = []
    for run, trials in by_run.items():
        for i in range(0, len(trials), 500):
            chunk = trials[i : i + 500]
            out += _read(
                store,
                f"SELECT rowid, {columns} FROM trials WHERE study = ? AND model_run_id = ? "
                f"AND trial_id IN ({', '.join('?' * len(chunk))})",
                [*params, study, run, *chunk],
            )
    out.sort(key=itemgetter(0))
    return out


def _fetch_rows_parsed(
    store: TrialStore,
    study: str,
    keys: Sequence[str],
    subset: Sequence[tuple[str, str]] | None = None,
    with_metrics_text: bool = False,
    ids_only: bool = False,
) -> list[tuple[Any, ...]]:
    """:func:`_fetch_rows` with the JSON parsed in Python: the fallback when SQLite refuses
    a row's JSON. The same rows, but a NaN value is :data:`_STORED_NAN` (SQLite has none).

    Raises:
        StoreError: a row's metrics or parameters are not JSON, naming the row and column.
    """
    rows = _trial_rows(
        store,
        study,
        "model_run_id, trial_id, status, spectral_norm, spectral_norm_coeff, parameters, metrics",
        subset,
    )
    out: list[tuple[Any, ...]] = []
    for _, run, trial, status, sn, coeff, params_text, metrics_text in rows:
        if ids_only:
            head: tuple[Any, ...] = (run, trial, None, None, None, None)
        else:
            params = _parse_json(store, params_text, run, trial, "parameters")
            pair = _json_value(params, "pair_id")
            group = _json_value(params, "group_id")
            pair = None if pair is _STORED_NAN else pair
            if pair is not None and group is not None and group is not _STORED_NAN:
                pair = group  # the pairing unit: the configuration (see _UNIT_SQL)
            head = (run, trial, status, sn, coeff, pair)
        metrics = _parse_json(store, metrics_text, run, trial, "metrics") if keys else None
        values = tuple(_json_value(metrics, k) for k in keys)
        out.append(head + ((metrics_text,) if with_metrics_text else ()) + values)
    return out


def _discover_keys(store: TrialStore, study: str, sample: int = 200) -> set[str]:
    keys: set[str] = set()
    for order in ("ASC", "DESC"):
        rows = _read(
            store,
            f"SELECT metrics FROM trials WHERE study = ? AND status = 'completed' "
            f"ORDER BY rowid {order} LIMIT ?",
            [study, sample],
        )
        for (text,) in rows:
            try:  # Python's json reads the NaN that SQLite's json_extract refuses
                obj = json.loads(text)
            except (TypeError, ValueError):
                continue  # broken JSON: _fetch_rows names the trial
            if isinstance(obj, dict):
                keys.update(obj)
    return keys


KeySelector = Callable[[set[str]], Iterable[str]]


def _build_frame(store: TrialStore, study: str, select: KeySelector) -> _Frame:
    watermark = store.last_seq()
    discovered = _discover_keys(store, study)
    wanted = sorted(set(select(discovered)) & discovered)
    with gc_paused():  # 100,000s of acyclic row tuples
        rows = _fetch_rows(store, study, wanted)
        frame = _frame_from_rows(rows, wanted, discovered, watermark)
        del rows
    frame.store_ref = weakref.ref(store)
    return frame


def _frame_from_rows(
    rows: list[tuple[Any, ...]], keys: Sequence[str], discovered: set[str], watermark: int
) -> _Frame:
    n = len(rows)
    cols = list(zip(*rows, strict=True)) if rows else [()] * (6 + len(keys))
    sn = _floats(cols[3], _nan_or_float)
    coeff = _floats(cols[4], _nan_or_float)
    pair = np.empty(n, dtype=object)
    pair[:] = list(cols[5])
    columns, odd = {}, {}
    for j, k in enumerate(keys):
        found: dict[int, str] = {}
        columns[k] = _floats(cols[6 + j], odd=found)
        if found:
            odd[k] = found
    return _Frame(
        run=np.array(cols[0], dtype=object),
        trial=np.array(cols[1], dtype=object),
        status=np.array(cols[2], dtype=object),
        sn=sn,
        coeff=coeff,
        pair=pair,
        columns=columns,
        keys=set(discovered),
        watermark=watermark,
        odd=odd,
    )


def _refresh(store: TrialStore, study: str, frame: _Frame) -> _Frame | None:
    """Bring ``frame`` up to the store's last event; None when a rebuild is cheaper."""
    last = store.last_seq()
    if last == frame.watermark:
        return frame
    if last < frame.watermark or last - frame.watermark > _REBUILD_EVENTS:
        return None
    marks = ", ".join("?" * len(_LIFECYCLE))
    changed = _read(
        store,
        f"SELECT DISTINCT model_run_id, trial_id FROM events WHERE seq > ? AND seq <= ? "
        f"AND name IN ({marks}) LIMIT ?",
        [frame.watermark, last, *_LIFECYCLE, _REBUILD_TRIALS + 1],
    )
    if len(changed) > _REBUILD_TRIALS:
        return None
    keys = sorted(frame.columns)
    rows = _fetch_rows(store, study, keys, [(r, t) for r, t in changed], with_metrics_text=True)
    encoded = frame.deferred.get("trial")
    if frame._index is not None:
        locate = lambda run, trial: frame.index().get((run, trial))  # noqa: E731
    elif len(rows) <= _TEXT_SCAN_ROWS and encoded is not None:  # found among the encoded ids

        def locate(run: str, trial: str) -> int | None:
            assert encoded is not None
            hits = encoded.rows_of(trial)
            hits = hits[frame.run[hits] == run]
            return int(hits[0]) if len(hits) else None
    elif len(rows) <= _SCAN_ROWS:  # a few: scan, skip the 100k-key dict
        trial_ids, run_ids = frame.trial, frame.run

        def locate(run: str, trial: str) -> int | None:
            hits = np.flatnonzero(trial_ids == trial)
            hits = hits[run_ids[hits] == run]
            return int(hits[0]) if len(hits) else None
    else:  # more: one vectorised pass for the changed ids (the dict of all 100k: 8x that)
        wanted = pd.Series(frame.trial, copy=False).isin({row[1] for row in rows}).to_numpy()
        hits = np.flatnonzero(wanted).tolist()
        ids = zip(frame.run[hits].tolist(), frame.trial[hits].tolist(), strict=True)
        where = dict(zip(ids, hits, strict=True))
        locate = lambda run, trial: where.get((run, trial))  # noqa: E731
    new_keys: set[str] = set()
    patched: list[tuple[int, tuple[Any, ...]]] = []
    appended: list[tuple[Any, ...]] = []
    for row in rows:
        with contextlib.suppress(TypeError, ValueError):
            new_keys.update(json.loads(row[6]))
        compact = row[:6] + row[7:]
        i = locate(row[0], row[1])
        if i is None:
            appended.append(compact)
        else:
            patched.append((i, compact))
    pairs_before = {i: frame.pair[i] for i, _ in patched}
    if frame.twins:
        for pid in [*pairs_before.values(), *(r[5] for _, r in patched), *(r[5] for r in appended)]:
            with contextlib.suppress(TypeError):  # an unhashable pair id is never cached
                frame.twins.pop(pid, None)
    start = frame.n
    for i, row in patched:
        frame.status[i] = row[2]
        frame.sn[i] = math.nan if row[3] is None else float(row[3])
        frame.coeff[i] = math.nan if row[4] is None else float(row[4])
        frame.pair[i] = row[5]
        for j, k in enumerate(keys):
            v = row[6 + j]
            frame.columns[k][i] = _as_float(v)
            if type(v) is not float or k in frame.odd:  # a number: nothing to note or forget
                _set_odd(frame.odd, k, i, v)
    if appended:
        extra = _frame_from_rows(appended, keys, set(), last)
        frame.run = np.concatenate([frame.run, extra.run])
        frame.status = np.concatenate([frame.status, extra.status])
        frame.sn = _appended(frame, "sn", frame.sn, extra.sn)
        frame.coeff = _appended(frame, "coeff", frame.coeff, extra.coeff)
        for name in _LAZY_COLUMNS:
            if (still := frame.deferred.get(name)) is not None:  # kept encoded: a tail
                frame.deferred[name] = still.extended(getattr(extra, name))
            else:
                setattr(frame, name, np.concatenate([getattr(frame, name), getattr(extra, name)]))
        for k in keys:
            frame.columns[k] = _appended(frame, f"col:{k}", frame.columns[k], extra.columns[k])
        for k, found in extra.odd.items():
            frame.odd.setdefault(k, {}).update((start + i, what) for i, what in found.items())
        if frame._index is not None:  # extend the index, not rebuild it
            for j, row in enumerate(appended, start=start):
                frame._index[(row[0], row[1])] = j
    if patched or appended:
        frame.codes_after_refresh(start, pairs_before)
        frame.derived.clear()
        frame.version += 1
    frame.keys |= new_keys
    frame.watermark = last
    return frame


def _ensure_columns(store: TrialStore, study: str, frame: _Frame, keys: Iterable[str]) -> None:
    missing = sorted(k for k in set(keys) & frame.keys if k not in frame.columns)
    if not missing:
        return
    with gc_paused():  # 100,000s of acyclic row tuples
        rows = _fetch_rows(store, study, missing, ids_only=True)
        if len(rows) == frame.n and rows:
            cols = list(zip(*rows, strict=True))
            if cols[1] == tuple(frame.trial) and cols[0] == tuple(frame.run):  # frame order
                for j, k in enumerate(missing):
                    found: dict[int, str] = {}
                    frame.columns[k] = _floats(cols[6 + j], odd=found)
                    if found:
                        frame.odd[k] = found
                frame.version += 1
                return
    frame.version += 1
    index = frame.index()
    for k in missing:
        frame.columns[k] = np.full(frame.n, math.nan)
    for row in rows:
        i = index.get((row[0], row[1]))
        if i is None:
            continue  # a trial newer than the frame: picked up by the next refresh
        for j, k in enumerate(missing):
            frame.columns[k][i] = _as_float(row[6 + j])
            _set_odd(frame.odd, k, i, row[6 + j])


def _probe_keys(store: TrialStore, study: str, frame: _Frame, keys: Iterable[str]) -> None:
    """Add keys that the sampled discovery missed but some trial reports (explicit asks).

    When SQLite refuses a trial's JSON (a NaN written out of band), the study's metrics are
    parsed in Python instead (a broken one is an error naming its trial).
    """
    todo = [k for k in dict.fromkeys(keys) if k not in frame.keys]
    for n, key in enumerate(todo):
        try:
            found = _read(
                store,
                "SELECT 1 FROM trials WHERE study = ? AND json_extract(metrics, ?) IS NOT NULL "
                "LIMIT 1",
                [study, _json_path(key)],
            )
        except Exception as exc:
            if not _malformed_json(exc):
                raise
            reported = _reported_keys_parsed(store, study, todo[n:])
            frame.keys |= reported
            frame.version += bool(reported)
            return
        if found:
            frame.keys.add(key)
            frame.version += 1


def _reported_keys_parsed(store: TrialStore, study: str, keys: Sequence[str]) -> set[str]:
    """Which of ``keys`` some trial of the study reports (not null), its metrics parsed in
    Python (:func:`_probe_keys`' fallback).

    Raises:
        StoreError: a trial's metrics are not JSON, naming the row.
    """
    left, found = set(keys), set()
    for _, run, trial, text in _trial_rows(store, study, "model_run_id, trial_id, metrics", None):
        obj = _parse_json(store, text, run, trial, "metrics")
        hits = {k for k in left if _json_value(obj, k) is not None}
        found |= hits
        left -= hits
        if not left:
            break
    return found


def _get_frame(store: TrialStore, study: str, select: KeySelector, use_cache: bool) -> _Frame:
    """The study's frame, with the columns ``select(keys the study reports)`` asks for."""
    if not use_cache:
        return _build_frame(store, study, select)
    ck = _store_key(store, study)
    with _CACHE_LOCK:
        frame = _CACHE.get(ck)
        if frame is not None:
            _CACHE.move_to_end(ck)
    stale_ref = frame is not None and frame.store_ref is not None and frame.store_ref() is not store
    if stale_ref and ck[0] == "mem":
        frame = None  # another in-memory store reused the id
    if frame is None:  # the study's first read in this process: its snapshot on disk
        frame = _load_snapshot(store, study)
    if frame is not None:
        with frame.lock:
            refreshed = _refresh(store, study, frame)
            if refreshed is not None:
                _ensure_columns(store, study, refreshed, select(refreshed.keys))
        frame = refreshed
    if frame is None:
        frame = _build_frame(store, study, select)
    with _CACHE_LOCK:
        _CACHE[ck] = frame
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return frame


def clear_cache(store: Any = None, *, study: str | None = None) -> None:
    """Forget every cached study view and remembered statistic of this process, after
    writing the snapshots it changed (the next comparison reads the study's snapshot on
    disk, if any, else the store).

    With ``store`` (a :class:`TrialStore`, its database file, a lab directory or
    :class:`~thunderline_lab.lab.Lab`), also delete the comparison snapshots on disk beside
    it (``study``'s only, when given): the next comparison re-reads the store and
    recomputes every CI and test.
    """
    flush_snapshots()  # what this process changed reaches the disk, as at exit
    with _CACHE_LOCK:
        _CACHE.clear()
    with _ROW_MEMO_LOCK:
        _ROW_MEMO.clear()
    if store is None:
        return
    db = _db_path(store)
    folder = snapshot_dir(db)
    if folder is None:
        return
    doomed = (
        [_snapshot_file(db, study)]
        if study is not None
        else [*folder.glob("*.npz"), *folder.glob("*.tmp")]
    )
    for path in doomed:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ---------------------------------------------------------------------------------------------
# The study's frame on disk: a derived cache, like the store's projections
# ---------------------------------------------------------------------------------------------
#
# ``<folder of the store>/cache/compare/<study>.<tag>.npz``: the frame's columns (numpy
# arrays, each member's data 64-byte aligned so that it is mapped in place; object columns
# as NUL-joined strings, or codes plus their distinct values, with a CRC-32 lookup for the
# trial and pair ids; never pickles)
# and a JSON ``meta`` member: the format, the study, the store's identity (the watermark,
# the id of the event logged at it, the log's first event id, the study's highest trials
# rowid at a given last seq), the keys and columns, and the statistic rows computed over the
# frame's values. A snapshot that does not match the store is ignored (and overwritten by
# the next save); a missing, unreadable or unwritable one only costs a read of the store.

_log = logging.getLogger(__name__)
# bump whenever the frame's layout or meaning changes (2: favours; 3: no CI from one value,
# no Welch test of two constant arms; 4: non-finite values left out, extreme magnitudes
# scaled, a note per row; 5: bootstrap indices drawn as uint32, so other resamples than
# the rows remembered before; the details kept; 6: stored values that are no usable number
# kept (``odd``), no Wilcoxon p from differences that are all zero; the identical twins known;
# 7: pairs are configurations, group_id, when the study gives one: see _UNIT_SQL;
# 8: large samples' CIs by the saddlepoint, a ci_method per row)
SNAPSHOT_FORMAT = 8
_SNAPSHOT_ROWS = 128  # statistic rows kept per snapshot, most recently used
_SNAPSHOT_LAG = 10_000  # events: a frame this far past its snapshot's watermark is saved again
_SNAPSHOT_AGE = 60.0  # seconds: a changed frame whose snapshot is older is saved again
_OBJECT_COLUMNS = ("run", "trial", "status", "pair")
_LAZY_COLUMNS = ("trial", "pair")  # left encoded by a loaded snapshot until first read
# what the snapshots did in this process (tests and benchmarks look)
snapshot_counts: dict[str, int] = {"loaded": 0, "rejected": 0, "saved": 0, "unwritten": 0}


def _db_path(store: Any) -> str:
    if isinstance(store, TrialStore):
        return store.path
    from thunderline_lab.lab import Lab

    if isinstance(store, Lab):
        return str(store.db_path)
    path = Path(store).expanduser()
    return str(path if path.is_file() else Lab.resolve(path).db_path)


def _snapshot_file(db: str, study: str) -> Path:
    folder = snapshot_dir(db)
    assert folder is not None
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", study).strip("._")[:48] or "study"
    tag = hashlib.blake2b(f"{Path(db).name}\0{study}".encode(), digest_size=6).hexdigest()
    return folder / f"{safe}.{tag}.npz"


def _snapshot_path(store: TrialStore, study: str) -> Path | None:
    """Where ``study``'s snapshot of ``store`` lives (None: an in-memory store)."""
    return None if snapshot_dir(store.path) is None else _snapshot_file(store.path, study)


def _identity(store: TrialStore, study: str, watermark: int) -> dict[str, Any]:
    """The store as a snapshot knows it, in one read: the id of the event at ``watermark``,
    the log's first event id, and the study's highest trials rowid with the log's last seq
    (a projection rewritten without events, as a bulk import or a deleted row, moves it)."""
    row = _read(
        store,
        "SELECT (SELECT id FROM events WHERE seq = ?), "
        "(SELECT id FROM events ORDER BY seq LIMIT 1), "
        "(SELECT MAX(rowid) FROM trials WHERE study = ?), "
        "(SELECT COALESCE(MAX(seq), 0) FROM events)",
        [watermark, study],
    )[0]
    return {"watermark_id": row[0], "first_id": row[1], "rowid_max": row[2], "rowid_seq": row[3]}


def _encode_objects(
    name: str,
    values: np.ndarray,
    arrays: dict[str, np.ndarray],
    known: tuple[str, np.ndarray, Sequence[Any]] | None = None,
) -> dict[str, Any]:
    """Store an object column in ``arrays`` without pickles; returns how to decode it.

    ``known``: (kind, codes, distinct values) the frame already computed for a column of
    strings and None: ``first`` codes in order of first appearance (-1: None), as the pair
    codes; ``sorted`` indices into the sorted distinct values, as the status codes. Either
    is stored with the distinct values, and restored as the codes. Strings (run and trial
    ids, distinct pair ids) are joined by NUL, and anything else (pair ids of several
    types) is one JSON list, which keeps each value's type (3 stays 3, "3" "3", None None).
    """
    if known is not None:
        kind, codes, uniques = known
        dtype = np.int32 if len(uniques) < 2**31 else np.int64
        arrays[f"{name}.codes"] = np.asarray(codes).astype(dtype)
        how: dict[str, Any] = {"kind": kind, "count": len(uniques)}
        if (joined := _joined(uniques)) is not None:  # (split a few times quicker than JSON)
            text, how["text"] = joined, "joined"
            if name in _LAZY_COLUMNS:
                how["index"] = _crc_index(name, uniques, arrays)
        else:
            text = json.dumps(list(uniques), ensure_ascii=False)
    else:
        items = values.tolist()
        if (joined := _joined(items)) is not None:
            text, how = joined, {"kind": "joined"}
            if name in _LAZY_COLUMNS:
                how["index"] = _crc_index(name, items, arrays)
        else:
            text = json.dumps(items, ensure_ascii=False, allow_nan=True)
            how = {"kind": "list"}
    arrays[f"{name}.text"] = np.frombuffer(text.encode(), dtype=np.uint8)
    return how


def _crc_index(name: str, items: Sequence[str], arrays: dict[str, np.ndarray]) -> str:
    """Store a lookup of joined strings that a loaded snapshot keeps encoded: each one's
    CRC-32, sorted, and where each sits (a value is then found by a binary search and a
    compare, not a scan of the text: a refresh looks up each changed trial, and a live
    study's are new, so a scan would read all the text for each)."""
    crc = np.fromiter((zlib.crc32(s.encode()) for s in items), dtype=np.uint32, count=len(items))
    order = np.argsort(crc, kind="stable")
    arrays[f"{name}.crc"] = crc[order]
    arrays[f"{name}.order"] = order.astype(np.int32 if len(items) < 2**31 else np.int64)
    return "crc32"


def _joined(items: Sequence[Any]) -> str | None:
    """Strings none of which holds a NUL, joined by NUL; else None."""
    if not _all_str(items):
        return None
    text = "\0".join(items)
    return text if text.count("\0") == max(0, len(items) - 1) else None


def _decode_objects(
    name: str, how: Mapping[str, Any], data: Mapping[str, np.ndarray], n: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """(the object column, its codes (as stored) or None)."""
    kind = how["kind"]
    if kind in ("list", "joined"):
        values = _object_array(_text_items(name, how, data, n))
        codes = None
    elif kind in ("first", "sorted"):
        codes = data[f"{name}.codes"].astype(np.intp)
        values = _code_table(name, how, data)[codes]
    else:
        raise ValueError(f"{name}: unknown encoding {kind!r}")
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} values for {n} rows")
    return values, codes


def _code_table(name: str, how: Mapping[str, Any], data: Mapping[str, np.ndarray]) -> np.ndarray:
    """A coded column's distinct values in code order, then None (code -1's slot); checks
    that its codes are in range."""
    items = _text_items(name, how, data, how.get("count"))
    codes = data[f"{name}.codes"]
    if len(codes) and (codes.min() < -1 or codes.max() >= len(items)):
        raise ValueError(f"{name}: codes out of range")
    return _object_array([*items, None])


def _text_items(
    name: str, how: Mapping[str, Any], data: Mapping[str, np.ndarray], count: int | None
) -> list[Any]:
    """The values of ``name``'s text member: strings joined by NUL (``count`` of them), or
    a JSON list."""
    raw = data[f"{name}.text"].tobytes()
    if how["kind"] == "joined" or how.get("text") == "joined":
        items: Any = raw.decode().split("\0") if count else []
    else:
        items = json.loads(raw)
    if not isinstance(items, list) or (count is not None and len(items) != count):
        raise ValueError(f"{name}: not a list of {count} values")
    return items


def _object_array(items: list[Any]) -> np.ndarray:
    values = np.empty(len(items), dtype=object)
    values[:] = items
    return values


def _known_codes(frame: _Frame, name: str) -> tuple[str, np.ndarray, Sequence[Any]] | None:
    """The codes of a column of strings (and None) that the frame computes anyway."""
    values = getattr(frame, name)
    if name == "pair":
        codes = frame.pair_codes()  # pd.factorize of the ids: first appearance, -1: None
        if "pair" in frame._str_codes:
            return "first", codes, values[_first_rows(codes)].tolist()
    if name == "status":
        names, codes = frame.status_codes()  # np.unique's answer
        if "status" not in frame._str_codes:
            return None
        first = np.empty(len(names), dtype=np.intp)
        first[codes[::-1]] = np.arange(len(codes) - 1, -1, -1)  # each name's first row
        return "sorted", codes, values[first].tolist()  # the values, not their str copies
    if name == "run" and _all_str(values):  # a study's few model runs (usually one)
        codes, uniques = pd.factorize(values)
        if len(uniques) * 4 <= len(values):  # codes, not 100,000 strings split on load
            return "first", codes, list(uniques)
    return None


def _memo_key_json(key: tuple[Any, ...]) -> list[Any]:
    return [*key[:-1], key[-1].hex()]


def _memo_key(item: Sequence[Any]) -> tuple[Any, ...]:
    metric, paired, n_boot, confidence, seed, max_draws, digest = item
    return (metric, paired, n_boot, confidence, seed, max_draws, bytes.fromhex(digest))


def _snapshot_arrays(store: TrialStore, study: str, frame: _Frame) -> dict[str, Any]:
    """The frame as arrays for :func:`_write_npz` (the caller holds the frame's lock); its
    float columns as :class:`_Room`, stored with room to grow."""
    arrays: dict[str, Any] = {"sn": _Room(frame.sn), "coeff": _Room(frame.coeff)}
    objects = {}
    for name in _OBJECT_COLUMNS:
        encoded = frame.deferred.get(name)
        if encoded is None or len(encoded.tail):  # (rows appended since: decoded, encoded)
            known = _known_codes(frame, name)
            objects[name] = _encode_objects(name, getattr(frame, name), arrays, known)
        else:  # as the loaded snapshot stored it (not decoded to be encoded again)
            arrays.update((m, a) for m, a in encoded.arrays.items() if m.startswith(f"{name}."))
            objects[name] = dict(encoded.how)
    columns = sorted(frame.columns)
    for j, name in enumerate(columns):
        arrays[f"col{j}"] = _Room(frame.columns[name])
    rows = []
    for key, row in frame.memo.items():
        item = [_memo_key_json(key), row]
        try:
            json.dumps(item)
        except (TypeError, ValueError):  # a value JSON cannot hold: recomputed when asked
            continue
        rows.append(item)
    meta = {
        "format": SNAPSHOT_FORMAT,
        "study": study,
        "store": Path(store.path).name,
        "n": frame.n,
        "watermark": frame.watermark,
        **_identity(store, study, frame.watermark),
        "keys": sorted(frame.keys),
        "columns": columns,
        "objects": objects,
        "rows": rows,
        "odd": {k: sorted(found.items()) for k, found in frame.odd.items() if found},
        "twins": [[pid, same] for pid, same in frame.twins.items()],
    }
    details = _details_json(frame)
    if details is not None:
        meta["details"] = details
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    return arrays


# The details (group curves, per-layer σ) in a snapshot: small tables, kept as JSON columns.


def _table_json(df: pd.DataFrame) -> dict[str, Any]:
    return {
        "columns": [str(c) for c in df.columns],
        "dtypes": [str(t) for t in df.dtypes],
        "data": [df[c].tolist() for c in df.columns],
    }


def _table_from_json(item: Mapping[str, Any]) -> pd.DataFrame:
    columns, dtypes, data = item["columns"], item["dtypes"], item["data"]
    if not len(columns) == len(dtypes) == len(data):
        raise ValueError("details: columns, dtypes and data differ in length")
    return pd.DataFrame(
        {c: pd.Series(v, dtype=t) for c, t, v in zip(columns, dtypes, data, strict=True)},
        columns=columns,
    )


class _RawDetails:
    """A snapshot's details as read (JSON), decoded only when a comparison asks for them:
    a comparison without details, or after new events (which recompute them), skips the
    tables (about 10 ms for the curves of 400 trials)."""

    __slots__ = ("item",)

    def __init__(self, item: dict[str, Any]) -> None:
        self.item = item

    def decode(self) -> tuple[pd.DataFrame, pd.DataFrame, bool] | None:
        """(layer σ, curves, sampled), or None when the entry is malformed."""
        try:
            return (
                _table_from_json(self.item["layer_sigma"]),
                _table_from_json(self.item["curves"]),
                bool(self.item["sampled"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            _log.debug("comparison snapshot details ignored: %s: %s", type(exc).__name__, exc)
            return None


def _details_json(frame: _Frame) -> dict[str, Any] | None:
    """The details computed for the frame's current state, as JSON (None: none)."""
    for key, value in frame.derived.items():
        if isinstance(key, tuple) and key[0] == "details" and key[1] == frame.watermark:
            if isinstance(value, _RawDetails):  # as read: written back as it was
                return value.item
            layer_sigma, curves, sampled = value
            item = {
                "key": [list(key[2]), *key[3:6], list(key[6])],
                "layer_sigma": _table_json(layer_sigma),
                "curves": _table_json(curves),
                "sampled": bool(sampled),
            }
            try:
                json.dumps(item)
            except (TypeError, ValueError):  # recomputed when asked
                return None
            return item
    return None


def _details_from_json(frame: _Frame, item: Any) -> None:
    """Put a snapshot's details into ``frame.derived``, still as JSON (:class:`_RawDetails`);
    a malformed key is ignored here, malformed tables when they are decoded."""
    try:
        statuses, curve_trials, seed, confidence, sigma_keys = item["key"]
        key = (
            "details",
            frame.watermark,
            tuple(str(s) for s in statuses),
            int(curve_trials),
            int(seed),
            float(confidence),
            tuple(str(k) for k in sigma_keys),
        )
        if not isinstance(item, dict):
            raise TypeError("details: not an object")
    except (KeyError, TypeError, ValueError) as exc:
        _log.debug("comparison snapshot details ignored: %s: %s", type(exc).__name__, exc)
        return
    frame.derived[key] = _RawDetails(item)


def _save_snapshot(store: TrialStore, study: str, frame: _Frame) -> Path | None:
    """Write ``frame``'s snapshot atomically (a temporary file in the same folder, then
    ``os.replace``: readers see the old file or the new one, the last writer wins); returns
    its path, or None when it could not be written (only the next new process pays)."""
    path = _snapshot_path(store, study)
    if path is None:
        return None
    with frame.lock:
        state = (frame.version, frame.watermark)
        members: dict[str, Any] = _snapshot_arrays(store, study, frame)  # no object arrays
        frame.saved, frame.memo_dirty = state, False  # once per change, written or not
        frame.saved_time = time.monotonic()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                _write_npz(f, members)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
    except OSError as exc:
        _log.debug("comparison snapshot %s not written: %s", path, exc)
        snapshot_counts["unwritten"] += 1
        return None
    snapshot_counts["saved"] += 1
    return path


def _write_npz(f: Any, arrays: Mapping[str, np.ndarray | _Room]) -> None:
    """``arrays`` as an uncompressed ``.npz`` that ``np.load`` reads, each array's data at
    an offset that is a multiple of 64 in the file (a zip extra field pads each member's
    local header, as Android's zipalign does), so :func:`_read_npz` maps it in place. A
    :class:`_Room` column is stored with :data:`_SPARE_ROWS` NaN rows after its values."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            member = io.BytesIO()
            if isinstance(arr, _Room):
                values = np.ascontiguousarray(arr.values, dtype=np.float64)
                header = {
                    "descr": np.lib.format.dtype_to_descr(values.dtype),
                    "fortran_order": False,
                    "shape": (len(values) + _SPARE_ROWS,),
                }
                np.lib.format.write_array_header_1_0(member, header)
                member.write(values.data)
                member.write(np.full(_SPARE_ROWS, np.nan).data)
            else:
                np.lib.format.write_array(member, np.asanyarray(arr), allow_pickle=False)
            data = member.getvalue()
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            start = f.tell() + 30 + len(info.filename.encode()) + 4  # local header + extra's
            pad = -start % _NPZ_ALIGN
            info.extra = struct.pack("<HH", _ZIPALIGN_ID, pad) + bytes(pad)
            zf.writestr(info, data)


_NPZ_ALIGN = 64  # np.lib.format pads each .npy header to a multiple of 64 too
_ZIPALIGN_ID = 0xD935  # the extra field id zipalign pads with (readers skip unknown ids)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an uncompressed ``.npz``, as views of one private (copy-on-write)
    memory map of the file: no read or copy up front, only the pages used are read, and a
    refresh may patch the arrays in place without touching the file. A 13 MB snapshot maps
    in ~2 ms where ``np.load`` reads each member through ``zipfile`` with its CRC in ~23.
    An array whose data is not aligned (a file ``np.savez`` wrote) is copied; a member this
    cannot place (compressed, another ``.npy`` version) falls back to ``np.load``.

    Snapshots are replaced (``os.replace``), never truncated in place, so a mapped file
    stays whole while a frame uses it. A damaged file fails here or the store's checks;
    either is only a cache miss."""
    with open(path, "rb") as f:
        infos = zipfile.ZipFile(f).infolist()
        size = os.fstat(f.fileno()).st_size
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else bytearray()
    out: dict[str, np.ndarray] = {}
    for info in infos:
        start = info.header_offset
        if (
            info.compress_type != zipfile.ZIP_STORED
            or not info.filename.endswith(".npy")
            or buf[start : start + 4] != b"PK\x03\x04"
        ):
            return _np_load(path)
        name_len, extra_len = struct.unpack_from("<HH", buf, start + 26)
        start += 30 + name_len + extra_len  # the local header, then the member's bytes
        end = start + info.file_size
        head = io.BytesIO(buf[start : min(end, start + 4096)])
        try:
            version = np.lib.format.read_magic(head)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(head)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(head)
            else:
                return _np_load(path)
        except ValueError:
            return _np_load(path)
        count = math.prod(shape)
        offset = start + head.tell()
        if dtype.hasobject or offset + count * dtype.itemsize != end or end > size:
            raise ValueError(f"{path}: member {info.filename} does not hold its array")
        if count == 0:
            arr = np.empty(shape, dtype=dtype)
        else:
            arr = np.frombuffer(buf, dtype=dtype, count=count, offset=offset)
            arr = arr.reshape(shape, order="F" if fortran else "C")
        out[info.filename[:-4]] = arr if arr.flags.aligned else arr.copy()
    return out


def _np_load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def _load_snapshot(store: TrialStore, study: str) -> _Frame | None:
    """``study``'s frame from its snapshot, if there is one and it matches the store (the
    caller refreshes it from the event log); None otherwise."""
    path = _snapshot_path(store, study)
    if path is None:
        return None
    try:
        frame = _frame_from_snapshot(store, study, _read_npz(path))
    except FileNotFoundError:
        return None
    except Exception as exc:  # a truncated, corrupt or foreign file: only a cache miss
        _log.debug("comparison snapshot %s ignored: %s: %s", path, type(exc).__name__, exc)
        frame = None
    if frame is None:
        snapshot_counts["rejected"] += 1
        return None
    snapshot_counts["loaded"] += 1
    with _ROW_MEMO_LOCK:  # the statistics computed over these values (exact keys)
        for key, row in frame.memo.items():
            _ROW_MEMO.setdefault(key, row)
            _ROW_MEMO.move_to_end(key)
        while len(_ROW_MEMO) > _ROW_MEMO_SIZE:
            _ROW_MEMO.popitem(last=False)
    return frame


def _frame_from_snapshot(
    store: TrialStore, study: str, data: Mapping[str, np.ndarray]
) -> _Frame | None:
    meta = json.loads(data["meta"].tobytes())
    why = None
    watermark = meta["watermark"]
    if meta["format"] != SNAPSHOT_FORMAT:
        why = f"format {meta['format']}, not {SNAPSHOT_FORMAT}"
    elif meta["study"] != study or meta["store"] != Path(store.path).name:
        why = "another study's"
    elif not isinstance(watermark, int) or watermark < 0:
        why = f"watermark {watermark!r}"
    else:
        now = _identity(store, study, watermark)
        if watermark > now["rowid_seq"]:
            why = f"watermark {watermark} past the log's last seq {now['rowid_seq']}"
        elif now["watermark_id"] != meta["watermark_id"]:
            why = "another event log (the event at the watermark differs)"
        elif meta["first_id"] is not None and now["first_id"] != meta["first_id"]:
            why = "another event log (the first event differs)"
        elif now["rowid_seq"] == meta["rowid_seq"] and now["rowid_max"] != meta["rowid_max"]:
            why = "the study's trials changed without events"
    if why is not None:
        _log.debug("comparison snapshot of %r rejected: %s", study, why)
        return None
    n = int(meta["n"])
    spare: dict[str, np.ndarray] = {}

    def floats(name: str, column: str) -> np.ndarray:
        a = data[name]
        if a.dtype != np.float64 or a.ndim != 1 or len(a) < n:
            raise ValueError(f"{name}: {a.dtype} {a.shape} for {n} rows")
        if len(a) > n:  # rows of room (NaN) after the column's own: see _SPARE_ROWS
            spare[column] = a
        return a[:n]

    encoded = {name: _Encoded(name, meta["objects"][name], data, n) for name in _OBJECT_COLUMNS}
    lazy = {name for name in _LAZY_COLUMNS if encoded[name].check()}  # decoded when read
    objects = {
        name: _decode_objects(name, enc.how, data, n)
        for name, enc in encoded.items()
        if name not in lazy
    }
    empty = (np.empty(0, dtype=object), None)
    frame = _Frame(
        run=objects.get("run", empty)[0],
        trial=objects.get("trial", empty)[0],
        status=objects.get("status", empty)[0],
        sn=floats("sn", "sn"),
        coeff=floats("coeff", "coeff"),
        pair=objects.get("pair", empty)[0],
        columns={str(k): floats(f"col{j}", f"col:{k}") for j, k in enumerate(meta["columns"])},
        keys={str(k) for k in meta["keys"]},
        watermark=watermark,
        odd={
            str(k): {int(i): str(what) for i, what in found if 0 <= int(i) < n}
            for k, found in meta["odd"].items()
        },
        twins={pid: bool(same) for pid, same in meta.get("twins", ()) if _hashable(pid)},
        store_ref=weakref.ref(store),
        saved=(0, watermark),
        saved_time=time.monotonic(),
        spare=spare,
    )
    for name in lazy:
        frame.defer(name, encoded[name])
    if meta["objects"]["pair"]["kind"] == "first":  # the codes pair_codes() computed
        room = np.empty(n + _SPARE_ROWS, dtype=np.intp)  # (a copy as intp anyway)
        room[:n] = data["pair.codes"]
        frame.spare["pair_codes"] = room
        frame._pair_codes = room[:n]
        frame._str_codes.add("pair")
    if meta["objects"]["status"]["kind"] == "sorted":  # status_codes(): (names, codes)
        names = _code_table("status", meta["objects"]["status"], data)[:-1].astype(str)
        codes = objects["status"][1]
        assert codes is not None
        frame._status_codes = (names, codes)
        frame._str_codes.add("status")
    for item, row in meta["rows"]:
        if isinstance(row, dict):
            frame.memo[_memo_key(item)] = row
    if "details" in meta:
        _details_from_json(frame, meta["details"])
    return frame


def _remember_rows(frame: _Frame, sink: _RowSink | None) -> None:
    """Keep the statistic rows a comparison used or made with the frame (its snapshot)."""
    if sink is None:
        return
    with frame.lock:
        for key, row in sink.rows:
            if key in frame.memo:
                frame.memo.move_to_end(key)
            else:
                frame.memo[key] = row
                frame.memo_dirty = True
        while len(frame.memo) > _SNAPSHOT_ROWS:
            frame.memo.popitem(last=False)


def _maybe_save(store: TrialStore, study: str, frame: _Frame) -> None:
    """Save the frame's snapshot once it differs from the one on disk, but not on every
    comparison of a live study.

    A frame read from scratch is saved at once (the read is what a snapshot spares). A
    changed frame (a refresh, new statistics) is saved when its snapshot is ``_SNAPSHOT_LAG``
    events or ``_SNAPSHOT_AGE`` seconds behind, else at the latest when this process
    forgets it (:func:`clear_cache`) or exits: a new process refreshes a snapshot that is a
    few trials behind from the event log anyway, and rewriting ~14 MB for 100,000 trials
    after every new pair would cost each comparison ~40 ms.
    """
    saved = frame.saved
    if saved is None:
        _save_snapshot(store, study, frame)
        return
    if saved[0] == frame.version and not frame.memo_dirty:
        return
    behind = frame.watermark - saved[1] > _SNAPSHOT_LAG
    if behind or time.monotonic() - frame.saved_time > _SNAPSHOT_AGE:
        _save_snapshot(store, study, frame)
        with _PENDING_LOCK:
            _PENDING.pop(id(frame), None)
        return
    with _PENDING_LOCK:
        _PENDING[id(frame)] = (weakref.ref(store), study, frame)
    _register_flush()


_PENDING: dict[int, tuple[Any, str, _Frame]] = {}  # frames changed since their last save
_PENDING_LOCK = threading.Lock()


@functools.cache
def _register_flush() -> None:
    atexit.register(flush_snapshots)


def flush_snapshots() -> int:
    """Save every comparison snapshot this process changed but has not written yet (run at
    exit and by :func:`clear_cache`); returns how many were written."""
    with _PENDING_LOCK:
        pending = list(_PENDING.values())
        _PENDING.clear()
    written = 0
    for store_ref, study, frame in pending:
        store = store_ref()
        if store is None:
            continue
        try:
            written += _save_snapshot(store, study, frame) is not None
        except Exception as exc:  # a closed store at exit: the next process reads it afresh
            _log.debug("comparison snapshot of %r not flushed: %s", study, exc)
    return written


def _written_snapshot(store: TrialStore, study: str) -> Path | None:
    """The study's snapshot file, if there is one (a save may have failed)."""
    path = _snapshot_path(store, study)
    return path if path is not None and path.is_file() else None


def update_snapshot(store: Any, study: str) -> Path | None:
    """Bring ``study``'s comparison snapshot up to the store now: run the default comparison
    (what ``thunderline-lab compare`` and ``run``'s report compute, details included), so
    the snapshot holds its columns and statistics, and save it at once instead of by the
    save policy of :func:`compare_study`. What :mod:`thunderline_lab.keeper` runs after a
    process wrote a large study, so that no comparison a user runs reads it from scratch.

    An unchanged snapshot is not rewritten, nor one fewer than ``_SNAPSHOT_LAG`` events
    behind whose rows did not change. Returns the snapshot's path, or None when there is
    none to keep: an in-memory store, an unwritable folder, or a study with nothing to
    compare yet (no completed trial of a known arm).
    """
    store, owned = _as_store(store)
    try:
        try:
            compare_study(store, study)
        except StudyError:
            return None
        with _CACHE_LOCK:
            frame = _CACHE.get(_store_key(store, study))
        if frame is None:
            return None
        with frame.lock:
            saved = frame.saved
            current = (
                saved is not None
                and saved[0] == frame.version
                and not frame.memo_dirty
                and frame.watermark - saved[1] <= _SNAPSHOT_LAG
            )
        if current:
            return _written_snapshot(store, study)
        path = _save_snapshot(store, study, frame)
        with _PENDING_LOCK:
            _PENDING.pop(id(frame), None)
        return path
    finally:
        if owned:
            store.close()


# ---------------------------------------------------------------------------------------------
# Resolving a metric per trial (best / final, summary or history)
# ---------------------------------------------------------------------------------------------


def _history_values(store: TrialStore, frame: _Frame, metric: str, mode: Mode) -> np.ndarray | None:
    runs = sorted(set(frame.run.tolist()))
    if not runs:
        return None
    if mode == "final":
        sql = (
            "SELECT model_run_id, trial_id, value, MAX(step) FROM metrics "
            "WHERE model_run_id = ? AND name = ? GROUP BY model_run_id, trial_id"
        )
    else:
        agg = "MAX" if higher_is_better(metric) else "MIN"
        sql = (
            f"SELECT model_run_id, trial_id, {agg}(value) FROM metrics "
            "WHERE model_run_id = ? AND name = ? GROUP BY model_run_id, trial_id"
        )
    out = np.full(frame.n, math.nan)
    index = frame.index()
    found = False
    for run in runs:
        for row in _read(store, sql, [run, metric]):
            i = index.get((row[0], row[1]))
            if i is not None:
                out[i] = float(row[2])
                found = True
    return out if found else None


def _with_summary(
    store: TrialStore, study: str, frame: _Frame, mode_key: str, metric: str, member: np.ndarray
) -> tuple[np.ndarray, int]:
    """(``mode_key``'s values with ``metric``'s where a row of ``member`` has no
    ``mode_key`` value (not reported: a stored non-number stays as it is), how many rows
    took ``metric``'s). The summary column is read only when such a row exists; the answer
    is kept with the frame until a refresh changes a row (the same array each time, so the
    statistics remembered for it are found again)."""
    key = ("with_summary", mode_key, metric, member.tobytes())
    cached: tuple[np.ndarray, int] | None = frame.derived.get(key)
    if cached is not None:
        return cached
    values = frame.columns[mode_key]
    gap = member & np.isnan(values)
    for i in frame.odd.get(mode_key, {}):
        gap[i] = False
    out = (values, 0)
    if gap.any():
        _ensure_columns(store, study, frame, [metric])
        summary = frame.columns.get(metric)
        if summary is not None:
            fill = gap & ~np.isnan(summary)
            if fill.any():
                merged = values.copy()
                merged[fill] = summary[fill]
                merged.flags.writeable = False
                out = (merged, int(np.count_nonzero(fill)))
    frame.derived[key] = out
    return out


def _source_key(metric: str, mode: Mode, reported: set[str]) -> str | None:
    """The summary key :func:`_resolve` reads for ``metric`` when ``reported`` are the keys
    the study's trials report (None: not summarised, the metric history is the source):
    ``<mode>_<metric>`` (``best_val_accuracy``, ``final_val_accuracy``) when reported, else
    the metric itself."""
    if f"{mode}_{metric}" in reported:
        return f"{mode}_{metric}"
    return metric if metric in reported else None


def _resolve(
    store: TrialStore,
    frame: _Frame,
    metric: str,
    mode: Mode,
    *,
    history: bool,
    study: str = "",
    member: np.ndarray | None = None,
    notes: list[str] | None = None,
) -> tuple[str, np.ndarray] | None:
    """(source description, values per frame row) for ``metric`` under ``mode``.

    ``<mode>_<metric>`` per trial, else the trial's summary value of ``metric``: a trial of
    ``member`` (the rows compared) that lacks the first (a pruned trial, a study merged from
    an older run) takes the second, and ``notes`` say how many did.

    Falls back to the metric history (a scan of the study's metric points, so only when
    ``history``; the answer is kept with the frame until new events arrive).
    """
    mode_key = f"{mode}_{metric}"  # best_<metric> / final_<metric>
    if mode_key in frame.columns:
        values = frame.columns[mode_key]
        if member is not None and metric in frame.keys:
            values, n = _with_summary(store, study, frame, mode_key, metric, member)
            if n and notes is not None:
                notes.append(
                    f"{metric}: {n} trial{'s' if n > 1 else ''} report no {mode_key}: "
                    f"{'their' if n > 1 else 'its'} summary value of {metric} is used"
                    + (
                        " (measured on the restored best-epoch model, not at the last epoch)"
                        if mode == "final" and metric in HISTORY_METRICS
                        else ""
                    )
                )
        return mode_key, values
    if metric in frame.columns:
        return metric, frame.columns[metric]
    if not history:
        return None
    cached = frame.history.get((metric, mode))
    if cached is None or cached[0] != frame.watermark or len(cached[1] or ()) not in (0, frame.n):
        cached = (frame.watermark, _history_values(store, frame, metric, mode))
        frame.history[(metric, mode)] = cached
    found = cached[1]
    if found is None:
        return None
    agg = ("max" if higher_is_better(metric) else "min") if mode == "best" else "last"
    return f"history {agg}({metric})", found


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------


@dataclass
class ComparisonResult:
    """Everything :func:`compare_study` found; :func:`write_report` renders it.

    Attributes:
        headline: one row per metric: design, n_pairs, n_sn, n_none, mean_sn, mean_none,
            diff (SN − none), ci_low, ci_high, test, statistic, p_value, p_holm (Holm over
            the metrics with a p-value), n_boot, favours (judged on p_holm), note (why a
            value is n/a or rests on fewer trials than the arms hold; "" otherwise).
        trials: the trials compared (arm, coeff, pair_id, one column per metric).
        pairs: per pair, SN − none per metric (paired design).
        by_coeff: headline rows per SN coefficient when the study uses a few fixed ones, or
            per tercile of a searched coefficient (``coeff`` the group's median,
            ``coeff_range`` its bounds); p_holm adjusts within each group's metrics.
        by_mode: headline rows per ``conv_sn_mode`` (``sn_mode``: operator / matrix) when
            the SN arm holds several (a CNN study searching the mode); empty otherwise.
        counts: trials by status and arm (all statuses).
        curves: group learning curves: arm, name, step, n, mean, ci_low, ci_high.
        layer_sigma: per-layer σ by arm: layer, arm, n, mean, ci_low, ci_high.
        sources: which trial value each metric used (``best_val_accuracy``, ...).
        design: ``paired`` (twins sharing a ``pair_id``: Wilcoxon signed-rank on the
            differences), ``unpaired`` (Welch's t-test), or ``one arm`` (only SN or only
            none trials: no test, nothing to compare with).
        statuses: the trial statuses compared (``("completed",)`` by default); the report's
            header names them.
    """

    study: str
    mode: Mode
    design: str
    confidence: float
    seed: int
    headline: pd.DataFrame
    trial_columns: dict[str, np.ndarray | _Later] = field(repr=False)
    # per pair, its SN - none per metric, and the pairs' ids (made when ``pairs`` is read)
    pair_columns: dict[str, np.ndarray] = field(repr=False)
    pair_ids: Callable[[], np.ndarray] = field(repr=False)
    by_coeff: pd.DataFrame
    counts: pd.DataFrame
    curves: pd.DataFrame
    layer_sigma: pd.DataFrame
    sources: dict[str, str]
    notes: list[str]
    accuracy_metric: str | None = None
    by_mode: pd.DataFrame = field(default_factory=pd.DataFrame)
    statuses: tuple[str, ...] = ("completed",)

    @property
    def test_name(self) -> str:
        """The test behind the p-values, as the report's header names it."""
        if self.design == "paired":
            return "Wilcoxon signed-rank on per-pair differences"
        if self.design == "unpaired":
            return "Welch's t-test"
        return "none (one arm: nothing to compare it with)"

    def _ci_tables(self) -> list[pd.DataFrame]:
        """The tables whose CIs the report and the HTML show (for their header)."""
        return [self.headline, self.by_coeff, self.by_mode]

    @functools.cached_property
    def pairs(self) -> pd.DataFrame:
        """Per pair, SN − none per metric, after its ``pair_id`` (built lazily)."""
        pairs = pd.DataFrame(self.pair_columns)
        if len(pairs):
            pairs.insert(0, "pair_id", pd.Series(self.pair_ids(), dtype=object))  # no scan
        return pairs

    @functools.cached_property
    def trials(self) -> pd.DataFrame:
        """The trials compared: arm, coeff, pair_id and one column per metric (built lazily)."""
        return pd.DataFrame(
            {k: v() if isinstance(v, _Later) else v for k, v in self.trial_columns.items()}
        )

    def format_table(self) -> str:
        """The headline as fixed-width text (what the CLI prints)."""
        return format_headline(self.headline, confidence=self.confidence)

    def to_markdown(self) -> str:
        """The headline as a Markdown table."""
        return _markdown_table(_headline_display(self.headline, self.confidence))

    def _repr_html_(self) -> str:
        return self.to_html(figures=True)

    def to_html(self, *, figures: bool = True) -> str:
        """The report as HTML: headline, per-coefficient rows, counts, notes, figures (inline
        PNGs). Displaying a result in a notebook shows this."""
        import base64

        parts = [
            f'<div class="tl-comparison"><h4>{_html(self.study)}: SN − none</h4>'
            f"<p>{self.design} design · trials: {_html(', '.join(self.statuses))} · "
            f"{self.mode} values ({_html(_MODE_TEXT[self.mode])}) · "
            f"{_ci_text(self._ci_tables(), self.confidence, self.seed)} · "
            + _html(self.test_name)
            + "</p>",
            _headline_display(self.headline, self.confidence).to_html(index=False, escape=True),
            f"<p>{_html(_holm_note(self.headline))}</p>",
            f"<p>{_html(_direction_note(self.headline))}</p>",
        ]
        if not self.by_coeff.empty:
            shown = _headline_display(self.by_coeff, self.confidence)
            parts += ["<p><b>By SN coefficient</b></p>", shown.to_html(index=False)]
            parts.append(f"<p>{_html(_holm_note(self.by_coeff))}</p>")
        if not self.by_mode.empty:
            shown = _headline_display(self.by_mode, self.confidence)
            parts += ["<p><b>By conv SN mode</b></p>", shown.to_html(index=False)]
            parts.append(f"<p>{_html(_holm_note(self.by_mode))}</p>")
        parts.append(_counts_table(self.counts).to_html(index=False))
        if self.notes:
            parts.append("<ul>" + "".join(f"<li>{_html(n)}</li>" for n in self.notes) + "</ul>")
        if figures:
            for name, fig in self.figures().items():
                data = base64.b64encode(_png(fig)).decode()
                parts.append(f'<img alt="{name}" src="data:image/png;base64,{data}"/>')
        return "".join(parts) + "</div>"

    def figures(self) -> dict[str, Any]:
        """The report's figures as matplotlib Figures (Agg; no pyplot state touched)."""
        figs = {
            "paired_differences": fig_differences(self),
            "distributions": fig_distributions(self),
            "learning_curves": fig_learning_curves(self),
            "accuracy_vs_lipschitz": fig_accuracy_vs_lipschitz(self),
            "layer_sigma": fig_layer_sigma(self),
        }
        return {k: v for k, v in figs.items() if v is not None}

    def show(self) -> None:
        """Display the headline and every figure inline (notebooks)."""
        from IPython.display import HTML, Image, display

        display(HTML(self._repr_html_()))
        for fig in self.figures().values():
            display(Image(data=_png(fig), format="png"))


_MODE_TEXT = {
    "best": "value at the best epoch: the lowest validation loss, whose weights are restored",
    "final": "value at the last epoch trained",
}
_MODES_NOTE = (
    "Modes: best = the value at the best epoch (the lowest validation loss, whose weights "
    "are restored); final = the value at the last epoch trained. Metrics measured after "
    "training on the restored model (test_*, robustness, calibration) are the same in both "
    "modes; the `value` column names the key each metric was read from."
)


def _html(text: Any) -> str:
    import html

    return html.escape(str(text))


@functools.cache
def _settle_allocator() -> None:
    """Once per process: allocate and free one 8 MiB block.

    glibc's malloc serves blocks of 128 KiB or more by fresh ``mmap``s (each page faulted
    and zeroed on first touch, and unmapped again on free) until the process frees such a
    block; it then raises that threshold to the freed block's size (``mallopt(3)``,
    M_MMAP_THRESHOLD's dynamic adjustment), and keeps later blocks in its heap. A
    comparison's temporaries are 0.4-0.8 MB (per metric, over 50,000 pairs): in a new
    process each one was faulted in anew, ~50 ms of a 150 ms comparison of 8 metrics. A
    process that has already freed a large block (a kernel that trained a model) changes
    nothing, nor does an allocator that does not adjust."""
    block = np.empty(1 << 20)  # 8 MiB of float64, never touched: freed at once
    del block


def compare_study(
    store: Any,
    study: str,
    *,
    metrics: str | Sequence[str] | None = None,
    mode: Mode = "best",
    paired: bool | None = None,
    statuses: str | Sequence[str] = ("completed",),
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    max_draws: int = 10_000_000,
    details: bool = True,
    curve_trials: int = 200,
    use_cache: bool = True,
) -> ComparisonResult:
    """Compare SN against none for each metric of a study.

    Args:
        store: a :class:`TrialStore`, a lab directory or :class:`~thunderline_lab.lab.Lab`.
        metrics: metric names: a list, one name, or a comma-separated string of names
            (``"val_accuracy,test_ece"``, what ``papermill -p metrics`` passes; spaces
            around each are dropped). ``None`` (the default): those of
            :data:`DEFAULT_METRICS` that the study reports, silently leaving out the
            others; any other metric a trial reports (``test_brier``, ``sigma/<layer>``,
            ...) only when named here. A name given here that no trial reports and that
            is no metric the workbench knows (a misspelling) is refused with the closest
            names; a known metric this study does not report is only noted.
        mode: ``best``: the value at the best epoch (the lowest validation loss, whose
            weights the trainer restores): ``best_<metric>`` when reported. ``final``: the
            value at the last epoch trained: ``final_<metric>`` when reported. Either falls
            back to the metric's summary value, then to its history (max/min for ``best``,
            the last step for ``final``). Metrics measured after training on the restored
            model (``test_*``, robustness, calibration) are the same in both modes.
        paired: force the design; default paired when twins share ``pair_id``.
        statuses: trial statuses compared (default completed only): a list, one status or
            a comma-separated string, each of :data:`TRIAL_STATUSES`.
        n_boot: bootstrap resamples, at least 200 (fewer when ``n * n_boot > max_draws``,
            never under 200).
        seed: the bootstrap's seed, a whole number ≥ 0.
        confidence: level of the CIs, the bands and the verdict (``favours`` needs
            p_holm < 1 − confidence), strictly between 0 and 1; tables and figures name it.
        details: also compute learning curves, per-layer σ and the data behind the figures.
        curve_trials: learning curves use at most this many trials per arm (a seeded random
            sample; the figure says so when sampling happened).

    Raises:
        StudyError: the study has no trials (naming the store's studies, the closest
            first), no trial of ``statuses`` with a known arm (naming the statuses it
            has), none of ``metrics``, or a name in ``metrics`` that no trial reports and
            no known metric has (naming the closest ones it reports); ``metrics`` with an
            empty or non-text name; an argument out of its range or of the wrong type
            (naming it: ``confidence``, ``n_boot``, ``seed``, ``statuses``, ...).
    """
    if mode not in ("best", "final"):
        raise StudyError(f"mode must be 'best' or 'final', not {mode!r}")
    metrics = _metric_list(metrics)
    statuses = _status_list(statuses)
    if _is_int(study):  # papermill makes -p study_name 2024 the int 2024 (lab.study_name)
        study = study_name(study)
    _check_options(study, paired, n_boot, confidence, seed, max_draws, curve_trials)
    store, owned = _as_store(store)
    _settle_allocator()
    token = _ROW_SINK.set(_RowSink(use_memo=use_cache))
    try:
        with _study_lock(store, study):  # another thread may be comparing it
            return _compare(
                store,
                study,
                metrics,
                mode,
                paired,
                statuses,
                n_boot,
                confidence,
                seed,
                max_draws,
                details,
                curve_trials,
                use_cache,
            )
    finally:
        _ROW_SINK.reset(token)
        if owned:
            store.close()


def _metric_list(metrics: str | Sequence[str] | None) -> list[str] | None:
    """The metric names ``metrics`` gives: a list of names, one name, or several separated
    by commas (spaces around each dropped); never a sequence of one-letter names. None
    and an empty list are the default set (None).

    Raises:
        StudyError: an empty name (``"a,,b"``, ``""``) or a name that is not text.

    Example:
        >>> _metric_list("val_accuracy"), _metric_list("val_accuracy, test_ece")
        (['val_accuracy'], ['val_accuracy', 'test_ece'])
    """
    if metrics is None:
        return None
    if isinstance(metrics, str):
        names: list[Any] = [part.strip() for part in metrics.split(",")]
    elif isinstance(metrics, Iterable) and not isinstance(metrics, bytes | Mapping):
        names = list(metrics)
        if not names:
            return None
    else:
        raise StudyError(
            f"metrics: a metric name, a comma-separated string or a list of names, not {metrics!r}"
        )
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise StudyError(f"metrics: {name!r} is not a metric name (in {metrics!r})")
    return names


# What a trial's status can be (the store's rows): running, then one of the terminal ones.
TRIAL_STATUSES: tuple[str, ...] = ("running", *TERMINAL_STATUSES)


def _status_list(statuses: str | Sequence[str]) -> tuple[str, ...]:
    """The statuses ``statuses`` names: a list of names, one name, or several separated by
    commas (as :func:`_metric_list` reads metrics; a string was read letter by letter).

    Raises:
        StudyError: none, an empty name, a name that is not text, or no trial status.
    """
    if isinstance(statuses, str):
        names: list[Any] = [part.strip() for part in statuses.split(",")]
    elif isinstance(statuses, Iterable) and not isinstance(statuses, bytes | Mapping):
        names = list(statuses)
    else:
        raise StudyError(
            f"statuses: a status, a comma-separated string or a list, not {statuses!r}"
        )
    if not names:
        raise StudyError(f"statuses: no status given (known: {', '.join(TRIAL_STATUSES)})")
    for name in names:
        if name not in TRIAL_STATUSES:
            hint = did_you_mean(name, TRIAL_STATUSES) if isinstance(name, str) else ""
            raise StudyError(
                f"statuses: {name!r} is no trial status{hint}; known: {', '.join(TRIAL_STATUSES)}"
            )
    return tuple(dict.fromkeys(names))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def _check_options(
    study: Any,
    paired: Any,
    n_boot: Any,
    confidence: Any,
    seed: Any,
    max_draws: Any,
    curve_trials: Any,
) -> None:
    """Refuse the arguments no comparison can take, naming each: they failed deep inside
    numpy (a negative seed, ``n_boot=0``), or worse, gave a result (``confidence=0``: a CI
    that missed its own estimate and a verdict for every metric, since p < 1 - 0 always).

    Raises:
        StudyError: naming the argument and the value given.
    """
    if not isinstance(study, str):
        raise StudyError(f"study: a study's name (text, or an integer: its text), not {study!r}")
    if paired is not None and not isinstance(paired, bool | np.bool_):
        raise StudyError(f"paired: True, False or None (the study's design), not {paired!r}")
    _check_boot_options(n_boot, confidence, seed, max_draws)
    if not (_is_int(curve_trials) and curve_trials >= 1):
        raise StudyError(f"curve_trials: a whole number of trials, 1 or more, not {curve_trials!r}")


def _check_confidence(confidence: Any) -> None:
    if not (
        isinstance(confidence, numbers.Real)
        and not isinstance(confidence, bool | np.bool_)
        and 0 < float(confidence) < 1  # NaN is not
    ):
        raise StudyError(f"confidence: a number between 0 and 1 (0.95: 95%), not {confidence!r}")


def _check_boot_options(n_boot: Any, confidence: Any, seed: Any, max_draws: Any) -> None:
    """The bootstrap's arguments (:func:`compare_study`, :func:`compare_arrays`,
    :func:`bootstrap_mean_ci`), refused by name.

    Raises:
        StudyError: naming the argument and the value given.
    """
    _check_confidence(confidence)
    if not (_is_int(n_boot) and n_boot >= _MIN_BOOT):
        raise StudyError(
            f"n_boot: a whole number of resamples, at least {_MIN_BOOT}, not {n_boot!r}"
        )
    if not (_is_int(seed) and seed >= 0):
        raise StudyError(f"seed: a whole number, 0 or more, not {seed!r}")
    if not (_is_int(max_draws) and max_draws >= 1):
        raise StudyError(f"max_draws: a whole number of draws, 1 or more, not {max_draws!r}")


def _sample(name: str, values: Any) -> np.ndarray:
    """``values`` as a 1-D float array (a list or an array of numbers).

    Raises:
        StudyError: naming ``name``: text, None, a table of several columns.
    """
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise StudyError(f"{name}: a 1-D sequence of numbers, not {values!r:.80}") from None
    if arr.ndim != 1:
        raise StudyError(f"{name}: a 1-D sequence of numbers, not an array of shape {arr.shape}")
    return arr


def _as_store(store: Any) -> tuple[TrialStore, bool]:
    if isinstance(store, TrialStore):
        return store, False
    from thunderline_lab.lab import Lab

    lab = store if isinstance(store, Lab) else Lab.resolve(store)
    if not lab.db_path.exists():
        raise StudyError(f"no trial store at {lab.db_path}")
    return lab.store(), True


def _compare(
    store: TrialStore,
    study: str,
    metrics: Sequence[str] | None,
    mode: Mode,
    paired: bool | None,
    statuses: Sequence[str],
    n_boot: int,
    confidence: float,
    seed: int,
    max_draws: int,
    details: bool,
    curve_trials: int,
    use_cache: bool,
) -> ComparisonResult:
    wanted = list(dict.fromkeys(metrics or DEFAULT_METRICS))
    # details: the Lipschitz bound and the accuracy plotted against it
    extra = ("test_accuracy", "val_accuracy")

    def select(reported: set[str]) -> set[str]:
        # only the key _resolve will use per metric (<mode>_<m> when reported): each key is a
        # JSON read of every trial's metrics on a first read
        keys = {k for m in wanted if (k := _source_key(m, mode, reported)) is not None}
        if details:
            keys |= {k for m in extra if (k := _source_key(m, mode, reported)) is not None}
            keys |= {"lipschitz_upper"} & reported
            # the per-layer σ, read in the same pass over the trials (a second pass for them
            # costs a whole scan of the study on a first read)
            keys |= {k for k in reported if k.startswith("sigma/")}
        return keys

    frame = _get_frame(store, study, select, use_cache)
    if metrics is not None:
        probe = [k for m in wanted for k in (m, f"{mode}_{m}")]
        with frame.lock:
            _probe_keys(store, study, frame, probe)
            _ensure_columns(store, study, frame, select(frame.keys))
    if frame.n == 0:
        known = store.studies()
        raise StudyError(
            f"no trials for study {study!r} in {store.path}"
            + (f" ({_known_names('studies', known, study)})" if known else " (the store is empty)")
        )
    if details:
        sigma_keys = sorted(k for k in frame.keys if k.startswith("sigma/"))
        _ensure_columns(store, study, frame, sigma_keys)
    notes: list[str] = []
    if tuple(statuses) != ("completed",):  # the header says so too; a mean moved by it
        notes.append(
            f"trials of status {', '.join(statuses)} compared, not only completed ones"
            + (
                ": a pruned trial's values are those it reached when it was stopped early"
                if "pruned" in statuses
                else ""
            )
        )
    counts = _counts(frame)
    arms = _arms(frame, statuses, seeds=lambda: _seed_codes(store, study, frame))
    is_sn, is_none = arms.is_sn, arms.is_none
    if not (is_sn.any() or is_none.any()):
        by_status = counts.groupby("status", sort=True)["n"].sum()
        raise StudyError(
            f"study {study!r}: no {'/'.join(statuses)} trial with a known spectral_norm arm "
            "(trials by status: "
            + ", ".join(f"{status} {n}" for status, n in by_status.items())
            + ")"
        )
    codes = arms.codes
    n_pairs_possible = arms.n_pairs
    design_paired = bool(n_pairs_possible > 0) if paired is None else paired
    one_arm = not (is_sn.any() and is_none.any())
    if one_arm:  # no design can compare anything: say so, not which test was not run
        missing, present = ("none", "SN") if is_sn.any() else ("SN", "none")
        notes.append(
            f"no {'/'.join(statuses)} trial "
            + ("without SN" if missing == "none" else "with SN")
            + f" ({missing} arm): nothing to compare the {present} arm with"
        )
    elif design_paired and n_pairs_possible == 0:
        notes.append("paired design requested but no pair_id has both arms; nothing to pair")
    elif not design_paired and arms.has_pair_ids and paired is None:
        notes.append("pair ids present but no complete pair: unpaired comparison (Welch)")
    elif paired is None and not arms.has_pair_ids:
        notes.append("no pair_id in parameters: unpaired comparison (Welch's t-test)")
    if design_paired and not one_arm and arms.n_incomplete:
        half = arms.n_incomplete
        notes.append(
            f"{half} pair{'s have' if half > 1 else ' has'} a twin in one arm only (the other "
            f"failed, was pruned, is running or is not {'/'.join(statuses)}): left out of the "
            "paired comparison"
        )
    if design_paired and n_pairs_possible and arms.pair_rows is None:
        notes.append(
            "some pairs have several trials in an arm: a configuration run on several seeds "
            "is one pair (its group_id; the seeds share every hyperparameter, so they are "
            "not independent samples), and each arm's mean over its seeds is compared; "
            "n_pairs counts configurations, not seeds or trials"
        )

    groups = None if design_paired or one_arm else _group_codes(store, study, frame)
    if groups is not None and not _has_replicates(groups, is_sn, is_none):
        # a paired study's twins share their group_id: one trial per arm is no replicate
        groups = None
    if groups is not None:
        n_cfg = [len(np.unique(groups[arm & (groups >= 0)])) for arm in (is_sn, is_none)]
        notes.append(
            "replicates: a configuration run on several seeds (its group_id) is one value per "
            "arm, the mean over its seeds (they share every hyperparameter, so they are not "
            f"independent samples); n counts configurations ({n_cfg[0]} SN, {n_cfg[1]} none, "
            "plus any trial without a group_id), not trials"
        )
    rows, sources, pair_cols, values_by_metric = [], {}, {}, {}
    skipped = []
    for metric in wanted:
        resolved = _resolve(
            store,
            frame,
            metric,
            mode,
            history=metrics is not None or metric in HISTORY_METRICS,
            study=study,
            member=arms.is_sn | arms.is_none,
            notes=notes,
        )
        if resolved is None:
            skipped.append(metric)
            continue
        sources[metric], values_by_metric[metric] = resolved
    if skipped and metrics is not None:
        names = _metric_names(store, frame)
        _refuse_unknown_metrics(study, skipped, names)
        notes.append(
            "not reported by any trial: "
            + ", ".join(m + (f" ({h})" if (h := _did_you_mean(m, names)) else "") for m in skipped)
        )
    for metric, values in values_by_metric.items():
        row, d = _metric_row(
            arms,
            metric,
            values,
            design_paired,
            n_boot,
            confidence,
            seed,
            max_draws,
            frame.odd.get(sources[metric]),
            groups,
        )
        row["source"] = sources[metric]
        rows.append(row)
        if d is not None:
            pair_cols[metric] = d
    # a per-epoch metric without final_<m>: its summary describes the restored best epoch
    summarised = [m for m, src in sources.items() if src == m and m in HISTORY_METRICS]
    if mode == "final" and summarised:
        notes.append(
            f"final mode: no final_<metric> reported for {', '.join(summarised)}: read from "
            "the trial summary, measured on the restored best-epoch model (as in best mode), "
            "not at the last epoch trained"
        )
    if not rows:
        names = _metric_names(store, frame)
        hints = [h for m in wanted if (h := _did_you_mean(m, names))]
        lead = [c for m in wanted for c in _closest(m, names)]  # listed first, never cut
        raise StudyError(
            f"study {study!r}: none of the metrics {', '.join(wanted)} is reported"
            + (f" ({'; '.join(hints)})" if hints else "")
            + (f"; {_known_names('it reports', sorted(names), '', first=lead)}" if names else "")
        )
    # the metrics' p-values as one family (Holm), over the rows as remembered: the
    # adjustment is never cached, so no remembered row or snapshot lacks it
    headline = pd.DataFrame(_holm_rows(rows, confidence))
    headline = headline[[c for c in _HEADLINE_COLUMNS if c in headline.columns]]
    headline.attrs["confidence"] = confidence  # format_headline names the CI column by it
    per_subset = functools.partial(
        _subset_rows,
        values_by_metric=values_by_metric,
        sources=sources,
        codes=codes,
        is_none=is_none,
        paired=design_paired,
        n_boot=n_boot,
        confidence=confidence,
        seed=seed,
        max_draws=max_draws,
        configs=groups,
    )
    by_coeff = per_subset(_coeff_subsets(frame, is_sn))
    by_coeff.attrs["confidence"] = confidence
    modes = None if one_arm else _sn_modes(store, study, frame)
    by_mode = per_subset(_mode_subsets(modes, is_sn))
    by_mode.attrs["confidence"] = confidence
    notes += _subgroup_notes(by_coeff, "coeff_range", "SN coefficient")
    notes += _subgroup_notes(by_mode, "sn_mode", "SN mode")
    n_boot_used = sorted(set(headline["n_boot"].tolist()))
    if any(b < n_boot for b in n_boot_used if b):
        notes.append(
            f"large study: {min(b for b in n_boot_used if b)} bootstrap resamples for some "
            f"metrics (n × resamples capped at {max_draws:,}); raise max_draws for more"
        )
    saddle = [row["metric"] for row in rows if row.get("ci_method") == "saddlepoint"]
    if saddle:
        notes.append(
            f"{', '.join(saddle)}: {SADDLEPOINT_MIN:,}+ "
            + ("pairs" if design_paired else "values per arm")
            + ": the bootstrap distribution's quantiles are computed by the saddlepoint "
            "approximation (Lugannani–Rice), not by drawing resamples: an approximation of "
            "the percentile CI (within a few hundredths of a standard error of the resampled "
            "one) without Monte-Carlo error, and the seed does not enter"
        )
    notes += arms.excluded
    notes += [f"{row['metric']}: {row['note']}" for row in rows if row.get("note")]
    same = _identical_twins(store, study, arms, pair_cols)
    if same:
        notes.append(
            f"{same} of {len(next(iter(pair_cols.values())))} pairs report the same value in "
            "both arms for every summary metric (wall-clock times aside), not only those "
            "compared: SN left those trials unchanged (the soft bound W / max(1, σ/c) "
            "does nothing while every σ stays ≤ c); a longer budget or a smaller c lets it act"
        )

    sel = arms.sel
    trials: dict[str, np.ndarray | _Later] = dict(arms.columns)  # read-only arrays, shared
    for metric, values in values_by_metric.items():
        trials[metric] = values[sel]
    accuracy_metric = None
    curves = pd.DataFrame(columns=["arm", "name", "step", "n", "mean", "ci_low", "ci_high"])
    layer_sigma = pd.DataFrame(columns=["layer", "arm", "n", "mean", "ci_low", "ci_high"])
    if details:
        for key in ("lipschitz_upper",):
            if key in frame.columns and key not in trials:
                trials[key] = frame.columns[key][sel]
        for cand in ("test_accuracy", "val_accuracy"):
            if cand in trials:
                accuracy_metric = cand
                break
            res = _resolve(store, frame, cand, mode, history=True)
            if res is not None:
                trials[cand] = res[1][sel]
                accuracy_metric = cand
                break
        sigma_keys = [k for k in frame.columns if k.startswith("sigma/")]
        for k in sigma_keys:
            trials[k] = frame.columns[k][sel]
        # The details read every sampled trial's curves from the store: kept for the
        # frame's state and the log's position (a late metric point moves the watermark),
        # the latest only, so comparing again with nothing new does not read them again.
        details_key = (
            "details",
            frame.watermark,
            tuple(statuses),
            curve_trials,
            seed,
            confidence,
            tuple(sigma_keys),
        )
        cached = frame.derived.get(details_key) if use_cache else None
        if isinstance(cached, _RawDetails):  # read with the snapshot: decoded when asked
            cached = cached.decode()
            if cached is None:
                del frame.derived[details_key]
            else:
                frame.derived[details_key] = cached
        if cached is None:
            sigmas = {k: v for k in sigma_keys if isinstance(v := trials[k], np.ndarray)}
            arm = arms.columns["arm"]
            layer_sigma = _layer_sigma(
                arm() if isinstance(arm, _Later) else arm, sigmas, confidence
            )
            curves, sampled = _group_curves(
                store, frame, is_sn, is_none, curve_trials, seed, confidence
            )
            if use_cache:
                for old in [k for k in frame.derived if isinstance(k, tuple) and k[0] == "details"]:
                    del frame.derived[old]
                frame.derived[details_key] = (layer_sigma, curves, sampled)
                frame.memo_dirty = True  # kept with the snapshot, for the next process
        else:
            layer_sigma, curves, sampled = cached
        layer_sigma, curves = layer_sigma.copy(), curves.copy()  # the caller's to change
        if sampled:
            notes.append(
                f"learning curves: mean ± {_percent(confidence)} CI over a random sample of "
                f"{curve_trials} trials per arm"
            )
    if use_cache:  # the frame and the statistics over it, for the next process
        _remember_rows(frame, _ROW_SINK.get())
        _maybe_save(store, study, frame)
    return ComparisonResult(
        study=study,
        mode=mode,
        design="one arm" if one_arm else "paired" if design_paired else "unpaired",
        confidence=confidence,
        seed=seed,
        headline=headline,
        trial_columns=trials,
        pair_columns=pair_cols,
        pair_ids=arms.later_labels(),
        by_coeff=by_coeff,
        by_mode=by_mode,
        counts=counts,
        curves=curves,
        layer_sigma=layer_sigma,
        sources=sources,
        notes=notes,
        accuracy_metric=accuracy_metric,
        statuses=tuple(statuses),
    )


# Metrics the workbench's trainer reports (summaries and per-epoch histories; best_/final_
# variants of each too): a name among these that a study does not report (ood_auroc of a
# dataset without OOD points) is only noted when asked for; any other unreported name is
# refused as a misspelling (:func:`_refuse_unknown_metrics`).
KNOWN_METRICS: frozenset[str] = frozenset(
    {
        *DEFAULT_METRICS,
        *CURVE_METRICS,
        *HISTORY_METRICS,
        "epoch",
        "epochs",
        "best_epoch",
        "train_accuracy",
        "train_nll",
        "val_nll",
        "val_ece",
        "val_brier",
        "test_brier",
        "test_entropy_mean",
        "lipschitz_lower",
        "mean_sigma",
        "min_sigma",
        "n_sn_clamped",
        "n_params",
        "step_time_ms",
    }
)


def _is_known_metric(name: str) -> bool:
    """Whether ``name`` (or the metric of ``best_<m>`` / ``final_<m>``) is in
    :data:`KNOWN_METRICS`."""
    return name in KNOWN_METRICS or re.sub(r"^(best|final)_", "", name) in KNOWN_METRICS


def _refuse_unknown_metrics(study: str, skipped: Sequence[str], reported: set[str]) -> None:
    """Refuse the metrics asked for by name that no trial reports (``skipped``) and that
    are no known metric: a misspelling would otherwise drop a test from the comparison
    (and from Holm's family) with only a note.

    Raises:
        StudyError: naming each such metric with the closest names the study reports
            (else the closest known ones), and what the study reports.
    """
    unknown = [m for m in skipped if not _is_known_metric(m)]
    if not unknown:
        return
    hints, lead = [], []
    for m in unknown:
        close = _closest(m, reported) or _closest(m, KNOWN_METRICS)
        lead += [c for c in close if c in reported]
        if close:
            shown = " or ".join(map(repr, close))
            hints.append(shown + (f" for {m!r}" if len(unknown) > 1 else ""))
    asked = ", ".join(map(repr, unknown[:-1])) + (" and " if len(unknown) > 1 else "")
    asked += repr(unknown[-1])
    raise StudyError(
        f"study {study!r}: no trial reports the metric{'s' if len(unknown) > 1 else ''} "
        + asked
        + (
            ", and no known metric has that name"
            if len(unknown) == 1
            else ", and no known metric has those names"
        )
        + (f" (did you mean {'; '.join(hints)}?)" if hints else "")
        + (
            f"; {_known_names('the study reports', sorted(reported), '', first=lead)}"
            if reported
            else ""
        )
    )


def _closest(name: str, known: Iterable[str]) -> list[str]:
    """The (at most three) names of ``known`` closest to ``name``
    (:func:`~thunderline_lab.errors.closest_names`): same name but for case or punctuation
    first, then by similarity, then the names ``name`` begins or is a word of."""
    return closest_names(name, known, n=3, cutoff=0.75)


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    """``did you mean 'x'?`` naming the known names closest to ``name`` ("" if none is
    close): :func:`_closest`."""
    close = _closest(name, known)
    return f"did you mean {' or '.join(map(repr, close))}?" if close else ""


def _known_names(
    what: str, known: Sequence[str], asked: str, limit: int = 20, first: Iterable[str] = ()
) -> str:
    """``what: a, b, c`` (the first ``limit``, then how many more), with a did-you-mean
    for ``asked`` first; the names it suggests, then ``first``, lead the list (a cut never
    hides them), the rest follow in their order."""
    close = _closest(asked, known) if asked else []
    hint = f"did you mean {' or '.join(map(repr, close))}?" if close else ""
    names = set(known)
    lead = [k for k in dict.fromkeys([*close, *first]) if k in names]
    ordered = lead + [k for k in known if k not in lead]  # (a few names)
    shown = ", ".join(ordered[:limit])
    more = f" and {len(known) - limit} more" if len(known) > limit else ""
    return (f"{hint} " if hint else "") + f"{what}: {shown}{more}"


def _metric_names(store: TrialStore, frame: _Frame) -> set[str]:
    """The metric names the study reports (summaries, without ``best_``/``final_``, and
    per-epoch histories): what a misspelled metric is matched against (not on a hot path:
    only when a metric asked for is not found)."""
    names = {re.sub(r"^(best|final)_", "", k) for k in frame.keys}
    for i in range(min(frame.n, 5)):  # a few trials' histories (primary-key seeks)
        rows = _read(
            store,
            "SELECT DISTINCT name FROM metrics WHERE model_run_id = ? AND trial_id = ?",
            [frame.run[i], frame.trial[i]],
        )
        names.update(str(r[0]) for r in rows)
    return names


_HEADLINE_COLUMNS = (
    "metric",
    "source",
    "design",
    "n_pairs",
    "n_sn",
    "n_none",
    "mean_sn",
    "mean_none",
    "diff",
    "ci_low",
    "ci_high",
    "test",
    "test_method",
    "statistic",
    "p_value",
    "p_holm",
    "n_boot",
    "ci_method",
    "higher_is_better",
    "favours",
    "note",
)


def _complete_pairs(
    codes: np.ndarray, is_sn: np.ndarray, is_none: np.ndarray
) -> tuple[np.ndarray, int]:
    """(per pair code: both arms have a trial, how many pairs have a trial in one arm only)."""
    size = int(codes.max()) + 1 if len(codes) and codes.max() >= 0 else 0
    has_sn = np.bincount(codes[is_sn & (codes >= 0)], minlength=size) > 0
    has_none = np.bincount(codes[is_none & (codes >= 0)], minlength=size) > 0
    return np.asarray(has_sn & has_none), int(np.count_nonzero(has_sn != has_none))


def _pair_means(
    values: np.ndarray, codes: np.ndarray, arm: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    ok = arm & (codes >= 0) & np.isfinite(values)
    sums = np.bincount(codes[ok], weights=values[ok], minlength=size)
    counts = np.bincount(codes[ok], minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
    if np.isinf(sums).any():  # finite values whose sum is beyond float64: in units of 2**k
        k = _exponent(values[ok]) or 0
        sums = np.bincount(codes[ok], weights=np.ldexp(values[ok], -k), minlength=size)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.ldexp(sums / counts, k)
    return means, counts


# per complete pair (codes ascending): its code, its SN trial's row, its none trial's row
_PairRows = tuple[np.ndarray, np.ndarray, np.ndarray]


def _identical_pairs(pair_cols: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """Per complete pair (the columns' order): a difference of exactly 0 in every metric
    compared that it reports (None: no pair).

    Metric by metric, stopping once no pair can qualify (the usual case in a real study,
    after the first metric): no pairs × metrics copy on every comparison.
    """
    same: np.ndarray | None = None
    reported: np.ndarray | None = None
    for d in pair_cols.values():
        missing = np.isnan(d)
        zero_or_missing = (d == 0) | missing
        same = zero_or_missing if same is None else same & zero_or_missing
        if not same.any():
            return None
        reported = ~missing if reported is None else reported | ~missing
    if same is None or reported is None:
        return None
    same &= reported
    return same if same.any() else None


# wall-clock measurements, which differ between runs of the very same computation
_WALL_CLOCK = re.compile(r"(^|_)(time|duration)(_|$)")
_JSON_OBJECT = msgspec.json.Decoder(dict)


def _identical_twins(
    store: TrialStore, study: str, arms: _Arms, pair_cols: Mapping[str, np.ndarray]
) -> int:
    """How many complete pairs are identical twins: every trial of the pair reports the
    same summary metrics with the same values (wall-clock times aside), so SN changed
    nothing in them. A pair that is a configuration run on several seeds (its
    ``group_id``) is one when each seed's twins are (seeds differ from each other by design).

    The metrics compared are only a first filter: the ones named (``n_params``, ``lr``)
    may be equal between twins by design while the others differ. Only the pairs equal in
    every metric compared, and in every other value the frame holds, are read from the
    store (their whole metrics), so a real study, where none is, costs nothing more (one
    lattice metric compared alone, an accuracy, is equal in 1-3% of pairs: without the
    second filter each new process read those pairs' JSON); the count is kept with the
    arms.
    """
    same = _identical_pairs(pair_cols)
    if same is None:
        return 0
    cand = np.flatnonzero(arms.complete)[same]  # pair codes
    key = cand.tobytes()
    if key in arms.twins:
        return arms.twins[key]
    cand = _equal_in_frame(arms, cand)
    if not len(cand):
        arms.twins[key] = 0
        return 0
    frame, codes = arms.frame, arms.codes
    member = np.flatnonzero((arms.is_sn | arms.is_none) & np.isin(codes, cand))
    known = frame.twins
    pids = frame.values("pair", member).tolist()
    cached = [_hashable(pid) and pid in known for pid in pids]
    n = len({pid for pid, hit in zip(pids, cached, strict=True) if hit and known[pid]})
    member = member[~np.asarray(cached, dtype=bool)]
    if not len(member):
        arms.twins[key] = n
        return n
    # with replicates, each seed's twins (their pair_id) are compared, not every trial of
    # the configuration with the first one
    seeds = None if arms.pair_rows is not None else _seed_codes(store, study, frame)[member]
    runs, trials = frame.run[member].tolist(), frame.values("trial", member).tolist()
    subset = list(zip(runs, trials, strict=True))
    by_trial = {
        (run, trial): text
        for _, run, trial, text in _trial_rows(
            store, study, "model_run_id, trial_id, metrics", subset
        )
    }
    keys: set[str] = set()  # every key met so far
    wall: list[str] = []  # those that are wall-clock measurements (one regex per key)
    seen: dict[tuple[int, int], dict[str, Any]] = {}  # (pair, seed) -> its first trial's
    differ: set[int] = set()
    for at, (i, ids) in enumerate(zip(member.tolist(), subset, strict=True)):
        code = int(codes[i])
        if code in differ:
            continue
        text = by_trial.get(ids)
        try:
            obj = _JSON_OBJECT.decode(text) if isinstance(text, str | bytes) else None
        except msgspec.DecodeError:
            try:  # NaN written out of band: Python's json reads it (and NaN != NaN)
                obj = json.loads(text) if isinstance(text, str | bytes) else None
            except ValueError:
                obj = None
        if not isinstance(obj, dict):
            differ.add(code)
            continue
        new = obj.keys() - keys
        if new:
            keys |= new
            wall += [k for k in new if _WALL_CLOCK.search(str(k))]
        for k in wall:
            obj.pop(k, None)
        if seen.setdefault((code, -1 if seeds is None else int(seeds[at])), obj) != obj:
            differ.add(code)
    # remembered per pair id, with the frame (and its snapshot: saved with the next save)
    for i, pid in zip(member.tolist(), frame.values("pair", member).tolist(), strict=True):
        if _hashable(pid):
            known[pid] = int(codes[i]) not in differ
            frame.memo_dirty = True
    n += len({int(c) for c in codes[member].tolist()} - differ)
    arms.twins[key] = n
    return n


def _equal_in_frame(arms: _Arms, cand: np.ndarray) -> np.ndarray:
    """The pair codes of ``cand`` whose SN and none trials hold the same value (or both
    none) in every column of the frame but wall-clock ones: a pair differing in one cannot
    be identical twins. Pairs with several trials in an arm are all kept."""
    found = arms.pair_rows
    if found is None:
        return cand
    codes, sn_rows, none_rows = found
    at = np.searchsorted(codes, cand)  # (codes: the complete pairs', ascending)
    a, b = sn_rows[at], none_rows[at]
    keep = np.ones(len(cand), dtype=bool)
    for name, column in arms.frame.columns.items():
        if _WALL_CLOCK.search(name):
            continue
        x, y = column[a], column[b]
        keep &= (x == y) | (np.isnan(x) & np.isnan(y))
        if not keep.any():
            break
    return cand[keep]


def _hashable(v: Any) -> bool:
    try:
        hash(v)
    except TypeError:
        return False
    return True


def _paired_diffs(
    values: np.ndarray,
    codes: np.ndarray,
    is_sn: np.ndarray,
    is_none: np.ndarray,
    rows: _PairRows | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(SN pair means, none pair means, differences, pair codes) over complete pairs.

    ``rows`` (:attr:`_Arms.pair_rows`, when every pair has at most one trial per arm): each
    pair's mean is its one trial's value, gathered instead of summed per pair; ``0.0 + x``
    is exactly what the sum over one value gives (``-0.0`` included), so both ways agree
    bit for bit.
    """
    if rows is not None:
        idx, sn_rows, none_rows = rows
        m_sn, m_none = values[sn_rows] + 0.0, values[none_rows] + 0.0
        ok = np.isfinite(m_sn) & np.isfinite(m_none)  # NaN: no value; ±inf: left out
        m_sn, m_none = m_sn[ok], m_none[ok]
        with np.errstate(over="ignore"):  # beyond float64: ±inf, as compare_arrays says
            return m_sn, m_none, m_sn - m_none, idx[ok]
    size = int(codes.max()) + 1 if len(codes) and codes.max() >= 0 else 0
    m_sn, c_sn = _pair_means(values, codes, is_sn, size)
    m_none, c_none = _pair_means(values, codes, is_none, size)
    both = np.flatnonzero((c_sn > 0) & (c_none > 0))
    with np.errstate(over="ignore"):
        return m_sn[both], m_none[both], m_sn[both] - m_none[both], both


def _group_means(values: np.ndarray, mask: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """The values of the rows in ``mask``, each configuration's (``groups`` code ≥ 0) as the
    mean over its rows; rows without a configuration (-1) as they are. Means are taken in
    units of a power of two for extreme magnitudes (no sum overflows)."""
    v, g = values[mask], groups[mask]
    single = g < 0
    if not (~single).any():
        return v
    k = _exponent(v) or 0
    scaled = np.ldexp(v[~single], -k) if k else v[~single]
    _, inverse = np.unique(g[~single], return_inverse=True)
    means = np.bincount(inverse, weights=scaled) / np.bincount(inverse)
    return np.concatenate([v[single], np.ldexp(means, k) if k else means])


def _param_rows(store: TrialStore, study: str, key: str) -> list[tuple[Any, Any, Any]]:
    """(run, trial, value) of the study's trials whose ``parameters`` have ``key`` (not
    null); JSON that SQLite refuses (a NaN written out of band) is parsed in Python, and
    broken JSON is an error naming the trial."""
    path = _json_path(key)
    sql = (
        "SELECT model_run_id, trial_id, json_extract(parameters, ?) FROM trials "
        "WHERE study = ? AND json_extract(parameters, ?) IS NOT NULL"
    )
    try:
        return _read(store, sql, [path, study, path])
    except Exception as exc:
        if not _malformed_json(exc):
            raise
    found = []
    for _, run, trial, text in _trial_rows(
        store, study, "model_run_id, trial_id, parameters", None
    ):
        value = _json_value(_parse_json(store, text, run, trial, "parameters"), key)
        if value is not None and value is not _STORED_NAN:
            found.append((run, trial, value))
    return found


def _per_row(frame: _Frame, found: Iterable[tuple[Any, Any, Any]]) -> tuple[list[int], list[Any]]:
    """The frame rows of ``(run, trial, value)`` items and their values (hashable: a list
    or object as its JSON), for the trials the frame has."""
    index = frame.index()
    rows, labels = [], []
    for run, trial, value in found:
        i = index.get((run, trial))
        if i is not None:
            rows.append(i)
            labels.append(value if _hashable(value) else json.dumps(value, sort_keys=True))
    return rows, labels


def _group_codes(store: TrialStore, study: str, frame: _Frame) -> np.ndarray | None:
    """Per frame row, the code of its configuration (``parameters["group_id"]``; -1
    without one), for the unpaired design: a configuration run on several seeds (``tpe``
    with replicates) is one sample, not one per seed. None when no configuration has two
    trials (nothing to average: the comparison is as before). Kept with the frame until a
    refresh changes a row."""
    key = ("groups",)
    if key in frame.derived:
        cached: np.ndarray | None = frame.derived[key]
        return cached
    codes = np.full(frame.n, -1, dtype=np.int64)
    rows, labels = _per_row(frame, _param_rows(store, study, "group_id"))
    if rows:
        codes[rows] = pd.factorize(pd.Series(labels, dtype=object))[0]
    members = codes[codes >= 0]
    out = codes if len(members) and np.bincount(members).max() > 1 else None
    if out is not None:
        out.flags.writeable = False
    frame.derived[key] = out
    return out


def _seed_codes(store: TrialStore, study: str, frame: _Frame) -> np.ndarray:
    """Per frame row, the code of its ``pair_id`` (-1 without one): a seed's own twin,
    where the frame pairs by configuration (``group_id``, :data:`_UNIT_SQL`). Read only for
    studies with replicates; kept with the frame until a refresh changes a row."""
    key = ("seeds",)
    cached: np.ndarray | None = frame.derived.get(key)
    if cached is not None:
        return cached
    codes = np.full(frame.n, -1, dtype=np.int64)
    rows, labels = _per_row(frame, _param_rows(store, study, "pair_id"))
    if rows:
        codes[rows] = pd.factorize(pd.Series(labels, dtype=object))[0]
    codes.flags.writeable = False
    frame.derived[key] = codes
    return codes


SN_MODE_PARAM = "conv_sn_mode"  # how a CNN's convolutions are normalised (models.py)


def _sn_modes(store: TrialStore, study: str, frame: _Frame) -> np.ndarray | None:
    """Per frame row, its ``conv_sn_mode`` parameter (``operator`` / ``matrix``; None
    without one), or None when no trial of the study has one. The parameters of the first
    and last 200 trials are looked at first, so studies without the parameter (every MLP
    study) pay no scan of every trial's JSON. Kept with the frame until a refresh changes a
    row."""
    key = ("sn_modes",)
    if key in frame.derived:
        cached: np.ndarray | None = frame.derived[key]
        return cached
    out = None
    sample = [
        text
        for order in ("ASC", "DESC")
        for (text,) in _read(
            store,
            f"SELECT parameters FROM trials WHERE study = ? ORDER BY rowid {order} LIMIT 200",
            [study],
        )
    ]
    if any(isinstance(t, str) and SN_MODE_PARAM in t for t in sample):
        rows, labels = _per_row(frame, _param_rows(store, study, SN_MODE_PARAM))
        if rows:
            out = np.full(frame.n, None, dtype=object)
            out[rows] = [str(v) for v in labels]
            out.flags.writeable = False
    frame.derived[key] = out
    return out


def _compare_metric(
    metric: str,
    values: np.ndarray,
    codes: np.ndarray,
    is_sn: np.ndarray,
    is_none: np.ndarray,
    paired: bool,
    n_boot: int,
    confidence: float,
    seed: int,
    max_draws: int,
    rows: _PairRows | None = None,
    groups: np.ndarray | None = None,
) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray] | None]:
    """The metric's headline row, and in a paired design its pair differences with their
    pair codes (the pairs where both arms report the metric).

    ``groups`` (unpaired design, :func:`_group_codes`): each configuration run on several
    seeds is one value per arm, the mean over its seeds."""
    if paired:
        sn, none, d, both = _paired_diffs(values, codes, is_sn, is_none, rows)
        return (
            compare_arrays(
                metric,
                sn,
                none,
                paired=True,
                n_boot=n_boot,
                confidence=confidence,
                seed=seed,
                max_draws=max_draws,
            ),
            (both, d),
        )
    finite = np.isfinite(values)  # NaN: no value; ±inf: left out (noted by _metric_row)
    if groups is None:
        sn, none = values[is_sn & finite], values[is_none & finite]
    else:
        sn = _group_means(values, is_sn & finite, groups)
        none = _group_means(values, is_none & finite, groups)
    row = compare_arrays(
        metric,
        sn,
        none,
        paired=False,
        n_boot=n_boot,
        confidence=confidence,
        seed=seed,
        max_draws=max_draws,
    )
    return row, None


def _metric_row(
    arms: _Arms,
    metric: str,
    values: np.ndarray,
    paired: bool,
    n_boot: int,
    confidence: float,
    seed: int,
    max_draws: int,
    odd: Mapping[int, str] | None = None,
    groups: np.ndarray | None = None,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """:func:`_compare_metric` over ``arms``, kept with them: the same values (the frame's
    arrays are replaced or the arms dropped when a refresh changes a row) and arguments give
    the same row. The differences are given per complete pair of the arms, in pair-code
    order (NaN where a pair lacks the metric), so every metric's column lines up.

    ``odd``: the frame rows whose stored value is no usable number (:attr:`_Frame.odd` of
    the metric's key), for the note."""
    key = (metric, paired, n_boot, confidence, seed, max_draws, groups is None)
    hit = arms.rows.get(key)
    if hit is None or hit[0] is not values:
        row, diffs = _compare_metric(
            metric,
            values,
            arms.codes,
            arms.is_sn,
            arms.is_none,
            paired,
            n_boot,
            confidence,
            seed,
            max_draws,
            arms.pair_rows if paired else None,
            None if paired else groups,
        )
        d = None
        if diffs is not None:
            both, pair_d = diffs
            complete = np.flatnonzero(arms.complete)
            if len(both) == len(complete) and np.array_equal(both, complete):
                d = np.asarray(pair_d, dtype=float).copy()  # every complete pair has the metric
            else:
                d = np.full(len(complete), np.nan)
                d[np.searchsorted(complete, both)] = pair_d  # both: a subset of the complete
        row["note"] = _study_row_note(arms, values, row, odd)
        hit = (values, row, d)
        arms.rows[key] = hit
    return dict(hit[1]), hit[2]


def _study_row_note(
    arms: _Arms, values: np.ndarray, row: dict[str, Any], odd: Mapping[int, str] | None = None
) -> str:
    """The row's note (:func:`_row_note`) in the study's terms: the non-finite values among
    the trials compared (±inf, and NaN written to the store; left out and counted, while a
    nan in ``values`` is otherwise only no value), the values that are no number (text, a
    list: left out, counted and named, ``odd``), which arm reports a metric that no pair
    has in both, and how many pairs (or trials) lack a value. Vectorised; run once per
    metric and frame state (kept with the row by :func:`_metric_row`)."""
    inf = np.isinf(values)
    n_inf = int(np.count_nonzero(inf[arms.sel])) if inf.any() else 0
    nan_rows: list[int] = []
    bad: list[tuple[int, str]] = []
    if odd:  # rare: stored values that are no usable number, among the trials compared
        compared = arms.is_sn | arms.is_none
        for i, what in sorted(odd.items()):
            if i < len(compared) and compared[i]:
                if what == "nan":
                    nan_rows.append(i)
                else:
                    bad.append((i, what))
    n_nonfinite = n_inf + len(nan_rows)
    row["n_nonfinite"] = n_nonfinite
    row["n_not_number"] = len(bad)
    kind = "NaN or ±inf" if n_inf and nan_rows else ("±inf" if n_inf else "NaN")
    why = [_left_out(n_nonfinite, kind)] if n_nonfinite else []
    if bad:
        trial = arms.frame.trial
        named = ", ".join(f"{trial[i]}: {what}" for i, what in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        was = "values are" if len(bad) > 1 else "value is"
        why.append(
            f"{len(bad)} {was} not a number ({named}{more}) and "
            f"{'were' if len(bad) > 1 else 'was'} left out"
        )
    a_value = (
        ("a finite numeric value" if bad else "a finite value")
        if n_nonfinite
        else ("a numeric value" if bad else "a value")
    )
    n_pairs = int(row["n_pairs"])
    if row["design"] == "paired" and n_pairs == 0:
        has = [bool(np.isfinite(values[arm]).any()) for arm in (arms.is_sn, arms.is_none)]
        if has[0] != has[1]:
            why.append(f"only {'SN' if has[0] else 'none'} trials report it: nothing to compare")
        elif not has[0]:
            why.append("no trial compared reports it")
        else:
            why.append("no pair has a value in both arms: nothing to compare")
        return "; ".join(why)
    if row["design"] == "paired" and n_pairs < arms.n_pairs:
        n_lack = arms.n_pairs - n_pairs
        verb = "lack" if n_lack > 1 else "lacks"
        why.append(f"{n_lack} of {arms.n_pairs} pairs {verb} {a_value} in an arm: left out")
    elif row["design"] == "unpaired" and row["n_sn"] and row["n_none"]:
        # trials with a value, not the row's n: with replicates n counts configurations
        have = [
            (arm, int(np.count_nonzero(np.isfinite(values[mask]))), total)
            for arm, mask, total in (
                ("SN", arms.is_sn, arms.n_sn),
                ("none", arms.is_none, arms.n_none),
            )
        ]
        lacking = [f"{total - n} of {total} {arm}" for arm, n, total in have if n < total]
        if lacking:
            why.append(f"{' and '.join(lacking)} trials lack {a_value}: left out")
    rest = _row_note({**row, "n_nonfinite": 0})
    return "; ".join([*why, rest] if rest else why)


def _first_rows(codes: np.ndarray) -> np.ndarray:
    """The first row of each code 0..max, for codes numbered in order of first appearance
    (``pd.factorize``; -1: none): where the running maximum rises, in O(n)."""
    if not len(codes):
        return np.empty(0, dtype=np.intp)
    before = np.maximum.accumulate(np.concatenate([[-1], codes[:-1]]))
    return np.flatnonzero(codes > before)


def _has_replicates(codes: np.ndarray, is_sn: np.ndarray, is_none: np.ndarray) -> bool:
    """Whether some pairing unit has several trials in an arm (seeds of a configuration)."""
    for arm in (is_sn, is_none):
        member = codes[arm & (codes >= 0)]
        if len(member) and np.bincount(member).max() > 1:
            return True
    return False


def _twinned(
    codes: np.ndarray, seeds: np.ndarray, is_sn: np.ndarray, is_none: np.ndarray
) -> tuple[np.ndarray, int]:
    """(``codes`` with -1 for every row whose seed twin, the same (unit, ``pair_id``) in
    the other arm, is not there; how many seed pairs have a trial in one arm only)."""
    both = (codes >= 0) & (seeds >= 0)
    twin = np.full(len(codes), -1, dtype=np.int64)
    if both.any():
        key = codes[both].astype(np.int64) * (int(seeds.max()) + 1) + seeds[both]
        twin[both] = np.unique(key, return_inverse=True)[1].reshape(-1)
    has_twin, n_incomplete = _complete_pairs(twin, is_sn, is_none)
    keep = both.copy()
    keep[both] = has_twin[twin[both]]
    return np.where(keep, codes, -1), n_incomplete


@dataclass
class _Arms:
    """The trials of each arm under one set of statuses, derived once per frame state."""

    frame: _Frame
    is_sn: np.ndarray
    is_none: np.ndarray
    # per frame row, its pairing unit's code (:meth:`_Frame.pair_codes`), -1 for a row in
    # no pair; with replicates, also -1 for a seed whose own twin is not in the other arm
    codes: np.ndarray
    complete: np.ndarray  # per pair code: both arms have a trial
    has_pair_ids: bool
    n_pairs: int
    n_incomplete: int  # pair ids with a trial in one arm only
    n_sn: int  # trials in each arm
    n_none: int
    sel: np.ndarray  # frame rows in either arm
    columns: dict[str, np.ndarray | _Later]  # the trials table's id and arm columns over sel
    excluded: list[str]  # notes: trials of other statuses left out
    # (metric, design, n_boot, confidence, seed, max_draws) -> (values, row, differences)
    rows: dict[tuple[Any, ...], tuple[np.ndarray, dict[str, Any], np.ndarray | None]] = field(
        default_factory=dict
    )
    # candidate pair codes (bytes) -> how many are identical twins (_identical_twins)
    twins: dict[bytes, int] = field(default_factory=dict)
    _labels: np.ndarray | None = None

    @functools.cached_property
    def pair_rows(self) -> _PairRows | None:
        """Each complete pair's code and its SN and none trials' rows, when no pair has two
        trials in one arm (the paired design's usual shape); else None (means by sums)."""
        codes = self.codes
        size = len(self.complete)
        found = []
        for arm in (self.is_sn, self.is_none):
            member = arm & (codes >= 0)
            arm_codes = codes[member]
            if len(arm_codes) and np.bincount(arm_codes, minlength=size).max() > 1:
                return None
            rows = np.full(size, -1, dtype=np.intp)
            rows[arm_codes] = np.flatnonzero(member)
            found.append(rows)
        idx = np.flatnonzero(self.complete)
        return idx, found[0][idx], found[1][idx]

    def pair_labels(self) -> np.ndarray:
        """The pair id of each complete pair, in pair-code order."""
        if self._labels is None:
            encoded = self.frame.deferred.get("pair")
            if encoded is not None:  # each code's id from the snapshot's distinct ids
                labels = _labels_of(encoded, self.frame.pair_codes(), self.complete)
            else:
                first = _first_rows(self.frame.pair_codes())
                labels = np.asarray(
                    self.frame.pair[first[np.flatnonzero(self.complete)]], dtype=object
                )
            labels.flags.writeable = False
            self._labels = labels
        return self._labels

    def later_labels(self) -> Callable[[], np.ndarray]:
        """:meth:`pair_labels` for a result to make when its pairs table is read: from the
        ids and codes as they are now (a refresh may change the frame's before then)."""
        encoded = self.frame.deferred.get("pair")
        if self._labels is not None or encoded is None:
            labels = self.pair_labels()
            return lambda: labels
        return _Later(_labels_of, encoded, self.frame.pair_codes(), self.complete)


def _status_labels(names: np.ndarray, codes: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """The status of each selected row, from the frame's status codes (:meth:`_Frame.status_codes`:
    a refresh makes new arrays of them, never changes these)."""
    return np.asarray(names, dtype=object)[codes[sel]]


def _arm_labels(is_sn: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """The arm of each selected row: ``SN`` or ``none``."""
    return np.where(is_sn[sel], "SN", "none")


def _labels_of(encoded: _Encoded, codes: np.ndarray, complete: np.ndarray) -> np.ndarray:
    """The id of each complete pair (``complete``: per code), from a snapshot's ids."""
    return encoded.table(codes)[np.flatnonzero(complete)]


def _arms(
    frame: _Frame, statuses: Sequence[str], seeds: Callable[[], np.ndarray] | None = None
) -> _Arms:
    """The arms of ``frame`` under ``statuses`` (cached with the frame until a refresh).

    ``seeds``: gives each row's seed-level ``pair_id`` code (:func:`_seed_codes`), asked for
    only when a pairing unit (a configuration, ``group_id``) has several trials in an arm.
    A seed whose twin (the same ``pair_id`` in the other arm) failed, was pruned or is
    running is then left out of its configuration's pair, as a pair without its twin is:
    else its arm's mean over the seeds would hold a seed that the other arm's lacks, and the
    difference would mix the seeds' spread with SN's effect."""
    key = ("arms", tuple(statuses))
    arms: _Arms | None = frame.derived.get(key)
    if arms is not None:
        return arms
    names, status_code = frame.status_codes()
    wanted = np.isin(names, list(statuses))  # per status code
    mask = wanted[status_code] if len(wanted) else np.zeros(len(status_code), dtype=bool)
    mask &= ~np.isnan(frame.sn)
    is_sn, is_none = mask & (frame.sn == 1.0), mask & (frame.sn == 0.0)
    codes = frame.pair_codes()
    has_pair_ids = bool((codes >= 0).any())
    complete, n_incomplete = _complete_pairs(codes, is_sn, is_none)
    if seeds is not None and _has_replicates(codes, is_sn, is_none):
        codes, n_incomplete = _twinned(codes, seeds(), is_sn, is_none)
        complete, _ = _complete_pairs(codes, is_sn, is_none)
    sel = np.flatnonzero(is_sn | is_none)

    def ids(name: str) -> np.ndarray | _Later:
        encoded = frame.deferred.get(name)  # a snapshot's ids: decoded if the table is read
        if encoded is None and name == "trial":  # no refresh changes a row's trial id
            return _Later(frame.trial.__getitem__, sel)
        if encoded is None:  # a refresh may patch a row's pair id in place: copied now
            return getattr(frame, name)[sel]
        return _Later(encoded.take, sel, frame.pair_codes() if name == "pair" else None)

    # made when the trials table is read: the run ids (a refresh never changes a row's; it
    # appends to a new array), the arms (of is_sn, kept as it is) and the statuses (of
    # their codes); the coefficients are copied now (a refresh patches them in place)
    columns: dict[str, np.ndarray | _Later] = {
        "model_run_id": _Later(frame.run.__getitem__, sel),
        "trial_id": ids("trial"),
        "status": (
            _Later(_status_labels, names, status_code, sel)
            if "status" in frame._str_codes  # (else the codes are of the values' str)
            else frame.status[sel]
        ),
        "arm": _Later(_arm_labels, is_sn, sel),
        "spectral_norm_coeff": frame.coeff[sel],
        "pair_id": ids("pair"),
    }
    n_status = np.bincount(status_code, minlength=len(names))
    excluded = [
        f"{n} {status} trial(s) excluded"
        for status, n in zip(names.tolist(), n_status, strict=True)
        if status not in statuses and n
    ]
    if codes is frame.pair_codes():
        codes = codes.view()  # (the frame's own array stays as it is)
    for arr in (is_sn, is_none, codes, complete, sel, *columns.values()):
        if isinstance(arr, np.ndarray):
            arr.flags.writeable = False  # shared by every result until the next refresh
    arms = _Arms(
        frame=frame,
        is_sn=is_sn,
        is_none=is_none,
        codes=codes,
        complete=complete,
        has_pair_ids=has_pair_ids,
        n_pairs=int(complete.sum()) if has_pair_ids else 0,
        n_incomplete=n_incomplete,
        n_sn=int(np.count_nonzero(is_sn)),
        n_none=int(np.count_nonzero(is_none)),
        sel=sel,
        columns=columns,
        excluded=excluded,
    )
    frame.derived[key] = arms
    return arms


def _coeff_subsets(frame: _Frame, is_sn: np.ndarray) -> list[tuple[dict[str, Any], np.ndarray]]:
    """The SN arm per coefficient when the study uses a few fixed ones (each tried more than
    once), or per tercile of a searched coefficient (``coeff`` the group's median,
    ``coeff_range`` its bounds): ``(label columns, SN mask)``; none when one coefficient."""
    known = is_sn & ~np.isnan(frame.coeff)
    coeffs = np.unique(frame.coeff[known])
    if len(coeffs) < 2:
        return []
    groups: list[tuple[float, str, np.ndarray]] = []
    n_known = int(np.count_nonzero(known))
    if len(coeffs) <= _MAX_COEFF_LEVELS and n_known >= 2 * len(coeffs):
        # a few fixed coefficients, each tried more than once: one row each
        text = _coeff_texts(coeffs)
        groups = [(float(c), text[c], is_sn & (frame.coeff == c)) for c in coeffs]
    elif n_known < 6:  # a few trials of a searched coefficient: one trial per row says nothing
        return []
    else:  # a searched (continuous) coefficient: terciles, not one trial per row
        edges = np.quantile(frame.coeff[known], [0.0, 1 / 3, 2 / 3, 1.0])
        text = _coeff_texts(edges)
        for k, (lo, hi) in enumerate(itertools.pairwise(edges)):
            last = k == len(edges) - 2
            upper = frame.coeff <= hi if last else frame.coeff < hi
            arm = known & (frame.coeff >= lo) & upper
            if arm.any():  # half-open, the last closed: which group an edge belongs to
                label = f"[{text[lo]}, {text[hi]}{']' if last else ')'}"
                groups.append((float(np.median(frame.coeff[arm])), label, arm))
    return [({"coeff": c, "coeff_range": label}, arm) for c, label, arm in groups]


def _coeff_texts(values: Iterable[float]) -> dict[float, str]:
    """Each value as text to 3 significant digits (as the trials table shows them), or
    as many more as tell distinct values apart (0.5001 and 0.5002 are not both 0.5)."""
    distinct = sorted({float(v) for v in values})
    for digits in range(3, 18):
        text = {v: f"{v:.{digits}g}" for v in distinct}
        if len(set(text.values())) == len(distinct):
            return text
    return {v: repr(v) for v in distinct}


def _subset_rows(
    subsets: Sequence[tuple[Mapping[str, Any], np.ndarray]],
    values_by_metric: Mapping[str, np.ndarray],
    sources: Mapping[str, str],
    codes: np.ndarray,
    is_none: np.ndarray,
    paired: bool,
    n_boot: int,
    confidence: float,
    seed: int,
    max_draws: int,
    configs: np.ndarray | None,
) -> pd.DataFrame:
    """Headline rows of each subset of the SN arm (``(label columns, SN mask)``) against
    none: each subset's comparison is one family of tests (Holm within it)."""
    rows = []
    for labels, arm in subsets:
        group = []
        for metric, values in values_by_metric.items():
            row, _ = _compare_metric(
                metric,
                values,
                codes,
                arm,
                is_none,
                paired,
                n_boot,
                confidence,
                seed,
                max_draws,
                groups=configs,
            )
            group.append({**labels, **row, "source": sources[metric]})
        rows += _holm_rows(group, confidence)
    return pd.DataFrame(rows)


def _mode_subsets(
    modes: np.ndarray | None, is_sn: np.ndarray
) -> list[tuple[dict[str, Any], np.ndarray]]:
    """The SN arm per SN mode (``conv_sn_mode``: the convolution's true operator norm or the
    reshaped kernel's, :func:`_sn_modes`) when it holds more than one: ``(label columns, SN
    mask)``; each mode's SN trials are then compared with none (paired: their own twins)."""
    if modes is None:
        return []
    present = sorted({m for m in modes[is_sn].tolist() if m is not None})
    if len(present) < 2:
        return []
    return [({"sn_mode": mode}, is_sn & (modes == mode)) for mode in present]


def _subgroup_notes(table: pd.DataFrame, key: str, label: str) -> list[str]:
    """The notes of a per-group table's rows (why a CI or test is n/a), one line per group
    and note text with the metrics it concerns: the report shows the table without its
    note column."""
    if table.empty or "note" not in table.columns:
        return []
    out = []
    for group, rows in table.groupby(key, sort=False):
        by_note: dict[str, list[str]] = {}
        for metric, note in zip(rows["metric"], rows["note"], strict=True):
            if isinstance(note, str) and note:
                by_note.setdefault(note, []).append(str(metric))
        out += [f"{label} {group}, {', '.join(m)}: {n}" for n, m in by_note.items()]
    return out


_MAX_COEFF_LEVELS = 6


def _counts(frame: _Frame) -> pd.DataFrame:
    """Trials by status and arm (a copy of the table cached with the frame)."""
    counts: pd.DataFrame | None = frame.derived.get("counts")
    if counts is None:
        arm = np.where(np.isnan(frame.sn), 2, np.where(frame.sn == 1.0, 0, 1))
        statuses, status_code = frame.status_codes()
        n_all = np.bincount(status_code * 3 + arm, minlength=3 * len(statuses))
        keys = np.flatnonzero(n_all)  # np.unique's answer, without the sort
        n = n_all[keys]
        counts = pd.DataFrame(
            {
                "status": statuses[keys // 3],
                "arm": np.array(["SN", "none", "?"])[keys % 3],
                "n": n,
            }
        )
        frame.derived["counts"] = counts
    return counts.copy()


def _t_crit(n: np.ndarray, confidence: float) -> np.ndarray:
    """Student t quantiles (``scipy.stats.t.ppf``'s own function, without importing
    scipy.stats)."""
    from scipy import special

    with np.errstate(invalid="ignore"):
        return np.asarray(special.stdtrit(np.maximum(n - 1, 1), 0.5 + confidence / 2))


_UNIT_RANGE = re.compile(r"(accuracy|_acc\b|_acc_|auroc|ece)", re.IGNORECASE)
_NON_NEGATIVE = re.compile(
    r"(loss|nll|brier|sigma|lipschitz|entropy|time|duration|n_params|epochs|^lr$)", re.IGNORECASE
)
_MIN_BAND_N = 3  # trials behind a t-interval band (n = 2: t ≈ 12.7 at 95%, a useless band)


@functools.lru_cache(maxsize=1024)
def _value_range(metric: str) -> tuple[float, float]:
    """The range a metric's values (and so a band around their mean) can take: [0, 1] for
    accuracies, AUROC and ECE, [-1, 1] for the generalisation gap (an accuracy difference),
    [0, ∞) for losses, Brier, σ, Lipschitz bounds and costs, else unbounded.

    Example:
        >>> _value_range("val_accuracy"), _value_range("val_loss"), _value_range("x")
        ((0.0, 1.0), (0.0, inf), (-inf, inf))
    """
    if _UNIT_RANGE.search(metric):
        return 0.0, 1.0
    if "gap" in metric.lower():
        return -1.0, 1.0
    if _NON_NEGATIVE.search(metric):
        return 0.0, math.inf
    return -math.inf, math.inf


def _mean_ci_table(
    df: pd.DataFrame,
    by: list[str],
    confidence: float,
    *,
    metric: str = "",
    metric_col: str = "",
    labels: Mapping[str, Sequence[str]] | None = None,
) -> pd.DataFrame:
    """Per group of ``by``: n, mean and a t-interval (ci_low, ci_high) of ``value``.

    The interval is NaN below ``_MIN_BAND_N`` values and clipped to the range of the
    metric (``metric``, or each group's ``metric_col``): an accuracy band stays in [0, 1].
    Non-finite values are left out; a group of extreme magnitude (1e300, 1e-300) is
    summarised in units of a power of two of its own, so its variance neither overflows
    (a band to infinity) nor underflows (a band of zero width).

    ``labels``: columns of ``by`` given as integer codes into these labels (grouping
    100,000s of rows by integers, not text, and no text column built), decoded in the
    result, whose rows are then in the codes' order."""
    values = df["value"].to_numpy(dtype=float)
    if not np.isfinite(values).all():
        df, values = df[np.isfinite(values)], values[np.isfinite(values)]
    magnitude = np.abs(values)
    nonzero = magnitude[magnitude > 0]
    extreme = len(nonzero) > 0 and (
        float(nonzero.max()) > _EXTREME or float(nonzero.min()) < 1 / _EXTREME
    )
    if extreme:  # each group's largest magnitude scaled to about 1, exactly (a power of 2)
        top = pd.Series(magnitude, index=df.index).groupby([df[c] for c in by]).transform("max")
        exps = np.frexp(top.to_numpy())[1]
        df = df.assign(value=np.ldexp(values, -exps), _exp=exps)
    grouped = df.groupby(by, sort=True)
    g = grouped["value"].agg(["count", "mean", "std"]).reset_index()
    g = g.rename(columns={"count": "n"})
    for col, names in (labels or {}).items():
        g[col] = np.asarray(names, dtype=object)[g[col].to_numpy()]
    if extreme:
        exps = grouped["_exp"].first().to_numpy()
        g["mean"] = np.ldexp(g["mean"].to_numpy(), exps)
        with np.errstate(over="ignore"):  # a spread beyond float64: an unbounded band
            g["std"] = np.ldexp(g["std"].to_numpy(), exps)
    half = _t_crit(g["n"].to_numpy(), confidence) * g["std"].to_numpy() / np.sqrt(g["n"])
    half = np.where(g["n"] >= _MIN_BAND_N, half, np.nan)
    if metric_col:
        ranges = {m: _value_range(str(m)) for m in g[metric_col].unique()}
        low = g[metric_col].map(lambda m: ranges[m][0]).to_numpy(dtype=float)
        high = g[metric_col].map(lambda m: ranges[m][1]).to_numpy(dtype=float)
    else:
        low, high = _value_range(metric)
    with np.errstate(invalid="ignore"):  # NaN bands stay NaN
        g["ci_low"] = np.clip(g["mean"] - half, low, high)
        g["ci_high"] = np.clip(g["mean"] + half, low, high)
    return g.drop(columns=["std"])


def _layer_sigma(
    arm: np.ndarray, columns: Mapping[str, np.ndarray], confidence: float
) -> pd.DataFrame:
    if not columns:
        return pd.DataFrame(columns=["layer", "arm", "n", "mean", "ci_low", "ci_high"])
    # grouped by codes (no text column of a row per trial and layer), decoded in the result
    arm_names, arm_codes = np.unique(np.asarray(arm), return_inverse=True)
    long = pd.DataFrame(
        {
            "layer": np.repeat(np.arange(len(columns)), len(arm_codes)),
            "arm": np.tile(arm_codes, len(columns)),
            "value": np.concatenate([np.asarray(v, dtype=float) for v in columns.values()]),
        }
    )
    layers = [key.removeprefix("sigma/") for key in columns]
    out = _mean_ci_table(  # (finite values)
        long,
        ["layer", "arm"],
        confidence,
        metric="sigma",
        labels={"layer": layers, "arm": arm_names.tolist()},
    )
    order = {k: i for i, k in enumerate(_natural_sorted(out["layer"].unique()))}
    return out.sort_values(
        ["layer", "arm"], key=lambda s: s.map(order) if s.name == "layer" else s
    ).reset_index(drop=True)


def _natural_sorted(items: Iterable[str]) -> list[str]:
    def key(s: str) -> list[Any]:
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]

    return sorted(items, key=key)


# a curve point as _group_curves reads it: (metric's code, step, value); steps up to 2**63
_CURVE_ROW = np.dtype([("name", np.int64), ("step", np.int64), ("value", np.float64)])


def _group_curves(
    store: TrialStore,
    frame: _Frame,
    is_sn: np.ndarray,
    is_none: np.ndarray,
    per_arm: int,
    seed: int,
    confidence: float,
) -> tuple[pd.DataFrame, bool]:
    rng = np.random.default_rng([seed, 7])
    arms = ("SN", "none")  # sorted, as the table's rows are by arm, name and step
    names = sorted(CURVE_METRICS)
    # each row's metric as its index in names, so no row brings a text into Python
    name_code = "CASE name " + " ".join(f"WHEN ? THEN {i}" for i in range(len(names))) + " END"
    parts: list[tuple[int, np.ndarray]] = []
    sampled = False
    for a, mask in enumerate((is_sn, is_none)):
        idx = np.flatnonzero(mask)
        if len(idx) > per_arm:
            idx = np.sort(rng.choice(idx, per_arm, replace=False))
            sampled = True
        by_run: dict[str, list[str]] = {}
        for row in idx:
            by_run.setdefault(frame.run[row], []).append(frame.trial[row])
        for run, trial_ids in by_run.items():
            for i in range(0, len(trial_ids), 400):
                chunk = trial_ids[i : i + 400]
                sql = (
                    f"SELECT {name_code}, step, value FROM metrics WHERE model_run_id = ? "
                    f"AND trial_id IN ({','.join('?' * len(chunk))}) "
                    f"AND name IN ({','.join('?' * len(names))})"
                )
                rows = _read(store, sql, [*names, run, *chunk, *names])
                if rows:
                    parts.append((a, np.array(rows, dtype=_CURVE_ROW)))
    if not parts:
        return pd.DataFrame(
            columns=["arm", "name", "step", "n", "mean", "ci_low", "ci_high"]
        ), False
    data = np.concatenate([rows for _, rows in parts])
    long = pd.DataFrame(
        {
            "arm": np.concatenate([np.full(len(rows), a) for a, rows in parts]),
            "name": data["name"],
            "step": data["step"],
            "value": data["value"],
        }
    )
    table = _mean_ci_table(
        long,
        ["arm", "name", "step"],
        confidence,
        metric_col="name",
        labels={"arm": arms, "name": names},
    )
    return table, sampled


# ---------------------------------------------------------------------------------------------
# Presentation
# ---------------------------------------------------------------------------------------------


def _num(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "—"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.{digits}f}"
    return str(v)


def _p(v: Any) -> str:
    """A p-value as text: 3 decimals, below 0.001 two significant digits in scientific
    notation (``8.8e-05``, ``1.0e-04``: never ``0.0001`` beside ``8.8e-05``)."""
    if v is None or v != v:
        return "n/a"
    return "<1e-16" if v < 1e-16 else (f"{v:.1e}" if v < 0.001 else f"{v:.3f}")


def _percent(confidence: float) -> str:
    """``95%`` for 0.95, ``97.5%`` for 0.975 (not ``int(100 * c)``: 0.29 * 100 < 29)."""
    return f"{confidence * 100:.4g}%"


def _signed(values: Sequence[float]) -> list[str]:
    """Signed numbers shown side by side (an estimate and its CI) in one format: 4 decimals,
    or 3 significant digits in scientific notation when the largest is ≥ 1e4 or < 1e-3, so a
    bound of zero reads ``+0.0000`` beside ``-0.2667`` (not ``+0``); NaN is ``n/a``."""
    finite = [abs(v) for v in values if v == v and not math.isinf(v)]
    scale = max(finite, default=0.0)
    spec = "+.2e" if scale and (scale >= 1e4 or scale < 1e-3) else "+.4f"
    return ["n/a" if v != v else format(v + 0.0, spec) for v in values]  # + 0.0: no -0


def _headline_display(headline: pd.DataFrame, confidence: float | None = None) -> pd.DataFrame:
    """The headline as strings: the CI column is named by ``confidence`` (default: the
    headline's ``attrs["confidence"]``, which :func:`compare_study` sets, else 0.95).

    A table without ``p_holm`` (rows of :func:`compare_arrays` put together by hand) gets
    it here, its rows taken as one family, and ``favours`` judged on it: no table shows
    raw p-values of several metrics without their adjustment."""
    if confidence is None:
        confidence = float(headline.attrs.get("confidence", 0.95))
    if "p_holm" not in headline.columns:
        headline = _with_holm(headline, float(headline.attrs.get("confidence", confidence)))
    delta, ci = [], []
    for d, lo, hi in zip(headline["diff"], headline["ci_low"], headline["ci_high"], strict=True):
        d_s, lo_s, hi_s = _signed([d, lo, hi])
        delta.append("—" if d != d else d_s)
        ci.append("n/a" if lo != lo or hi != hi else f"[{lo_s}, {hi_s}]")
    out = pd.DataFrame(
        {
            "metric": headline["metric"],
            "value": headline["source"],
            "n": [
                (f"{r.n_pairs} pair" + ("" if r.n_pairs == 1 else "s"))
                if r.design == "paired"
                else f"{r.n_sn}+{r.n_none}"
                for r in headline.itertuples()
            ],
            "SN": headline["mean_sn"].map(_num),
            "none": headline["mean_none"].map(_num),
            "Δ SN−none": delta,
            f"{_percent(confidence)} CI": ci,
            "test": headline["test"],
            "p": headline["p_value"].map(_p),
            "p_holm": headline["p_holm"].map(_p),
            "favours": headline["favours"],
        }
    )
    for column, title in (("coeff_range", "coeff"), ("sn_mode", "SN mode")):
        if column in headline.columns:  # a per-coefficient or per-mode table: its groups
            out.insert(0, title, headline[column].to_numpy())
    return out


def format_headline(headline: pd.DataFrame, *, confidence: float | None = None) -> str:
    """Fixed-width text of a headline table; its CI column is named by ``confidence``
    (default: the level :func:`compare_study` computed the headline at). A last line says
    what ``p_holm`` adjusts for (the family of tests, the method).

    Raises:
        StudyError: ``headline`` is no headline table (``res.headline``), or ``confidence``
            is not in (0, 1)."""
    if not isinstance(headline, pd.DataFrame) or not {"metric", "diff"} <= set(headline.columns):
        raise StudyError(
            "headline: a comparison's headline table (compare_study(...).headline), not "
            f"{type(headline).__name__}"
        )
    if confidence is not None:
        _check_confidence(confidence)
    shown = _headline_display(headline, confidence)
    widths = {c: max(len(c), *(len(str(v)) for v in shown[c])) for c in shown.columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in shown.columns)]
    lines.append("  ".join("-" * widths[c] for c in shown.columns))
    for rec in shown.itertuples(index=False):
        lines.append(
            "  ".join(str(v).ljust(widths[c]) for c, v in zip(shown.columns, rec, strict=True))
        )
    lines.append(_holm_note(headline))
    return "\n".join(lines)


def _markdown_table(df: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, df.columns)) + " |"]
    lines.append("|" + "|".join("---" for _ in df.columns) + "|")
    for rec in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in rec) + " |")
    return "\n".join(lines)


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=90)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _grid(n: int, cols: int = 3) -> tuple[int, int]:
    cols = min(cols, max(n, 1))
    return math.ceil(n / cols), cols


def _hist(ax: Any, values: np.ndarray, **style: Any) -> None:
    """A histogram of ``values``; values equal up to float noise (two pairs' differences
    of 0.0111 and 0.0111000000001) are one bar, where equal-width bins cannot be made. The
    bar is 2% of the value wide (±0.01 around zero: no ×1e-14 axis for all-zero values).
    Bars are outlined, so adjacent ones (and two arms' overlapping ones) stay apart."""
    style = {"edgecolor": "#333", "linewidth": 0.6, **style}
    lo, hi = float(np.min(values)), float(np.max(values))
    scale = max(abs(lo), abs(hi))
    if hi - lo <= max(scale * 1e-9, 1e-12):
        half = scale / 100 if scale > 1e-9 else 0.01
        ax.hist(values, bins=1, range=(lo - half, hi + half), **style)
    else:
        ax.hist(values, bins=min(40, max(5, len(values) // 3)), **style)


def _drawable(ax: Any, *arrays: np.ndarray) -> bool:
    """Whether an axis can span ``arrays`` (finite values): not when their range, with the
    axis' margins, is beyond float64 (values near ±1.8e308); the axis then says so."""
    values = [a for a in arrays if len(a)]
    if not values:
        return True
    lo = min(float(np.min(a)) for a in values)
    hi = max(float(np.max(a)) for a in values)
    with np.errstate(over="ignore"):
        ok = math.isfinite((hi - lo) * 1.25)
    if not ok:
        _no_data(ax, "values span beyond the float64 range: not drawn")
    return ok


def _finite(values: pd.Series | np.ndarray) -> np.ndarray:
    """The finite values (what the statistics used: NaN is no value, ±inf left out)."""
    a = np.asarray(values, dtype=float)
    return a[np.isfinite(a)]


def _plain(text: Any) -> str:
    """``text`` shown as written in a figure: ``$`` starts no mathtext (a study named
    ``lr $\\frac$`` would fail to draw)."""
    return str(text).replace("$", r"\$")


def _no_data(ax: Any, text: str) -> None:
    """Say why an axis is empty (instead of blank axes)."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _integer_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _few_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(nbins=5)


def _trials_text(res: ComparisonResult) -> str:
    """The statuses compared, for a figure's title: ``completed trials``."""
    return f"{', '.join(res.statuses)} trials"


def _value_text(res: ComparisonResult, metric: str) -> str:
    """The key a metric's values were read from (``best_val_accuracy``), for an axis."""
    return _plain(res.sources.get(metric, metric))


def _figure_legend(fig: Any, axes: Sequence[Any], height: float) -> float:
    """One key for every panel, below them (a key inside a panel covered its bars): the
    distinct labels of ``axes``' artists; returns the fraction of the figure's height
    (``height`` inches) it takes, for ``tight_layout``'s ``rect``."""
    found: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            found.setdefault(label, handle)
    if not found:
        return 0.0
    fig.legend(
        list(found.values()),
        list(found),
        loc="lower center",
        ncol=len(found),
        fontsize=7,
        frameon=False,
    )
    return min(0.3, 0.35 / height)


def _zero_inside(ax: Any) -> None:
    """Widen the x axis so that 0 (the "no difference" line) sits inside it, a tenth of
    the span from the edge at least, not on the frame (two pairs of one sign put it there)."""
    lo, hi = ax.get_xlim()
    pad = 0.125 * (max(hi, 0.0) - min(lo, 0.0))
    if pad > 0 and math.isfinite(pad):
        ax.set_xlim(min(lo, -pad), max(hi, pad))


def fig_differences(res: ComparisonResult) -> Any:
    """Per metric: the paired differences (or both arms) with the mean and its CI.

    The figure's file keeps its name (``paired_differences.png``) in an unpaired study; its
    title then says it shows each arm's values and the difference of the arm means."""
    metrics = res.headline["metric"].tolist()
    if not metrics:
        return None
    rows, cols = _grid(len(metrics))
    height = 2.8 * rows + 0.35
    fig = _new_figure(4.2 * cols, height)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    several = int(res.headline["p_value"].notna().sum()) > 1  # p_holm differs from p
    for ax, rec in zip(axes, res.headline.itertuples(), strict=False):
        p_holm = getattr(rec, "p_holm", math.nan)
        p_text = f"p={_p(rec.p_value)}" + (f" (Holm {_p(p_holm)})" if several else "")
        ax.set_title(f"{_plain(rec.metric)}: Δ {_num(rec.diff)}  {p_text}", fontsize=9)
        if res.design == "paired":
            raw = res.pairs[rec.metric] if rec.metric in res.pairs else pd.Series(dtype=float)
            d = _finite(raw)
            if not len(d):
                big = raw.notna().any()  # ±inf: beyond float64, as the headline says
                _no_data(ax, "differences beyond the float64 range" if big else "no complete pairs")
                continue
            if not _drawable(ax, d):
                continue
            _hist(ax, np.asarray(d), color="#888", alpha=0.7, label="pairs")
            ax.axvline(0, color="k", lw=1, label="no difference")
            if rec.ci_low == rec.ci_low and rec.ci_high == rec.ci_high:
                ci = f"{_percent(res.confidence)} CI"
                ax.axvspan(rec.ci_low, rec.ci_high, color="#ff7f0e", alpha=0.25, label=ci)
            if rec.diff == rec.diff:
                ax.axvline(rec.diff, color="#ff7f0e", lw=2, label="mean difference")
            _zero_inside(ax)
            ax.set_xlabel(f"SN − none per pair ({_value_text(res, rec.metric)})", fontsize=8)
            ax.set_ylabel("pairs", fontsize=8)
        else:
            drawn = False
            by_arm = {
                arm: _finite(res.trials.loc[res.trials["arm"] == arm, rec.metric])
                for arm in ("SN", "none")
            }
            if not _drawable(ax, *by_arm.values()):
                continue
            for arm, v in by_arm.items():
                if len(v):
                    _hist(ax, v, alpha=0.5, color=ARM_COLORS[arm], label=arm)
                    drawn = True
            if not drawn:
                _no_data(ax, "no values")
                continue
            ax.set_xlabel(f"{_value_text(res, rec.metric)} by arm", fontsize=8)
            ax.set_ylabel("trials", fontsize=8)
        ax.yaxis.set_major_locator(_integer_ticks())  # counts
        ax.xaxis.set_major_locator(_few_ticks())  # readable labels on a 4-inch axis
        ax.tick_params(labelsize=7)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    what = (
        "SN − none, unpaired: difference of the arm means"
        if res.design == "unpaired"
        else f"SN − none ({res.design}"
    )
    details = f"{res.mode} values, {_trials_text(res)}, {_percent(res.confidence)} CI"
    fig.suptitle(
        f"{_plain(res.study)}: {what}"
        + (f" ({details})" if res.design == "unpaired" else f", {details})"),
        fontsize=10,
    )
    bottom = _figure_legend(fig, axes[: len(metrics)], height)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


def fig_distributions(res: ComparisonResult, max_points: int = 2000) -> Any:
    """Per metric: box plots by arm with (subsampled) points."""
    metrics = res.headline["metric"].tolist()
    if not metrics:
        return None
    rows, cols = _grid(len(metrics), 4)
    fig = _new_figure(3.0 * cols, 2.8 * rows + 0.3)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    rng = np.random.default_rng(res.seed)
    for ax, metric in zip(axes, metrics, strict=False):
        data = [_finite(res.trials.loc[res.trials["arm"] == arm, metric]) for arm in ("SN", "none")]
        ax.set_title(_plain(metric), fontsize=9)
        ax.set_ylabel(_value_text(res, metric), fontsize=8)
        if not _drawable(ax, *data):
            continue
        if any(len(d) for d in data):
            with np.errstate(over="ignore"):  # its (unshown) mean of values near 1.8e308
                ax.boxplot(
                    [d if len(d) else [np.nan] for d in data],
                    showfliers=False,
                    tick_labels=["SN", "none"],
                    widths=0.5,
                )
        for i, (arm, d) in enumerate(zip(("SN", "none"), data, strict=True)):
            if len(d) > max_points:
                d = rng.choice(d, max_points, replace=False)
            ax.scatter(
                i + 1 + rng.uniform(-0.15, 0.15, len(d)), d, s=6, alpha=0.5, color=ARM_COLORS[arm]
            )
        ax.tick_params(labelsize=7)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    fig.suptitle(
        f"{_plain(res.study)}: values by arm ({res.mode} values, {_trials_text(res)}; box: "
        "quartiles and 1.5 IQR whiskers, dots: trials)",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def _masked_run(steps: np.ndarray, values: np.ndarray, mask: np.ndarray) -> tuple[Any, Any]:
    """``steps`` and ``values`` from the first to the last point of ``mask``, NaN where it
    is False (a gap in the line, not a segment drawn across it)."""
    at = np.flatnonzero(mask)
    if not len(at):
        return steps[:0], values[:0]
    part = slice(int(at[0]), int(at[-1]) + 1)
    return steps[part], np.where(mask[part], values[part], np.nan)


def _clipped(c: pd.DataFrame, name: str) -> bool:
    """Whether a band of curve ``c`` (of metric ``name``) was clipped to the metric's range."""
    low, high = _value_range(name)
    lo, hi, mean = (c[k].to_numpy(dtype=float) for k in ("ci_low", "ci_high", "mean"))
    return bool((((lo == low) & (mean > low)) | ((hi == high) & (mean < high))).any())


def fig_learning_curves(res: ComparisonResult) -> Any:
    """Group learning curves: per arm mean ± CI band for each curve metric (no band where
    fewer than three trials reach an epoch; bands clipped to the metric's range).

    Early stopping thins the arms at late epochs, and the few trials left (the slow ones)
    move the mean: the mean is dashed where fewer than half of the arm's trials reach the
    epoch and not drawn where fewer than ``_MIN_BAND_N`` do (an arm that never has as many
    is drawn throughout); the legend gives each arm's n at its largest and at the last
    epoch (``SN (n 20→3)``), and the title says what was left out or clipped."""
    if res.curves.empty:
        return None
    names = [n for n in CURVE_METRICS if n in set(res.curves["name"])]
    missing_bands = bool(res.curves["ci_low"].isna().any())
    any_dashed = any_hidden = any_clipped = False
    fig = _new_figure(4.2 * len(names), 3.3)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names, strict=True):
        for arm in ("SN", "none"):
            c = res.curves[(res.curves["name"] == name) & (res.curves["arm"] == arm)]
            if c.empty:
                continue
            steps, mean = c["step"].to_numpy(), c["mean"].to_numpy(dtype=float)
            n = c["n"].to_numpy(dtype=int)
            n_max = int(n.max())
            shown = n >= min(_MIN_BAND_N, n_max)
            solid = shown & (2 * n >= n_max)
            dashed = shown & ~solid
            # the dashed part starts at the solid point before it: one unbroken curve
            joined = dashed | (solid & np.append(dashed[1:], False))
            any_hidden |= not shown.all()
            any_dashed |= bool(dashed.any())
            any_clipped |= _clipped(c, name)
            n_last = int(n[-1])  # at the last epoch any trial reached, drawn or not
            label = f"{arm} (n={n_max})" if (n == n_max).all() else f"{arm} (n {n_max}→{n_last})"
            ax.plot(*_masked_run(steps, mean, solid), color=ARM_COLORS[arm], lw=1.8, label=label)
            if dashed.any():
                ax.plot(*_masked_run(steps, mean, joined), color=ARM_COLORS[arm], lw=1.2, ls="--")
            ax.fill_between(
                steps,
                c["ci_low"],
                c["ci_high"],
                where=shown,
                color=ARM_COLORS[arm],
                alpha=0.2,
                lw=0,
            )
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.25)
        ax.legend(fontsize=7, loc="best")
    caption = []
    if any_dashed:
        caption.append(
            "dashed: fewer than half of the arm's trials reach the epoch (early stopping)"
        )
    if any_hidden:
        caption.append(f"no mean nor band where fewer than {_MIN_BAND_N} trials remain")
    elif missing_bands:
        caption.append(f"no band below {_MIN_BAND_N} trials")
    if any_clipped:
        caption.append("bands clipped to the metric's range")
    if caption:  # wrapped to the figure's width (about 13 characters an inch at 9 pt)
        import textwrap

        caption = textwrap.wrap("; ".join(caption), width=max(40, int(13 * 4.2 * len(names))))
    fig.suptitle(
        f"{_plain(res.study)}: mean ± {_percent(res.confidence)} CI by arm ({_trials_text(res)})"
        + "".join(f"\n{line}" for line in caption),
        fontsize=10 if not caption else 9,
    )
    fig.tight_layout()
    return fig


def fig_accuracy_vs_lipschitz(res: ComparisonResult, max_points: int = 5000) -> Any:
    """Accuracy against the Lipschitz upper bound (log scale), coloured by arm."""
    acc = res.accuracy_metric
    if acc is None or "lipschitz_upper" not in res.trials or acc not in res.trials:
        return None
    df = res.trials[["arm", acc, "lipschitz_upper"]]
    df = df[np.isfinite(df[acc]) & np.isfinite(df["lipschitz_upper"]) & (df["lipschitz_upper"] > 0)]
    if df.empty:
        return None
    if len(df) > max_points:
        df = df.sample(max_points, random_state=res.seed)
    fig = _new_figure(5.0, 3.6)
    ax = fig.subplots()
    for arm in ("SN", "none"):
        part = df[df["arm"] == arm]
        ax.scatter(
            part["lipschitz_upper"],
            part[acc],
            s=12,
            alpha=0.6,
            color=ARM_COLORS[arm],
            label=f"{arm} (n={len(part)})",
        )
    ax.set_xscale("log")
    ax.set_xlabel("Lipschitz upper bound (product of per-layer bounds)", fontsize=8)
    ax.set_ylabel(acc, fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.25)
    ax.set_title(f"{_plain(res.study)}: {acc} vs Lipschitz bound", fontsize=9)
    fig.tight_layout()
    return fig


def fig_layer_sigma(res: ComparisonResult) -> Any:
    """Per-layer σ by arm (mean with CI error bars; none below three trials, never below 0)."""
    if res.layer_sigma.empty:
        return None
    layers = list(dict.fromkeys(res.layer_sigma["layer"]))
    fig = _new_figure(max(4.0, 0.9 * len(layers) + 2), 3.2)
    ax = fig.subplots()
    x = np.arange(len(layers))
    for j, arm in enumerate(("SN", "none")):
        part = res.layer_sigma[res.layer_sigma["arm"] == arm].set_index("layer").reindex(layers)
        err = np.vstack([part["mean"] - part["ci_low"], part["ci_high"] - part["mean"]])
        bars = ax.bar(
            x + (j - 0.5) * 0.38,
            part["mean"],
            width=0.38,
            color=ARM_COLORS[arm],
            yerr=err,  # NaN (no CI): no error bar drawn
            capsize=3,
            label=arm,
            alpha=0.85,
        )
        # how many trials each bar averages: a layer few trials have shows it
        counts = ["" if n != n else f"n={int(n)}" for n in part["n"].to_numpy(dtype=float)]
        ax.bar_label(bars, labels=counts, fontsize=6, padding=2)
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.margins(y=0.12)  # room for the counts above the tallest bar
    ax.set_xticks(x, [_plain(layer) for layer in layers], rotation=30, fontsize=7)
    ax.set_ylabel("σ (largest singular value)", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title(
        f"{_plain(res.study)}: per-layer σ (mean, {_percent(res.confidence)} CI where "
        f"n ≥ {_MIN_BAND_N})",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def _counts_table(counts: pd.DataFrame) -> pd.DataFrame:
    table = counts.pivot_table(
        index="status", columns="arm", values="n", fill_value=0, aggfunc="sum"
    ).astype(int)
    table.columns.name = None
    return table.reset_index()


def _md_text(text: str) -> str:
    """``text`` shown as it is in Markdown (a study named ``a *b*`` is not set in italics);
    a plain name (letters, digits, ``_ - .``, which Markdown leaves alone) is kept as it is."""
    if re.fullmatch(r"[\w.-]+", text):
        return text
    return re.sub(r"([\\`*_{}\[\]()#+!|<>~-])", r"\\\1", text)


def report_folder(study: str) -> str:
    """A folder name for ``study``'s report (``LAB/reports/<name>``): the study's name
    itself when it is a safe one (letters of any script, digits, ``_ - .``, not starting
    with a dot, up to 64 characters), else a safe version with a short hash of the name,
    so that two studies (``cli/ab``, ``cli ab``) never share a folder and none escapes it.

    Example:
        >>> report_folder("mnist-sn"), report_folder("étude"), report_folder("cli/ab")
        ('mnist-sn', 'étude', 'cli_ab-b5b00e4e')
    """
    import unicodedata

    if not isinstance(study, str):
        raise StudyError(f"study: a study's name (text), not {study!r}")
    name = unicodedata.normalize("NFC", study)
    safe = re.sub(r"[^\w.-]+", "_", name).strip("._")[:64]
    if safe and safe == study:  # "" too gets a name and a tag: never the reports folder
        return safe
    tag = hashlib.blake2b(study.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()
    return f"{safe or 'study'}-{tag}"


_MODE_SPLIT_NOTE = (
    "The SN arm split by `conv_sn_mode`: `operator` bounds each convolution's true operator "
    "norm, `matrix` the reshaped kernel's (torch's spectral_norm); each mode's SN trials "
    "against none (paired: their own twins), each mode one family of tests."
)


def write_report(
    res: ComparisonResult, out_dir: str | Path, *, mlflow_links: pd.DataFrame | None = None
) -> Path:
    """Write ``report.md`` and one PNG per figure into ``out_dir``; returns the report's path.

    ``mlflow_links`` (from :func:`thunderline_lab.tracking.mlflow_links`) adds a table of each
    trial's MLflow run, UI link and artifact folder.

    Figures: ``paired_differences.png``, ``distributions.png``, ``learning_curves.png``,
    ``accuracy_vs_lipschitz.png``, ``layer_sigma.png`` (those with data; one left in the
    folder by an earlier report is deleted when this one has no data for it). Each file is
    written atomically, ``report.md`` last.

    Raises:
        ConfigError: ``out_dir`` is empty, or cannot be made or written (a file in the way,
            no permission); the message names the path at fault.
        StudyError: ``res`` is no comparison, ``mlflow_links`` no links table.

    Example:
        >>> write_report(res, "lab/reports/ab")  # doctest: +SKIP
        PosixPath('lab/reports/ab/report.md')
    """
    if not isinstance(res, ComparisonResult):
        raise StudyError(f"res: a comparison (compare_study's result), not {type(res).__name__}")
    if not isinstance(out_dir, str | os.PathLike) or not str(out_dir).strip():
        raise ConfigError(
            f"out_dir: a folder path (for the current folder, give '.'), not {out_dir!r}"
        )
    if mlflow_links is not None and not (
        isinstance(mlflow_links, pd.DataFrame) and "mlflow_run_id" in mlflow_links.columns
    ):
        raise StudyError(
            "mlflow_links: the table thunderline_lab.tracking.mlflow_links() gives, not "
            f"{type(mlflow_links).__name__}"
        )
    out = Path(out_dir)
    # everything is drawn before the folder is touched: a figure that cannot be drawn
    # leaves no half-written report
    pngs = {f"{name}.png": _png(fig) for name, fig in res.figures().items()}
    md = [
        f"# SN vs none: {_md_text(res.study)}",
        "",
        f"Design: **{res.design}** · trials: **{', '.join(res.statuses)}** · "
        f"values: **{res.mode}** ({_MODE_TEXT[res.mode]}) · "
        f"{_ci_text(res._ci_tables(), res.confidence, res.seed)} · test: {res.test_name}",
        "",
        _MODES_NOTE,
        "",
        "## Headline (SN − none)",
        "",
        res.to_markdown(),
        "",
        _holm_note(res.headline),
        "",
        f"`favours` names the arm whose {_percent(res.confidence)} CI excludes zero in its "
        "favour "
        f"when the {'Wilcoxon' if res.design == 'paired' else 'Welch'} test agrees after "
        f"Holm's adjustment (p_holm < {1 - res.confidence:.2g}); — otherwise; n/a when there "
        "is no CI or no test (a single pair or value per arm, two constant arms, an arm "
        "without values: the notes say which, metric by metric).",
        "",
        _direction_note(res.headline),
    ]
    if not res.by_coeff.empty:
        shown = _headline_display(res.by_coeff, res.confidence)
        md += ["", "## By SN coefficient", "", _markdown_table(shown)]
        md += ["", _holm_note(res.by_coeff)]
    if not res.by_mode.empty:
        shown = _headline_display(res.by_mode, res.confidence)
        md += ["", "## By conv SN mode", "", _MODE_SPLIT_NOTE, "", _markdown_table(shown)]
        md += ["", _holm_note(res.by_mode)]
    md += ["", "## Trials", "", _markdown_table(_counts_table(res.counts))]
    if res.notes:
        md += ["", "## Notes", ""] + [f"- {n}" for n in res.notes]
    if mlflow_links is not None and len(mlflow_links):
        # trials with a run, and those still waiting in the outbox (no run yet): a trial
        # left out would read as one MLflow never had
        linked = mlflow_links["mlflow_run_id"].notna()
        runs = mlflow_links[linked | (mlflow_links.get("sync_state") == "pending")]
        md += ["", "## MLflow runs", ""]
        md += [
            "| trial | run | artifacts | sync |",
            "|---|---|---|---|",
            *(
                f"| {r.trial_id} | [{r.mlflow_run_id}]({r.run_url}) | `{r.artifacts_uri}` "
                f"| {r.sync_state} |"
                if isinstance(r.mlflow_run_id, str)
                else f"| {r.trial_id} | (none yet) | | pending: `thunderline-lab mlflow-sync` |"
                for r in runs.itertuples()
            ),
        ]
    if pngs:
        md += ["", "## Figures", ""]
        md += [f"![{name.removesuffix('.png')}]({name})" for name in pngs]
    files = {**pngs, "report.md": ("\n".join(md) + "\n").encode("utf-8")}
    return _write_files(out, files, stale=[f"{name}.png" for name in _FIGURE_NAMES])


_FIGURE_NAMES = (
    "paired_differences",
    "distributions",
    "learning_curves",
    "accuracy_vs_lipschitz",
    "layer_sigma",
)


def _write_files(out: Path, files: Mapping[str, bytes], stale: Iterable[str]) -> Path:
    """Write ``files`` (name -> bytes, ``report.md`` last, each atomically) into the folder
    ``out`` and delete the ``stale`` ones not among them (a figure an earlier report drew
    that this one has no data for: it would describe another comparison); returns the
    report's path.

    Raises:
        ConfigError: the folder cannot be made or written (a file in the way, no
            permission), naming the path at fault; nothing is written when a target is
            a folder.
    """

    def unwritable(path: Any, exc: OSError) -> ConfigError:
        return ConfigError(f"report folder {out}: cannot write {path}: {exc.strerror or exc}")

    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"report folder {out}: {blocker} exists and is not a folder")
    for name in files:
        if (out / name).is_dir():
            raise ConfigError(f"report folder {out}: {out / name} is a folder, not a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise unwritable(exc.filename or out, exc) from None
    for name, data in files.items():
        path = out / name
        tmp = out / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise unwritable(path, exc) from None
    for name in stale:
        if name not in files:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                (out / name).unlink()
    return out / "report.md"

"""Research metrics: accuracy, calibration, robustness and OOD detection.

Pure functions on tensors. Functions that take a ``model`` run it in eval mode
(restoring its previous mode afterwards), without gradients except where the
metric needs input gradients (FGSM), and never touch parameter ``.grad``.

Conventions:

* ``logits`` are raw model outputs of shape ``(n, n_classes)``;
* ``probs`` are rows of class probabilities (e.g. ``logits.softmax(-1)``);
* ``labels`` are ``int64`` class indices of shape ``(n,)``.

Scalar metrics return Python ``float``; per-sample ones return tensors.

Example:
    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    >>> labels = torch.tensor([0, 1, 1])
    >>> round(accuracy(logits, labels), 4)
    0.6667
    >>> round(brier(logits.softmax(-1), labels), 4) > 0
    True
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from thunderline_lab.errors import ConfigError, TrainingError

if TYPE_CHECKING:
    from thunderline_lab.data import Dataset, Split

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "accuracy",
    "auroc",
    "brier",
    "calibration_bins",
    "ece",
    "evaluate",
    "fgsm_accuracy",
    "fgsm_perturb",
    "metric_key",
    "nll",
    "noise_accuracy",
    "ood_auroc",
    "predict",
    "predictive_entropy",
]

DEFAULT_BATCH_SIZE = 4096
"""Samples per forward pass in the model-based metrics."""

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-./]+$")
_MAX_BINS = 100_000  # more bins than this only allocates; ECE needs far fewer


# --------------------------------------------------------------------------- checks


def _check_int(what: str, value: object, minimum: int | None = None) -> int:
    """An integer argument (``n_bins``, ``batch_size``, ``seed``): refused, never coerced.

    ``int(2.5)`` would silently use 2 bins, ``int(nan)`` raises a bare ValueError, and
    ``True`` is a typo for a number.
    """
    rule = f" >= {minimum}" if minimum is not None else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{what} must be an integer{rule}, got {value!r}")
    number = int(value)
    if minimum is not None and number < minimum:
        raise ConfigError(f"{what} must be an integer{rule}, got {value!r}")
    return number


def _real(value: object) -> float:
    """``value`` as a float if it is a real number (or a one-element real tensor), else NaN."""
    if isinstance(value, bool):
        return math.nan
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value) if value.dtype != torch.bool else math.nan
    return math.nan


def _check_real(what: str, value: object) -> float:
    """A finite real ``>= 0`` (noise level, attack size)."""
    number = _real(value)
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"{what} must be a finite number >= 0, got {value!r}")
    return number


def _check_tensor(value: object, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TrainingError(
            f"{what} must be a torch.Tensor, got {type(value).__name__} "
            "(convert with torch.as_tensor)"
        )
    return value


def _check_inputs(x: object, what: str = "x") -> torch.Tensor:
    x = _check_tensor(x, what)
    if x.ndim < 1:
        raise TrainingError(f"{what} must have a batch dimension (n, ...), got a 0-d tensor")
    return x


def _check_labels(labels: torch.Tensor, n: int, n_classes: int | None = None) -> torch.Tensor:
    labels = _check_tensor(labels, "labels")
    if labels.ndim != 1 or labels.shape[0] != n:
        raise TrainingError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TrainingError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if n and n_classes is not None and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise TrainingError(f"labels must lie in [0, {n_classes})")
    return labels.long()


def _check_scores(scores: torch.Tensor, what: str) -> None:
    _check_tensor(scores, what)
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise TrainingError(f"{what} must have shape (n, n_classes), got {tuple(scores.shape)}")
    if scores.shape[0] == 0:
        raise TrainingError(f"{what} is empty")
    if scores.dtype.is_floating_point and bool(torch.isnan(scores.detach()).any()):
        raise TrainingError(f"{what} contain NaN (diverged model?)")


def _check_probs(probs: torch.Tensor) -> torch.Tensor:
    _check_scores(probs, "probs")
    p = probs.detach().double()
    if not bool(torch.isfinite(p).all()) or bool((p < -1e-6).any()):
        raise TrainingError("probs must be finite and non-negative")
    if not torch.allclose(p.sum(dim=1), torch.ones_like(p[:, 0]), atol=1e-3):
        raise TrainingError("probs rows must sum to 1 (pass logits.softmax(-1), not logits)")
    return p.clamp_min(0.0)


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TrainingError(
            f"model must be a torch.nn.Module, got {type(model).__name__} {model!r:.80}"
        )
    return model


def _forward(model: nn.Module, xb: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
    """``model(xb)``; an input the model cannot take is refused naming what it expects."""
    try:
        return model(xb)
    except RuntimeError as exc:
        first = next(
            (m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)),
            None,
        )
        hint = ""  # only where the first layer's width is what differs (not a deeper fault)
        if isinstance(first, nn.Linear) and first.in_features != x_shape[-1]:
            hint = f" (its first layer takes input width {first.in_features}, got {x_shape[-1]})"
        elif (
            isinstance(first, nn.Conv1d | nn.Conv2d)
            and len(x_shape) > 1
            and first.in_channels != x_shape[1]
        ):
            hint = f" (its first layer takes {first.in_channels} channels, got {x_shape[1]})"
        raise TrainingError(
            f"the model cannot take inputs of shape {x_shape}{hint}: {exc}"
        ) from exc


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode, restoring each submodule's mode on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was_training in modes:
            m.train(was_training)


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- tensor metrics


def accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples whose arg-max class equals the label.

    Args:
        outputs: Logits or probabilities, shape ``(n, n_classes)``.
        labels: Class indices, shape ``(n,)``.

    Returns:
        Accuracy in ``[0, 1]``.

    Raises:
        TrainingError: Malformed shapes, NaN outputs, or labels outside ``[0, n_classes)``.

    Example:
        >>> accuracy(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 0]))
        0.5
    """
    _check_scores(outputs, "outputs")
    n, n_classes = outputs.shape
    # the class count too: a label outside [0, n_classes) is a bug, not a wrong answer
    y = _check_labels(_check_tensor(labels, "labels").to(outputs.device), n, n_classes)
    return float((outputs.detach().argmax(dim=1) == y).double().mean())


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels under ``softmax(logits)``.

    Identical to ``torch.nn.functional.cross_entropy(logits, labels)`` (computed
    in float64 for accuracy).

    Args:
        logits: Raw outputs, shape ``(n, n_classes)``.
        labels: Class indices, shape ``(n,)``.

    Returns:
        Mean NLL in nats (``inf`` if a label's logit is ``-inf``).

    Raises:
        TrainingError: Malformed shapes or labels, or logits that are NaN or ``+inf``
            (whose softmax is undefined).

    Example:
        >>> round(nll(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1])), 4)  # log 2
        0.6931
    """
    _check_scores(logits, "logits")
    if bool(torch.isposinf(logits.detach()).any()):
        raise TrainingError("logits contain +inf: their softmax (and the NLL) is undefined")
    n, n_classes = logits.shape
    y = _check_labels(_check_tensor(labels, "labels").to(logits.device), n, n_classes)
    return float(F.cross_entropy(logits.detach().double(), y))


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multi-class Brier score: mean over samples of ``sum_k (p_k - 1[y = k])²``.

    Ranges from 0 (confident and correct) to 2 (confident and wrong).

    Args:
        probs: Class probabilities, shape ``(n, n_classes)``.
        labels: Class indices, shape ``(n,)``.

    Returns:
        The Brier score.

    Example:
        >>> brier(torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([0, 1]))
        0.25
    """
    p = _check_probs(probs)
    y = _check_labels(_check_tensor(labels, "labels").to(p.device), p.shape[0], p.shape[1])
    onehot = F.one_hot(y, num_classes=p.shape[1]).double()
    return float(((p - onehot) ** 2).sum(dim=1).mean())


def _check_n_bins(n_bins: object) -> int:
    value = _check_int("n_bins", n_bins, minimum=1)
    if value > _MAX_BINS:
        raise ConfigError(f"n_bins must be at most {_MAX_BINS}, got {n_bins!r}")
    return value


def calibration_bins(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15
) -> dict[str, torch.Tensor]:
    """Reliability-diagram statistics over equal-width confidence bins.

    Confidence is the maximum class probability; bin ``b`` holds confidences in
    ``(b / n_bins, (b + 1) / n_bins]`` (a confidence of exactly 0 goes to bin 0).

    Args:
        probs: Class probabilities, shape ``(n, n_classes)``.
        labels: Class indices, shape ``(n,)``.
        n_bins: Number of bins: an integer from 1 to 100 000.

    Returns:
        Dict of float64 tensors of length ``n_bins``: ``"lower"``, ``"upper"``
        (bin edges), ``"count"``, ``"accuracy"`` and ``"confidence"`` (mean per
        bin; 0 for empty bins).

    Raises:
        ConfigError: ``n_bins`` is not an integer (``2.5``, ``True``, NaN), ``< 1`` or
            more than 100 000.

    Example:
        >>> bins = calibration_bins(torch.tensor([[0.7, 0.3]]), torch.tensor([0]), n_bins=2)
        >>> bins["count"].tolist(), bins["confidence"].round(decimals=4).tolist()
        ([0.0, 1.0], [0.0, 0.7])
    """
    n_bins = _check_n_bins(n_bins)
    p = _check_probs(probs)
    y = _check_labels(_check_tensor(labels, "labels").to(p.device), p.shape[0], p.shape[1])
    conf, pred = p.max(dim=1)
    correct = (pred == y).double()
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=p.device)
    idx = torch.bucketize(conf, edges[1:-1], right=False)
    count = torch.zeros(n_bins, dtype=torch.float64, device=p.device)
    count.index_add_(0, idx, torch.ones_like(conf))
    sum_conf = torch.zeros_like(count).index_add_(0, idx, conf)
    sum_acc = torch.zeros_like(count).index_add_(0, idx, correct)
    safe = count.clamp_min(1.0)
    return {
        "lower": edges[:-1],
        "upper": edges[1:],
        "count": count,
        "accuracy": sum_acc / safe,
        "confidence": sum_conf / safe,
    }


def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error with equal-width confidence bins.

    ``ECE = sum_b (n_b / n) * |accuracy_b - confidence_b|`` where confidence is
    the maximum class probability (see :func:`calibration_bins`).

    Args:
        probs: Class probabilities, shape ``(n, n_classes)``.
        labels: Class indices, shape ``(n,)``.
        n_bins: Number of bins (15 is the common default): an integer from 1 to 100 000.

    Returns:
        ECE in ``[0, 1]``.

    Raises:
        ConfigError: ``n_bins`` is not an integer (``2.5``, ``True``, NaN), ``< 1`` or
            more than 100 000.

    Example:
        >>> # always 90 % confident, right half of the time: ECE = 0.4
        >>> probs = torch.tensor([[0.9, 0.1]] * 4)
        >>> round(ece(probs, torch.tensor([0, 0, 1, 1])), 6)
        0.4
    """
    bins = calibration_bins(probs, labels, n_bins)
    weight = bins["count"] / bins["count"].sum()
    return float((weight * (bins["accuracy"] - bins["confidence"]).abs()).sum())


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy ``-sum_k p_k log p_k`` of the predictive distribution (nats).

    Uses ``0 log 0 = 0``. Ranges from 0 (one-hot) to ``log(n_classes)`` (uniform).

    Args:
        probs: Class probabilities, shape ``(n, n_classes)``.

    Returns:
        Float64 tensor of shape ``(n,)``.

    Example:
        >>> predictive_entropy(torch.tensor([[1.0, 0.0], [0.5, 0.5]])).round(decimals=4).tolist()
        [0.0, 0.6931]
    """
    p = _check_probs(probs)
    return (-torch.special.xlogy(p, p).sum(dim=1)).clamp_min(0.0) + 0.0  # no -0.0


def auroc(scores_in: torch.Tensor | np.ndarray, scores_out: torch.Tensor | np.ndarray) -> float:
    """AUROC of a score at separating "out" (positive) from "in" (negative) samples.

    A higher score should mean "more likely out". 1.0 is perfect separation,
    0.5 is chance.

    Args:
        scores_in: Scores of in-distribution samples, shape ``(n_in,)``.
        scores_out: Scores of out-of-distribution samples, shape ``(n_out,)``.

    Returns:
        Area under the ROC curve (``sklearn.metrics.roc_auc_score``).

    Raises:
        TrainingError: Either set is empty, is not one score per sample (a 2-D array such as
            class probabilities would be flattened into the wrong samples), or holds a score
            that is not a finite number.

    Example:
        >>> auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.5, 0.9]))
        1.0
    """

    def arr(s: torch.Tensor | np.ndarray, what: str) -> np.ndarray:
        try:
            a = s.detach().cpu().double().numpy() if isinstance(s, torch.Tensor) else s
            a = np.asarray(a, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise TrainingError(f"auroc: {what} must be numbers, got {s!r:.80}") from exc
        if a.ndim > 2 or (a.ndim == 2 and a.shape[1] != 1):
            raise TrainingError(
                f"auroc: {what} must have shape (n,) (one score per sample), got {a.shape}"
            )
        return a.reshape(-1)

    a_in, a_out = arr(scores_in, "scores_in"), arr(scores_out, "scores_out")
    if a_in.size == 0 or a_out.size == 0:
        raise TrainingError("auroc needs at least one in- and one out-of-distribution score")
    scores = np.concatenate([a_in, a_out])
    if not np.isfinite(scores).all():
        raise TrainingError("auroc scores must be finite")
    targets = np.concatenate([np.zeros(a_in.size), np.ones(a_out.size)])
    return float(roc_auc_score(targets, scores))


# --------------------------------------------------------------------------- model metrics


def predict(
    model: nn.Module, x: torch.Tensor, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> torch.Tensor:
    """Logits of ``model`` on ``x`` in eval mode without gradients.

    Args:
        model: A classifier mapping ``(n, *input_shape)`` to ``(n, n_classes)``.
        x: Inputs.
        batch_size: Samples per forward pass.

    Returns:
        Detached float logits on the CPU, shape ``(n, n_classes)``.

    Raises:
        ConfigError: ``batch_size`` is not an integer >= 1.
        TrainingError: ``model`` is not a module, ``x`` is not a batch tensor or not an
            input the model takes (e.g. the wrong width), or the model's output is not 2-D or
            not finite.

    Example:
        >>> model = torch.nn.Linear(2, 3)
        >>> tuple(predict(model, torch.zeros(5, 2)).shape)
        (5, 3)
    """
    model = _check_model(model)
    batch_size = _check_int("batch_size", batch_size, minimum=1)
    x = _check_inputs(x)
    device = _device_of(model)
    outs: list[torch.Tensor] = []
    with _eval_mode(model), torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size].to(device)
            outs.append(_forward(model, xb, tuple(x.shape)).detach().cpu())
    if not outs:
        raise TrainingError("cannot predict on an empty input")
    logits = torch.cat(outs)
    if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        raise TrainingError(
            f"model output must have shape ({x.shape[0]}, n_classes), got {tuple(logits.shape)}"
        )
    if not bool(torch.isfinite(logits).all()):
        raise TrainingError("model produced non-finite logits (diverged training?)")
    return logits


def noise_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sigma: float,
    seed: int = 0,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> float:
    """Accuracy on inputs corrupted by seeded isotropic Gaussian noise.

    ``x + sigma * N(0, I)`` with the noise drawn from a CPU generator seeded
    with ``seed``, so the result is deterministic. ``sigma = 0`` is clean
    accuracy.

    Args:
        model: Classifier.
        x: Clean inputs.
        y: Labels.
        sigma: Noise standard deviation (input units).
        seed: Noise seed.
        batch_size: Samples per forward pass.

    Returns:
        Accuracy in ``[0, 1]``.

    Raises:
        ConfigError: ``sigma`` is not a finite number >= 0, or ``seed`` / ``batch_size`` is
            not an integer (``int(2.5)`` would silently reuse seed 2's noise).

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> x, y = torch.randn(8, 2), torch.zeros(8, dtype=torch.long)
        >>> noise_accuracy(model, x, y, 0.1, seed=1) == noise_accuracy(model, x, y, 0.1, seed=1)
        True
    """
    sigma = _check_real("noise sigma", sigma)
    seed = _check_int("seed", seed)
    batch_size = _check_int("batch_size", batch_size, minimum=1)
    x = _check_inputs(x)
    y = _check_tensor(y, "y")
    if not x.dtype.is_floating_point:  # the noise, cast to an integer dtype, would vanish
        raise TrainingError(f"noise_accuracy needs floating-point inputs, got dtype {x.dtype}")
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.dtype)
    x_noisy = x.detach().cpu() + sigma * noise
    return accuracy(predict(model, x_noisy, batch_size=batch_size), y.cpu())


def _check_clamp(clamp: object, what: str = "clamp") -> tuple[float, float] | None:
    """``None`` or a ``(low, high)`` pair of non-NaN numbers with ``low <= high``."""
    if clamp is None:
        return None
    pair = tuple(clamp) if isinstance(clamp, Sequence) and not isinstance(clamp, str) else ()
    ok = len(pair) == 2 and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(float(v))
        for v in pair
    )
    if not ok or float(pair[0]) > float(pair[1]):
        raise ConfigError(f"{what} must be a (low, high) pair with low <= high, got {clamp!r}")
    return float(pair[0]), float(pair[1])


def fgsm_perturb(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    clamp: tuple[float, float] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> torch.Tensor:
    """Fast-gradient-sign adversarial inputs ``x + eps * sign(∇ₓ CE(model(x), y))``.

    The model runs in eval mode; gradients are taken with respect to the input
    only (parameter ``.grad`` is left untouched).

    Args:
        model: Classifier.
        x: Clean inputs.
        y: Labels.
        eps: L∞ attack size in input units (0 returns ``x`` unchanged).
        clamp: Optional ``(low, high)`` valid input range to clip into, e.g.
            ``(0.0, 1.0)`` for digits pixels.
        batch_size: Samples per forward/backward pass.

    Returns:
        Adversarial inputs on the CPU, same shape as ``x``.

    Raises:
        ConfigError: ``eps`` is not a finite number >= 0, ``batch_size`` is not an integer
            >= 1, or ``clamp`` is not a ``(low, high)`` pair with ``low <= high``.
        TrainingError: Malformed inputs or labels, a label outside the model's classes, or
            a model output that is not ``(n, n_classes)``.

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> x, y = torch.zeros(3, 2), torch.tensor([0, 1, 0])
        >>> bool((fgsm_perturb(model, x, y, 0.1) - x).abs().max() <= 0.1 + 1e-7)
        True
    """
    model = _check_model(model)
    eps = _check_real("FGSM eps", eps)
    batch_size = _check_int("batch_size", batch_size, minimum=1)
    clamp = _check_clamp(clamp)
    x = _check_inputs(x).detach().cpu()
    y = _check_labels(_check_tensor(y, "y").cpu(), x.shape[0])
    if eps == 0 or x.shape[0] == 0:
        return x.clone()
    if not x.dtype.is_floating_point:
        raise TrainingError(f"FGSM needs floating-point inputs, got dtype {x.dtype}")
    device = _device_of(model)
    pieces: list[torch.Tensor] = []
    with _eval_mode(model), torch.enable_grad():
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size].to(device).requires_grad_(True)
            yb = y[start : start + batch_size].to(device)
            logits = _forward(model, xb, tuple(x.shape))
            if (
                not isinstance(logits, torch.Tensor)
                or logits.ndim != 2
                or logits.shape[0] != xb.shape[0]
            ):
                got = (
                    tuple(logits.shape)
                    if isinstance(logits, torch.Tensor)
                    else type(logits).__name__
                )
                raise TrainingError(
                    f"model output must have shape ({xb.shape[0]}, n_classes), got {got}"
                )
            _check_labels(yb, yb.shape[0], logits.shape[1])
            loss = F.cross_entropy(logits, yb, reduction="sum")
            (grad,) = torch.autograd.grad(loss, xb)
            pieces.append((xb.detach() + eps * grad.sign()).cpu())
    x_adv = torch.cat(pieces)
    if clamp is not None:
        x_adv = x_adv.clamp(clamp[0], clamp[1])
    return x_adv


def fgsm_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    clamp: tuple[float, float] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> float:
    """Accuracy under a one-step FGSM attack of L∞ size ``eps`` (see :func:`fgsm_perturb`).

    Args:
        model: Classifier.
        x: Clean inputs.
        y: Labels.
        eps: Attack size in input units; ``eps = 0`` gives clean accuracy.
        clamp: Optional valid input range to clip adversarial inputs into.
        batch_size: Samples per pass.

    Returns:
        Adversarial accuracy in ``[0, 1]``.

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> x, y = torch.randn(16, 2), torch.randint(0, 2, (16,))
        >>> fgsm_accuracy(model, x, y, 0.0) == accuracy(predict(model, x), y)
        True
    """
    x_adv = fgsm_perturb(model, x, y, eps, clamp=clamp, batch_size=batch_size)
    return accuracy(predict(model, x_adv, batch_size=batch_size), y.cpu())


def ood_auroc(
    model: nn.Module,
    x_in: torch.Tensor,
    x_ood: torch.Tensor,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> float:
    """AUROC of predictive entropy at flagging OOD inputs (OOD = positive class).

    A distance-aware model is uncertain (high entropy) far from the data, giving
    an AUROC near 1; an overconfident one scores near (or below) 0.5.

    Args:
        model: Classifier.
        x_in: In-distribution inputs (e.g. the test split).
        x_ood: Out-of-distribution inputs.
        batch_size: Samples per forward pass.

    Returns:
        AUROC in ``[0, 1]``.

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> 0.0 <= ood_auroc(model, torch.randn(10, 2), 10 * torch.randn(10, 2)) <= 1.0
        True
    """
    h_in = predictive_entropy(predict(model, x_in, batch_size=batch_size).double().softmax(-1))
    h_out = predictive_entropy(predict(model, x_ood, batch_size=batch_size).double().softmax(-1))
    return auroc(h_in, h_out)


# --------------------------------------------------------------------------- evaluate


def metric_key(prefix: str, value: float) -> str:
    """A metric name with a numeric suffix: ``"<prefix>_<value:g>"``.

    The value is formatted with ``{:g}``; the result contains only characters
    MLflow accepts in metric names (letters, digits, ``_ - . /``).

    Raises:
        ConfigError: ``value`` is not a finite number, or the result would not be a valid
            metric name.

    Example:
        >>> metric_key("fgsm_acc", 0.05), metric_key("noise_acc", 1e-5)
        ('fgsm_acc_0.05', 'noise_acc_1e-05')
    """
    number = _real(value)
    if not math.isfinite(number):
        raise ConfigError(f"the value of metric {prefix!r} must be a finite number, got {value!r}")
    key = f"{prefix}_{number:g}"
    if not _KEY_RE.match(key):
        raise ConfigError(f"{key!r} is not a valid metric name")
    return key


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    noise_sigmas: Sequence[float] = (0.1, 0.3),
    fgsm_eps: Sequence[float] = (0.01, 0.05, 0.1),
    seed: int = 0,
    *,
    n_bins: int = 15,
    fgsm_clamp: tuple[float, float] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> dict[str, float]:
    """All research metrics of ``model`` on ``dataset`` as a flat dict of finite floats.

    Keys (all valid MLflow metric names):

    * ``train_accuracy``, ``val_accuracy``, ``test_accuracy``;
    * ``generalization_gap`` = train − test accuracy;
    * ``train_nll``, ``val_nll``, ``test_nll``;
    * ``val_ece``, ``test_ece``, ``val_brier``, ``test_brier``;
    * ``test_entropy_mean`` (mean predictive entropy on the test split);
    * ``noise_acc_<sigma>`` per noise level and ``fgsm_acc_<eps>`` per attack
      size, both on the test split (e.g. ``noise_acc_0.1``, ``fgsm_acc_0.05``);
    * ``ood_auroc`` and ``ood_entropy_mean`` when ``dataset.ood`` is present and
      non-empty (AUROC of entropy, test split vs. OOD points).

    Select hyper-parameters on the ``val_*`` metrics; ``test_*`` are for reporting.

    Args:
        model: Classifier whose input matches ``dataset.input_shape``.
        dataset: A :class:`~thunderline_lab.data.Dataset`.
        noise_sigmas: Gaussian noise levels for ``noise_acc_*``.
        fgsm_eps: FGSM attack sizes for ``fgsm_acc_*``.
        seed: Seed of the input noise (level ``i`` uses ``seed + i``).
        n_bins: Bins of the ECE.
        fgsm_clamp: Optional valid input range for adversarial inputs.
        batch_size: Samples per forward pass.

    Returns:
        ``{metric_name: value}``; every value is a finite ``float``.

    Raises:
        ConfigError: A malformed argument (``dataset`` not a Dataset, ``noise_sigmas`` /
            ``fgsm_eps`` not a sequence of finite numbers >= 0, a non-integer ``seed``,
            ``n_bins`` or ``batch_size``, a bad ``fgsm_clamp``), checked before any metric is
            computed; or two noise levels or attack sizes that format to the same key.
        TrainingError: ``model`` is not a module, or its output is malformed or not finite.

    Example:
        >>> from thunderline_lab.data import load_dataset
        >>> ds = load_dataset("moons", seed=0)
        >>> m = evaluate(torch.nn.Linear(2, 2), ds, noise_sigmas=(0.1,), fgsm_eps=(0.05,))
        >>> sorted(k for k in m if "acc_" in k)
        ['fgsm_acc_0.05', 'noise_acc_0.1']
    """
    # Check every argument first: a typo should not surface after minutes of evaluation.
    from thunderline_lab.data import Dataset

    _check_model(model)
    if not isinstance(dataset, Dataset):
        raise ConfigError(
            f"dataset must be a Dataset, got {type(dataset).__name__} {dataset!r:.80}; "
            "build one with thunderline_lab.data.load_dataset(name, seed=...)"
        )
    levels: dict[str, list[float]] = {}
    for what, values in (("noise_sigmas", noise_sigmas), ("fgsm_eps", fgsm_eps)):
        try:
            if isinstance(values, str | bytes):
                raise TypeError(what)
            items = list(values)  # tuples, lists, numpy arrays, tensors
        except TypeError:
            raise ConfigError(f"{what} must be a sequence of numbers, got {values!r}") from None
        levels[what] = [_check_real(f"{what}[{i}]", v) for i, v in enumerate(items)]
    seed = _check_int("seed", seed)
    n_bins = _check_n_bins(n_bins)
    batch_size = _check_int("batch_size", batch_size, minimum=1)
    fgsm_clamp = _check_clamp(fgsm_clamp, "fgsm_clamp")

    out: dict[str, float] = {}
    test_probs: torch.Tensor | None = None
    splits: tuple[Split, ...] = ("train", "val", "test")
    for split in splits:
        x, y = dataset.split(split)
        logits = predict(model, x, batch_size=batch_size).double()
        y = y.cpu()
        out[f"{split}_accuracy"] = accuracy(logits, y)
        out[f"{split}_nll"] = nll(logits, y)
        if split != "train":
            probs = logits.softmax(dim=1)
            out[f"{split}_ece"] = ece(probs, y, n_bins=n_bins)
            out[f"{split}_brier"] = brier(probs, y)
            if split == "test":
                test_probs = probs
    out["generalization_gap"] = out["train_accuracy"] - out["test_accuracy"]
    assert test_probs is not None
    h_test = predictive_entropy(test_probs)
    out["test_entropy_mean"] = float(h_test.mean())

    x_test, y_test = dataset.x_test, dataset.y_test
    for i, sigma in enumerate(levels["noise_sigmas"]):
        key = metric_key("noise_acc", sigma)
        if key in out:
            raise ConfigError(f"noise_sigmas give the metric {key!r} twice: {list(noise_sigmas)}")
        out[key] = noise_accuracy(model, x_test, y_test, sigma, seed + i, batch_size=batch_size)
    for eps in levels["fgsm_eps"]:
        key = metric_key("fgsm_acc", eps)
        if key in out:
            raise ConfigError(f"fgsm_eps give the metric {key!r} twice: {list(fgsm_eps)}")
        out[key] = fgsm_accuracy(
            model, x_test, y_test, eps, clamp=fgsm_clamp, batch_size=batch_size
        )

    if dataset.ood is not None and dataset.ood.shape[0] > 0:
        h_ood = predictive_entropy(
            predict(model, dataset.ood, batch_size=batch_size).double().softmax(-1)
        )
        out["ood_auroc"] = auroc(h_test, h_ood)
        out["ood_entropy_mean"] = float(h_ood.mean())

    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise TrainingError(f"non-finite metrics: {', '.join(bad)}")
    return out

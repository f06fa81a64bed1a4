"""One readable training loop for a trial, and the research metrics stored with it.

:func:`train_trial` is the whole story of one trial, nanoGPT style: seed everything, build the
model from a :class:`~thunderline_lab.models.ModelConfig`, train with AdamW and a cosine
learning-rate schedule, evaluate on the validation split every epoch, stop early when the
validation loss stops improving, restore the best epoch and measure the research metrics.
Along the way it publishes ``ml.run.start``, one ``ml.run.metric`` per epoch (``train_loss``,
``val_loss``, ``val_accuracy``, ``lr``, ``max_sigma``) and ``ml.run.stop`` on the bus.

Best and final: the *best* epoch is the one with the lowest validation loss; its weights are
restored before the research metrics are measured, so ``val_accuracy``, ``test_*``, the
robustness and calibration metrics all describe the best epoch's model. The summary also
keeps the training curve's two ends of interest: ``best_<m>`` (``best_val_loss``,
``best_val_accuracy``, ``best_train_loss``: the values *at the best epoch*, so
``best_val_accuracy`` is the validation accuracy at the lowest validation loss, not the highest
accuracy seen) and ``final_<m>`` for :data:`FINAL_MEASUREMENTS` (the values at the last epoch
trained, before the best weights were restored).

The loop knows nothing about Optuna: pruning is a ``report(epoch, val_loss)`` callback whose
truthy return value ends the trial as ``"pruned"``; a ``should_stop`` flag ends it as
``"cancelled"``. A non-finite loss ends it as ``"failed"`` with ``error_type="diverged"``
instead of raising.

Determinism: torch, numpy and :mod:`random` are seeded from ``seed`` at the start; batches come
from the dataset's seeded loader; input noise and the Lipschitz samples use private
generators. On the CPU with the same thread count, the same seed gives the same numbers (every
metric except the wall-clock ones, ``step_time_ms`` and ``duration_ms``).

Example:
    >>> from thunderline_lab.data import load_dataset
    >>> from thunderline_lab.models import ModelConfig
    >>> ds = load_dataset("moons", seed=0)
    >>> cfg = ModelConfig(architecture="mlp", depth=2, width=32, spectral_norm=True)
    >>> result = train_trial(cfg, ds, epochs=3, lr=1e-2, seed=0)
    >>> result.status, sorted(result.history[0])[:3]
    ('completed', ['epoch', 'lr', 'max_sigma'])
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from thunderline_lab.bus import AsyncEmitter
from thunderline_lab.errors import ConfigError, ThunderlineLabError, TrainingError
from thunderline_lab.events import EventValidationError

if TYPE_CHECKING:
    from thunderline_lab.bus import EventBus
    from thunderline_lab.data import Dataset
    from thunderline_lab.models import ModelConfig

__all__ = [
    "EPOCH_MEASUREMENTS",
    "FINAL_MEASUREMENTS",
    "EvalSettings",
    "ReportFn",
    "StopFlag",
    "TrialResult",
    "TrialStatus",
    "check_settings",
    "max_sigma",
    "research_metrics",
    "seed_everything",
    "train_trial",
]

log = logging.getLogger(__name__)

TrialStatus = Literal["completed", "pruned", "failed", "cancelled"]
ReportFn = Callable[[int, float], "bool | None"]
"""``report(epoch, val_loss) -> should_prune``; a truthy return ends the trial as pruned."""
StopFlag = Callable[[], bool] | threading.Event
"""Checked between epochs: a callable returning True, or a set :class:`threading.Event`."""

EPOCH_MEASUREMENTS: tuple[str, ...] = ("train_loss", "val_loss", "val_accuracy", "lr", "max_sigma")
"""The measurements of every per-epoch ``ml.run.metric`` event."""

FINAL_MEASUREMENTS: tuple[str, ...] = ("train_loss", "val_loss", "val_accuracy", "max_sigma")
"""Per-epoch measurements summarised as ``final_<m>``: the last epoch trained (the learning
rate, a schedule, is left out)."""


@dataclass(frozen=True)
class EvalSettings:
    """What the final evaluation of a trial measures (defaults keep it to ~0.1 s on digits).

    Attributes:
        noise_sigmas: Gaussian input-noise levels for ``noise_acc_<σ>``.
        fgsm_eps: FGSM attack sizes for ``fgsm_acc_<ε>``.
        n_bins: Bins of the expected calibration error.
        lipschitz: Whether to compute the Lipschitz bounds.
        lipschitz_samples: Validation inputs used for the empirical (Jacobian) lower bound.
        layer_sigmas: Whether to add the per-layer σ summary (``sigma/<layer>``, ...).
    """

    noise_sigmas: tuple[float, ...] = (0.1, 0.3)
    fgsm_eps: tuple[float, ...] = (0.01, 0.05, 0.1)
    n_bins: int = 15
    lipschitz: bool = True
    lipschitz_samples: int = 64
    layer_sigmas: bool = True

    def __post_init__(self) -> None:
        # lipschitz_samples=0 silently measured 1 input; a flag given as text was taken as set
        for name in ("n_bins", "lipschitz_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"EvalSettings.{name}: a whole number >= 1, not {value!r}")
        for name in ("lipschitz", "layer_sigmas"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"EvalSettings.{name}: True or False, not {getattr(self, name)!r}"
                )


@dataclass
class TrialResult:
    """What one call of :func:`train_trial` produced.

    Attributes:
        status: ``"completed"``, ``"pruned"`` (the report callback asked), ``"failed"``
            (``error_type`` says why, e.g. ``"diverged"``) or ``"cancelled"`` (should_stop).
        metrics: The trial's summary (the contract names: ``val_accuracy``,
            ``test_accuracy``, ``lipschitz_upper``, ..., measured on the restored best-epoch
            model), plus ``best_val_loss``, ``best_val_accuracy``, ``best_train_loss`` (the
            values at the epoch with the lowest validation loss: ``best_val_accuracy`` is
            *not* the highest validation accuracy seen), ``best_epoch``, ``epochs`` (how many
            were trained) and ``final_<m>`` for :data:`FINAL_MEASUREMENTS` (the values at the
            last epoch trained); for pruned, failed or cancelled trials only what the epochs
            measured (``best_*``, ``final_*``, ``epochs``, ...).
        history: One dict per epoch: ``epoch`` and :data:`EPOCH_MEASUREMENTS`.
        model: The trained model (best epoch restored), or ``None`` if not kept.
        error: Error message of a failed trial.
        error_type: ``"diverged"`` or the exception's class name for a failed trial.
        duration_ms: Wall-clock duration of the whole call.
        best_epoch: Epoch with the lowest validation loss (-1 if none finished).
        parameters: The parameters reported with the run (config + training settings).
    """

    status: TrialStatus
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    model: nn.Module | None = None
    error: str | None = None
    error_type: str | None = None
    duration_ms: int = 0
    best_epoch: int = -1
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True for a completed trial."""
        return self.status == "completed"


def seed_everything(seed: int) -> None:
    """Seed :mod:`random`, numpy and torch (CPU) from one integer.

    Example:
        >>> seed_everything(3); a = torch.rand(2)
        >>> seed_everything(3); bool(torch.equal(a, torch.rand(2)))
        True

    Raises:
        ConfigError: ``seed`` is not an integer in ``[-2**63, 2**63)`` (torch's range).
    """
    check_settings(seed=seed)
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _stop_requested(flag: StopFlag | None) -> bool:
    if flag is None:
        return False
    if isinstance(flag, threading.Event):
        return flag.is_set()
    return bool(flag())


def _weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d)
    ]


def max_sigma(model: nn.Module) -> float:
    """Largest spectral norm over the model's Linear/Conv layers, cheaply, in eval mode.

    Linear layers: the exact σ of the effective (normalised) weight by SVD. Convolutions: the
    exact operator norm (:func:`thunderline_lab.spectral.operator_norm`) at the layer's input
    shape when the layer's spectral norm knows it, else the σ of the reshaped kernel. Reading
    the weight in eval mode runs no power iteration, so training is not perturbed.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.eye(3, 4) * 2.0)
        >>> round(max_sigma(net), 4)
        2.0

    Raises:
        TrainingError: ``model`` is not a module, or a layer's weights are not finite.
    """
    if not isinstance(model, nn.Module):
        raise TrainingError(
            f"max_sigma: model must be a torch.nn.Module, got {type(model).__name__} {model!r:.80}"
        )
    was_training = model.training
    model.eval()
    best = 0.0
    try:
        with torch.no_grad():
            for name, module in _weighted_layers(model):
                weight = _weight_of(module)
                if not bool(torch.isfinite(weight).all()):  # torch's SVD fails on them
                    raise TrainingError(
                        f"max_sigma: layer {name!r} ({type(module).__name__}): its weights are "
                        "not finite (NaN/inf: a diverged model?)"
                    )
                if weight.ndim == 2:
                    sigma = float(torch.linalg.matrix_norm(weight.double(), ord=2))
                else:
                    sigma = _conv_sigma(module, weight)
                best = max(best, sigma)
    finally:
        model.train(was_training)
    return best


def _weight_of(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight.detach()


def _conv_sigma(module: nn.Module, weight: torch.Tensor) -> float:
    from thunderline_lab.spectral import get_spectral_norm, operator_norm

    sn = get_spectral_norm(module)
    # operator-mode SN knows its input shape; matrix-mode SN does not (its bound is on the
    # reshaped kernel), so the shape recorded by a forward pass gives the true norm
    shape = (sn.input_shape if sn is not None else None) or getattr(module, "_tl_input_shape", None)
    if shape is not None:
        try:
            return float(operator_norm(module, shape))
        except ThunderlineLabError:
            pass
    return float(torch.linalg.matrix_norm(weight.double().flatten(1), ord=2))


def _remember_conv_input_shapes(model: nn.Module, example: torch.Tensor) -> None:
    """Record each conv's per-sample input shape (for exact operator norms without SN)."""
    handles = []
    for _name, module in _weighted_layers(model):
        if _weight_of(module).ndim > 2:

            def hook(m: nn.Module, args: tuple[Any, ...]) -> None:
                m._tl_input_shape = tuple(args[0].shape[1:])  # type: ignore[assignment]

            handles.append(module.register_forward_pre_hook(hook))
    if not handles:
        return
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def _lr_at(epoch: int, epochs: int, lr: float, min_ratio: float = 0.1) -> float:
    """Cosine decay from ``lr`` to ``min_ratio * lr`` over ``epochs`` (constant if 1 epoch)."""
    if epochs <= 1:
        return lr
    progress = epoch / (epochs - 1)
    return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _dataset_for(config: ModelConfig, dataset: Dataset) -> Dataset:
    """The dataset in the shape the architecture wants (images for CNNs, flat for MLPs)."""
    arch = getattr(config, "architecture", "mlp")
    if arch == "cnn":
        if len(dataset.input_shape) == 1:
            if dataset.image_shape is None:
                raise ConfigError(
                    f"architecture 'cnn' needs an image dataset; {dataset.name!r} has flat "
                    f"samples of shape {dataset.input_shape}"
                )
            return dataset.as_images()
        return dataset
    if len(dataset.input_shape) > 1:
        return dataset.flat()
    return dataset


def _fgsm_clamp(dataset: Dataset) -> tuple[float, float] | None:
    """Adversarial inputs stay in the pixel range for image datasets; tables are unbounded."""
    if dataset.image_shape is None:
        return None
    return float(dataset.x_train.min()), float(dataset.x_train.max())


def research_metrics(
    model: nn.Module,
    dataset: Dataset,
    *,
    seed: int = 0,
    settings: EvalSettings | None = None,
) -> dict[str, float]:
    """All research metrics of a trained model (eval mode) as finite floats.

    :func:`thunderline_lab.metrics.evaluate` (train/val/test accuracy, generalisation gap,
    NLL, ECE with 15 bins, Brier, ``noise_acc_*``, ``fgsm_acc_*``, ``ood_auroc`` when the
    dataset has OOD points), plus ``lipschitz_upper`` / ``lipschitz_lower`` (product bound
    and Jacobian lower bound on ``lipschitz_samples`` validation inputs), ``max_sigma``,
    ``mean_sigma``, ``min_sigma``, ``n_sn_clamped`` and ``sigma/<layer>`` per weighted layer,
    and ``n_params``.

    Example:
        >>> from thunderline_lab.data import load_dataset
        >>> ds = load_dataset("moons", seed=0)
        >>> net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> m = research_metrics(net, ds)
        >>> m["lipschitz_lower"] <= m["lipschitz_upper"]
        True
    """
    from thunderline_lab.metrics import evaluate

    s = settings or EvalSettings()
    out = evaluate(
        model,
        dataset,
        noise_sigmas=s.noise_sigmas,
        fgsm_eps=s.fgsm_eps,
        seed=seed,
        n_bins=s.n_bins,
        fgsm_clamp=_fgsm_clamp(dataset),
    )
    out["n_params"] = float(sum(p.numel() for p in model.parameters()))
    if s.layer_sigmas:
        out.update(_sigma_summary(model, dataset.input_shape))
    else:
        out["max_sigma"] = max_sigma(model)
    if s.lipschitz:
        out.update(_lipschitz(model, dataset, s.lipschitz_samples, seed))
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    for k in bad:
        log.warning("dropping non-finite metric %s", k)
        del out[k]
    return out


def _sigma_summary(model: nn.Module, input_shape: Sequence[int]) -> dict[str, float]:
    from thunderline_lab.spectral import layer_sigmas

    try:
        table = layer_sigmas(model, input_shape=input_shape)
    except ThunderlineLabError as exc:
        log.warning("layer_sigmas failed (%s); falling back to max_sigma", exc)
        return {"max_sigma": max_sigma(model)}
    # batch norm is no weight matrix; a layer listed as "not measured" has no σ (NaN)
    weighted = table[(table["kind"] != "batchnorm") & (table["method"] != "not measured")]
    if weighted.empty:
        return {}
    sigmas = weighted["sigma_exact"].astype(float)
    out = {
        "max_sigma": float(sigmas.max()),
        "mean_sigma": float(sigmas.mean()),
        "min_sigma": float(sigmas.min()),
        "n_sn_clamped": float(weighted["clamp_active"].astype(bool).sum()),
    }
    for layer, sigma in zip(weighted["layer"], sigmas, strict=True):
        out[f"sigma/{layer or 'model'}"] = float(sigma)
    return out


def _lipschitz(model: nn.Module, dataset: Dataset, n: int, seed: int) -> dict[str, float]:
    from thunderline_lab.spectral import lipschitz_bound

    try:
        bound = lipschitz_bound(
            model,
            input_shape=dataset.input_shape,
            inputs=dataset.x_val[: max(1, n)],
            method="jacobian",
            seed=seed,
        )
    except ThunderlineLabError as exc:
        log.warning("lipschitz_bound not available for this model: %s", exc)
        return {}
    return {"lipschitz_upper": float(bound.upper), "lipschitz_lower": float(bound.lower)}


class _Emitter:
    """Publishes the run events of one trial (a no-op without a bus).

    Events are queued on the training thread and published by an :class:`AsyncEmitter`
    thread; :meth:`close` (at the end of the run, also when it fails) publishes the rest, so
    the run's events are all out before the trial's own events follow.
    """

    def __init__(
        self,
        bus: EventBus | None,
        model_run_id: str,
        trial_id: str,
        study: str | None,
        spectral_norm: bool,
    ) -> None:
        ids: dict[str, Any] = {"model_run_id": model_run_id, "trial_id": trial_id}
        if study is not None:
            ids["study"] = study
        self.spectral_norm = spectral_norm
        self._async = (
            None
            if bus is None
            else AsyncEmitter(bus, correlation_id=f"{model_run_id}/{trial_id}", **ids)
        )

    def publish(self, name: str, **payload: Any) -> None:
        if self._async is not None:
            self._async.emit(name, **payload)

    def close(self, *, raise_errors: bool = True) -> None:
        if self._async is None:
            return
        try:
            self._async.close()
        except EventValidationError:
            if raise_errors:
                raise
            log.exception("run events of a failed run could not be published")


def _check_callbacks(
    parameters: object, report: object, should_stop: object, evaluation: object
) -> None:
    """Refuse, before any training, what would otherwise fail late or deep inside."""
    if parameters is not None and not isinstance(parameters, Mapping):
        raise ConfigError(
            f"parameters must be None or a mapping of names to values, got "
            f"{type(parameters).__name__} {parameters!r:.80}"
        )
    if report is not None and not callable(report):
        raise ConfigError(
            f"report must be None or a callable report(epoch, val_loss), got {report!r:.80}"
        )
    if should_stop is not None and not (
        isinstance(should_stop, threading.Event) or callable(should_stop)
    ):
        raise ConfigError(
            f"should_stop must be None, a threading.Event or a callable returning a bool, "
            f"got {should_stop!r:.80}"
        )
    if evaluation is not None and not isinstance(evaluation, EvalSettings):
        raise ConfigError(
            f"evaluation must be None or an EvalSettings, got {type(evaluation).__name__} "
            f"{evaluation!r:.80}; build one with EvalSettings(...)"
        )


def _same(a: Any, b: Any) -> bool:
    return isinstance(a, bool) == isinstance(b, bool) and bool(a == b)


def _extra_parameters(
    parameters: Mapping[str, Any] | None, recorded: Mapping[str, Any]
) -> dict[str, Any]:
    """The extra ``parameters`` to report, refused where they would overwrite a recorded
    setting with another value (the record must say what the model trained with); restating
    a setting with its own value (as studies do) is fine."""
    extra = _jsonable(dict(parameters or {}))
    clashes = sorted(k for k, v in extra.items() if k in recorded and not _same(v, recorded[k]))
    if clashes:
        listed = ", ".join(f"{k}={extra[k]!r} (trained with {recorded[k]!r})" for k in clashes)
        raise ConfigError(
            f"parameters would overwrite the recorded training settings: {listed}; pass the "
            "setting itself (e.g. lr=...) or give the extra parameter another name"
        )
    return extra


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


@torch.no_grad()
def _validate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    loss = float(F.cross_entropy(logits.double(), y))
    acc = float((logits.argmax(dim=1) == y).double().mean())
    return loss, acc


def train_trial(
    config: ModelConfig,
    dataset: Dataset,
    *,
    bus: EventBus | None = None,
    model_run_id: str = "adhoc",
    trial_id: str = "trial_0000",
    epochs: int = 30,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
    patience: int | None = 5,
    parameters: Mapping[str, Any] | None = None,
    report: ReportFn | None = None,
    should_stop: StopFlag | None = None,
    study: str | None = None,
    mlflow_run_id: str | None = None,
    evaluation: EvalSettings | None = None,
    keep_model: bool = True,
    threads: int | None = 1,
) -> TrialResult:
    """Train one model configuration on one dataset and measure it.

    Args:
        config: The model (architecture, depth, width, spectral norm on/off, coefficient...).
        dataset: A :class:`~thunderline_lab.data.Dataset`; reshaped to images for CNNs and
            flattened for MLPs as needed.
        bus: Where to publish ``ml.run.start`` / ``ml.run.metric`` / ``ml.run.stop``
            (nothing is published without one).
        model_run_id: The run (Optuna study name) the events belong to.
        trial_id: The trial (``trial_<number:04d>`` in studies).
        epochs: Maximum number of epochs.
        lr: Peak learning rate of AdamW (cosine-decayed to ``lr/10`` over ``epochs``).
        weight_decay: AdamW's decoupled weight decay.
        batch_size: Mini-batch size.
        seed: Seeds the model's initialisation, dropout, the batch order and the noise of
            the robustness metrics.
        patience: Stop after this many epochs without a lower validation loss (``None``:
            never). The best epoch's weights are restored either way: the research metrics
            (``val_accuracy``, ``test_*``, robustness, calibration) describe the best epoch,
            ``final_<m>`` the last one trained.
        parameters: Extra parameters reported in ``ml.run.start`` (e.g. ``pair_id``); one
            named like a recorded setting (``lr``, ``seed``, a config field, ``dataset``, ...)
            must carry the value trained with.
        report: ``report(epoch, val_loss) -> should_prune`` after every epoch.
        should_stop: Checked between epochs; when set the trial ends as ``"cancelled"``.
        study: The ``study`` field of the events (defaults to none).
        mlflow_run_id: Carried in the run events when known.
        evaluation: What the final evaluation measures (:class:`EvalSettings`).
        keep_model: Keep the trained model in the result (else ``model`` is ``None``).
        threads: ``torch.set_num_threads`` during the call (restored after); ``None`` leaves
            it alone. One thread is the fastest for these small models (two threads on a
            busy 2-core machine measured 25× slower per step) and keeps results identical.

    Returns:
        A :class:`TrialResult`; never raises for a diverging run (a non-finite loss, or an
        optimizer step that overflows float32 as an lr beyond ~1e37 does).

    Raises:
        ConfigError: Bad training settings (epochs < 1, lr <= 0 or a bool, a non-integer seed
            or thread count, ...), a config / dataset / evaluation of the wrong type, a
            non-callable ``report`` / ``should_stop``, or ``parameters`` that are not a
            mapping or would overwrite a recorded setting with another value.
        TrainingError: The model cannot be built for this dataset.

    Example:
        >>> from thunderline_lab.data import load_dataset
        >>> from thunderline_lab.models import ModelConfig
        >>> r = train_trial(ModelConfig(depth=1, width=16), load_dataset("wine", seed=0),
        ...                 epochs=2, lr=1e-2)
        >>> r.metrics["epochs"], "test_accuracy" in r.metrics
        (2.0, True)
    """
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):  # checked before torch.set_num_threads, which raises a bare RuntimeError
        raise ConfigError(f"threads must be None or an integer >= 1, got {threads!r}")
    before = torch.get_num_threads()
    if threads is not None and threads != before:
        torch.set_num_threads(threads)
    try:
        return _train_trial(
            config,
            dataset,
            bus=bus,
            model_run_id=model_run_id,
            trial_id=trial_id,
            epochs=epochs,
            lr=lr,
            weight_decay=weight_decay,
            batch_size=batch_size,
            seed=seed,
            patience=patience,
            parameters=parameters,
            report=report,
            should_stop=should_stop,
            study=study,
            mlflow_run_id=mlflow_run_id,
            evaluation=evaluation,
            keep_model=keep_model,
        )
    finally:
        if threads is not None and threads != before:
            torch.set_num_threads(before)


def _train_trial(
    config: ModelConfig,
    dataset: Dataset,
    *,
    bus: EventBus | None,
    model_run_id: str,
    trial_id: str,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
    patience: int | None,
    parameters: Mapping[str, Any] | None,
    report: ReportFn | None,
    should_stop: StopFlag | None,
    study: str | None,
    mlflow_run_id: str | None,
    evaluation: EvalSettings | None,
    keep_model: bool,
) -> TrialResult:
    from thunderline_lab.data import Dataset
    from thunderline_lab.models import ModelConfig, build_model

    started = time.perf_counter()
    if not isinstance(config, ModelConfig):
        raise ConfigError(
            f"config must be a ModelConfig, got {type(config).__name__} {config!r}; "
            "build one with ModelConfig(...) or ModelConfig.from_dict(...)"
        )
    if not isinstance(dataset, Dataset):
        raise ConfigError(
            f"dataset must be a Dataset, got {type(dataset).__name__} {dataset!r}; "
            "build one with thunderline_lab.data.load_dataset(name, seed=...)"
        )
    check_settings(
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        batch_size=batch_size,
        patience=patience,
        seed=seed,
    )
    _check_callbacks(parameters, report, should_stop, evaluation)
    seed = int(seed)  # numpy integers too: random.seed() accepts only Python ints
    data = _dataset_for(config, dataset)
    sn_on = bool(getattr(config, "spectral_norm", False))
    coeff = getattr(config, "spectral_norm_coeff", None) if sn_on else None
    params: dict[str, Any] = {
        # without SN the coefficient is unused: recorded as None, as the event field says
        **_jsonable({**config.to_dict(), "spectral_norm_coeff": coeff}),
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "batch_size": int(batch_size),
        "epochs": int(epochs),
        "patience": patience,
        "seed": int(seed),
        "dataset": data.name,
    }
    params.update(_extra_parameters(parameters, params))
    run_ids = {"mlflow_run_id": mlflow_run_id} if mlflow_run_id else {}

    seed_everything(seed)
    try:
        model = build_model(config, data.input_shape, data.n_classes)
    except ThunderlineLabError:
        raise
    except Exception as exc:
        raise TrainingError(f"cannot build the model for {data.name!r}: {exc}") from exc
    model = model.to(torch.float32)
    _remember_conv_input_shapes(model, data.x_train)
    n_params = sum(p.numel() for p in model.parameters())

    emit = _Emitter(bus, model_run_id, trial_id, study, sn_on)
    try:
        emit.publish(
            "ml.run.start",
            spectral_norm=sn_on,
            spectral_norm_coeff=float(coeff) if coeff is not None else None,
            parameters=params,
            **run_ids,
        )

        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        # A last batch of one sample would break batch norm in training mode: drop it then.
        loader = data.loader(
            batch_size=batch_size, seed=seed, drop_last=len(data.x_train) % batch_size == 1
        )
        x_val, y_val = data.x_val, data.y_val

        history: list[dict[str, float]] = []
        best_loss, best_epoch = math.inf, -1
        best_row: dict[str, float] = {}  # the epoch with the lowest validation loss
        best_state: dict[str, Any] | None = None
        bad_epochs = 0
        step_seconds, n_steps = 0.0, 0
        status: TrialStatus = "completed"
        error: str | None = None
        error_type: str | None = None

        try:
            for epoch in range(epochs):
                if _stop_requested(should_stop):
                    status = "cancelled"
                    break
                lr_now = _lr_at(epoch, epochs, lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr_now

                # -- train one epoch -------------------------------------------------------------
                model.train()
                total, seen = 0.0, 0
                diverged: str | None = None  # why, when the run diverged
                t0 = time.perf_counter()
                for xb, yb in loader:
                    loss = F.cross_entropy(model(xb), yb)
                    if not torch.isfinite(loss):
                        diverged = f"non-finite training loss at epoch {epoch}"
                        break
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    try:
                        optimizer.step()
                    except RuntimeError as exc:
                        # An lr beyond float32 (AdamW's lr / bias correction, ~1e37) raises
                        # "value cannot be converted to type float without overflow" on the
                        # first step: that run diverged like one with a NaN loss, and must end
                        # the same way (failed, "diverged") rather than as a crash.
                        if "overflow" not in str(exc):
                            raise TrainingError(
                                f"optimizer step failed at epoch {epoch}: {exc}"
                            ) from exc
                        diverged = f"optimizer step overflowed at epoch {epoch}: {exc}"
                        break
                    total += float(loss.detach()) * yb.shape[0]
                    seen += int(yb.shape[0])
                    n_steps += 1
                step_seconds += time.perf_counter() - t0
                if diverged is not None:
                    status, error_type, error = "failed", "diverged", diverged
                    break
                train_loss = total / max(seen, 1)

                # -- validate --------------------------------------------------------------------
                val_loss, val_acc = _validate(model, x_val, y_val)
                if not (math.isfinite(val_loss) and math.isfinite(train_loss)):
                    status, error_type = "failed", "diverged"
                    error = f"non-finite validation loss at epoch {epoch}"
                    break
                sigma = max_sigma(model)
                row = {
                    "epoch": float(epoch),
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "val_accuracy": val_acc,
                    "lr": lr_now,
                    "max_sigma": sigma,
                }
                history.append(row)
                emit.publish(
                    "ml.run.metric",
                    step=epoch,
                    measurements=_finite({k: row[k] for k in EPOCH_MEASUREMENTS}),
                    spectral_norm=sn_on,
                )

                if val_loss < best_loss:
                    best_loss, best_row, best_epoch, bad_epochs = val_loss, row, epoch, 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    bad_epochs += 1

                if report is not None and report(epoch, val_loss):
                    status = "pruned"
                    break
                if patience is not None and bad_epochs >= patience:
                    break

        except BaseException as exc:  # report the broken run, then let the caller see the error
            emit.publish(
                "ml.run.stop",
                success=False,
                epochs=len(history),
                duration_ms=round(1000 * (time.perf_counter() - started)),
                metadata={
                    "status": "failed",
                    "error_type": type(exc).__name__,
                    "error_message": str(exc)[:2000],
                },
                **run_ids,
            )
            emit.close(raise_errors=False)
            raise

        epochs_run = len(history)
        metrics: dict[str, float] = {
            "epochs": float(epochs_run),
            "n_params": float(n_params),
            "step_time_ms": 1000.0 * step_seconds / n_steps if n_steps else 0.0,
        }
        if best_epoch >= 0:  # the values at the lowest validation loss (not each one's best)
            metrics.update(
                best_val_loss=best_row["val_loss"],
                best_val_accuracy=best_row["val_accuracy"],
                best_train_loss=best_row["train_loss"],
                best_epoch=float(best_epoch),
            )
        if history:
            last = history[-1]  # the last epoch trained, before the best one is restored
            metrics.update({f"final_{k}": last[k] for k in FINAL_MEASUREMENTS})
            metrics["max_sigma"] = last["max_sigma"]

        if best_state is not None and status != "failed":
            model.load_state_dict(best_state)
        if status == "completed":
            if epochs_run == 0:  # pragma: no cover - epochs >= 1 is checked
                status, error_type, error = "failed", "no_epochs", "no epoch finished"
            else:
                try:
                    metrics.update(research_metrics(model, data, seed=seed, settings=evaluation))
                except TrainingError as exc:
                    status, error_type, error = "failed", "diverged", str(exc)
        model.eval()

        duration_ms = round(1000 * (time.perf_counter() - started))
        metrics = _finite(metrics)
        stop_meta: dict[str, Any] = {"status": status}
        if error_type:
            stop_meta.update(error_type=error_type, error_message=error)
        emit.publish(
            "ml.run.stop",
            success=status != "failed",
            epochs=epochs_run,
            duration_ms=duration_ms,
            metrics=metrics,
            metadata=stop_meta,
            **run_ids,
        )
        emit.close()
        return TrialResult(
            status=status,
            metrics=metrics,
            history=history,
            model=model if keep_model else None,
            error=error,
            error_type=error_type,
            duration_ms=duration_ms,
            best_epoch=best_epoch,
            parameters=params,
        )
    finally:
        emit.close(raise_errors=False)  # idempotent; stops the thread on any way out


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_settings(
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 64,
    patience: int | None = None,
    seed: int = 0,
) -> None:
    """Refuse training settings :func:`train_trial` cannot run with (the settings not
    given are valid defaults, so one setting can be checked on its own).

    Raises:
        ConfigError: every bad setting, named, in one message.
    """
    problems = []
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        problems.append(f"epochs must be an integer >= 1, got {epochs!r}")
    # bools are not numbers here: lr=True would train at 1.0
    if not (_number(lr) and math.isfinite(lr) and lr > 0):
        problems.append(f"lr must be a finite number > 0, got {lr!r}")
    if not (_number(weight_decay) and math.isfinite(weight_decay) and weight_decay >= 0):
        problems.append(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if patience is not None and (
        isinstance(patience, bool) or not isinstance(patience, int) or patience < 1
    ):
        problems.append(f"patience must be None or an integer >= 1, got {patience!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        problems.append(f"seed must be an integer, got {seed!r}")
    elif not -(2**63) <= int(seed) < 2**63:  # torch.manual_seed's range (with room for seed + i)
        problems.append(f"seed must be an integer in [-2**63, 2**63), got {seed!r}")
    if problems:
        raise ConfigError("; ".join(problems))

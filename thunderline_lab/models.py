"""Small MLP / CNN classifiers built from a JSON-friendly :class:`ModelConfig`.

``ModelConfig`` holds plain fields only (str, int, float, bool, tuple of str), so the training
and Optuna code can build it from trial parameters and store it as JSON (``to_dict`` /
``from_dict``). ``build_model(config, input_shape, n_classes)`` returns a
:class:`Classifier`, an ``nn.Sequential`` with named stages, which is what
:func:`thunderline_lab.spectral.lipschitz_bound` walks. Spectral normalisation is applied
only when ``spectral_norm`` is true, and then only to the layer groups named in ``sn_layers``:

* ``"first"``  — the first Linear / Conv (reads the input),
* ``"hidden"`` — every other Linear / Conv before the head,
* ``"output"`` — the final Linear producing the logits.

Architectures (``depth`` blocks of ``width`` units / channels)::

    mlp  (B, *input_shape) → flatten → [Linear → BN? → act → dropout?] × depth → Linear → (B, K)
    cnn  (B, C, H, W) → [Conv k×k → BN? → act → downsample? → dropout?] × depth
                      → global avg pool → flatten → Linear → (B, K)

In the CNN, odd-numbered blocks (1, 3, …) halve the spatial size while it is ≥ 4, by max
pooling, average pooling or a stride-2 conv (``pooling``). Convs use ``padding=kernel_size//2``.

Example:
    >>> cfg = ModelConfig(architecture="cnn", depth=2, width=16, spectral_norm=True)
    >>> model = build_model(cfg, input_shape=(1, 8, 8), n_classes=10)
    >>> model(torch.zeros(4, 1, 8, 8)).shape
    torch.Size([4, 10])
    >>> ModelConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from thunderline_lab.errors import ConfigError
from thunderline_lab.spectral import spectral_norm as apply_spectral_norm

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "CONV_SN_MODES",
    "MAX_ACTIVATIONS",
    "MAX_DEPTH",
    "MAX_KERNEL_SIZE",
    "MAX_PARAMETERS",
    "MAX_POWER_ITERATIONS",
    "MAX_WIDTH",
    "POOLINGS",
    "SN_LAYER_GROUPS",
    "Classifier",
    "ModelConfig",
    "build_model",
]

# Bounds that keep a typo (depth=10_000, width=10**9) from allocating until the machine
# swaps: far above what this workbench's small MLPs/CNNs need, far below a memory blow-up.
MAX_DEPTH = 100
"""Most hidden blocks a :class:`ModelConfig` accepts."""
MAX_WIDTH = 16_384
"""Most units / channels per block."""
MAX_KERNEL_SIZE = 31
"""Largest CNN kernel size."""
MAX_POWER_ITERATIONS = 1_000
"""Most power-iteration steps per training step."""
MAX_PARAMETERS = 100_000_000
"""Most parameters :func:`build_model` builds (400 MB of float32 weights, before Adam)."""
MAX_ACTIVATIONS = 2**25
"""Most elements in one CNN block's per-sample activation (operator-mode SN allocates it)."""

ARCHITECTURES = ("mlp", "cnn")
CONV_SN_MODES = ("operator", "matrix")
POOLINGS = ("max", "avg", "stride")
SN_LAYER_GROUPS = ("first", "hidden", "output")
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "elu": nn.ELU,
    "silu": nn.SiLU,
}


def _parse_sn_layers(value: Any) -> tuple[str, ...]:
    """``"all"``, ``"none"``, ``"first,hidden"`` or a sequence → canonical ordered tuple."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "all":
            return SN_LAYER_GROUPS
        items: Sequence[Any] = [] if text in ("", "none") else text.split(",")
    elif isinstance(value, Sequence):
        items = value
    else:
        raise ConfigError(f"ModelConfig.sn_layers must be a string or a list, got {value!r}")
    names = {str(item).strip().lower() for item in items}
    unknown = names - set(SN_LAYER_GROUPS)
    if unknown:
        raise ConfigError(
            f"ModelConfig.sn_layers: unknown group(s) {sorted(unknown)}; "
            f"choose from {list(SN_LAYER_GROUPS)}"
        )
    return tuple(g for g in SN_LAYER_GROUPS if g in names)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and spectral-norm settings of a classifier (plain, JSON-friendly fields).

    Attributes:
        architecture: ``"mlp"`` or ``"cnn"``.
        depth: Number of hidden blocks (1 to :data:`MAX_DEPTH`).
        width: Hidden units (MLP) or channels (CNN) per block (1 to :data:`MAX_WIDTH`).
        activation: One of :data:`ACTIVATIONS` (``relu``, ``gelu``, ``tanh``, ``leaky_relu``,
            ``elu``, ``silu``).
        dropout: Dropout probability after each block's activation (0 disables it).
        batchnorm: Batch norm after each hidden Linear / Conv (which then has no bias).
        spectral_norm: Apply spectral normalisation; false means no SN anywhere.
        spectral_norm_coeff: Bound on each normalised layer's spectral norm.
        n_power_iterations: Power-iteration steps per training step (1 to
            :data:`MAX_POWER_ITERATIONS`).
        conv_sn_mode: ``"operator"`` (true conv operator norm) or ``"matrix"`` (torch-style
            reshaped kernel) for convolutions.
        sn_layers: Which layers get SN: a subset of ``("first", "hidden", "output")``.
            ``from_dict`` and the constructor also accept ``"all"``, ``"none"`` or a
            comma-separated string (handy for Optuna categorical parameters).
        kernel_size: CNN kernel size (odd, at most :data:`MAX_KERNEL_SIZE`).
        pooling: CNN downsampling: ``"max"``, ``"avg"`` or ``"stride"`` (stride-2 conv).

    Example:
        >>> ModelConfig(sn_layers="hidden,output").sn_layers
        ('hidden', 'output')
    """

    architecture: str = "mlp"
    depth: int = 2
    width: int = 64
    activation: str = "relu"
    dropout: float = 0.0
    batchnorm: bool = False
    spectral_norm: bool = False
    spectral_norm_coeff: float = 1.0
    n_power_iterations: int = 1
    conv_sn_mode: str = "operator"
    sn_layers: tuple[str, ...] = SN_LAYER_GROUPS
    kernel_size: int = 3
    pooling: str = "max"

    def __post_init__(self) -> None:
        # Normalise JSON-ish inputs (ints for floats, lists/strings for sn_layers), then check.
        set_ = object.__setattr__
        set_(self, "sn_layers", _parse_sn_layers(self.sn_layers))
        for name in ("dropout", "spectral_norm_coeff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ConfigError(f"ModelConfig.{name} must be a number, got {value!r}")
            set_(self, name, float(value))
        for name in ("depth", "width", "n_power_iterations", "kernel_size"):
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():
                value = int(value)  # JSON / Optuna may give 3.0
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ConfigError(f"ModelConfig.{name} must be an integer, got {value!r}")
            set_(self, name, int(value))  # numpy integers too: keep the fields plain
        for name in ("batchnorm", "spectral_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"ModelConfig.{name} must be true or false")
        self._check()

    def _check(self) -> None:
        def choice(name: str, options: Sequence[str]) -> None:
            value = getattr(self, name)
            if value not in options:
                raise ConfigError(
                    f"ModelConfig.{name} must be one of {list(options)}, got {value!r}"
                )

        choice("architecture", ARCHITECTURES)
        choice("activation", tuple(ACTIVATIONS))
        choice("conv_sn_mode", CONV_SN_MODES)
        choice("pooling", POOLINGS)
        for name, high in (
            ("depth", MAX_DEPTH),
            ("width", MAX_WIDTH),
            ("n_power_iterations", MAX_POWER_ITERATIONS),
        ):
            value = getattr(self, name)
            if not 1 <= value <= high:
                raise ConfigError(f"ModelConfig.{name} must be between 1 and {high}, got {value}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.spectral_norm_coeff) and self.spectral_norm_coeff > 0):
            raise ConfigError(
                f"ModelConfig.spectral_norm_coeff must be > 0, got {self.spectral_norm_coeff}"
            )
        if not 1 <= self.kernel_size <= MAX_KERNEL_SIZE or self.kernel_size % 2 == 0:
            raise ConfigError(
                f"ModelConfig.kernel_size must be odd and between 1 and {MAX_KERNEL_SIZE}, "
                f"got {self.kernel_size}"
            )
        if self.spectral_norm and not self.sn_layers:
            raise ConfigError("ModelConfig.sn_layers is empty but spectral_norm is true")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (``sn_layers`` as a list)."""
        data = asdict(self)
        data["sn_layers"] = list(self.sn_layers)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Build from a dict such as ``to_dict()`` output or Optuna trial params.

        Missing keys take their defaults; unknown keys are refused, with the closest known
        key suggested (a typo such as ``depht`` would otherwise silently keep the default).

        Raises:
            ConfigError: Not a mapping, unknown keys or invalid values (the message names the
                key).
        """
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"ModelConfig.from_dict needs a mapping of field names to values, "
                f"got {type(data).__name__} {data!r}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), sorted(known), n=1)
                if close:
                    hints.append(f"{key!r}: did you mean {close[0]!r}?")
            hint = f" ({'; '.join(hints)})" if hints else ""
            raise ConfigError(
                f"ModelConfig: unknown key(s) {unknown}{hint}; known: {sorted(known)}"
            )
        return cls(**dict(data))

    def sn_for(self, role: str) -> bool:
        """Whether layers of ``role`` (``first``/``hidden``/``output``) get spectral norm."""
        return self.spectral_norm and role in self.sn_layers

    def build(self, input_shape: Sequence[int], n_classes: int) -> Classifier:
        """Same as :func:`build_model` (nanoGPT style: the config builds the module)."""
        return build_model(self, input_shape, n_classes)


class Classifier(nn.Sequential):
    """An ``nn.Sequential`` classifier that remembers how it was built.

    Attributes:
        config: The :class:`ModelConfig`.
        input_shape: Per-sample input shape, e.g. ``(64,)`` or ``(1, 8, 8)``.
        n_classes: Number of logits.
        roles: Layer name → ``"first"``, ``"hidden"`` or ``"output"`` for every Linear / Conv.
    """

    def __init__(
        self,
        layers: OrderedDict[str, nn.Module],
        *,
        config: ModelConfig,
        input_shape: tuple[int, ...],
        n_classes: int,
        roles: dict[str, str],
    ) -> None:
        super().__init__(layers)
        self.config = config
        self.input_shape = input_shape
        self.n_classes = n_classes
        self.roles = roles


def _maybe_sn(
    layer: nn.Module, role: str, config: ModelConfig, input_shape: tuple[int, ...] | None
) -> nn.Module:
    if not config.sn_for(role):
        return layer
    return apply_spectral_norm(
        layer,
        coeff=config.spectral_norm_coeff,
        n_power_iterations=config.n_power_iterations,
        mode="operator" if config.conv_sn_mode == "operator" else "matrix",
        input_shape=input_shape,
    )


def _build_mlp(
    config: ModelConfig, input_shape: tuple[int, ...], n_classes: int
) -> tuple[OrderedDict[str, nn.Module], dict[str, str]]:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    roles: dict[str, str] = {}
    layers["flatten"] = nn.Flatten()  # (B, *input_shape) → (B, D)
    d_in = math.prod(input_shape)
    for i in range(config.depth):
        role = "first" if i == 0 else "hidden"
        fc = nn.Linear(d_in, config.width, bias=not config.batchnorm)  # (B, d_in) → (B, width)
        layers[f"fc{i}"] = _maybe_sn(fc, role, config, None)
        roles[f"fc{i}"] = role
        if config.batchnorm:
            layers[f"bn{i}"] = nn.BatchNorm1d(config.width)
        layers[f"act{i}"] = ACTIVATIONS[config.activation]()
        if config.dropout > 0:
            layers[f"drop{i}"] = nn.Dropout(config.dropout)
        d_in = config.width
    layers["out"] = _maybe_sn(nn.Linear(d_in, n_classes), "output", config, None)  # (B, K)
    roles["out"] = "output"
    return layers, roles


def _build_cnn(
    config: ModelConfig, input_shape: tuple[int, ...], n_classes: int
) -> tuple[OrderedDict[str, nn.Module], dict[str, str]]:
    if len(input_shape) != 3:
        raise ConfigError(f"cnn needs input_shape (C, H, W), got {input_shape}")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    roles: dict[str, str] = {}
    c, h, w = input_shape
    k = config.kernel_size
    for i in range(config.depth):
        role = "first" if i == 0 else "hidden"
        down = i % 2 == 1 and min(h, w) >= 4
        stride = 2 if down and config.pooling == "stride" else 1
        conv = nn.Conv2d(
            c, config.width, k, stride=stride, padding=k // 2, bias=not config.batchnorm
        )
        layers[f"conv{i}"] = _maybe_sn(conv, role, config, (c, h, w))
        roles[f"conv{i}"] = role
        c = config.width
        if stride == 2:
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1  # (B, c, h, w) after the strided conv
        if config.batchnorm:
            layers[f"bn{i}"] = nn.BatchNorm2d(c)
        layers[f"act{i}"] = ACTIVATIONS[config.activation]()
        if down and config.pooling != "stride":
            pool = nn.MaxPool2d(2) if config.pooling == "max" else nn.AvgPool2d(2)
            layers[f"pool{i}"] = pool
            h, w = h // 2, w // 2  # (B, c, h/2, w/2)
        if config.dropout > 0:
            layers[f"drop{i}"] = nn.Dropout(config.dropout)
    layers["gap"] = nn.AdaptiveAvgPool2d(1)  # (B, c, h, w) → (B, c, 1, 1)
    layers["flatten"] = nn.Flatten()  # (B, c)
    layers["out"] = _maybe_sn(nn.Linear(c, n_classes), "output", config, None)  # (B, K)
    roles["out"] = "output"
    return layers, roles


def _size(config: ModelConfig, input_shape: tuple[int, ...], n_classes: int) -> tuple[int, int]:
    """(parameter count, largest per-sample block activation) of the model, without building it.

    Counts weights, biases and batch-norm affine parameters, so it is exact for both
    architectures; the activation is the largest ``channels × H × W`` a CNN block produces
    (0 for an MLP, whose activations are bounded by the width).
    """
    width, depth = config.width, config.depth
    extra = 2 * width if config.batchnorm else width  # BN γ, β, or the bias
    if config.architecture == "mlp":
        d_in = math.prod(input_shape)
        hidden = d_in * width + (depth - 1) * width * width + depth * extra
        return hidden + width * n_classes + n_classes, 0
    c, h, w = input_shape
    k2 = config.kernel_size**2
    hidden = c * width * k2 + (depth - 1) * width * width * k2 + depth * extra
    return hidden + width * n_classes + n_classes, width * h * w  # first block: full size


def build_model(
    config: ModelConfig, input_shape: Sequence[int], n_classes: int, *, seed: int | None = None
) -> Classifier:
    """Build the classifier described by ``config``.

    Spectral normalisation never consumes the global RNG, so with the same seed a model with
    ``spectral_norm=True`` starts from exactly the same raw weights as one without.

    Args:
        config: The architecture.
        input_shape: Per-sample input shape: flat ``(D,)`` or an image ``(C, H, W)``
            (flattened by the MLP; required by the CNN).
        n_classes: Number of output logits (≥ 1).
        seed: If given, initialise the weights from ``torch.manual_seed(seed)`` inside a forked
            RNG (the global RNG state is left as it was).

    Returns:
        A :class:`Classifier` mapping ``(B, *input_shape)`` to logits ``(B, n_classes)``.

    Raises:
        ConfigError: Not a :class:`ModelConfig`, an input shape or class count the
            architecture cannot use, a non-integer seed, or a model larger than
            :data:`MAX_PARAMETERS` parameters (or, for a CNN, :data:`MAX_ACTIVATIONS`
            activation elements per sample in a block); it is refused before anything is
            allocated.

    Example:
        >>> model = build_model(ModelConfig(depth=1, width=8), (64,), 10, seed=0)
        >>> list(model.roles.items())
        [('fc0', 'first'), ('out', 'output')]
    """
    if not isinstance(config, ModelConfig):
        raise ConfigError(
            f"build_model needs a ModelConfig (ModelConfig.from_dict builds one from a dict), "
            f"got {type(config).__name__}"
        )
    # Refuse rather than coerce: int("64"[i]) would build a model for shape (6, 4), and
    # int(64.5) one for a shape the data does not have.
    if isinstance(input_shape, str | bytes) or not isinstance(input_shape, Sequence):
        raise ConfigError(
            f"input_shape must be a sequence of positive integers such as (64,) or (1, 8, 8), "
            f"got {input_shape!r}"
        )
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in input_shape):
        raise ConfigError(
            f"input_shape must be a sequence of positive integers, got {tuple(input_shape)!r}"
        )
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ConfigError(f"input_shape must be non-empty and positive, got {tuple(input_shape)}")
    if isinstance(n_classes, bool) or not isinstance(n_classes, numbers.Integral) or n_classes < 1:
        raise ConfigError(f"n_classes must be a positive integer, got {n_classes!r}")
    n_classes = int(n_classes)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ConfigError(f"seed must be an integer or None, got {seed!r}")
    if config.architecture == "cnn" and len(shape) != 3:
        raise ConfigError(f"cnn needs input_shape (C, H, W), got {shape}")
    n_params, activations = _size(config, shape, n_classes)
    what = (
        f"ModelConfig(architecture={config.architecture!r}, depth={config.depth}, "
        f"width={config.width}"
        + (f", kernel_size={config.kernel_size}" if config.architecture == "cnn" else "")
        + f") on input_shape {shape} with n_classes={n_classes}"
    )
    if n_params > MAX_PARAMETERS:
        raise ConfigError(
            f"{what} would have {n_params:,} parameters, more than MAX_PARAMETERS="
            f"{MAX_PARAMETERS:,}: reduce width, depth or the input size"
        )
    if activations > MAX_ACTIVATIONS:
        raise ConfigError(
            f"{what} would produce {activations:,} activation elements per sample in a block, "
            f"more than MAX_ACTIVATIONS={MAX_ACTIVATIONS:,}: reduce width or the image size"
        )
    builder = _build_mlp if config.architecture == "mlp" else _build_cnn
    if seed is None:
        layers, roles = builder(config, shape, n_classes)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            layers, roles = builder(config, shape, n_classes)
    return Classifier(layers, config=config, input_shape=shape, n_classes=n_classes, roles=roles)

"""Spectral normalisation that bounds what it claims to bound, and the diagnostics to check it.

PyTorch's built-in spectral norm is a *hard* normalisation (σ ≈ 1, no coefficient) and, on
convolutions, it normalises the reshaped ``(out, in·k·k)`` kernel rather than the convolution
operator, so a 3×3 conv "with spectral norm" can still have an operator norm of 1.4–2.3
(pytorch issues #99149, #13505). This module provides:

``spectral_norm(module, coeff, n_power_iterations, mode)``
    A :mod:`torch.nn.utils.parametrize` parametrization implementing the *soft* bound
    ``W / max(1, σ̂(W) / coeff)`` (DUE / SNGP). σ̂ is tracked by power iteration in training
    mode; eval mode uses the top singular vector solved to convergence (Lanczos) for the
    current weight (``u``/``v``/``v_eval`` are buffers, so ``deepcopy``, ``state_dict``,
    ``.to()`` and eval mode all work). Two modes for convolutions:

    * ``"operator"``: σ̂ is the norm of the convolution *operator* at the layer's real input
      shape (captured on the first forward, or given up front), iterated with
      ``conv{N}d`` / ``conv_transpose{N}d`` so stride, padding, dilation and groups are exact.
      Unsupported geometry (non-zero padding modes, asymmetric ``"same"`` padding) is refused.
    * ``"matrix"``: σ̂ is the norm of the reshaped kernel, as torch does. Does *not* bound the
      layer's Lipschitz constant; kept for comparison.

    Linear layers and ungrouped 1×1 convolutions always use the (exact) matrix path.

``layer_sigmas(model)``
    Per layer: exact σ of the raw weight, the SN's own estimate, the exact σ of the eval-mode
    effective weight (SVD for matrices; for convs and transposed convs the operator norm at the
    real input shape, by Lanczos to convergence, dense SVD for small maps, or FFT for circular
    convolutions), the reshaped-kernel σ and whether the clamp is active. Recurrent layers get
    one row per weight matrix; any other layer holding a weight matrix gets a "not measured"
    row, so nothing is silently left out. Layers under torch's own spectral norm (the
    parametrization or the legacy hook) are measured at the weight they use in eval mode.

``lipschitz_bound(model)``
    Product upper bound over a sequential model (activations, batch norm and pooling
    accounted for) and an empirical lower bound (largest Jacobian spectral norm over sample
    inputs and/or gradient ascent on difference quotients).

``export(model)``
    A copy with the normalised weights folded in: no parametrizations, no hooks, same outputs.

Conventions: as in torch, ``u`` lives in the layer's *output* space and ``v`` in its *input*
space (for ``operator`` mode ``u`` has shape ``(1, C_out, *out_spatial)`` and ``v`` has shape
``(1, C_in, *in_spatial)``); σ̂ = ‖W v‖.

Example:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> conv = spectral_norm(nn.Conv2d(3, 8, 3, padding=1), coeff=0.9, input_shape=(3, 16, 16))
    >>> y = conv(torch.randn(4, 3, 16, 16))            # (4, 8, 16, 16)
    >>> table = layer_sigmas(nn.Sequential(conv), input_shape=(3, 16, 16))
    >>> bool(table.loc[0, "sigma_exact"] <= 0.9 * 1.01)
    True
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeVar, cast

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm as _TorchLegacySpectralNorm

from thunderline_lab.errors import SpectralNormError

__all__ = [
    "ACTIVATION_LIPSCHITZ",
    "LayerFactor",
    "LipschitzBound",
    "SNMode",
    "SpectralNorm",
    "export",
    "get_spectral_norm",
    "layer_sigmas",
    "lipschitz_bound",
    "operator_norm",
    "spectral_norm",
]

SNMode = Literal["operator", "matrix"]
M = TypeVar("M", bound=nn.Module)

_CONV_TYPES: dict[type[nn.Module], tuple[Callable[..., Tensor], Callable[..., Tensor], int]] = {
    nn.Conv1d: (F.conv1d, F.conv_transpose1d, 1),
    nn.Conv2d: (F.conv2d, F.conv_transpose2d, 2),
    nn.Conv3d: (F.conv3d, F.conv_transpose3d, 3),
}
# Transposed convolutions (diagnostics only; spectral_norm refuses them): the forward function
# and the number of spatial dimensions.
_CONV_TRANSPOSE_TYPES: dict[type[nn.Module], tuple[Callable[..., Tensor], int]] = {
    nn.ConvTranspose1d: (F.conv_transpose1d, 1),
    nn.ConvTranspose2d: (F.conv_transpose2d, 2),
    nn.ConvTranspose3d: (F.conv_transpose3d, 3),
}
# Solving the top singular pair to convergence (set-up; eval vector): restarted Lanczos.
_SOLVE_STEPS = 32  # Krylov dimension per restart
_SOLVE_RESTARTS = 30
# Residual ‖AᵀA v − σ² v‖ / σ² to stop at: the solve runs in the weight's precision (float32
# keeps the fast conv kernels); the Ritz value's relative error is far below it.
_SOLVE_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
_INIT_SEED = 0x5EED  # private generator: SN never consumes the global RNG
_DENSE_MAX = 512  # linear maps with at most this many inputs are materialised for exact SVD
# Relative slack on the product upper bound: covers float64 rounding and the residual of
# Lanczos at convergence (Ritz values converge from below).
_UPPER_SLACK = 1e-6

# Global Lipschitz constants (max |f'|) of elementwise activations, rounded up.
ACTIVATION_LIPSCHITZ: dict[type[nn.Module], float | Callable[[nn.Module], float]] = {
    nn.ReLU: 1.0,
    nn.ReLU6: 1.0,
    nn.Tanh: 1.0,
    nn.Hardtanh: 1.0,
    nn.Softplus: 1.0,
    nn.Sigmoid: 0.25,
    nn.GELU: 1.12900,  # max of Φ(x) + xφ(x) ≈ 1.128904 (tanh approximation: 1.128993)
    nn.SiLU: 1.09984,  # ≈ 1.099839
    nn.Mish: 1.08850,  # ≈ 1.088499
    nn.LeakyReLU: lambda m: max(1.0, abs(cast(nn.LeakyReLU, m).negative_slope)),
    nn.ELU: lambda m: max(1.0, abs(cast(nn.ELU, m).alpha)),
    nn.Identity: 1.0,
    nn.Flatten: 1.0,
    nn.Unflatten: 1.0,
    nn.Dropout: 1.0,  # identity in eval mode
    nn.Dropout1d: 1.0,
    nn.Dropout2d: 1.0,
    nn.Dropout3d: 1.0,
    nn.AlphaDropout: 1.0,
}


def _normalize(x: Tensor, eps: float) -> Tensor:
    return x / torch.linalg.vector_norm(x).clamp_min(eps)


def _base_type(module: nn.Module) -> type[nn.Module]:
    return cast(type[nn.Module], parametrize.type_before_parametrizations(module))


def _conv_spec(
    module: nn.Module,
) -> tuple[Callable[..., Tensor], Callable[..., Tensor], int] | None:
    base = _base_type(module)
    for conv_type, spec in _CONV_TYPES.items():
        if issubclass(base, conv_type):
            return spec
    return None


def _conv_transpose_spec(module: nn.Module) -> tuple[Callable[..., Tensor], int] | None:
    base = _base_type(module)
    for conv_type, spec in _CONV_TRANSPOSE_TYPES.items():
        if issubclass(base, conv_type):
            return spec
    return None


def _check_shape(input_shape: Any, what: str) -> tuple[int, ...] | None:
    """A per-sample input shape as a tuple of ints; anything else is refused, not coerced.

    ``int(8.5)`` would measure the operator at a size the layer never sees, and ``8`` or
    ``"8"`` are typos for ``(8,)``.
    """
    if input_shape is None:
        return None
    if (
        isinstance(input_shape, str | bytes)
        or not isinstance(input_shape, Sequence)
        or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in input_shape)
        or any(s < 1 for s in input_shape)
    ):
        raise SpectralNormError(
            f"{what}: input_shape must be a per-sample shape of positive integers such as "
            f"(8,) or (3, 32, 32), got {input_shape!r}"
        )
    return tuple(int(s) for s in input_shape)


def _check_model(model: object, what: str) -> None:
    if not isinstance(model, nn.Module):
        raise SpectralNormError(
            f"{what}: model must be a torch.nn.Module, got {type(model).__name__} {model!r:.80}"
        )


def _check_finite(weight: Tensor, layer: str) -> None:
    """Refuse NaN/inf weights: their norm is undefined, and the solvers would fail with a raw
    linear-algebra error (or blame something else)."""
    if not isinstance(weight, nn.parameter.UninitializedParameter) and not bool(
        torch.isfinite(weight.detach()).all()
    ):
        raise SpectralNormError(
            f"{layer} weights are not finite (NaN/inf: a diverged model?); "
            "their spectral norm is undefined"
        )


def _fingerprint(weight: Tensor) -> str:
    """Content hash of a weight (raw bytes, dtype and shape): tells eval mode it changed."""
    data = weight.detach().cpu().contiguous()
    digest = hashlib.sha1(data.view(torch.uint8).numpy().data, usedforsecurity=False)
    return f"{digest.hexdigest()}:{data.dtype}:{tuple(data.shape)}"


def _is_exact_1x1(module: nn.Module, weight: Tensor) -> bool:
    """An ungrouped 1×1 conv whose padding adds only zeros: its operator norm is ‖W_mat‖₂."""
    padding: str | tuple[int, ...] = getattr(module, "padding", (0,))
    no_padding = isinstance(padding, str) or all(p == 0 for p in padding)  # 1×1: same ≡ valid
    return (
        all(k == 1 for k in weight.shape[2:])
        and int(getattr(module, "groups", 1)) == 1
        and (getattr(module, "padding_mode", "zeros") == "zeros" or no_padding)
    )


@torch.no_grad()
def _lanczos_top(gram: Callable[[Tensor], Tensor], x0: Tensor, rtol: float) -> tuple[Tensor, float]:
    """Top eigenpair of a symmetric PSD operator (here AᵀA) by restarted Lanczos.

    Each restart builds a Krylov basis of up to ``_SOLVE_STEPS`` vectors with full
    reorthogonalisation, solves the projected problem exactly (Rayleigh–Ritz) and restarts from
    the top Ritz vector until its relative residual is below ``rtol``. Unlike power iteration this
    converges quickly when the top singular values cluster, as they do for convolutions.
    Deterministic (pure torch, CPU).

    Args:
        gram: ``x ↦ G x`` on flat vectors ``(n,)``.
        x0: Start vector ``(n,)``.
        rtol: Stop when ``‖G x − θ x‖ ≤ rtol · θ``.

    Returns:
        The unit Ritz vector ``(n,)`` and its Ritz value (≤ λ_max, equal at convergence).
    """
    n = x0.numel()
    m = min(_SOLVE_STEPS, n)
    eps = torch.finfo(x0.dtype).eps
    breakdown, tiny = 1e3 * eps, torch.finfo(x0.dtype).tiny
    x = x0 / torch.linalg.vector_norm(x0).clamp_min(tiny)
    theta = 0.0
    for _ in range(_SOLVE_RESTARTS):
        basis = x0.new_zeros((m, n))  # Q: orthonormal rows
        images = x0.new_zeros((m, n))  # G Q
        q, k = x, 0
        for j in range(m):
            basis[j], images[j] = q, gram(q)
            k = j + 1
            w = images[j]
            for _pass in range(2):  # twice is enough (Kahan–Parlett)
                w = w - (basis[:k] @ w) @ basis[:k]
            beta = float(torch.linalg.vector_norm(w))
            if beta <= breakdown * float(torch.linalg.vector_norm(images[j])) + tiny:
                break  # invariant subspace to working precision: the projection is exact
            q = w / beta
            q = q - (basis[:k] @ q) @ basis[:k]  # re-orthogonalise the normalised vector too
            q = q / torch.linalg.vector_norm(q)
        projected = basis[:k] @ images[:k].T  # (k, k) = Q G Qᵀ
        evals, evecs = torch.linalg.eigh(0.5 * (projected + projected.T))
        theta, y = float(evals[-1]), evecs[:, -1]
        x = y @ basis[:k]
        gx = y @ images[:k]  # G x by linearity, no extra product
        norm = torch.linalg.vector_norm(x)
        x, gx = x / norm, gx / norm
        residual = float(torch.linalg.vector_norm(gx - theta * x))
        if residual <= rtol * max(theta, tiny):
            break
    return x, max(theta, 0.0)


class SpectralNorm(nn.Module):
    """Soft spectral-norm parametrization ``W ↦ W / max(1, σ̂(W) / coeff)``.

    Registered on ``module.weight`` by :func:`spectral_norm`; do not build it directly.

    * Set-up: the top singular pair is solved to convergence (restarted Lanczos on AᵀA, in
      the weight's precision: float64 weights in float64, others in float32).
    * Training mode: each evaluation runs ``n_power_iterations`` power-iteration steps on the
      detached weight (updating the ``_u``/``_v`` buffers in place), then σ̂ = ‖W v‖ with the
      gradient flowing into ``W`` (the same gradient as torch's ``uᵀ W v``).
    * Eval mode: σ̂ = ‖W v_eval‖ with a separate buffer ``_v_eval`` holding the converged top
      right singular vector *of the current weight*. It is re-solved (:meth:`refresh`)
      whenever the weight's content differs from the one it was solved for (a hash of the
      weight, kept in ``state_dict`` as extra state; in-place and ``.data`` edits are caught
      too), so eval-mode outputs meet the bound to solver precision even when one-step power
      iteration lags (fast-moving weights, a switch of the top singular direction, or
      training exploiting the lag). Eval never touches ``_u``/``_v``: evaluating, or how
      often, does not change the training trajectory; copies and reloaded models give
      identical outputs.

    Attributes:
        coeff: The bound on the layer's spectral norm (``coeff=1`` is a 1-Lipschitz layer).
        n_power_iterations: Power-iteration steps per training-mode evaluation.
        mode: The path actually used: ``"operator"`` or ``"matrix"`` (Linear layers and
            ungrouped 1×1 convs use ``"matrix"`` even if ``"operator"`` was requested,
            because it is exact for them).
        requested_mode: The mode passed to :func:`spectral_norm`.
        kind: ``"linear"``, ``"conv1d"``, ``"conv2d"`` or ``"conv3d"``.
        eps: Floor for norms (guards the normalisations against a zero weight).
    """

    _u: Tensor
    _v: Tensor
    _v_eval: Tensor
    _conv: Callable[..., Tensor] | None
    _conv_t: Callable[..., Tensor] | None
    _stride: tuple[int, ...]
    _padding: tuple[int, ...]
    _dilation: tuple[int, ...]
    _kernel: tuple[int, ...]
    _groups: int

    def __init__(
        self,
        module: nn.Module,
        *,
        coeff: float = 1.0,
        n_power_iterations: int = 1,
        mode: SNMode = "operator",
        input_shape: Sequence[int] | None = None,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        if not (
            isinstance(coeff, int | float)
            and not isinstance(coeff, bool)
            and math.isfinite(coeff)
            and coeff > 0
        ):
            raise SpectralNormError(
                f"spectral_norm: coeff must be a finite number > 0, got {coeff!r}"
            )
        if not (
            isinstance(eps, int | float)
            and not isinstance(eps, bool)
            and math.isfinite(eps)
            and eps > 0
        ):
            raise SpectralNormError(f"spectral_norm: eps must be a finite number > 0, got {eps!r}")
        if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int):
            raise SpectralNormError(
                f"spectral_norm: n_power_iterations must be an int, got {n_power_iterations!r}"
            )
        from thunderline_lab.models import MAX_POWER_ITERATIONS  # models imports this module

        if not 1 <= n_power_iterations <= MAX_POWER_ITERATIONS:
            raise SpectralNormError(
                f"spectral_norm: n_power_iterations must be in [1, {MAX_POWER_ITERATIONS}] "
                f"(as ModelConfig), got {n_power_iterations}"
            )
        if mode not in ("operator", "matrix"):
            raise SpectralNormError(
                f"spectral_norm: mode must be 'operator' or 'matrix', got {mode!r}"
            )
        input_shape = _check_shape(input_shape, "spectral_norm")
        base = _base_type(module)
        spec = _conv_spec(module)
        if issubclass(base, nn.Linear):
            self.kind = "linear"
        elif spec is not None:
            self.kind = f"conv{spec[2]}d"
        else:
            raise SpectralNormError(
                f"spectral_norm supports nn.Linear and nn.Conv1d/2d/3d, got {base.__name__}"
                " (transposed and lazy convolutions are not supported)"
            )
        weight = cast(Tensor, module.weight).detach()
        if weight.numel() == 0:
            raise SpectralNormError(
                f"spectral_norm: the {base.__name__}'s weight is empty (shape "
                f"{tuple(weight.shape)}): a layer without inputs or outputs has no spectral norm"
            )
        _check_finite(weight, f"spectral_norm: the {base.__name__}'s")
        self.coeff = float(coeff)
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        self.requested_mode: SNMode = mode
        self._registering = False
        self._eval_fingerprint: str | None = None  # hash of the weight _v_eval was solved for
        self._in_shape: tuple[int, ...] | None = None
        self._out_shape: tuple[int, ...] | None = None

        self.mode: SNMode = "operator" if (mode == "operator" and spec is not None) else "matrix"
        if spec is not None and _is_exact_1x1(module, weight):
            self.mode = "matrix"

        if self.mode == "matrix":
            self._conv = self._conv_t = None
            self._nd = 0
            w_mat = weight.flatten(1)  # (out, in·k…)
            g = torch.Generator().manual_seed(_INIT_SEED)
            v = torch.randn(w_mat.shape[1], generator=g, dtype=w_mat.dtype).to(w_mat.device)
            self.register_buffer("_u", w_mat.new_empty(w_mat.shape[0]))  # (out,)
            self.register_buffer("_v", _normalize(v, eps))  # (in·k…,)
            self.register_buffer("_v_eval", self._v.clone())
            self.refresh(weight, training_vectors=True)
            return

        # ---- operator mode: geometry, checked now so bad combinations fail at wrap time
        assert spec is not None
        self._conv, self._conv_t, self._nd = spec
        conv = cast(nn.Conv2d, module)  # any _ConvNd: same attributes
        if conv.padding_mode != "zeros":
            raise SpectralNormError(
                f"operator-mode spectral_norm supports padding_mode='zeros' only, got "
                f"{conv.padding_mode!r}: the adjoint of {conv.padding_mode} padding is not "
                "implemented. Use padding_mode='zeros' or mode='matrix' (which does not bound "
                "the operator norm)."
            )
        self._stride = tuple(conv.stride)
        self._dilation = tuple(conv.dilation)
        self._groups = int(conv.groups)
        kernel = tuple(conv.kernel_size)
        if isinstance(conv.padding, str):
            if conv.padding == "valid":
                self._padding = (0,) * self._nd
            else:  # "same" (stride 1 is enforced by torch)
                totals = [d * (k - 1) for d, k in zip(self._dilation, kernel, strict=True)]
                if any(t % 2 for t in totals):
                    raise SpectralNormError(
                        "operator-mode spectral_norm cannot handle padding='same' with an even "
                        f"effective kernel (kernel_size={kernel}, dilation={self._dilation}): "
                        "torch pads asymmetrically there. Use an odd kernel or explicit padding."
                    )
                self._padding = tuple(t // 2 for t in totals)
        else:
            self._padding = tuple(conv.padding)
        self._kernel = kernel
        self._output_padding: tuple[int, ...] = (0,) * self._nd
        self.register_buffer("_u", weight.new_empty(0))
        self.register_buffer("_v", weight.new_empty(0))
        self.register_buffer("_v_eval", weight.new_empty(0))
        if input_shape is not None:
            self.set_input_shape(input_shape, weight)

    # ------------------------------------------------------------------ properties
    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """The per-sample input shape ``(C, *spatial)`` of an operator-mode layer, else None."""
        return self._in_shape

    @property
    def ready(self) -> bool:
        """Whether σ̂ can be computed (always true in matrix mode)."""
        return self.mode == "matrix" or self._in_shape is not None

    # ------------------------------------------------------------------ operator helpers
    def _apply_op(self, x: Tensor, weight: Tensor) -> Tensor:
        """A x: the convolution without bias. (1, C_in, *in) -> (1, C_out, *out)."""
        assert self._conv is not None
        return self._conv(
            x, weight, None, self._stride, self._padding, self._dilation, self._groups
        )

    def _apply_adjoint(self, y: Tensor, weight: Tensor) -> Tensor:
        """Aᵀ y: the transposed convolution. (1, C_out, *out) -> (1, C_in, *in)."""
        assert self._conv_t is not None
        return self._conv_t(
            y,
            weight,
            None,
            self._stride,
            self._padding,
            self._output_padding,
            self._groups,
            self._dilation,
        )

    def set_input_shape(self, input_shape: Sequence[int], weight: Tensor) -> None:
        """Fix the per-sample input shape of an operator-mode layer and initialise u/v.

        Called by the forward pre-hook on the first forward (or by :func:`spectral_norm` when
        ``input_shape`` is given). Checks the geometry (output padding of the adjoint, and a
        numerical adjoint test) and refuses anything it cannot handle exactly.

        Args:
            input_shape: ``(C_in, *spatial)`` of one sample.
            weight: The unconstrained weight.

        Raises:
            SpectralNormError: Matrix mode, a wrong number of dimensions, an input too small
                for the kernel, or a geometry whose adjoint does not check out.
        """
        if self.mode != "operator":
            raise SpectralNormError("set_input_shape only applies to operator-mode layers")
        shape = tuple(int(s) for s in input_shape)
        c_in = weight.shape[1] * self._groups
        if len(shape) != self._nd + 1 or shape[0] != c_in:
            raise SpectralNormError(
                f"{self.kind} operator-mode spectral_norm expects per-sample input shape "
                f"({c_in}, {', '.join('*' * self._nd)}), got {shape}"
            )
        out_spatial, out_pad = [], []
        for n, k, s, p, d in zip(
            shape[1:], self._kernel, self._stride, self._padding, self._dilation, strict=True
        ):
            span = d * (k - 1) + 1
            out = (n + 2 * p - span) // s + 1
            if out < 1:
                raise SpectralNormError(
                    f"input size {n} is too small for kernel {k} (dilation {d}, padding {p})"
                )
            op = n - ((out - 1) * s - 2 * p + span)
            if not 0 <= op < max(s, d):
                raise SpectralNormError(
                    f"cannot build the adjoint for input size {n}, kernel {k}, stride {s}, "
                    f"padding {p}, dilation {d} (output padding {op} out of range)"
                )
            out_spatial.append(out)
            out_pad.append(op)
        self._output_padding = tuple(out_pad)
        out_shape = (weight.shape[0], *out_spatial)
        with torch.no_grad():
            w = weight.detach()
            g = torch.Generator().manual_seed(_INIT_SEED)
            a = torch.randn((1, *shape), generator=g, dtype=w.dtype).to(w.device)
            b = torch.randn((1, *out_shape), generator=g, dtype=w.dtype).to(w.device)
            ab = self._apply_op(a, w)
            if tuple(ab.shape[1:]) != out_shape:
                raise SpectralNormError(f"unexpected conv output shape {tuple(ab.shape)}")
            lhs = torch.vdot(ab.flatten(), b.flatten()).item()
            rhs = torch.vdot(a.flatten(), self._apply_adjoint(b, w).flatten()).item()
            if not math.isclose(lhs, rhs, rel_tol=1e-3, abs_tol=1e-3 * (abs(lhs) + 1e-6)):
                raise SpectralNormError(
                    f"adjoint check failed for {self.kind} with stride {self._stride}, padding "
                    f"{self._padding}, dilation {self._dilation}, groups {self._groups}: "
                    f"<Aa,b>={lhs:.6g} vs <a,Aᵀb>={rhs:.6g}; refusing to normalise"
                )
            self._u = w.new_empty((1, *out_shape))
            self._v = _normalize(a, self.eps)
            self._v_eval = self._v.clone()
            self._in_shape, self._out_shape = shape, out_shape
            self.refresh(w, training_vectors=True)

    def _check_input(self, x: Tensor, weight: Tensor) -> None:
        """Forward pre-hook body: capture the input shape once, then insist on it."""
        shape = tuple(x.shape[-(self._nd + 1) :])
        if shape == self._in_shape:
            return
        if self._in_shape is None:
            self.set_input_shape(shape, weight)
            return
        raise SpectralNormError(
            f"operator-mode spectral_norm on a {self.kind} was set up for inputs of shape "
            f"{self._in_shape}, got {shape}: its operator norm depends on the input size. "
            "Build a separate model for the new size, or use mode='matrix'."
        )

    # ------------------------------------------------------------------ solving u/v
    @torch.no_grad()
    def refresh(self, weight: Tensor, *, training_vectors: bool = False) -> float:
        """Solve the top singular pair of ``weight`` to convergence into ``_v_eval``.

        Restarted Lanczos on AᵀA, warm-started from ``_v_eval``; records the weight's hash so
        eval mode knows the vector is current.

        Args:
            weight: The unconstrained weight (``module.parametrizations.weight.original``).
            training_vectors: Also set the training-mode ``_u``/``_v`` (done at set-up only:
                afterwards training keeps its own power-iteration state).

        Returns:
            The converged σ of ``weight`` (as this layer measures it).
        """
        if self.mode == "operator" and self._in_shape is None:
            raise SpectralNormError(self._not_ready_message())
        _check_finite(weight, f"the spectral-normalised {self.kind} layer's")
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        w = weight.detach().to(dtype)
        if self.mode == "matrix":
            w = w.flatten(1)  # (out, in·k…)

            def gram(x: Tensor) -> Tensor:
                return (w @ x) @ w  # WᵀW x

        else:
            in_shape = (1, *cast(tuple[int, ...], self._in_shape))

            def gram(x: Tensor) -> Tensor:
                return self._apply_adjoint(self._apply_op(x.view(in_shape), w), w).reshape(-1)

        g = torch.Generator().manual_seed(_INIT_SEED)
        noise = torch.randn(self._v_eval.numel(), generator=g, dtype=dtype)
        start = self._v_eval.detach().to(dtype).reshape(-1).cpu()
        start = start / torch.linalg.vector_norm(start).clamp_min(self.eps)
        start = start + 0.1 * noise / torch.linalg.vector_norm(noise)  # keep every direction
        x, _ = _lanczos_top(gram, start.to(w.device), _SOLVE_RTOL[dtype])
        v = x.view(self._v_eval.shape)
        av = torch.mv(w, v) if self.mode == "matrix" else self._apply_op(v, w)
        sigma = torch.linalg.vector_norm(av)
        self._v_eval.copy_(v)
        if training_vectors:
            self._v.copy_(v)
            self._u.copy_(av / sigma.clamp_min(self.eps))
        self._eval_fingerprint = _fingerprint(weight)
        return float(sigma)

    def _rescale(self, weight: Tensor, sigma: Tensor, sigma_value: float) -> Tensor:
        """``W / max(1, σ/c)``: the weight itself below the bound, else ``W · (c/σ)``.

        Below the bound the soft clamp is the identity (value and gradient), so the weight is
        returned without adding autograd nodes; above it σ's gradient is kept.
        """
        if sigma_value <= self.coeff:
            return weight
        factor = torch.reciprocal(sigma)
        if self.coeff != 1.0:
            factor = factor * self.coeff
        return weight * factor

    def sigma(self, weight: Tensor) -> Tensor:
        """The eval-mode estimate σ̂ = ‖W v_eval‖ (what the eval-mode forward uses).

        Calls :meth:`refresh` first if ``weight`` is not the weight ``_v_eval`` was solved for.

        Args:
            weight: The unconstrained weight (``module.parametrizations.weight.original``).

        Returns:
            A 0-dim tensor; differentiable with respect to ``weight``.
        """
        if self.mode == "operator" and self._in_shape is None:
            raise SpectralNormError(self._not_ready_message())
        if _fingerprint(weight) != self._eval_fingerprint:
            self.refresh(weight)
        if self.mode == "matrix":
            return torch.linalg.vector_norm(torch.mv(weight.flatten(1), self._v_eval))
        return torch.linalg.vector_norm(self._apply_op(self._v_eval, weight))

    def scale(self, weight: Tensor) -> float:
        """The eval-mode factor ``1 / max(1, σ̂ / coeff)`` applied to the weight."""
        return 1.0 / max(1.0, float(self.sigma(weight.detach())) / self.coeff)

    def _not_ready_message(self) -> str:
        return (
            f"operator-mode spectral_norm on a {self.kind} does not know its input shape yet: "
            "run one forward pass first, or pass input_shape= to spectral_norm"
        )

    def forward(self, weight: Tensor) -> Tensor:
        """Return ``weight / max(1, σ̂ / coeff)``; in training mode, iterate first."""
        if self._registering:
            return weight  # parametrize's shape/dtype check at registration: no side effects
        if not self.training:
            sigma = self.sigma(weight)
            return self._rescale(weight, sigma, float(sigma.detach()))

        if self.mode == "matrix":
            wg_mat = weight if weight.ndim == 2 else weight.flatten(1)  # (out, in·k…)
            w_mat_t = wg_mat.detach().t()  # (in·k…, out), no autograd history
            u = self._u
            for _ in range(self.n_power_iterations - 1):
                v = _normalize(torch.mv(w_mat_t, u), self.eps)
                u = _normalize(torch.mv(w_mat_t.t(), v), self.eps)
            v = _normalize(torch.mv(w_mat_t, u), self.eps)  # (in,) = Wᵀu / ‖Wᵀu‖, fresh
            wv = torch.mv(wg_mat, v)  # (out,), grad flows into weight
        else:
            w = weight.detach()
            if self._in_shape is None:
                raise SpectralNormError(self._not_ready_message())
            u = self._u  # (1, C_out, *out)
            for _ in range(self.n_power_iterations - 1):
                v = _normalize(self._apply_adjoint(u, w), self.eps)
                u = _normalize(self._apply_op(v, w), self.eps)
            v = _normalize(self._apply_adjoint(u, w), self.eps)  # (1, C_in, *in)
            wv = self._apply_op(v, weight)  # (1, C_out, *out), grad flows into weight
        sigma = torch.linalg.vector_norm(wv)
        sigma_d = sigma.detach()
        # In-place buffer updates (DataParallel-safe, as torch). The graph holds `v` and `wv`,
        # which are fresh tensors, so later updates never invalidate a pending backward.
        torch.div(wv.detach(), sigma_d.clamp_min(self.eps), out=self._u)
        self._v.copy_(v)
        return self._rescale(weight, sigma, float(sigma_d))

    def get_extra_state(self) -> dict[str, str | None]:
        """``{"eval_fingerprint": ...}``: the hash of the weight ``_v_eval`` was solved for."""
        return {"eval_fingerprint": self._eval_fingerprint}

    def set_extra_state(self, state: Any) -> None:
        """Restore the hash written by :meth:`get_extra_state` (anything else forces a solve)."""
        fingerprint = state.get("eval_fingerprint") if isinstance(state, dict) else None
        self._eval_fingerprint = fingerprint if isinstance(fingerprint, str) else None

    def right_inverse(self, value: Tensor) -> Tensor:
        """Assigning ``module.weight = W`` stores ``W`` as the unconstrained weight."""
        return value

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Operator-mode u/v carry the captured input shape: adopt the loaded shapes.
        if self.mode == "operator":
            for name in ("_u", "_v", "_v_eval"):
                incoming = state_dict.get(prefix + name)
                current = self._buffers[name]
                if (
                    isinstance(incoming, Tensor)
                    and current is not None
                    and incoming.shape != current.shape
                ):
                    self._buffers[name] = current.new_empty(incoming.shape)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if self.mode == "operator":
            if self._v.numel() == 0:
                self._in_shape = self._out_shape = None
            else:
                self._in_shape = tuple(self._v.shape[1:])
                self._out_shape = tuple(self._u.shape[1:])
                self._refresh_output_padding()

    def _refresh_output_padding(self) -> None:
        assert self._in_shape is not None
        pads = []
        for n, k, s, p, d in zip(
            self._in_shape[1:],
            self._kernel,
            self._stride,
            self._padding,
            self._dilation,
            strict=True,
        ):
            span = d * (k - 1) + 1
            out = (n + 2 * p - span) // s + 1
            pads.append(n - ((out - 1) * s - 2 * p + span))
        self._output_padding = tuple(pads)

    def extra_repr(self) -> str:
        shape = f", input_shape={self._in_shape}" if self.mode == "operator" else ""
        return (
            f"coeff={self.coeff}, n_power_iterations={self.n_power_iterations}, "
            f"mode={self.mode!r}{shape}"
        )


class _InputShapeHook:
    """Forward pre-hook of an operator-mode layer: captures/validates the input shape.

    A small object rather than a closure so that ``deepcopy`` rebinds it to the copied
    parametrization.
    """

    def __init__(self, sn: SpectralNorm) -> None:
        self.sn = sn

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        sn = self.sn
        x = args[0]
        if x.shape[-(sn._nd + 1) :] != sn._in_shape:
            original = module.parametrizations.weight.original  # type: ignore[union-attr]
            sn._check_input(x, cast(Tensor, original).detach())


def spectral_norm(
    module: M,
    coeff: float = 1.0,
    n_power_iterations: int = 1,
    mode: SNMode = "operator",
    *,
    input_shape: Sequence[int] | None = None,
    eps: float = 1e-12,
) -> M:
    """Constrain ``module.weight`` to spectral norm ≤ ``coeff`` with the soft bound.

    The weight becomes ``W / max(1, σ̂ / coeff)``: unchanged while σ̂ ≤ coeff, rescaled to
    σ̂ = coeff otherwise. σ̂ is solved to convergence at set-up and tracked by power iteration
    during training (``n_power_iterations`` steps per training-mode forward); eval mode uses a
    vector solved to convergence for the current weight (see :class:`SpectralNorm`), so the
    eval-mode layer meets the bound to solver precision. Registered with
    :func:`torch.nn.utils.parametrize.register_parametrization`, so the raw weight is
    ``module.parametrizations.weight.original`` and optimisers keep working.

    Args:
        module: An ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (not already parametrized on weight).
        coeff: The bound (> 0).
        n_power_iterations: Power-iteration steps per training step (1 to
            :data:`~thunderline_lab.models.MAX_POWER_ITERATIONS`, as ``ModelConfig``).
        mode: For convolutions, ``"operator"`` (true operator norm at the input shape) or
            ``"matrix"`` (reshaped kernel, as torch). Ignored for Linear layers.
        input_shape: Per-sample input shape ``(C, *spatial)`` for operator mode. If omitted it
            is captured on the first forward; the weight cannot be read before that.
        eps: Floor for norms.

    Returns:
        The same module, parametrized.

    Raises:
        SpectralNormError: Unsupported layer or geometry, bad arguments, an empty or
            non-finite (diverged) weight, or already normalised.

    Example:
        >>> layer = spectral_norm(nn.Linear(20, 10), coeff=2.0)
        >>> y = layer(torch.randn(5, 20))
        >>> bool(torch.linalg.matrix_norm(layer.weight.detach(), 2) <= 2.0 * 1.01)
        True
    """
    if not isinstance(module, nn.Module):
        raise SpectralNormError(
            f"spectral_norm: module must be an nn.Linear or nn.Conv1d/2d/3d, got "
            f"{type(module).__name__} {module!r:.80}"
        )
    if parametrize.is_parametrized(module, "weight"):
        raise SpectralNormError(
            f"{_base_type(module).__name__}.weight is already parametrized; spectral_norm must "
            "be its only parametrization (apply it once, and first)"
        )
    if hasattr(module, "weight_orig"):
        # torch's legacy hook-based SN turns `weight` into a plain attribute recomputed from
        # `weight_orig` before every forward: a second normalisation would fight it
        raise SpectralNormError(
            f"{type(module).__name__} already has torch.nn.utils.spectral_norm (weight_orig); "
            "remove it with torch.nn.utils.remove_spectral_norm first"
        )
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise SpectralNormError(
            f"{type(module).__name__}.weight is uninitialised (a lazy module has no shape yet): "
            "run one forward pass first, then apply spectral_norm"
        )
    if not isinstance(weight, nn.Parameter):
        raise SpectralNormError(f"{type(module).__name__} has no weight parameter")
    sn = SpectralNorm(
        module,
        coeff=coeff,
        n_power_iterations=n_power_iterations,
        mode=mode,
        input_shape=input_shape,
        eps=eps,
    )
    sn._registering = True
    try:
        parametrize.register_parametrization(module, "weight", sn)
    finally:
        sn._registering = False
    if sn.mode == "operator":
        module.register_forward_pre_hook(_InputShapeHook(sn))
    return module


def get_spectral_norm(module: nn.Module) -> SpectralNorm | None:
    """The :class:`SpectralNorm` parametrization on ``module.weight``, or None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    plist = cast(nn.ModuleDict, module.parametrizations)["weight"]
    for p in cast(nn.ModuleList, plist):
        if isinstance(p, SpectralNorm):
            return p
    return None


# ============================================================================ exact norms
def _legacy_spectral_norm(
    module: nn.Module, name: str = "weight"
) -> _TorchLegacySpectralNorm | None:
    """The hook of torch's legacy ``torch.nn.utils.spectral_norm`` on ``module.<name>``, or None.

    That hook keeps the parameter as ``<name>_orig`` and turns ``<name>`` into a plain
    attribute that it recomputes before every forward: until the first forward it is the raw
    weight, afterwards whatever the last forward computed (stale after an optimiser step, and
    not converted by ``.to(dtype)``). It must never be read as the layer's weight.
    """
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, _TorchLegacySpectralNorm) and hook.name == name:
            return hook
    return None


def _copy_module(model: M) -> M:
    """``copy.deepcopy`` that also copies a model trained under torch's hook-based norms.

    Torch's legacy ``spectral_norm`` (and ``weight_norm``) store the weight they compute as a
    plain attribute; after a training-mode forward it is a non-leaf tensor, which
    ``deepcopy`` refuses. Those attributes are recomputed before every forward (and the
    diagnostics never read them), so a detached copy stands in for them.
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def _check_materialised(module: nn.Module) -> None:
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters()):
        raise SpectralNormError(
            f"the {_base_type(module).__name__} is uninitialised (a lazy module has no weight "
            "shape yet): run one forward pass first (layer_sigmas and lipschitz_bound run one "
            "on their copy when they know the input_shape)"
        )


def _raw_weight(module: nn.Module, name: str = "weight") -> Tensor:
    """The unconstrained tensor behind ``module.<name>`` (``original`` / ``<name>_orig``)."""
    if parametrize.is_parametrized(module, name):
        plist = cast(nn.ModuleDict, module.parametrizations)[name]
        return cast(Tensor, plist.original).detach()
    if _legacy_spectral_norm(module, name) is not None:
        return cast(Tensor, getattr(module, name + "_orig")).detach()
    return cast(Tensor, getattr(module, name)).detach()


def _foreign_weight(module: nn.Module, name: str = "weight") -> Tensor | None:
    """The weight another normalisation (e.g. torch's spectral_norm) computes, else None.

    Such a normalisation changes the weight the layer uses (torch's hard SN even scales a
    small weight *up* to σ = 1), so norms of the unconstrained ``original`` say nothing about
    the layer. On the eval-mode copies the diagnostics work on, reading ``module.weight`` runs
    a parametrization without training-time side effects (no power iteration). Torch's legacy
    hook-based SN is evaluated as its eval-mode forward does, ``W_orig / (uᵀ W_orig v)`` from
    the layer's current ``u``/``v`` (before the layer's first training-mode forward those are
    torch's random initial vectors, and that is the weight its eval-mode forward really uses).
    """
    if name == "weight" and get_spectral_norm(module) is not None:
        return None
    if parametrize.is_parametrized(module, name):
        return cast(Tensor, getattr(module, name)).detach()
    legacy = _legacy_spectral_norm(module, name)
    if legacy is not None:
        with torch.no_grad():
            return legacy.compute_weight(module, do_power_iteration=False).detach()
    return None


def _linear_map_norm(
    fn: Callable[[Tensor], Tensor],
    in_shape: tuple[int, ...],
    start: Tensor | None = None,
) -> tuple[float, str]:
    """Exact ‖A‖₂ of a linear map ``fn`` on float64 inputs ``(B, *in_shape)``.

    Small maps (≤ ``_DENSE_MAX`` inputs) are materialised and solved by SVD. Larger ones use
    Lanczos (ARPACK ``eigsh``) on AᵀA to convergence, with Aᵀ by autograd, which is exact for
    any padding mode and geometry. Plain power iteration is not used here: convolution spectra
    cluster at the top and it can stall at a relative error of 1e-4 after thousands of steps.

    Returns:
        The norm and the method used (``"svd"`` or ``"lanczos"``).
    """
    n = math.prod(in_shape)
    if n <= _DENSE_MAX:
        eye = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
        with torch.no_grad():
            mat = fn(eye).reshape(n, -1)  # (n_in, n_out): row i is A e_i
        return float(torch.linalg.matrix_norm(mat, ord=2)), "svd"

    def gram(x: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).reshape(1, *in_shape)
        v.requires_grad_(True)
        with torch.enable_grad():
            y = fn(v)
            (aty,) = torch.autograd.grad(y, v, grad_outputs=y.detach())  # AᵀA v
        return aty.detach().reshape(-1).numpy()

    rng = np.random.default_rng(_INIT_SEED)
    v0 = rng.standard_normal(n)
    if start is not None and start.numel() == n:
        v0 = start.detach().to(torch.float64).reshape(-1).numpy() + 1e-3 * v0 / math.sqrt(n)
    op = LinearOperator((n, n), matvec=gram, dtype=np.float64)
    top = eigsh(op, k=1, which="LA", tol=1e-14, v0=v0, ncv=min(n, 32), return_eigenvectors=False)
    return math.sqrt(max(float(top[0]), 0.0)), "lanczos"


def _circular_conv_norm(
    weight: Tensor, in_spatial: tuple[int, ...], dilation: Sequence[int], groups: int
) -> float:
    """Exact ‖A‖₂ of a stride-1, size-preserving circular convolution via FFT (Sedghi et al.)."""
    c_out, c_in_g = weight.shape[:2]
    kernel = weight.shape[2:]
    c_in = c_in_g * groups
    o_g = c_out // groups
    dense = weight.new_zeros((c_out, c_in, *in_spatial))  # circulant symbol on the input grid
    for tap in itertools.product(*(range(k) for k in kernel)):
        pos = tuple((t * d) % n for t, d, n in zip(tap, dilation, in_spatial, strict=True))
        for gi in range(groups):
            rows = slice(gi * o_g, (gi + 1) * o_g)
            cols = slice(gi * c_in_g, (gi + 1) * c_in_g)
            index: tuple[Any, ...] = (rows, cols, *pos)
            source: tuple[Any, ...] = (rows, slice(None), *tap)
            dense[index] += weight[source]
    dims = tuple(range(2, 2 + len(in_spatial)))
    symbol = torch.fft.fftn(dense, dim=dims)  # (C_out, C_in, *freq)
    mats = symbol.permute(*dims, 0, 1)  # (*freq, C_out, C_in)
    return float(torch.linalg.matrix_norm(mats, ord=2).max())


def _transpose_output_padding(
    convt: nn.ConvTranspose2d, in_shape: tuple[int, ...], out_shape: tuple[int, ...] | None
) -> tuple[int, ...]:
    """The output padding a transposed conv used: from its real output shape if known.

    ``forward(x, output_size=...)`` overrides ``module.output_padding``; the operator (and
    its norm) is the one that ran, so the recorded output shape decides.
    """
    if out_shape is None:
        return tuple(int(p) for p in convt.output_padding)
    pads = []
    for n, m, k, s, p, d in zip(
        in_shape[1:],
        out_shape[1:],
        convt.kernel_size,
        convt.stride,
        cast(tuple[int, ...], convt.padding),
        convt.dilation,
        strict=True,
    ):
        op = m - ((n - 1) * s - 2 * p + d * (k - 1) + 1)
        if not 0 <= op < max(s, d):
            raise SpectralNormError(
                f"unexpected {type(convt).__name__} output size {m} for input size {n}"
            )
        pads.append(op)
    return tuple(pads)


def _conv_transpose_norm(
    module: nn.Module,
    weight: Tensor,
    in_shape: tuple[int, ...] | None,
    out_shape: tuple[int, ...] | None,
) -> tuple[float, str]:
    """Exact ‖A‖₂ of a transposed convolution (the adjoint of a conv; bias excluded).

    The norm of the reshaped kernel is not the operator's. An ungrouped, unpadded 1×1 kernel
    maps every input pixel to its own output pixel, so there it *is* the matrix norm; every
    other geometry is measured as the linear map it is, at the layer's input shape (dense SVD
    for small maps, Lanczos on AᵀA otherwise, with Aᵀ — a plain convolution — by autograd).
    """
    spec = _conv_transpose_spec(module)
    assert spec is not None
    fn, nd = spec
    convt = cast(nn.ConvTranspose2d, module)  # any _ConvTransposeNd: same attributes
    padding = cast(tuple[int, ...], convt.padding)
    if all(k == 1 for k in weight.shape[2:]) and convt.groups == 1 and not any(padding):
        return float(torch.linalg.matrix_norm(weight.flatten(1), ord=2)), "svd"
    kind = f"conv_transpose{nd}d"
    if in_shape is None:
        raise SpectralNormError(
            f"the exact norm of a {kind} depends on its input shape; pass input_shape"
        )
    if len(in_shape) != nd + 1:
        raise SpectralNormError(
            f"a {kind} needs a per-sample input_shape (C, {', '.join('*' * nd)}), "
            f"got input_shape {in_shape}"
        )
    output_padding = _transpose_output_padding(convt, in_shape, out_shape)

    def apply(x: Tensor) -> Tensor:
        return fn(
            x,
            weight,
            None,
            convt.stride,
            convt.padding,
            output_padding,
            convt.groups,
            convt.dilation,
        )

    return _linear_map_norm(apply, in_shape)


def _exact_norm(
    module: nn.Module,
    weight: Tensor,
    in_shape: tuple[int, ...] | None,
    start: Tensor | None,
    out_shape: tuple[int, ...] | None = None,
) -> tuple[float, str]:
    """Exact ‖layer‖₂ (bias excluded) for ``weight`` used in ``module``'s geometry.

    ``out_shape`` (per sample) is only used by transposed convs, whose forward can be told
    its output size.
    """
    if _conv_transpose_spec(module) is not None:
        return _conv_transpose_norm(module, weight, in_shape, out_shape)
    spec = _conv_spec(module)
    if spec is None or _is_exact_1x1(module, weight):
        return float(torch.linalg.matrix_norm(weight.flatten(1), ord=2)), "svd"
    if in_shape is None:
        raise SpectralNormError(
            "the exact norm of a convolution depends on its input shape; pass input_shape"
        )
    conv = cast(nn.Conv2d, module)
    nd = spec[2]
    padding = conv.padding
    same_size = padding == "same" or (
        not isinstance(padding, str)
        and all(
            2 * p == d * (k - 1)
            for p, d, k in zip(padding, conv.dilation, conv.kernel_size, strict=True)
        )
    )
    symmetric = padding != "same" or all(
        d * (k - 1) % 2 == 0 for d, k in zip(conv.dilation, conv.kernel_size, strict=True)
    )
    if len(in_shape) != nd + 1:
        raise SpectralNormError(
            f"a conv{nd}d needs a per-sample input_shape (C, {', '.join('*' * nd)}), "
            f"got input_shape {in_shape}"
        )
    circular = conv.padding_mode == "circular" and all(s == 1 for s in conv.stride)
    if circular and same_size and symmetric:
        return _circular_conv_norm(weight, in_shape[1:], conv.dilation, conv.groups), "fft"

    def apply(x: Tensor) -> Tensor:
        return conv._conv_forward(x, weight, None)

    return _linear_map_norm(apply, in_shape, start)


def _linear_module_norm(module: nn.Module, in_shape: tuple[int, ...]) -> float:
    return _linear_map_norm(module, in_shape)[0]


def operator_norm(module: nn.Module, input_shape: Sequence[int] | None = None) -> float:
    """Exact spectral norm of a Linear/Conv/ConvTranspose layer's eval-mode weight (no bias).

    SVD for Linear layers and ungrouped 1×1 convs; for other convs the operator at
    ``input_shape`` (exact adjoint by autograd, any padding mode), by dense SVD when it has at
    most 512 inputs, Lanczos to convergence otherwise, or FFT for size-preserving stride-1
    circular convolutions. A transposed conv is measured as the operator it is (the adjoint
    of a conv, so it has that conv's norm), with the module's ``output_padding``; the norm of
    its reshaped kernel is not its operator norm. Computed in float64 on a copy.

    Args:
        module: The layer (spectral-normalised or not, also by torch's own spectral norm).
        input_shape: Per-sample input shape ``(C, *spatial)``; optional for Linear layers,
            ungrouped unpadded 1×1 (transposed) convs and operator-mode SN layers that have
            captured it.

    Returns:
        The operator norm as a float.

    Raises:
        SpectralNormError: Not a Linear/Conv/ConvTranspose layer, an uninitialised lazy
            layer, non-finite (diverged) weights, or a conv input shape that is missing or
            that the layer cannot take.

    Example:
        >>> conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        >>> with torch.no_grad():
        ...     _ = conv.weight.fill_(1.0)
        >>> round(operator_norm(conv, (1, 32, 32)), 1)  # → 9 as the image grows
        8.9
    """
    if not _is_weighted(module):
        # anything else (Embedding, Bilinear, LSTM, ...) would get the norm of its flattened
        # weight, which is not its operator norm
        raise SpectralNormError(
            "operator_norm supports nn.Linear, nn.Conv1d/2d/3d and nn.ConvTranspose1d/2d/3d, "
            f"got {_base_type(module).__name__}"
        )
    shape = _check_shape(input_shape, "operator_norm")
    _check_materialised(module)
    work = _copy_module(module).to(torch.float64).eval()
    sn = get_spectral_norm(work)
    if shape is None and sn is not None:
        shape = sn.input_shape
    _check_finite(_raw_weight(work), f"operator_norm: the {_base_type(module).__name__}'s")
    foreign = _foreign_weight(work)
    raw = _raw_weight(work) if foreign is None else foreign
    scale = sn.scale(raw) if sn is not None else 1.0
    try:
        value, _ = _exact_norm(
            work, raw, shape, sn._v_eval if sn is not None and sn.mode == "operator" else None
        )
    except RuntimeError as exc:  # torch's own complaint about the shape, e.g. too small
        raise SpectralNormError(
            f"operator_norm: the {_base_type(module).__name__} cannot take input_shape "
            f"{shape}: {exc}"
        ) from exc
    return value * scale


# ============================================================================ diagnostics
def _eval_copy64(model: nn.Module) -> nn.Module:
    """Float64 eval-mode copy whose ``v_eval`` is exactly what the original's eval mode uses.

    Pending solves (:meth:`SpectralNorm.refresh`) run on the copy *before* the cast, in the
    original precision, as the original's own eval forward would; the cast is exact, so the
    solved vectors stay valid and their weight hashes are re-taken afterwards.
    """
    work = _copy_module(model).eval()
    normalised = [(m, sn) for m in work.modules() if (sn := get_spectral_norm(m)) is not None]
    for module, sn in normalised:
        if sn.ready:
            sn.sigma(_raw_weight(module))  # solves _v_eval if the weight changed since
    work.to(torch.float64)
    for module, sn in normalised:
        if sn.ready:
            sn._eval_fingerprint = _fingerprint(_raw_weight(module))
    return work


def _resolve_input_shape(
    model: nn.Module, input_shape: Sequence[int] | None, what: str
) -> tuple[int, ...] | None:
    if input_shape is not None:
        return _check_shape(input_shape, what)
    return _check_shape(getattr(model, "input_shape", None), f"{what} (model.input_shape)")


def _record_input_shapes(
    model: nn.Module,
    input_shape: tuple[int, ...],
    targets: dict[str, nn.Module],
    out_shapes: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Per-sample input shapes of ``targets`` from one forward of a zero input (eval mode).

    If ``out_shapes`` is given, it receives the per-sample output shapes of the transposed
    convs among ``targets`` (their forward may be told an output size).
    """
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, mod in targets.items():

        def hook(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            shapes[name] = tuple(args[0].shape[1:])

        handles.append(mod.register_forward_pre_hook(hook))
        if out_shapes is not None and _conv_transpose_spec(mod) is not None:

            def out_hook(
                _m: nn.Module, _args: tuple[Any, ...], output: Tensor, name: str = name
            ) -> None:
                out_shapes[name] = tuple(output.shape[1:])

            handles.append(mod.register_forward_hook(out_hook))
    try:
        param = next(itertools.chain(model.parameters(), model.buffers()), None)
        dtype = param.dtype if param is not None else torch.float64
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            try:
                model(torch.zeros((1, *input_shape), dtype=dtype, device=device))
            except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                raise SpectralNormError(
                    f"cannot run the model on an input of per-sample input_shape {input_shape} "
                    f"(a float tensor): {exc}"
                ) from exc
    finally:
        for h in handles:
            h.remove()
    return shapes


def _is_weighted(module: nn.Module) -> bool:
    """A layer whose weight is a linear operator this module measures exactly."""
    return (
        issubclass(_base_type(module), nn.Linear)
        or _conv_spec(module) is not None
        or _conv_transpose_spec(module) is not None
    )


def _layer_kind(module: nn.Module) -> str:
    spec, tspec = _conv_spec(module), _conv_transpose_spec(module)
    if spec is not None:
        return f"conv{spec[2]}d"
    if tspec is not None:
        return f"conv_transpose{tspec[1]}d"
    return "linear"


def _kernel_matrix(module: nn.Module, weight: Tensor) -> Tensor:
    """The reshaped kernel torch's SN normalises: output channels × everything else.

    A transposed conv stores its weight as ``(C_in, C_out / groups, *k)``; torch's SN
    reshapes it along ``dim=1``.
    """
    if _conv_transpose_spec(module) is not None:
        return weight.transpose(0, 1).flatten(1)
    return weight.flatten(1)


_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _bn_factor(module: nn.Module) -> float:
    bn = cast(nn.BatchNorm1d, module)
    if bn.running_var is None:
        raise SpectralNormError(
            "batch norm without running statistics is not a fixed function in eval mode; "
            "its Lipschitz constant is undefined"
        )
    gamma = bn.weight.detach().abs() if bn.weight is not None else torch.ones_like(bn.running_var)
    return float((gamma / torch.sqrt(bn.running_var + bn.eps)).max())


_SIGMA_COLUMNS = [
    "layer",
    "kind",
    "sn",
    "mode",
    "coeff",
    "input_shape",
    "sigma_raw",
    "sigma_estimate",
    "sigma_effective",
    "sigma_exact",
    "sigma_matrix",
    "clamp_active",
    "method",
]
_NOT_MEASURED = "not measured"


def _weight_layer_row(
    name: str,
    module: nn.Module,
    in_shape: tuple[int, ...] | None,
    out_shape: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    _check_materialised(module)
    sn = get_spectral_norm(module)
    raw = _raw_weight(module)
    if sn is not None and sn.mode == "operator":
        in_shape = in_shape or sn.input_shape
    start = sn._v_eval if sn is not None and sn.mode == "operator" and sn.ready else None
    sigma_raw, method = _exact_norm(module, raw, in_shape, start, out_shape)
    matrix_raw = float(torch.linalg.matrix_norm(_kernel_matrix(module, raw), ord=2))
    if sn is not None:
        estimate = float(sn.sigma(raw))
        scale = 1.0 / max(1.0, estimate / sn.coeff)
        coeff, mode, clamp = sn.coeff, sn.mode, estimate > sn.coeff
        effective = estimate * scale
    else:
        estimate = effective = coeff = math.nan
        scale, mode, clamp = 1.0, None, False
    sigma_exact, sigma_matrix = sigma_raw * scale, matrix_raw * scale
    foreign = _foreign_weight(module)
    if foreign is not None:  # e.g. torch's spectral_norm: measure the weight the layer uses
        sigma_exact, method = _exact_norm(module, foreign, in_shape, None, out_shape)
        sigma_matrix = float(torch.linalg.matrix_norm(_kernel_matrix(module, foreign), ord=2))
    return {
        "layer": name,
        "kind": _layer_kind(module),
        "sn": sn is not None,
        "mode": mode,
        "coeff": coeff,
        "input_shape": in_shape,
        "sigma_raw": sigma_raw,
        "sigma_estimate": estimate,
        "sigma_effective": effective,
        "sigma_exact": sigma_exact,
        "sigma_matrix": sigma_matrix,
        "clamp_active": clamp,
        "method": method,
    }


def _recurrent_weight_names(module: nn.RNNBase) -> list[str]:
    """``weight_ih_l0``, ``weight_hh_l0`` (, ``weight_hr_l0``), … in torch's order."""
    kinds = ["ih", "hh"] + (["hr"] if module.proj_size > 0 else [])
    suffixes = ["", "_reverse"] if module.bidirectional else [""]
    return [
        f"weight_{k}_l{layer}{suffix}"
        for layer in range(module.num_layers)
        for suffix in suffixes
        for k in kinds
    ]


def _recurrent_rows(name: str, module: nn.Module) -> list[dict[str, Any]]:
    """One row per weight matrix of an RNN/LSTM/GRU: the σ of the (gate-stacked) matrix.

    These are the per-matrix norms SN on a recurrent layer constrains (torch's spectral_norm
    with ``name="weight_hh_l0"``); they are not Lipschitz factors of the recurrent layer.
    """
    rnn = cast(nn.RNNBase, module)
    kind = _base_type(module).__name__.lower()
    rows = []
    for tensor_name in _recurrent_weight_names(rnn):
        raw = _raw_weight(rnn, tensor_name)
        foreign = _foreign_weight(rnn, tensor_name)
        sigma_raw = float(torch.linalg.matrix_norm(raw, ord=2))
        sigma = sigma_raw if foreign is None else float(torch.linalg.matrix_norm(foreign, ord=2))
        rows.append(
            {
                **dict.fromkeys(_SIGMA_COLUMNS, math.nan),
                "layer": f"{name}.{tensor_name}" if name else tensor_name,
                "kind": kind,
                "sn": False,
                "mode": None,
                "input_shape": None,
                "sigma_raw": sigma_raw,
                "sigma_exact": sigma,
                "sigma_matrix": sigma,
                "clamp_active": False,
                "method": "svd",
            }
        )
    return rows


def _holds_weight_matrix(module: nn.Module) -> bool:
    """Whether ``module`` itself owns a weight matrix (a ≥ 2-D parameter, or a normalised one)."""
    if isinstance(module, parametrize.ParametrizationList):
        return False  # holds the ``original`` of its parent's weight, reported with the parent
    if parametrize.is_parametrized(module):
        return True
    return any(
        not isinstance(p, nn.parameter.UninitializedParameter) and p.ndim >= 2
        for p in module.parameters(recurse=False)
    )


def layer_sigmas(model: nn.Module, input_shape: Sequence[int] | None = None) -> pd.DataFrame:
    """Spectral diagnostics of every layer with a weight matrix, as a DataFrame.

    Works on a float64 eval-mode copy; the model itself (weights, u/v buffers, RNG) is not
    touched. Rows:

    * Linear, Conv1d/2d/3d and ConvTranspose1d/2d/3d layers: the norm of the layer as the
      linear operator it is (below), whatever normalises its weight — this package's
      :func:`spectral_norm` (``sn`` true), torch's ``parametrizations.spectral_norm``, or
      torch's legacy ``torch.nn.utils.spectral_norm`` hook (measured at the weight its
      eval-mode forward computes, ``W_orig / (uᵀ W_orig v)``, even before its first forward).
    * BatchNorm1d/2d/3d: the closed-form factor of the eval-mode affine map.
    * RNN, LSTM and GRU: one row per weight matrix, named ``<layer>.weight_ih_l0``,
      ``<layer>.weight_hh_l0`` (``…_reverse``, ``weight_hr_…``), with the exact σ of the
      gate-stacked matrix — the per-layer σ SN on recurrent weights constrains. It is not a
      Lipschitz constant of the recurrent layer (:func:`lipschitz_bound` refuses those).
    * Any other layer owning a weight matrix (Embedding, Bilinear, the input projection of
      MultiheadAttention, custom modules, …): a row with ``method`` ``"not measured"`` and NaN
      σ, so a layer is never silently missing from an SN-versus-none comparison.

    Columns:

    ``layer``, ``kind``, ``sn``, ``mode``, ``coeff``, ``input_shape`` (per sample)
        What the layer is (``kind``: ``linear``, ``conv2d``, ``conv_transpose2d``,
        ``batchnorm``, ``lstm``, …, or the class name of a layer not measured).
    ``sigma_raw``
        Exact norm of the unconstrained weight (as the layer's operator); for a layer under
        another normalisation (e.g. torch's ``spectral_norm``), of its ``original`` /
        ``weight_orig``.
    ``sigma_estimate``
        The SN's eval-mode estimate σ̂ = ‖W v‖ of the raw weight (NaN without SN).
    ``sigma_effective``
        What the SN believes the effective norm is: ``min(σ̂, coeff)`` (NaN without SN).
    ``sigma_exact``
        Exact norm of the eval-mode effective weight: SVD for matrices; for convs and
        transposed convs the operator norm at the real input shape (and, for transposed
        convs, the real output size) by dense SVD (small maps), Lanczos to convergence, or
        FFT for circular convs (``method`` says ``svd``, ``lanczos`` or ``fft``). For batch
        norm, ``max |γ| / √(var + eps)``. Under another normalisation (``sn`` is false) this
        is the norm of the weight that normalisation computes.
    ``sigma_matrix``
        SVD norm of the reshaped effective kernel (what torch's SN normalises; for a
        transposed conv reshaped along its output channels, as torch does).
    ``clamp_active``
        Whether σ̂ > coeff, i.e. the weight is being rescaled.
    ``method``
        How ``sigma_exact`` was found, or ``"not measured"``.

    Args:
        model: Any module; conv input shapes are found by one forward of a zero input.
        input_shape: Per-sample model input shape; defaults to ``model.input_shape``.

    Returns:
        One row per layer (per weight matrix for recurrent layers), in ``named_modules``
        order.

    Raises:
        SpectralNormError: Not a module, a layer with non-finite (diverged) weights, a conv
            layer whose input shape cannot be determined, an
            uninitialised lazy layer without ``input_shape``, or an ``input_shape`` that is
            not a shape or that the model cannot run on.

    Example:
        >>> net = nn.Sequential(spectral_norm(nn.Linear(8, 4), coeff=0.1), nn.ReLU())
        >>> list(layer_sigmas(net)[["layer", "kind", "clamp_active"]].itertuples(index=False))
        [Pandas(layer='0', kind='linear', clamp_active=True)]
    """
    _check_model(model, "layer_sigmas")
    for name, module in model.named_modules():  # before the copy's SN solves would fail
        if _is_weighted(module) or issubclass(_base_type(module), nn.RNNBase):
            for pname, param in module.named_parameters():
                if "weight" in pname:
                    _check_finite(param, f"layer_sigmas: layer {name!r} ({_layer_kind(module)})")
    shape = _resolve_input_shape(model, input_shape, "layer_sigmas")
    work = _eval_copy64(model)
    weighted = {n: m for n, m in work.named_modules() if _is_weighted(m)}
    targets = {**weighted, **{n: m for n, m in work.named_modules() if isinstance(m, _BN_TYPES)}}
    out_shapes: dict[str, tuple[int, ...]] = {}
    in_shapes = _record_input_shapes(work, shape, targets, out_shapes) if shape is not None else {}
    rows: list[dict[str, Any]] = []
    for name, module in work.named_modules():
        if name in weighted:
            try:
                row = _weight_layer_row(name, module, in_shapes.get(name), out_shapes.get(name))
            except SpectralNormError as exc:
                unused = shape is not None and name not in in_shapes
                why = f" (it did not run in the model's forward on input_shape {shape})"
                raise SpectralNormError(f"layer {name!r}: {exc}{why if unused else ''}") from exc
            rows.append(row)
        elif isinstance(module, _BN_TYPES):
            factor = _bn_factor(module)
            rows.append(
                {
                    **dict.fromkeys(_SIGMA_COLUMNS, math.nan),
                    "layer": name,
                    "kind": "batchnorm",
                    "sn": False,
                    "mode": None,
                    "input_shape": in_shapes.get(name),
                    "sigma_raw": factor,
                    "sigma_exact": factor,
                    "clamp_active": False,
                    "method": "closed-form",
                }
            )
        elif issubclass(_base_type(module), nn.RNNBase):
            rows.extend(_recurrent_rows(name, module))
        elif _holds_weight_matrix(module):
            rows.append(
                {
                    **dict.fromkeys(_SIGMA_COLUMNS, math.nan),
                    "layer": name,
                    "kind": _base_type(module).__name__.lower(),
                    "sn": False,
                    "mode": None,
                    "input_shape": None,
                    "clamp_active": False,
                    "method": _NOT_MEASURED,
                }
            )
    return pd.DataFrame(rows, columns=_SIGMA_COLUMNS)


class LayerFactor(NamedTuple):
    """One factor of the product Lipschitz bound."""

    layer: str
    kind: str
    factor: float


@dataclass(frozen=True)
class LipschitzBound:
    """Bounds on the L2 Lipschitz constant of a model in eval mode.

    Attributes:
        upper: Product of the per-layer constants (``factors``), with a 1e-6 relative slack
            for float rounding and power-iteration residuals.
        lower: The largest empirical value found (Jacobian spectral norm and/or difference
            quotient); always a valid lower bound.
        factors: Per-layer factors in execution order.
        lower_method: ``"jacobian"``, ``"ascent"`` or ``"both"``.
        n_samples: Number of sample inputs used for the lower bound.
    """

    upper: float
    lower: float
    factors: tuple[LayerFactor, ...]
    lower_method: str
    n_samples: int

    def to_frame(self) -> pd.DataFrame:
        """The per-layer factors as a DataFrame (``layer``, ``kind``, ``factor``)."""
        return pd.DataFrame(list(self.factors), columns=list(LayerFactor._fields))


def _sequential_leaves(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            yield from _sequential_leaves(child, f"{prefix}.{name}" if prefix else name)
    else:
        yield prefix, module


def _multiplicity(
    size: int, kernel: int, stride: int, dilation: int, padding: int, ceil_mode: bool
) -> int:
    """Max number of pooling windows containing one input position (one spatial dim).

    With ``ceil_mode`` one extra window is counted, which can only over-count (still an
    upper bound).
    """
    counts = [0] * size
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1 + int(ceil_mode)
    for i in range(max(out, 0)):
        for j in range(kernel):
            pos = i * stride - padding + j * dilation
            if 0 <= pos < size:
                counts[pos] += 1
    return max(counts, default=1)


def _adaptive_multiplicity(size: int, out: int) -> int:
    counts = [0] * size
    for i in range(out):
        start, end = (i * size) // out, -(-((i + 1) * size) // out)
        for pos in range(start, end):
            counts[pos] += 1
    return max(counts, default=1)


def _as_tuple(x: int | Sequence[int] | None, n: int) -> tuple[int, ...]:
    if x is None:
        return (1,) * n
    if isinstance(x, int):
        return (x,) * n
    return tuple(int(v) for v in x)


def _module_factor(
    name: str,
    module: nn.Module,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...] | None = None,
) -> LayerFactor:
    base = _base_type(module)
    if _is_weighted(module):
        row = _weight_layer_row(name, module, in_shape, out_shape)
        return LayerFactor(name, row["kind"], row["sigma_exact"])
    if isinstance(module, _BN_TYPES):
        return LayerFactor(name, "batchnorm", _bn_factor(module))
    for act_type, const in ACTIVATION_LIPSCHITZ.items():
        if base is act_type:
            value = const(module) if callable(const) else const
            return LayerFactor(name, base.__name__, float(value))
    if isinstance(module, nn.MaxPool1d | nn.MaxPool2d | nn.MaxPool3d):
        nd = len(in_shape) - 1
        ks, st = (
            _as_tuple(module.kernel_size, nd),
            _as_tuple(module.stride or module.kernel_size, nd),
        )
        pd_, dl = _as_tuple(module.padding, nd), _as_tuple(module.dilation, nd)
        mult = math.prod(
            _multiplicity(n, k, s, d, p, module.ceil_mode)
            for n, k, s, d, p in zip(in_shape[1:], ks, st, dl, pd_, strict=True)
        )
        return LayerFactor(name, base.__name__, math.sqrt(mult))
    if isinstance(module, nn.AdaptiveMaxPool1d | nn.AdaptiveMaxPool2d | nn.AdaptiveMaxPool3d):
        nd = len(in_shape) - 1
        size: Any = module.output_size
        sizes = [size] * nd if size is None or isinstance(size, int) else list(size)
        outs = [n if o is None else int(o) for o, n in zip(sizes, in_shape[1:], strict=True)]
        mult = math.prod(
            _adaptive_multiplicity(n, o) for n, o in zip(in_shape[1:], outs, strict=True)
        )
        return LayerFactor(name, base.__name__, math.sqrt(mult))
    if isinstance(
        module,
        nn.AvgPool1d
        | nn.AvgPool2d
        | nn.AvgPool3d
        | nn.AdaptiveAvgPool1d
        | nn.AdaptiveAvgPool2d
        | nn.AdaptiveAvgPool3d,
    ):
        return LayerFactor(name, base.__name__, _linear_module_norm(module, in_shape))
    raise SpectralNormError(
        f"lipschitz_bound cannot bound layer {name!r} ({base.__name__}); supported: Linear, "
        "Conv1d/2d/3d, ConvTranspose1d/2d/3d, BatchNorm (with running stats), pooling, "
        "dropout, flatten and the "
        f"activations {sorted(t.__name__ for t in ACTIVATION_LIPSCHITZ)}"
    )


def _jacobian_norms(model: nn.Module, x: Tensor) -> Tensor:
    """Spectral norm of the per-sample Jacobian d model(x_b) / d x_b, for every sample b."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = model(x).reshape(x.shape[0], -1)  # (B, K)
        rows = [
            torch.autograd.grad(y[:, k].sum(), x, retain_graph=k + 1 < y.shape[1])[0].reshape(
                x.shape[0], -1
            )
            for k in range(y.shape[1])
        ]
    jac = torch.stack(rows, dim=1)  # (B, K, D): samples are independent in eval mode
    return torch.linalg.matrix_norm(jac, ord=2)


def _ascent_lower(model: nn.Module, x0: Tensor, steps: int, g: torch.Generator) -> float:
    """Gradient ascent on ‖f(x+δ) − f(x)‖ / ‖δ‖ over x and δ; every quotient is ≤ L."""
    x = x0.detach().clone().requires_grad_(True)
    scale = float(x0.detach().std()) if x0.numel() > 1 else 1.0
    delta = (1e-2 * (scale or 1.0) * torch.randn(x0.shape, generator=g, dtype=x0.dtype)).to(x0)
    delta.requires_grad_(True)
    opt = torch.optim.Adam([x, delta], lr=1e-2 * (scale or 1.0))
    best = 0.0
    with torch.enable_grad():
        for _ in range(steps):
            b = x.shape[0]
            num = torch.linalg.vector_norm((model(x + delta) - model(x)).reshape(b, -1), dim=1)
            den = torch.linalg.vector_norm(delta.reshape(b, -1), dim=1).clamp_min(1e-30)
            ratio = num / den
            best = max(best, float(ratio.detach().max()))
            opt.zero_grad()
            (-torch.log(ratio.clamp_min(1e-30)).sum()).backward()
            opt.step()
    return best


def lipschitz_bound(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    inputs: Tensor | None = None,
    n_samples: int = 64,
    method: Literal["jacobian", "ascent", "both"] = "jacobian",
    ascent_steps: int = 100,
    seed: int = 0,
) -> LipschitzBound:
    """Upper and lower bounds on the L2 Lipschitz constant of a sequential model (eval mode).

    The upper bound is the product over the model's layers, in order, of: the exact norm of
    each Linear/Conv/ConvTranspose effective weight (as :func:`layer_sigmas`),
    ``max |γ|/√(var+eps)`` for batch norm, ``max |f'|`` for activations
    (:data:`ACTIVATION_LIPSCHITZ`), the exact norm of average pooling and
    ``√(window multiplicity)`` for max pooling. The lower bound is the
    largest Jacobian spectral norm over sample inputs (``"jacobian"``), the largest
    difference quotient found by gradient ascent (``"ascent"``), or both. Since both bound
    the same constant, ``upper ≥ lower``.

    Args:
        model: An ``nn.Sequential`` (nested Sequentials allowed) of supported layers.
        input_shape: Per-sample input shape; defaults to ``model.input_shape`` or to the
            shape of ``inputs``.
        inputs: Sample inputs ``(B, *input_shape)`` for the lower bound (e.g. a data batch);
            default ``n_samples`` standard-normal draws from a generator seeded with ``seed``.
        n_samples: Number of random inputs when ``inputs`` is not given.
        method: How to compute the lower bound.
        ascent_steps: Adam steps for the ``"ascent"`` method.
        seed: Seed of the private generator (the global RNG is not touched).

    Returns:
        A :class:`LipschitzBound`.

    Raises:
        SpectralNormError: A non-sequential model, an unsupported layer (recurrent layers
            included), no input shape, empty or non-finite ``inputs``, or a non-integer
            ``n_samples``, ``ascent_steps`` or ``seed``.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(
        ...     spectral_norm(nn.Linear(8, 16)), nn.ReLU(), spectral_norm(nn.Linear(16, 2))
        ... )
        >>> b = lipschitz_bound(net, input_shape=(8,))
        >>> 0 < b.lower <= b.upper <= 1.0 + 1e-2
        True
    """
    if method not in ("jacobian", "ascent", "both"):
        raise SpectralNormError(f"method must be 'jacobian', 'ascent' or 'both', got {method!r}")
    for what, value, minimum in (("n_samples", n_samples, 1), ("ascent_steps", ascent_steps, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            raise SpectralNormError(
                f"lipschitz_bound: {what} must be an integer >= {minimum}, got {value!r}"
            )
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise SpectralNormError(f"lipschitz_bound: seed must be an integer, got {seed!r}")
    if inputs is not None:
        if not isinstance(inputs, Tensor) or inputs.ndim < 1 or inputs.shape[0] < 1:
            raise SpectralNormError(
                "lipschitz_bound: inputs must be a non-empty tensor (B, *input_shape), got "
                + (f"shape {tuple(inputs.shape)}" if isinstance(inputs, Tensor) else repr(inputs))
            )
        if not bool(torch.isfinite(inputs.detach()).all()):
            raise SpectralNormError("lipschitz_bound: inputs must be finite (NaN or inf found)")
    shape = _resolve_input_shape(model, input_shape, "lipschitz_bound")
    if shape is None and inputs is not None:
        shape = tuple(inputs.shape[1:])
    if shape is None:
        raise SpectralNormError(
            "lipschitz_bound needs input_shape (or inputs, or model.input_shape)"
        )
    work = _eval_copy64(model)
    if not isinstance(work, nn.Sequential):
        raise SpectralNormError(
            f"lipschitz_bound needs an nn.Sequential model (a chain), got {type(model).__name__}"
        )
    leaves = dict(_sequential_leaves(work))
    out_shapes: dict[str, tuple[int, ...]] = {}
    in_shapes = _record_input_shapes(work, shape, leaves, out_shapes)
    factors = tuple(
        _module_factor(name, mod, in_shapes[name], out_shapes.get(name))
        for name, mod in leaves.items()
    )
    upper = math.prod(f.factor for f in factors) * (1.0 + _UPPER_SLACK)

    g = torch.Generator().manual_seed(int(seed))
    if inputs is not None:
        x = inputs.detach().to(torch.float64)
        if tuple(x.shape[1:]) != shape:
            raise SpectralNormError(
                f"inputs have per-sample shape {tuple(x.shape[1:])}, expected {shape}"
            )
    else:
        x = torch.randn((n_samples, *shape), generator=g, dtype=torch.float64)
    lower = 0.0
    if method in ("jacobian", "both"):
        lower = max(lower, float(_jacobian_norms(work, x).max()))
    if method in ("ascent", "both"):
        lower = max(lower, _ascent_lower(work, x, ascent_steps, g))
    return LipschitzBound(
        upper=upper, lower=lower, factors=factors, lower_method=method, n_samples=int(x.shape[0])
    )


def export(model: M) -> M:
    """A plain copy of ``model`` with the eval-mode normalised weights folded in.

    Every parametrization (ours, or torch's) is removed with ``leave_parametrized=True`` after
    switching the copy to eval mode, so no power iteration runs and the folded weight is
    exactly the one the original uses in eval mode; torch's legacy hook-based
    ``torch.nn.utils.spectral_norm`` is folded the same way (``remove_spectral_norm``, which
    keeps the eval-mode weight). The input-shape hooks are removed too.
    The result has plain ``weight`` parameters, no ``u``/``v`` buffers, and is returned in eval
    mode; its outputs equal the original's eval-mode outputs.

    Args:
        model: The model (not modified).

    Returns:
        The exported copy, in eval mode.

    Raises:
        SpectralNormError: Not a module, or an operator-mode layer that never saw an input
            (no shape yet).

    Example:
        >>> net = nn.Sequential(spectral_norm(nn.Linear(4, 4), coeff=0.5)).eval()
        >>> plain = export(net)
        >>> x = torch.randn(3, 4)
        >>> torch.equal(plain(x), net(x)), parametrize.is_parametrized(plain[0])
        (True, False)
    """
    _check_model(model, "export")
    plain = _copy_module(model).eval()
    for module in plain.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, _InputShapeHook):
                if not hook.sn.ready:
                    raise SpectralNormError("export: " + hook.sn._not_ready_message())
                del module._forward_pre_hooks[key]
            elif isinstance(hook, _TorchLegacySpectralNorm):
                torch.nn.utils.remove_spectral_norm(module, hook.name)
        if parametrize.is_parametrized(module):
            # deepcopy shares the injected Parametrized* class with the original, and
            # remove_parametrizations deletes the property from that class: give the copy its
            # own class first so the original keeps working.
            cls = module.__class__
            own = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
            module.__class__ = type(cls.__name__, cls.__bases__, own)
            names = list(cast(nn.ModuleDict, module.parametrizations).keys())
            for tensor_name in names:
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return plain

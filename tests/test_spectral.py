"""Tests for thunderline_lab.spectral: the SN parametrization, diagnostics and export.

Ground truth for every operator norm here is independent of the library: the layer's linear
map is materialised column by column (applied to the identity basis) and its largest singular
value taken by SVD in float64.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

from thunderline_lab.errors import SpectralNormError
from thunderline_lab.spectral import (
    ACTIVATION_LIPSCHITZ,
    SpectralNorm,
    export,
    get_spectral_norm,
    layer_sigmas,
    lipschitz_bound,
    operator_norm,
    spectral_norm,
)

TOL = 1e-2  # acceptance: exact operator norm ≤ coeff · (1 + 1e-2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny single-sample ops: on a busy 2-core box a second intra-op thread only spins."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- helpers
def dense_norm(layer: nn.Module, input_shape: tuple[int, ...]) -> float:
    """Exact ‖layer − bias‖₂ at ``input_shape`` by SVD of the materialised operator."""
    work = copy.deepcopy(layer).double().eval()
    n = math.prod(input_shape)
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *input_shape)
    with torch.no_grad():
        zero = work(torch.zeros((1, *input_shape), dtype=torch.float64))
        mat = (work(eye) - zero).reshape(n, -1)  # row i = A e_i (bias removed)
    gram = mat.T @ mat if mat.shape[1] < n else mat @ mat.T  # the smaller Gram matrix
    return math.sqrt(max(float(torch.linalg.eigvalsh(gram)[-1]), 0.0))


def train_steps(layer: nn.Module, input_shape: tuple[int, ...], steps: int = 25) -> None:
    """SGD steps on a loss that pushes the layer's gain up (keeps the clamp busy)."""
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    layer.train()
    for _ in range(steps):
        x = torch.randn((16, *input_shape), generator=g)
        loss = -layer(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


CONV_CASES = [
    # (kernel, stride, padding, dilation, groups)
    (1, 1, 0, 1, 1),
    (1, 2, 0, 1, 1),
    (1, 1, 0, 1, 2),  # grouped 1×1: operator path
    (3, 1, 1, 1, 1),
    (3, 2, 1, 1, 1),
    (3, 1, 0, 1, 1),
    (3, 2, 0, 1, 1),
    (3, 1, 2, 2, 1),
    (3, 2, 1, 1, 2),
    (5, 1, 2, 1, 1),
    (5, 2, 2, 1, 1),
    (5, 2, 1, 1, 1),
    (4, 2, 1, 1, 1),
]


# --------------------------------------------------------------------------- the bound
@pytest.mark.parametrize(("k", "s", "p", "d", "g"), CONV_CASES)
def test_operator_mode_bounds_the_true_conv_norm_after_training(
    k: int, s: int, p: int, d: int, g: int
) -> None:
    torch.manual_seed(k * 100 + s * 10 + p + d + g)
    coeff = 0.5 if (k + s) % 2 else 1.0
    shape = (4, 10, 10)
    conv = nn.Conv2d(4, 8, k, stride=s, padding=p, dilation=d, groups=g)
    with torch.no_grad():
        conv.weight.mul_(4.0)  # start well above the bound
    spectral_norm(conv, coeff=coeff, mode="operator", input_shape=shape)
    train_steps(conv, shape)
    conv.eval()
    sn = get_spectral_norm(conv)
    assert sn is not None
    raw = conv.parametrizations.weight.original.detach()
    assert float(sn.sigma(raw)) > coeff  # the clamp is really active
    assert dense_norm(conv, shape) <= coeff * (1 + TOL)


@pytest.mark.parametrize(("n_in", "n_out"), [(20, 30), (50, 10), (64, 64)])
def test_linear_bound_after_training(n_in: int, n_out: int) -> None:
    torch.manual_seed(n_in + n_out)
    layer = nn.Linear(n_in, n_out)
    with torch.no_grad():
        layer.weight.mul_(5.0)
    spectral_norm(layer, coeff=0.7)
    train_steps(layer, (n_in,))
    layer.eval()
    assert float(torch.linalg.matrix_norm(layer.weight.detach(), 2)) <= 0.7 * (1 + TOL)
    assert get_spectral_norm(layer).mode == "matrix"  # type: ignore[union-attr]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n_in", "n_out"), [(50, 10), (10, 50), (5, 1), (1, 5), (64, 64)])
def test_set_up_solves_sigma_to_convergence(n_in: int, n_out: int, dtype: torch.dtype) -> None:
    """Lanczos set-up/refresh: σ̂ equals the SVD value, also for rank-deficient Gram matrices."""
    torch.manual_seed(n_in * n_out)
    layer = spectral_norm(nn.Linear(n_in, n_out).to(dtype), coeff=1e-3)
    sn = get_spectral_norm(layer)
    assert sn is not None
    raw = layer.parametrizations.weight.original.detach()
    exact = float(torch.linalg.matrix_norm(raw.double(), 2))
    rel = 1e-5 if dtype == torch.float32 else 1e-10
    assert float(sn.sigma(raw)) == pytest.approx(exact, rel=rel)
    assert sn.refresh(raw) == pytest.approx(exact, rel=rel)


def test_conv1d_operator_mode_bound() -> None:
    torch.manual_seed(3)
    conv = nn.Conv1d(3, 6, 3, stride=2, padding=1)
    with torch.no_grad():
        conv.weight.mul_(4.0)
    spectral_norm(conv, coeff=1.0, input_shape=(3, 21))
    train_steps(conv, (3, 21))
    assert dense_norm(conv, (3, 21)) <= 1 + TOL


def test_matrix_mode_and_torch_builtin_exceed_the_bound_on_3x3_convs() -> None:
    """Documents why operator mode exists: normalising the reshaped kernel is not enough."""
    shape = (4, 10, 10)
    excess_matrix, excess_torch = [], []
    for seed in range(2):
        torch.manual_seed(seed)
        base = nn.Conv2d(4, 8, 3, padding=1)
        with torch.no_grad():
            base.weight.mul_(4.0)  # σ(kernel) > 1, so our soft bound is active too
        ours_matrix = spectral_norm(copy.deepcopy(base), coeff=1.0, mode="matrix")
        ours_operator = spectral_norm(copy.deepcopy(base), coeff=1.0, input_shape=shape)
        builtin = torch_spectral_norm(copy.deepcopy(base), n_power_iterations=5)
        for layer in (ours_matrix, ours_operator, builtin):
            with torch.no_grad():
                for _ in range(5):
                    layer(torch.randn(2, *shape))
            layer.eval()
        # both "matrix" normalisations hit σ(reshaped kernel) = 1 ...
        for layer in (ours_matrix, builtin):
            kernel = layer.weight.detach().flatten(1)
            assert abs(float(torch.linalg.matrix_norm(kernel, 2)) - 1.0) < 1e-3
        # ... yet the convolution operator's norm is well above 1
        excess_matrix.append(dense_norm(ours_matrix, shape))
        excess_torch.append(dense_norm(builtin, shape))
        assert dense_norm(ours_operator, shape) <= 1 + TOL
    assert min(excess_matrix) > 1.2
    assert min(excess_torch) > 1.2


def test_soft_bound_is_identity_below_coeff_and_rescales_above() -> None:
    torch.manual_seed(0)
    layer = spectral_norm(nn.Linear(8, 8), coeff=100.0)
    raw = layer.parametrizations.weight.original
    layer.train()
    assert torch.equal(layer.weight, raw)  # σ ≪ coeff: untouched, in train ...
    layer.eval()
    assert torch.equal(layer.weight, raw)  # ... and eval mode
    tight = spectral_norm(nn.Linear(8, 8), coeff=0.1).eval()
    eff = tight.weight.detach()
    raw_t = tight.parametrizations.weight.original.detach()
    sigma = float(torch.linalg.matrix_norm(raw_t, 2))
    torch.testing.assert_close(eff, raw_t * (0.1 / sigma), rtol=1e-4, atol=1e-7)


def test_gradient_matches_the_soft_bound_formula() -> None:
    """Training-mode gradient equals autograd of W / max(1, ‖W v‖ / c) with v fixed."""
    torch.manual_seed(0)
    layer = spectral_norm(nn.Linear(6, 5), coeff=0.3).train()
    sn = get_spectral_norm(layer)
    assert sn is not None
    raw = layer.parametrizations.weight.original
    target = torch.randn(5, 6)
    v = (sn._u @ raw.detach()).clone()  # the v this training step will use
    v = v / v.norm()
    (layer.weight * target).sum().backward()
    ours = raw.grad.clone()
    w = raw.detach().clone().requires_grad_(True)
    ref = w / torch.clamp_min(torch.linalg.vector_norm(w @ v) / 0.3, 1.0)
    (ref * target).sum().backward()
    torch.testing.assert_close(ours, w.grad, rtol=1e-5, atol=1e-6)


def test_more_power_iterations_track_at_least_as_well() -> None:
    torch.manual_seed(0)
    conv = spectral_norm(nn.Conv2d(3, 6, 3, padding=1), n_power_iterations=3, input_shape=(3, 8, 8))
    train_steps(conv, (3, 8, 8), steps=5)
    assert dense_norm(conv, (3, 8, 8)) <= 1 + TOL


# --------------------------------------------------------------------------- geometry
def test_ungrouped_1x1_convs_use_the_exact_matrix_path() -> None:
    for stride, padding in ((1, 0), (2, 0), (1, 1)):
        conv = spectral_norm(nn.Conv2d(4, 8, 1, stride=stride, padding=padding), coeff=0.5)
        sn = get_spectral_norm(conv)
        assert sn is not None and (sn.requested_mode, sn.mode) == ("operator", "matrix")
        assert not conv._forward_pre_hooks  # no input shape needed
        conv.eval()
        kernel = float(torch.linalg.matrix_norm(conv.weight.detach().flatten(1), 2))
        assert dense_norm(conv, (4, 7, 7)) == pytest.approx(kernel, rel=1e-5)  # exact
    grouped = get_spectral_norm(spectral_norm(nn.Conv2d(4, 8, 1, groups=2), input_shape=(4, 5, 5)))
    assert grouped is not None and grouped.mode == "operator"


@pytest.mark.parametrize(
    ("k", "s", "p", "d", "g"), [c for c in CONV_CASES if not (c[0] == 1 and c[4] == 1)]
)
def test_adjoint_is_the_transpose_of_the_operator(k: int, s: int, p: int, d: int, g: int) -> None:
    torch.manual_seed(0)
    shape = (4, 9, 9)
    conv = nn.Conv2d(4, 8, k, stride=s, padding=p, dilation=d, groups=g).double()
    sn = SpectralNorm(conv, mode="operator")
    assert sn.mode == "operator"
    sn.set_input_shape(shape, conv.weight.detach())
    w = conv.weight.detach()
    n_in = math.prod(shape)
    a = sn._apply_op(torch.eye(n_in, dtype=torch.float64).reshape(n_in, *shape), w)
    a = a.reshape(n_in, -1).T  # (n_out, n_in)
    n_out = a.shape[0]
    out_shape = sn._out_shape
    assert out_shape is not None
    at = sn._apply_adjoint(torch.eye(n_out, dtype=torch.float64).reshape(n_out, *out_shape), w)
    torch.testing.assert_close(at.reshape(n_out, -1), a)


def test_unsupported_requests_are_refused() -> None:
    with pytest.raises(SpectralNormError, match="padding_mode"):
        spectral_norm(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(SpectralNormError, match="same"):
        spectral_norm(nn.Conv2d(3, 4, 4, padding="same"))
    with pytest.raises(SpectralNormError, match=r"supports nn\.Linear"):
        spectral_norm(nn.ConvTranspose2d(3, 4, 3))
    with pytest.raises(SpectralNormError, match="coeff"):
        spectral_norm(nn.Linear(3, 4), coeff=0.0)
    with pytest.raises(SpectralNormError, match="n_power_iterations"):
        spectral_norm(nn.Linear(3, 4), n_power_iterations=0)
    with pytest.raises(SpectralNormError, match="mode"):
        spectral_norm(nn.Linear(3, 4), mode="fro")  # type: ignore[arg-type]
    twice = spectral_norm(nn.Linear(3, 4))
    with pytest.raises(SpectralNormError, match="already parametrized"):
        spectral_norm(twice)
    with pytest.raises(SpectralNormError, match="input shape"):
        spectral_norm(nn.Conv2d(3, 4, 3), input_shape=(2, 8, 8))
    # matrix mode accepts what operator mode refuses (and says it is not an operator bound)
    assert (
        get_spectral_norm(
            spectral_norm(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), mode="matrix")
        ).mode
        == "matrix"
    )  # type: ignore[union-attr]


def test_operator_mode_captures_the_input_shape_once_and_insists_on_it() -> None:
    torch.manual_seed(0)
    conv = spectral_norm(nn.Conv2d(3, 4, 3, stride=2, padding=1), coeff=0.5)
    with pytest.raises(SpectralNormError, match="forward pass first"):
        _ = conv.weight
    conv(torch.randn(2, 3, 11, 11))
    assert get_spectral_norm(conv).input_shape == (3, 11, 11)  # type: ignore[union-attr]
    conv(torch.randn(3, 11, 11))  # unbatched input: same per-sample shape
    with pytest.raises(SpectralNormError, match="depends on the input size"):
        conv(torch.randn(2, 3, 12, 12))
    with pytest.raises(SpectralNormError, match="forward pass first"):
        export(nn.Sequential(spectral_norm(nn.Conv2d(3, 4, 3))))


def test_spectral_norm_does_not_touch_the_global_rng() -> None:
    torch.manual_seed(0)
    conv, lin, head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(5, 5), nn.Linear(256, 5)
    state = torch.get_rng_state()
    spectral_norm(conv, input_shape=(3, 8, 8))
    spectral_norm(lin)
    net = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), head)
    net(torch.zeros(1, 3, 8, 8))  # train mode
    net.eval()(torch.zeros(1, 3, 8, 8))  # eval: re-solve after training
    layer_sigmas(net, input_shape=(3, 8, 8))
    lipschitz_bound(net, input_shape=(3, 8, 8), n_samples=4)
    assert torch.equal(torch.get_rng_state(), state)


# --------------------------------------------------------------------------- state
def _small_net(mode: str = "operator") -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        spectral_norm(nn.Conv2d(1, 6, 3, padding=1), coeff=0.8, mode=mode),  # type: ignore[arg-type]
        nn.BatchNorm2d(6),
        nn.ReLU(),
        spectral_norm(nn.Conv2d(6, 6, 3, stride=2, padding=1), coeff=0.8, mode=mode),  # type: ignore[arg-type]
        nn.ReLU(),
        nn.Flatten(),
        spectral_norm(nn.Linear(6 * 4 * 4, 5), coeff=0.8),
    )


@pytest.mark.parametrize("mode", ["operator", "matrix"])
def test_deepcopy_state_dict_modes_and_export_keep_outputs(mode: str) -> None:
    net = _small_net(mode)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(8, 1, 8, 8, generator=g)
        loss = nn.functional.cross_entropy(net(x), torch.randint(0, 5, (8,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.randn(4, 1, 8, 8, generator=g)

    # deepcopy: identical in train mode (same power iteration) and in eval mode
    twin = copy.deepcopy(net)
    assert torch.equal(twin(x), net(x))
    net.eval()
    twin.eval()
    reference = net(x)
    assert torch.equal(twin(x), reference)

    # eval → train → eval without a forward changes nothing
    net.train()
    net.eval()
    assert torch.equal(net(x), reference)

    # state_dict round trip into a fresh model (operator convs without a shape yet)
    fresh = _small_net(mode)
    fresh.load_state_dict(net.state_dict())
    fresh.eval()
    assert torch.equal(fresh(x), reference)

    # export: plain modules, same outputs, original still works
    plain = export(net)
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())
    assert not any(m._forward_pre_hooks for m in plain.modules())
    assert "0.parametrizations.weight.original" not in plain.state_dict()
    assert torch.equal(plain(x), reference)
    assert torch.equal(net(x), reference)
    assert not plain.training

    # .to(float64) carries u/v along
    wide = copy.deepcopy(net).to(torch.float64)
    torch.testing.assert_close(wide(x.double()).float(), reference, rtol=1e-4, atol=1e-5)


def test_unclamped_layers_export_and_registration_has_no_side_effects() -> None:
    torch.manual_seed(0)
    layer = spectral_norm(nn.Linear(4, 4), coeff=100.0)
    sn = get_spectral_norm(layer)
    assert sn is not None and sn.get_extra_state()["eval_fingerprint"] is not None
    assert torch.equal(sn._v, sn._v_eval)  # set-up: training and eval vectors both converged
    net = nn.Sequential(layer).eval()
    x = torch.randn(3, 4)
    plain = export(net)
    assert torch.equal(plain(x), net(x))
    assert torch.equal(plain[0].weight, layer.parametrizations.weight.original)


def test_eval_vector_tracks_the_current_weight_and_never_touches_training_state() -> None:
    net = _small_net()
    sn = get_spectral_norm(net[0])
    assert sn is not None
    raw = net[0].parametrizations.weight.original
    x = torch.randn(2, 1, 8, 8)
    net(x)  # training mode: power iteration on _u/_v only
    with torch.no_grad():
        raw.add_(0.05 * torch.randn_like(raw))  # an optimiser-like in-place update
    training_state = sn._u.clone(), sn._v.clone()
    net.eval()
    first = net(x)  # weight changed since the last solve: _v_eval re-solved
    assert torch.equal(sn._u, training_state[0]) and torch.equal(sn._v, training_state[1])
    solved = sn._v_eval.clone()
    assert torch.equal(net(x), first) and torch.equal(sn._v_eval, solved)  # then frozen
    exact = dense_norm(_raw_conv(net[0]), (1, 8, 8))
    assert float(sn.sigma(raw.detach())) == pytest.approx(exact, rel=1e-5)
    raw.data.mul_(1.5)  # `.data` edits bypass autograd's version counter: still caught
    assert float(sn.sigma(raw.detach())) == pytest.approx(1.5 * exact, rel=1e-5)
    keys = set(net.state_dict())
    prefix = "0.parametrizations.weight.0."
    assert {prefix + "_u", prefix + "_v", prefix + "_v_eval", prefix + "_extra_state"} <= keys


def test_evaluating_does_not_change_the_training_trajectory() -> None:
    """Same seed, with and without eval passes in between: bit-identical training."""
    results = []
    for evaluate in (False, True):
        net = _small_net()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(0)
        for _ in range(4):
            x = torch.randn(8, 1, 8, 8, generator=g)
            net.train()
            loss = nn.functional.cross_entropy(net(x), torch.randint(0, 5, (8,), generator=g))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if evaluate:
                net.eval()(x)
        net.train()
        results.append(
            [t.clone() for t in net.state_dict().values() if isinstance(t, torch.Tensor)]
        )
    plain, evaluated = results
    # every training tensor (weights, BN stats, _u, _v) identical; only _v_eval may differ
    keys = [k for k, t in _small_net().state_dict().items() if isinstance(t, torch.Tensor)]
    for key, a, b in zip(keys, plain, evaluated, strict=True):
        if not key.endswith("_v_eval"):
            assert torch.equal(a, b), key


def _raw_conv(layer: nn.Module) -> nn.Conv2d:
    """A plain Conv2d carrying ``layer``'s unconstrained weight."""
    plain = export(nn.Sequential(layer))[0]
    with torch.no_grad():
        plain.weight.copy_(layer.parametrizations.weight.original)
    return plain


# --------------------------------------------------------------------------- diagnostics
def test_layer_sigmas_reports_exact_values() -> None:
    net = _small_net()
    net.train()
    train_net_input = torch.randn(8, 1, 8, 8)
    for _ in range(3):
        net(train_net_input)
    table = layer_sigmas(net, input_shape=(1, 8, 8))
    assert list(table["layer"]) == ["0", "1", "3", "6"]
    assert list(table["kind"]) == ["conv2d", "batchnorm", "conv2d", "linear"]
    rows = table.set_index("layer")
    # exact norms against the materialised operators
    ev = copy.deepcopy(net).eval()
    assert rows.loc["0", "sigma_exact"] == pytest.approx(dense_norm(ev[0], (1, 8, 8)), rel=1e-6)
    assert rows.loc["3", "sigma_exact"] == pytest.approx(dense_norm(ev[3], (6, 8, 8)), rel=1e-6)
    weight = ev[6].weight.detach().double()
    assert rows.loc["6", "sigma_exact"] == pytest.approx(
        float(torch.linalg.matrix_norm(weight, 2)), rel=1e-6
    )
    sn_rows = table[table["sn"]]
    assert (sn_rows["clamp_active"] == (sn_rows["sigma_estimate"] > sn_rows["coeff"])).all()
    expected_eff = sn_rows[["sigma_estimate", "coeff"]].min(axis=1)
    assert (sn_rows["sigma_effective"] - expected_eff).abs().max() < 1e-9
    assert (sn_rows["sigma_exact"] <= sn_rows["coeff"] * (1 + TOL)).all()
    assert (sn_rows["sigma_raw"] >= sn_rows["sigma_exact"] - 1e-9).all()
    bn = ev[1]
    factor = (bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps)).max().item()
    assert rows.loc["1", "sigma_exact"] == pytest.approx(factor, rel=1e-6)
    assert rows.loc["3", "input_shape"] == (6, 8, 8)


def test_exact_norm_methods_fft_and_lanczos_agree_with_svd() -> None:
    torch.manual_seed(0)
    circular = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")
    table = layer_sigmas(nn.Sequential(circular), input_shape=(3, 8, 8))
    assert table.loc[0, "method"] == "fft"
    assert table.loc[0, "sigma_exact"] == pytest.approx(dense_norm(circular, (3, 8, 8)), rel=1e-9)
    big = nn.Conv2d(8, 8, 3, stride=1, padding=1)  # 8·12·12 = 1152 inputs: Lanczos
    table = layer_sigmas(nn.Sequential(big), input_shape=(8, 12, 12))
    assert table.loc[0, "method"] == "lanczos"
    assert table.loc[0, "sigma_exact"] == pytest.approx(dense_norm(big, (8, 12, 12)), rel=1e-7)
    reflect = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")
    assert operator_norm(reflect, (2, 7, 7)) == pytest.approx(dense_norm(reflect, (2, 7, 7)))
    with pytest.raises(SpectralNormError, match="input_shape"):
        layer_sigmas(nn.Sequential(nn.Conv2d(1, 1, 3)))


def test_lipschitz_upper_is_at_least_lower_on_random_models() -> None:
    torch.manual_seed(0)
    models = [
        (nn.Sequential(nn.Linear(6, 4)), (6,)),
        (
            nn.Sequential(
                nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
            ),
            (6,),
        ),
        (
            nn.Sequential(
                nn.Conv2d(2, 4, 3, padding=1),
                nn.BatchNorm2d(4),
                nn.LeakyReLU(0.1),
                nn.MaxPool2d(3, stride=1),
                nn.Conv2d(4, 4, 3, stride=2),
                nn.ELU(),
                nn.AvgPool2d(2),
                nn.Flatten(),
                nn.Linear(4, 2),
            ),
            (2, 9, 9),
        ),
    ]
    for model, shape in models:
        with torch.no_grad():  # non-trivial BN statistics
            model.train()(torch.randn(16, *shape) * 3)
        bound = lipschitz_bound(
            model, input_shape=shape, method="both", ascent_steps=30, n_samples=16
        )
        assert 0 < bound.lower <= bound.upper
    single = lipschitz_bound(nn.Sequential(nn.Linear(6, 4)), input_shape=(6,))
    assert single.lower == pytest.approx(single.upper, rel=1e-5)  # tight for one linear map


def test_lipschitz_factors_for_pooling_and_activations() -> None:
    model = nn.Sequential(
        nn.MaxPool2d(3, stride=1), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1), nn.GELU()
    )
    factors = lipschitz_bound(model, input_shape=(1, 9, 9), n_samples=4).to_frame()
    values = dict(zip(factors["kind"], factors["factor"], strict=True))
    assert values["MaxPool2d"] == pytest.approx(3.0)  # each pixel in ≤ 3×3 windows → √9
    assert values["AvgPool2d"] == pytest.approx(0.5)  # mean of 4 pixels: 1/√4
    assert values["AdaptiveAvgPool2d"] == pytest.approx(1 / 3)  # 3×3 → 1: 1/√9
    x = torch.linspace(-6, 6, 100001, requires_grad=True)
    (grad,) = torch.autograd.grad(nn.functional.gelu(x).sum(), x)
    assert float(grad.abs().max()) <= ACTIVATION_LIPSCHITZ[nn.GELU]  # type: ignore[operator]
    assert values["GELU"] == ACTIVATION_LIPSCHITZ[nn.GELU]
    with pytest.raises(SpectralNormError, match="cannot bound"):
        lipschitz_bound(nn.Sequential(nn.LayerNorm(4)), input_shape=(4,))
    with pytest.raises(SpectralNormError, match=r"nn\.Sequential"):
        lipschitz_bound(nn.Linear(4, 4), input_shape=(4,))


def test_lipschitz_upper_with_sn_is_below_the_product_of_coeffs() -> None:
    net = nn.Sequential(
        spectral_norm(nn.Conv2d(1, 4, 3, padding=1), coeff=0.9, input_shape=(1, 8, 8)),
        nn.GELU(),
        spectral_norm(nn.Conv2d(4, 4, 3, stride=2, padding=1), coeff=0.9, input_shape=(4, 8, 8)),
        nn.ReLU(),
        nn.Flatten(),
        spectral_norm(nn.Linear(64, 3), coeff=2.0),
    )
    train_steps(net, (1, 8, 8), steps=10)
    bound = lipschitz_bound(net, input_shape=(1, 8, 8), method="both", ascent_steps=30)
    assert bound.lower <= bound.upper
    cap = 0.9 * 0.9 * 2.0 * ACTIVATION_LIPSCHITZ[nn.GELU] * (1 + TOL) ** 3  # type: ignore[operator]
    assert bound.upper <= cap


# --------------------------------------------------------------------------- foreign modules
def test_diagnostics_of_a_layer_under_torch_spectral_norm_use_its_effective_weight() -> None:
    # torch's (hard) SN rescales a small weight *up* to σ = 1: the raw weight's norm is not
    # the layer's, and a product of raw norms is not an upper bound on the Lipschitz constant
    torch.manual_seed(0)
    linear = nn.Linear(4, 4)
    with torch.no_grad():
        linear.weight.mul_(0.1)
    net = nn.Sequential(torch_spectral_norm(linear)).eval()
    effective = float(torch.linalg.matrix_norm(net[0].weight.detach().double(), ord=2))
    original = linear.parametrizations.weight.original.detach()
    raw = float(torch.linalg.matrix_norm(original.double(), ord=2))
    assert effective > 5 * raw
    row = layer_sigmas(net).iloc[0]
    assert row["sigma_raw"] == pytest.approx(raw, rel=1e-6)
    assert row["sigma_exact"] == pytest.approx(effective, rel=1e-6)
    assert row["sigma_matrix"] == pytest.approx(effective, rel=1e-6)
    bound = lipschitz_bound(net, input_shape=(4,))
    assert bound.lower <= bound.upper
    assert bound.upper == pytest.approx(effective, rel=1e-5)

    conv = torch_spectral_norm(nn.Conv2d(1, 2, 3, padding=1))
    with torch.no_grad():
        conv.parametrizations.weight.original.mul_(0.1)
    conv(torch.randn(1, 1, 6, 6))  # one training step of torch's power iteration
    conv.eval()
    plain = nn.Conv2d(1, 2, 3, padding=1)
    with torch.no_grad():
        plain.weight.copy_(conv.weight.detach())
    assert operator_norm(conv, (1, 6, 6)) == pytest.approx(operator_norm(plain, (1, 6, 6)))


@pytest.mark.parametrize(
    "module",
    [
        nn.Embedding(4, 4),
        nn.Bilinear(3, 3, 2),
        nn.LSTM(4, 4),
        nn.ReLU(),
    ],
    ids=lambda m: type(m).__name__,
)
def test_operator_norm_refuses_what_is_not_a_linear_or_conv(module: nn.Module) -> None:
    with pytest.raises(SpectralNormError, match=r"operator_norm supports nn\.Linear"):
        operator_norm(module, (1, 8, 8))


def test_operator_norm_refuses_an_input_shape_the_conv_cannot_take() -> None:
    with pytest.raises(SpectralNormError, match=r"input_shape \(2, 6, 6\)"):
        operator_norm(nn.Conv2d(1, 2, 3), (2, 6, 6))
    with pytest.raises(SpectralNormError, match=r"input_shape \(1, 1, 1\)"):
        operator_norm(nn.Conv2d(1, 2, 3), (1, 1, 1))


def test_diagnostics_refuse_an_input_shape_the_model_cannot_take() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(SpectralNormError, match=r"input_shape \(5,\)"):
        layer_sigmas(net, input_shape=(5,))
    with pytest.raises(SpectralNormError, match=r"input_shape \(5,\)"):
        lipschitz_bound(net, input_shape=(5,))
    with pytest.raises(SpectralNormError, match=r"input_shape \(3,\)"):
        lipschitz_bound(nn.Sequential(nn.Embedding(10, 4)), input_shape=(3,))


def test_spectral_norm_refuses_lazy_and_legacy_normalised_layers() -> None:
    with pytest.raises(SpectralNormError, match="uninitialised"):
        spectral_norm(nn.LazyLinear(3))
    with pytest.raises(SpectralNormError, match=r"torch\.nn\.utils\.spectral_norm"):
        spectral_norm(torch.nn.utils.spectral_norm(nn.Linear(3, 3)))
    with pytest.raises(SpectralNormError, match="coeff"):
        spectral_norm(nn.Linear(3, 3), coeff=True)  # type: ignore[arg-type]
    with pytest.raises(SpectralNormError, match="eps"):
        spectral_norm(nn.Linear(3, 3), eps=-1.0)
    # a lazy layer after its first forward is an ordinary one
    lazy = nn.LazyLinear(3)
    lazy(torch.randn(2, 5))
    assert get_spectral_norm(spectral_norm(lazy)) is not None


# --------------------------------------------------------------------------- transposed convs
CONV_T_CASES = [
    # (dims, kernel, stride, padding, output_padding, dilation, groups)
    (1, 3, 2, 1, 1, 1, 1),
    (2, 3, 2, 1, 1, 1, 1),
    (2, 4, 2, 1, 0, 1, 2),
    (2, 3, 1, 2, 0, 2, 1),
    (2, 1, 2, 0, 1, 1, 1),  # 1×1, stride 2: zeros interleaved, still the matrix norm
    (2, 1, 1, 1, 0, 1, 1),  # 1×1 with padding: the border is cropped, not the matrix norm
    (3, 2, 2, 0, 0, 1, 1),
]


@pytest.mark.parametrize(("dims", "k", "s", "p", "op", "d", "g"), CONV_T_CASES)
def test_layer_sigmas_measures_transposed_convs_as_operators(
    dims: int, k: int, s: int, p: int, op: int, d: int, g: int
) -> None:
    torch.manual_seed(dims * 1000 + k * 100 + s * 10 + p + op + d + g)
    cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    layer = cls(4, 6, k, stride=s, padding=p, output_padding=op, dilation=d, groups=g)
    shape = (4, *([3] * dims if dims == 3 else [5] * dims))
    table = layer_sigmas(nn.Sequential(layer), input_shape=shape)
    assert len(table) == 1  # it used to be silently missing
    row = table.iloc[0]
    expected = dense_norm(layer, shape)
    assert row["kind"] == f"conv_transpose{dims}d"
    assert row["input_shape"] == shape
    assert row["sigma_exact"] == pytest.approx(expected, rel=1e-6)
    assert row["sigma_raw"] == pytest.approx(expected, rel=1e-6)
    assert not row["sn"] and math.isnan(row["sigma_estimate"])
    # torch's SN reshapes a transposed kernel along its output channels (dim=1)
    kernel = layer.weight.detach().double().transpose(0, 1).flatten(1)
    assert row["sigma_matrix"] == pytest.approx(float(torch.linalg.matrix_norm(kernel, 2)))
    assert operator_norm(layer, shape) == pytest.approx(expected, rel=1e-6)
    bound = lipschitz_bound(nn.Sequential(layer), input_shape=shape, n_samples=2)
    assert bound.lower == pytest.approx(bound.upper, rel=1e-5)  # tight for one linear map


def test_a_transposed_conv_has_the_norm_of_the_conv_it_is_the_adjoint_of() -> None:
    torch.manual_seed(0)
    up = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1, bias=False)
    down = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False)  # (3, 2, 3, 3) weights both
    with torch.no_grad():
        down.weight.copy_(up.weight)
    # (3, 6, 6) → (2, 12, 12) is the adjoint of (2, 12, 12) → (3, 6, 6)
    sigma = operator_norm(up, (3, 6, 6))
    assert sigma == pytest.approx(operator_norm(down, (2, 12, 12)), rel=1e-9)
    kernel = float(torch.linalg.matrix_norm(up.weight.detach().double().flatten(1), 2))
    assert abs(sigma - kernel) > 0.05 * sigma  # the flattened kernel is not the operator
    big = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1)  # 8·10·10 inputs: Lanczos
    row = layer_sigmas(nn.Sequential(big), input_shape=(8, 10, 10)).iloc[0]
    assert row["method"] == "lanczos"
    assert row["sigma_exact"] == pytest.approx(dense_norm(big, (8, 10, 10)), rel=1e-7)
    with pytest.raises(SpectralNormError, match="input shape"):
        operator_norm(up)
    with pytest.raises(SpectralNormError, match="cannot take"):
        operator_norm(up, (2, 6, 6))


class _Upsample(nn.Module):
    """A decoder step that asks its transposed conv for an exact output size."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x, output_size=(2 * x.shape[-2], 2 * x.shape[-1]))  # output_padding 1


def test_a_transposed_conv_is_measured_at_the_output_size_it_was_asked_for() -> None:
    torch.manual_seed(0)
    model = _Upsample()
    row = layer_sigmas(model, input_shape=(2, 4, 4)).set_index("layer").loc["up"]
    assert row["sigma_exact"] == pytest.approx(dense_norm(model, (2, 4, 4)), rel=1e-6)


def test_lipschitz_bound_of_a_model_with_a_transposed_conv() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 3, padding=1),
    )
    bound = lipschitz_bound(net, input_shape=(2, 4, 4), n_samples=8)
    assert 0 < bound.lower <= bound.upper
    assert [f.kind for f in bound.factors] == ["conv_transpose2d", "ReLU", "conv2d"]
    assert bound.factors[0].factor == pytest.approx(dense_norm(net[0], (2, 4, 4)), rel=1e-6)


# --------------------------------------------------------------------------- other layers
class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3)
        self.gru = nn.GRU(6, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        out, _ = self.gru(out)
        return self.head(out)


def test_layer_sigmas_reports_every_recurrent_weight_matrix() -> None:
    torch.manual_seed(0)
    model = _Recurrent()
    torch_spectral_norm(model.gru, name="weight_hh_l0")
    table = layer_sigmas(model)
    per_direction = ["weight_ih_l{}{}", "weight_hh_l{}{}", "weight_hr_l{}{}"]
    lstm_names = [
        "lstm." + n.format(layer, suffix)
        for layer in (0, 1)
        for suffix in ("", "_reverse")
        for n in per_direction
    ]
    assert list(table["layer"]) == [*lstm_names, "gru.weight_ih_l0", "gru.weight_hh_l0", "head"]
    assert list(table["kind"]) == ["lstm"] * 12 + ["gru", "gru", "linear"]
    rows = table.set_index("layer")
    for name in lstm_names:
        matrix = getattr(model.lstm, name.split(".")[1]).detach().double()
        assert rows.loc[name, "sigma_exact"] == pytest.approx(
            float(torch.linalg.matrix_norm(matrix, 2)), rel=1e-6
        )
        assert rows.loc[name, "method"] == "svd"
    # under torch's SN the σ is that of the weight it computes, the raw σ that of `original`
    gru_eval = copy.deepcopy(model.gru).eval()
    effective = float(torch.linalg.matrix_norm(gru_eval.weight_hh_l0.detach().double(), 2))
    original = gru_eval.parametrizations.weight_hh_l0.original.detach().double()
    assert effective == pytest.approx(1.0, rel=1e-2)
    assert rows.loc["gru.weight_hh_l0", "sigma_exact"] == pytest.approx(effective, rel=1e-6)
    assert rows.loc["gru.weight_hh_l0", "sigma_raw"] == pytest.approx(
        float(torch.linalg.matrix_norm(original, 2)), rel=1e-6
    )
    # a σ per matrix is not a Lipschitz constant of a recurrent layer
    with pytest.raises(SpectralNormError, match="cannot bound"):
        lipschitz_bound(nn.Sequential(nn.RNN(3, 3)), input_shape=(2, 3))


def test_layers_holding_a_weight_matrix_that_is_not_measured_say_so() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2), nn.LayerNorm(2))
    table = layer_sigmas(model)
    assert list(table["layer"]) == ["0", "2"]  # LayerNorm's gain is no weight matrix
    embedding = table.iloc[0]
    assert embedding["kind"] == "embedding" and embedding["method"] == "not measured"
    assert math.isnan(embedding["sigma_exact"]) and math.isnan(embedding["sigma_raw"])
    assert table.iloc[1]["method"] == "svd"
    attention = layer_sigmas(nn.MultiheadAttention(4, 2)).set_index("layer")
    assert attention.loc["", "method"] == "not measured"  # its input projection
    assert attention.loc["out_proj", "kind"] == "linear"


# --------------------------------------------------------------------------- legacy torch SN
def test_diagnostics_of_a_layer_under_torch_legacy_spectral_norm_before_its_first_forward() -> None:
    # torch's legacy SN recomputes `weight` from weight_orig, u and v before every forward; until
    # the first forward the attribute is the raw weight, not the one the layer uses
    torch.manual_seed(0)
    linear = nn.Linear(4, 4)
    with torch.no_grad():
        linear.weight.mul_(0.1)
    net = nn.Sequential(torch.nn.utils.spectral_norm(linear)).eval()
    before = net[0].weight.clone()
    effective = dense_norm(net[0], (4,))  # what the eval-mode forward really computes
    raw = float(torch.linalg.matrix_norm(linear.weight_orig.detach().double(), 2))
    assert abs(effective - raw) > 0.5 * raw
    row = layer_sigmas(net).iloc[0]  # no input_shape: no forward inside the diagnostics
    assert row["sigma_raw"] == pytest.approx(raw, rel=1e-6)
    assert row["sigma_exact"] == pytest.approx(effective, rel=1e-6)
    assert row["sigma_matrix"] == pytest.approx(effective, rel=1e-6)
    assert operator_norm(net[0]) == pytest.approx(effective, rel=1e-6)
    bound = lipschitz_bound(net, input_shape=(4,))
    assert bound.lower <= bound.upper
    assert bound.upper == pytest.approx(effective, rel=1e-5)
    assert torch.equal(net[0].weight, before)  # the model itself is not touched
    plain = export(net)
    assert not hasattr(plain[0], "weight_orig") and isinstance(plain[0].weight, nn.Parameter)
    x = torch.randn(3, 4)
    torch.testing.assert_close(plain(x), net(x))


def test_diagnostics_of_a_legacy_spectral_norm_layer_after_an_optimiser_step() -> None:
    torch.manual_seed(0)
    conv = torch.nn.utils.spectral_norm(nn.Conv2d(1, 2, 3, padding=1))
    head = torch.nn.utils.spectral_norm(nn.Linear(2 * 6 * 6, 3))
    net = nn.Sequential(conv, nn.Flatten(), head)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    loss = -net(torch.randn(4, 1, 6, 6)).pow(2).mean()  # training forward: power iteration
    opt.zero_grad()
    loss.backward()
    opt.step()  # `weight` is now stale (weight_orig moved) and a non-leaf (deepcopy refuses it)
    table = layer_sigmas(net, input_shape=(1, 6, 6)).set_index("layer")
    assert operator_norm(conv, (1, 6, 6)) == pytest.approx(table.loc["0", "sigma_exact"])
    with torch.no_grad():
        net.eval()(torch.zeros(1, 1, 6, 6))  # for dense_norm's deepcopy: leaf weights
    assert table.loc["0", "sigma_exact"] == pytest.approx(dense_norm(conv, (1, 6, 6)), rel=1e-6)
    assert table.loc["2", "sigma_exact"] == pytest.approx(dense_norm(head, (72,)), rel=1e-6)
    rnn = nn.GRU(3, 4)
    torch.nn.utils.spectral_norm(rnn, name="weight_hh_l0")
    rnn(torch.randn(2, 1, 3))  # training mode: power iteration, a non-leaf weight_hh_l0
    rows = layer_sigmas(rnn).set_index("layer")
    x = torch.randn(2, 1, 3)
    exported = export(rnn)
    with torch.no_grad():
        rnn.eval()(torch.zeros(1, 1, 3))  # the eval-mode forward computes the weight it uses
    used = rnn.weight_hh_l0.detach().double()
    assert rows.loc["weight_hh_l0", "sigma_exact"] == pytest.approx(
        float(torch.linalg.matrix_norm(used, 2)), rel=1e-6
    )
    torch.testing.assert_close(exported(x)[0], rnn(x)[0])
    assert not hasattr(exported, "weight_hh_l0_orig")


# --------------------------------------------------------------------------- bad input
def test_diagnostics_refuse_lazy_layers_and_malformed_arguments_cleanly() -> None:
    with pytest.raises(SpectralNormError, match="uninitialised"):
        layer_sigmas(nn.Sequential(nn.LazyLinear(3)))
    with pytest.raises(SpectralNormError, match="uninitialised"):
        operator_norm(nn.LazyConv2d(2, 3), (1, 8, 8))
    # with an input shape the diagnostics' own forward initialises their copy
    assert layer_sigmas(nn.Sequential(nn.LazyLinear(3)), input_shape=(4,)).loc[0, "kind"] == (
        "linear"
    )
    net = nn.Sequential(nn.Linear(4, 4))
    for bad in (4, "4", (4.5,), (True,), (0,)):
        with pytest.raises(SpectralNormError, match="input_shape must be"):
            layer_sigmas(net, input_shape=bad)  # type: ignore[arg-type]
        with pytest.raises(SpectralNormError, match="input_shape must be"):
            lipschitz_bound(net, input_shape=bad)  # type: ignore[arg-type]
    with pytest.raises(SpectralNormError, match="input_shape must be"):
        operator_norm(nn.Conv2d(1, 1, 3), (1, 8.5, 8))  # type: ignore[arg-type]
    with pytest.raises(SpectralNormError, match="input_shape must be"):
        spectral_norm(nn.Conv2d(1, 1, 3), input_shape=(1, 8.5, 8))  # type: ignore[arg-type]
    for kwargs in ({"n_samples": 0}, {"n_samples": 2.5}, {"ascent_steps": 0}, {"seed": 0.5}):
        with pytest.raises(SpectralNormError, match=next(iter(kwargs))):
            lipschitz_bound(net, input_shape=(4,), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(SpectralNormError, match="non-empty"):
        lipschitz_bound(net, inputs=torch.zeros(0, 4))
    with pytest.raises(SpectralNormError, match="finite"):
        lipschitz_bound(net, inputs=torch.full((2, 4), math.nan))


class _WithUnusedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Conv2d(1, 2, 3, padding=1)
        self.unused = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_a_conv_the_forward_never_runs_is_named_in_the_error() -> None:
    with pytest.raises(SpectralNormError, match=r"layer 'unused'.*did not run"):
        layer_sigmas(_WithUnusedConv(), input_shape=(1, 6, 6))


def _diverged(value: float) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[2].weight[0, 0] = value
    return net


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize(
    ("call", "where"),
    [
        (lambda net: layer_sigmas(net), "layer_sigmas: layer '2' \\(linear\\)"),
        (lambda net: operator_norm(net[2]), "operator_norm: the Linear's"),
        (lambda net: spectral_norm(net[2]), "spectral_norm: the Linear's"),
    ],
)
def test_non_finite_weights_are_refused_as_a_diverged_layer(call, where, value) -> None:
    with pytest.raises(SpectralNormError, match=f"{where} weights are not finite.*diverged"):
        call(_diverged(value))


def test_a_spectral_normalised_layer_whose_weights_diverged_is_refused() -> None:
    layer = spectral_norm(nn.Linear(3, 4))
    with torch.no_grad():
        layer.parametrizations.weight.original[0, 0] = math.nan
    with pytest.raises(SpectralNormError, match="linear layer's weights are not finite"):
        layer.eval()(torch.zeros(1, 3))
    with pytest.raises(SpectralNormError, match="layer '' \\(linear\\) weights are not finite"):
        layer_sigmas(layer)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: spectral_norm(nn.Linear(0, 3)), r"weight is empty \(shape \(3, 0\)\)"),
        (lambda: spectral_norm(nn.Linear(3, 0)), r"weight is empty \(shape \(0, 3\)\)"),
        (lambda: spectral_norm(None), "module must be an nn.Linear"),
        (lambda: layer_sigmas(None), "layer_sigmas: model must be a torch.nn.Module"),
        (lambda: export(None), "export: model must be a torch.nn.Module"),
        (
            lambda: spectral_norm(nn.Linear(3, 3), n_power_iterations=10**9),
            r"n_power_iterations must be in \[1, 1000\]",
        ),
        (
            lambda: spectral_norm(nn.Linear(3, 3), n_power_iterations=1001),
            r"n_power_iterations must be in \[1, 1000\]",
        ),
    ],
)
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")
def test_malformed_spectral_requests_are_refused_by_name(call, message) -> None:
    with pytest.raises(SpectralNormError, match=message):
        call()

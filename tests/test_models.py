"""Tests for thunderline_lab.models: ModelConfig and build_model."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from thunderline_lab import models
from thunderline_lab.errors import ConfigError
from thunderline_lab.models import (
    ACTIVATIONS,
    MAX_DEPTH,
    MAX_KERNEL_SIZE,
    MAX_POWER_ITERATIONS,
    MAX_WIDTH,
    Classifier,
    ModelConfig,
    build_model,
)
from thunderline_lab.spectral import (
    ACTIVATION_LIPSCHITZ,
    SpectralNorm,
    export,
    get_spectral_norm,
    layer_sigmas,
    lipschitz_bound,
)

DIGITS_FLAT, DIGITS_IMAGE = (64,), (1, 8, 8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny single-sample ops: on a busy 2-core box a second intra-op thread only spins."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train(model: nn.Module, input_shape: tuple[int, ...], steps: int = 5, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        x = torch.randn((16, *input_shape), generator=g)
        y = torch.randint(0, 10, (16,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


# --------------------------------------------------------------------------- config
def test_config_round_trips_through_json() -> None:
    cfg = ModelConfig(
        architecture="cnn",
        depth=3,
        width=16,
        activation="gelu",
        dropout=0.1,
        batchnorm=True,
        spectral_norm=True,
        spectral_norm_coeff=2,
        n_power_iterations=2,
        conv_sn_mode="matrix",
        sn_layers=["output", "hidden"],  # type: ignore[arg-type]
        pooling="avg",
    )
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["sn_layers"] == ["hidden", "output"]  # canonical order
    assert data["spectral_norm_coeff"] == 2.0 and isinstance(data["spectral_norm_coeff"], float)
    assert ModelConfig.from_dict(data) == cfg
    assert ModelConfig.from_dict({}) == ModelConfig()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("all", ("first", "hidden", "output")),
        ("none", ()),
        ("output, first", ("first", "output")),
        ("hidden", ("hidden",)),
    ],
)
def test_sn_layers_accepts_optuna_friendly_strings(text: str, expected: tuple[str, ...]) -> None:
    assert ModelConfig.from_dict({"sn_layers": text}).sn_layers == expected


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"architecture": "rnn"}, "architecture"),
        ({"depth": 0}, "depth"),
        ({"width": 2.5}, "width"),
        ({"activation": "swish"}, "activation"),
        ({"dropout": 1.0}, "dropout"),
        ({"batchnorm": "yes"}, "batchnorm"),
        ({"spectral_norm_coeff": -1}, "spectral_norm_coeff"),
        ({"n_power_iterations": 0}, "n_power_iterations"),
        ({"conv_sn_mode": "fft"}, "conv_sn_mode"),
        ({"sn_layers": ["middle"]}, "sn_layers"),
        ({"spectral_norm": True, "sn_layers": "none"}, "sn_layers"),
        ({"kernel_size": 4}, "kernel_size"),
        ({"pooling": "lp"}, "pooling"),
        ({"colour": "blue"}, "unknown key"),
    ],
)
def test_bad_config_values_are_refused_naming_the_key(data: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_dict(data)


def test_a_mistyped_key_gets_a_did_you_mean() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['depht'\].*did you mean 'depth'"):
        ModelConfig.from_dict({"depht": 3})
    with pytest.raises(
        ConfigError, match=r"'spectral_norm_coef'.*did you mean 'spectral_norm_coeff'"
    ):
        ModelConfig.from_dict({"spectral_norm_coef": 0.5})


@pytest.mark.parametrize("data", [None, 5, "depth=2", [("depth", 2)]])
def test_from_dict_refuses_what_is_not_a_mapping(data: object) -> None:
    with pytest.raises(ConfigError, match=r"ModelConfig\.from_dict needs a mapping"):
        ModelConfig.from_dict(data)  # type: ignore[arg-type]


def test_integral_floats_from_json_are_accepted() -> None:
    cfg = ModelConfig.from_dict({"depth": 3.0, "width": 32.0})
    assert (cfg.depth, cfg.width) == (3, 32)
    assert isinstance(cfg.depth, int)


# --------------------------------------------------------------------------- build
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("architecture", ["mlp", "cnn"])
def test_models_map_inputs_to_logits(architecture: str, activation: str) -> None:
    cfg = ModelConfig(
        architecture=architecture,
        depth=3,
        width=8,
        activation=activation,
        dropout=0.2,
        batchnorm=True,
        spectral_norm=True,
    )
    shape = DIGITS_IMAGE
    model = build_model(cfg, shape, 10, seed=0)
    assert isinstance(model, Classifier) and model.input_shape == shape and model.n_classes == 10
    assert model(torch.randn(5, *shape)).shape == (5, 10)
    assert model.eval()(torch.randn(1, *shape)).shape == (1, 10)


def test_mlp_takes_flat_or_image_inputs_and_cnn_needs_images() -> None:
    cfg = ModelConfig(depth=2, width=8)
    assert build_model(cfg, DIGITS_FLAT, 10)(torch.randn(3, 64)).shape == (3, 10)
    assert build_model(cfg, DIGITS_IMAGE, 10)(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    with pytest.raises(ConfigError, match="C, H, W"):
        build_model(replace(cfg, architecture="cnn"), DIGITS_FLAT, 10)
    with pytest.raises(ConfigError, match="n_classes"):
        build_model(cfg, DIGITS_FLAT, 0)


@pytest.mark.parametrize("shape", [64, "64", (64.5,), None, (8, "8"), (True,)])
def test_build_model_refuses_an_input_shape_that_is_not_a_tuple_of_ints(shape: object) -> None:
    # "64" used to build a model for shape (6, 4) and (64.5,) one for (64,), silently
    with pytest.raises(ConfigError, match=r"input_shape must be a sequence of positive integers"):
        build_model(ModelConfig(depth=1, width=4), shape, 10)  # type: ignore[arg-type]


@pytest.mark.parametrize("pooling", ["max", "avg", "stride"])
def test_cnn_downsamples_every_second_block(pooling: str) -> None:
    cfg = ModelConfig(architecture="cnn", depth=4, width=4, pooling=pooling, spectral_norm=True)
    model = build_model(cfg, DIGITS_IMAGE, 10, seed=0)
    table = layer_sigmas(model)
    shapes = dict(zip(table["layer"], table["input_shape"], strict=True))
    # 8×8 → block 1 halves → 4×4 → block 3 halves → 2×2
    assert shapes["conv1"] == (4, 8, 8)
    assert shapes["conv2"] == (4, 4, 4)
    assert shapes["conv3"] == (4, 4, 4)
    assert shapes["out"] == (4,)
    has_pool = any(name.startswith("pool") for name, _ in model.named_children())
    assert has_pool == (pooling != "stride")
    assert (model.conv1.stride == (2, 2)) == (pooling == "stride")


def test_spectral_norm_off_means_no_sn_anywhere() -> None:
    for arch, shape in (("mlp", DIGITS_FLAT), ("cnn", DIGITS_IMAGE)):
        cfg = ModelConfig(architecture=arch, depth=3, width=8, spectral_norm=False)
        model = build_model(cfg, shape, 10)
        assert not any(parametrize.is_parametrized(m) for m in model.modules())
        assert not any(isinstance(m, SpectralNorm) for m in model.modules())
        assert not any(m._forward_pre_hooks for m in model.modules())
        assert not any("_u" in key or "_v" in key for key in model.state_dict())


@pytest.mark.parametrize(
    "sn_layers",
    [("first",), ("hidden",), ("output",), ("first", "output"), ("first", "hidden", "output")],
)
@pytest.mark.parametrize("architecture", ["mlp", "cnn"])
def test_sn_layers_selects_exactly_those_layers(
    architecture: str, sn_layers: tuple[str, ...]
) -> None:
    cfg = ModelConfig(
        architecture=architecture, depth=3, width=8, spectral_norm=True, sn_layers=sn_layers
    )
    model = build_model(cfg, DIGITS_IMAGE, 10)
    with_sn = {name for name, role in model.roles.items() if role in sn_layers}
    for name, role in model.roles.items():
        assert (get_spectral_norm(getattr(model, name)) is not None) == (name in with_sn), role
    assert list(model.roles.values()).count("first") == 1
    assert list(model.roles.values())[-1] == "output"


def test_conv_sn_mode_and_coeff_reach_the_layers() -> None:
    for mode in ("operator", "matrix"):
        cfg = ModelConfig(
            architecture="cnn",
            depth=2,
            width=8,
            spectral_norm=True,
            spectral_norm_coeff=0.7,
            n_power_iterations=3,
            conv_sn_mode=mode,
        )
        model = build_model(cfg, DIGITS_IMAGE, 10)
        conv_sn = get_spectral_norm(model.conv1)
        head_sn = get_spectral_norm(model.out)
        assert conv_sn is not None and head_sn is not None
        assert (conv_sn.mode, conv_sn.coeff, conv_sn.n_power_iterations) == (mode, 0.7, 3)
        assert head_sn.mode == "matrix"  # Linear: exact matrix path
        if mode == "operator":
            assert conv_sn.input_shape == (8, 8, 8)  # known at build time


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("architecture", ["mlp", "cnn"])
def test_same_seed_gives_bit_identical_weights_and_outputs(architecture: str) -> None:
    cfg = ModelConfig(
        architecture=architecture,
        depth=2,
        width=8,
        dropout=0.1,
        batchnorm=True,
        spectral_norm=True,
        spectral_norm_coeff=0.5,
    )
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = build_model(cfg, DIGITS_IMAGE, 10)
        _train(model, DIGITS_IMAGE, steps=4)
        x = torch.randn(6, *DIGITS_IMAGE, generator=torch.Generator().manual_seed(7))
        runs.append((model.state_dict(), model.train()(x), model.eval()(x)))
    (state_a, train_a, eval_a), (state_b, train_b, eval_b) = runs
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        a, b = state_a[key], state_b[key]
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, key
    assert torch.equal(train_a, train_b) and torch.equal(eval_a, eval_b)


def test_sn_starts_from_the_same_raw_weights_and_leaves_the_rng_alone() -> None:
    base = ModelConfig(architecture="cnn", depth=2, width=8)
    torch.manual_seed(5)
    plain = build_model(base, DIGITS_IMAGE, 10)
    after_plain = torch.get_rng_state()
    torch.manual_seed(5)
    normed = build_model(replace(base, spectral_norm=True), DIGITS_IMAGE, 10)
    assert torch.equal(torch.get_rng_state(), after_plain)  # SN drew no random numbers
    for name in ("conv0", "conv1", "out"):
        raw = getattr(normed, name).parametrizations.weight.original
        assert torch.equal(raw, getattr(plain, name).weight)
    state = torch.get_rng_state()
    build_model(base, DIGITS_IMAGE, 10, seed=9)
    assert torch.equal(torch.get_rng_state(), state)  # seed= forks the RNG
    a = build_model(base, DIGITS_IMAGE, 10, seed=9)
    b = build_model(base, DIGITS_IMAGE, 10, seed=9)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


# --------------------------------------------------------------------------- Lipschitz
@pytest.mark.parametrize(
    ("architecture", "activation", "pooling"),
    [
        ("mlp", "relu", "max"),
        ("mlp", "gelu", "max"),
        ("cnn", "relu", "max"),
        ("cnn", "tanh", "avg"),
    ],
)
def test_lipschitz_upper_bound_is_below_the_product_of_coeffs(
    architecture: str, activation: str, pooling: str
) -> None:
    coeff = 1.5
    cfg = ModelConfig(
        architecture=architecture,
        depth=3,
        width=8,
        activation=activation,
        pooling=pooling,
        spectral_norm=True,
        spectral_norm_coeff=coeff,
    )
    model = build_model(cfg, DIGITS_IMAGE, 10, seed=0)
    _train(model, DIGITS_IMAGE, steps=10)
    bound = lipschitz_bound(model, method="both", ascent_steps=20, n_samples=16)
    n_sn = len(model.roles)
    act = ACTIVATION_LIPSCHITZ[type(ACTIVATIONS[activation]())]
    assert isinstance(act, float)
    cap = (coeff * (1 + 1e-2)) ** n_sn * act**cfg.depth
    assert 0 < bound.lower <= bound.upper <= cap


def test_lipschitz_upper_bound_with_batchnorm_includes_the_bn_factors() -> None:
    cfg = ModelConfig(
        architecture="mlp",
        depth=2,
        width=8,
        batchnorm=True,
        spectral_norm=True,
        spectral_norm_coeff=1.0,
    )
    model = build_model(cfg, DIGITS_FLAT, 10, seed=0)
    _train(model, DIGITS_FLAT, steps=10)
    bound = lipschitz_bound(model, n_samples=16)
    frame = bound.to_frame()
    bn = math.prod(frame.loc[frame["kind"] == "batchnorm", "factor"])
    assert bn != pytest.approx(1.0)  # BN really rescales after training
    assert bound.lower <= bound.upper <= (1 + 1e-2) ** 3 * bn


def test_export_of_a_built_model_gives_the_same_outputs() -> None:
    cfg = ModelConfig(architecture="cnn", depth=2, width=8, batchnorm=True, spectral_norm=True)
    model = build_model(cfg, DIGITS_IMAGE, 10, seed=0)
    _train(model, DIGITS_IMAGE)
    x = torch.randn(4, *DIGITS_IMAGE)
    plain = export(model)
    assert isinstance(plain, Classifier) and plain.config == cfg
    assert torch.equal(plain(x), model.eval()(x))


# --------------------------------------------------------------------------- size limits
def _refuse_to_allocate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any layer construction fail loudly: a refused config must not allocate first."""

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("a layer was allocated before the size was checked")

    for cls in (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d):
        monkeypatch.setattr(cls, "__init__", boom)


@pytest.mark.parametrize(
    ("data", "key", "high"),
    [
        ({"depth": 10_000}, "depth", MAX_DEPTH),
        ({"depth": MAX_DEPTH + 1}, "depth", MAX_DEPTH),
        ({"width": 10**9}, "width", MAX_WIDTH),
        ({"width": -1}, "width", MAX_WIDTH),
        ({"n_power_iterations": 10**9}, "n_power_iterations", MAX_POWER_ITERATIONS),
        ({"kernel_size": 10**6 + 1}, "kernel_size", MAX_KERNEL_SIZE),
    ],
)
def test_sizes_are_bounded_and_the_message_names_the_field(
    data: dict[str, object], key: str, high: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    _refuse_to_allocate(monkeypatch)
    with pytest.raises(ConfigError, match=rf"ModelConfig\.{key} must be .*between 1 and {high}"):
        build_model(ModelConfig.from_dict({"architecture": "cnn", **data}), DIGITS_IMAGE, 10)
    # the limits themselves are accepted, and typos still get their did-you-mean
    assert getattr(ModelConfig.from_dict({key: high}), key) == high
    with pytest.raises(ConfigError, match=rf"did you mean '{key}'"):
        ModelConfig.from_dict({key + "x": high})


def test_build_model_refuses_a_model_too_large_to_allocate(monkeypatch: pytest.MonkeyPatch) -> None:
    _refuse_to_allocate(monkeypatch)
    with pytest.raises(ConfigError, match=rf"depth=2, width={MAX_WIDTH}\).*parameters"):
        build_model(ModelConfig(depth=2, width=MAX_WIDTH), DIGITS_FLAT, 10)
    with pytest.raises(ConfigError, match="MAX_PARAMETERS"):
        build_model(ModelConfig(depth=1, width=64), (10**7,), 10)  # a huge flattened input
    with pytest.raises(ConfigError, match="MAX_PARAMETERS"):
        build_model(ModelConfig(depth=1, width=64), DIGITS_FLAT, 10**9)  # a huge head
    with pytest.raises(ConfigError, match="MAX_ACTIVATIONS"):
        build_model(ModelConfig(architecture="cnn", width=64), (1, 8192, 8192), 10)


@pytest.mark.parametrize(
    ("cfg", "shape"),
    [
        (ModelConfig(depth=3, width=16, batchnorm=True), DIGITS_FLAT),
        (ModelConfig(depth=2, width=8, spectral_norm=True), (3, 5, 5)),
        (ModelConfig(architecture="cnn", depth=3, width=8, kernel_size=5), DIGITS_IMAGE),
        (ModelConfig(architecture="cnn", depth=2, width=4, batchnorm=True), (3, 9, 9)),
    ],
)
def test_the_parameter_limit_counts_exactly(
    cfg: ModelConfig, shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    n = sum(p.numel() for p in build_model(cfg, shape, 10).parameters())
    monkeypatch.setattr(models, "MAX_PARAMETERS", n)
    build_model(cfg, shape, 10)  # exactly at the limit
    monkeypatch.setattr(models, "MAX_PARAMETERS", n - 1)
    with pytest.raises(ConfigError, match=f"{n:,} parameters"):
        build_model(cfg, shape, 10)


def test_numpy_integers_are_accepted_and_stay_plain_ints() -> None:
    np = pytest.importorskip("numpy")
    cfg = ModelConfig.from_dict({"depth": np.int64(2), "width": np.int32(8), "dropout": 0})
    assert (cfg.depth, cfg.width) == (2, 8) and type(cfg.depth) is int
    assert json.loads(json.dumps(cfg.to_dict()))["width"] == 8
    model = build_model(cfg, DIGITS_FLAT, np.int64(10), seed=np.int64(0))
    assert model.n_classes == 10 and type(model.n_classes) is int


def test_build_model_refuses_a_config_that_is_not_a_model_config_and_a_bad_seed() -> None:
    with pytest.raises(ConfigError, match=r"needs a ModelConfig.*from_dict"):
        build_model({"depth": 2}, DIGITS_FLAT, 10)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="seed"):
        build_model(ModelConfig(depth=1, width=4), DIGITS_FLAT, 10, seed=2.5)  # type: ignore[arg-type]

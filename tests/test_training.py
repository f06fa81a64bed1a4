"""Tests of thunderline_lab.training: the loop, its events, metrics, determinism, failures."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from thunderline_lab.bus import EventBus
from thunderline_lab.data import load_dataset
from thunderline_lab.errors import ConfigError, TrainingError
from thunderline_lab.models import ModelConfig
from thunderline_lab.training import (
    EPOCH_MEASUREMENTS,
    FINAL_MEASUREMENTS,
    EvalSettings,
    TrialResult,
    max_sigma,
    train_trial,
)

CONTRACT_METRICS = {
    "train_accuracy",
    "val_accuracy",
    "test_accuracy",
    "generalization_gap",
    "test_nll",
    "test_ece",
    "test_brier",
    "noise_acc_0.1",
    "noise_acc_0.3",
    "fgsm_acc_0.01",
    "fgsm_acc_0.05",
    "fgsm_acc_0.1",
    "lipschitz_upper",
    "lipschitz_lower",
    "max_sigma",
    "step_time_ms",
    "n_params",
    "epochs",
    "best_val_accuracy",
    "best_val_loss",
    "best_train_loss",
    "best_epoch",
    "final_train_loss",
    "final_val_loss",
    "final_val_accuracy",
    "final_max_sigma",
}
WALL_CLOCK = {"step_time_ms"}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def wine():
    return load_dataset("wine", seed=0)


@pytest.fixture(scope="module")
def moons():
    return load_dataset("moons", seed=0)


def _collect(bus: EventBus) -> list:
    seen: list = []
    bus.subscribe("*", seen.append)
    return seen


def _small(sn: bool = False, **kw) -> ModelConfig:
    return ModelConfig(depth=1, width=16, spectral_norm=sn, **kw)


def test_emits_run_start_metric_per_epoch_and_stop(wine):
    bus = EventBus()
    seen = _collect(bus)
    result = train_trial(
        _small(sn=True, spectral_norm_coeff=2.0),
        wine,
        bus=bus,
        model_run_id="study-x",
        trial_id="trial_0003",
        study="study-x",
        epochs=3,
        lr=1e-2,
        seed=0,
        patience=None,
        parameters={"pair_id": "g0000_s0"},
    )
    assert result.status == "completed"
    names = [e.name for e in seen]
    assert names == ["ml.run.start"] + ["ml.run.metric"] * 3 + ["ml.run.stop"]
    start = seen[0].payload
    assert (start.model_run_id, start.trial_id, start.study) == ("study-x", "trial_0003", "study-x")
    assert start.spectral_norm is True and start.spectral_norm_coeff == 2.0
    assert start.parameters["pair_id"] == "g0000_s0" and start.parameters["seed"] == 0
    for epoch, ev in enumerate(seen[1:4]):
        assert ev.payload.step == epoch
        assert set(ev.payload.measurements) == set(EPOCH_MEASUREMENTS)
    stop = seen[-1].payload
    assert stop.success is True and stop.epochs == 3
    assert stop.metrics == result.metrics


def test_metrics_carry_the_contract_names(wine):
    result = train_trial(_small(), wine, epochs=2, lr=1e-2, seed=0)
    assert set(result.metrics) >= CONTRACT_METRICS
    assert "ood_auroc" not in result.metrics  # no OOD points in wine
    m = result.metrics
    assert m["generalization_gap"] == pytest.approx(m["train_accuracy"] - m["test_accuracy"])
    assert 0 < m["lipschitz_lower"] <= m["lipschitz_upper"]
    assert m["n_params"] == sum(p.numel() for p in result.model.parameters())
    assert all(math.isfinite(v) for v in m.values())
    assert any(k.startswith("sigma/") for k in m)  # per-layer σ summary
    assert len(result.history) == 2 and result.best_epoch in (0, 1)


def test_two_moons_reports_ood_auroc(moons):
    result = train_trial(_small(), moons, epochs=2, lr=1e-2, seed=0)
    assert 0.0 <= result.metrics["ood_auroc"] <= 1.0


def test_same_seed_same_numbers_other_seed_other_numbers(wine):
    cfg = ModelConfig(depth=2, width=16, dropout=0.2, spectral_norm=True)

    def run(seed: int) -> TrialResult:
        return train_trial(cfg, wine, epochs=3, lr=1e-2, seed=seed, patience=None)

    a, b, c = run(7), run(7), run(8)
    strip = lambda m: {k: v for k, v in m.items() if k not in WALL_CLOCK}  # noqa: E731
    assert strip(a.metrics) == strip(b.metrics)
    assert a.history == b.history
    assert strip(a.metrics) != strip(c.metrics)


def test_non_finite_loss_fails_as_diverged_without_raising():
    digits = load_dataset("digits", seed=0)
    bus = EventBus()
    seen = _collect(bus)
    result = train_trial(ModelConfig(depth=2, width=32), digits, bus=bus, epochs=3, lr=1e20)
    assert result.status == "failed"
    assert result.error_type == "diverged"
    stop = seen[-1]
    assert stop.name == "ml.run.stop" and stop.payload.success is False
    assert stop.payload.metadata["error_type"] == "diverged"


def test_report_callback_prunes(wine):
    calls: list[tuple[int, float]] = []

    def report(epoch: int, val_loss: float) -> bool:
        calls.append((epoch, val_loss))
        return epoch == 1

    result = train_trial(_small(), wine, epochs=5, lr=1e-2, report=report, patience=None)
    assert result.status == "pruned"
    assert [e for e, _ in calls] == [0, 1]
    assert len(result.history) == 2
    assert "test_accuracy" not in result.metrics  # no full evaluation for pruned trials
    assert result.metrics["best_val_loss"] == min(v for _, v in calls)


def test_should_stop_cancels_between_epochs(wine):
    flag = threading.Event()

    def report(epoch: int, val_loss: float) -> bool:
        flag.set()  # the Stop button is pressed during epoch 0
        return False

    result = train_trial(_small(), wine, epochs=5, lr=1e-2, report=report, should_stop=flag)
    assert result.status == "cancelled"
    assert len(result.history) == 1


def test_early_stopping_restores_best_epoch(wine):
    # A learning rate far too high makes the validation loss jump about: patience 1 stops.
    result = train_trial(ModelConfig(depth=2, width=64), wine, epochs=30, lr=0.5, patience=1)
    assert result.status == "completed"
    assert len(result.history) < 30
    best = min(h["val_loss"] for h in result.history)
    assert result.metrics["best_val_loss"] == best


def test_summary_keeps_the_best_epoch_and_the_last_epoch_trained(wine):
    # lr far too high: the validation loss jumps about, patience 1 stops after the best epoch
    result = train_trial(ModelConfig(depth=2, width=64), wine, epochs=30, lr=0.5, patience=1)
    m, history = result.metrics, result.history
    assert result.status == "completed" and result.best_epoch < len(history) - 1
    best = min(range(len(history)), key=lambda e: history[e]["val_loss"])
    assert result.best_epoch == best and m["best_epoch"] == best
    # best_*: every value at the lowest validation loss (not each measurement's own best)
    assert m["best_val_loss"] == history[best]["val_loss"]
    assert m["best_val_accuracy"] == history[best]["val_accuracy"]
    assert m["best_train_loss"] == history[best]["train_loss"]
    # final_*: the last epoch trained, before the best weights were restored
    assert set(FINAL_MEASUREMENTS) <= set(EPOCH_MEASUREMENTS)
    for k in FINAL_MEASUREMENTS:
        assert m[f"final_{k}"] == history[-1][k], k
    assert m["final_val_loss"] > m["best_val_loss"]
    # the research metrics describe the restored best epoch
    assert m["val_accuracy"] == pytest.approx(m["best_val_accuracy"], abs=1e-12)


def test_pruned_trials_report_their_last_epoch(wine):
    result = train_trial(
        _small(), wine, epochs=5, lr=1e-2, report=lambda e, _loss: e == 1, patience=None
    )
    assert result.status == "pruned" and len(result.history) == 2
    for k in FINAL_MEASUREMENTS:
        assert result.metrics[f"final_{k}"] == result.history[-1][k]


def test_cnn_on_flat_digits_is_reshaped_to_images():
    digits = load_dataset("digits", seed=0)
    cfg = ModelConfig(architecture="cnn", depth=1, width=4, spectral_norm=True)
    settings = EvalSettings(fgsm_eps=(0.05,), noise_sigmas=(0.1,))
    result = train_trial(cfg, digits, epochs=1, lr=1e-2, evaluation=settings)
    assert result.status == "completed"
    assert result.metrics["lipschitz_lower"] <= result.metrics["lipschitz_upper"]


def test_max_sigma_is_exact_for_linear_layers():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(3, 4) * 3.0)
        net[2].weight.copy_(torch.eye(2, 3) * 0.5)
    assert max_sigma(net) == pytest.approx(3.0)
    assert net.training  # mode restored


def test_sigma_metrics_leave_out_layers_not_measured():
    from thunderline_lab.training import _sigma_summary

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)
            self.bil = torch.nn.Bilinear(3, 3, 2)  # listed by layer_sigmas as "not measured"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            return self.bil(h, h)

    with torch.no_grad():
        net = Net()
        net.fc.weight.copy_(torch.eye(3, 4) * 2.0)
    out = _sigma_summary(net, (4,))
    assert set(out) == {"max_sigma", "mean_sigma", "min_sigma", "n_sn_clamped", "sigma/fc"}
    assert out["max_sigma"] == pytest.approx(2.0)
    assert all(math.isfinite(v) for v in out.values())


def test_max_sigma_of_matrix_mode_sn_convs_is_their_operator_norm():
    # matrix-mode SN bounds the reshaped kernel, not the convolution: the reported sigma must
    # be the convolution's true operator norm (it used to be the reshaped kernel's, <= c)
    from thunderline_lab.models import build_model
    from thunderline_lab.spectral import layer_sigmas
    from thunderline_lab.training import _remember_conv_input_shapes

    digits = load_dataset("digits", seed=0, image=True)
    cfg = ModelConfig(
        architecture="cnn",
        depth=2,
        width=8,
        spectral_norm=True,
        spectral_norm_coeff=1.0,
        conv_sn_mode="matrix",
        sn_layers="first,hidden",
    )
    model = build_model(cfg, (1, 8, 8), 10, seed=0)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "parametrizations"):
                module.parametrizations.weight.original.mul_(5)
    _remember_conv_input_shapes(model, digits.x_train)
    exact = layer_sigmas(model, (1, 8, 8))["sigma_exact"].max()
    assert exact > 1.5  # the convolutions exceed c = 1 as operators
    assert max_sigma(model) == pytest.approx(exact, rel=1e-3)


@pytest.mark.parametrize(
    "kw",
    [
        {"epochs": 0},
        {"lr": 0.0},
        {"lr": math.inf},
        {"batch_size": 0},
        {"patience": 0},
        {"patience": True},
        {"seed": None},
        {"seed": 1.5},
        {"seed": "1"},
        {"seed": 2**70},
        {"lr": True},
        {"weight_decay": True},
        {"parameters": 5},
        {"report": 5},
        {"should_stop": 5},
        {"evaluation": {"lipschitz": False}},
        {"threads": 0},
        {"threads": -1},
    ],
)
def test_bad_settings_raise_config_error(wine, kw):
    (key,) = kw
    with pytest.raises(ConfigError, match=rf"{key} must be"):
        train_trial(_small(), wine, **kw)


def test_a_config_or_dataset_of_the_wrong_type_is_refused(wine):
    with pytest.raises(ConfigError, match=r"ModelConfig\.from_dict"):
        train_trial({"depth": 1}, wine, epochs=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"load_dataset"):
        train_trial(_small(), "wine", epochs=1)  # type: ignore[arg-type]


def test_an_lr_beyond_float32_fails_as_diverged_without_raising(wine):
    # AdamW's step (lr / bias correction) overflows float32 on the very first step
    bus = EventBus()
    seen = _collect(bus)
    result = train_trial(_small(), wine, bus=bus, epochs=2, lr=1e38)
    assert result.status == "failed"
    assert result.error_type == "diverged"
    assert result.error is not None and "epoch 0" in result.error
    stop = seen[-1]
    assert stop.name == "ml.run.stop" and stop.payload.success is False
    assert stop.payload.metadata["error_type"] == "diverged"


def test_threads_are_set_for_the_call_and_restored(wine):
    torch.set_num_threads(2)
    seen: list[int] = []

    def report(epoch: int, val_loss: float) -> bool:
        seen.append(torch.get_num_threads())
        return False

    train_trial(_small(), wine, epochs=1, lr=1e-2, report=report, threads=1)
    assert seen == [1]
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize(
    ("extra", "clashing"),
    [
        ({"lr": 99}, "lr"),
        ({"seed": 7, "pair_id": "p"}, "seed"),
        ({"depth": 3}, "depth"),  # a config field
        ({"dataset": "digits"}, "dataset"),
        ({"batchnorm": 0}, "batchnorm"),  # 0 is not False: a bool setting
    ],
)
def test_extra_parameters_cannot_overwrite_the_recorded_settings(wine, extra, clashing):
    bus = EventBus()
    seen = _collect(bus)
    with pytest.raises(
        ConfigError, match=rf"overwrite the recorded training settings: {clashing}="
    ):
        train_trial(_small(), wine, bus=bus, lr=0.01, epochs=1, parameters=extra)
    assert seen == []  # refused before the run started, so no ml.run.start with a wrong lr


def test_extra_parameters_may_restate_a_setting_with_its_own_value(wine):
    # studies pass their own record of the settings (the same values) as parameters
    result = train_trial(
        _small(),
        wine,
        lr=0.01,
        epochs=1,
        seed=0,
        evaluation=EvalSettings(noise_sigmas=(), fgsm_eps=(), lipschitz=False, layer_sigmas=False),
        parameters={"lr": 0.01, "seed": 0, "depth": 1, "dataset": "wine", "pair_id": "p"},
    )
    assert result.parameters["lr"] == 0.01 and result.parameters["pair_id"] == "p"
    assert result.parameters["spectral_norm_coeff"] is None  # unused without SN


@pytest.mark.parametrize("seed", ["a", None, 2**64, True])
def test_seed_everything_refuses_a_non_seed(seed):
    from thunderline_lab.training import seed_everything

    with pytest.raises(ConfigError, match="seed must be an integer"):
        seed_everything(seed)


def test_max_sigma_refuses_a_non_module():
    with pytest.raises(TrainingError, match=r"max_sigma: model must be a torch\.nn\.Module"):
        max_sigma(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("lipschitz_samples", 0),  # silently measured one input
        ("lipschitz_samples", -5),
        ("lipschitz_samples", 2.5),
        ("n_bins", 0),
        ("n_bins", True),
        ("lipschitz", "no"),  # a flag given as text was taken as set
        ("layer_sigmas", 1),
    ],
)
def test_eval_settings_out_of_range_are_refused_by_name(option: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^EvalSettings\.{option}: "):
        EvalSettings(**{option: value})  # type: ignore[arg-type]


def test_max_sigma_of_a_diverged_model_names_the_layer() -> None:
    # torch's SVD raised its own _LinAlgError on the NaN
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    with torch.no_grad():
        net[2].weight[0, 0] = float("nan")
    with pytest.raises(TrainingError, match=r"layer '2' \(Linear\): its weights are not finite"):
        max_sigma(net)
    assert net.training  # left as it was

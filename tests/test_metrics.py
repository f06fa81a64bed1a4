"""Tests of thunderline_lab.metrics against hand-computed values and tiny trained models."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thunderline_lab.data import Dataset, load_dataset
from thunderline_lab.errors import ConfigError, TrainingError
from thunderline_lab.metrics import (
    accuracy,
    auroc,
    brier,
    calibration_bins,
    ece,
    evaluate,
    fgsm_accuracy,
    fgsm_perturb,
    metric_key,
    nll,
    noise_accuracy,
    ood_auroc,
    predict,
    predictive_entropy,
)

MLFLOW_KEY = re.compile(r"^[A-Za-z0-9_\-./]+$")


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 150) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model


@pytest.fixture(scope="module")
def cancer() -> Dataset:
    return load_dataset("breast_cancer", seed=0)


@pytest.fixture(scope="module")
def linear_cancer(cancer: Dataset) -> nn.Module:
    torch.manual_seed(0)
    return _train(nn.Linear(30, 2), cancer.x_train, cancer.y_train)


# --------------------------------------------------------------------------- accuracy / NLL


def test_accuracy_hand_values() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [1.0, 2.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2, 0, 1])
    assert accuracy(logits, labels) == 0.75
    assert accuracy(logits.softmax(-1), labels) == 0.75  # probs give the same arg-max


def test_nll_matches_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(50, 7, generator=gen)
    labels = torch.randint(0, 7, (50,), generator=gen)
    assert nll(logits, labels) == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-6)
    assert nll(torch.zeros(3, 4), torch.tensor([0, 1, 3])) == pytest.approx(math.log(4))


def test_shape_and_label_checks() -> None:
    with pytest.raises(TrainingError, match="labels"):
        accuracy(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TrainingError, match="integer"):
        nll(torch.zeros(2, 2), torch.tensor([0.0, 1.0]))
    with pytest.raises(TrainingError, match=r"\[0, 2\)"):
        nll(torch.zeros(2, 2), torch.tensor([0, 2]))
    with pytest.raises(TrainingError, match="shape"):
        accuracy(torch.zeros(3), torch.zeros(3, dtype=torch.long))


# --------------------------------------------------------------------------- calibration


def test_ece_of_calibrated_toy_is_zero() -> None:
    # 10 samples at confidence 0.8 (8 right) and 10 at 0.6 (6 right): calibrated bin by bin
    probs = torch.tensor([[0.8, 0.2]] * 10 + [[0.4, 0.6]] * 10)
    labels = torch.tensor([0] * 8 + [1] * 2 + [1] * 6 + [0] * 4)
    assert ece(probs, labels) == pytest.approx(0.0, abs=1e-7)


def test_ece_of_sampled_calibrated_predictions_is_small() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(2 * torch.randn(20000, 3, generator=gen), dim=1)
    labels = torch.multinomial(probs, 1, generator=gen).squeeze(1)  # y ~ p: calibrated
    assert ece(probs, labels) < 0.02
    # the same predictions made over-confident are clearly miscalibrated
    sharp = torch.softmax(4 * torch.log(probs), dim=1)
    assert ece(sharp, labels) > 0.1


def test_ece_hand_computed_over_confident() -> None:
    # bin (0.8667, 0.9333]: 4 samples at confidence 0.9, 2 right -> |0.5 - 0.9| = 0.4
    # bin (0.6667, 0.7333]: 6 samples at confidence 0.7, 4 right -> |4/6 - 0.7| = 1/30
    # ECE = 0.4 * 0.4 + 0.6 * (1/30) = 0.18
    probs = torch.tensor([[0.9, 0.05, 0.05]] * 4 + [[0.1, 0.7, 0.2]] * 6)
    labels = torch.tensor([0, 0, 1, 2, 1, 1, 1, 1, 0, 2])
    assert ece(probs, labels) == pytest.approx(0.18, abs=1e-6)
    # one bin holding everything: |acc - mean conf| = |0.6 - 0.78| = 0.18 too
    assert ece(probs, labels, n_bins=1) == pytest.approx(abs(0.6 - 0.78), abs=1e-6)
    bins = calibration_bins(probs, labels, n_bins=15)
    assert bins["count"].sum() == 10
    assert bins["count"][13] == 4 and bins["count"][10] == 6
    assert bins["accuracy"][13] == pytest.approx(0.5)
    assert bins["confidence"][10] == pytest.approx(0.7)
    assert torch.all(bins["upper"] - bins["lower"] > 0)


def test_calibration_rejects_logits_and_bad_bins() -> None:
    logits = torch.tensor([[2.0, 1.0], [0.5, 0.3]])
    with pytest.raises(TrainingError, match="sum to 1"):
        ece(logits, torch.tensor([0, 1]))
    with pytest.raises(TrainingError, match="non-negative"):
        brier(torch.tensor([[1.5, -0.5]]), torch.tensor([0]))
    with pytest.raises(ConfigError, match="n_bins"):
        ece(logits.softmax(-1), torch.tensor([0, 1]), n_bins=0)


def test_brier_hand_values() -> None:
    labels = torch.tensor([0, 2, 1])
    onehot = F.one_hot(labels, 3).float()
    assert brier(onehot, labels) == 0.0
    wrong = F.one_hot(torch.tensor([1, 0, 2]), 3).float()
    assert brier(wrong, labels) == pytest.approx(2.0)
    assert brier(torch.full((2, 2), 0.5), torch.tensor([0, 1])) == pytest.approx(0.5)
    # (0.3² + 0.2² + 0.1²) for one sample: p = (0.7, 0.2, 0.1), y = 0
    assert brier(torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([0])) == pytest.approx(0.14)


def test_predictive_entropy_hand_values() -> None:
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25] * 4, [0.5, 0.5, 0.0, 0.0]])
    h = predictive_entropy(probs)
    assert h.shape == (3,)
    assert h.tolist() == pytest.approx([0.0, math.log(4), math.log(2)])


def test_auroc_hand_values() -> None:
    low, high = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.7])
    assert auroc(low, high) == 1.0  # perfectly separable
    assert auroc(high, low) == 0.0
    assert auroc(torch.ones(4), torch.ones(3)) == 0.5
    # one of the 2 * 2 pairs mis-ordered -> 0.75
    assert auroc(torch.tensor([0.1, 0.6]), torch.tensor([0.5, 0.7])) == pytest.approx(0.75)
    with pytest.raises(TrainingError, match="at least one"):
        auroc(torch.tensor([]), torch.tensor([1.0]))


# --------------------------------------------------------------------------- model metrics


def test_predict_restores_mode_and_checks_output() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    model.train()
    x = torch.randn(10, 4)
    a, b = predict(model, x, batch_size=3), predict(model, x)
    assert torch.allclose(a, b, atol=1e-6)  # eval mode: dropout off, batching irrelevant
    assert torch.equal(predict(model, x), b)
    assert model.training and all(m.training for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), b)

    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((x.shape[0], 2), float("nan"))

    with pytest.raises(TrainingError, match="non-finite"):
        predict(Broken(), x)


def test_noise_accuracy_seeded(cancer: Dataset, linear_cancer: nn.Module) -> None:
    x, y = cancer.x_test, cancer.y_test
    clean = accuracy(predict(linear_cancer, x), y)
    assert noise_accuracy(linear_cancer, x, y, 0.0) == clean
    a = noise_accuracy(linear_cancer, x, y, 1.0, seed=3)
    assert a == noise_accuracy(linear_cancer, x, y, 1.0, seed=3)
    others = {noise_accuracy(linear_cancer, x, y, 1.0, seed=s) for s in range(4, 9)}
    assert len(others | {a}) > 1  # the seed changes the noise
    # heavy noise pushes accuracy towards chance
    assert noise_accuracy(linear_cancer, x, y, 50.0, seed=0) < clean - 0.15
    with pytest.raises(ConfigError, match="sigma"):
        noise_accuracy(linear_cancer, x, y, -0.1)


def test_fgsm_on_trained_linear_model(cancer: Dataset, linear_cancer: nn.Module) -> None:
    x, y = cancer.x_test, cancer.y_test
    clean = accuracy(predict(linear_cancer, x), y)
    assert clean > 0.9
    assert fgsm_accuracy(linear_cancer, x, y, 0.0) == clean
    accs = [fgsm_accuracy(linear_cancer, x, y, eps) for eps in (0.05, 0.2, 0.5)]
    assert accs[0] <= clean
    assert accs[0] >= accs[1] >= accs[2]
    assert accs[2] < clean - 0.3
    # the attack is much stronger than random sign noise of the same size
    gen = torch.Generator().manual_seed(0)
    rand = x + 0.2 * torch.randint(0, 2, x.shape, generator=gen).float().mul(2).sub(1)
    assert accs[1] < accuracy(predict(linear_cancer, rand), y) - 0.1
    # parameters' .grad untouched
    assert all(p.grad is None for p in linear_cancer.parameters())


def test_fgsm_perturbation_is_the_signed_gradient() -> None:
    # for a linear model W x, the input gradient of CE has a closed form: W^T (p - onehot)
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [-1.0, 1.0, 0.0]]))
        model.bias.zero_()
    x, y = torch.tensor([[0.2, 0.1, -0.3], [1.0, 0.0, 1.0]]), torch.tensor([0, 1])
    p = torch.softmax(model(x), dim=1).detach()
    grad = (p - F.one_hot(y, 2).float()) @ model.weight.detach()
    adv = fgsm_perturb(model, x, y, 0.1)
    assert torch.allclose(adv, x + 0.1 * grad.sign())
    assert float((adv - x).abs().max()) == pytest.approx(0.1)
    clipped = fgsm_perturb(model, x, y, 5.0, clamp=(-1.0, 1.0))
    assert float(clipped.abs().max()) <= 1.0
    with pytest.raises(ConfigError, match="eps"):
        fgsm_perturb(model, x, y, -0.1)


class _DistanceAware(nn.Module):
    """Confident near the origin, uncertain far away (or the reverse)."""

    def __init__(self, reverse: bool = False) -> None:
        super().__init__()
        self.reverse = reverse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r2 = (x**2).sum(dim=1)
        s = r2 if self.reverse else 10.0 / (1.0 + r2)
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def test_ood_auroc_perfect_separation() -> None:
    gen = torch.Generator().manual_seed(0)
    x_in = 0.5 * torch.rand(50, 2, generator=gen)
    angle = 2 * math.pi * torch.rand(40, generator=gen)
    x_ood = 5 * torch.stack([angle.cos(), angle.sin()], dim=1)
    assert ood_auroc(_DistanceAware(), x_in, x_ood) == 1.0
    assert ood_auroc(_DistanceAware(reverse=True), x_in, x_ood) == 0.0


# --------------------------------------------------------------------------- evaluate


def test_metric_key_is_mlflow_safe() -> None:
    assert metric_key("noise_acc", 0.1) == "noise_acc_0.1"
    assert metric_key("fgsm_acc", 0.05) == "fgsm_acc_0.05"
    assert metric_key("fgsm_acc", 1e-5) == "fgsm_acc_1e-05"
    with pytest.raises(ConfigError):
        metric_key("noise acc", 0.1)


def test_evaluate_on_moons_with_ood() -> None:
    ds = load_dataset("moons", seed=0)
    torch.manual_seed(0)
    model = _train(
        nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 2)), ds.x_train, ds.y_train
    )
    model.train()
    m = evaluate(model, ds)
    expected = {
        "train_accuracy",
        "val_accuracy",
        "test_accuracy",
        "generalization_gap",
        "train_nll",
        "val_nll",
        "test_nll",
        "val_ece",
        "test_ece",
        "val_brier",
        "test_brier",
        "test_entropy_mean",
        "noise_acc_0.1",
        "noise_acc_0.3",
        "fgsm_acc_0.01",
        "fgsm_acc_0.05",
        "fgsm_acc_0.1",
        "ood_auroc",
        "ood_entropy_mean",
    }
    assert set(m) == expected
    for key, value in m.items():
        assert MLFLOW_KEY.match(key), key
        assert type(value) is float and math.isfinite(value), key
    assert m["test_accuracy"] > 0.95
    assert m["generalization_gap"] == pytest.approx(m["train_accuracy"] - m["test_accuracy"])
    for k in ("noise_acc_0.1", "fgsm_acc_0.1"):
        assert 0.0 <= m[k] <= m["test_accuracy"] + 0.05
    assert m["fgsm_acc_0.1"] <= m["fgsm_acc_0.01"]
    assert 0.0 <= m["ood_auroc"] <= 1.0 and 0.0 <= m["test_ece"] <= 1.0
    # consistent with the single metrics, deterministic, and the mode is restored
    logits = predict(model, ds.x_test)
    assert m["test_nll"] == pytest.approx(nll(logits, ds.y_test))
    assert m["test_brier"] == pytest.approx(brier(logits.double().softmax(-1), ds.y_test))
    assert ds.ood is not None
    assert m["ood_auroc"] == pytest.approx(ood_auroc(model, ds.x_test, ds.ood))
    assert m["noise_acc_0.1"] == noise_accuracy(model, ds.x_test, ds.y_test, 0.1, seed=0)
    assert evaluate(model, ds) == m
    assert model.training


def test_evaluate_on_digits_images_without_ood() -> None:
    ds = load_dataset("digits", seed=0, image=True)
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    )
    _train(cnn, ds.x_train, ds.y_train, steps=60)
    m = evaluate(cnn, ds, noise_sigmas=(0.2,), fgsm_eps=(0.1,), fgsm_clamp=(0.0, 1.0))
    assert "ood_auroc" not in m and "ood_entropy_mean" not in m
    assert {"noise_acc_0.2", "fgsm_acc_0.1"} <= set(m)
    assert m["test_accuracy"] > 0.85
    assert m["fgsm_acc_0.1"] < m["test_accuracy"]
    assert all(math.isfinite(v) for v in m.values())
    with pytest.raises(ConfigError, match="twice"):
        evaluate(cnn, ds, noise_sigmas=(0.1, 0.1), fgsm_eps=())


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("n_bins", [2.5, 15.0, True, 0, -3, math.nan, "15", None, 10**12])
def test_n_bins_must_be_an_integer_in_range(n_bins: object) -> None:
    probs, labels = torch.tensor([[0.7, 0.3], [0.4, 0.6]]), torch.tensor([0, 1])
    with pytest.raises(ConfigError, match="n_bins"):
        ece(probs, labels, n_bins=n_bins)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="n_bins"):
        calibration_bins(probs, labels, n_bins=n_bins)  # type: ignore[arg-type]


def test_numpy_integers_are_integers() -> None:
    np = pytest.importorskip("numpy")
    probs, labels = torch.tensor([[0.7, 0.3], [0.4, 0.6]]), torch.tensor([0, 1])
    assert ece(probs, labels, n_bins=np.int64(2)) == ece(probs, labels, n_bins=2)
    model, x = nn.Linear(2, 2), torch.randn(5, 2)
    assert torch.equal(predict(model, x, batch_size=np.int32(2)), predict(model, x))


def test_model_metrics_refuse_coerced_or_malformed_arguments() -> None:
    torch.manual_seed(0)
    model, x, y = nn.Linear(2, 2), torch.randn(6, 2), torch.tensor([0, 1, 0, 1, 0, 1])
    for batch_size in (0, 2.5, True, "4"):
        with pytest.raises(ConfigError, match="batch_size"):
            predict(model, x, batch_size=batch_size)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="batch_size"):
            fgsm_perturb(model, x, y, 0.1, batch_size=batch_size)  # type: ignore[arg-type]
    for seed in (2.5, math.nan, "1", None):
        with pytest.raises(ConfigError, match="seed"):
            noise_accuracy(model, x, y, 0.1, seed=seed)  # type: ignore[arg-type]
    for level in ("0.1", True, math.nan, math.inf, None):
        with pytest.raises(ConfigError, match="sigma"):
            noise_accuracy(model, x, y, level)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="eps"):
            fgsm_perturb(model, x, y, level)  # type: ignore[arg-type]
    for clamp in ((1.0, 0.0), (0.0,), (0.0, math.nan), "01"):
        with pytest.raises(ConfigError, match="clamp"):
            fgsm_perturb(model, x, y, 0.1, clamp=clamp)  # type: ignore[arg-type]
    with pytest.raises(TrainingError, match=r"\[0, 2\)"):
        fgsm_perturb(model, x, torch.tensor([0, 1, 0, 1, 0, 5]), 0.1)
    with pytest.raises(TrainingError, match="floating-point"):
        noise_accuracy(model, torch.ones(6, 2, dtype=torch.long), y, 0.5)
    assert fgsm_perturb(model, torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), 0.1).shape == (
        0,
        2,
    )
    with pytest.raises(TrainingError, match=r"torch\.Tensor"):
        predict(model, [[0.0, 1.0]])  # type: ignore[arg-type]


def test_nan_scores_and_non_tensors_are_refused() -> None:
    labels = torch.tensor([0, 1])
    nan_logits = torch.tensor([[math.nan, 0.0], [0.0, 1.0]])
    with pytest.raises(TrainingError, match="NaN"):
        accuracy(nan_logits, labels)  # argmax would silently pick the NaN
    with pytest.raises(TrainingError, match="NaN"):
        nll(nan_logits, labels)
    with pytest.raises(TrainingError, match=r"\+inf"):
        nll(torch.tensor([[math.inf, 0.0], [0.0, 1.0]]), labels)
    # -inf masks a class: fine unless it is the label's
    assert nll(torch.tensor([[0.0, -math.inf], [0.0, 0.0]]), labels) == pytest.approx(
        math.log(2) / 2
    )
    with pytest.raises(TrainingError, match=r"torch\.Tensor"):
        accuracy([[1.0, 0.0]], labels)  # type: ignore[arg-type]
    with pytest.raises(TrainingError, match=r"labels must be a torch\.Tensor"):
        accuracy(torch.zeros(2, 2), [0, 1])  # type: ignore[arg-type]


def test_auroc_refuses_scores_that_are_not_one_per_sample() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2]])
    with pytest.raises(TrainingError, match=r"shape \(n,\)"):
        auroc(probs, probs)  # flattening would mix samples and classes
    assert auroc(torch.tensor([[0.1], [0.2]]), torch.tensor([[0.5]])) == 1.0  # a column is fine
    with pytest.raises(TrainingError, match="numbers"):
        auroc(["low"], [1.0])  # type: ignore[arg-type]


def test_metric_key_refuses_what_is_not_a_finite_number() -> None:
    for value in (math.nan, math.inf, "0.1", None, True):
        with pytest.raises(ConfigError, match="finite number"):
            metric_key("noise_acc", value)  # type: ignore[arg-type]


def test_evaluate_checks_its_arguments_before_computing_anything() -> None:
    calls = 0

    class Counting(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            return super().forward(x)

    ds = load_dataset("moons", seed=0)
    model = Counting(2, 2)
    bad: list[dict[str, object]] = [
        {"noise_sigmas": 0.1},
        {"noise_sigmas": (0.1, "0.3")},
        {"fgsm_eps": (math.nan,)},
        {"n_bins": 2.5},
        {"seed": 1.5},
        {"batch_size": 0},
        {"fgsm_clamp": (1.0, 0.0)},
    ]
    for kwargs in bad:
        with pytest.raises(ConfigError, match=next(iter(kwargs))):
            evaluate(model, ds, **kwargs)  # type: ignore[arg-type]
    assert calls == 0
    np = pytest.importorskip("numpy")
    m = evaluate(model, ds, noise_sigmas=np.array([0.1]), fgsm_eps=torch.tensor([0.05]))
    assert {"noise_acc_0.1", "fgsm_acc_0.05"} <= set(m)


@pytest.mark.parametrize("labels", [[0, 5], [0, -1]])
def test_accuracy_refuses_labels_outside_the_classes_like_the_other_metrics(labels) -> None:
    y = torch.tensor(labels)
    for metric, scores in ((accuracy, torch.zeros(2, 2)), (nll, torch.zeros(2, 2))):
        with pytest.raises(TrainingError, match=r"labels must lie in \[0, 2\)"):
            metric(scores, y)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m, ds: predict(None, ds.x_test), TrainingError, "model must be a torch.nn.Module"),
        (lambda m, ds: evaluate(None, ds), TrainingError, "model must be a torch.nn.Module"),
        (lambda m, ds: evaluate(m, None), ConfigError, "dataset must be a Dataset"),
        (lambda m, ds: fgsm_perturb(None, ds.x_test, ds.y_test, 0.1), TrainingError, "model must"),
        (
            lambda m, ds: predict(m, torch.zeros(4, 5)),
            TrainingError,
            r"inputs of shape \(4, 5\) \(its first layer takes input width 2, got 5\)",
        ),
        (
            lambda m, ds: fgsm_perturb(m, torch.zeros(4, 5), torch.zeros(4, dtype=torch.long), 0.1),
            TrainingError,
            r"first layer takes input width 2, got 5",
        ),
    ],
)
def test_a_model_or_input_that_does_not_fit_is_refused_by_name(call, error, message) -> None:
    ds = load_dataset("moons", seed=0)
    with pytest.raises(error, match=message):
        call(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)), ds)


def test_a_fault_past_the_first_layer_is_not_blamed_on_the_input_width() -> None:
    # the hint said "its first layer takes input width 2, got 2" for a wrong second layer
    broken = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(TrainingError) as err:
        predict(broken, torch.zeros(4, 2))
    assert "first layer" not in str(err.value)
    assert str(err.value).startswith("the model cannot take inputs of shape (4, 2): ")

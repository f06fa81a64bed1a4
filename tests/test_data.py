"""Tests of thunderline_lab.data: bundled datasets, splits, batching, registry."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_digits

from thunderline_lab import data
from thunderline_lab.data import (
    Dataset,
    available_datasets,
    load_dataset,
    moons_curve_distance,
    register_dataset,
    stratified_split,
)
from thunderline_lab.errors import ConfigError, ThunderlineLabError, TrainingError

TOTALS = {"digits": 1797, "moons": 1000, "breast_cancer": 569, "wine": 178}
SHAPES = {"digits": (64,), "moons": (2,), "breast_cancer": (30,), "wine": (13,)}
CLASSES = {"digits": 10, "moons": 2, "breast_cancer": 2, "wine": 3}


def _splits(ds: Dataset) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    return [
        ("train", ds.x_train, ds.y_train),
        ("val", ds.x_val, ds.y_val),
        ("test", ds.x_test, ds.y_test),
    ]


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", sorted(TOTALS))
def test_shapes_dtypes_and_sizes(name: str) -> None:
    ds = load_dataset(name, seed=0)
    assert ds.name == name
    assert ds.input_shape == SHAPES[name]
    assert ds.n_classes == CLASSES[name]
    assert ds.n_features == math.prod(SHAPES[name])
    total = 0
    for _, x, y in _splits(ds):
        assert x.dtype == torch.float32
        assert y.dtype == torch.int64
        assert tuple(x.shape[1:]) == SHAPES[name]
        assert y.shape == (x.shape[0],)
        assert int(y.min()) >= 0 and int(y.max()) < CLASSES[name]
        assert torch.isfinite(x).all()
        total += x.shape[0]
    assert total == TOTALS[name]
    sizes = ds.sizes
    # 60 / 20 / 20 up to rounding
    assert abs(sizes["train"] - 0.6 * total) <= 2
    assert abs(sizes["val"] - 0.2 * total) <= 2
    assert abs(sizes["test"] - 0.2 * total) <= 2


def test_digits_scaled_and_image_form() -> None:
    flat = load_dataset("digits", seed=3)
    img = load_dataset("digits", seed=3, image=True)
    assert img.input_shape == (1, 8, 8)
    assert tuple(img.x_train.shape[1:]) == (1, 8, 8)
    for _, x, _ in _splits(flat):
        assert float(x.min()) == 0.0 and float(x.max()) <= 1.0
    assert float(flat.x_train.max()) == 1.0  # 16 / 16 occurs
    # the image form is the same data, reshaped; flat() / as_images() round-trip
    assert torch.equal(img.x_train.reshape(-1, 64), flat.x_train)
    assert torch.equal(img.y_test, flat.y_test)
    assert torch.equal(img.flat().x_val, flat.x_val)
    assert flat.flat().input_shape == (64,)
    assert torch.equal(flat.as_images().x_test, img.x_test)
    # pixels really are sklearn's digits / 16, row-for-row
    raw = load_digits()
    tr, _, _ = stratified_split(raw.target, seed=3)
    expect = torch.tensor(raw.data[tr] / 16.0, dtype=torch.float32)
    assert torch.equal(flat.x_train, expect)
    assert torch.equal(flat.y_train, torch.tensor(raw.target[tr]))


def test_reshape_rejects_wrong_size_and_non_images() -> None:
    ds = load_dataset("digits", seed=0)
    assert ds.reshape((8, 8)).input_shape == (8, 8)
    with pytest.raises(ConfigError, match="cannot reshape"):
        ds.reshape((7, 9))
    with pytest.raises(ConfigError, match="not an image dataset"):
        load_dataset("wine", seed=0).as_images()


# --------------------------------------------------------------------------- splits


@pytest.mark.parametrize("name", sorted(TOTALS))
def test_stratified_class_proportions(name: str) -> None:
    ds = load_dataset(name, seed=1)
    y_all = torch.cat([ds.y_train, ds.y_val, ds.y_test])
    overall = torch.bincount(y_all, minlength=ds.n_classes).double() / len(y_all)
    for split, _, y in _splits(ds):
        props = torch.bincount(y, minlength=ds.n_classes).double() / len(y)
        # each class count is within rounding (≤ 2 samples) of its exact share
        tol = 2.0 / len(y)
        assert torch.all((props - overall).abs() <= tol), (split, props, overall)


def test_stratified_split_indices_disjoint_and_covering() -> None:
    y = np.repeat(np.arange(4), [50, 30, 70, 10])
    tr, va, te = stratified_split(y, seed=7, fractions=(0.5, 0.25, 0.25))
    for part in (tr, va, te):
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)  # sorted, unique
    assert not set(tr) & set(va) and not set(tr) & set(te) and not set(va) & set(te)
    assert np.array_equal(np.sort(np.concatenate([tr, va, te])), np.arange(len(y)))
    assert len(tr) == 80 and len(va) == 40 and len(te) == 40
    for c, n_c in enumerate([50, 30, 70, 10]):
        assert abs((y[tr] == c).sum() - n_c / 2) <= 1
        assert abs((y[te] == c).sum() - n_c / 4) <= 1


@pytest.mark.parametrize("name", ["moons", "breast_cancer", "wine"])
def test_no_row_shared_between_splits(name: str) -> None:
    # these sets have no duplicate rows, so a shared row means a leaked sample
    ds = load_dataset(name, seed=0)
    rows = {s: {tuple(r) for r in x.tolist()} for s, x, _ in _splits(ds)}
    assert sum(len(r) for r in rows.values()) == TOTALS[name]
    assert not rows["train"] & rows["val"]
    assert not rows["train"] & rows["test"]
    assert not rows["val"] & rows["test"]


@pytest.mark.parametrize("name", sorted(TOTALS))
def test_deterministic_given_seed(name: str) -> None:
    a = load_dataset(name, seed=5)
    b = load_dataset(name, seed=5)
    c = load_dataset(name, seed=6)
    for (_, xa, ya), (_, xb, yb) in zip(_splits(a), _splits(b), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    if a.ood is not None:
        assert b.ood is not None and torch.equal(a.ood, b.ood)
    assert not torch.equal(a.x_train, c.x_train)


def test_fraction_argument_and_validation() -> None:
    ds = load_dataset("digits", seed=0, fractions=(0.8, 0.1, 0.1))
    assert abs(ds.sizes["train"] - 0.8 * 1797) <= 2
    for bad in [(0.5, 0.5, 0.5), (0.6, 0.4, 0.0), (1.2, -0.1, -0.1)]:
        with pytest.raises(ConfigError, match="fractions"):
            stratified_split(np.array([0, 1] * 20), seed=0, fractions=bad)
    with pytest.raises(ConfigError, match="stratified"):
        stratified_split(np.array([0, 0, 0, 0, 1]), seed=0)


# --------------------------------------------------------------------------- tabular


def test_breast_cancer_standardised_with_train_stats_only() -> None:
    ds = load_dataset("breast_cancer", seed=2)
    raw = load_breast_cancer()
    tr, va, te = stratified_split(raw.target, seed=2)
    mean = raw.data[tr].mean(axis=0)
    std = raw.data[tr].std(axis=0)
    # train split is exactly zero-mean, unit-std (population std)
    assert torch.allclose(
        ds.x_train.double().mean(0), torch.zeros(30, dtype=torch.float64), atol=1e-5
    )
    assert torch.allclose(
        ds.x_train.double().std(0, unbiased=False), torch.ones(30, dtype=torch.float64), atol=1e-4
    )
    # val / test use the *train* statistics, so they are not exactly standardised
    for x, idx in [(ds.x_val, va), (ds.x_test, te)]:
        expect = torch.tensor((raw.data[idx] - mean) / std, dtype=torch.float32)
        assert torch.allclose(x, expect, atol=1e-5)
    assert float(ds.x_val.double().mean(0).abs().max()) > 1e-3
    # statistics computed on all rows would give different val features
    all_mean, all_std = raw.data.mean(axis=0), raw.data.std(axis=0)
    leaky = torch.tensor((raw.data[va] - all_mean) / all_std, dtype=torch.float32)
    assert not torch.allclose(ds.x_val, leaky, atol=1e-3)
    assert np.allclose(ds.meta["train_mean"].numpy(), mean, rtol=1e-5)
    assert np.allclose(ds.meta["train_std"].numpy(), std, rtol=1e-5)
    assert len(ds.meta["feature_names"]) == 30


def test_wine_standardised() -> None:
    ds = load_dataset("wine", seed=0)
    assert torch.allclose(ds.x_train.mean(0), torch.zeros(13), atol=1e-5)
    assert ds.ood is None and ds.image_shape is None


# --------------------------------------------------------------------------- moons / OOD


def test_moons_ood_points_far_from_data() -> None:
    ds = load_dataset("moons", seed=0)
    assert ds.ood is not None
    assert ds.ood.shape == (200, 2) and ds.ood.dtype == torch.float32
    x_in = torch.cat([ds.x_train, ds.x_val, ds.x_test])
    # in-distribution points hug the curves, OOD points keep the margin
    assert moons_curve_distance(x_in).max() < 0.6
    assert moons_curve_distance(ds.ood).min() >= 1.0 - 1e-3
    assert float(torch.cdist(ds.ood, x_in).min()) > 0.4
    # sampled from the box around the moons, and spread out (not one cluster)
    assert float(ds.ood.abs().max()) <= 3.6
    assert float(ds.ood.std(0).min()) > 1.0
    # both classes present in every split
    for _, _, y in _splits(ds):
        assert set(y.tolist()) == {0, 1}


def test_moons_options() -> None:
    ds = load_dataset("moons", seed=1, n_samples=300, n_ood=50, ood_margin=1.5)
    assert sum(ds.sizes[s] for s in ("train", "val", "test")) == 300
    assert ds.ood is not None and ds.ood.shape == (50, 2)
    assert moons_curve_distance(ds.ood).min() >= 1.5 - 1e-3
    with pytest.raises(ConfigError, match="too small"):
        load_dataset("moons", seed=0, ood_margin=2.0, ood_box=1.0)
    with pytest.raises(ConfigError, match="n_samples"):
        load_dataset("moons", seed=0, n_samples=5)


def test_moons_curve_distance_hand_values() -> None:
    # outer curve: upper unit half circle around (0, 0);
    # inner curve: lower unit half circle around (1, 0.5)
    pts = np.array([[1.0, 0.0], [1.0, -0.5], [0.0, 0.0], [0.5, 0.25], [0.0, 3.0]])
    d = moons_curve_distance(pts)
    assert d[0] == pytest.approx(0.0, abs=1e-3)  # on the outer curve
    assert d[1] == pytest.approx(0.0, abs=1e-3)  # on the inner curve
    assert d[2] == pytest.approx(math.sqrt(1.25) - 1.0, abs=1e-3)  # inner circle radius
    assert d[3] == pytest.approx(1.0 - math.sqrt(0.3125), abs=1e-3)  # between both
    assert d[4] == pytest.approx(2.0, abs=1e-3)  # above the outer circle's top


# --------------------------------------------------------------------------- batching


def test_loader_epoch_covers_train_once_and_is_deterministic() -> None:
    ds = load_dataset("wine", seed=0)
    loader = ds.loader(batch_size=32, seed=4)
    assert len(loader) == math.ceil(len(ds.y_train) / 32)
    epoch0 = list(loader)
    epoch1 = list(loader)
    assert loader.epoch == 2
    assert [len(yb) for _, yb in epoch0][:-1] == [32] * (len(epoch0) - 1)
    xs = torch.cat([xb for xb, _ in epoch0])
    ys = torch.cat([yb for _, yb in epoch0])
    # a permutation of the train split: same multiset of rows, not the original order
    got = sorted(map(tuple, torch.cat([xs, ys[:, None].float()], 1).tolist()))
    want = sorted(map(tuple, torch.cat([ds.x_train, ds.y_train[:, None].float()], 1).tolist()))
    assert got == want
    assert not torch.equal(xs, ds.x_train)
    # epochs differ; a fresh loader with the same seed replays the same sequence
    assert not torch.equal(xs, torch.cat([xb for xb, _ in epoch1]))
    again = ds.loader(batch_size=32, seed=4)
    for (xa, ya), (xb, yb) in zip(epoch0, again, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = torch.cat([xb for xb, _ in ds.loader(batch_size=32, seed=5)])
    assert not torch.equal(xs, other)
    # batches(seed, epoch) is the same stream as the loader's epoch
    for (xa, _), (xb, _) in zip(epoch1, ds.batches(32, seed=4, epoch=1), strict=True):
        assert torch.equal(xa, xb)


def test_loaders_and_options() -> None:
    ds = load_dataset("digits", seed=0, image=True)
    train, val, test = ds.loaders(100, seed=0)
    assert train.shuffle and not val.shuffle and not test.shuffle
    xb, yb = next(iter(train))
    assert xb.shape == (100, 1, 8, 8) and yb.shape == (100,)
    assert torch.equal(torch.cat([x for x, _ in val]), ds.x_val)  # in order
    dl = ds.loader(100, seed=0, drop_last=True)
    assert len(dl) == len(ds.y_train) // 100
    assert all(len(y) == 100 for _, y in dl)
    for bad in (0, -3):
        with pytest.raises(ConfigError, match="batch_size"):
            ds.loader(bad)
    with pytest.raises(ConfigError, match="unknown split"):
        ds.split("holdout")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- dataset checks


def test_dataset_validation_rejects_bad_tensors() -> None:
    good = load_dataset("wine", seed=0)
    with pytest.raises(TrainingError, match="float32"):
        replace(good, x_train=good.x_train.double())
    with pytest.raises(TrainingError, match="labels outside"):
        replace(good, y_val=good.y_val + 5)
    with pytest.raises(TrainingError, match="input_shape"):
        replace(good, input_shape=(12,))
    with pytest.raises(TrainingError, match="y_test"):
        replace(good, y_test=good.y_test[:-1])
    assert issubclass(TrainingError, ThunderlineLabError)


# --------------------------------------------------------------------------- registry


def test_registry_lists_defaults() -> None:
    names = available_datasets()
    assert names == sorted(names)
    assert {"digits", "moons", "breast_cancer", "wine"} <= set(names)


def test_unknown_dataset_names_it_and_the_available_ones() -> None:
    with pytest.raises(ConfigError) as info:
        load_dataset("cifar10", seed=0)
    msg = str(info.value)
    assert "cifar10" in msg
    for name in ("digits", "moons", "breast_cancer", "wine"):
        assert name in msg


def test_unknown_option_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="digits"):
        load_dataset("digits", seed=0, colour=True)


def test_register_custom_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "_REGISTRY", dict(data._REGISTRY))
    calls: list[int] = []

    def tiny(seed: int = 0, scale: float = 1.0) -> Dataset:
        calls.append(seed)
        ds = load_dataset("wine", seed=seed)
        return replace(ds, name="tiny", x_train=ds.x_train * scale)

    register_dataset("tiny", tiny)
    assert "tiny" in available_datasets()
    ds = load_dataset("tiny", seed=9, scale=2.0)
    assert ds.name == "tiny" and calls == [9]
    with pytest.raises(ConfigError, match="already registered"):
        register_dataset("tiny", tiny)
    register_dataset("tiny", lambda seed=0: load_dataset("wine", seed=seed), overwrite=True)
    assert load_dataset("tiny", seed=0).name == "wine"
    with pytest.raises(ConfigError, match="non-empty"):
        register_dataset("", tiny)
    with pytest.raises(ConfigError, match="not callable"):
        register_dataset("x", 3)  # type: ignore[arg-type]
    register_dataset("broken", lambda seed=0: "nope", overwrite=True)  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigError, match="not a Dataset"):
        load_dataset("broken")


@pytest.mark.parametrize("name", ["digits", "moons", "wine"])
@pytest.mark.parametrize("seed", [1.5, "0", None, True])
def test_a_seed_that_is_not_an_integer_is_refused(name: str, seed: object) -> None:
    # 1.5 used to be truncated to seed 1 (a different split than the one recorded in meta)
    with pytest.raises(ConfigError, match=r"seed must be an integer, got"):
        load_dataset(name, seed=seed)  # type: ignore[arg-type]


def test_numpy_integer_seeds_are_accepted() -> None:
    a, b = load_dataset("wine", seed=np.int64(3)), load_dataset("wine", seed=3)
    assert torch.equal(a.x_train, b.x_train)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("n_samples", 1500.0),
        ("n_samples", "100"),
        ("n_ood", 2.5),
        ("n_ood", -1),
        ("noise", math.nan),
        ("noise", math.inf),
        ("noise", "0.1"),
        ("ood_margin", math.nan),
        ("ood_box", math.inf),
    ],
)
def test_bad_moons_options_are_config_errors_naming_the_option(option: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"moons {option} must be"):
        load_dataset("moons", seed=0, **{option: value})


@pytest.mark.parametrize("batch_size", [2.5, "8", None, True])
def test_loader_refuses_a_batch_size_that_is_not_an_integer(batch_size: object) -> None:
    ds = load_dataset("wine", seed=0)
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        ds.loader(batch_size)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "y", [np.zeros((10, 2), dtype=int), np.zeros((10, 1), dtype=int), None, np.int64(3)]
)
def test_stratified_split_refuses_labels_that_are_not_one_per_sample(y: object) -> None:
    with pytest.raises(ConfigError, match="y must be a 1-D array of class labels"):
        stratified_split(y)  # type: ignore[arg-type]


@pytest.mark.parametrize("image", ["no", 1, 0, None])
def test_the_digits_image_flag_must_be_a_bool(image: object) -> None:
    with pytest.raises(ConfigError, match="image must be True or False"):
        load_dataset("digits", seed=0, image=image)

"""Bundled datasets for the workbench: small, offline, seeded and fast.

Every dataset here is built from data that ships with scikit-learn (no downloads
ever happen) and is split into stratified train / validation / test parts that
are a pure function of ``seed``. Tensors are ``float32`` features and ``int64``
labels, ready for a plain PyTorch training loop.

Datasets in the default registry:

``digits``
    sklearn's 8×8 handwritten digits (1797 images, 10 classes), pixels scaled to
    ``[0, 1]``. Flat ``(64,)`` by default; ``image=True`` gives ``(1, 8, 8)``.
``moons``
    Two interleaving half circles (``make_moons``, noise 0.1, 2 classes) plus an
    ``ood`` tensor of points sampled from a box around the data but at least
    ``ood_margin`` away from both moon curves, for distance-awareness studies.
``breast_cancer``
    sklearn's Wisconsin breast-cancer table (569 rows, 30 features, 2 classes),
    standardised with the mean and std of the *training* split only.
``wine``
    sklearn's wine table (178 rows, 13 features, 3 classes), standardised the
    same way.

Example:
    >>> ds = load_dataset("digits", seed=0)
    >>> ds.input_shape, ds.n_classes, len(ds.x_train)
    ((64,), 10, 1077)
    >>> xb, yb = next(iter(ds.loader(batch_size=32, seed=0)))
    >>> tuple(xb.shape), yb.dtype
    ((32, 64), torch.int64)
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_digits, load_wine, make_moons
from sklearn.model_selection import train_test_split

from thunderline_lab.errors import ConfigError, TrainingError

__all__ = [
    "DEFAULT_FRACTIONS",
    "BatchLoader",
    "Dataset",
    "DatasetLoader",
    "Split",
    "available_datasets",
    "load_breast_cancer_dataset",
    "load_dataset",
    "load_digits_dataset",
    "load_moons_dataset",
    "load_wine_dataset",
    "moons_curve_distance",
    "register_dataset",
    "stratified_split",
]

Split = Literal["train", "val", "test"]
"""Name of one of the three splits of a :class:`Dataset`."""

DEFAULT_FRACTIONS: tuple[float, float, float] = (0.6, 0.2, 0.2)
"""Default train / validation / test fractions."""

_SPLITS: tuple[Split, ...] = ("train", "val", "test")


# --------------------------------------------------------------------------- batching


def _check_seed(seed: Any) -> int:
    """``seed`` as a Python int; anything else is refused rather than coerced.

    ``int(1.5)`` would silently give seed 1's split while ``meta`` records 1.5, and ``"0"``
    or ``True`` are typos for a number, not seeds.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    return int(seed)


def _check_count(what: str, value: Any, minimum: int) -> int:
    """A count such as ``batch_size`` or ``n_samples``: an integer ≥ ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_flag(what: str, value: Any) -> bool:
    """A yes/no option: ``"no"`` or ``0`` would pass as truthy or falsy by accident."""
    if not isinstance(value, bool | np.bool_):
        raise ConfigError(f"{what} must be True or False, got {value!r}")
    return bool(value)


def _check_real(what: str, value: Any, *, positive: bool = False) -> float:
    """A finite real ≥ 0 (> 0 if ``positive``)."""
    number = float(value) if isinstance(value, numbers.Real) else math.nan
    ok = (
        not isinstance(value, bool)
        and math.isfinite(number)
        and (number > 0 if positive else number >= 0)
    )
    if not ok:
        rule = "> 0" if positive else ">= 0"
        raise ConfigError(f"{what} must be a finite number {rule}, got {value!r}")
    return number


def _mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed derived from integer parts (stable across runs)."""
    state = np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def _iter_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    drop_last: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    n = x.shape[0]
    if shuffle:
        gen = torch.Generator().manual_seed(_mix_seed(seed, epoch))
        order: torch.Tensor | None = torch.randperm(n, generator=gen)
    else:
        order = None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            yield x[start : start + batch_size], y[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]


@dataclass
class BatchLoader:
    """A re-iterable, deterministic mini-batch loader over one split.

    Each full iteration is one epoch. With ``shuffle=True`` epoch ``e`` uses a
    permutation seeded by ``(seed, e)``, so a fresh loader with the same seed
    reproduces the exact batch sequence, and successive epochs differ. Pure
    tensor indexing: far cheaper than ``torch.utils.data.DataLoader`` for tiny
    inputs such as 8×8 digits.

    Attributes:
        x: Features of the split.
        y: Labels of the split.
        batch_size: Samples per batch (the last batch may be smaller).
        seed: Shuffling seed.
        shuffle: Whether to permute samples every epoch.
        drop_last: Drop a final incomplete batch.
        epoch: Index of the next epoch to be produced (advanced by ``__iter__``).

    Example:
        >>> ds = load_dataset("moons", seed=0)
        >>> loader = ds.loader(batch_size=64, seed=1)
        >>> for epoch in range(2):
        ...     for xb, yb in loader:
        ...         pass
        >>> loader.epoch
        2
    """

    x: torch.Tensor
    y: torch.Tensor
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False
    epoch: int = 0

    def __post_init__(self) -> None:
        # no int() coercion: 2.5 would become 2 and "8" would be accepted
        batch_size: Any = self.batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = int(batch_size)
        self.seed = _check_seed(self.seed)

    def __len__(self) -> int:
        n = self.x.shape[0]
        if self.drop_last:
            return n // self.batch_size
        return math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        return _iter_batches(
            self.x,
            self.y,
            self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=epoch,
            drop_last=self.drop_last,
        )


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset split into train / validation / test tensors.

    Features are ``float32`` with per-sample shape ``input_shape``; labels are
    ``int64`` in ``[0, n_classes)``. Construction checks this and raises
    :class:`~thunderline_lab.errors.TrainingError` on malformed data.

    Attributes:
        name: Registry name (``"digits"``, ``"moons"``, ...).
        x_train: Training features, shape ``(n_train, *input_shape)``.
        y_train: Training labels, shape ``(n_train,)``.
        x_val: Validation features.
        y_val: Validation labels.
        x_test: Test features.
        y_test: Test labels.
        input_shape: Shape of one sample, e.g. ``(64,)`` or ``(1, 8, 8)``.
        n_classes: Number of classes.
        ood: Optional out-of-distribution inputs (no labels), same per-sample shape.
        image_shape: Per-sample image shape if the data are images (enables
            :meth:`as_images`), else ``None``.
        meta: Extra facts (seed, fractions, standardisation stats, feature names).

    Instances are frozen and compare by identity (tensors have no single truth value).

    Example:
        >>> ds = load_dataset("digits", seed=0, image=True)
        >>> ds.input_shape, tuple(ds.x_test.shape)
        ((1, 8, 8), (360, 1, 8, 8))
        >>> ds.flat().input_shape
        (64,)
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    input_shape: tuple[int, ...]
    n_classes: int
    ood: torch.Tensor | None = None
    image_shape: tuple[int, ...] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        if self.image_shape is not None:
            object.__setattr__(self, "image_shape", tuple(int(d) for d in self.image_shape))
        object.__setattr__(self, "meta", dict(self.meta))
        self._validate()

    def _validate(self) -> None:
        problems: list[str] = []
        if self.n_classes < 2:
            problems.append(f"n_classes must be >= 2, got {self.n_classes}")
        for split in _SPLITS:
            x, y = self.split(split)
            if x.dtype != torch.float32:
                problems.append(f"x_{split} must be float32, got {x.dtype}")
            if y.dtype != torch.int64:
                problems.append(f"y_{split} must be int64, got {y.dtype}")
            if tuple(x.shape[1:]) != self.input_shape:
                problems.append(
                    f"x_{split} has sample shape {tuple(x.shape[1:])}, "
                    f"expected input_shape {self.input_shape}"
                )
            if y.ndim != 1 or y.shape[0] != x.shape[0]:
                problems.append(
                    f"y_{split} must be 1-D with {x.shape[0]} labels, got shape {tuple(y.shape)}"
                )
            if x.shape[0] == 0:
                problems.append(f"split {split!r} is empty")
            elif y.ndim == 1 and (int(y.min()) < 0 or int(y.max()) >= self.n_classes):
                problems.append(f"y_{split} has labels outside [0, {self.n_classes})")
            if x.numel() and not bool(torch.isfinite(x).all()):
                problems.append(f"x_{split} contains non-finite values")
        if self.ood is not None:
            if self.ood.dtype != torch.float32:
                problems.append(f"ood must be float32, got {self.ood.dtype}")
            if tuple(self.ood.shape[1:]) != self.input_shape:
                problems.append(
                    f"ood has sample shape {tuple(self.ood.shape[1:])}, "
                    f"expected input_shape {self.input_shape}"
                )
        if self.image_shape is not None and math.prod(self.image_shape) != math.prod(
            self.input_shape
        ):
            problems.append(
                f"image_shape {self.image_shape} does not match input_shape {self.input_shape}"
            )
        if problems:
            raise TrainingError(f"dataset {self.name!r} is malformed: " + "; ".join(problems))

    # -- access ----------------------------------------------------------------

    def split(self, which: Split) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and labels of one split.

        Args:
            which: ``"train"``, ``"val"`` or ``"test"``.

        Returns:
            ``(x, y)`` for that split.

        Raises:
            ConfigError: ``which`` is not a split name.

        Example:
            >>> x, y = load_dataset("wine", seed=0).split("val")
            >>> x.shape[0] == y.shape[0]
            True
        """
        if which == "train":
            return self.x_train, self.y_train
        if which == "val":
            return self.x_val, self.y_val
        if which == "test":
            return self.x_test, self.y_test
        raise ConfigError(f"unknown split {which!r}; expected one of {list(_SPLITS)}")

    @property
    def sizes(self) -> dict[str, int]:
        """Number of samples per split (and ``ood`` when present).

        Example:
            >>> load_dataset("moons", seed=0).sizes
            {'train': 600, 'val': 200, 'test': 200, 'ood': 200}
        """
        out: dict[str, int] = {s: int(self.split(s)[0].shape[0]) for s in _SPLITS}
        if self.ood is not None:
            out["ood"] = int(self.ood.shape[0])
        return out

    @property
    def n_features(self) -> int:
        """Number of scalar inputs per sample (product of ``input_shape``)."""
        return math.prod(self.input_shape)

    # -- shape variants --------------------------------------------------------

    def reshape(self, input_shape: tuple[int, ...]) -> Dataset:
        """The same data with every sample reshaped to ``input_shape``.

        Args:
            input_shape: New per-sample shape with the same number of elements.

        Returns:
            A new :class:`Dataset` (tensors are views where possible).

        Raises:
            ConfigError: The element count differs.

        Example:
            >>> load_dataset("digits", seed=0).reshape((8, 8)).input_shape
            (8, 8)
        """
        shape = tuple(int(d) for d in input_shape)
        if math.prod(shape) != self.n_features:
            raise ConfigError(
                f"cannot reshape dataset {self.name!r} from {self.input_shape} to {shape}"
            )

        def r(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], *shape)

        return replace(
            self,
            x_train=r(self.x_train),
            x_val=r(self.x_val),
            x_test=r(self.x_test),
            ood=None if self.ood is None else r(self.ood),
            input_shape=shape,
        )

    def flat(self) -> Dataset:
        """The same data with flat ``(n_features,)`` samples (for MLPs).

        Example:
            >>> load_dataset("digits", seed=0, image=True).flat().input_shape
            (64,)
        """
        return self.reshape((self.n_features,))

    def as_images(self) -> Dataset:
        """The same data with image-shaped ``(C, H, W)`` samples (for CNNs).

        Raises:
            ConfigError: The dataset is not an image dataset.

        Example:
            >>> load_dataset("digits", seed=0).as_images().input_shape
            (1, 8, 8)
        """
        if self.image_shape is None:
            raise ConfigError(f"dataset {self.name!r} is not an image dataset")
        return self.reshape(self.image_shape)

    # -- batching --------------------------------------------------------------

    def loader(
        self,
        batch_size: int,
        seed: int = 0,
        *,
        split: Split = "train",
        shuffle: bool | None = None,
        drop_last: bool = False,
    ) -> BatchLoader:
        """A deterministic, re-iterable mini-batch loader over one split.

        Args:
            batch_size: Samples per batch.
            seed: Shuffling seed (epoch ``e`` is permuted with ``(seed, e)``).
            split: Which split to iterate.
            shuffle: Permute each epoch; defaults to ``True`` for ``"train"`` only.
            drop_last: Drop a final incomplete batch.

        Returns:
            A :class:`BatchLoader`; iterate it once per epoch.

        Example:
            >>> ds = load_dataset("wine", seed=0)
            >>> len(ds.loader(batch_size=32))
            4
        """
        x, y = self.split(split)
        return BatchLoader(
            x,
            y,
            batch_size,
            seed=seed,
            shuffle=(split == "train") if shuffle is None else shuffle,
            drop_last=drop_last,
        )

    def loaders(
        self, batch_size: int, seed: int = 0
    ) -> tuple[BatchLoader, BatchLoader, BatchLoader]:
        """Train (shuffled), validation and test (in order) loaders.

        Args:
            batch_size: Samples per batch for all three loaders.
            seed: Shuffling seed of the training loader.

        Returns:
            ``(train_loader, val_loader, test_loader)``.

        Example:
            >>> train, val, test = load_dataset("digits", seed=0).loaders(128, seed=0)
            >>> train.shuffle, val.shuffle
            (True, False)
        """
        return (
            self.loader(batch_size, seed, split="train"),
            self.loader(batch_size, seed, split="val"),
            self.loader(batch_size, seed, split="test"),
        )

    def batches(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        epoch: int = 0,
        split: Split = "train",
        shuffle: bool | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches of one epoch, a pure function of ``(seed, epoch)``.

        Args:
            batch_size: Samples per batch.
            seed: Shuffling seed.
            epoch: Epoch index; each epoch gets its own permutation.
            split: Which split to iterate.
            shuffle: Permute samples; defaults to ``True`` for ``"train"`` only.
            drop_last: Drop a final incomplete batch.

        Yields:
            ``(x_batch, y_batch)`` tuples.

        Example:
            >>> ds = load_dataset("moons", seed=0)
            >>> a = [yb for _, yb in ds.batches(100, seed=3, epoch=5)]
            >>> b = [yb for _, yb in ds.batches(100, seed=3, epoch=5)]
            >>> all(torch.equal(u, v) for u, v in zip(a, b))
            True
        """
        loader = self.loader(batch_size, seed, split=split, shuffle=shuffle, drop_last=drop_last)
        loader.epoch = epoch
        return iter(loader)

    def to(self, device: torch.device | str) -> Dataset:
        """A copy with every tensor moved to ``device``.

        Example:
            >>> load_dataset("wine", seed=0).to("cpu").x_train.device.type
            'cpu'
        """
        return replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_val=self.x_val.to(device),
            y_val=self.y_val.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
            ood=None if self.ood is None else self.ood.to(device),
        )


# --------------------------------------------------------------------------- splitting


def _check_fractions(fractions: tuple[float, float, float]) -> tuple[float, float, float]:
    try:
        f = tuple(float(v) for v in fractions)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"fractions must be three numbers, got {fractions!r}") from exc
    if len(f) != 3 or any(not math.isfinite(v) or v <= 0 for v in f):
        raise ConfigError(f"fractions must be three positive numbers, got {fractions!r}")
    if abs(sum(f) - 1.0) > 1e-6:
        raise ConfigError(f"fractions must sum to 1, got {fractions!r} (sum {sum(f):g})")
    return f[0], f[1], f[2]


def stratified_split(
    y: np.ndarray | torch.Tensor,
    seed: int = 0,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded stratified train / validation / test indices.

    Class proportions in each part match the whole within rounding. The result
    is a pure function of ``(y, seed, fractions)``; the three index arrays are
    disjoint and together cover ``range(len(y))``.

    Args:
        y: Integer class labels.
        seed: Random seed.
        fractions: Train, validation and test fractions (positive, sum to 1).

    Returns:
        ``(train_idx, val_idx, test_idx)`` as sorted ``int64`` arrays.

    Raises:
        ConfigError: ``y`` not 1-D, bad fractions or seed, or too few samples of some class
            to stratify.

    Example:
        >>> tr, va, te = stratified_split(np.array([0, 1] * 50), seed=0)
        >>> len(tr), len(va), len(te)
        (60, 20, 20)
    """
    seed = _check_seed(seed)
    f_train, f_val, f_test = _check_fractions(fractions)
    labels = np.asarray(y.cpu().numpy() if isinstance(y, torch.Tensor) else y)
    if y is None or labels.ndim != 1:  # flattening (n, k) labels would split n*k "samples"
        raise ConfigError(
            f"y must be a 1-D array of class labels (one per sample), got "
            f"{type(y).__name__} of shape {labels.shape}"
        )
    idx = np.arange(labels.shape[0])
    rs = _mix_seed(seed) % (2**32)
    try:
        rest, test = train_test_split(
            idx, test_size=f_test, random_state=rs, stratify=labels, shuffle=True
        )
        train, val = train_test_split(
            rest,
            test_size=f_val / (f_train + f_val),
            random_state=(rs + 1) % (2**32),
            stratify=labels[rest],
            shuffle=True,
        )
    except ValueError as exc:
        raise ConfigError(f"cannot make a stratified split {fractions!r}: {exc}") from exc
    return (
        np.sort(train).astype(np.int64),
        np.sort(val).astype(np.int64),
        np.sort(test).astype(np.int64),
    )


def _split_dataset(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int,
    fractions: tuple[float, float, float],
    n_classes: int,
    standardize: bool = False,
    image_shape: tuple[int, ...] | None = None,
    ood: np.ndarray | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Dataset:
    """Split numpy arrays, optionally standardise with train statistics, wrap as tensors."""
    tr, va, te = stratified_split(y, seed=seed, fractions=fractions)
    x = np.asarray(x, dtype=np.float64)
    info: dict[str, Any] = {"seed": seed, "fractions": tuple(fractions), **(meta or {})}
    if standardize:
        mean = x[tr].mean(axis=0)
        std = x[tr].std(axis=0)
        std = np.where(std > 1e-12, std, 1.0)
        x = (x - mean) / std
        info["train_mean"] = torch.from_numpy(mean.astype(np.float32))
        info["train_std"] = torch.from_numpy(std.astype(np.float32))
        if ood is not None:
            ood = (np.asarray(ood, dtype=np.float64) - mean) / std

    def xt(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    def yt(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))

    y = np.asarray(y)
    return Dataset(
        name=name,
        x_train=xt(x[tr]),
        y_train=yt(y[tr]),
        x_val=xt(x[va]),
        y_val=yt(y[va]),
        x_test=xt(x[te]),
        y_test=yt(y[te]),
        input_shape=tuple(x.shape[1:]),
        n_classes=n_classes,
        ood=None if ood is None else xt(ood),
        image_shape=image_shape,
        meta=info,
    )


# --------------------------------------------------------------------------- loaders


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    bunch = load_digits()
    return np.asarray(bunch.data, dtype=np.float64) / 16.0, np.asarray(bunch.target)


@functools.cache
def _table_arrays(which: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    bunch = load_breast_cancer() if which == "breast_cancer" else load_wine()
    names = tuple(str(n) for n in bunch.feature_names)
    return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target), names


def load_digits_dataset(
    seed: int = 0,
    *,
    image: bool = False,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> Dataset:
    """sklearn's 8×8 digits, pixels scaled to ``[0, 1]``, stratified split.

    Args:
        seed: Split seed (the images themselves are fixed).
        image: Return ``(1, 8, 8)`` images instead of flat ``(64,)`` vectors (a bool).
        fractions: Train, validation and test fractions.

    Returns:
        The ``"digits"`` :class:`Dataset` (10 classes, 1797 samples).

    Example:
        >>> ds = load_digits_dataset(seed=0, image=True)
        >>> ds.input_shape, float(ds.x_train.max()) <= 1.0
        ((1, 8, 8), True)
    """
    image = _check_flag("image", image)
    x, y = _digits_arrays()
    ds = _split_dataset(
        "digits",
        x,
        y,
        seed=seed,
        fractions=fractions,
        n_classes=10,
        image_shape=(1, 8, 8),
        meta={"pixel_scale": 16.0},
    )
    return ds.as_images() if image else ds


def _arc_distance(p: np.ndarray, centre: tuple[float, float], upper: bool) -> np.ndarray:
    """Distance from points ``p`` to the upper (or lower) unit half circle around ``centre``."""
    v = p - np.asarray(centre)
    on_side = v[:, 1] >= 0 if upper else v[:, 1] <= 0
    radial = np.abs(np.hypot(v[:, 0], v[:, 1]) - 1.0)
    ends = np.minimum(np.hypot(v[:, 0] - 1.0, v[:, 1]), np.hypot(v[:, 0] + 1.0, v[:, 1]))
    return np.asarray(np.where(on_side, radial, ends))


def moons_curve_distance(points: np.ndarray | torch.Tensor) -> np.ndarray:
    """Euclidean distance from each 2-D point to the nearest noise-free moon curve.

    The curves of ``make_moons`` are the upper unit half circle around ``(0, 0)``
    and the lower unit half circle around ``(1, 0.5)``; distances are exact.

    Args:
        points: Array of shape ``(n, 2)``.

    Returns:
        Distances, shape ``(n,)``.

    Example:
        >>> moons_curve_distance(np.array([[0.0, 1.0], [0.0, 3.0]])).round(2).tolist()
        [0.0, 2.0]
    """
    p = np.asarray(points.detach().cpu().numpy() if isinstance(points, torch.Tensor) else points)
    p = p.reshape(-1, 2).astype(np.float64)
    return np.minimum(_arc_distance(p, (0.0, 0.0), True), _arc_distance(p, (1.0, 0.5), False))


_OOD_MAX_ROUNDS = 50


def load_moons_dataset(
    seed: int = 0,
    *,
    n_samples: int = 1000,
    noise: float = 0.1,
    n_ood: int = 200,
    ood_margin: float = 1.0,
    ood_box: float = 3.0,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> Dataset:
    """Two moons with an out-of-distribution set far from the data.

    In-distribution points come from ``make_moons(n_samples, noise=noise,
    random_state=seed)``. OOD points are drawn uniformly from the square of
    half-width ``ood_box`` centred on the moons (centre ``(0.5, 0.25)``), keeping
    only points whose distance to both noise-free moon curves is at least
    ``ood_margin``; with the default noise (0.1) and margin (1.0) they are far
    outside every moon sample.

    Args:
        seed: Seed of the sampling and the split.
        n_samples: Number of in-distribution points.
        noise: Gaussian noise std of ``make_moons``.
        n_ood: Number of OOD points.
        ood_margin: Minimum distance of OOD points from the moon curves.
        ood_box: Half-width of the square OOD points are sampled from.
        fractions: Train, validation and test fractions.

    Returns:
        The ``"moons"`` :class:`Dataset` with ``ood`` of shape ``(n_ood, 2)``.

    Raises:
        ConfigError: A parameter of the wrong type or out of range, or the box is too
            small to hold OOD points at the requested margin.

    Example:
        >>> ds = load_moons_dataset(seed=0)
        >>> ds.input_shape, tuple(ds.ood.shape)
        ((2,), (200, 2))
    """
    # Checked here so that sklearn's and numpy's own errors (InvalidParameterError,
    # OverflowError, TypeError) never reach the caller.
    seed = _check_seed(seed)
    n_samples = _check_count("moons n_samples", n_samples, 20)
    n_ood = _check_count("moons n_ood", n_ood, 0)
    noise = _check_real("moons noise", noise)
    ood_margin = _check_real("moons ood_margin", ood_margin)
    ood_box = _check_real("moons ood_box", ood_box, positive=True)
    x, y = make_moons(n_samples=n_samples, noise=noise, random_state=_mix_seed(seed) % (2**32))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % 2**64, 0x00D]))
    centre = np.array([0.5, 0.25])
    chunks: list[np.ndarray] = []
    have = 0
    for _ in range(_OOD_MAX_ROUNDS):
        if have >= n_ood:
            break
        cand = centre + rng.uniform(-ood_box, ood_box, size=(max(2 * n_ood, 64), 2))
        keep = cand[moons_curve_distance(cand) >= ood_margin]
        chunks.append(keep)
        have += keep.shape[0]
    if have < n_ood:
        raise ConfigError(
            f"moons ood_box ({ood_box}) is too small to hold {n_ood} points at distance "
            f">= ood_margin ({ood_margin}) from the moons; enlarge ood_box or lower ood_margin"
        )
    ood = np.concatenate(chunks, axis=0)[:n_ood] if n_ood else np.zeros((0, 2))
    return _split_dataset(
        "moons",
        x,
        y,
        seed=seed,
        fractions=fractions,
        n_classes=2,
        ood=ood,
        meta={"noise": noise, "ood_margin": ood_margin, "ood_box": ood_box},
    )


def _load_table(which: str, seed: int, fractions: tuple[float, float, float]) -> Dataset:
    x, y, names = _table_arrays(which)
    return _split_dataset(
        which,
        x,
        y,
        seed=seed,
        fractions=fractions,
        n_classes=int(y.max()) + 1,
        standardize=True,
        meta={"feature_names": names},
    )


def load_breast_cancer_dataset(
    seed: int = 0, *, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> Dataset:
    """sklearn's breast-cancer table, standardised with train-split statistics.

    Args:
        seed: Split seed.
        fractions: Train, validation and test fractions.

    Returns:
        The ``"breast_cancer"`` :class:`Dataset` (30 features, 2 classes); the
        train mean and std used are in ``meta["train_mean"]`` / ``meta["train_std"]``.

    Example:
        >>> ds = load_breast_cancer_dataset(seed=0)
        >>> ds.input_shape, ds.n_classes
        ((30,), 2)
    """
    return _load_table("breast_cancer", seed, fractions)


def load_wine_dataset(
    seed: int = 0, *, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> Dataset:
    """sklearn's wine table, standardised with train-split statistics.

    Args:
        seed: Split seed.
        fractions: Train, validation and test fractions.

    Returns:
        The ``"wine"`` :class:`Dataset` (13 features, 3 classes).

    Example:
        >>> load_wine_dataset(seed=0).n_classes
        3
    """
    return _load_table("wine", seed, fractions)


# --------------------------------------------------------------------------- registry

DatasetLoader = Callable[..., Dataset]
"""A dataset factory: called as ``loader(seed=seed, **kwargs)``, returns a :class:`Dataset`."""

_REGISTRY: dict[str, DatasetLoader] = {}


def register_dataset(name: str, loader: DatasetLoader, *, overwrite: bool = False) -> None:
    """Add a dataset factory to the registry.

    Args:
        name: Registry name (non-empty string).
        loader: Callable accepting ``seed=`` (and any extra keywords) and
            returning a :class:`Dataset`.
        overwrite: Replace an existing entry instead of refusing.

    Raises:
        ConfigError: Empty name, non-callable loader, or a duplicate name
            without ``overwrite=True``.

    Example:
        >>> register_dataset("tiny_wine", lambda seed=0: load_wine_dataset(seed), overwrite=True)
        >>> "tiny_wine" in available_datasets()
        True
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"dataset name must be a non-empty string, got {name!r}")
    if not callable(loader):
        raise ConfigError(f"loader for dataset {name!r} is not callable: {loader!r}")
    if name in _REGISTRY and not overwrite:
        raise ConfigError(
            f"dataset {name!r} is already registered; pass overwrite=True to replace it"
        )
    _REGISTRY[name] = loader


def available_datasets() -> list[str]:
    """Sorted names of all registered datasets.

    Example:
        >>> {"digits", "moons", "breast_cancer", "wine"} <= set(available_datasets())
        True
    """
    return sorted(_REGISTRY)


def load_dataset(name: str, seed: int = 0, **kwargs: Any) -> Dataset:
    """Build a registered dataset.

    Args:
        name: Registry name, see :func:`available_datasets`.
        seed: Seed of sampling and splitting; same seed gives identical tensors.
        **kwargs: Dataset-specific options, e.g. ``image=True`` for ``"digits"``
            or ``n_ood=500`` for ``"moons"``.

    Returns:
        The :class:`Dataset`.

    Raises:
        ConfigError: Unknown name, or options the dataset does not accept.

    Example:
        >>> load_dataset("digits", seed=0, image=True).input_shape
        (1, 8, 8)
    """
    try:
        loader = _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown dataset {name!r}; available: {', '.join(available_datasets())}"
        ) from None
    try:
        inspect.signature(loader).bind(seed=seed, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad options for dataset {name!r} {kwargs!r}: {exc}") from exc
    except ValueError:  # no introspectable signature (some builtins): just call it
        pass
    ds = loader(seed=seed, **kwargs)
    if not isinstance(ds, Dataset):
        raise ConfigError(f"loader of dataset {name!r} returned {type(ds).__name__}, not a Dataset")
    return ds


register_dataset("digits", load_digits_dataset)
register_dataset("moons", load_moons_dataset)
register_dataset("breast_cancer", load_breast_cancer_dataset)
register_dataset("wine", load_wine_dataset)

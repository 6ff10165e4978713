"""The Dataset and DataSplits types, seeded stratified splitting, and the load_data dispatcher."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import RobustlabError
from .validate import check_seed, check_several_classes

ACCEPTED_SPECS = "mnist5k, digits, npz:PATH, folder:PATH or torchvision:NAME"
TEST_FRACTION = 0.2
STD_FLOOR = 1e-3


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """Images as float32 NCHW tensors in [0,1] with int64 labels."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        """Check the structure (not the values) and make both tensors contiguous."""
        x, y = self.x, self.y
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise RobustlabError(f"dataset {self.name}: x and y must be torch tensors")
        if x.dtype != torch.float32 or x.dim() != 4:
            raise RobustlabError(
                f"dataset {self.name}: x must be a float32 (N, C, H, W) tensor, "
                f"got {x.dtype} with shape {tuple(x.shape)}"
            )
        if y.dtype != torch.int64 or y.dim() != 1:
            raise RobustlabError(
                f"dataset {self.name}: y must be an int64 (N,) tensor, "
                f"got {y.dtype} with shape {tuple(y.shape)}"
            )
        if x.shape[0] != y.shape[0]:
            raise RobustlabError(
                f"dataset {self.name}: x has {x.shape[0]} samples but y has {y.shape[0]} labels"
            )
        if x.shape[2] != x.shape[3]:
            raise RobustlabError(
                f"dataset {self.name}: only square images are supported, "
                f"got {x.shape[2]}x{x.shape[3]} (height x width)"
            )
        if self.num_classes < 1:
            raise RobustlabError(
                f"dataset {self.name}: num_classes must be >= 1, got {self.num_classes}"
            )
        if not x.is_contiguous():
            object.__setattr__(self, "x", x.contiguous())
        if not y.is_contiguous():
            object.__setattr__(self, "y", y.contiguous())

    def __len__(self) -> int:
        """Number of samples."""
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        """A short description without the tensor contents."""
        return (
            f"Dataset(name={self.name!r}, n={len(self)}, shape={tuple(self.x.shape[1:])}, "
            f"num_classes={self.num_classes})"
        )

    @property
    def in_channels(self) -> int:
        """Number of image channels C."""
        return int(self.x.shape[1])

    @property
    def image_size(self) -> int:
        """Side length H (== W) of the square images."""
        return int(self.x.shape[2])

    def subset(self, index: torch.Tensor | slice) -> Dataset:
        """The samples selected by an index tensor (int or bool) or a slice, same name/classes."""
        if isinstance(index, torch.Tensor):
            index = index.to(self.y.device)
        return Dataset(
            x=self.x[index], y=self.y[index], num_classes=self.num_classes, name=self.name
        )

    def head(self, n: int) -> Dataset:
        """The first n samples (all of them if n exceeds the size)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise RobustlabError(f"head(n) needs a whole number n >= 1, got {n!r}")
        return self.subset(slice(0, n))


@dataclass(frozen=True, eq=False)
class DataSplits:
    """The splits of one data source plus what a model needs to know about it."""

    name: str
    train: Dataset
    test: Dataset
    calibration: Dataset | None
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    seed: int = 0
    class_names: tuple[str, ...] = ()

    def info(self) -> dict[str, object]:
        """A JSON-able description: name, split sizes, shape, classes, mean, std, split seed."""
        return {
            "name": self.name,
            "train_size": len(self.train),
            "test_size": len(self.test),
            "calibration_size": 0 if self.calibration is None else len(self.calibration),
            "shape": [self.in_channels, self.image_size, self.image_size],
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            "seed": self.seed,
        }


@dataclass(frozen=True, eq=False)
class LoadedData:
    """What a loader hands back: all samples to split (test None) or a ready train/test pair."""

    train: Dataset
    test: Dataset | None
    class_names: tuple[str, ...]


def cache_dir() -> Path:
    """The robustlab cache folder: $ROBUSTLAB_CACHE if set, else ~/.cache/robustlab."""
    env = os.environ.get("ROBUSTLAB_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "robustlab"


def _class_indices(y: torch.Tensor, num_classes: int) -> list[np.ndarray]:
    """Indices of the samples of each class, in ascending order."""
    labels = y.cpu().numpy()
    return [np.flatnonzero(labels == c) for c in range(num_classes)]


def _rng(seed: int, stream: int) -> np.random.Generator:
    """A private numpy generator for one seeded split (global RNG state untouched)."""
    return np.random.default_rng([seed, stream])


def _take(data: Dataset, index: np.ndarray, rng: np.random.Generator, name: str) -> Dataset:
    """The samples at index, shuffled (so head() mixes classes), renamed."""
    order = rng.permutation(np.sort(index))
    picked = data.subset(torch.from_numpy(order.astype(np.int64)))
    return Dataset(x=picked.x, y=picked.y, num_classes=data.num_classes, name=name)


def split_test(data: Dataset, seed: int, spec: str) -> tuple[Dataset, Dataset]:
    """Seeded stratified 80/20 train/test split; every class needs >= 2 samples."""
    rng = _rng(seed, 0)
    train_parts: list[np.ndarray] = []
    test_parts: list[np.ndarray] = []
    for c, idx in enumerate(_class_indices(data.y, data.num_classes)):
        if len(idx) < 2:
            raise RobustlabError(
                f"dataset {spec}: class {c} has only {len(idx)} sample(s), too few for a "
                "stratified train/test split (each class needs at least 2)"
            )
        n_test = max(1, math.floor(len(idx) * TEST_FRACTION + 0.5))
        perm = rng.permutation(idx)
        test_parts.append(perm[:n_test])
        train_parts.append(perm[n_test:])
    train = _take(data, np.concatenate(train_parts), rng, f"{spec}/train")
    test = _take(data, np.concatenate(test_parts), rng, f"{spec}/test")
    return train, test


def _allocate(counts: list[int], total: int) -> list[int]:
    """Split total across classes in proportion to counts (largest-remainder rounding)."""
    n = sum(counts)
    exact = [total * c / n for c in counts]
    alloc = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(counts)), key=lambda i: (-(exact[i] - alloc[i]), i))
    for i in by_remainder[: total - sum(alloc)]:
        alloc[i] += 1
    return alloc


def split_calibration(
    train: Dataset, calibration: int, seed: int, spec: str
) -> tuple[Dataset, Dataset]:
    """Hold a seeded, class-stratified set of `calibration` samples out of train."""
    if calibration >= len(train):
        raise RobustlabError(
            f"calibration={calibration} must be smaller than the train split of {spec} "
            f"({len(train)} samples)"
        )
    rng = _rng(seed, 1)
    per_class = _class_indices(train.y, train.num_classes)
    alloc = _allocate([len(idx) for idx in per_class], calibration)
    keep_parts: list[np.ndarray] = []
    held_parts: list[np.ndarray] = []
    for c, (idx, k) in enumerate(zip(per_class, alloc, strict=True)):
        if k >= len(idx):
            raise RobustlabError(
                f"calibration={calibration} would leave class {c} of {spec} with no training "
                f"sample (it has {len(idx)}); hold out fewer samples"
            )
        perm = rng.permutation(idx)
        held_parts.append(perm[:k])
        keep_parts.append(perm[k:])
    kept = _take(train, np.concatenate(keep_parts), rng, f"{spec}/train")
    held = _take(train, np.concatenate(held_parts), rng, f"{spec}/calibration")
    return kept, held


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of NCHW images, std floored at 1e-3."""
    channels = x.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for chunk in torch.split(x, 2048):
        c64 = chunk.to(torch.float64)
        total += c64.sum(dim=(0, 2, 3))
        total_sq += (c64 * c64).sum(dim=(0, 2, 3))
    count = max(1, x.shape[0] * x.shape[2] * x.shape[3])
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0.0)
    std = var.sqrt().clamp_min(STD_FLOOR)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _path_of(spec: str, prefix: str) -> Path:
    """The PATH part of a 'prefix:PATH' spec, with ~ expanded."""
    raw = spec[len(prefix) + 1 :].strip()
    if not raw:
        raise RobustlabError(f"dataset spec {spec!r} needs a path after '{prefix}:'")
    return Path(raw).expanduser()


def source_path(spec: str) -> Path | None:
    """The file or folder a data spec reads (npz:PATH, folder:PATH), None for the built-in and
    downloaded sources: an input that ``io.check_outputs`` must never write over."""
    kind, sep, _ = spec.strip().partition(":")
    kind = kind.strip().lower()
    if sep and kind in ("npz", "folder"):
        return _path_of(spec.strip(), kind)
    return None


def _load_source(spec: str) -> LoadedData:
    """Run the loader that the spec names."""
    kind, sep, _ = spec.partition(":")
    kind = kind.strip().lower()
    if not sep and kind == "mnist5k":
        from .builtin import load_mnist5k

        return load_mnist5k()
    if not sep and kind == "digits":
        from .builtin import load_digits

        return load_digits()
    if sep and kind == "npz":
        from .files import load_npz

        return load_npz(_path_of(spec, "npz"), spec)
    if sep and kind == "folder":
        from .files import load_folder

        return load_folder(_path_of(spec, "folder"), spec)
    if sep and kind == "torchvision":
        from .torchvision_data import load_torchvision

        return load_torchvision(spec.partition(":")[2].strip())
    raise RobustlabError(f"unknown dataset spec {spec!r}; accepted forms are {ACCEPTED_SPECS}")


def load_data(spec: str, *, calibration: int = 0, seed: int = 0) -> DataSplits:
    """Load a data source by spec and split it (deterministically for a given seed)."""
    if not isinstance(spec, str) or not spec.strip():
        raise RobustlabError(
            f"dataset spec must be a non-empty string like 'mnist5k', got {spec!r}"
        )
    spec = spec.strip()
    check_seed(seed)
    if isinstance(calibration, bool) or not isinstance(calibration, int):
        raise RobustlabError(f"calibration must be a whole number of samples, got {calibration!r}")
    if calibration < 0:
        raise RobustlabError(f"calibration must be >= 0 samples, got {calibration}")
    source = _load_source(spec)
    check_several_classes(source.train.num_classes, f"dataset {spec}", source.class_names)
    if source.test is None:
        train, test = split_test(source.train, seed, spec)
    else:
        train, test = source.train, source.test
    held: Dataset | None = None
    if calibration > 0:
        train, held = split_calibration(train, calibration, seed, spec)
    mean, std = channel_stats(train.x)
    return DataSplits(
        name=spec,
        train=train,
        test=test,
        calibration=held,
        num_classes=train.num_classes,
        in_channels=train.in_channels,
        image_size=train.image_size,
        mean=mean,
        std=std,
        seed=seed,
        class_names=source.class_names,
    )

"""The Dataset and DataSplits types, seeded stratified splitting, and the load_data dispatcher."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..errors import RobustlabError
from .builtin import load_digits, load_mnist5k
from .dataset import Dataset, DataSplits, LoadedData
from .files import load_folder, load_npz
from .torchvision_data import load_torchvision
from .validate import check_seed, check_several_classes

ACCEPTED_SPECS = "mnist5k, digits, npz:PATH, folder:PATH or torchvision:NAME"
TEST_FRACTION = 0.2
STD_FLOOR = 1e-3


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


def same_source(spec: str, other: str) -> bool:
    """Whether two data specs name the same source (a user file: the same resolved path)."""
    path, other_path = source_path(spec), source_path(other)
    if path is None or other_path is None:
        return spec.strip().lower() == other.strip().lower()
    return path.resolve() == other_path.resolve()


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
        return load_mnist5k()
    if not sep and kind == "digits":
        return load_digits()
    if sep and kind == "npz":
        return load_npz(_path_of(spec, "npz"), spec)
    if sep and kind == "folder":
        return load_folder(_path_of(spec, "folder"), spec)
    if sep and kind == "torchvision":
        return load_torchvision(spec.partition(":")[2].strip())
    raise RobustlabError(f"unknown dataset spec {spec!r}; accepted forms are {ACCEPTED_SPECS}")


def load_data(
    spec: str, *, calibration: int = 0, seed: int = 0, test_only: bool = False
) -> DataSplits:
    """Load a data source by spec and split it (deterministically for a given seed).

    ``test_only`` is for commands that only evaluate: a user file without its own test split
    (an ``npz`` of ``x, y``, a folder) is then all test points, in its own order, and its train
    split is empty (the 80/20 split belongs to training); normalisation statistics come from
    those test points. Built-in sources keep their one seeded split, and sources with a test
    split give it, as usual.
    """
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
    if source.test is None and test_only and source_path(spec) is not None:
        if calibration > 0:
            raise RobustlabError("a calibration hold-out needs a train split, not test points only")
        test = Dataset(source.train.x, source.train.y, source.train.num_classes, f"{spec}/test")
        train = Dataset(test.x[:0], test.y[:0], test.num_classes, f"{spec}/train")
    elif source.test is None:
        train, test = split_test(source.train, seed, spec)
    else:
        train, test = source.train, source.test
    held: Dataset | None = None
    if calibration > 0:
        train, held = split_calibration(train, calibration, seed, spec)
    mean, std = channel_stats(train.x if len(train) else test.x)
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

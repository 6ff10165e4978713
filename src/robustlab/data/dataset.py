"""The data types every loader returns and every consumer reads: Dataset, DataSplits, LoadedData."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RobustlabError
from ..io import cache_dir as cache_dir  # re-exported: the data loaders use it from here


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

"""What PyTorch users hold, as a robustlab Dataset: an ``(x, y)`` pair of tensors or arrays, a
``TensorDataset`` or a ``DataLoader`` of ``(x, y)`` batches, checked as files are."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from ..errors import RobustlabError
from .dataset import Dataset
from .validate import check_images, check_labels

#: What ``as_dataset`` accepts, as its error message names it.
ACCEPTED_DATA = (
    "a robustlab Dataset, an (x, y) pair of tensors or arrays, a TensorDataset or a DataLoader "
    "of (x, y) batches"
)
#: The types of data the Python API's evaluations accept.
UserData = Dataset | tuple[Any, Any] | list[Any] | TensorDataset | DataLoader[Any]


def _numpy(value: object, what: str) -> np.ndarray:
    """A tensor or array as a numpy array (on the CPU, detached), or one sentence why not."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise RobustlabError(f"{what} must be a tensor or a numpy array, got {type(value).__name__}")


def _pair(data: object) -> tuple[object, object]:
    """The images and labels of a pair, a TensorDataset or a DataLoader's batches."""
    if isinstance(data, TensorDataset):
        if len(data.tensors) != 2:
            raise RobustlabError(
                f"a TensorDataset must hold (x, y), got {len(data.tensors)} tensors"
            )
        return data.tensors[0], data.tensors[1]
    if isinstance(data, DataLoader):
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        for batch in data:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise RobustlabError("a DataLoader's batches must be (x, y) pairs")
            xs.append(torch.as_tensor(batch[0]))
            ys.append(torch.as_tensor(batch[1]))
        if not xs:
            raise RobustlabError("the DataLoader yielded no batch")
        return torch.cat(xs), torch.cat(ys)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return data[0], data[1]
    raise RobustlabError(f"cannot evaluate on {type(data).__name__}: give {ACCEPTED_DATA}")


def as_dataset(
    data: UserData, *, num_classes: int | None = None, name: str = "user data"
) -> Dataset:
    """``data`` as a Dataset of float32 NCHW images in [0, 1] (uint8 images are divided by 255)
    with int64 labels; ``num_classes`` defaults to the largest label + 1."""
    if isinstance(data, Dataset):
        return data
    x_raw, y_raw = _pair(data)
    x = check_images(_numpy(x_raw, "x"), name)
    y = check_labels(_numpy(y_raw, "y"), x.shape[0], name)
    classes = int(y.max()) + 1 if num_classes is None else num_classes
    if classes <= int(y.max()):
        raise RobustlabError(f"{name}: labels go up to {int(y.max())} but num_classes is {classes}")
    return Dataset(torch.from_numpy(x), torch.from_numpy(y), classes, name)

"""Optional torchvision datasets (torchvision:NAME), downloaded into $ROBUSTLAB_CACHE/data."""

from __future__ import annotations

import socket
from typing import Any

import numpy as np
import torch

from ..errors import RobustlabError
from .dataset import Dataset, LoadedData, cache_dir
from .validate import check_images, check_labels, count_classes

DOWNLOAD_TIMEOUT = 20.0
TORCHVISION_NAMES = {
    "mnist": "MNIST",
    "fashionmnist": "FashionMNIST",
    "kmnist": "KMNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
    "svhn": "SVHN",
}


def torchvision_key(name: str) -> str:
    """The canonical key of a torchvision dataset name ('Fashion-MNIST' -> 'fashionmnist')."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in TORCHVISION_NAMES:
        raise RobustlabError(
            f"unknown torchvision dataset {name!r}; known names are "
            f"{', '.join(sorted(TORCHVISION_NAMES))}"
        )
    return key


def _fetch(key: str, train: bool) -> Any:
    """One split of a torchvision dataset, downloading it with a socket timeout."""
    try:
        import torchvision.datasets as tv_datasets
    except ImportError as exc:
        raise RobustlabError(
            f"torchvision is not installed; pip install torchvision to use torchvision:{key}"
        ) from exc
    cls = getattr(tv_datasets, TORCHVISION_NAMES[key])
    root = cache_dir() / "data"
    kwargs: dict[str, Any] = (
        {"split": "train" if train else "test"} if key == "svhn" else {"train": train}
    )
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        root.mkdir(parents=True, exist_ok=True)
        return cls(root=str(root), download=True, **kwargs)
    except Exception as exc:  # urllib/http/OS/runtime errors all mean the same to the user
        raise RobustlabError(f"could not download {key} (no network?): {exc}") from exc
    finally:
        socket.setdefaulttimeout(previous)


def _arrays(dataset: Any, key: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Checked float32 NCHW images and int64 labels of one torchvision split."""
    where = f"torchvision:{key} ({split})"
    data = dataset.data
    raw_x = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = dataset.labels
    raw_y = targets.numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    x = check_images(raw_x, where)
    y = check_labels(raw_y.astype(np.int64), x.shape[0], where)
    return x, y


def load_torchvision(name: str) -> LoadedData:
    """The official train/test splits of a torchvision dataset (needs torchvision + network)."""
    key = torchvision_key(name)
    train_set = _fetch(key, train=True)
    test_set = _fetch(key, train=False)
    x_train, y_train = _arrays(train_set, key, "train")
    x_test, y_test = _arrays(test_set, key, "test")
    num_classes = count_classes([y_train, y_test], f"torchvision:{key}")
    spec = f"torchvision:{name}"
    names = getattr(train_set, "classes", None)
    class_names = (
        tuple(str(n) for n in names)
        if names is not None and len(names) == num_classes
        else tuple(str(c) for c in range(num_classes))
    )
    train = Dataset(
        x=torch.from_numpy(x_train),
        y=torch.from_numpy(y_train),
        num_classes=num_classes,
        name=f"{spec}/train",
    )
    test = Dataset(
        x=torch.from_numpy(x_test),
        y=torch.from_numpy(y_test),
        num_classes=num_classes,
        name=f"{spec}/test",
    )
    return LoadedData(train=train, test=test, class_names=class_names)

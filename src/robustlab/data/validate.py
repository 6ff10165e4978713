"""Checks of user-supplied image and label arrays, each failure one clear RobustlabError.

Value conventions: uint8 images are 0..255 and get divided by 255; float images must already
lie in [0, 1]; other integer images need a declared value_range (lo, hi), which, when given,
always wins and rescales (x - lo) / (hi - lo).  Images may be (N, C, H, W), (N, H, W, C) with
C in 1, 3 or 4, or (N, H, W) grayscale, and must be square.
"""

from __future__ import annotations

import numpy as np

from ..errors import RobustlabError
from ..io import limits

CHANNEL_COUNTS = (1, 3, 4)
MAX_SEED = 2**62  # leaves room for the per-batch offsets added to a seed


def check_seed(seed: object, what: str = "seed") -> int:
    """A seed as a whole number from 0 to MAX_SEED (every generator robustlab uses takes it)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        shown = repr(seed) if len(repr(seed)) <= 40 else repr(seed)[:37] + "..."
        raise RobustlabError(f"{what} must be a non-negative whole number up to 2**62, got {shown}")
    return seed


def _fail(where: str, message: str) -> RobustlabError:
    """The error for one problem, prefixed with where it was found."""
    return RobustlabError(f"{where}: {message}")


def check_value_range(value: object, where: str) -> tuple[float, float]:
    """A declared value_range as (lo, hi): two finite numbers with lo < hi."""
    arr = np.asarray(value)
    if arr.shape != (2,) or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise _fail(where, f"value_range must be two numbers [lo, hi], got {arr.tolist()!r}")
    lo, hi = float(arr[0]), float(arr[1])
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise _fail(where, f"value_range must be finite with lo < hi, got [{lo}, {hi}]")
    return lo, hi


def to_nchw(x: np.ndarray, where: str, name: str = "x") -> np.ndarray:
    """The images as (N, C, H, W), deciding the channel axis; square images only."""
    if x.ndim == 3:
        x = x[:, None, :, :]
    elif x.ndim == 4:
        _, a, b, c = x.shape
        first, last = a in CHANNEL_COUNTS, c in CHANNEL_COUNTS
        if first and last:
            channels_last = b != c and a == b
        elif first or last:
            channels_last = last
        else:
            raise _fail(
                where,
                f"{name} has shape {x.shape}, which is neither (N, C, H, W) nor (N, H, W, C) "
                "with C = 1, 3 or 4 channels",
            )
        if channels_last:
            x = np.moveaxis(x, 3, 1)
    else:
        raise _fail(
            where,
            f"{name} must be 3-D (N, H, W) or 4-D (N, C, H, W) / (N, H, W, C), "
            f"got {x.ndim}-D with shape {x.shape}",
        )
    if x.shape[2] != x.shape[3]:
        raise _fail(
            where,
            f"{name} holds non-square {x.shape[2]}x{x.shape[3]} images; only square images "
            "are supported",
        )
    return x


def check_images(
    x: np.ndarray, where: str, *, value_range: tuple[float, float] | None = None, name: str = "x"
) -> np.ndarray:
    """Images as contiguous float32 (N, C, H, W) in [0, 1], after every check."""
    if x.dtype == np.bool_ or not (
        np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
    ):
        raise _fail(where, f"{name} must hold integer or float pixel values, got {x.dtype}")
    if x.ndim >= 1 and x.shape[0] == 0:
        raise _fail(where, f"{name} is empty (0 samples)")
    x = to_nchw(x, where, name)
    if x.size == 0:
        raise _fail(where, f"{name} holds zero-sized images, shape {x.shape}")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise _fail(where, f"{name} contains NaN or infinite values")
    if value_range is not None:
        lo, hi = value_range
        declared = f"the declared value_range [{lo:g}, {hi:g}]"
    elif x.dtype == np.uint8:
        lo, hi = 0.0, 255.0
        declared = ""
    elif np.issubdtype(x.dtype, np.integer):
        raise _fail(
            where,
            f"{name} has integer dtype {x.dtype}, so its value range must be declared "
            "(add an array value_range = [lo, hi]) or stored as uint8 (0..255)",
        )
    else:
        lo, hi = 0.0, 1.0
        declared = "[0, 1] (declare a value_range = [lo, hi] array for other ranges)"
    if declared:
        found_min, found_max = float(x.min()), float(x.max())
        if found_min < lo or found_max > hi:
            raise _fail(
                where,
                f"{name} values must lie in {declared}, found min {found_min:g} "
                f"and max {found_max:g}",
            )
    if (lo, hi) == (0.0, 1.0):
        return np.ascontiguousarray(x, dtype=np.float32)
    work = np.float32 if x.dtype == np.uint8 else np.float64
    scaled = (x.astype(work) - work(lo)) / work(hi - lo)
    return np.ascontiguousarray(np.clip(scaled, 0.0, 1.0), dtype=np.float32)


def check_labels(y: np.ndarray, n: int, where: str, name: str = "y") -> np.ndarray:
    """Labels as int64 (N,): integers, >= 0, one per image (n images)."""
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        raise _fail(where, f"labels {name} must be integers, got {y.dtype}")
    if y.ndim != 1:
        raise _fail(where, f"labels {name} must be 1-D (N,), got shape {y.shape}")
    if y.shape[0] != n:
        raise _fail(where, f"the images have {n} samples but labels {name} has {y.shape[0]}")
    if n and int(y.min()) < 0:
        raise _fail(where, f"labels {name} must be >= 0, found {int(y.min())}")
    if n and int(y.max()) > np.iinfo(np.int64).max:  # uint64 beyond int64 would wrap
        raise _fail(where, f"labels {name} go up to {int(y.max())}, too large for a class number")
    return y.astype(np.int64)


def count_classes(labels: list[np.ndarray], where: str, names: str = "y") -> int:
    """num_classes = max label + 1, with every class 0..max present in the labels."""
    present = np.unique(np.concatenate([lab.reshape(-1) for lab in labels]))
    if present.size == 0:
        raise _fail(where, "the dataset is empty (0 samples)")
    expected = np.arange(present.size)
    if not np.array_equal(present, expected):
        missing = int(expected[np.argmax(present != expected)])
        raise _fail(
            where,
            f"class {missing} has no samples in {names} (labels run 0..{int(present[-1])}, "
            "so every class in between needs at least one)",
        )
    most = limits().classes
    if present.size > most:
        raise _fail(
            where,
            f"{names} holds {present.size} classes, beyond the limit of {most} "
            "(ROBUSTLAB_MAX_CLASSES)",
        )
    return int(present.size)


def check_several_classes(num_classes: int, where: str, names: tuple[str, ...] = ()) -> None:
    """Refuse a data source of one class: every model scores 100 % on it, which means nothing."""
    if num_classes < 2:
        only = f" ({names[0]!r})" if names else ""
        raise _fail(
            where,
            f"it holds a single class{only}; accuracy on one class is meaningless (always "
            "answering it scores 100 %), so at least two classes are needed",
        )


def check_all_classes(y: np.ndarray, num_classes: int, where: str, name: str) -> None:
    """Every class 0..num_classes-1 has at least one sample in y."""
    counts = np.bincount(y, minlength=num_classes)
    if (counts == 0).any():
        missing = int(np.argmax(counts == 0))
        raise _fail(where, f"class {missing} has no samples in {name}")

"""Loaders for user files: a numpy .npz archive or a folder of images, one sub-folder per class."""

from __future__ import annotations

import warnings
import zipfile
import zlib
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import RobustlabError
from ..io import check_regular, limits, size_text
from .dataset import Dataset, LoadedData
from .validate import (
    check_all_classes,
    check_images,
    check_labels,
    check_value_range,
    count_classes,
)

SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)
GRAY_8BIT = ("1", "L", "LA", "La")  # converted to L: 0..255
GRAY_16BIT = ("I;16", "I;16B", "I;16L", "I;16N")  # 0..65535
COLOUR_8BIT = ("RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")
FLOAT_BYTES = 4  # every image is decoded to float32


def _npy_size(member: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the header of one .npy inside an .npz, without reading its data."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    return tuple(int(d) for d in shape), np.dtype(dtype)


def _check_npz_sizes(path: Path, where: str) -> None:
    """Refuse an archive whose arrays (by their headers) would not fit the data limit."""
    most = limits().data_bytes
    total = 0
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with archive.open(info) as member:
                shape, dtype = _npy_size(member)
            decoded = int(np.prod(shape, dtype=object)) * max(dtype.itemsize, FLOAT_BYTES)
            total += decoded
            if total > most:
                raise RobustlabError(
                    f"{where}: array {info.filename[:-4]} of shape {shape} ({dtype}) would take "
                    f"{size_text(decoded)}, beyond the limit of {size_text(most)} for a data "
                    "source (ROBUSTLAB_MAX_DATA_BYTES)"
                )


def _read_npz(path: Path, where: str) -> dict[str, np.ndarray]:
    """Every array of an .npz archive (no pickles), its sizes checked first, or a clear error."""
    if not path.exists():
        raise RobustlabError(f"{where} does not exist")
    if not path.is_file():
        raise RobustlabError(f"{where} is not a file")
    check_regular(path, "npz file", limits().data_bytes)
    try:
        if zipfile.is_zipfile(path):
            _check_npz_sizes(path, where)
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise RobustlabError(f"{where} is not an .npz archive (it holds a single array)")
        with loaded:
            return {key: loaded[key] for key in loaded.files}
    except READ_ERRORS as exc:
        raise RobustlabError(
            f"{where} is not a valid .npz archive (numpy could not read it: {exc})"
        ) from exc


def _array_pair(
    arrays: dict[str, np.ndarray],
    x_key: str,
    y_key: str,
    where: str,
    value_range: tuple[float, float] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Checked float32 NCHW images and int64 labels for one x/y pair of the archive."""
    x = check_images(arrays[x_key], where, value_range=value_range, name=x_key)
    y = check_labels(arrays[y_key], x.shape[0], where, name=y_key)
    return x, y


def _dataset(x: np.ndarray, y: np.ndarray, num_classes: int, name: str) -> Dataset:
    """A Dataset over checked numpy arrays."""
    return Dataset(x=torch.from_numpy(x), y=torch.from_numpy(y), num_classes=num_classes, name=name)


def load_npz(path: Path, spec: str) -> LoadedData:
    """An .npz with x and y (split 80/20 later, unless only evaluated), x_adv and y (what
    ``robustlab attack --save`` writes), or x_train, y_train, x_test and y_test."""
    where = f"npz file {path}"
    arrays = _read_npz(path, where)
    value_range = (
        check_value_range(arrays["value_range"], where) if "value_range" in arrays else None
    )
    if all(key in arrays for key in SPLIT_KEYS):
        x_train, y_train = _array_pair(arrays, "x_train", "y_train", where, value_range)
        x_test, y_test = _array_pair(arrays, "x_test", "y_test", where, value_range)
        if x_train.shape[1:] != x_test.shape[1:]:
            raise RobustlabError(
                f"{where}: x_train images are {x_train.shape[1:]} (C, H, W) but x_test images "
                f"are {x_test.shape[1:]}"
            )
        num_classes = count_classes([y_train, y_test], where, "y_train or y_test")
        check_all_classes(y_train, num_classes, where, "y_train (it appears in y_test)")
        train = _dataset(x_train, y_train, num_classes, f"{spec}/train")
        test = _dataset(x_test, y_test, num_classes, f"{spec}/test")
        return LoadedData(train=train, test=test, class_names=_numbered(num_classes))
    # `robustlab attack --save` writes its examples as x_adv, beside their labels y
    x_key = "x_adv" if "x" not in arrays and "x_adv" in arrays else "x"
    if x_key in arrays and "y" in arrays:
        x, y = _array_pair(arrays, x_key, "y", where, value_range)
        num_classes = count_classes([y], where, "y")
        full = _dataset(x, y, num_classes, spec)
        return LoadedData(train=full, test=None, class_names=_numbered(num_classes))
    found = ", ".join(sorted(arrays)) or "no arrays"
    raise RobustlabError(
        f"{where} must hold arrays x and y (or x_adv and y, as robustlab attack --save writes), "
        f"or x_train, y_train, x_test and y_test; found: {found}"
    )


def _numbered(num_classes: int) -> tuple[str, ...]:
    """Class names '0', '1', ... for sources without names."""
    return tuple(str(c) for c in range(num_classes))


def _class_folders(root: Path, where: str) -> list[Path]:
    """The sorted, non-hidden sub-folders of an image folder (one per class)."""
    if not root.exists():
        raise RobustlabError(f"{where} does not exist")
    if not root.is_dir():
        raise RobustlabError(f"{where} is not a folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise RobustlabError(
            f"{where} has no class sub-folders (expected one sub-folder of images per class)"
        )
    return folders


def _image_files(folder: Path, where: str) -> list[Path]:
    """The sorted image files directly inside one class folder."""
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise RobustlabError(
            f"{where}: class folder {folder.name!r} has no images (png, jpg, jpeg, bmp or gif)"
        )
    return files


def _scaled(img: Image.Image, path: Path, where: str) -> tuple[np.ndarray, bool]:
    """Pixels as float32 in [0, 1], scaled by the mode's true range, and whether gray;
    a mode without a known range is refused."""
    mode = img.mode
    if mode in GRAY_8BIT:
        return np.asarray(img.convert("L"), dtype=np.float32) / np.float32(255.0), True
    if mode in GRAY_16BIT or mode == "I" and img.format == "PNG":  # PNG has no 32-bit ints
        return np.asarray(img).astype(np.float32) / np.float32(65535.0), True
    if mode in COLOUR_8BIT:
        return np.asarray(img.convert("RGB"), dtype=np.float32) / np.float32(255.0), False
    if mode == "F":
        pixels = np.asarray(img, dtype=np.float32)
        if not (np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1):
            raise RobustlabError(
                f"{where}: the floating-point image {path} has values outside [0, 1]"
            )
        return pixels, True
    raise RobustlabError(
        f"{where}: image {path} has pixel mode {mode}, whose value range is unknown; "
        "save it as 8- or 16-bit grayscale or RGB"
    )


def _read_image(path: Path, where: str, budget: list[int]) -> tuple[np.ndarray, bool]:
    """One image as float32 in [0, 1], (H, W) if gray else (H, W, 3), and whether it is gray;
    its size is read from the header and checked before its pixels are decoded."""
    bounds = limits()
    check_regular(path, "image file", bounds.data_bytes)
    try:
        with warnings.catch_warnings():  # Pillow's own bomb warning: our limit decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            width, height = img.size
            if max(width, height) > bounds.image_side:
                raise RobustlabError(
                    f"{where}: image {path} is {width}x{height} pixels, beyond the limit of "
                    f"{bounds.image_side} per side (ROBUSTLAB_MAX_IMAGE_SIDE)"
                )
            budget[0] += width * height * 3 * FLOAT_BYTES
            if budget[0] > bounds.data_bytes:
                raise RobustlabError(
                    f"{where}: the images up to {path} would take more than the limit of "
                    f"{size_text(bounds.data_bytes)} for a data source (ROBUSTLAB_MAX_DATA_BYTES)"
                )
            img.load()
            return _scaled(img, path, where)
    except (
        OSError,
        UnidentifiedImageError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
    ) as exc:
        raise RobustlabError(f"{where}: cannot read image file {path} ({exc})") from exc


def load_folder(root: Path, spec: str) -> LoadedData:
    """A folder with one sub-folder of images per class (labels = sorted folder order)."""
    where = f"image folder {root}"
    folders = _class_folders(root, where)
    pictures: list[np.ndarray] = []
    grays: list[bool] = []
    labels: list[int] = []
    first: Path | None = None
    budget = [0]
    for label, folder in enumerate(folders):
        for path in _image_files(folder, where):
            pixels, gray = _read_image(path, where, budget)
            if first is None:
                first = path
            elif pixels.shape[:2] != pictures[0].shape[:2]:
                h, w = pixels.shape[:2]
                h0, w0 = pictures[0].shape[:2]
                raise RobustlabError(
                    f"{where}: all images must have the same size, but {path} is {w}x{h} "
                    f"while {first} is {w0}x{h0} (width x height)"
                )
            pictures.append(pixels)
            grays.append(gray)
            labels.append(label)
    if all(grays):
        x = np.stack(pictures)
    else:
        x = np.stack(
            [
                np.repeat(p[:, :, None], 3, axis=2) if g else p
                for p, g in zip(pictures, grays, strict=True)
            ]
        )
        x = np.moveaxis(x, 3, 1)
    images = check_images(x, where)
    y = np.asarray(labels, dtype=np.int64)
    full = _dataset(images, y, len(folders), spec)
    return LoadedData(train=full, test=None, class_names=tuple(f.name for f in folders))

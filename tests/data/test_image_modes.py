"""Every image mode in folder: data is scaled by its true range or refused; one-class data
is refused, since accuracy on it means nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robustlab.data import Dataset, load_data
from robustlab.errors import RobustlabError


def folder_of(tmp_path: Path, images: dict[str, list[Image.Image]]) -> str:
    """A folder: spec with one sub-folder of PNGs per class."""
    for cls, pictures in images.items():
        (tmp_path / cls).mkdir()
        for i, img in enumerate(pictures):
            # modes PNG cannot hold go in TIFF files named .png (Pillow reads by content)
            img.save(tmp_path / cls / f"{i}.png", format="PNG" if img.mode != "F" else "TIFF")
    return f"folder:{tmp_path}"


def all_pixels(spec: str) -> torch.Tensor:
    """Every loaded pixel of a data source, train and test, sorted."""
    splits = load_data(spec)
    return torch.cat([splits.train.x.flatten(), splits.test.x.flatten()]).sort().values


def test_16_bit_grayscale_is_scaled_by_65535(tmp_path: Path) -> None:
    levels = np.array([0, 1000, 32768, 65535], dtype=np.uint16)
    pictures = [Image.fromarray(np.full((4, 4), v, dtype=np.uint16)) for v in levels]
    assert {p.mode for p in pictures} == {"I;16"}
    spec = folder_of(tmp_path, {"a": pictures[:2] * 2, "b": pictures[2:] * 2})
    got = set(all_pixels(spec).tolist())
    assert got == {float(np.float32(v) / np.float32(65535)) for v in levels}
    assert len(got) == 4  # not every pixel 1.0


def test_8_bit_modes_keep_their_values(tmp_path: Path) -> None:
    gray = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16)
    palette = gray.convert("P")
    spec = folder_of(tmp_path, {"a": [gray, gray], "b": [palette, gray.convert("1")]})
    got = all_pixels(spec)
    assert set(got.tolist()) <= {float(np.float32(v) / np.float32(255)) for v in range(256)}
    assert float(got.max()) == 1.0 and float(got.min()) == 0.0


def test_a_32_bit_integer_image_is_refused(tmp_path: Path) -> None:
    wide = Image.fromarray(np.full((4, 4), 70000, dtype=np.int32))
    assert wide.mode == "I"
    small = Image.new("L", (4, 4))
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        small.save(tmp_path / cls / "0.png")
    wide.save(tmp_path / "b" / "1.png", format="TIFF")  # Pillow reads it by content
    with pytest.raises(RobustlabError, match="pixel mode I, whose value range is unknown"):
        load_data(f"folder:{tmp_path}")


def test_a_float_image_must_lie_in_0_1(tmp_path: Path) -> None:
    inside = Image.fromarray(np.full((4, 4), 0.25, dtype=np.float32))
    outside = Image.fromarray(np.full((4, 4), 3.0, dtype=np.float32))
    (tmp_path / "ok").mkdir()
    good = folder_of(tmp_path / "ok", {"a": [inside, inside], "b": [inside, inside]})
    assert set(all_pixels(good).tolist()) == {0.25}
    (tmp_path / "bad").mkdir()
    bad = folder_of(tmp_path / "bad", {"a": [inside, inside], "b": [outside, inside]})
    with pytest.raises(RobustlabError, match="values outside \\[0, 1\\]"):
        load_data(bad)


def test_one_class_data_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").mkdir()
    spec = folder_of(tmp_path / "f", {"only": [Image.new("L", (4, 4))] * 5})
    with pytest.raises(RobustlabError, match="single class \\('only'\\); accuracy on one class"):
        load_data(spec)
    np.savez(tmp_path / "one.npz", x=np.zeros((10, 4, 4), dtype=np.uint8), y=np.zeros(10, int))
    with pytest.raises(RobustlabError, match="single class"):
        load_data(f"npz:{tmp_path / 'one.npz'}")


def test_uint64_labels_beyond_int64_get_a_sentence(tmp_path: Path) -> None:
    y = np.array([0, 1, 2**64 - 3, 1], dtype=np.uint64)
    np.savez(tmp_path / "u.npz", x=np.zeros((4, 4, 4), dtype=np.uint8), y=y)
    with pytest.raises(RobustlabError, match="go up to 18446744073709551613, too large") as info:
        load_data(f"npz:{tmp_path / 'u.npz'}")
    assert "-922" not in str(info.value)


def test_evaluating_one_class_says_why_the_number_is_meaningless() -> None:
    from robustlab.attacks.pgd import PGD
    from robustlab.evaluate import evaluate

    data = Dataset(torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.int64), 1, "one")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 1)).eval()
    rec = evaluate(model, data, PGD(eps=0.1, steps=1), progress=False)
    assert any("single class" in w for w in rec.warnings)

"""No file can hang robustlab or exhaust memory: only regular files are read, and sizes
claimed by headers (manifests, .npy headers, image headers) are checked before allocation."""

from __future__ import annotations

import io
import json
import os
import signal
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from robustlab.data import load_data
from robustlab.errors import RobustlabError
from robustlab.io import limits
from robustlab.models import build_model
from robustlab.models.checkpoint import (
    MANIFEST,
    WEIGHTS,
    load_checkpoint,
    model_config,
    save_checkpoint,
)
from robustlab.store import ResultStore


@pytest.fixture(autouse=True)
def _no_hang() -> Iterator[None]:
    """A read that blocks (a FIFO) fails the test instead of hanging the suite."""

    def fail(*_: Any) -> None:
        raise TimeoutError("robustlab blocked on a file it should have refused")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A small mlp checkpoint folder on 8x8 gray images."""
    model = build_model("mlp", 1, 10, 8)
    return save_checkpoint(
        model, tmp_path / "m", {"model": model_config("mlp", 1, 10, 8, [0.0], [1.0])}
    )


def edit_manifest(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Change the manifest (the hash stays that of the weights, which are unchanged)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def test_a_manifest_asking_for_a_huge_model_is_refused_before_allocation(ckpt: Path) -> None:
    edit_manifest(ckpt, lambda m: m["model"]["options"].__setitem__("width", 2_000_000))
    with pytest.raises(RobustlabError, match="model of [0-9,]+ parameters, more than the limit"):
        load_checkpoint(ckpt)
    edit_manifest(ckpt, lambda m: m["model"].__setitem__("image_size", 100_000))
    with pytest.raises(RobustlabError, match="image_size 100000, more than the limit of 4096"):
        load_checkpoint(ckpt)
    edit_manifest(ckpt, lambda m: m["model"].__setitem__("image_size", 8))
    edit_manifest(ckpt, lambda m: m["model"].__setitem__("num_classes", 10**9))
    with pytest.raises(RobustlabError, match="num_classes 1000000000, more than the limit"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("target", ["/dev/zero", "fifo"])
@pytest.mark.parametrize("name", [WEIGHTS, MANIFEST])
def test_checkpoint_files_that_are_not_regular_files_are_refused(
    ckpt: Path, name: str, target: str
) -> None:
    (ckpt / name).unlink()
    if target == "fifo":
        os.mkfifo(ckpt / name)
    else:
        (ckpt / name).symlink_to(target)
    with pytest.raises(RobustlabError, match="is not a regular file"):
        load_checkpoint(ckpt)


def test_a_legacy_weights_file_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "w.pt")
    with pytest.raises(RobustlabError, match="is not a regular file"):
        load_checkpoint(tmp_path / "w.pt", arch="mlp")


def test_a_store_or_data_file_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "s.sqlite")
    for read_only in (False, True):
        with pytest.raises(RobustlabError, match="is not a regular file"):
            ResultStore(tmp_path / "s.sqlite", read_only=read_only)
    (tmp_path / "d.npz").symlink_to("/dev/zero")
    with pytest.raises(RobustlabError, match="not a file|not a regular file"):
        load_data(f"npz:{tmp_path / 'd.npz'}")


def npz_claiming(path: Path, shape: tuple[int, ...]) -> Path:
    """An .npz whose x.npy header claims ``shape`` (float32) but holds no data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": shape}
    )
    labels = io.BytesIO()
    np.save(labels, np.zeros(shape[0] if shape[0] < 10 else 4, dtype=np.int64))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", header.getvalue())
        z.writestr("y.npy", labels.getvalue())
    return path


def test_an_npz_whose_header_claims_a_huge_array_is_refused_unread(tmp_path: Path) -> None:
    path = npz_claiming(tmp_path / "huge.npz", (100_000, 3, 1000, 1000))
    assert path.stat().st_size < 2000
    with pytest.raises(RobustlabError, match=r"array x of shape \(100000, 3, 1000, 1000\)"):
        load_data(f"npz:{path}")


def test_the_data_limit_can_be_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.zeros((20, 8, 8), dtype=np.uint8)
    y = np.arange(20) % 2
    np.savez(tmp_path / "d.npz", x=x, y=y)
    assert len(load_data(f"npz:{tmp_path / 'd.npz'}").test) == 4
    monkeypatch.setenv("ROBUSTLAB_MAX_DATA_BYTES", "3000")  # the file fits, its arrays not
    assert limits().data_bytes == 3000
    with pytest.raises(RobustlabError, match="would take 5.0 KB, beyond the limit of 2.9 KB"):
        load_data(f"npz:{tmp_path / 'd.npz'}")
    monkeypatch.setenv("ROBUSTLAB_MAX_DATA_BYTES", "lots")
    with pytest.raises(RobustlabError, match="ROBUSTLAB_MAX_DATA_BYTES must be a whole number"):
        limits()


DECODE = ImageFile.ImageFile.load


def _no_big_decoding(self: Any) -> Any:
    """Image loading that fails the test if a huge image's pixels get decoded."""
    if max(self.size) > 4096:
        raise AssertionError("pixels were decoded before the size was checked")
    return DECODE(self)


def test_a_huge_png_is_refused_from_its_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("L", (8, 8)).save(tmp_path / cls / "small.png")
    Image.new("1", (10_000, 10_000)).save(tmp_path / "b" / "huge.png")  # 12 MB to draw
    monkeypatch.setattr(ImageFile.ImageFile, "load", _no_big_decoding)
    with pytest.raises(RobustlabError, match="10000x10000 pixels, beyond the limit of 4096"):
        load_data(f"folder:{tmp_path}")


def test_many_images_beyond_the_data_limit_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("L", (8, 8)).save(tmp_path / cls / f"{i}.png")
    monkeypatch.setenv("ROBUSTLAB_MAX_DATA_BYTES", str(4 * 8 * 8 * 3 * 4))
    with pytest.raises(RobustlabError, match="would take more than the limit"):
        load_data(f"folder:{tmp_path}")

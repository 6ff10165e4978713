"""torchvision:NAME datasets with the real torchvision (marked ``foreign``, see README.md):
offline, the one sentence says where torchvision finds the files without a network; with
MNIST's four idx files in that place (written here in MNIST's own format), ``robustlab eval``
of a torchvision model on torchvision:mnist reads exactly those images and labels."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from _foreign import library
from robustlab.cli import main
from robustlab.data import load_data
from robustlab.errors import RobustlabError

pytestmark = pytest.mark.foreign
tv = library("torchvision")

MEAN, STD = 0.1307, 0.3081
N_TRAIN, N_TEST = 120, 60


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache folder of this test's own, and downloads that cannot leave this machine (the
    proxies are a closed port; a machine without a network fails as well)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("ROBUSTLAB_CACHE", str(root))
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    return root


def test_offline_the_error_says_where_the_files_go(
    cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(RobustlabError) as caught:
        load_data("torchvision:mnist")
    said = str(caught.value)
    assert said.startswith("could not download torchvision:mnist (") and "\n" not in said
    assert (
        "to use it without a network put train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (unpacked) into "
        f"{cache / 'data' / 'MNIST' / 'raw'}, where torchvision finds them, or give your own "
        "copy as folder:PATH or npz:PATH"
    ) in said
    assert capsys.readouterr().out == ""  # torchvision's "Downloading ..." is not a result
    with pytest.raises(RobustlabError, match=rf"into {cache / 'data' / 'cifar-10-batches-py'},"):
        load_data("torchvision:cifar10")


def _idx(path: Path, array: np.ndarray) -> None:
    """An array of bytes in the idx format of MNIST's files: magic (0, 0, type 0x08 = unsigned
    byte, number of dimensions), each dimension as a big-endian int32, then the data."""
    head = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    path.write_bytes(head + array.astype(np.uint8).tobytes())


def _mnist_files(raw: Path) -> dict[str, np.ndarray]:
    """Small train and test splits in MNIST's four idx files; the arrays written."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (N_TRAIN, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(N_TRAIN) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (N_TEST, 28, 28)),
        # a known, uneven pattern: three times as many 7s as 2s
        "t10k-labels-idx1-ubyte": rng.permutation(
            np.repeat(np.arange(10), [6] * 2 + [3] + [6] * 4 + [9] + [6] * 2)
        ),
    }
    raw.mkdir(parents=True)
    for name, array in arrays.items():
        _idx(raw / name, array)
    return arrays


def test_eval_of_a_torchvision_model_on_mnist_from_its_idx_files(
    cache: Path, tmp_path: Path
) -> None:
    arrays = _mnist_files(cache / "data" / "MNIST" / "raw")
    x_test = arrays["t10k-images-idx3-ubyte"]
    y_test = arrays["t10k-labels-idx1-ubyte"]
    # the images and labels as written, scaled to [0, 1], in the files' order
    splits = load_data("torchvision:mnist")
    assert (len(splits.train), len(splits.test), splits.num_classes) == (N_TRAIN, N_TEST, 10)
    torch.testing.assert_close(splits.test.x, torch.from_numpy(x_test[:, None] / 255).float())
    assert splits.test.y.tolist() == y_test.tolist()
    assert splits.train.y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    # the user's 1-channel torchvision resnet18
    torch.manual_seed(0)
    net = tv.models.resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    net.eval()
    weights = tmp_path / "r18.safetensors"
    save_file(net.state_dict(), str(weights))
    record = tmp_path / "e.json"
    args = ["eval", "--model", "torchvision:resnet18", "--weights", str(weights)]
    args += ["--mean", str(MEAN), "--std", str(STD), "--data", "torchvision:mnist"]
    args += ["--attack", "pgd", "--steps", "1", "--eps", "0.1", "--json", str(record)]
    assert main([*args, "--device", "cpu", "--no-progress", "--engine", "torch"]) == 0
    result = json.loads(record.read_text())
    result = result.get("records", [result])[0]
    assert result["data"] == "torchvision:mnist/test" and result["n"] == N_TEST
    assert result["model"]["source"]["kind"] == "torchvision"
    with (tmp_path / "e.samples.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == list(range(N_TEST))
    assert [int(r["label"]) for r in rows] == y_test.tolist()
    assert np.bincount([int(r["label"]) for r in rows]).tolist() == [6, 6, 3, 6, 6, 6, 6, 9, 6, 6]
    # the model saw these very pixels: its clean predictions are the network's on the file's
    with torch.no_grad():
        logits = net((torch.from_numpy(x_test[:, None] / 255).float() - MEAN) / STD)
    assert [int(r["clean_pred"]) for r in rows] == logits.argmax(1).tolist()
    assert len(set(logits.argmax(1).tolist())) > 1  # predictions that depend on the pixels
    accuracy = float((logits.argmax(1) == torch.from_numpy(y_test)).float().mean())
    assert result["clean_accuracy"] == pytest.approx(accuracy)

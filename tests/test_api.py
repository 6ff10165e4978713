"""The Python API on what PyTorch users hold: the top-level namespace, evaluations on an (x, y)
pair, a TensorDataset or a DataLoader, and user files evaluated point for point."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import robustlab
from robustlab.cli import main
from robustlab.data import DataSplits, load_data
from robustlab.errors import RobustlabError
from robustlab.evaluate import evaluate


def test_the_namespace_is_the_public_api_and_every_name_resolves() -> None:
    assert dir(robustlab) == sorted(robustlab.__all__)
    for leaked in ("Any", "Path", "TYPE_CHECKING", "nn"):
        assert leaked not in dir(robustlab) and not hasattr(robustlab, leaked)
    for name in robustlab.__all__:
        assert getattr(robustlab, name) is not None
    assert robustlab.load is __import__("robustlab.models.checkpoint").models.checkpoint.load
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        robustlab.nope  # noqa: B018


@pytest.mark.parametrize("kind", ["pair", "arrays", "tensor_dataset", "loader"])
def test_evaluate_takes_what_pytorch_users_hold(
    kind: str, digits_net: nn.Module, digits: DataSplits
) -> None:
    test = digits.test.head(40)
    attack = robustlab.make_attack("pgd", "linf", 0.1, steps=3)
    want = evaluate(digits_net, test, attack, progress=False)
    held: object = {
        "pair": (test.x, test.y),
        "arrays": [test.x.numpy(), test.y.numpy()],
        "tensor_dataset": TensorDataset(test.x, test.y),
        "loader": DataLoader(TensorDataset(test.x, test.y), batch_size=7),
    }[kind]
    got = evaluate(digits_net, held, attack, progress=False)  # type: ignore[arg-type]
    assert got.n == want.n == 40
    assert [r["final_pred"] for r in got.samples] == [r["final_pred"] for r in want.samples]
    assert got.robust_accuracy == want.robust_accuracy


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("not data", r"cannot evaluate on str: give a robustlab Dataset, an \(x, y\) pair"),
        ((torch.rand(4, 1, 8, 8) * 2, torch.zeros(4, dtype=torch.int64)), r"in \[0, 1\]"),
        ((torch.rand(4, 1, 8, 8), torch.zeros(3, dtype=torch.int64)), r"4 samples but labels"),
        (TensorDataset(torch.rand(4, 1, 8, 8)), r"must hold \(x, y\), got 1 tensors"),
    ],
)
def test_bad_user_data_is_one_sentence(data: object, message: str, digits_net: nn.Module) -> None:
    attack = robustlab.make_attack("fgsm", "linf", 0.1)
    with pytest.raises(RobustlabError, match=message):
        evaluate(digits_net, data, attack, progress=False)  # type: ignore[arg-type]


def _samples(record: Path) -> list[dict[str, str]]:
    """The per-sample rows eval wrote beside its JSON record."""
    with open(record.with_suffix(".samples.csv"), newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("api") / "mlp"
    argv = ["train", "--arch", "mlp", "--data", "digits", "--epochs", "2", "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    return out


def test_a_file_of_test_points_is_evaluated_point_for_point(
    digits_ckpt: Path, digits: DataSplits, tmp_path: Path
) -> None:
    """500 points in an x, y file: all 500 are evaluated, in file order, not an 80/20 split."""
    points = tmp_path / "points.npz"
    x, y = digits.train.x[:500].numpy(), digits.train.y[:500].numpy()
    np.savez(points, x=x, y=y)
    out = tmp_path / "e.json"
    argv = ["eval", "--model", str(digits_ckpt), "--data", f"npz:{points}", "--eps", "0.05"]
    assert main([*argv, "--attack", "fgsm", "--n", "500", "--json", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["n"] == 500
    labels = [int(row["label"]) for row in _samples(out)]
    assert labels == y.tolist()
    assert load_data(f"npz:{points}", test_only=True).train.x.shape[0] == 0
    # a built-in source keeps its one seeded split when only evaluated
    assert torch.equal(load_data("digits", test_only=True).test.y, digits.test.y)


def test_the_file_a_model_was_trained_on_keeps_its_held_out_split(tmp_path: Path) -> None:
    points = tmp_path / "all.npz"
    source = load_data("digits").test
    np.savez(points, x=source.x.numpy(), y=source.y.numpy())
    ckpt = tmp_path / "m"
    argv = [
        "train",
        "--arch",
        "mlp",
        "--data",
        f"npz:{points}",
        "--epochs",
        "1",
        "--out",
        str(ckpt),
    ]
    assert main([*argv, "--no-progress"]) == 0
    out = tmp_path / "e.json"
    argv = ["eval", "--model", str(ckpt), "--data", f"npz:{points}", "--eps", "0.05"]
    assert main([*argv, "--attack", "fgsm", "--json", str(out), "--no-progress"]) == 0
    held_out = load_data(f"npz:{points}").test
    assert json.loads(out.read_text())["n"] == len(held_out) < len(source)


def test_what_attack_saves_is_data_eval_reads(digits_ckpt: Path, tmp_path: Path) -> None:
    adv = tmp_path / "adv.npz"
    argv = ["attack", "--model", str(digits_ckpt), "--data", "digits", "--eps", "0.1"]
    assert main([*argv, "--n", "60", "--save", str(adv), "--no-progress"]) == 0
    out = tmp_path / "e.json"
    argv = ["eval", "--model", str(digits_ckpt), "--data", f"npz:{adv}", "--eps", "0.05"]
    assert main([*argv, "--attack", "fgsm", "--json", str(out), "--no-progress"]) == 0
    saved = np.load(adv)
    rows = _samples(out)
    assert json.loads(out.read_text())["n"] == len(rows) == 60
    assert [int(row["label"]) for row in rows] == saved["y"].tolist()
    # the saved adversarial examples are what was evaluated: their clean predictions are the
    # adversarial predictions the attack recorded
    assert [int(row["clean_pred"]) for row in rows] == saved["adv_pred"].tolist()

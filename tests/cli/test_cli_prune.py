"""robustlab prune end to end on digits: the checkpoint it writes, what it says, its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from robustlab.cli import main
from robustlab.data import DataSplits
from robustlab.models.checkpoint import load_checkpoint
from robustlab.train import TrainConfig, train
from robustlab.train.prune import sparsity_of


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A width-8 resnet8 trained 4 epochs on digits."""
    out = tmp_path_factory.mktemp("base")
    cfg = TrainConfig(arch="resnet8", data="digits", epochs=4, arch_options={"width": 8})
    train(cfg, out, progress=False)
    return out


def test_prune_writes_a_checkpoint_that_says_what_was_pruned(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, record = tmp_path / "p", tmp_path / "p.json"
    args = ["prune", "--model", str(base), "--data", "digits", "--sparsity", "0.8"]
    args += ["--out", str(out), "--finetune-epochs", "1", "--json", str(record), "--no-progress"]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "pruned 80.0 % zero weights (global)" in said and "after 1 epoch" in said
    manifest = json.loads(record.read_text())
    assert manifest == json.loads((out / "manifest.json").read_text())
    base_hash = json.loads((base / "manifest.json").read_text())["weights"]["sha256"]
    assert manifest["pruning"]["base"]["sha256"] == base_hash
    assert manifest["pruning"]["finetune"]["method"]["name"] == "standard"
    assert manifest["metrics"]["clean_accuracy_before_pruning"] > 0.9
    assert (
        manifest["metrics"]["clean_accuracy"] > manifest["metrics"]["clean_accuracy_after_pruning"]
    )
    names = [layer["name"] for layer in manifest["pruning"]["layers"]]
    assert sparsity_of(load_checkpoint(out).model, names) == pytest.approx(0.8, abs=1e-3)
    assert manifest["pruning"]["model_sparsity"] < 0.8


def test_structured_target_error_pruning_from_the_command_line(
    base: Path, tmp_path: Path, digits: DataSplits
) -> None:
    out = tmp_path / "t"
    args = ["prune", "--model", str(base), "--data", "digits", "--target-error", "0.4"]
    assert main([*args, "--structured", "--out", str(out), "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["pruning"]
    assert record["scope"] == "layer" and record["structured"] and record["target_error"] == 0.4
    assert all(layer["error"] <= 0.4 for layer in record["layers"])
    assert sum(layer["filters_pruned"] for layer in record["layers"]) > 0
    assert 0 < record["filter_sparsity"] < 1


def test_adversarial_finetuning_needs_its_budget(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["prune", "--model", str(base), "--data", "digits", "--sparsity", "0.5"]
    args += ["--out", str(tmp_path / "a"), "--finetune-epochs", "1", "--finetune-method", "pgd-at"]
    assert main(args) == 2
    assert "method 'pgd-at' needs --eps" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()

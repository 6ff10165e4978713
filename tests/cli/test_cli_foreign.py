"""Foreign models on the command line (python: factories and TorchScript, which need no extra
package): eval, attack and transfer run them and record what was loaded; the commands that
save a checkpoint refuse them before any work; errors are one line."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from robustlab.cli import main
from robustlab.data import DataSplits
from robustlab.models.blocks import Normalize
from robustlab.models.checkpoint import model_config, save_checkpoint

FACTORY = """
from robustlab.models.resnet import ResNet


def make():
    return ResNet(1, 10, 8, depth=8, width=8)
"""

QUIET = ["--device", "cpu", "--no-progress", "--engine", "torch"]


@pytest.fixture(scope="module")
def files(digits_net: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The digits net three ways: a robustlab checkpoint, the user's file with a weights file
    (its network's own keys only), and a TorchScript file of the whole model."""
    root = tmp_path_factory.mktemp("foreign-cli")
    assert isinstance(digits_net, nn.Sequential)
    normalize = digits_net[0]
    assert isinstance(normalize, Normalize)
    mean, std = normalize.mean.flatten().tolist(), normalize.std.flatten().tolist()
    config = model_config("resnet8", 1, 10, 8, mean, std, {"width": 8})
    save_checkpoint(digits_net, root / "ckpt", {"model": config, "dataset": {"name": "digits"}})
    (root / "net.py").write_text(FACTORY)
    save_file(digits_net[1].state_dict(), str(root / "w.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's notice
        traced = torch.jit.trace(digits_net, torch.rand(2, 1, 8, 8))  # type: ignore[no-untyped-call]
    traced.save(str(root / "model.ts"))
    return {
        "ckpt": root / "ckpt",
        "py": root / "net.py",
        "weights": root / "w.safetensors",
        "ts": root / "model.ts",
        "mean": Path(",".join(f"{v!r}" for v in mean)),
        "std": Path(",".join(f"{v!r}" for v in std)),
    }


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_eval_of_the_users_file_equals_eval_of_the_checkpoint(
    files: dict[str, Path], tmp_path: Path
) -> None:
    common = ["eval", "--data", "digits", "--eps", "0.05", "--n", "60", "--steps", "3", *QUIET]
    assert main([*common, "--model", str(files["ckpt"]), "--json", str(tmp_path / "a.json")]) == 0
    spec = f"python:{files['py']}:make"
    args = ["--model", spec, "--weights", str(files["weights"])]
    args += ["--mean", str(files["mean"]), "--std", str(files["std"])]
    assert main([*common, *args, "--json", str(tmp_path / "b.json")]) == 0
    ours, theirs = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    ours, theirs = ours.get("records", [ours])[0], theirs.get("records", [theirs])[0]
    assert theirs["clean_accuracy"] == ours["clean_accuracy"] > 0.8
    assert theirs["robust_accuracy"] == ours["robust_accuracy"]
    source = theirs["model"]["source"]
    assert source["kind"] == "python" and source["code_sha256"] == _sha(files["py"])
    assert theirs["model"]["sha256"] == source["sha256"] == _sha(files["weights"])
    assert "source" not in ours["model"]


def test_attack_runs_a_torchscript_file_and_records_it(
    files: dict[str, Path], tmp_path: Path
) -> None:
    record = tmp_path / "attack.json"
    args = ["attack", "--model", str(files["ts"]), "--mean", "0", "--std", "1"]
    args += ["--data", "digits", "--eps", "0.1", "--n", "20", "--steps", "3"]
    args += ["--save", str(tmp_path / "adv.npz"), "--json", str(record), *QUIET]
    assert main(args) == 0
    info = json.loads(record.read_text())["model"]
    assert info["source"] == {
        "kind": "torchscript",
        "name": str(files["ts"]),
        "weights": str(files["ts"]),
        "sha256": _sha(files["ts"]),
    }
    assert len(np.load(tmp_path / "adv.npz")["x_adv"]) == 20


def test_transfer_to_a_foreign_target_on_the_users_own_points(
    files: dict[str, Path], digits: DataSplits, tmp_path: Path
) -> None:
    # 50 points of the user's own, no test split: every one is a test point (the source
    # checkpoint was trained on digits, not on this file)
    points = tmp_path / "points.npz"
    x, y = digits.test.x[:50].numpy(), digits.test.y[:50].numpy()
    np.savez(points, x=x, y=y)
    record = tmp_path / "transfer.json"
    foreign = f"python:{files['py']}:make"
    targets = f"{files['ckpt']},{foreign}"
    args = ["transfer", "--sources", str(files["ckpt"]), "--targets", targets]
    args += ["--weights", str(files["weights"]), "--mean", str(files["mean"])]
    args += ["--std", str(files["std"]), "--data", f"npz:{points}", "--n", "50"]
    args += ["--attacks", "pgd", "--steps", "2", "--eps", "0.1", "--json", str(record), *QUIET]
    assert main(args) == 0
    result = json.loads(record.read_text())
    assert result["n"] == 50
    assert result["models"][foreign]["source"]["sha256"] == _sha(files["weights"])
    # the same network through both doors: the foreign target is fooled exactly as often as
    # the source itself (white-box)
    cells = {c["target"]: c for c in result["cells"]}
    assert cells[str(files["ckpt"])]["white_box"] and not cells[foreign]["white_box"]
    for key in ("n", "success_rate", "target_clean_accuracy", "target_adversarial_accuracy"):
        assert cells[foreign][key] == cells[str(files["ckpt"])][key], key


@pytest.mark.parametrize("command", ["exits", "hpm", "prune", "quantize"])
def test_commands_that_save_a_checkpoint_refuse_python_models_before_work(
    command: str, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [command, "--model", f"python:{files['py']}:make", "--weights", str(files["weights"])]
    args += ["--mean", "0", "--std", "1", "--data", "digits", "--out", str(tmp_path / "out")]
    args += ["--sparsity", "0.5"] if command == "prune" else []
    assert main([*args, "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert f"{command} saves a robustlab checkpoint" in err and "a python model cannot be" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "does not declare the input normalisation it was trained with; pass --mean and --std"),
        (["--mean", "0", "--std", "1", "--input-size", "3,8,8"], "fails on 3x8x8 inputs"),
        (["--mean", "0", "--std", "1", "--input-size", "1,8"], "input size is channels, height"),
        (["--mean", "0,0", "--std", "1"], "--mean needs one value per input channel (1), got 2"),
        (["--mean", "0", "--std", "1", "--dataset", "cifar10"], "only apply to robustbench"),
    ],
)
def test_foreign_options_errors_are_one_line(
    extra: list[str], message: str, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["eval", "--model", f"python:{files['py']}:make", "--weights", str(files["weights"])]
    args += ["--data", "digits", "--eps", "0.1", *extra, *QUIET]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0


def test_foreign_options_on_a_checkpoint_are_refused(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["eval", "--model", str(files["ckpt"]), "--mean", "0.5", "--std", "0.2"]
    assert main([*args, "--data", "digits", "--eps", "0.1", *QUIET]) == 2
    assert "only apply to foreign models" in capsys.readouterr().err


def test_sloth_says_a_foreign_model_needs_exits_first(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["sloth", "--model", f"python:{files['py']}:make", "--data", "digits"]
    assert main([*args, "--eps", "0.1", "--device", "cpu", "--no-progress"]) == 2
    assert "not a multi-exit checkpoint; attach exits first" in capsys.readouterr().err

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
from robustlab.models.resnet import ResNet

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


@pytest.fixture(scope="module")
def two(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two python: members of one transfer matrix (the same code in two files) and their
    weights: the trained digits net, in a file whose name has '=' in it, and an untrained
    net; plus the checkpoint of the trained one (the source)."""
    root = tmp_path_factory.mktemp("two-members")
    (root / "net2.py").write_text(FACTORY)
    trained = root / "x=trained.safetensors"
    trained.write_bytes(files["weights"].read_bytes())
    torch.manual_seed(1)
    save_file(ResNet(1, 10, 8, depth=8, width=8).state_dict(), str(root / "untrained.safetensors"))
    return {
        "A": f"python:{files['py']}:make",
        "B": f"python:{root / 'net2.py'}:make",
        "trained": str(trained),
        "untrained": str(root / "untrained.safetensors"),
        "ckpt": str(files["ckpt"]),
    }


def _transfer(two: dict[str, str], *extra: str) -> list[str]:
    """A small transfer of PGD from the checkpoint to both python: members on digits."""
    args = ["transfer", "--sources", two["ckpt"], "--targets", f"{two['A']},{two['B']}"]
    args += ["--data", "digits", "--n", "60", "--attacks", "pgd", "--steps", "2", "--eps", "0.1"]
    return [*args, *(e.format(**two) for e in extra), *QUIET]


def test_transfer_gives_each_foreign_member_its_own_options(
    files: dict[str, Path], two: dict[str, str], tmp_path: Path
) -> None:
    # A: the bare --weights (a file name with '=' in it) and the bare normalisation;
    # B: its own weights and normalisation
    mean, std = str(files["mean"]), str(files["std"])
    record = tmp_path / "t.json"
    args = _transfer(
        two,
        *["--weights", "{B}={untrained}", "--weights", "{trained}", "--mean", mean],
        *["--mean", "{B}=0", "--std", "{B}=1", "--std", std, "--json", str(record)],
    )
    assert main(args) == 0
    result = json.loads(record.read_text())
    a, b = result["models"][two["A"]], result["models"][two["B"]]
    assert a["source"]["weights"] == two["trained"]
    assert a["source"]["sha256"] == _sha(Path(two["trained"]))
    assert b["source"]["weights"] == two["untrained"]
    assert b["source"]["sha256"] == _sha(Path(two["untrained"]))
    assert a["options"] == {
        "weights": two["trained"],
        "mean": [float(v) for v in mean.split(",")],
        "std": [float(v) for v in std.split(",")],
    }
    assert b["options"] == {"weights": two["untrained"], "mean": [0.0], "std": [1.0]}
    cells = {c["target"]: c for c in result["cells"]}
    # A is the source's own network (the same clean accuracy); B is untrained
    assert cells[two["A"]]["target_clean_accuracy"] > 0.8
    assert cells[two["B"]]["target_clean_accuracy"] < 0.5
    assert "options" not in result["models"][two["ckpt"]]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--weights", "python:nope.py:make={trained}"],
            "'python:nope.py:make' in --weights python:nope.py:make=",
        ),
        (
            ["--weights", "{A}={trained}", "--weights", "{A}={untrained}"],
            "--weights is given twice for",
        ),
        (
            ["--mean", "0", "--mean", "0.5"],
            "--mean is given twice without a member name (0 and 0.5)",
        ),
        (["--std", "{ckpt}=1"], "which is not a foreign model (a zoo architecture or a checkpoint"),
        (
            [
                "--weights",
                "{A}={trained}",
                "--weights",
                "{B}={trained}",
                "--weights",
                "{untrained}",
            ],
            "so --weights {untrained}, given without a member name, applies to none",
        ),
        (["--weights", "{A}="], "--weights {A}= gives {A} no value"),
        (["--num-classes", "{B}=ten"], "--num-classes must be a whole number, got 'ten'"),
    ],
)
def test_transfer_refuses_bad_member_options_before_any_work(
    extra: list[str],
    message: str,
    two: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    record = tmp_path / "t.json"
    assert main([*_transfer(two, *extra), "--json", str(record)]) == 2
    err = capsys.readouterr().err.strip()
    assert message.format(**two) in err and err.count("\n") == 0, err
    assert not record.exists()


def test_transfer_refuses_options_for_a_zoo_member_or_without_foreign_ones(
    two: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    args = ["transfer", "--sources", "mlp", "--targets", two["A"], "--data", "digits"]
    args += ["--weights", f"mlp={two['trained']}", "--cache", str(cache), *QUIET]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "--weights given for mlp, which is not a foreign model" in err and "\n" not in err
    assert not cache.exists() or not any(cache.iterdir())  # nothing trained
    args = ["transfer", "--sources", two["ckpt"], "--targets", two["ckpt"], "--mean", "0"]
    assert main([*args, "--data", "digits", *QUIET]) == 2
    assert "--mean applies to foreign sources and targets, and there are none" in (
        capsys.readouterr().err
    )


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

"""robustlab hpm: end to end on digits (a checkpoint every command loads), and its errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import robustlab
from robustlab.cli import build_parser, main
from robustlab.data import load_data
from robustlab.models import build_model
from robustlab.models.checkpoint import file_sha256, model_config, save_checkpoint
from robustlab.models.hpm import HPMClassifier, HPMConfig, with_mode
from robustlab.models.structure import surrogates_for
from robustlab.train.hpm import HPMTrainConfig

QUICK = ["--data", "digits", "--eps", "0.1", "--steps", "2", "--epochs", "1"]
QUICK += ["--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hpm") / "base"
    args = ["train", "--arch", "resnet8", "--data", "digits", "--epochs", "4"]
    args += ["--arch-option", "width=8", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def hpm(base: Path) -> tuple[Path, dict[str, Any]]:
    out, record = base.parent / "hpm", base.parent / "hpm.json"
    args = ["hpm", "--model", str(base), "--out", str(out), "--json", str(record), *QUICK]
    args += ["--mix", "0.4", "--momentum", "0.8", "--eval-batch-size", "100"]
    assert main(args) == 0
    return out, json.loads(record.read_text())


def test_hpm_writes_a_checkpoint_that_robustlab_load_rebuilds(
    base: Path, hpm: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    out, manifest = hpm
    model = robustlab.load(out)
    assert isinstance(model, HPMClassifier) and model.mode == "mix"
    section = manifest["model"]["hpm"]
    assert section["base_sha256"] == file_sha256(base / "model.safetensors")
    assert section["config"]["mix"] == 0.4 and section["config"]["momentum"] == 0.8
    assert section["feature_dim"] == model.feature_dim == 32
    assert manifest["base"]["path"] == str(base)
    metrics = manifest["metrics"]
    assert metrics["eval_batch_size"] == 100
    assert metrics["clean_accuracy"] == metrics["clean_accuracy_hpm_mix"]
    for key in ("base_fc", "fc", "hpm_mix", "hpm_ema"):
        assert 0.8 < metrics[f"clean_accuracy_{key}"] <= 1.0
    assert manifest["training"]["hpm"]["config"]["tune"] == "head"
    assert not torch.equal(model.prototypes, torch.zeros_like(model.prototypes))


def test_an_hpm_checkpoint_is_evaluated_by_eval(
    hpm: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, _ = hpm
    record = tmp_path / "eval.json"
    args = ["eval", "--model", str(out), "--data", "digits", "--eps", "0.1", "--steps", "2"]
    args += ["--n", "20", "--batch-size", "20", "--device", "cpu", "--no-progress"]
    assert main([*args, "--json", str(record)]) == 0
    result = json.loads(record.read_text())
    assert result["n"] == 20 and result["batch_size"] == 20
    # the record says which head settings (mode included) the number belongs to
    assert result["model"]["hpm"] == {
        **json.loads((out / "manifest.json").read_text())["model"]["hpm"]["config"]
    }
    assert result["model"]["hpm"]["mode"] == "mix"


@pytest.mark.parametrize("batch_size", [1, 10])
def test_eval_runs_msa_on_an_hpm_checkpoint_with_its_five_surrogates(
    hpm: tuple[Path, dict[str, Any]], tmp_path: Path, batch_size: int
) -> None:
    out, _ = hpm
    record = tmp_path / "msa.json"
    args = ["eval", "--model", str(out), "--data", "digits", "--protocol", "msa"]
    args += ["--eps", "0.1", "--attacks", "apgd-ce,square", "--n", "10"]
    args += ["--batch-size", str(batch_size), "--device", "cpu", "--no-progress"]
    assert main([*args, "--json", str(record)]) == 0
    rec = json.loads(record.read_text())
    stages = ["plain", "fc", "l2-ema", "hpm-ste", "hpm-detached", "hpm-soft"]
    assert rec["kind"] == "msa" and [s["stage"] for s in rec["stages"]] == stages
    assert rec["batch_size"] == batch_size and rec["model"]["hpm"]["mode"] == "mix"
    # Square only queries the real forward: it runs in the plain stage alone
    attacks = [p["attack"] for p in rec["per_attack"]]
    assert attacks == ["plain/apgd-ce", "plain/square", *(f"{s}/apgd-ce" for s in stages[1:])]
    assert rec["robust_accuracy"] <= rec["plain_robust_accuracy"] <= rec["clean_accuracy"]
    assert rec["clean_accuracy"] >= 0.8


def test_eval_runs_an_hpm_checkpoint_in_ema_mode_and_says_so(
    hpm: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, _ = hpm
    args = ["eval", "--model", str(out), "--data", "digits", "--eps", "0.1", "--steps", "2"]
    args += ["--n", "20", "--batch-size", "20", "--device", "cpu", "--no-progress"]
    records = {}
    for mode in ("mix", "ema"):
        path = tmp_path / f"{mode}.json"
        assert main([*args, "--hpm-mode", mode, "--json", str(path)]) == 0
        records[mode] = json.loads(path.read_text())
        assert records[mode]["model"]["hpm"]["mode"] == mode
        assert records[mode]["model"]["hpm"]["mix"] == 0.4  # the rest of the head's settings
    model = robustlab.load(out)
    assert isinstance(model, HPMClassifier)
    x = torch.as_tensor(load_data("digits").test.x[:20])
    with torch.no_grad(), with_mode(model, "ema"):
        ema = model(x).argmax(1)
    y = load_data("digits").test.y[:20]
    assert records["ema"]["clean_accuracy"] == int((ema == y).sum()) / 20


def test_hpm_mode_on_a_plain_checkpoint_is_one_sentence(
    base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["eval", "--model", str(base), "--data", "digits", "--eps", "0.1", "--n", "4"]
    assert main([*args, "--hpm-mode", "ema", "--device", "cpu", "--no-progress"]) == 2
    assert "--hpm-mode needs an HPM checkpoint" in capsys.readouterr().err


def test_each_hpm_surrogate_takes_the_checkpoints_raw_inputs(
    hpm: tuple[Path, dict[str, Any]], digits: Any
) -> None:
    model = robustlab.load(hpm[0])
    x, y = digits.test.x[:100], digits.test.y[:100]
    with torch.no_grad():
        agree = {n: float((s(x).argmax(1) == y).float().mean()) for n, s in surrogates_for(model)}
    assert all(a >= 0.8 for a in agree.values()), agree  # fed pixels, not normalised inputs


@pytest.mark.parametrize(
    ("extra", "sentence"),
    [
        (["--mix", "1.5"], "mixing weight must lie in [0, 1], got 1.5"),
        (["--momentum", "1"], "momentum must lie strictly between 0 and 1, got 1.0"),
        (["--scale", "0"], "logit scale must be a finite number > 0"),
        (["--eval-batch-size", "0"], "batch size must be >= 1, got 0"),
        (["--tune", "body"], "unknown --tune 'body'; use head or last-block"),
        (["--mode", "batch"], "unknown HPM mode 'batch'; use mix or ema"),
    ],
)
def test_bad_options_are_one_sentence(
    base: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    sentence: str,
) -> None:
    out = tmp_path / "o"
    assert main(["hpm", "--model", str(base), "--out", str(out), *QUICK, *extra]) == 2
    err = capsys.readouterr().err
    assert sentence in err and err.count("\n") == 1
    assert not (out / "manifest.json").exists()


def test_an_hpm_checkpoint_is_not_wrapped_twice(
    hpm: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = hpm
    assert main(["hpm", "--model", str(out), "--out", str(tmp_path / "o"), *QUICK]) == 2
    assert "already has an HPM head; give the base's checkpoint" in capsys.readouterr().err


def test_a_model_with_more_classes_than_the_data_is_refused(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = (torch.rand(40, 8, 8) * 255).to(torch.uint8).numpy()
    y = (torch.arange(40) % 4).numpy()
    np.savez(tmp_path / "four.npz", x=x, y=y)
    args = ["hpm", "--model", str(base), "--out", str(tmp_path / "o"), *QUICK]
    assert main([*args, "--data", f"npz:{tmp_path / 'four.npz'}"]) == 2
    assert "classes [4, 5, 6, 7, 8, 9] have none" in capsys.readouterr().err


def test_a_model_with_fewer_classes_than_the_data_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    five = save_checkpoint(
        build_model("mlp", 1, 5, 8),
        tmp_path / "five",
        {"model": model_config("mlp", 1, 5, 8, [0.0], [1.0])},
    )
    assert main(["hpm", "--model", str(five), "--out", str(tmp_path / "o"), *QUICK]) == 2
    assert "digits has 10 classes but the model predicts 5" in capsys.readouterr().err


def test_an_ema_checkpoint_is_fine_tuned_and_saved_in_ema_mode(base: Path, tmp_path: Path) -> None:
    out, record = tmp_path / "ema", tmp_path / "ema.json"
    args = ["hpm", "--model", str(base), "--out", str(out), *QUICK, "--mode", "ema"]
    assert main([*args, "--json", str(record)]) == 0
    model = robustlab.load(out)
    assert isinstance(model, HPMClassifier) and model.mode == "ema"
    metrics = json.loads(record.read_text())["metrics"]
    assert metrics["clean_accuracy"] == metrics["clean_accuracy_hpm_ema"]


def test_the_command_defaults_are_the_library_defaults() -> None:
    """The parser is built without torch, so it writes the defaults out: they must agree."""
    args = build_parser().parse_args(["hpm", "--model", "m", "--out", "o"])
    head = HPMConfig(
        mix=args.mix,
        momentum=args.momentum,
        scale=args.scale,
        temperature=args.temperature,
        ste=not args.no_ste,
        mode=args.mode,
    )
    assert head == HPMConfig()
    tune = HPMTrainConfig(
        eps=args.eps,
        norm=args.norm,
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        tune=args.tune,
        fc_weight=args.fc_weight,
        seed=args.seed,
    )
    assert tune == HPMTrainConfig()

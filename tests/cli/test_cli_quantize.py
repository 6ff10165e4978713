"""robustlab quantize end to end on digits: the checkpoint it writes, what it says, and that
eval then judges the int8 model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from robustlab.cli import main
from robustlab.models.checkpoint import load_checkpoint
from robustlab.models.quantized import OBSERVERS, QuantizedModel
from robustlab.train import TrainConfig, train


def test_quantize_writes_an_int8_checkpoint_that_eval_uses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "base"
    cfg = TrainConfig(arch="resnet8", data="digits", epochs=3, arch_options={"width": 8})
    train(cfg, base, progress=False)
    out = tmp_path / "q"
    args = ["quantize", "--model", str(base), "--data", "digits", "--out", str(out)]
    assert main([*args, "--calibration-samples", "64", "--json", str(tmp_path / "q.json")]) == 0
    said = capsys.readouterr().out
    assert said.startswith("int8 (x86): clean accuracy") and str(out) in said
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == json.loads((tmp_path / "q.json").read_text())
    assert manifest["quantization"]["calibration"]["samples"] == 64
    assert manifest["quantization"]["observers"]["file"] == OBSERVERS
    base_hash = json.loads((base / "manifest.json").read_text())["weights"]["sha256"]
    assert manifest["quantization"]["base"]["sha256"] == base_hash
    assert isinstance(load_checkpoint(out).model, QuantizedModel)
    record = tmp_path / "e.json"
    args = ["eval", "--model", str(out), "--data", "digits", "--eps", "0.1", "--attack", "pgd"]
    args += ["--steps", "5", "--n", "50", "--device", "cpu", "--no-progress"]
    assert main([*args, "--json", str(record)]) == 0
    result = json.loads(record.read_text())
    assert result["clean_accuracy"] >= 0.8 and result["robust_accuracy"] < result["clean_accuracy"]
    assert "float" in result["model"]["attacked_through"]  # the record says how it was attacked


def test_a_bad_calibration_size_gets_a_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["quantize", "--model", "m", "--data", "digits", "--out", str(tmp_path / "q")]
    assert main([*args, "--calibration-samples", "0"]) == 2
    assert "--calibration-samples must be >= 1, got 0" in capsys.readouterr().err

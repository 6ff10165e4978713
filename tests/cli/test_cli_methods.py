"""robustlab train with fast-at, free-at and --early-stop end to end on digits, and method
options that do not apply refused in one sentence with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from robustlab.cli import main

BASE = ["train", "--arch", "mlp", "--data", "digits", "--no-progress"]


def test_fast_at_with_early_stopping_names_the_kept_epoch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, record = tmp_path / "fast", tmp_path / "fast.json"
    argv = [*BASE, "--method", "fast-at", "--eps", "0.1", "--epochs", "2", "--early-stop"]
    assert main([*argv, "--out", str(out), "--json", str(record)]) == 0
    manifest = json.loads(record.read_text())
    training = manifest["training"]
    best = training["best_epoch"]
    assert best in (1, 2) and f"(weights of epoch {best})" in capsys.readouterr().out
    assert training["overfit_drop"] == 0.2 and training["early_stop"] is True
    assert training["alpha_ratio"] == 1.0  # the recipe's step, 1.0 eps
    assert training["method_config"]["alpha"] == pytest.approx(0.1)
    assert training["held_out_check"]["points"] == 200
    assert manifest["dataset"]["calibration_size"] == 200  # held out by default


def test_free_at_takes_its_replays(tmp_path: Path) -> None:
    out, record = tmp_path / "free", tmp_path / "free.json"
    argv = [*BASE, "--method", "free-at", "--eps", "0.1", "--epochs", "1", "--replays", "2"]
    assert main([*argv, "--calibration", "100", "--out", str(out), "--json", str(record)]) == 0
    manifest = json.loads(record.read_text())
    assert manifest["training"]["method_config"]["replays"] == 2
    assert manifest["dataset"]["calibration_size"] == 100  # --calibration holds out, no check
    assert "held_out_check" not in manifest["training"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--beta", "3"], "--beta does not apply to method 'standard' (it takes no options)"),
        (["--eps", "0.1"], "--eps does not apply to method 'standard'"),
        (["--early-stop"], "--early-stop does not apply to method 'standard'"),
        (
            ["--method", "pgd-at", "--eps", "0.1", "--replays", "2"],
            "--replays does not apply to method 'pgd-at' (its options: --eps, --norm, --steps, "
            "--alpha-ratio, --eps-warmup, --early-stop, --overfit-drop)",
        ),
        (["--method", "pgd-at", "--eps", "0.1", "--beta", "2"], "--beta does not apply"),
        (["--method", "fast-at", "--eps", "0.1", "--steps", "3"], "--steps does not apply"),
        (["--method", "free-at", "--eps", "0.1", "--alpha-ratio", "2"], "--alpha-ratio does not"),
        (["--method", "free-at", "--eps", "0.1", "--replays", "0"], "needs replays >= 1"),
        (
            ["--method", "pgd-at", "--eps", "0.1", "--early-stop", "--calibration", "0"],
            "hold some out (--calibration N, N >= 1)",
        ),
        (["--method", "sgd"], "unknown training method 'sgd'"),
    ],
)
def test_bad_method_options_are_one_sentence_and_exit_2(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main([*BASE, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("robustlab: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()

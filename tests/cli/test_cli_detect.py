"""robustlab detect fit|score|eval end to end on digits (artifact, per-input scores, the eval
record with adaptive numbers, the store and the report), and one-sentence errors (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from robustlab.cli import main
from robustlab.store import ResultStore


def _train(out: Path, seed: int) -> Path:
    """A width-8 resnet8 trained 3 epochs on digits, 500 training samples held out."""
    args = ["train", "--arch", "resnet8", "--data", "digits", "--epochs", "3", "--seed", str(seed)]
    args += ["--arch-option", "width=8", "--calibration", "500", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two digits models (another seed: other weights)."""
    root = tmp_path_factory.mktemp("detect-cli")
    return _train(root / "a", 0), _train(root / "b", 1)


@pytest.fixture(scope="module")
def artifact(nets: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Detectors fitted on the first model's held-out split."""
    out = tmp_path_factory.mktemp("detect-art") / "det"
    assert (
        main(["detect", "fit", "--model", str(nets[0]), "--data", "digits", "--out", str(out)]) == 0
    )
    return out


def test_fit_uses_the_split_the_model_held_out(artifact: Path) -> None:
    meta: dict[str, Any] = json.loads((artifact / "detector.json").read_text())
    assert meta["held_out"] == {
        "split": "calibration",
        "size": 500,
        "seed": 0,
        "seen_by_model": False,
    }
    assert meta["fit"]["samples"] == 300 and meta["fit"]["threshold_samples"] == 200
    assert set(meta["detectors"]) == {"mahalanobis", "lid", "squeeze", "margin"}


def test_score_gives_each_input_its_scores_and_flags(
    nets: tuple[Path, Path], artifact: Path, tmp_path: Path
) -> None:
    out = tmp_path / "s.json"
    args = ["detect", "score", "--model", str(nets[0]), "--detector", str(artifact)]
    assert main([*args, "--data", "digits", "--n", "30", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [r["index"] for r in record["inputs"]] == list(range(30))
    for row in record["inputs"]:
        for name, score in row["scores"].items():
            assert row["flagged"][name] == (score > record["thresholds"][name])


def test_eval_records_both_columns_and_the_report_shows_them(
    nets: tuple[Path, Path], artifact: Path, tmp_path: Path
) -> None:
    out, store = tmp_path / "e.json", tmp_path / "r.sqlite"
    args = ["detect", "eval", "--model", str(nets[0]), "--detector", str(artifact)]
    args += ["--data", "digits", "--attacks", "pgd,square,transfer", "--source", str(nets[1])]
    args += ["--eps", "0.2", "--n", "40", "--steps", "10", "--queries", "50"]
    args += ["--adaptive-steps", "10", "--json", str(out), "--store", str(store), "--no-progress"]
    assert main(args) == 0
    record = json.loads(out.read_text())
    assert record["kind"] == "detect" and record["threat_model"] == {"norm": "linf", "eps": 0.2}
    assert [a["name"] for a in record["attacks"]] == ["pgd", "square", "transfer"]
    rows = {(r["detector"], r["attack"]) for r in record["results"]}
    assert rows == {
        (d, a) for d in record["detectors"] for a in ("pgd", "square", "transfer", "adaptive")
    }
    for both in record["side_by_side"].values():
        assert set(both) == {"non_adaptive", "adaptive", "system_robust_accuracy_all_attacks"}
    assert record["adaptive"]["attack"]["steps"] == 10
    assert "command" in record
    report = tmp_path / "r.html"
    assert main(["report", "--store", str(store), "--out", str(report)]) == 0
    text = report.read_text()
    assert "Adversarial-input detectors" in text and "adaptive attack" in text
    assert ResultStore(store).records(kind="detect")[0]["results"] == record["results"]


def _error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one-line error a command prints, after checking it exits with 2."""
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("robustlab: error: ") and err.count(". ") == 0
    return err


def test_scoring_with_another_model_is_refused(
    nets: tuple[Path, Path], artifact: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "detect",
        "score",
        "--model",
        str(nets[1]),
        "--detector",
        str(artifact),
        "--data",
        "digits",
    ]
    assert "was fitted on" in _error(args, capsys)


def test_inputs_of_another_shape_are_refused(
    nets: tuple[Path, Path], artifact: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "detect",
        "score",
        "--model",
        str(nets[0]),
        "--detector",
        str(artifact),
        "--data",
        "mnist5k",
    ]
    assert "takes 1x8x8 inputs but mnist5k has 1x28x28 images" in _error(args, capsys)


def test_too_few_held_out_samples_are_refused_with_the_number_needed(
    nets: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "detect",
        "fit",
        "--model",
        str(nets[0]),
        "--data",
        "digits",
        "--out",
        str(tmp_path / "d"),
    ]
    err = _error([*args, "--calibration", "60", "--detectors", "mahalanobis"], capsys)
    assert "Mahalanobis needs at least 43" in err and "at least 72 are needed" in err


def test_transfer_without_a_source_is_refused(
    nets: tuple[Path, Path], artifact: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "detect",
        "eval",
        "--model",
        str(nets[0]),
        "--detector",
        str(artifact),
        "--data",
        "digits",
    ]
    err = _error([*args, "--attacks", "pgd,transfer", "--eps", "0.1"], capsys)
    assert "needs --source" in err


def test_test_tail_fits_on_the_last_test_points_and_keeps_them_out_of_scoring(
    nets: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "d"
    args = ["detect", "fit", "--model", str(nets[0]), "--data", "digits", "--out", str(out)]
    assert main([*args, "--test-tail", "250", "--detectors", "mahalanobis,margin"]) == 0
    meta = json.loads((out / "detector.json").read_text())
    assert meta["held_out"] == {"split": "test", "first": 109, "size": 250, "seen_by_model": False}
    assert main([*args, "--test-tail", "250", "--detectors", "margin"]) == 0  # refit, same folder
    assert list(json.loads((out / "detector.json").read_text())["detectors"]) == ["margin"]
    score = ["detect", "score", "--model", str(nets[0]), "--detector", str(out), "--data", "digits"]
    assert main([*score, "--n", "109"]) == 0
    err = _error([*score, "--n", "110"], capsys)
    assert "--n must be between 1 and 109 (the test points the detectors were not fitted on)" in err

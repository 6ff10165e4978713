"""``robustlab compress`` end to end on a digits checkpoint: JSON, store record, report, errors."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from robustlab.analysis.compress import ALIGNMENT_POINTS
from robustlab.cli import build_parser, main
from robustlab.data import DataSplits
from robustlab.models.structure import weight_layers
from robustlab.report.html import render_report
from robustlab.store import ResultStore
from robustlab.train import TrainConfig, TrainResult, train

FAST = ["--data", "digits", "--n", "40", "--steps", "5", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def trained(digits: DataSplits, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """A resnet8 (width 8) trained 2 epochs on digits, as a checkpoint folder."""
    out = tmp_path_factory.mktemp("compress-ckpt")
    cfg = TrainConfig(arch="resnet8", data="digits", epochs=2, arch_options={"width": 8})
    return train(cfg, out, splits=digits, progress=False)


def test_compress_writes_json_store_and_report(
    trained: TrainResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, db = tmp_path / "c.json", tmp_path / "s.sqlite"
    args = ["compress", "--model", str(trained.path), *FAST, "--json", str(out)]
    assert main([*args, "--store", str(db), "--kappa", "0.25,0.1"]) == 0
    record = json.loads(out.read_text())
    names = [n for n, _ in weight_layers(trained.model)]
    assert [m["name"] for m in record["layers"]] == names
    state = trained.model.state_dict()
    for m in record["layers"]:
        assert list(state[f"{m['name']}.weight"].shape) == m["shape"]
        assert set(m["neuron_compressibility"]) == {"0.1", "0.25"}
        for key in ("stable_rank", "spectral_norm", "frobenius_norm", "spectral_compressibility"):
            assert key in m
    assert record["model"]["sha256"] == trained.manifest["weights"]["sha256"]
    assert record["threat_models"] == {"linf": 0.3, "l2": 0.5714}  # the digits defaults
    assert set(record["bound"]) == set(record["gap"]) == {"linf", "l2"}
    for norm in ("linf", "l2"):
        assert record["bound"][norm]["bound"] >= record["gap"][norm]["max"]
        assert record["bound"][norm]["kappa"] == 0.1
    assert [r["name"] for r in record["representations"]] == [
        "stem",
        *(f"blocks.{i}" for i in range(3)),
    ]
    assert set(record["seconds"]) >= {"forward", "svd", "attack", "total"}
    printed = capsys.readouterr().out
    assert "net.blocks.1.shortcut.0" in printed and "loss rise bound" in printed
    stored = ResultStore(db).records(kind="compress")
    assert len(stored) == 1 and stored[0]["label"] == trained.path.name
    html = render_report(ResultStore(db), tmp_path / "r.html").read_text()
    assert f"Compressibility: {trained.path.name}" in html
    assert "net.stem.0" in html and "data:image/png;base64" in html


def test_budgets_given_on_the_command_line_are_used(trained: TrainResult, tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    args = ["compress", "--model", str(trained.path), *FAST, "--json", str(out)]
    assert main([*args, "--eps-linf", "0.05", "--eps-l2", "0.2"]) == 0
    record = json.loads(out.read_text())
    assert record["gap"]["linf"]["eps"] == 0.05 and record["bound"]["l2"]["eps"] == 0.2


@pytest.mark.parametrize(
    ("extra", "sentence"),
    [
        (["--kappa", "1.5"], "kappa must be a fraction strictly between 0 and 1"),
        (["--kappa", "0"], "kappa must be a fraction strictly between 0 and 1"),
        (["--eps-l2", "0"], "the l2 budget must be a finite number > 0"),
        (["--n", "0"], "--n must be >= 1"),
        (["--alignment-points", "-1"], "--alignment-points must be >= 0, got -1"),
    ],
)
def test_bad_options_get_one_sentence(
    trained: TrainResult,
    extra: list[str],
    sentence: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "c.json"
    assert main(["compress", "--model", str(trained.path), *FAST, "--json", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert sentence in err and err.count("\n") == 1
    assert not out.exists()


def test_alignment_points_zero_skips_the_alignment_term(
    trained: TrainResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "c.json"
    args = ["compress", "--model", str(trained.path), *FAST, "--json", str(out)]
    assert main([*args, "--alignment-points", "0"]) == 0
    record = json.loads(out.read_text())
    assert record["alignment_points"] == 0
    assert all(record["bound"][n]["alignment"] is None for n in ("linf", "l2"))
    assert "alignment not measured" in capsys.readouterr().out
    assert main([*args, "--alignment-points", "3", "--overwrite"]) == 0
    record = json.loads(out.read_text())
    assert record["alignment_points"] == 3 and record["bound"]["l2"]["alignment"] > 0


def test_the_help_states_the_default_alignment_points() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    compress = sub.choices["compress"]
    helps = {a.dest: a.help for a in compress._actions}
    found = re.search(r"default: (\d+)", str(helps["alignment_points"]))
    assert found is not None and int(found.group(1)) == ALIGNMENT_POINTS

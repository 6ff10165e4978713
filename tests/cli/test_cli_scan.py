"""robustlab poison and robustlab scan end to end on digits: the poisoned folder, a model
trained on it, the scan's record scored against the manifest, the store and the report; and
one clear sentence with exit code 2 for each bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from robustlab.cli import main
from robustlab.data import load_data
from robustlab.train import TrainConfig, train


@pytest.fixture(scope="module")
def poisoned_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """robustlab poison on digits (5 %, patch, target 0) and a small resnet8 trained on the
    written poisoned.npz (2 epochs: the record's shape is checked here, not the detection)."""
    root = tmp_path_factory.mktemp("poison-cli")
    out = root / "p"
    code = main(
        ["poison", "--data", "digits", "--target-class", "0", "--rate", "0.05", "--out", str(out)]
    )
    assert code == 0
    spec = f"npz:{out / 'poisoned.npz'}"
    cfg = TrainConfig(arch="resnet8", data=spec, epochs=2, arch_options={"width": 8})
    train(cfg, root / "model", splits=load_data(spec), progress=False)
    return out, root / "model"


def test_scan_record_is_scored_against_the_manifest_and_reaches_the_report(
    poisoned_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, model = poisoned_run
    manifest = json.loads((out / "poison.json").read_text())
    assert manifest["poisoned_count"] == len(manifest["poisoned_indices"]) == round(0.05 * 1438)
    args = ["scan", "--model", str(model), "--data", f"npz:{out / 'poisoned.npz'}"]
    store, record_path = tmp_path / "s.db", tmp_path / "scan.json"
    assert main([*args, "--json", str(record_path), "--store", str(store)]) == 0
    printed = capsys.readouterr().out
    assert "precision" in printed and "recall" in printed
    record = json.loads(record_path.read_text())
    truth = set(manifest["poisoned_indices"])
    assert record["kind"] == "scan" and record["train_size"] == 1438
    assert all(0 <= i < 1438 for i in record["flagged"])
    union = set(record["methods"]["activation_clustering"]["flagged"]) | set(
        record["methods"]["spectral_signatures"]["flagged"]
    )
    assert set(record["flagged"]) == union
    hits = len(set(record["flagged"]) & truth)
    assert record["detection"]["union"]["true_positives"] == hits
    assert record["detection"]["union"]["recall"] == hits / len(truth)
    assert record["poison"]["target"] == 0 and record["poison"]["manifest"].endswith("poison.json")
    for method in record["methods"].values():
        assert [row["class"] for row in method["classes"]] == list(range(10))
    report = tmp_path / "r.html"
    assert main(["report", "--store", str(store), "--out", str(report)]) == 0
    html = report.read_text()
    assert "Backdoor scan" in html and "spectral signatures" in html


def test_scan_without_a_manifest_says_so(
    poisoned_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, model = poisoned_run
    record_path = tmp_path / "scan.json"
    args = ["scan", "--model", str(model), "--data", "digits", "--methods", "ac"]
    assert main([*args, "--json", str(record_path)]) == 0
    record = json.loads(record_path.read_text())
    assert "detection" not in record and list(record["methods"]) == ["activation_clustering"]
    assert "no poison manifest" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--target-class", "0", "--rate", "1.5"], "strictly between 0 and 1"),
        (["--target-class", "0", "--rate", "0"], "strictly between 0 and 1"),
        (["--target-class", "12", "--rate", "0.05"], "target class 12 does not exist"),
        (["--target-class", "3", "--source-class", "3", "--rate", "0.05"], "must differ"),
        (["--target-class", "3", "--source-class", "three", "--rate", "0.05"], "class number"),
        (["--target-class", "3", "--rate", "0.05", "--trigger", "star"], "unknown trigger"),
    ],
)
def test_bad_poison_input_is_one_sentence_and_exit_2(
    extra: list[str], said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "p"
    assert main(["poison", "--data", "digits", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and "\n" not in err and "Traceback" not in err
    assert not (out / "poisoned.npz").exists()


def test_bad_scan_input_is_one_sentence_and_exit_2(
    poisoned_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, model = poisoned_run
    base = ["scan", "--model", str(model)]
    assert main([*base, "--data", "digits", "--methods", "ac,strip"]) == 2
    assert "unknown scan method strip" in capsys.readouterr().err
    assert main([*base, "--data", "digits", "--expected-rate", "2"]) == 2
    assert "expected poisoning rate" in capsys.readouterr().err
    # a manifest scores only the very file it was written with
    assert main([*base, "--data", "digits", "--manifest", str(out / "poison.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "describes the poisoned.npz it was written with, not digits" in err
    assert "\n" not in err

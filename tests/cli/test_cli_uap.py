"""robustlab uap: end to end on digits (array, image, record, store, report), reruns into the
same folder, and one-sentence errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import robustlab
from robustlab.attacks.universal import UAPConfig, score_uap, universal_perturbation
from robustlab.cli import main
from robustlab.data import load_data
from robustlab.report.plots import is_robustlab_png
from robustlab.store import ResultStore


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uap") / "net"
    args = ["train", "--arch", "resnet8", "--data", "digits", "--epochs", "4"]
    args += ["--arch-option", "width=8", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    return out


def _uap(net: Path, out: Path, *extra: str) -> list[str]:
    """The uap command line on digits (SGD, fast) writing into ``out``."""
    args = ["uap", "--model", str(net), "--data", "digits", "--method", "sgd", "--norm"]
    return [
        *args,
        "linf",
        "--eps",
        "0.2",
        "--n-craft",
        "200",
        "--n-eval",
        "150",
        "--out",
        str(out),
        *extra,
    ]


def test_uap_writes_the_array_the_image_and_the_record(net: Path, tmp_path: Path) -> None:
    out, store = tmp_path / "uap", tmp_path / "s.sqlite"
    assert main(_uap(net, out, "--json", str(tmp_path / "r.json"), "--store", str(store))) == 0
    record: dict[str, Any] = json.loads((tmp_path / "r.json").read_text())
    assert record == {**json.loads((out / "uap.json").read_text())}
    v = np.load(out / "uap.npy", allow_pickle=False)
    assert v.dtype == np.float32 and v.shape == (1, 8, 8)
    assert float(np.abs(v).max()) <= 0.2 + 1e-6
    assert np.array_equal(np.asarray(record["perturbation"], dtype=np.float32), v)
    assert is_robustlab_png(out / "uap.png")
    assert record["kind"] == "uap" and record["threat_model"] == {"norm": "linf", "eps": 0.2}
    assert record["attack"]["method"] == "sgd" and record["attack"]["step"] == pytest.approx(0.16)
    assert record["n_craft"] == 200 and record["n_eval"] == 150
    assert record["splits"] == {"craft": "train", "eval": "test"}
    # the record's numbers are the perturbation's on the recorded test points
    splits = load_data("digits")
    held = torch.tensor(record["eval_index"])
    model = robustlab.load(net)
    scores = score_uap(model, torch.from_numpy(v), splits.test.x[held], splits.test.y[held])
    assert record["fooling_rate"] == scores.fooling_rate
    assert record["clean_accuracy"] == scores.clean_accuracy
    assert record["perturbed_accuracy"] == scores.perturbed_accuracy
    assert record["fooling_rate"] > record["random_fooling_rate"] + 0.2
    # and the library call with the same options gives the same perturbation
    cfg = UAPConfig(method="sgd", norm="linf", xi=0.2)
    again = universal_perturbation(
        model,
        (splits.train.x, splits.train.y),
        (splits.test.x, splits.test.y),
        cfg,
        n_craft=200,
        n_eval=150,
        num_classes=10,
    )
    assert np.array_equal(again.v.numpy(), v)
    # stored, and shown by the report
    (stored,) = ResultStore(store, read_only=True).records(kind="uap")
    assert stored["fooling_rate"] == record["fooling_rate"]
    assert main(["report", "--store", str(store), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "<h2>Universal perturbation</h2>" in page and 'alt="universal perturbation"' in page
    assert f"{100 * record['fooling_rate']:.1f} %" in page
    # a second run replaces its own files; a foreign .npy is kept unless --overwrite
    assert main(_uap(net, out)) == 0
    foreign = tmp_path / "other"
    foreign.mkdir()
    np.save(foreign / "uap.npy", np.zeros(3))
    assert main(_uap(net, foreign)) == 2
    assert np.array_equal(np.load(foreign / "uap.npy"), np.zeros(3))


def test_uap_per_class_saves_one_perturbation_per_class(net: Path, tmp_path: Path) -> None:
    out = tmp_path / "pc"
    assert main(_uap(net, out, "--per-class", "--max-passes", "2")) == 0
    v = np.load(out / "uap.npy", allow_pickle=False)
    record = json.loads((out / "uap.json").read_text())
    assert v.shape == (10, 1, 8, 8) and record["per_class"] is True
    assert len(record["classes"]) == 10 and sum(c["n"] for c in record["classes"]) == 150


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--eps", "0"], "the UAP budget eps must be a finite number > 0, got 0.0"),
        (["--eps", "-1"], "the UAP budget eps must be a finite number > 0, got -1.0"),
        (["--delta", "1.5"], r"delta must lie in (0, 1), got 1.5"),
        (["--method", "pgd"], "unknown UAP method 'pgd'; use deepfool or sgd"),
        (["--norm", "l1"], "universal perturbations support the norms linf and l2, got 'l1'"),
        (["--keep", "first"], "keep must be last or best, got 'first'"),
        (["--n-craft", "5000"], "--n-craft must be between 1 and 1438, got 5000"),
    ],
)
def test_uap_refuses_bad_input_in_one_sentence(
    net: Path, tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*_uap(net, tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"robustlab: error: {message}"
    assert not (tmp_path / "o" / "uap.npy").exists()

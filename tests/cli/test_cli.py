"""The command line: each command end to end on real data, and one-sentence errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from robustlab.cli import main
from robustlab.demo import demo
from robustlab.store import ResultStore
from robustlab.train import TrainConfig


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "mlp"
    assert (
        main(
            [
                "train",
                "--arch",
                "mlp",
                "--data",
                "digits",
                "--epochs",
                "3",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    return out


def test_models_lists_every_architecture(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["models", "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "m.json").read_text())
    for name in ("resnet8", "resnet20", "preact_resnet", "vgg", "densenet", "vit", "mlp"):
        assert name in out and any(r["arch"] == name and r["parameters"] > 0 for r in rows)


def test_train_then_eval_writes_the_record(
    digits_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "e.json"
    store = tmp_path / "s.sqlite"
    args = [
        "eval",
        "--model",
        str(digits_ckpt),
        "--data",
        "digits",
        "--attack",
        "pgd",
        "--norm",
        "linf",
        "--eps",
        "0.1",
        "--steps",
        "5",
        "--n",
        "100",
        "--json",
        str(out),
        "--store",
        str(store),
        "--no-progress",
    ]
    assert main(args) == 0
    rec = json.loads(out.read_text())
    assert rec["n"] == 100 and rec["threat_model"] == {"norm": "linf", "eps": 0.1}
    assert rec["attack"]["name"] == "pgd" and rec["attack"]["random_start"] is True
    manifest = json.loads((digits_ckpt / "manifest.json").read_text())
    assert rec["model"]["sha256"] == manifest["weights"]["sha256"]
    assert 0 <= rec["robust_accuracy"] <= rec["clean_accuracy"] <= 1 and rec["elapsed_s"] > 0
    assert "robust" in capsys.readouterr().out
    assert main(["report", "--store", str(store), "--out", str(tmp_path / "r.html")]) == 0
    assert "Robustness curve" in (tmp_path / "r.html").read_text()


def test_train_refuses_to_overwrite_a_checkpoint(
    digits_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--arch", "mlp", "--data", "digits", "--out", str(digits_ckpt)]) == 2
    assert "is a trained checkpoint's manifest; pass --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["eval", "--model", "{ckpt}", "--data", "digits", "--eps", "-1"],
            "eps must be a finite number >= 0",
        ),
        (
            ["eval", "--model", "{ckpt}", "--data", "digits", "--eps", "0.1", "--norm", "l5"],
            "unknown norm 'l5'",
        ),
        (
            ["eval", "--model", "{ckpt}", "--data", "digits", "--eps", "0.1", "--attack", "magic"],
            "unknown attack 'magic'",
        ),
        (["eval", "--model", "/nonexistent/ckpt", "--eps", "0.1"], "does not exist"),
        (
            ["eval", "--model", "{ckpt}", "--data", "mnist5k", "--eps", "0.1"],
            "the model takes 1x8x8 inputs but mnist5k has 1x28x28",
        ),
        (
            ["eval", "--model", "{ckpt}", "--data", "nope", "--eps", "0.1"],
            "unknown dataset spec 'nope'",
        ),
        (
            ["eval", "--model", "{ckpt}", "--data", "digits", "--eps", "0.1", "--n", "5000"],
            "asked for n=5000",
        ),
        (["train", "--arch", "resnet99", "--out", "{tmp}/x"], "unknown architecture 'resnet99'"),
        (["train", "--method", "pgd-at", "--data", "digits", "--out", "{tmp}/y"], "needs --eps"),
        (
            ["train", "--data", "digits", "--device", "cuda", "--out", "{tmp}/z"],
            "CUDA is not available",
        ),
        (["report", "--store", "{tmp}/none.sqlite"], "does not exist"),
        (
            ["train", "--data", "digits", "--arch-option", "width", "--out", "{tmp}/w"],
            "must look like KEY=VALUE",
        ),
        (
            [
                "train",
                "--arch",
                "mlp",
                "--data",
                "digits",
                "--arch-option",
                "dept=3",
                "--out",
                "{tmp}/v",
            ],
            "has no option dept",
        ),
        (
            [
                "train",
                "--method",
                "pgd-at",
                "--eps",
                "0.1",
                "--eps-warmup",
                "1.5",
                "--data",
                "digits",
                "--out",
                "{tmp}/u",
            ],
            "eps warm-up must be a fraction",
        ),
        (
            ["eval", "--model", "{ckpt}", "--data", "digits", "--eps", "0.1", "--json", "{tmp}"],
            "--json {tmp} is a folder",
        ),
        (
            ["eval", "--model", "{ckpt}", "--data", "digits", "--eps", "0.1", "--samples", "{tmp}"],
            "--samples {tmp} is a folder",
        ),
        (
            ["attack", "--model", "{ckpt}", "--data", "digits", "--eps", "0.1", "--save", "{tmp}"],
            "--save {tmp} is a folder",
        ),
        (
            ["train", "--data", "digits", "--out", "{ckpt}/manifest.json"],
            "names a file; it must be a folder",
        ),
        (["demo", "--out", "{ckpt}/manifest.json"], "names a file; it must be a folder"),
        (["report", "--store", "{tmp}/s.sqlite", "--out", "{tmp}"], "--out {tmp} is a folder"),
        (
            ["eval", "--model", "{ckpt}", "--arch", "resnet8", "--data", "digits", "--eps", "0.1"],
            "--arch only names the architecture of a legacy .pt/.pth",
        ),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(
    args: list[str],
    message: str,
    digits_ckpt: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [a.replace("{ckpt}", str(digits_ckpt)).replace("{tmp}", str(tmp_path)) for a in args]
    if argv[0] == "report":
        ResultStore(tmp_path / "s.sqlite")
    assert main([*argv, "--no-progress"] if argv[0] in ("eval", "train") else argv) == 2
    err = capsys.readouterr().err
    message = message.replace("{tmp}", str(tmp_path))
    assert err.startswith("robustlab: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_console_script_runs_and_fails_cleanly(tmp_path: Path) -> None:
    exe = shutil.which("robustlab", path=str(Path(sys.executable).parent))
    assert exe is not None, "the robustlab console script is not installed beside this python"
    ok = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "robustlab" in ok.stdout
    bad = subprocess.run(
        [exe, "eval", "--model", str(tmp_path / "missing"), "--eps", "0.1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "does not exist" in bad.stderr


def test_demo_pipeline_end_to_end_in_small(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo's own code path, with tiny models: trains, reuses from cache, reports."""
    models = {
        "standard mlp": TrainConfig(arch="mlp", method="standard", epochs=1),
        "PGD-AT mlp": TrainConfig(arch="mlp", method="pgd-at", eps=0.3, epochs=1, steps=2),
    }
    kwargs: dict[str, Any] = {
        "models": models,
        "eps_grid": (0.0, 0.1, 0.3),
        "n": 50,
        "steps": 3,
        "progress": False,
    }
    report = demo(tmp_path / "out", cache=tmp_path / "cache", **kwargs).report
    first = capsys.readouterr().err
    assert "train standard mlp" in first and "render report" in first
    html = report.read_text()
    assert "standard mlp" in html and "PGD-AT mlp" in html and "data:image/png;base64," in html
    demo(tmp_path / "out", cache=tmp_path / "cache", **kwargs)
    second = capsys.readouterr().err
    assert "reuse standard mlp" in second and "train standard mlp" not in second


def test_eval_curve_writes_records_and_per_sample_table(digits_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "curve.json"
    args = [
        "eval",
        "--model",
        str(digits_ckpt),
        "--data",
        "digits",
        "--eps",
        "0.05,0.1,0.2",
        "--steps",
        "5",
        "--n",
        "120",
        "--batch-size",
        "50",
        "--json",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    records = json.loads(out.read_text())["records"]
    assert [r["threat_model"]["eps"] for r in records] == [0.05, 0.1, 0.2]
    accs = [r["robust_accuracy"] for r in records]
    assert accs == sorted(accs, reverse=True)
    table = (tmp_path / "curve.samples.csv").read_text().splitlines()
    assert table[0] == "eps,index,label,clean_pred,final_pred,robust,broken_by,perturbation_norm"
    assert len(table) == 1 + 3 * 120
    assert not (tmp_path / "curve.json.progress.jsonl").exists()  # removed once finished
    robust_at_02 = sum(
        line.split(",")[5] == "True" for line in table[1:] if line.startswith("0.2,")
    )
    assert robust_at_02 == round(records[2]["robust_accuracy"] * 120)
    for line in table[1:]:  # a norm for every broken point, none for the robust ones
        cells = line.split(",")
        assert (cells[7] == "") == (cells[5] == "True")
        if cells[5] == "False" and cells[3] != cells[2]:
            assert cells[7] == "0.0"  # misclassified clean: the input itself


def test_killed_evaluation_resumes_to_the_same_result(digits_ckpt: Path, tmp_path: Path) -> None:
    """A real process killed mid-run; the second run skips finished batches, same numbers."""
    exe = shutil.which("robustlab", path=str(Path(sys.executable).parent))
    assert exe is not None
    common = [
        "eval",
        "--model",
        str(digits_ckpt),
        "--data",
        "digits",
        "--eps",
        "0.1",
        "--steps",
        "200",
        "--n",
        "300",
        "--batch-size",
        "20",
        "--no-progress",
    ]
    whole = tmp_path / "whole.json"
    assert main([*common, "--json", str(whole)]) == 0
    cut = tmp_path / "cut.json"
    progress = tmp_path / "cut.json.progress.jsonl"
    proc = subprocess.Popen(
        [exe, *common, "--json", str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    import time

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.exists() and len(progress.read_text().splitlines()) >= 4:  # key + 3 batches
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not cut.exists(), "the run finished before it could be killed; make it longer"
    finished = len(progress.read_text().splitlines()) - 1
    assert main([*common, "--json", str(cut)]) == 0
    a, b = json.loads(whole.read_text()), json.loads(cut.read_text())
    assert b["resumed_batches"] >= min(finished, 3) and a["resumed_batches"] == 0
    for key in ("clean_accuracy", "robust_accuracy", "n"):
        assert a[key] == b[key]
    assert (tmp_path / "whole.samples.csv").read_text() == (
        tmp_path / "cut.samples.csv"
    ).read_text()


def test_attack_saves_adversarial_examples(digits_ckpt: Path, tmp_path: Path) -> None:
    import numpy as np

    out = tmp_path / "adv.npz"
    args = [
        "attack",
        "--model",
        str(digits_ckpt),
        "--data",
        "digits",
        "--attack",
        "pgd",
        "--eps",
        "0.1",
        "--steps",
        "5",
        "--n",
        "40",
        "--save",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    with np.load(out) as z:
        x_adv, y = z["x_adv"], z["y"]
        assert x_adv.shape == (40, 1, 8, 8) and y.shape == (40,)
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert (z["adv_pred"] != z["clean_pred"]).any()
    from robustlab.data import load_data

    x = load_data("digits").test.x[:40].numpy()
    assert np.abs(x_adv - x).max() <= 0.1 + 1e-6


@pytest.mark.parametrize("attack", ["fgsm", "mifgsm", "cw", "apgd-ce"])
def test_eval_runs_attacks_with_and_without_a_seed(
    attack: str, digits_ckpt: Path, tmp_path: Path
) -> None:
    norm = "l2" if attack == "cw" else "linf"
    args = [
        "eval",
        "--model",
        str(digits_ckpt),
        "--data",
        "digits",
        "--attack",
        attack,
        "--norm",
        norm,
        "--eps",
        "0.1",
        "--n",
        "20",
        "--json",
        str(tmp_path / "r.json"),
        "--no-progress",
    ]
    if attack == "apgd-ce":
        args += ["--steps", "5"]
    assert main(args) == 0
    assert json.loads((tmp_path / "r.json").read_text())["attack"]["eps"] == 0.1


def test_demo_keeps_the_records_already_in_its_store(tmp_path: Path) -> None:
    """A store the user keeps beside the demo's report is appended to, never replaced."""
    out = tmp_path / "runs"
    mine = ResultStore(out / "results.sqlite")
    mine.add({"kind": "eval", "robust_accuracy": 0.5, "created": "x"}, label="my own model")
    models = {"standard mlp": TrainConfig(arch="mlp", method="standard", epochs=1)}
    kwargs: dict[str, Any] = {
        "models": models,
        "eps_grid": (0.0, 0.1),
        "n": 20,
        "steps": 2,
        "progress": False,
    }
    report = demo(out, cache=tmp_path / "cache", **kwargs).report
    kept = ResultStore(out / "results.sqlite").records(label="my own model")
    assert kept == [
        {"kind": "eval", "robust_accuracy": 0.5, "created": "x", "label": "my own model"}
    ]
    assert len(ResultStore(out / "results.sqlite").records(kind="eval", label="standard mlp")) == 2
    html = report.read_text()  # the report shows this run's records only
    assert "standard mlp" in html and "my own model" not in html


def test_legacy_pt_weights_take_their_architecture_from_arch(
    digits_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from robustlab.models.checkpoint import load_checkpoint

    legacy = tmp_path / "weights.pt"
    torch.save(load_checkpoint(digits_ckpt).model.state_dict(), legacy)
    base = ["eval", "--data", "digits", "--eps", "0.1", "--steps", "3", "--n", "50"]
    base += ["--no-progress", "--no-resume"]
    assert main([*base, "--model", str(legacy)]) == 2
    assert "legacy weights file without a manifest" in capsys.readouterr().err
    assert (
        main([*base, "--model", str(legacy), "--arch", "mlp", "--json", str(tmp_path / "a.json")])
        == 0
    )
    assert main([*base, "--model", str(digits_ckpt), "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f"{k}.json").read_text()) for k in "ab")
    assert a["model"]["arch"] == "mlp"
    assert (a["clean_accuracy"], a["robust_accuracy"]) == (
        b["clean_accuracy"],
        b["robust_accuracy"],
    )
    adv = tmp_path / "adv.npz"
    args = ["attack", "--model", str(legacy), "--arch", "mlp", "--data", "digits", "--eps", "0.1"]
    assert main([*args, "--steps", "2", "--n", "10", "--save", str(adv), "--no-progress"]) == 0
    assert adv.exists()


def test_a_bad_store_is_refused_before_the_evaluation(
    digits_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_a_store = tmp_path / "notes.sqlite"
    not_a_store.write_text("my notes, not a database\n" * 100)
    out = tmp_path / "e.json"
    args = ["eval", "--model", str(digits_ckpt), "--data", "digits", "--eps", "0.1"]
    args += ["--n", "20", "--json", str(out), "--store", str(not_a_store), "--no-progress"]
    assert main(args) == 2
    assert "is not a robustlab results store" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "e.samples.csv").exists()


def test_models_lists_the_architectures_that_fit_a_small_size(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["models", "--image-size", "3", "--json", str(tmp_path / "m.json")]) == 0
    rows = {r["arch"]: r for r in json.loads((tmp_path / "m.json").read_text())}
    assert rows["vit"]["parameters"] is None and "patch size" in rows["vit"]["error"]
    assert rows["mlp"]["parameters"] > 0 and "error" not in rows["mlp"]
    assert "not at this size" in capsys.readouterr().out


def test_demo_loads_the_shipped_models_and_trains_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --retrain the demo evaluates the zoo's standard and PGD-AT models as shipped."""
    from robustlab.models.pretrained import zoo_entry

    run = demo(
        tmp_path / "out",
        cache=tmp_path / "cache",
        eps_grid=(0.0, 0.3),
        n=20,
        steps=2,
        progress=False,
    )
    said = capsys.readouterr().err
    assert "load standard resnet8 (zoo:resnet8-standard)" in said and "train " not in said
    assert not (tmp_path / "cache").exists()
    evals = [r for r in run.records if r["kind"] == "eval"]
    shas = {r["model"]["path"]: r["model"]["sha256"] for r in evals}
    assert shas == {
        f"zoo:{name}": zoo_entry(name).card["sha256"]
        for name in ("resnet8-standard", "resnet8-pgd-at")
    }
    at_zero = [r for r in evals if r["threat_model"]["eps"] == 0.0]
    assert all(r["robust_accuracy"] == r["clean_accuracy"] for r in at_zero)
    assert all(len(r["samples"]) == 20 for r in evals)  # stored per sample, for compare


def test_demo_retrain_trains_the_recipes_the_cards_state() -> None:
    """--retrain trains each shipped demo model's own recipe (the config its manifest ran)."""
    from robustlab.demo import zoo_models
    from robustlab.models.checkpoint import load_checkpoint

    for model in zoo_models():
        manifest = load_checkpoint(f"zoo:{model.zoo}").manifest
        assert model.config.resolved().record() == {
            k: v for k, v in manifest["training"].items() if k in model.config.resolved().record()
        }
        assert model.calibration == manifest["dataset"]["calibration_size"]

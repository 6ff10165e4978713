"""The bad-input sweep: every command, given a bad argument, answers with one sentence (exit
status 2, no traceback), and what it was given is left as it was. One row per case:
(command line, the sentence expected on stderr)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from robustlab.models import build_model
from robustlab.models.checkpoint import MANIFEST, WEIGHTS, model_config, save_checkpoint
from robustlab.store import ResultStore

QUICK = ["--data", "digits", "--eps", "0.1", "--steps", "1", "--n", "4", "--batch-size", "4"]
QUICK += ["--device", "cpu", "--no-progress"]
MSA = ["--data", "digits", "--eps", "0.1", "--n", "4", "--device", "cpu", "--no-progress"]
MSA += ["--protocol", "msa"]
UAP = ["uap", "--model", "good", "--data", "digits", "--device", "cpu", "--n-craft", "20"]


def robustlab(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m robustlab ARGS`` as a user would (this checkout, one thread)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROBUSTLAB_CACHE": str(cwd / "cache")}
    return subprocess.run(
        [sys.executable, "-m", "robustlab", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _edit(folder: Path, key: str, change: object) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    if callable(change):
        change(manifest)
    else:
        manifest[key] = change
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture
def place(tmp_path: Path) -> Path:
    """A folder holding a good checkpoint, broken ones, bad data files and other files
    (made afresh for each row: a row that fails may have destroyed what it was given)."""
    root = tmp_path
    model = build_model("mlp", 1, 10, 8)
    good = save_checkpoint(
        model, root / "good", {"model": model_config("mlp", 1, 10, 8, [0.0], [1.0])}
    )

    def broken(name: str) -> Path:
        return Path(shutil.copytree(good, root / name))

    _edit(broken("empty-hash"), "", lambda m: m["weights"].__setitem__("sha256", ""))
    _edit(broken("no-weights"), "", lambda m: m.pop("weights"))
    _edit(broken("wide"), "", lambda m: m["model"]["options"].__setitem__("width", 2_000_000))
    _edit(broken("huge-images"), "", lambda m: m["model"].__setitem__("image_size", 100_000))
    (broken("zero-weights") / WEIGHTS).unlink()
    (root / "zero-weights" / WEIGHTS).symlink_to("/dev/zero")
    (broken("fifo-manifest") / MANIFEST).unlink()
    os.mkfifo(root / "fifo-manifest" / MANIFEST)

    x = np.zeros((8, 8, 8), dtype=np.uint8)
    np.savez(root / "one-class.npz", x=x, y=np.zeros(8, dtype=np.int64))
    np.savez(root / "uint64.npz", x=x, y=np.array([0, 1] * 3 + [2**64 - 3] * 2, np.uint64))
    header = __import__("io").BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 1, 1000, 1000)}
    )
    import zipfile

    with zipfile.ZipFile(root / "huge.npz", "w") as z:
        z.writestr("x.npy", header.getvalue())
    for cls in ("a", "b"):
        (root / "bigpng" / cls).mkdir(parents=True)
        Image.new("L", (8, 8)).save(root / "bigpng" / cls / "0.png")
    Image.new("1", (10_000, 10_000)).save(root / "bigpng" / "b" / "1.png")

    with sqlite3.connect(root / "app.db") as db:
        db.execute("CREATE TABLE users (name TEXT)")
    record = {"kind": "eval", "threat_model": {"norm": "linf", "eps": 0.1}, "n": 4}
    ResultStore(root / "s.sqlite").add({**record, "robust_accuracy": 0.5, "attack": {}})
    (root / "damaged.sqlite").write_bytes(b"SQLite format 3\x00" + bytes(200))
    (root / "adir").mkdir()
    (root / "afile").write_text("mine\n")
    (root / "notes.json").write_text('{"mine": true}\n')
    (root / "t.json.progress.jsonl").write_text("my own notes\n")
    (root / "u.json.progress.jsonl").write_text("mine")  # no newline: looked like a torn file
    (root / "appdir").mkdir()
    shutil.copy(root / "app.db", root / "appdir" / "results.sqlite")
    (root / "foreign").mkdir()
    (root / "foreign" / MANIFEST).write_text('{"my": "own manifest"}\n')
    (root / "photos").mkdir()
    Image.new("L", (4, 4)).save(root / "photos" / "transfer_heatmap.png")
    return root


# (command line, the sentence on stderr)
ROWS: list[tuple[list[str], str]] = [
    # compress: fractions, budgets, a store that is not ours
    (["compress", "--model", "good", "--data", "digits", "--kappa", "1.5"], "strictly between 0"),
    (["compress", "--model", "good", "--data", "digits", "--eps-linf", "-1"], "linf budget must"),
    (
        ["compress", "--model", "good", "--data", "digits", "--store", "app.db"],
        "another application",
    ),
    (["compress", "--model", "empty-hash", "--data", "digits"], "cannot be checked; load it only"),
    # checkpoints: hashes, sizes, files that are not regular
    (["eval", "--model", "empty-hash", *QUICK], "cannot be checked; load it only if you trust"),
    (["eval", "--model", "no-weights", *QUICK], "has no 'weights' section"),
    (
        ["transfer", "--sources", "empty-hash", "--targets", "good", *QUICK],
        "cannot be checked; load it only if you trust",
    ),
    (["sloth", "--model", "empty-hash", *QUICK], "cannot be checked; load it only if you trust"),
    (["attack", "--model", "no-weights", "--save", "a.npz", *QUICK], "no 'weights' section"),
    (["eval", "--model", "wide", *QUICK], "parameters, more than the limit"),
    (["eval", "--model", "huge-images", *QUICK], "image_size 100000, more than the limit"),
    (["eval", "--model", "zero-weights", *QUICK], "is not a regular file"),
    (["eval", "--model", "fifo-manifest", *QUICK], "is not a regular file"),
    (["sloth", "--model", "fifo-manifest", *QUICK], "is not a regular file"),
    (["exits", "--model", "no-weights", "--data", "digits", "--out", "e"], "no 'weights' section"),
    (["hpm", "--model", "no-weights", "--data", "digits", "--out", "h"], "no 'weights' section"),
    # HPM settings
    (
        ["hpm", "--model", "good", "--data", "digits", "--out", "h", "--mix", "2"],
        "in [0, 1], got 2",
    ),
    (
        ["hpm", "--model", "good", "--data", "digits", "--out", "h", "--momentum", "0"],
        "momentum must lie strictly between 0 and 1, got 0.0",
    ),
    (
        ["hpm", "--model", "good", "--data", "digits", "--out", "h", "--eval-batch-size", "0"],
        "batch size must be >= 1, got 0",
    ),
    # data
    (["eval", "--model", "good", *QUICK, "--data", "npz:huge.npz"], "beyond the limit of"),
    (["eval", "--model", "good", *QUICK, "--data", "folder:bigpng"], "beyond the limit of 4096"),
    (["eval", "--model", "good", *QUICK, "--data", "npz:uint64.npz"], "too large for a class"),
    (["eval", "--model", "good", *QUICK, "--data", "npz:one-class.npz"], "single class"),
    # devices, seeds, architecture options
    (["eval", "--model", "good", *QUICK, "--device", "mps"], "MPS is not available here"),
    (["eval", "--model", "good", *QUICK, "--engine", "fast"], "unknown engine 'fast'"),
    (
        [
            "attack",
            "--model",
            "good",
            "--data",
            "digits",
            "--eps",
            "0.1",
            "--save",
            "a.npz",
            "--engine",
            "tensorrt",
        ],
        "unknown engine 'tensorrt'",
    ),  # fmt: skip
    (["train", "--data", "digits", "--arch", "mlp", "--out", "t", "--device", "mps"], "MPS is not"),
    (["eval", "--model", "good", *QUICK, "--device", "cuda:x"], "unknown device 'cuda:x'"),
    (["attack", "--model", "good", *QUICK, "--batch-size", "0", "--save", "a.npz"], "batch size"),
    (["eval", "--model", "good", *QUICK, "--seed", "-1"], "--seed must be a non-negative whole"),
    (["sloth", "--model", "good", *QUICK, "--seed", str(2**64)], "whole number up to 2**62"),
    (["train", "--data", "digits", "--out", "t", "--data-seed", str(10**30)], "--data-seed must"),
    (
        [
            "train",
            "--data",
            "digits",
            "--arch",
            "mlp",
            "--out",
            "t",
            "--arch-option",
            "in_channels=3",
        ],
        "architecture 'mlp' has no option in_channels",
    ),
    # compression: pruning fractions, regulariser strengths, ranks
    (
        ["prune", "--model", "good", "--data", "digits", "--sparsity", "1.5", "--out", "p"],
        "sparsity must be a fraction in (0, 1), got 1.5",
    ),
    (
        ["prune", "--model", "good", "--data", "digits", "--target-error", "0", "--out", "p"],
        "target error must be a fraction in (0, 1), got 0.0",
    ),
    (
        ["train", "--data", "digits", "--arch", "mlp", "--out", "t", "--regularizer", "l1=-1"],
        "regularizer l1 needs a finite strength >= 0, got -1.0",
    ),
    (
        ["train", "--data", "digits", "--arch", "mlp", "--out", "t", "--arch-option", "rank=300"],
        "rank 300 is larger than layer features.3 allows",
    ),
    (
        ["quantize", "--model", "good", "--data", "digits", "--backend", "arm", "--out", "q"],
        "quantization backend 'arm' is not available on this machine",
    ),
    # results stores: only robustlab's, written into, never replaced
    (["report", "--store", "app.db", "--out", "r.html"], "another application"),
    (["eval", "--model", "good", *QUICK, "--store", "app.db"], "another application"),
    (["sloth", "--model", "good", *QUICK, "--store", "app.db"], "another application"),
    (["demo", "--out", "appdir"], "another application"),
    (["eval", "--model", "good", *QUICK, "--store", "adir"], "adir is a folder; give a file name"),
    (["report", "--store", "damaged.sqlite", "--out", "r.html"], "not a robustlab results store"),
    (["eval", "--model", "good", *QUICK, "--json", "t.json"], "pass --overwrite"),
    (["eval", "--model", "good", *QUICK, "--json", "u.json"], "pass --overwrite"),
    (
        [
            "eval",
            "--model",
            "good",
            *QUICK,
            "--json",
            "v.json",
            "--samples",
            "v.json.progress.jsonl",
        ],
        "both name v.json.progress.jsonl; give each its own file",
    ),
    # outputs over inputs: refused even with --overwrite
    (["eval", "--model", "good", *QUICK, "--json", "good/manifest.json"], "same file as the"),
    (
        ["eval", "--model", "good", *QUICK, "--json", "good/manifest.json", "--overwrite"],
        "robustlab never writes over a file it reads",
    ),
    (
        ["attack", "--model", "good", *QUICK, "--save", "good/model.safetensors", "--overwrite"],
        "same file as the input",
    ),
    (
        ["eval", "--model", "good", *QUICK, "--data", "npz:uint64.npz", "--json", "uint64.npz"],
        "same file as the input",
    ),
    (["report", "--store", "s.sqlite", "--out", "s.sqlite"], "same file as the input"),
    (["report", "--store", "s.sqlite", "--json", "s.sqlite", "--overwrite"], "same file as the"),
    (
        [
            "exits",
            "--model",
            "good",
            "--data",
            "digits",
            "--out",
            "e",
            "--json",
            "good/manifest.json",
        ],
        "same file as the input",
    ),
    # outputs that are folders, in files, named twice
    (["eval", "--model", "good", *QUICK, "--json", "adir"], "is a folder; give a file name"),
    (["eval", "--model", "good", *QUICK, "--samples", "adir"], "is a folder; give a file name"),
    (["eval", "--model", "good", *QUICK, "--json", "afile/r.json"], "is a file, not a folder"),
    (["eval", "--model", "good", *QUICK, "--json", "r.json", "--samples", "r.json"], "both name"),
    (["attack", "--model", "good", *QUICK, "--save", "adir"], "is a folder; give a file name"),
    (
        ["transfer", "--sources", "good", "--targets", "good", *QUICK, "--json", "adir"],
        "is a folder; give a file name",
    ),
    (["train", "--data", "digits", "--arch", "mlp", "--out", "afile"], "must be a folder"),
    (["exits", "--model", "good", "--data", "digits", "--out", "afile"], "must be a folder"),
    (["hpm", "--model", "good", "--data", "digits", "--out", "afile"], "must be a folder"),
    (["sloth", "--model", "good", *QUICK, "--plots", "afile"], "must be a folder"),
    (["demo", "--out", "afile"], "must be a folder"),
    (["demo", "--cache", "afile"], "--cache afile names a file; it must be a folder"),
    (
        ["transfer", "--sources", "mlp", "--targets", "mlp", *QUICK, "--cache", "afile"],
        "--cache afile names a file; it must be a folder",
    ),
    # universal perturbations: budgets, delta, methods, point counts, outputs
    (UAP + ["--eps", "0", "--out", "u"], "the UAP budget eps must be a finite number > 0"),
    (UAP + ["--eps", "0.1", "--delta", "1", "--out", "u"], "delta must lie in (0, 1), got 1.0"),
    (UAP + ["--eps", "0.1", "--method", "fgsm", "--out", "u"], "unknown UAP method 'fgsm'"),
    (UAP + ["--eps", "0.1", "--n-eval", "0", "--out", "u"], "--n-eval must be between 1 and"),
    (UAP + ["--eps", "0.1", "--out", "afile"], "must be a folder"),
    # files robustlab did not write: only with --overwrite
    (UAP + ["--eps", "0.1", "--out", "u", "--json", "notes.json"], "pass --overwrite"),
    (["eval", "--model", "good", *QUICK, "--json", "notes.json"], "pass --overwrite"),
    (["report", "--store", "s.sqlite", "--out", "afile"], "pass --overwrite"),
    (["models", "--json", "notes.json"], "pass --overwrite"),
    # after deployment: detectors, drift monitoring, poisoning and scans
    (
        ["poison", "--data", "digits", "--target-class", "0", "--rate", "1.5", "--out", "p"],
        "the poisoning rate must be a share strictly between 0 and 1",
    ),
    (
        ["poison", "--data", "digits", "--target-class", "12", "--rate", "0.1", "--out", "p"],
        "the target class 12 does not exist",
    ),
    (
        ["scan", "--model", "good", "--data", "digits", "--json", "s.json", "--dims", "0"],
        "the reduced dimensions must be a whole number >= 1, got 0",
    ),
    (
        [
            "monitor",
            "--model",
            "good",
            "--reference",
            "digits",
            "--alpha",
            "1.5",
            "--out",
            "d.jsonl",
        ],
        "alpha (the per-batch false-alarm rate) must be in (0, 1), got 1.5",
    ),
    (
        [
            "monitor",
            "--model",
            "good",
            "--reference",
            "digits",
            "--batch-size",
            "100000",
            "--out",
            "d.jsonl",
        ],
        "is larger than the stream",
    ),
    (
        [
            "monitor",
            "--model",
            "good",
            "--reference",
            "digits",
            "--detector",
            "adir",
            "--out",
            "d.jsonl",
        ],
        "adir is not a detector artifact",
    ),
    (
        [
            "detect",
            "fit",
            "--model",
            "good",
            "--data",
            "digits",
            "--detectors",
            "nope",
            "--out",
            "det",
        ],
        "unknown detector nope",
    ),
    (
        ["detect", "score", "--model", "good", "--detector", "adir", "--data", "digits"],
        "adir is not a detector artifact",
    ),
    # the MSA protocol
    (["eval", "--model", "good", *MSA], "MLP has no declared surrogates; the MSA protocol needs"),
    (["eval", "--model", "good", *MSA, "--batch-size", "0"], "batch size must be >= 1, got 0"),
    (["eval", "--model", "good", *MSA, "--eps", "0.1,0.2"], "--protocol msa evaluates one --eps"),
    (["eval", "--model", "good", *MSA, "--attack", "fgsm"], "--protocol msa runs AutoAttack"),
    (["eval", "--model", "good", *MSA, "--steps", "1"], "'autoattack' has no option steps"),
    (["eval", "--model", "good", *MSA, "--surrogate-attacks", "square"], "runs in the plain stage"),
    (["eval", "--model", "good", *QUICK, "--surrogate-attacks", "apgd-ce"], "goes with --protocol"),
    (["train", "--data", "digits", "--arch", "mlp", "--out", "foreign"], "pass --overwrite"),
    (
        ["transfer", "--sources", "good", "--targets", "good", *QUICK, "--plots", "photos"],
        "pass --overwrite",
    ),
]


def _id(row: tuple[list[str], str]) -> str:
    args = row[0]
    bad = [a for a in args[1:] if a not in QUICK and a not in ("--model", "good")]
    return f"{args[0]} {' '.join(bad)}"


def check_row(place: Path, args: list[str], sentence: str) -> None:
    """The command fails with the sentence, no traceback, and changes none of its inputs."""
    before = {
        p: p.read_bytes()
        for p in place.rglob("*")
        if p.is_file()
        and not p.is_symlink()
        and not p.name.startswith("fifo")
        and p.stat().st_size < 10**7
    }
    done = robustlab(*args, cwd=place)
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.returncode == 2, done.stderr[-2000:]
    assert sentence in done.stderr, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("robustlab: error: ")
    for path, content in before.items():
        assert path.read_bytes() == content, f"{path} was changed"


@pytest.mark.parametrize(("args", "sentence"), ROWS, ids=[_id(r) for r in ROWS])
def test_bad_input_gets_a_sentence(place: Path, args: list[str], sentence: str) -> None:
    check_row(place, args, sentence)


def test_eval_never_deletes_a_file_in_the_place_of_its_progress_file(place: Path) -> None:
    for name in ("t", "u"):
        check_row(place, ["eval", "--model", "good", *QUICK, "--json", f"{name}.json"], "overwrite")
    assert (place / "t.json.progress.jsonl").read_text() == "my own notes\n"
    assert (place / "u.json.progress.jsonl").read_text() == "mine"


def test_a_seed_beyond_every_generator_gets_a_sentence(place: Path) -> None:
    check_row(
        place,
        ["eval", "--model", "good", *QUICK, "--seed", "99999999999999999999999"],
        "must be a non-negative whole number up to 2**62",
    )


def test_report_leaves_a_store_from_before_the_marker_unchanged(place: Path) -> None:
    legacy = place / "legacy.sqlite"
    with sqlite3.connect(legacy) as db:
        db.execute(
            "CREATE TABLE results (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, "
            "created TEXT NOT NULL, model TEXT, label TEXT, data TEXT, attack TEXT, norm TEXT, "
            "eps REAL, record TEXT NOT NULL)"
        )
    before = legacy.read_bytes()
    done = robustlab("report", "--store", "legacy.sqlite", "--out", "r.html", cwd=place)
    assert done.returncode == 0, done.stderr[-2000:]
    assert legacy.read_bytes() == before


def test_an_empty_progress_file_is_a_fresh_start(place: Path) -> None:
    (place / "fresh.json.progress.jsonl").write_text("")
    done = robustlab("eval", "--model", "good", *QUICK, "--json", "fresh.json", cwd=place)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((place / "fresh.json").read_text())["n"] == 4


def test_a_report_shows_user_text_as_text(place: Path) -> None:
    record = {"kind": "eval", "threat_model": {"norm": "linf", "eps": 0.1}, "n": 4}
    store = ResultStore(place / "tex.sqlite")
    store.add({**record, "robust_accuracy": 0.5, "attack": {}}, label=r"$\foo{$")
    done = robustlab("report", "--store", "tex.sqlite", "--out", "r.html", cwd=place)
    assert done.returncode == 0, done.stderr[-2000:]
    assert r"$\foo{$" in (place / "r.html").read_text()


def test_models_at_a_size_one_architecture_cannot_take_lists_the_others(place: Path) -> None:
    done = robustlab("models", "--image-size", "3", "--json", "m.json", cwd=place)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    rows = {r["arch"]: r for r in json.loads((place / "m.json").read_text())}
    assert (
        rows["vit"]["parameters"] is None and "must divide the image size 3" in rows["vit"]["error"]
    )
    assert rows["mlp"]["parameters"] > 0 and rows["resnet8"]["parameters"] > 0
    vit = next(line for line in done.stdout.splitlines() if line.startswith("vit "))
    assert "not at this size" in vit and "must divide the image size 3" in vit
    assert any(line.startswith("mlp ") and "70" in line for line in done.stdout.splitlines())


def test_an_unhashed_checkpoint_loads_only_when_trusted_and_the_record_says_so(
    place: Path,
) -> None:
    args = ["--model", "empty-hash", *QUICK, "--json", "e.json", "--store", "e.sqlite"]
    done = robustlab("eval", *args, "--trust-unhashed", cwd=place)
    assert done.returncode == 0, done.stderr[-2000:]
    model = json.loads((place / "e.json").read_text())["model"]
    weights = place / "empty-hash" / WEIGHTS
    assert model["trusted_unhashed"] is True
    assert model["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert ResultStore(place / "e.sqlite").records()[0]["model"]["trusted_unhashed"] is True
    hashed = robustlab("eval", "--model", "good", *QUICK, "--json", "g.json", cwd=place)
    assert hashed.returncode == 0, hashed.stderr[-2000:]
    assert "trusted_unhashed" not in json.loads((place / "g.json").read_text())["model"]


def test_overwrite_replaces_a_file_robustlab_did_not_write_and_then_it_is_ours(
    place: Path,
) -> None:
    done = robustlab("models", "--json", "notes.json", "--overwrite", cwd=place)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((place / "notes.json").read_text())
    assert {r["arch"] for r in rows} >= {"mlp", "resnet8"}
    again = robustlab("models", "--json", "notes.json", cwd=place)  # robustlab's own now
    assert again.returncode == 0, again.stderr[-2000:]


def test_models_at_an_image_size_beyond_memory_counts_without_allocating(place: Path) -> None:
    done = robustlab("models", "--image-size", "100000", "--json", "m.json", cwd=place)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    rows = {r["arch"]: r for r in json.loads((place / "m.json").read_text())}
    assert rows["mlp"]["parameters"] == 100_000**2 * 256 + 256 + 256 * 10 + 10 + 256**2 + 256

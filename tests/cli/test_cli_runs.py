"""robustlab runs and compare on a real store filled by real evaluations through the command
line (digits, tiny MLPs): listing and filtering runs, comparing two runs point by point, and the
one-sentence refusals."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from robustlab.cli import main

QUICK = ["--data", "digits", "--steps", "5", "--engine", "torch", "--no-progress"]


@dataclass(frozen=True)
class History:
    """A store with five evaluation runs of two models, and what the evaluations wrote."""

    store: Path
    std: Path  # a standard MLP
    at: Path  # a PGD-AT MLP
    folder: Path


def cli(*args: str | Path) -> None:
    """Run a command that must succeed."""
    assert main([str(a) for a in args]) == 0


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    """Runs 1 (std, pgd linf eps 0.05 and 0.1, 60 points), 3 (at, the same at 0.1), 4 (std,
    l2 eps 0.5), 5 (std, apgd-ce at 0.1 on 40 points), 6 (std on its own adversarial examples)."""
    root = tmp_path_factory.mktemp("history")
    std, at, store = root / "std", root / "at", root / "s.sqlite"
    train: list[str | Path] = ["train", "--arch", "mlp", "--data", "digits", "--no-progress"]
    cli(*train, "--epochs", "3", "--out", std)
    cli(*train, "--epochs", "3", "--method", "pgd-at", "--eps", "0.1", "--out", at)
    common: list[str | Path] = ["eval", *QUICK, "--store", store]
    cli(*common, "--model", std, "--eps", "0.05,0.1", "--n", "60", "--label", "std", "--json",
        root / "e1.json")  # fmt: skip
    cli(*common, "--model", at, "--eps", "0.1", "--n", "60", "--label", "at", "--json",
        root / "e3.json")  # fmt: skip
    cli(*common, "--model", std, "--norm", "l2", "--eps", "0.5", "--n", "60", "--label", "std-l2")
    cli(*common, "--model", std, "--attack", "apgd-ce", "--eps", "0.1", "--n", "40")
    cli("attack", "--model", std, "--data", "digits", "--eps", "0.1", "--n", "60", "--save",
        root / "adv.npz", "--no-progress")  # fmt: skip
    cli("eval", "--model", std, "--data", f"npz:{root / 'adv.npz'}", "--steps", "5", "--engine",
        "torch", "--no-progress", "--eps", "0.1", "--n", "30", "--store", store)  # fmt: skip
    return History(store, std, at, root)


def listed(h: History, *args: str | Path) -> list[dict[str, Any]]:
    """The runs `runs` lists with these filters (read from its --json)."""
    out = h.folder / "runs.json"
    cli("runs", "--store", h.store, *args, "--json", out, "--overwrite")
    runs: list[dict[str, Any]] = json.loads(out.read_text())["runs"]
    return runs


def outcomes(path: Path, eps: float) -> dict[int, dict[str, str]]:
    """The per-sample CSV an eval wrote beside its --json, at one eps, by point index."""
    with open(path, newline="") as f:
        return {int(r["index"]): r for r in csv.DictReader(f) if float(r["eps"]) == eps}


def sha(checkpoint: Path) -> str:
    """A checkpoint's weights hash, as its manifest states it."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    return str(manifest["weights"]["sha256"])


def test_runs_lists_each_run_with_its_numbers(
    history: History, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = listed(history)
    assert [r["id"] for r in runs] == [1, 3, 4, 5, 6]
    first = runs[0]
    assert (first["label"], first["attack"], first["norm"]) == ("std", "pgd", "linf")
    assert first["model_sha"] == sha(history.std) and first["arch"] == "mlp"
    stored = json.loads((history.folder / "e1.json").read_text())["records"]
    assert [
        (r["id"], r["eps"], r["n"], r["clean_accuracy"], r["robust_accuracy"], r["samples"])
        for r in first["records"]
    ] == [
        (1 + k, s["threat_model"]["eps"], 60, s["clean_accuracy"], s["robust_accuracy"], 60)
        for k, s in enumerate(stored)
    ]
    text = capsys.readouterr().out
    assert "run  date (UTC)" in text and f"std {sha(history.std)[:8]}" in text


def test_runs_filters_by_model_kind_threat_model_attack_and_date(history: History) -> None:
    def ids(*args: str | Path) -> list[int]:
        """The ids of the runs listed with these filters."""
        return [r["id"] for r in listed(history, *args)]

    assert ids("--model", "at") == [3]  # a label
    assert ids("--model", sha(history.at)[:8]) == [3]  # the start of its hash
    assert ids("--model", history.std) == [1, 4, 5, 6]  # a checkpoint, hashed
    assert ids("--kind", "eval", "--norm", "l2") == [4]
    assert ids("--attack", "apgd-ce") == [5]
    assert [[r["eps"] for r in run["records"]] for run in listed(history, "--eps", "0.05")] == [
        [0.05]
    ]
    today = datetime.now(timezone.utc).date()
    assert ids("--since", str(today + timedelta(days=1))) == []
    assert ids("--until", str(today - timedelta(days=1))) == []
    assert ids("--since", str(today), "--until", str(today)) == [1, 3, 4, 5, 6]
    assert ids("--kind", "transfer") == []


def test_compare_names_the_points_one_run_broke_and_the_other_did_not(
    history: History, capsys: pytest.CaptureFixture[str]
) -> None:
    out = history.folder / "c.json"
    cli("compare", "1", "3", "--store", history.store, "--json", out)
    got = json.loads(out.read_text())
    a = outcomes(history.folder / "e1.samples.csv", 0.1)
    b = outcomes(history.folder / "e3.samples.csv", 0.1)
    (at,) = got["per_eps"]
    assert at["eps"] == 0.1 and got["points"] == list(range(60))
    assert at["broken_in_a_only"] == [
        i for i in range(60) if a[i]["robust"] == "False" and b[i]["robust"] == "True"
    ]
    assert at["broken_in_b_only"] == [
        i for i in range(60) if a[i]["robust"] == "True" and b[i]["robust"] == "False"
    ]
    assert at["broken_in_a_only"]  # adversarial training kept points the standard model lost
    counted = len(at["broken_in_a_only"]) + len(at["broken_in_b_only"])
    assert counted + at["broken_in_both"] + at["robust_in_both"] == 60
    record_a = json.loads((history.folder / "e1.json").read_text())["records"][1]
    record_b = json.loads((history.folder / "e3.json").read_text())
    assert got["clean"]["a"] == record_a["clean_accuracy"]
    assert got["clean"]["b"] == record_b["clean_accuracy"]
    numbers = {n["what"]: n for n in at["numbers"]}
    robust = numbers["robust accuracy"]
    assert (robust["a"], robust["b"]) == (record_a["robust_accuracy"], record_b["robust_accuracy"])
    assert robust["change"] == pytest.approx(robust["b"] - robust["a"])
    assert numbers["after attack pgd"]["b"] == record_b["per_attack"][0]["robust_accuracy_after"]
    assert any("also ran eps 0.05" in note for note in got["notes"])
    text = capsys.readouterr().out
    assert f"eps 0.1: broken in A, robust in B: {len(at['broken_in_a_only'])} [" in text


def test_compare_of_different_point_sets_compares_the_shared_points_and_says_so(
    history: History,
) -> None:
    out = history.folder / "shared.json"
    cli("compare", "5", "1", "--store", history.store, "--json", out)
    got = json.loads(out.read_text())
    assert got["points"] == list(range(40))
    b = outcomes(history.folder / "e1.samples.csv", 0.1)
    robust = next(n for n in got["per_eps"][0]["numbers"] if n["what"] == "robust accuracy")
    assert robust["b"] == sum(b[i]["robust"] == "True" for i in range(40)) / 40
    assert [n["what"] for n in got["per_eps"][0]["numbers"]] == ["robust accuracy"]
    assert any("points 0-39 and run 1 (std" in n and "points 0-59" in n for n in got["notes"])


def test_compare_of_different_threat_models_compares_the_clean_outcomes_alone(
    history: History, capsys: pytest.CaptureFixture[str]
) -> None:
    out = history.folder / "threat.json"
    cli("compare", "1", "4", "--store", history.store, "--json", out)
    got = json.loads(out.read_text())
    assert got["per_eps"] == [] and got["clean"]["a"] == got["clean"]["b"]  # the same model
    assert "linf eps 0.05, 0.1; run 4 (std-l2" in got["notes"][0]
    assert "l2 eps 0.5), so their robust outcomes are not compared" in got["notes"][0]
    assert "only their clean ones" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compare", "1", "6"], "was evaluated on digits/test and run 6"),
        (["compare", "1", "6"], "their points are different images, so they do not compare"),
        (["compare", "1", "99"], "has no run 99 (robustlab runs --store"),
        (
            ["compare", "1", "3", "--eps", "0.3"],
            "run 1 has no record at eps 0.3 (its eps: 0.05, 0.1)",
        ),
        (["runs", "--since", "yesterday"], "--since takes a date (2025-01-31)"),
    ],
)
def test_bad_comparisons_and_filters_get_one_sentence(
    history: History, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*args, "--store", str(history.store)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("command", [["runs"], ["compare", "1", "2"]])
def test_a_missing_file_or_one_that_is_no_store_gets_one_sentence(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a database " * 100)
    assert main([*command, "--store", str(tmp_path / "none.sqlite")]) == 2
    assert f"results store {tmp_path / 'none.sqlite'} does not exist" in capsys.readouterr().err
    assert main([*command, "--store", str(text)]) == 2
    assert "is not a robustlab results store" in capsys.readouterr().err
    assert text.read_text() == "not a database " * 100

"""robustlab card: model cards written from real stores filled by real CLI runs (a tiny MLP on
digits), their numbers checked against the stored records."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from robustlab.cli import main
from robustlab.store import ResultStore

PROB_PY = """from torch import nn


def make() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Softmax(dim=1))
"""


@dataclass(frozen=True)
class Runs:
    """What the fixture made: two checkpoints, a probability-output model, the store."""

    mlp: Path
    other: Path
    int8: Path  # mlp quantized: it keeps mlp's float weights, so their hash
    prob: list[str]  # --model and its options for the python: model
    store: Path


def _ok(argv: list[str]) -> None:
    """Run one robustlab command in-process; it must succeed."""
    assert main(argv) == 0, argv


def _train(out: Path, seed: int) -> None:
    _ok(["train", "--arch", "mlp", "--data", "digits", "--epochs", "3", "--seed", str(seed),
         "--out", str(out), "--no-progress"])  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Two trained MLPs; mlp evaluated by a PGD curve, part of AutoAttack and AutoAttack,
    attacked by transfer from the other; the other evaluated under the same label."""
    root = tmp_path_factory.mktemp("card")
    mlp, other, store = root / "mlp", root / "other", root / "results.sqlite"
    _train(mlp, 0)
    _train(other, 1)
    common = ["--data", "digits", "--store", str(store), "--no-progress"]
    _ok(["eval", "--model", str(mlp), "--eps", "0.05,0.1,0.2", "--steps", "5", "--n", "50",
         *common])  # fmt: skip
    _ok(["eval", "--model", str(mlp), "--attack", "autoattack", "--attacks", "apgd-ce,apgd-t",
         "--eps", "0.1", "--n", "50", *common])  # fmt: skip
    _ok(["eval", "--model", str(mlp), "--attack", "autoattack", "--eps", "0.2", "--n", "20",
         *common])  # fmt: skip
    # stored under mlp's label: the card matches records by the weights' hash, not by label
    _ok(["eval", "--model", str(other), "--eps", "0.1", "--steps", "5", "--n", "50",
         "--label", "mlp", *common])  # fmt: skip
    _ok(["transfer", "--sources", str(other), "--targets", str(mlp), "--attacks", "pgd",
         "--eps", "0.1", "--steps", "5", "--n", "50", *common])  # fmt: skip
    int8 = root / "int8"
    _ok(["quantize", "--model", str(mlp), "--data", "digits", "--out", str(int8)])
    _ok(["eval", "--model", str(int8), "--eps", "0.1", "--steps", "5", "--n", "50", *common])
    (root / "prob.py").write_text(PROB_PY)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Softmax(dim=1))
    save_file(net.state_dict(), str(root / "prob.safetensors"))
    prob = [
        "--model", f"python:{root / 'prob.py'}:make", "--weights", str(root / "prob.safetensors"),
        "--mean", "0", "--std", "1", "--input-size", "1,8,8",
    ]  # fmt: skip
    return Runs(mlp, other, int8, prob, store)


def _card(runs: Runs, out: Path, *extra: str, model: list[str] | None = None) -> dict[str, Any]:
    """Write a card of the model (mlp by default) and return its JSON facts."""
    facts = out.with_suffix(".json")
    args = model or ["--model", str(runs.mlp)]
    _ok(["card", *args, "--store", str(runs.store), "--out", str(out), "--json", str(facts),
         *extra])  # fmt: skip
    loaded: dict[str, Any] = json.loads(facts.read_text())
    return loaded


def _sha(path: Path) -> str:
    sha: str = json.loads((path / "manifest.json").read_text())["weights"]["sha256"]
    return sha


def _evals_of(runs: Runs, path: Path) -> list[dict[str, Any]]:
    """The store's eval records of one checkpoint, by its hash and by how it was run
    (an int8 model's records say it was attacked through its float model)."""
    sha, int8 = _sha(path), path == runs.int8
    return [r for r in ResultStore(runs.store, read_only=True).records("eval")
            if r["model"]["sha256"] == sha
            and bool(r["model"].get("attacked_through")) == int8]  # fmt: skip


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def _table_row(text: str, first: str) -> list[str]:
    """The cells of the Markdown table line whose first cell is ``first``."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first:
            return cells
    raise AssertionError(f"no table line starting with {first}")


def test_card_numbers_are_the_stored_records_of_this_model_only(runs: Runs, tmp_path: Path) -> None:
    facts = _card(runs, tmp_path / "card.md")
    text = (tmp_path / "card.md").read_text()
    evals = _evals_of(runs, runs.mlp)
    assert len(evals) == 5  # 3 PGD eps, part of AutoAttack, AutoAttack
    assert len(facts["robust"]) == len(evals)  # the other model's record (same label) is not in
    assert facts["matched"] == {"eval": 5, "transfer": 1}
    by_key = {(r["threat_model"]["eps"], r["attack"]["name"], r["n"]): r for r in evals}
    for row in facts["robust"]:
        rec = by_key[
            (row["eps"], "autoattack" if "AutoAttack" in row["attack"] else "pgd", row["n"])
        ]
        assert (row["robust_accuracy"], row["clean_accuracy"]) == (
            rec["robust_accuracy"], rec["clean_accuracy"],
        )  # fmt: skip
        cells = _table_row(text, row["id"])
        assert cells[5:8] == [
            str(rec["n"]),
            _pct(rec["clean_accuracy"]),
            _pct(rec["robust_accuracy"]),
        ]
    other = _evals_of(runs, runs.other)[0]
    assert facts["sha256"] == _sha(runs.mlp) and other["model"]["sha256"] != facts["sha256"]


def test_an_int8_model_and_its_float_model_each_get_their_own_records(
    runs: Runs, tmp_path: Path
) -> None:
    assert _sha(runs.int8) == _sha(runs.mlp)  # the int8 checkpoint keeps the float weights
    (rec,) = _evals_of(runs, runs.int8)
    facts = _card(runs, tmp_path / "int8.md", model=["--model", str(runs.int8)])
    assert [r["robust_accuracy"] for r in facts["robust"]] == [rec["robust_accuracy"]]
    assert dict(facts["protocols"][0]["settings"])["attacked through"]
    assert len(_card(runs, tmp_path / "float.md")["robust"]) == 5


def test_card_states_each_protocol_in_full(runs: Runs, tmp_path: Path) -> None:
    facts = _card(runs, tmp_path / "card.md")
    text = (tmp_path / "card.md").read_text()
    pgd = [r for r in _evals_of(runs, runs.mlp) if r["attack"]["name"] == "pgd"]
    protocol = next(p for p in facts["protocols"] if p["title"] == "PGD-5")
    assert len(protocol["rows"]) == 3  # one robustness curve: one protocol for its three eps
    settings = dict(protocol["settings"])
    rec = pgd[0]
    assert settings["threat model"] == "linf, eps 0.05, 0.1, 0.2"
    assert settings["points"] == f"the first {rec['n']} test points"
    assert settings["seed"] == str(rec["seed"])
    assert settings["robustlab version"] == rec["robustlab_version"]
    assert settings["date"] == rec["created"][:19].replace("T", " ")
    assert settings["engine (passes without gradient)"].startswith(rec["engine"]["engine"] + ":")
    config = dict(protocol["attack_config"])  # a table of options, not a Python dict
    assert config["steps"] == "5" and config["restarts"] == str(rec["attack"]["restarts"])
    assert config["step size"] == f"{rec['attack']['alpha'] / rec['attack']['eps']:g} x eps"
    assert "| step size | " in text and "{'" not in text
    # the command line each record now carries, as typed
    assert rec["command"].startswith("robustlab eval --model ")
    assert protocol["commands"] == [rec["command"]] and rec["command"] in text
    assert rec["environment"]["torch"] == torch.__version__


def test_card_shows_autoattack_per_stage_and_grades_it(runs: Runs, tmp_path: Path) -> None:
    facts = _card(runs, tmp_path / "card.md")
    text = (tmp_path / "card.md").read_text()
    full = next(r for r in _evals_of(runs, runs.mlp) if r["attack"].get("version") == "standard")
    row = next(r for r in facts["robust"] if r["eps"] == 0.2 and "AutoAttack" in r["attack"])
    assert row["autoattack_grade"] and row["grade"] == "AutoAttack standard"
    part = next(r for r in facts["robust"] if r["eps"] == 0.1 and "AutoAttack" in r["attack"])
    assert not part["autoattack_grade"] and part["grade"] == "part of AutoAttack"
    assert [m["name"] for m in row["members"]] == [s["attack"] for s in full["per_attack"]]
    for step in full["per_attack"]:
        assert (
            f"| {step['attack']} | {_pct(step['robust_accuracy_after'])} | {step['broken']} |"
            in text
        )
    # linf 0.05 has only PGD: the card says that number is an upper bound, not AutoAttack-grade
    assert any("linf eps 0.05" in limit and "upper bounds" in limit for limit in facts["limits"])
    # the summary's number at a budget: the lowest stored, AutoAttack's among equals
    at = [r for r in facts["robust"] if r["eps"] == 0.2]
    best = min(at, key=lambda r: (r["robust_accuracy"], not r["autoattack_grade"]))
    summary = next(s for s in facts["summary"] if s["eps"] == 0.2)
    assert len(at) == 2 and summary["row"] == best["id"]


def test_card_shows_transfer_with_this_model_as_target(runs: Runs, tmp_path: Path) -> None:
    facts = _card(runs, tmp_path / "card.md")
    record = ResultStore(runs.store, read_only=True).records("transfer")[0]
    cell = record["cells"][0]
    (t,) = facts["transfer"]
    assert (t["role"], t["other"]) == ("target", str(runs.other))
    assert t["success_rate"] == cell["success_rate"] and t["n"] == cell["n"]
    text = (tmp_path / "card.md").read_text()
    assert _pct(cell["success_rate"]) + f" of {cell['n']}" in text
    # the transfer record carries its command line too, and the card lists it
    assert record["command"].startswith("robustlab transfer --sources ")
    assert [record["command"], "transfer"] in facts["commands"] and record["command"] in text
    of_other = _card(runs, tmp_path / "other.md", model=["--model", str(runs.other)])
    assert [x["role"] for x in of_other["transfer"]] == ["source"]


def test_card_of_a_model_without_results_says_so_and_how_to_make_them(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    facts = _card(runs, tmp_path / "none.md", model=runs.prob)
    text = (tmp_path / "none.md").read_text()
    assert facts["matched"] == {} and facts["robust"] == []
    assert "No results of this model are stored" in text
    assert f"robustlab eval --model {runs.prob[1]}" in facts["suggest"]
    assert facts["suggest"] in text and facts["suggest"] in capsys.readouterr().err


def test_card_carries_the_warnings_of_its_records(runs: Runs, tmp_path: Path) -> None:
    store = tmp_path / "prob.sqlite"
    _ok(["eval", *runs.prob, "--data", "digits", "--eps", "0.1", "--steps", "5", "--n", "30",
         "--store", str(store), "--no-progress"])  # fmt: skip
    (rec,) = ResultStore(store, read_only=True).records("eval")
    assert any("outputs probabilities" in w for w in rec["warnings"])
    out = tmp_path / "prob.md"
    _ok(["card", *runs.prob, "--store", str(store), "--out", str(out)])
    text = out.read_text()
    for warning in rec["warnings"]:
        assert f"- **warning:** {warning} (carried by R1)" in text
    clean = _card(runs, tmp_path / "clean.md")
    assert clean["warnings"] == []
    assert "No stored record carries a warning" in (tmp_path / "clean.md").read_text()


def test_html_card_is_the_same_card_in_the_report_style(runs: Runs, tmp_path: Path) -> None:
    facts = _card(runs, tmp_path / "card.html")
    page = (tmp_path / "card.html").read_text()
    assert page.startswith("<!doctype html>") and '<meta name=generator content="robustlab' in page
    for row in facts["robust"]:
        assert f'<td class="n">{_pct(row["robust_accuracy"])}</td>' in page
    # written again over its own card without --overwrite; --format overrides the suffix
    _ok(["card", "--model", str(runs.mlp), "--store", str(runs.store), "--out",
         str(tmp_path / "card.html")])  # fmt: skip
    _ok(["card", "--model", str(runs.mlp), "--store", str(runs.store), "--out",
         str(tmp_path / "card.txt"), "--format", "md"])  # fmt: skip
    assert (tmp_path / "card.txt").read_text().startswith("<!-- robustlab model card")


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run a command that must fail with one sentence; return it."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("robustlab: error: "), err
    return err


def test_card_refuses_a_store_that_is_missing_or_not_robustlabs(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "card.md"
    base = ["card", "--model", str(runs.mlp), "--out", str(out), "--store"]
    missing = tmp_path / "nowhere.sqlite"
    assert f"results store {missing} does not exist" in _error([*base, str(missing)], capsys)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE notes (x TEXT)")
    assert "not a robustlab results store" in _error([*base, str(other)], capsys)
    text = tmp_path / "text.sqlite"
    text.write_text("not a database at all, just some words\n" * 100)
    assert "is not a robustlab results store" in _error([*base, str(text)], capsys)
    assert not out.exists()


def test_card_refuses_an_unknown_format_and_a_file_it_did_not_write(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["card", "--model", str(runs.mlp), "--store", str(runs.store), "--out"]
    assert "--format md" in _error([*base, str(tmp_path / "card.txt")], capsys)
    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n")
    assert "pass --overwrite" in _error([*base, str(notes)], capsys)
    assert notes.read_text() == "# my notes\n"
    _ok([*base, str(notes), "--overwrite"])
    assert notes.read_text().startswith("<!-- robustlab model card")


def test_card_shows_slowdown_and_compressibility_results(runs: Runs, tmp_path: Path) -> None:
    exits, store = tmp_path / "exits", tmp_path / "more.sqlite"
    _ok(["exits", "--model", str(runs.mlp), "--data", "digits", "--out", str(exits),
         "--epochs", "1", "--latency-samples", "0", "--no-progress"])  # fmt: skip
    _ok(["sloth", "--model", str(exits), "--data", "digits", "--eps", "0.1", "--steps", "5",
         "--n", "30", "--latency-samples", "0", "--store", str(store), "--no-progress"])  # fmt: skip
    _ok(["compress", "--model", str(runs.mlp), "--data", "digits", "--n", "30", "--steps", "5",
         "--store", str(store), "--no-progress"])  # fmt: skip
    stored = ResultStore(store, read_only=True)
    (sloth,) = stored.records("sloth")
    (compress,) = stored.records("compress")
    out = tmp_path / "exits.md"
    _ok(["card", "--model", str(exits), "--store", str(store), "--out", str(out)])
    text = out.read_text()
    manifest = json.loads((exits / "manifest.json").read_text())
    for drop, res in manifest["metrics"]["early_exit_test"].items():
        assert _table_row(text, drop)[3] == _pct(res["accuracy_early_exit"])
    cells = _table_row(text, sloth["variant"])
    assert cells[4] == f"{_pct(sloth['clean']['flops_saving'])} → " + _pct(
        sloth["attacked"]["flops_saving"]
    )
    assert sloth["command"].startswith("robustlab sloth ") and sloth["command"] in text
    assert "No compressibility measurement is stored." in text  # compress ran on the backbone
    backbone = tmp_path / "backbone.json"
    _ok(["card", "--model", str(runs.mlp), "--store", str(store), "--out",
         str(tmp_path / "backbone.md"), "--json", str(backbone)])  # fmt: skip
    facts = json.loads(backbone.read_text())
    assert [(c["norm"], c["bound"]) for c in facts["compress"]] == [
        (norm, compress["bound"][norm]["bound"]) for norm in compress["gap"]
    ]

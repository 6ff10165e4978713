"""The combined report reads well, on a store of real evaluations of tiny digits models: one
curve line per model and attack configuration however its points were stored, attack
configurations as tables, each dataset named once in the header, and a sortable leaderboard
per threat model with AutoAttack-grade rows ranked and weaker attacks marked."""

from __future__ import annotations

import html as htmllib
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from torch import nn

from robustlab.attacks.registry import make_attack
from robustlab.cli.common import model_info
from robustlab.data import DataSplits, load_data
from robustlab.evaluate import evaluate, evaluate_curve
from robustlab.report import render_report
from robustlab.report.attack_spec import describe_attack
from robustlab.report.curves import curve_series
from robustlab.report.entries import read_entries
from robustlab.store import ResultStore
from robustlab.train import TrainConfig, train

N = 20  # test points per evaluation
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Stored:
    """A store of real evaluations and its rendered report."""

    store: ResultStore
    page: str
    npz_spec: str


def _add(store: ResultStore, records: Any, label: str) -> None:
    """Store evaluation records as ``robustlab eval --store`` does."""
    for r in records if isinstance(records, list) else [records]:
        store.add(r.to_dict(), label=label)


@pytest.fixture(scope="module")
def stored(digits: DataSplits, tmp_path_factory: pytest.TempPathFactory) -> Stored:
    """Three tiny mlps on digits: 'std' evaluated by PGD in three separate single-eps runs
    (stored out of eps order) and by AutoAttack; 'at' (PGD-AT) by one PGD curve run from eps 0
    and by AutoAttack; 'weak' only by FGSM and an AutoAttack subset; and 'at' on an npz copy
    of the test split. About 10 s."""
    tmp = tmp_path_factory.mktemp("readable")
    store = ResultStore(tmp / "results.sqlite")
    models = {}
    for label, cfg in {
        "std": TrainConfig(arch="mlp", data="digits", epochs=1),
        "at": TrainConfig(arch="mlp", data="digits", method="pgd-at", eps=0.1, steps=3, epochs=2),
        "weak": TrainConfig(arch="mlp", data="digits", epochs=1, seed=1),
    }.items():
        got = train(cfg, tmp / label, splits=digits, progress=False)
        models[label] = (got.model, model_info(got.manifest, tmp / label))
        store.add({**got.manifest, "kind": "train"}, label=label)

    def run(label: str, attack: str, eps: float, data: Any = None, **kw: Any) -> Any:
        """One single-eps evaluation of a model, as ``robustlab eval --eps E``."""
        model, info = models[label]
        test = digits.test if data is None else data
        return evaluate(
            model,
            test,
            make_attack(attack, "linf", eps, **kw),
            n=N,
            model_info=info,
            progress=False,
            engine="torch",
        )

    for eps in (0.3, 0.1, 0.2):
        _add(store, run("std", "pgd", eps, steps=5), "std")
    _add(store, run("std", "autoattack", 0.1, version="rand"), "std")
    model, info = models["at"]
    curve = [make_attack("pgd", "linf", e, steps=5) for e in (0.0, 0.1, 0.2, 0.3)]
    _add(
        store,
        evaluate_curve(
            model, digits.test, curve, n=N, model_info=info, progress=False, engine="torch"
        ),
        "at",
    )
    _add(store, run("at", "autoattack", 0.1, version="rand"), "at")
    _add(store, run("weak", "fgsm", 0.1), "weak")
    _add(store, run("weak", "autoattack", 0.1, attacks=("apgd-ce",)), "weak")
    npz = tmp / "digits-test.npz"
    np.savez(npz, x=digits.test.x.numpy(), y=digits.test.y.numpy())
    npz_data = load_data(f"npz:{npz}", test_only=True)
    _add(store, run("at", "fgsm", 0.1, data=npz_data.test), "at")
    page = render_report(store, tmp / "report.html").read_text()
    return Stored(store, page, f"npz:{npz}")


def _section(page: str, anchor: str) -> str:
    """The HTML of one section of the report."""
    match = re.search(rf"<section id={anchor}>(.*?)</section>", page, re.S)
    assert match, f"no section {anchor}"
    return match.group(1)


def _rows(table_html: str) -> list[list[str]]:
    """The text of every body row's cells."""
    body = "".join(re.findall(r"<tbody>(.*?)</tbody>", table_html, re.S))
    return [
        [
            " ".join(htmllib.unescape(re.sub(r"<[^>]+>", " ", c)).split())
            for c in re.findall(r"<t[dh](?:\s[^>]*)?>(.*?)</t[dh]>", row, re.S)
        ]
        for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)
    ]


def _heads(table_html: str) -> list[str]:
    """The text of a table's header cells."""
    head = re.search(r"<thead>(.*?)</thead>", table_html, re.S)
    assert head
    cells = re.findall(r"<th(?:\s[^>]*)?>(.*?)</th>", head.group(1), re.S)
    return [re.sub(r"<[^>]+>", "", c) for c in cells]


def _pct(cell: str) -> float:
    """'≤ 45.0 %' -> 45.0."""
    return float(cell.replace("≤", "").replace("%", "").strip())


def _sha(stored: Stored, label: str) -> str:
    """The weights hash of a stored model."""
    (train_record,) = stored.store.records(kind="train", label=label)
    return str(train_record["weights"]["sha256"])


def _robust(stored: Stored, label: str, attack: str, eps: float) -> float:
    """A stored robust accuracy, in %."""
    (found,) = [
        r
        for r in stored.store.records(kind="eval", label=label)
        if r["attack"]["name"] == attack
        and r["threat_model"]["eps"] == eps
        and r["data"] == "digits/test"
    ]
    return round(100 * float(found["robust_accuracy"]), 1)


def test_single_eps_runs_of_one_model_are_one_line_in_eps_order(stored: Stored) -> None:
    entries, failed = read_entries(stored.store.records(kind="eval"))
    assert not failed
    lines = curve_series(entries)[("digits", "linf")]
    std = [s for s in lines if s.model == _sha(stored, "std")]
    # three single-eps PGD runs stored as 0.3, 0.1, 0.2: one line, clean first, then eps order
    (pgd,) = [s for s in std if s.attack.name == "pgd"]
    assert [e for e, _ in pgd.points()] == [0.0, 0.1, 0.2, 0.3]
    assert pgd.points()[0][1] == pgd.clean
    # AutoAttack at eps 0.1 is a line of its own, not a replacement of PGD's point there
    assert sorted(s.attack.name for s in std) == ["AutoAttack rand", "pgd"]
    assert round(100 * pgd.points()[1][1], 1) == _robust(stored, "std", "pgd", 0.1)
    # a curve run that starts at eps 0 is one line as well
    (at_pgd,) = [s for s in lines if s.model == _sha(stored, "at") and s.attack.name == "pgd"]
    assert [e for e, _ in at_pgd.points()] == [0.0, 0.1, 0.2, 0.3]


def test_the_curve_table_has_one_row_per_model_and_attack(stored: Stored) -> None:
    curves = _section(stored.page, "curves")
    tables = re.findall(r"<table>.*?</table>", curves, re.S)
    assert len(tables) == 2  # digits and the npz copy: one plot and table each
    assert curves.count("data:image/png;base64,") == 2
    head = _heads(tables[0])
    assert head[:4] == ["model", "attack", "points", "clean"]
    assert head[4:] == ["eps 0", "eps 0.1", "eps 0.2", "eps 0.3"]
    rows = {(r[0], r[1]): r[4:] for r in _rows(tables[0])}
    assert rows[("std", "pgd")][1:] == [
        f"{_robust(stored, 'std', 'pgd', eps):.1f} %" for eps in (0.1, 0.2, 0.3)
    ]
    assert rows[("std", "AutoAttack rand")] == [
        "–",
        f"{_robust(stored, 'std', 'autoattack', 0.1):.1f} %",
        "–",
        "–",
    ]
    assert set(rows) == {
        ("std", "pgd"),
        ("std", "AutoAttack rand"),
        ("at", "pgd"),
        ("at", "AutoAttack rand"),
        ("weak", "fgsm"),
        ("weak", "AutoAttack subset"),
    }


def test_attack_configurations_are_a_table_of_parameters(stored: Stored) -> None:
    assert "{'" not in stored.page and "':" not in stored.page  # no Python dict anywhere
    table = _section(stored.page, "attacks")
    head = _heads(table)
    assert head[:7] == ["attack", "norm", "eps", "steps", "restarts", "step size", "loss"]
    rows = {(r[0], r[1]): r for r in _rows(table)}
    pgd = rows[("pgd", "linf")]
    assert pgd[2] == "0, 0.1, 0.2, 0.3" and pgd[3] == "5" and pgd[4] == "1"
    assert pgd[5] == "2.5·eps/steps" and pgd[6] == "ce"
    assert pgd[8] == "std, at"  # one configuration, both models
    auto = rows[("AutoAttack rand leaderboard-grade", "linf")]
    assert auto[7] == "members: apgd-ce, apgd-dlr"
    assert rows[("AutoAttack subset", "linf")][7] == "members: apgd-ce"  # not graded


def test_the_header_names_each_dataset_once(stored: Stored) -> None:
    header = stored.page.split("<body>", 1)[1].split("<section", 1)[0]
    text = htmllib.unescape(re.sub(r"<[^>]+>", " ", header))
    assert text.count("digits") == 1 + stored.npz_spec.count("digits")
    assert f"data: digits, {stored.npz_spec} " in text  # the npz spec whole, its split dropped
    assert "3 models" in text


def test_leaderboard_ranks_autoattack_and_marks_weaker_attacks(stored: Stored) -> None:
    board = _section(stored.page, "leaderboard")
    headings = re.findall(r"<h3>(.*?)</h3>", board)
    assert headings == ["linf eps 0.1 · digits"]  # the only threat model with AutoAttack
    (table,) = re.findall(r"<table class=sortable>.*?</table>", board, re.S)
    ranked_body, upper_body = re.findall(r"<tbody>.*?</tbody>", table, re.S)
    ranked = _rows(ranked_body)
    assert [r[0] for r in ranked] == ["1", "2"]
    assert {r[1] for r in ranked} == {"std", "at"}
    robust = [_pct(r[5]) for r in ranked]
    assert robust == sorted(robust, reverse=True)
    assert all(r[6] == "AutoAttack rand" for r in ranked)
    assert [r[4] for r in ranked] == [
        f"{100 * float(_clean(stored, name)):.1f} %" for name in (r[1] for r in ranked)
    ]
    # 'weak' was attacked only by FGSM and an AutoAttack subset: marked, not ranked, its
    # tightest upper bound shown
    group, weak = _rows(upper_body)
    assert "upper bound" in group[0]
    assert weak[0] == "–" and weak[1] == "weak" and weak[5].startswith("≤")
    assert weak[6].startswith("upper bound: ")
    assert "<tr class=ub>" in upper_body
    bounds = [_robust(stored, "weak", a, 0.1) for a in ("fgsm", "autoattack")]
    assert _pct(weak[5]) == min(bounds)
    assert str(N) in weak[7]
    # the npz copy has FGSM only: listed as weaker-only, not a board of its own
    assert "Threat models evaluated by weaker attacks only" in board


def _clean(stored: Stored, label: str) -> float:
    """The clean accuracy of a model's AutoAttack record."""
    (found,) = [
        r
        for r in stored.store.records(kind="eval", label=label)
        if r["attack"]["name"] == "autoattack"
    ]
    return float(found["clean_accuracy"])


def test_the_report_is_one_offline_file_with_an_inline_sort_script(stored: Stored) -> None:
    page = stored.page
    assert page.count("<script>") == 1 and "<script src" not in page
    assert not re.search(r"(src|href)=[\"']?(https?:|//)", page)
    assert "<link" not in page
    numbers = re.findall(r"data-v='([^']*)'", page)
    assert numbers and all(v == "" or float(v) >= 0 for v in numbers)


@pytest.mark.skipif(CHROMIUM is None, reason="needs a headless Chromium")
def test_clicking_a_header_sorts_the_leaderboard(stored: Stored, tmp_path: Path) -> None:
    probe = """<script>
var t = document.querySelector("table.sortable"), out = [];
function col(i) { return Array.prototype.map.call(t.tBodies[0].rows,
  function (r) { return r.cells[i].textContent; }).join("|"); }
var clean = t.tHead.rows[0].cells[4], model = t.tHead.rows[0].cells[1];
clean.click(); out.push(clean.getAttribute("aria-sort") + " " + col(4));
clean.click(); out.push(clean.getAttribute("aria-sort") + " " + col(4));
model.click(); out.push(model.getAttribute("aria-sort") + " " + col(1));
document.body.insertAdjacentHTML("beforeend", "<pre id=probe>" + out.join("\\n") + "</pre>");
</script></body>"""
    page = tmp_path / "probe.html"
    page.write_text(stored.page.replace("</body>", probe))
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--dump-dom",
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, "the probe did not run"
    lines = found.group(1).splitlines()
    order = [
        [_pct(c) if "%" in c else c for c in line.split(" ", 1)[1].split("|")] for line in lines
    ]
    assert lines[0].startswith("descending") and order[0] == sorted(order[0], reverse=True)
    assert lines[1].startswith("ascending") and order[1] == sorted(order[1])
    assert lines[2].startswith("ascending") and order[2] == ["at", "std"]


def test_only_a_whole_autoattack_version_or_msa_is_leaderboard_grade() -> None:
    eps = 8 / 255
    for version in ("standard", "plus", "rand"):
        spec = describe_attack(make_attack("autoattack", "linf", eps, version=version).config())
        assert (spec.name, spec.grade) == (f"AutoAttack {version}", "AutoAttack")
    subset = make_attack("autoattack", "linf", eps, attacks=("apgd-ce", "apgd-t")).config()
    assert describe_attack(subset).grade is None
    assert describe_attack(make_attack("apgd-ce", "linf", eps).config()).grade is None
    msa = {"name": "msa", "surrogates": ["fc"], "surrogate_attacks": ["apgd-ce"]}
    full = make_attack("autoattack", "linf", eps).config()
    assert describe_attack({**msa, "autoattack": full}).grade == "MSA"
    assert describe_attack({**msa, "autoattack": subset}).grade is None


def test_runs_with_a_fixed_step_and_models_named_alike(
    digits_net: nn.Module, digits: DataSplits, tmp_path: Path
) -> None:
    """A fixed --alpha gives another step/eps ratio at each eps and is still one line; one
    label on two different weights is two models, named apart; the same weights stored
    under two labels are one model."""
    store = ResultStore(tmp_path / "s.sqlite")
    a: dict[str, object] = {"arch": "resnet8", "sha256": "a" * 64}
    b: dict[str, object] = {"arch": "resnet8", "sha256": "b" * 64}
    for eps, label, info in ((0.05, "net", a), (0.1, "net-v2", a), (0.1, "net-v2", b)):
        attack = make_attack("pgd", "linf", eps, steps=3, alpha=0.02)
        rec = evaluate(digits_net, digits.test, attack, n=N, model_info=info, progress=False)
        store.add(rec.to_dict(), label=label)
    entries, _ = read_entries(store.records(kind="eval"))
    lines = curve_series(entries)[("digits", "linf")]
    assert sorted(len(s.by_eps) for s in lines) == [1, 2]  # a's two eps on one line
    page = render_report(store, tmp_path / "r.html").read_text()
    rows = {r[0]: r for r in _rows(_section(page, "curves"))}
    assert set(rows) == {"net-v2 (aaaaaaaa)", "net-v2 (bbbbbbbb)"}
    (pgd,) = _rows(_section(page, "attacks"))
    assert pgd[5] == "0.02 at every eps" and pgd[8] == "net-v2 (aaaaaaaa), net-v2 (bbbbbbbb)"

"""Evaluation records, input checks, the results store and the HTML report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import pytest
import torch
from torch import nn

from robustlab.attacks import PGD
from robustlab.data import Dataset
from robustlab.errors import RobustlabError
from robustlab.evaluate import evaluate, evaluate_curve
from robustlab.report import render_report
from robustlab.store import ResultStore


def _toy() -> tuple[nn.Sequential, Dataset]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    x = torch.rand(60, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:10] = (y[:10] + 1) % 3  # ten points misclassified when clean
    return model, Dataset(x, y, 3, "toy")


def test_record_holds_what_the_issue_asks_for() -> None:
    model, data = _toy()
    rec = evaluate(model, data, PGD(eps=0.05, steps=5), n=40, model_info={"sha256": "abc"}, seed=3)
    d = rec.to_dict()
    for key in (
        "clean_accuracy",
        "robust_accuracy",
        "n",
        "threat_model",
        "attack",
        "model",
        "elapsed_s",
        "seed",
    ):
        assert key in d
    assert d["n"] == 40 and d["seed"] == 3 and d["model"] == {"sha256": "abc"}
    assert d["threat_model"] == {"norm": "linf", "eps": 0.05}
    assert (
        d["attack"]["name"] == "pgd" and d["attack"]["steps"] == 5 and d["attack"]["restarts"] == 1
    )
    assert d["clean_accuracy"] == pytest.approx(30 / 40)
    assert 0 <= d["robust_accuracy"] <= d["clean_accuracy"]
    json.dumps(d)


def test_robust_accuracy_counts_points_right_clean_and_under_attack() -> None:
    model, data = _toy()
    big = evaluate(model, data, PGD(eps=1.0, steps=10), progress=False)
    none = evaluate(model, data, PGD(eps=0.0, steps=1), progress=False)
    assert none.robust_accuracy == none.clean_accuracy == pytest.approx(50 / 60)
    assert big.robust_accuracy < 0.2  # eps 1 covers the whole box


def test_results_do_not_depend_on_the_batch_size() -> None:
    """A deterministic attack: the same verdict for every point, whatever the batches."""
    model, data = _toy()
    attack = PGD(eps=0.1, steps=5, random_start=False)
    a = evaluate(model, data, attack, batch_size=7, progress=False)
    b = evaluate(model, data, attack, batch_size=60, progress=False)
    assert a.clean_accuracy == b.clean_accuracy
    assert a.robust_accuracy == b.robust_accuracy
    assert [r["robust"] for r in a.samples] == [r["robust"] for r in b.samples]
    assert 0 < a.robust_accuracy < a.clean_accuracy  # the attack broke some points, not all


def test_random_starts_move_at_most_two_of_sixty_points_across_batch_sizes() -> None:
    """Random starts are drawn per batch, so other batches give other starts (a few points)."""
    model, data = _toy()
    a = evaluate(model, data, PGD(eps=0.1, steps=5), batch_size=7, progress=False)
    b = evaluate(model, data, PGD(eps=0.1, steps=5), batch_size=60, progress=False)
    assert a.clean_accuracy == b.clean_accuracy
    assert abs(a.robust_accuracy - b.robust_accuracy) <= 2 / 60


def test_train_mode_model_is_evaluated_in_eval_mode_and_restored() -> None:
    model, data = _toy()
    model.append(nn.Dropout(0.9))
    model.train()
    with pytest.warns(UserWarning, match="train mode"):
        rec = evaluate(model, data, PGD(eps=0.0, steps=1), progress=False)
    assert rec.clean_accuracy == pytest.approx(50 / 60)  # dropout was off during evaluation
    assert model.training


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("nan", "NaN or Inf"),
        ("range", r"inputs must lie in \[0,1\]"),
        ("n0", "n must be >= 1"),
        ("nbig", "asked for n=61 points but the test split has only 60"),
        ("batch", "batch size must be >= 1"),
    ],
)
def test_bad_evaluation_input(change: str, message: str) -> None:
    model, data = _toy()
    n, bs = None, 250
    if change == "nan":
        x = data.x.clone()
        x[3, 0, 1, 1] = float("nan")
        data = Dataset(x, data.y, 3, "toy")
    elif change == "range":
        data = Dataset(data.x * 255, data.y, 3, "toy")
    elif change == "n0":
        n = 0
    elif change == "nbig":
        n = 61
    else:
        bs = 0
    with pytest.raises(RobustlabError, match=message):
        evaluate(model, data, PGD(eps=0.1, steps=2), n=n, batch_size=bs, progress=False)


def test_store_round_trip_and_report(tmp_path: Path) -> None:
    model, data = _toy()
    store = ResultStore(tmp_path / "r.sqlite")
    for label in ("a", "b"):
        for eps in (0.0, 0.05, 0.1):
            rec = evaluate(model, data, PGD(eps=eps, steps=3), progress=False)
            store.add(rec.to_dict(), label=label)
    store.add({"kind": "timing", "step": "train <a>", "seconds": 1.5, "created": ""})
    evals = ResultStore(tmp_path / "r.sqlite").records(kind="eval", label="b")
    assert len(evals) == 3 and {r["threat_model"]["eps"] for r in evals} == {0.0, 0.05, 0.1}
    html = render_report(store, tmp_path / "report.html", title="t <1>").read_text()
    assert "<title>t &lt;1&gt;</title>" in html and "train &lt;a&gt;" in html
    assert html.count("data:image/png;base64,") == 1
    assert "eps 0.05" in html and "<td class=l>b</td>" in html


def test_store_refuses_a_file_that_is_not_sqlite(tmp_path: Path) -> None:
    bad = tmp_path / "r.sqlite"
    bad.write_text("hello, I am not a database" * 100)
    with pytest.raises(RobustlabError, match="is not a robustlab results store"):
        ResultStore(bad)


def test_curve_is_per_sample_worst_case_along_eps() -> None:
    model, data = _toy()
    grid = [0.2, 0.0, 0.05, 0.1]  # any order; records come back in the order given
    records = evaluate_curve(model, data, [PGD(eps=e, steps=5) for e in grid], progress=False)
    assert [r.threat_model["eps"] for r in records] == grid
    by_eps = sorted((r.threat_model["eps"], r.robust_accuracy) for r in records)
    accs = [a for _, a in by_eps]
    assert accs == sorted(accs, reverse=True)  # never rises with eps
    # per sample: a point robust at some eps is robust at every smaller eps, also where
    # weak one-step attacks at close eps, each run on its own, break one point at some eps
    # but not at the next (measured at seed 0): the curve must carry that point over
    close = [PGD(eps=e, steps=1) for e in (0.06, 0.07, 0.08, 0.09)]
    for curve in (records, evaluate_curve(model, data, close, progress=False)):
        by_size = sorted(curve, key=lambda r: cast(float, r.threat_model["eps"]))
        verdicts = [[bool(s["robust"]) for s in r.samples] for r in by_size]
        for smaller, larger in zip(verdicts, verdicts[1:], strict=False):
            assert all(a or not b for a, b in zip(smaller, larger, strict=True))
        assert verdicts[0] != verdicts[-1]  # the attacks broke points along the way
    assert accs[0] == records[1].clean_accuracy  # eps 0 is the clean accuracy
    alone = evaluate(model, data, PGD(eps=0.05, steps=5), progress=False)
    first_attacked = evaluate_curve(
        model, data, [PGD(eps=0.05, steps=5), PGD(eps=0.1, steps=5)], progress=False
    )
    assert first_attacked[0].robust_accuracy == alone.robust_accuracy


def test_curve_needs_one_norm_and_some_attack() -> None:
    model, data = _toy()
    with pytest.raises(RobustlabError, match="needs one norm"):
        evaluate_curve(model, data, [PGD(eps=0.1), PGD(norm="l2", eps=0.5)], progress=False)
    with pytest.raises(RobustlabError, match="no attack"):
        evaluate_curve(model, data, [], progress=False)

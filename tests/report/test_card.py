"""Model cards as a library: the gradient-masking warnings a card derives from several records
(on real evaluation records, edited where a test needs a case the small model does not show),
the sampling interval, matching by hash, and a card with no results."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from torch import nn

from robustlab.attacks.registry import make_attack
from robustlab.data import DataSplits
from robustlab.evaluate import evaluate_curve
from robustlab.report.card import build_card, render_html, render_markdown
from robustlab.report.card.text import wilson

SHA = "ab" * 32
MANIFEST: dict[str, Any] = {
    "format": "robustlab-checkpoint",
    "model": {"arch": "resnet8", "in_channels": 1, "image_size": 8, "num_classes": 10},
    "dataset": {"name": "digits", "test_size": 359},
    "training": {"method": "pgd-at", "eps": 0.2, "norm": "linf", "epochs": 4},
    "weights": {"sha256": SHA},
}


@pytest.fixture(scope="module")
def records(digits_net: nn.Module, digits: DataSplits) -> list[dict[str, Any]]:
    """Real records of the session's digits net: a PGD curve at eps 0.05 / 0.1 / 0.5 and
    Square at 0.1, on the same 40 points."""
    info: dict[str, object] = {"sha256": SHA, "arch": "resnet8", "path": "net"}
    pgd = [make_attack("pgd", "linf", e, steps=5) for e in (0.05, 0.1, 0.5)]
    square = [make_attack("square", "linf", 0.1, queries=50)]
    out = []
    for attacks in (pgd, square):
        recs = evaluate_curve(
            digits_net, digits.test, attacks, n=40, progress=False, model_info=info
        )
        out += [r.to_dict() for r in recs]
    return out


def _card(records: list[dict[str, Any]]) -> Any:
    return build_card(records, MANIFEST, model="net", store="s.sqlite")


def _derived(card: Any) -> list[Any]:
    return [w for w in card.warnings if w.origin == "derived"]


def _row(card: Any, eps: float, attack: str) -> Any:
    return next(r for r in card.robust if r.eps == eps and r.attack.startswith(attack))


def test_a_real_curve_gives_no_rising_warning_and_an_edited_one_does(
    records: list[dict[str, Any]],
) -> None:
    pgd = [r for r in records if r["attack"]["name"] == "pgd"]
    assert not any("rises" in w.text for w in _derived(_card(pgd)))
    edited = copy.deepcopy(pgd)
    low, high = edited[0], edited[1]  # eps 0.05 and 0.1, one protocol
    high["robust_accuracy"] = low["robust_accuracy"] + 0.1
    card = _card(edited)
    (w,) = [w for w in _derived(card) if "rises" in w.text]
    assert w.rows == [_row(card, 0.05, "PGD").id, _row(card, 0.1, "PGD").id]
    assert "P1" in w.text and len(card.protocols) == 1


def test_a_query_attack_beating_the_gradient_attack_is_warned_of(
    records: list[dict[str, Any]],
) -> None:
    edited = copy.deepcopy(records)
    pgd = next(
        r for r in edited if r["attack"]["name"] == "pgd" and r["threat_model"]["eps"] == 0.1
    )
    square = next(r for r in edited if r["attack"]["name"] == "square")
    square["robust_accuracy"] = pgd["robust_accuracy"]
    assert not any("query-only" in w.text for w in _derived(_card(edited)))
    square["robust_accuracy"] = pgd["robust_accuracy"] - 0.05
    card = _card(edited)
    (w,) = [w for w in _derived(card) if "query-only" in w.text]
    assert w.rows == [_row(card, 0.1, "square").id, _row(card, 0.1, "PGD").id]
    assert f"same {pgd['n']} points" in w.text


def test_high_robust_accuracy_at_linf_half_is_warned_of(records: list[dict[str, Any]]) -> None:
    edited = copy.deepcopy(records)
    half = next(r for r in edited if r["threat_model"]["eps"] == 0.5)
    assert half["robust_accuracy"] <= 0.5  # the real net is broken there
    assert not any("grey image" in w.text for w in _derived(_card(edited)))
    half["robust_accuracy"] = 0.9
    assert any("grey image" in w.text for w in _derived(_card(edited)))


def test_only_records_with_the_models_hash_are_on_its_card(
    records: list[dict[str, Any]],
) -> None:
    other = copy.deepcopy(records[0])
    other["model"]["sha256"] = "cd" * 32
    card = _card([*records, other])
    assert len(card.robust) == len(records)
    assert card.matched == {"eval": len(records)}


def test_single_attacks_only_say_the_number_is_an_upper_bound(
    records: list[dict[str, Any]],
) -> None:
    card = _card(records)
    assert not any(r.autoattack_grade for r in card.robust)
    (limit,) = [x for x in card.limits if "No AutoAttack-grade evaluation" in x]
    assert "upper bound on robust accuracy" in limit
    # the suggestion evaluates at the eps the model was adversarially trained at
    assert card.suggest == (
        "robustlab eval --model net --data digits --attack autoattack --eps 0.2 --store s.sqlite"
    )
    assert card.suggest in render_markdown(card)


def test_wilson_interval_matches_the_textbook_values() -> None:
    lo, hi = wilson(0.5, 50)
    assert (round(lo, 4), round(hi, 4)) == (0.3664, 0.6336)
    assert wilson(0.0, 20)[0] == 0.0 and 0.16 < wilson(0.0, 20)[1] < 0.17


def test_a_card_without_results_renders_in_both_formats() -> None:
    card = _card([])
    assert card.robust == [] and card.summary == [] and card.matched == {}
    md, page = render_markdown(card), render_html(card)
    assert "No results of this model are stored" in md
    assert "No results of this model are stored" in page and "<h2>Summary</h2>" not in page


def test_a_stored_train_manifest_is_matched_by_its_weights_hash() -> None:
    stored = {**MANIFEST, "kind": "train", "label": "net"}  # as robustlab demo stores it
    elsewhere = {**MANIFEST, "kind": "train", "weights": {"sha256": "cd" * 32}}
    card = _card([stored, elsewhere])
    assert card.matched == {"train": 1} and card.labels == ["net"]

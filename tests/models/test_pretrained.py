"""The shipped models (``zoo:NAME``): each loads, is small, and still has the clean and
AutoAttack accuracy its card states, point for point.

AutoAttack's random starts are drawn per batch, so the card's run is replayed exactly on a
prefix of its first batch. The default tests replay its first member (APGD-CE) on 100 points
of every model, which must break exactly the points the card says it broke there, and the
whole of AutoAttack on the standard models (cheap: everything falls at once); the slow tests
replay the whole run on all 1,000 points.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from robustlab.attacks.autoattack import AutoAttack
from robustlab.data import DataSplits
from robustlab.errors import RobustlabError
from robustlab.evaluate import evaluate
from robustlab.models.checkpoint import load_checkpoint
from robustlab.models.pretrained import zoo_entries, zoo_entry, zoo_names

#: What the issue asks the zoo to hold: standard, PGD-AT, TRADES and the multi-exit model.
EXPECTED = {"resnet8-standard", "resnet8-pgd-at", "resnet8-trades", "resnet8-standard-sdn"}
#: Points of the first AutoAttack batch replayed by the default tests.
PREFIX = 100
#: The models whose whole AutoAttack run the default tests replay on that prefix.
CHEAP = ("resnet8-standard", "resnet8-standard-sdn")


def _outcome(record: dict[str, Any]) -> str:
    """A run's per-point outcome in the card's letters."""
    letters = []
    for row in record["samples"]:
        if row["clean_pred"] != row["label"]:
            letters.append("x")
        else:
            letters.append("r" if row["robust"] else "b")
    return "".join(letters)


def _replay(name: str, mnist: DataSplits, n: int, members: tuple[str, ...] = ()) -> dict[str, Any]:
    """The card's AutoAttack run (or its first ``members``) on the first ``n`` test points,
    as one batch."""
    card = zoo_entry(name).card["autoattack"]
    assert n <= card["batch_size"]  # a prefix of the card's first batch: same random starts
    attack = AutoAttack(
        norm=card["norm"],
        eps=card["eps"],
        version=card["version"],
        attacks=members,
        seed=card["seed"],
    )
    model = load_checkpoint(f"zoo:{name}").model
    record = evaluate(
        model, mnist.test, attack, n=n, batch_size=n, seed=card["seed"], progress=False
    )
    return record.to_dict(samples=True)


def test_the_zoo_ships_the_four_models_each_small_and_hashed() -> None:
    assert set(zoo_names()) >= EXPECTED
    for entry in zoo_entries():
        weights = entry.folder / "model.safetensors"
        assert weights.stat().st_size < 1_000_000
        assert hashlib.sha256(weights.read_bytes()).hexdigest() == entry.card["sha256"]
        manifest = load_checkpoint(entry.spec).manifest
        assert manifest["weights"]["sha256"] == entry.card["sha256"]
        assert entry.card["recipe"]["command"].startswith("robustlab train --arch resnet8")
        assert entry.card["autoattack"]["n"] == len(entry.card["autoattack"]["outcome"]) == 1000


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_model_misclassifies_exactly_the_points_its_card_says(
    name: str, mnist: DataSplits
) -> None:
    card = zoo_entry(name).card
    model = load_checkpoint(f"zoo:{name}").model
    with torch.no_grad():
        pred = model(mnist.test.x).argmax(1)
    wrong = {i for i, ok in enumerate((pred == mnist.test.y).tolist()) if not ok}
    assert wrong == {i for i, c in enumerate(card["autoattack"]["outcome"]) if c == "x"}
    assert 1 - len(wrong) / len(mnist.test.y) == pytest.approx(card["clean_accuracy"], abs=1e-9)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_apgd_ce_breaks_exactly_the_points_the_card_says_it_broke_on_a_prefix(
    name: str, mnist: DataSplits
) -> None:
    card = zoo_entry(name).card["autoattack"]
    first = card["per_attack"][0]["attack"]
    record = _replay(name, mnist, PREFIX, (first,))
    broken = {
        r["index"] for r in record["samples"] if r["clean_pred"] == r["label"] and not r["robust"]
    }
    assert broken == {i for i in card["broken_by"].get(first, []) if i < PREFIX}
    assert broken  # the prefix holds points the attack breaks, so a no-op attack fails here


@pytest.mark.parametrize("name", CHEAP)
def test_autoattack_breaks_the_points_the_card_says_on_a_prefix(
    name: str, mnist: DataSplits
) -> None:
    got = _outcome(_replay(name, mnist, PREFIX))
    assert got == zoo_entry(name).card["autoattack"]["outcome"][:PREFIX]


def test_cards_robust_accuracy_and_per_stage_counts_are_its_outcome() -> None:
    for entry in zoo_entries():
        aa = entry.card["autoattack"]
        assert aa["robust_accuracy"] == pytest.approx(aa["outcome"].count("r") / aa["n"])
        by = sorted(i for broken in aa["broken_by"].values() for i in broken)
        assert by == [i for i, c in enumerate(aa["outcome"]) if c == "b"]
        for stage in aa["per_attack"]:
            assert len(aa["broken_by"].get(stage["attack"], [])) == stage["broken"]
        assert aa["clean_accuracy"] == entry.card["clean_accuracy"]


def test_an_unknown_shipped_model_names_the_ones_there_are() -> None:
    with pytest.raises(RobustlabError, match="zoo:resnet8-standard"):
        load_checkpoint("zoo:resnet8-nope")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_model_has_its_cards_autoattack_accuracy_on_all_points(
    name: str, mnist: DataSplits
) -> None:
    card = zoo_entry(name).card["autoattack"]
    attack = AutoAttack(
        norm=card["norm"], eps=card["eps"], version=card["version"], seed=card["seed"]
    )
    model = load_checkpoint(f"zoo:{name}").model
    record = evaluate(
        model, mnist.test, attack, n=card["n"], batch_size=card["batch_size"], progress=False
    ).to_dict(samples=True)
    assert record["robust_accuracy"] == card["robust_accuracy"]
    assert _outcome(record) == card["outcome"]


@pytest.mark.slow
def test_the_standard_recipe_with_one_thread_gives_the_shipped_weights_bit_for_bit(
    tmp_path: Path,
) -> None:
    from robustlab.train import TrainConfig, train
    from robustlab.train.loop import training_splits

    recipe = zoo_entry("resnet8-standard").card["recipe"]
    cfg = TrainConfig(**recipe["config"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        splits = training_splits(cfg, recipe["calibration"])
        result = train(cfg, tmp_path / "std", splits=splits, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert result.manifest["weights"]["sha256"] == zoo_entry("resnet8-standard").card["sha256"]


def test_a_card_of_a_shipped_model_states_the_zoos_autoattack_run(tmp_path: Path) -> None:
    from robustlab.cli import main
    from robustlab.store import ResultStore

    ResultStore(tmp_path / "empty.sqlite")
    out = tmp_path / "card.md"
    assert (
        main(
            [
                "card",
                "--model",
                "zoo:resnet8-standard",
                "--store",
                str(tmp_path / "empty.sqlite"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = out.read_text()
    aa = zoo_entry("resnet8-standard").card["autoattack"]
    assert "in robustlab's zoo" in text and aa["command"] in text
    assert "robustlab train --arch resnet8 --method standard --calibration 500" in text


def test_records_name_a_shipped_model_as_zoo_name_not_its_install_folder(tmp_path: Path) -> None:
    from robustlab.cli import main

    out = tmp_path / "r.json"
    args = ["eval", "--model", "zoo:resnet8-standard", "--eps", "0.1", "--steps", "1", "--n", "8"]
    assert main([*args, "--json", str(out), "--no-progress"]) == 0
    record = json.loads(out.read_text())
    assert record["model"]["path"] == "zoo:resnet8-standard"
    assert record["model"]["sha256"] == zoo_entry("resnet8-standard").card["sha256"]

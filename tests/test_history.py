"""Run history in Python: records stored as the demo and the CLI store them
(``to_dict(samples=True)``), an MSA run compared stage by stage with a plain one, and the
refusals of ``compare_runs``."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from robustlab.attacks import PGD
from robustlab.data import DataSplits
from robustlab.errors import RobustlabError
from robustlab.evaluate import evaluate, evaluate_curve
from robustlab.evaluate.msa import evaluate_msa
from robustlab.history import RunFilter, compare_runs, list_runs, parse_when, spans
from robustlab.store import ResultStore
from robustlab.train import TrainConfig, train


@pytest.fixture(scope="module")
def surrogate(digits: DataSplits, tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    """A small MLP trained on digits, used as MSA's surrogate of another model."""
    cfg = TrainConfig(arch="mlp", data="digits", epochs=3, arch_options={"width": 16})
    out = tmp_path_factory.mktemp("surrogate")
    return train(cfg, out, splits=digits, progress=False).model.eval()


def test_an_msa_run_compares_stage_by_stage_with_a_plain_run(
    digits_net: nn.Module, surrogate: nn.Module, digits: DataSplits, tmp_path: Path
) -> None:
    store = ResultStore(tmp_path / "s.sqlite")
    info: dict[str, object] = {"sha256": "f" * 64, "arch": "resnet8"}
    plain = evaluate(digits_net, digits.test, PGD(eps=0.1, steps=3), n=30, model_info=info,
                     progress=False)  # fmt: skip
    msa = evaluate_msa(digits_net, digits.test, [("mlp", surrogate)], eps=0.1, n=30,
                       attacks=("apgd-ce",), model_info=info, progress=False)  # fmt: skip
    a = store.add(plain.to_dict(samples=True), label="net")
    b = store.add(msa.to_dict(samples=True), label="net")
    got = compare_runs(store, a, b)
    robust_a = {int(str(r["index"])) for r in plain.samples if r["robust"]}
    robust_b = {int(str(r["index"])) for r in msa.samples if r["robust"]}
    (at,) = got.per_eps
    assert at.broken_in_a_only == tuple(sorted(robust_b - robust_a))
    assert at.broken_in_b_only == tuple(sorted(robust_a - robust_b))
    numbers = {m.what: m for m in at.numbers}
    assert numbers["robust accuracy"].b == msa.robust_accuracy
    assert numbers["plain AutoAttack robust accuracy"].b == msa.plain_robust_accuracy
    assert numbers["after stage mlp"].b == msa.stages[-1]["robust_accuracy_after"]
    assert numbers["after stage mlp"].a is None  # PGD has no such stage
    assert numbers["after attack pgd"].a == plain.per_attack[0]["robust_accuracy_after"]
    kinds = [(r.id, r.kind) for r in list_runs(store)]
    assert kinds == [(a, "eval"), (b, "msa")]


def test_the_records_of_one_curve_are_one_run(
    digits_net: nn.Module, digits: DataSplits, tmp_path: Path
) -> None:
    store = ResultStore(tmp_path / "s.sqlite")
    attacks = [PGD(eps=e, steps=2) for e in (0.05, 0.1)]
    for label in ("first", "second"):
        for rec in evaluate_curve(digits_net, digits.test, attacks, n=10, progress=False):
            store.add(rec.to_dict(samples=True), label=label)  # one by one, as the demo does
    runs = list_runs(store)
    assert [(r.id, r.label, [x.eps for x in r.records]) for r in runs] == [
        (1, "first", [0.05, 0.1]),
        (3, "second", [0.05, 0.1]),
    ]
    assert [r.id for r in list_runs(store, RunFilter(model="second"))] == [3]
    assert [len(compare_runs(store, 2, 4).per_eps)] == [2]  # any id of a run names the run


def test_dates_and_point_spans_read_as_written() -> None:
    assert parse_when("2025-01-31", "--until", end=True).isoformat() == (
        "2025-01-31T23:59:59.999999+00:00"
    )
    assert parse_when("2025-01-31T14:00+02:00", "--since").isoformat() == (
        "2025-01-31T14:00:00+02:00"
    )
    with pytest.raises(RobustlabError, match="--since takes a date"):
        parse_when("last week", "--since")
    assert spans([5, 0, 1, 2, 7, 8, 10]) == "0-2, 5, 7-8, 10"


def test_compare_refuses_records_that_are_no_evaluation(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "s.sqlite")
    store.add({"kind": "transfer"})
    with pytest.raises(RobustlabError, match="run 1 is a transfer record; compare compares"):
        compare_runs(store, 1, 1)

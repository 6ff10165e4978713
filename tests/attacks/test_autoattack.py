"""AutoAttack: published budgets, per-sample worst case, never weaker than its members."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _linear_cases import correct, k_class_l1_case
from torch import nn

from robustlab.attacks import PGD, ThreatModel
from robustlab.attacks.autoattack import AutoAttack
from robustlab.data import DataSplits, load_data
from robustlab.errors import RobustlabError
from robustlab.evaluate import evaluate
from robustlab.train import TrainConfig, train


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, DataSplits]:
    splits = load_data("digits")
    cfg = TrainConfig(arch="mlp", data="digits", epochs=8, arch_options={"width": 64})
    result = train(cfg, tmp_path_factory.mktemp("aa"), splits=splits, progress=False)
    return result.model.eval(), splits


def test_standard_version_has_the_published_budgets() -> None:
    aa = AutoAttack(norm="linf", eps=0.3)
    cfg = aa.config()
    assert cfg["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    comps = cfg["components"]
    assert comps["apgd-ce"]["steps"] == 100 and comps["apgd-ce"]["restarts"] == 1
    assert comps["apgd-t"]["steps"] == 100 and comps["apgd-t"]["n_target_classes"] == 9
    assert comps["fab-t"]["steps"] == 100 and comps["fab-t"]["n_target_classes"] == 9
    assert comps["square"]["queries"] == 5000
    plus = AutoAttack(norm="l2", eps=0.5, version="plus").config()
    assert plus["attacks"] == ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
    assert (
        plus["components"]["apgd-ce"]["restarts"] == 5
        and plus["components"]["fab"]["restarts"] == 5
    )
    l1 = AutoAttack(norm="l1", eps=10.0).config()
    assert l1["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    c = l1["components"]
    assert (c["apgd-ce"]["restarts"], c["apgd-ce"]["large_eps"], c["apgd-ce"]["steps"]) == (
        5,
        True,
        100,
    )
    assert (c["apgd-t"]["n_target_classes"], c["apgd-t"]["large_eps"]) == (5, True)
    assert (c["fab-t"]["norm"], c["fab-t"]["n_target_classes"], c["fab-t"]["steps"]) == (
        "l1",
        9,
        100,
    )
    assert (c["square"]["norm"], c["square"]["queries"]) == ("l1", 5000)
    l1_plus = AutoAttack(norm="l1", eps=10.0, version="plus").config()["components"]
    assert l1_plus["apgd-t"]["n_target_classes"] == 9 and l1_plus["apgd-dlr"]["large_eps"]
    assert l1_plus["fab"]["restarts"] == 5 and l1_plus["fab"]["norm"] == "l1"
    rand = AutoAttack(norm="linf", eps=0.3, version="rand").config()
    assert (
        rand["attacks"] == ["apgd-ce", "apgd-dlr"]
        and rand["components"]["apgd-ce"]["eot_iter"] == 20
    )


def test_ensemble_is_never_weaker_than_a_member(digits_model: tuple[nn.Module, DataSplits]) -> None:
    model, splits = digits_model
    x, y = splits.test.x[:120], splits.test.y[:120]
    eps = 0.08
    aa = AutoAttack(norm="linf", eps=eps)
    result = aa.run_detailed(model, x, y)
    assert bool(ThreatModel("linf", eps).contains(x, result.x_adv).all())
    with torch.no_grad():
        aa_robust = model(result.x_adv).argmax(1) == y
    for name, member in aa.components():  # each member with the ensemble's own budget
        with torch.no_grad():
            member_robust = model(member(model, x, y)).argmax(1) == y
        assert int(aa_robust.sum()) <= int(member_robust.sum()), name
        if name == "apgd-ce":  # the first member sees exactly the same points and seed
            assert bool((~aa_robust | member_robust).all())
    # the record says which sub-attack broke each point, consistent with the final predictions
    broken = torch.tensor([b is not None for b in result.broken_by])
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
    assert torch.equal(broken, clean_ok & ~aa_robust)


def test_autoattack_not_weaker_than_pgd_with_restarts(
    digits_model: tuple[nn.Module, DataSplits],
) -> None:
    model, splits = digits_model
    data = splits.test.head(150)
    aa = evaluate(
        model,
        data,
        AutoAttack(norm="linf", eps=0.08, attacks=("apgd-ce", "apgd-t")),
        progress=False,
    )
    pgd = evaluate(model, data, PGD(eps=0.08, steps=100, restarts=3), progress=False)
    assert aa.robust_accuracy <= pgd.robust_accuracy
    steps = [p["attack"] for p in aa.per_attack]
    assert steps == ["apgd-ce", "apgd-t"]
    afters = [p["robust_accuracy_after"] for p in aa.per_attack]
    assert afters == sorted(afters, reverse=True) and afters[-1] == aa.robust_accuracy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"version": "turbo"}, "unknown AutoAttack version 'turbo'"),
        ({"attacks": ("apgd-ce", "magic")}, "unknown AutoAttack sub-attack magic"),
        ({"version": "custom"}, "needs a list of sub-attacks"),
        ({"eps": -0.1}, "eps must be a finite number >= 0"),
    ],
)
def test_bad_autoattack_configuration(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(RobustlabError, match=message):
        AutoAttack(**{"norm": "linf", "eps": 0.3, **kwargs})  # type: ignore[arg-type]  # bad arguments on purpose


@pytest.mark.slow
def test_standard_mnist5k_resnet_is_broken_by_autoattack(tmp_path: Path) -> None:
    """The issue's bar: on a standard-trained mnist5k resnet, Linf 0.3 leaves <= 1 %."""
    splits = load_data("mnist5k")
    result = train(
        TrainConfig(arch="resnet8", data="mnist5k"), tmp_path, splits=splits, progress=False
    )
    rec = evaluate(result.model, splits.test, AutoAttack(norm="linf", eps=0.3), progress=False)
    assert rec.clean_accuracy >= 0.98
    assert rec.robust_accuracy <= 0.01


def test_run_detailed_guards_the_model_too() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(10, 1, 4, 4), torch.randint(0, 4, (10,))
    with pytest.warns(UserWarning, match="train mode"):
        AutoAttack(norm="linf", eps=0.1, attacks=("apgd-ce",)).run_detailed(model, x, y)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_l1_gradient_members_find_the_exact_robust_set_of_a_linear_model() -> None:
    """4 classes under l1 with the box binding (the knapsack per class): exact."""
    eps = 0.5
    model, x, y, robust = k_class_l1_case(eps, n=40)
    assert 0 < int(robust.sum()) < len(robust)
    aa = AutoAttack(norm="l1", eps=eps, attacks=("apgd-t", "fab-t"))
    x_adv = aa(model, x, y)
    assert bool(ThreatModel("l1", eps).contains(x, x_adv).all())
    assert torch.equal(correct(model, x_adv, y), robust)


@pytest.mark.slow
@pytest.mark.parametrize("eps", [0.5, 1.0])
def test_l1_standard_is_exact_and_never_weaker_than_a_member(eps: float) -> None:
    """The full l1 ensemble (APGD-CE, APGD-T, FAB-T, Square) on the 4-class knapsack case."""
    model, x, y, robust = k_class_l1_case(eps)
    aa = AutoAttack(norm="l1", eps=eps)
    result = aa.run_detailed(model, x, y)
    assert bool(ThreatModel("l1", eps).contains(x, result.x_adv).all())
    aa_robust = correct(model, result.x_adv, y)
    assert torch.equal(aa_robust, robust)
    for name, member in aa.components():
        member_robust = correct(model, member(model, x, y), y)
        assert int(aa_robust.sum()) <= int(member_robust.sum()), name
        assert bool((~aa_robust | member_robust).all()), name  # per sample, too

"""Carlini-Wagner L2: minimal norms on linear models, the eps ball, targets.

The model guard, eps 0, seeds and bad inputs are checked for every attack in
test_all_attacks.py; the linear cases come from _linear_cases.py.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from _linear_cases import Linear2, three_class_case, tiny_mlp, two_class_case
from hypothesis import given, settings
from torch import nn

from robustlab.attacks.cw import CWL2
from robustlab.attacks.losses import cw_margin
from robustlab.core.criteria import success
from robustlab.core.threat import ThreatModel
from robustlab.errors import RobustlabError


def _linear_case(
    eps: float, n: int = 200
) -> tuple[Linear2, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shared two-class l2 case and each point's minimal l2 distance |margin| / ||w||_2."""
    model, x, y, _ = two_class_case("l2", eps, n=n)
    with torch.no_grad():
        dist = model(x)[:, 1].abs() / model.w.norm()
    return model, x, y, dist


@pytest.fixture(scope="module")
def minimal_case() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One CW run on the linear case with an eps too large to bind: the minimal examples."""
    model, x, y, exact = _linear_case(0.3)
    return model, x, y, exact, CWL2(eps=100.0)(model, x, y)


def test_cw_finds_the_minimal_l2_perturbation_of_a_linear_model(
    minimal_case: tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    model, x, y, exact, x_adv = minimal_case
    found = (x_adv - x).flatten(1).norm(dim=1)
    assert bool(success(model(x_adv), y, None).all())
    assert bool((found >= exact * (1 - 1e-4)).all())  # nothing beats the closed form
    assert bool((found <= exact * 1.03 + 1e-3).all())  # and CW comes within 3 %
    assert float((found / exact).median()) < 1.01
    assert float(x_adv.min()) > 0 and float(x_adv.max()) < 1  # box not binding here


@pytest.mark.parametrize("eps", [0.15, 0.3])
def test_cw_robust_accuracy_matches_the_closed_form(eps: float) -> None:
    model, x, y, exact = _linear_case(eps)
    x_adv = CWL2(eps=eps)(model, x, y)
    assert bool(ThreatModel("l2", eps).contains(x, x_adv).all())
    with torch.no_grad():
        robust = model(x_adv).argmax(1) == y
    truth = exact > eps
    clear = (exact - eps).abs() > 0.02 * eps  # only points within 2 % of the boundary may differ
    assert torch.equal(robust[clear], truth[clear])
    assert int(clear.sum()) >= 0.9 * len(x) and 0 < int(truth.sum()) < len(x)
    assert torch.equal(x_adv[robust], x[robust])  # no success within eps: the clean input


@settings(max_examples=15, deadline=None)
@given(
    eps=st.floats(0.0, 3.0),
    batch=st.integers(1, 5),
    channels=st.sampled_from([1, 3]),
    size=st.integers(2, 6),
    confidence=st.sampled_from([0.0, 1.0]),
    c=st.sampled_from([0.01, 1.0, 100.0]),
    targeted=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_cw_never_leaves_the_eps_ball(
    eps: float,
    batch: int,
    channels: int,
    size: int,
    confidence: float,
    c: float,
    targeted: bool,
    seed: int,
) -> None:
    model = tiny_mlp(channels * size * size, 4, seed)
    x = torch.rand(batch, channels, size, size)
    y = torch.randint(0, 4, (batch,))
    targets = (y + 1) % 4 if targeted else None
    attack = CWL2(eps=eps, confidence=confidence, c=c, binary_steps=3, steps=10, lr=0.1)
    x_adv = attack(model, x, y, targets)
    assert x_adv.shape == x.shape
    assert bool(ThreatModel("l2", eps).contains(x, x_adv).all())
    with torch.no_grad():
        hit = success(model(x_adv), y, targets)
    assert bool((hit | (x_adv == x).flatten(1).all(1)).all())  # a success, or the clean input


def test_cw_confidence_buys_margin_on_a_linear_model() -> None:
    model, x, y, exact = _linear_case(0.3, n=40)
    kappa = 2.0
    x_adv = CWL2(eps=100.0, confidence=kappa, binary_steps=4)(model, x, y)
    with torch.no_grad():
        after = model(x_adv)[:, 1] * (1 - 2 * y)  # the other class's margin
    found = (x_adv - x).flatten(1).norm(dim=1)
    assert bool((after >= kappa - 1e-4).all())
    need = exact + kappa / model.w.detach().norm()  # the closed form with a kappa margin
    assert bool((found <= need * 1.03 + 1e-3).all())


def test_already_misclassified_inputs_are_returned_as_they_are() -> None:
    model, x, y, _ = _linear_case(0.3, n=20)
    x_adv = CWL2(eps=0.5, steps=5, binary_steps=1)(model, x, 1 - y)
    assert torch.equal(x_adv, x)


def test_cw_targeted_reaches_the_targets_on_a_three_class_linear_model() -> None:
    model, x, y = three_class_case(n=60)
    g = torch.Generator().manual_seed(5)
    targets = (y + torch.randint(1, 3, (60,), generator=g)) % 3
    x_adv = CWL2(eps=2.0)(model, x, y, targets)
    with torch.no_grad():
        assert torch.equal(model(x_adv).argmax(1), targets)
    assert bool(ThreatModel("l2", 2.0).contains(x, x_adv).all())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"norm": "linf"}, "CW-L2 is an l2 attack: norm must be 'l2', got 'linf'"),
        ({"eps": float("inf")}, "eps must be a finite number >= 0"),
        ({"steps": 0}, "steps >= 1"),
        ({"binary_steps": 0}, "binary_steps >= 1"),
        ({"c": 0.0}, "c must be a finite number > 0"),
        ({"lr": -1.0}, "lr must be a finite number > 0"),
        ({"confidence": -1.0}, "confidence must be >= 0"),
    ],
)
def test_bad_cw_configuration(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(RobustlabError, match=message):
        CWL2(**kwargs)  # type: ignore[arg-type]  # bad arguments on purpose


def test_cw_config_is_recorded() -> None:
    cfg = CWL2(eps=0.5).config()
    assert cfg["name"] == "cw-l2" and cfg["norm"] == "l2" and cfg["steps"] == 100
    assert cfg["binary_steps"] == 9 and cfg["c"] == 1.0


def test_the_targeted_cw_margin_stays_negative_while_another_class_beats_the_target() -> None:
    # z_t > z_y, but class 2 still beats the target: the paper's f6 margin is z_t - z_2 < 0
    logits = torch.tensor([[1.0, 2.0, 5.0]])
    y, t = torch.tensor([0]), torch.tensor([1])
    assert cw_margin(logits, y, t).tolist() == [-3.0]
    assert cw_margin(logits, y, None).tolist() == [4.0]


def test_the_cw_margin_is_positive_exactly_where_the_attack_succeeds() -> None:
    logits = torch.randn(500, 6, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 6, (500,), generator=torch.Generator().manual_seed(1))
    t = (y + torch.randint(1, 6, (500,), generator=torch.Generator().manual_seed(2))) % 6
    for targets in (None, t):
        hit = success(logits, y, targets)
        assert torch.equal(cw_margin(logits, y, targets) > 0, hit)
        assert 0 < int(hit.sum()) < 500

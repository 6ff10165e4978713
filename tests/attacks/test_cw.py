"""Carlini-Wagner L2: minimal norms on linear models, the eps ball, targets, the model guard."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from robustlab.attacks.base import success
from robustlab.attacks.cw import CWL2
from robustlab.attacks.threat import ThreatModel
from robustlab.errors import RobustlabError


class Linear2(nn.Module):
    """Two-class linear classifier with logits [0, w.x + b]: its robustness is known exactly."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1) @ self.w.flatten() + self.b
        return torch.stack([torch.zeros_like(s), s], dim=1)


def _linear_case(
    eps: float, n: int = 200
) -> tuple[Linear2, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Points whose minimal l2 distances |margin| / ||w||_2 straddle eps; the box never binds."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1, 6, 6, generator=g).sign() * (0.5 + torch.rand(1, 6, 6, generator=g))
    c = 0.15 * (2 * torch.rand(n, 1, 1, 1, generator=g) - 1)
    x = 0.5 + c * w.sign() + 0.02 * (2 * torch.rand(n, 1, 6, 6, generator=g) - 1)
    model = Linear2(w, eps * float(w.norm()) - 0.5 * float(w.sum())).eval()
    with torch.no_grad():
        margin = model(x)[:, 1]
    return model, x, (margin > 0).long(), margin.abs() / w.norm()


@pytest.fixture(scope="module")
def minimal_case() -> tuple[Linear2, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One CW run on the linear case with an eps too large to bind: the minimal examples."""
    model, x, y, exact = _linear_case(0.3)
    return model, x, y, exact, CWL2(eps=100.0)(model, x, y)


def test_cw_finds_the_minimal_l2_perturbation_of_a_linear_model(
    minimal_case: tuple[Linear2, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
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
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(channels * size * size, 16), nn.ReLU(), nn.Linear(16, 4)
    ).eval()
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
    g = torch.Generator().manual_seed(5)
    w = 2 * torch.randn(3, 36, generator=g)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 3)).eval()
    with torch.no_grad():
        model[1].weight.copy_(w)
        model[1].bias.copy_(-0.5 * w.sum(1))
    x = 0.5 + 0.1 * (2 * torch.rand(60, 1, 6, 6, generator=g) - 1)
    with torch.no_grad():
        y = model(x).argmax(1)
    targets = (y + torch.randint(1, 3, (60,), generator=g)) % 3
    x_adv = CWL2(eps=2.0)(model, x, y, targets)
    with torch.no_grad():
        assert torch.equal(model(x_adv).argmax(1), targets)
    assert bool(ThreatModel("l2", 2.0).contains(x, x_adv).all())


class Flaky(nn.Module):
    """A model whose forward raises on the n-th call: attacks must still restore it."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
        )
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom")
        return self.body(x)


@pytest.mark.parametrize("fail_at", [0, 3])
def test_cw_leaves_the_callers_model_as_it_was(fail_at: int) -> None:
    model = Flaky(fail_at)
    model.train()
    model.body[1].weight.requires_grad_(False)  # a caller's own choice must survive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    attack = CWL2(eps=1.0, steps=5, binary_steps=2)
    with pytest.warns(UserWarning, match="train mode"):
        if fail_at:
            with pytest.raises(RuntimeError, match="boom"):
                attack(model, x, y)
        else:
            attack(model, x, y)
    assert model.training and all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats too
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"norm": "linf"}, "CW-L2 is an l2 attack: norm must be 'l2', got 'linf'"),
        ({"eps": -0.1}, "eps must be a finite number >= 0"),
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
        CWL2(**kwargs)  # type: ignore[arg-type]


def test_cw_config_is_recorded() -> None:
    cfg = CWL2(eps=0.5).config()
    assert cfg["name"] == "cw-l2" and cfg["norm"] == "l2" and cfg["steps"] == 100
    assert cfg["binary_steps"] == 9 and cfg["c"] == 1.0

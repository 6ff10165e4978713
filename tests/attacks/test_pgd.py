"""PGD and threat models: closed-form optima on linear models, invariants, the model guard."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from robustlab.attacks import PGD, ThreatModel, frozen_eval
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
    norm: str, eps: float, n: int = 400
) -> tuple[Linear2, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Points whose margins straddle eps * ||w||_* on both classes, with the box never binding."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1, 6, 6, generator=g).sign() * (0.5 + torch.rand(1, 6, 6, generator=g))
    dual = float(w.abs().sum() if norm == "linf" else w.norm())  # dual norm of w
    c = 0.15 * (2 * torch.rand(n, 1, 1, 1, generator=g) - 1)
    x = 0.5 + c * w.sign() + 0.02 * (2 * torch.rand(n, 1, 6, 6, generator=g) - 1)
    model = Linear2(w, eps * dual - 0.5 * float(w.sum()))
    with torch.no_grad():
        margin = model(x)[:, 1]
    y = (margin > 0).long()
    exact = margin.abs() > eps * dual  # robust iff the margin exceeds eps * ||w||_*
    keep = (margin.abs() - eps * dual).abs() > 1e-3 * dual  # drop ties at the boundary
    return model.eval(), x[keep], y[keep], exact[keep]


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("eps", [0.02, 0.1, 0.3])
def test_pgd_finds_the_exact_robust_accuracy_of_a_linear_model(norm: str, eps: float) -> None:
    model, x, y, exact = _linear_case(norm, eps)
    x_adv = PGD(norm=norm, eps=eps, steps=50, alpha=eps / 4)(model, x, y)
    with torch.no_grad():
        robust = model(x_adv).argmax(1) == y
    assert torch.equal(robust, exact)
    assert 0 < int(exact.sum()) < len(exact)  # the case is not trivial either way


@settings(max_examples=25, deadline=None)
@given(
    norm=st.sampled_from(["linf", "l2"]),
    eps=st.floats(0.0, 2.0),
    batch=st.integers(1, 6),
    channels=st.sampled_from([1, 3]),
    size=st.integers(2, 9),
    seed=st.integers(0, 10_000),
    restarts=st.integers(1, 2),
)
def test_every_example_lies_inside_its_threat_model(
    norm: str, eps: float, batch: int, channels: int, size: int, seed: int, restarts: int
) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(channels * size * size, 16), nn.ReLU(), nn.Linear(16, 4)
    ).eval()
    x = torch.rand(batch, channels, size, size)
    y = torch.randint(0, 4, (batch,))
    x_adv = PGD(norm=norm, eps=eps, steps=3, restarts=restarts, seed=seed)(model, x, y)
    assert x_adv.shape == x.shape
    assert bool(ThreatModel(norm, eps).contains(x, x_adv).all())


def test_zero_eps_returns_the_inputs() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.rand(5, 1, 4, 4)
    assert torch.equal(PGD(eps=0.0, steps=3)(model, x, torch.zeros(5, dtype=torch.long)), x)


def test_more_restarts_never_weaken_the_attack() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x, y = torch.rand(200, 1, 8, 8), torch.randint(0, 10, (200,))
    with torch.no_grad():
        y = model(x).argmax(1)  # every point starts correctly classified
    fooled = {}
    for r in (1, 3):
        x_adv = PGD(eps=0.03, steps=5, restarts=r, seed=7)(model, x, y)
        with torch.no_grad():
            fooled[r] = model(x_adv).argmax(1) != y
    assert bool((fooled[3] | ~fooled[1]).all())  # whatever 1 restart broke, 3 restarts broke
    assert int(fooled[3].sum()) >= int(fooled[1].sum())


def test_random_start_is_uniform_in_the_linf_ball() -> None:
    x = torch.full((2000, 1, 4, 4), 0.5)
    d = ThreatModel("linf", 0.2).random_start(x, torch.Generator().manual_seed(0)) - x
    assert float(d.abs().max()) <= 0.2 + 1e-7
    assert abs(float(d.mean())) < 0.01 and float(d.std()) == pytest.approx(0.2 / 3**0.5, rel=0.05)


def test_l2_projection_is_exact_when_the_box_does_not_bind() -> None:
    tm = ThreatModel("l2", 0.5)
    x = torch.full((3, 1, 5, 5), 0.5)
    far = x + 0.05 * torch.randn(3, 1, 5, 5) * 10
    p = tm.project(x, far)
    d = (far - x).flatten(1)
    expected = x.flatten(1) + d * torch.clamp(0.5 / d.norm(dim=1, keepdim=True), max=1)
    assert torch.allclose(p.flatten(1), expected.clamp(0, 1), atol=1e-6)


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
def test_attacks_leave_the_callers_model_as_it_was(fail_at: int) -> None:
    model = Flaky(fail_at)
    model.train()
    model.body[1].weight.requires_grad_(False)  # a caller's own choice must survive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = (len(model._forward_hooks), len(model._backward_hooks))
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    if fail_at:
        with (
            pytest.raises(RuntimeError, match="boom"),
            pytest.warns(UserWarning, match="train mode"),
        ):
            PGD(eps=0.1, steps=5)(model, x, y)
    else:
        with pytest.warns(UserWarning, match="train mode"):
            PGD(eps=0.1, steps=5)(model, x, y)
    assert model.training and all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats too
    assert (len(model._forward_hooks), len(model._backward_hooks)) == hooks
    assert all(p.grad is None for p in model.parameters())


def test_frozen_eval_restores_mixed_modes() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    model.train()
    model[1].eval()
    with frozen_eval(model, warn_train_mode=False):
        assert not any(m.training for m in model.modules())
    assert model.training and model[0].training and not model[1].training


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps": -0.1}, "eps must be a finite number >= 0"),
        ({"eps": float("nan")}, "eps must be a finite number >= 0"),
        ({"norm": "l3"}, "unknown norm 'l3'"),
        ({"steps": 0}, "steps >= 1"),
        ({"restarts": 0}, "restarts >= 1"),
        ({"alpha": 0.0}, "alpha must be > 0"),
    ],
)
def test_bad_attack_configuration(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(RobustlabError, match=message):
        PGD(**kwargs)  # type: ignore[arg-type]

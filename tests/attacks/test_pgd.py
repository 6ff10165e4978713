"""PGD and threat models: closed-form optima on linear models, invariants, the guard's modes.

The model guard, eps 0, seeds and bad inputs are checked for every attack in
test_all_attacks.py; the linear cases come from _linear_cases.py.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from _linear_cases import Linear2, tiny_mlp, two_class_case
from hypothesis import given, settings
from torch import nn

from robustlab.attacks import FGSM, PGD, ThreatModel, frozen_eval
from robustlab.errors import RobustlabError


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("eps", [0.02, 0.1, 0.3])
def test_pgd_finds_the_exact_robust_accuracy_of_a_linear_model(norm: str, eps: float) -> None:
    model, x, y, exact = two_class_case(norm, eps, n=400)
    x_adv = PGD(norm=norm, eps=eps, steps=50, alpha=eps / 4)(model, x, y)
    with torch.no_grad():
        robust = model(x_adv).argmax(1) == y
    assert torch.equal(robust, exact)
    assert 0 < int(exact.sum()) < len(exact)  # the case is not trivial either way


def _l2_box_reach(w: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per row, max of ``w . delta`` over ``||delta||_2 <= eps`` and ``0 <= x + delta <= 1``.

    KKT: ``delta = clip(t w, -x, 1 - x)`` with ``t >= 0`` putting ``delta`` on the sphere
    (found here by bisection in float64, independently of the threat model's solver).
    """
    flat, v = x.flatten(1).double(), w.flatten().double()

    def delta(t: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(t[:, None] * v, 1 - flat), -flat)

    lo = torch.zeros(len(flat), dtype=torch.float64)
    hi = torch.full((len(flat),), 1e3, dtype=torch.float64)
    for _ in range(200):
        mid = (lo + hi) / 2
        over = delta(mid).norm(dim=1) > eps
        hi, lo = torch.where(over, mid, hi), torch.where(over, lo, mid)
    return delta(lo) @ v


@pytest.mark.parametrize("random_start", [True, False])
def test_pgd_reaches_the_l2_optimum_where_the_box_binds_and_one_step_cannot(
    random_start: bool,
) -> None:
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(20, generator=g), torch.rand(50, 20, generator=g)
    # every point stays correct at any admissible perturbation: PGD keeps its highest margin
    model = Linear2(w, -(float(w.abs().sum()) + 10)).eval()
    y = torch.zeros(50, dtype=torch.long)
    best = _l2_box_reach(w, x, 1.0)
    attack = PGD(norm="l2", eps=1.0, steps=50, alpha=0.5, loss="cw", random_start=random_start)
    reached = (attack(model, x, y) - x).double() @ w.double()
    assert torch.allclose(reached, best, rtol=1e-5, atol=0)
    one_step = (FGSM(norm="l2", eps=1.0, loss="cw")(model, x, y) - x).double() @ w.double()
    assert float(((best - one_step) / best).max()) > 0.05  # a single step falls well short
    assert bool((one_step <= best * (1 + 1e-6)).all())


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
    model = tiny_mlp(channels * size * size, 4, seed)
    x = torch.rand(batch, channels, size, size)
    y = torch.randint(0, 4, (batch,))
    x_adv = PGD(norm=norm, eps=eps, steps=3, restarts=restarts, seed=seed)(model, x, y)
    assert x_adv.shape == x.shape
    assert bool(ThreatModel(norm, eps).contains(x, x_adv).all())


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
        ({"eps": float("nan")}, "eps must be a finite number >= 0"),
        ({"steps": 0}, "steps >= 1"),
        ({"restarts": 0}, "restarts >= 1"),
        ({"alpha": 0.0}, "alpha must be > 0"),
    ],
)
def test_bad_attack_configuration(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(RobustlabError, match=message):
        PGD(**kwargs)  # type: ignore[arg-type]  # bad arguments on purpose

"""The one gradient engine: ascend and its step rules, and last-iterate vs per-sample best."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustlab.attacks import PGD
from robustlab.attacks.iterative import IterativeAttack
from robustlab.attacks.optim import MomentumStep, SteepestStep, ascend, iterates
from robustlab.core.threat import ThreatModel
from robustlab.errors import RobustlabError


def _convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)
    ).eval()


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_ascend_on_a_linear_objective_steps_along_the_sign_and_projects() -> None:
    w = torch.tensor([[1.0, -2.0, 0.0, 3.0]])
    x = torch.full((1, 4), 0.5)
    threat = ThreatModel("linf", 0.3)
    up = ascend(lambda z: (z * w).sum(1), x, x.clone(), threat, SteepestStep(0.1), 5)
    # three steps of 0.1 reach the ball's edge; a zero gradient coordinate does not move
    assert torch.allclose(up, torch.tensor([[0.8, 0.2, 0.5, 0.8]]))
    down = ascend(
        lambda z: (z * w).sum(1), x, x.clone(), threat, SteepestStep(0.1), 5, minimize=True
    )
    assert torch.allclose(down, torch.tensor([[0.2, 0.8, 0.5, 0.2]]))


def test_iterates_shows_every_iterate_and_evaluates_the_last_once_more() -> None:
    model, (x, y) = _convnet(), _batch()
    calls: list[int] = []

    def objective(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        logits = model(z)
        return F.cross_entropy(logits, y, reduction="none"), logits

    threat = ThreatModel("l2", 0.5)
    seen = list(iterates(objective, x, x.clone(), threat, SteepestStep(0.2), 4))
    assert len(seen) == 4 + 1 and len(calls) == 4 + 1
    assert torch.equal(seen[0][0], x)
    for z, values, aux in seen:
        assert not z.requires_grad and values.shape == (len(x),)
        assert aux is not None and torch.equal(aux.argmax(1), model(z).argmax(1))
    calls.clear()
    last = ascend(objective, x, x.clone(), threat, SteepestStep(0.2), 4)
    assert len(calls) == 4 and torch.equal(last, seen[-1][0])  # no extra pass for the last


def test_momentum_step_follows_its_definition() -> None:
    threat = ThreatModel("l2", 1.0)
    g1, g2 = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    rule = MomentumStep(0.5, decay=0.9)
    d1, m1 = rule(g1, threat, None)
    d2, m2 = rule(g2, threat, m1)
    l1 = g1.abs().flatten(1).sum(1).view(-1, 1, 1)
    assert torch.equal(m1, g1 / l1)
    assert torch.allclose(m2, 0.9 * m1 + g2 / g2.abs().flatten(1).sum(1).view(-1, 1, 1))
    assert torch.allclose(d2, 0.5 * m2 / m2.flatten(1).norm(dim=1).view(-1, 1, 1))
    assert torch.allclose(d1.flatten(1).norm(dim=1), torch.full((3,), 0.5))


def test_pgd_matches_a_literal_best_keeping_loop() -> None:
    """Per sample: the first iterate that is misclassified, else the highest-loss one."""
    model, (x, y) = _convnet(), _batch(16)
    with torch.no_grad():
        y[:12] = model(x[:12]).argmax(1)  # 12 points start correct, the rest mostly wrong
    eps, steps = 0.01, 6
    alpha = 2.5 * eps / steps
    threat = ThreatModel("linf", eps)
    iterates, losses, hits = [], [], []
    z = x.clone()
    for i in range(steps + 1):
        z = z.detach().requires_grad_(True)
        logits = model(z)
        loss = F.cross_entropy(logits, y, reduction="none")
        iterates.append(z.detach())
        losses.append(loss.detach())
        hits.append(logits.argmax(1) != y)
        if i < steps:
            (grad,) = torch.autograd.grad(loss.sum(), z)
            z = threat.project(x, z.detach() + alpha * grad.sign())
    expected = x.clone()
    for k in range(len(x)):
        if hits[0][k]:
            continue  # already wrong: the input itself
        first = next((i for i in range(steps + 1) if hits[i][k]), None)
        if first is None:
            first = max(range(steps + 1), key=lambda i: float(losses[i][k]))
        expected[k] = iterates[first][k]
    got = PGD(eps=eps, steps=steps, random_start=False)(model, x, y)
    assert torch.equal(got, expected)
    broken = torch.stack(hits).any(0)
    assert 0 < int((broken & ~hits[0]).sum()) < len(x) - int(hits[0].sum())  # all branches run
    assert bool(hits[0].any())
    last = IterativeAttack(eps=eps, steps=steps, alpha=alpha)(model, x, y)
    assert torch.equal(last, iterates[-1])  # returns="last": the last iterate
    assert not torch.equal(last, got)


def test_best_with_input_diversity_is_judged_on_the_iterate_itself() -> None:
    model, (x, y) = _convnet(2), _batch(16)
    options: dict[str, Any] = {
        "eps": 0.03,
        "steps": 5,
        "diversity_prob": 1.0,
        "resize_rate": 0.5,
        "seed": 4,
    }
    best = IterativeAttack(**options, returns="best")(model, x, y)
    last = IterativeAttack(**options)(model, x, y)
    with torch.no_grad():
        clean_wrong = model(x).argmax(1) != y
        fooled_best, fooled_last = model(best).argmax(1) != y, model(last).argmax(1) != y
    # the same trajectory: whatever its last iterate broke, the best point breaks too
    assert bool((fooled_best | ~fooled_last).all())
    assert torch.equal(best[clean_wrong], x[clean_wrong])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"restarts": 0}, "restarts >= 1"),
        ({"restarts": 2}, "restarts > 1 need returns='best'"),
        ({"returns": "first"}, "returns must be one of last, best"),
    ],
)
def test_bad_engine_configuration(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(RobustlabError, match=message):
        IterativeAttack(**kwargs)  # type: ignore[arg-type]  # bad arguments on purpose

"""Ensemble surrogates: normalised member gradients, both combinations, SGM, the engine."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustlab.attacks.iterative import MIFGSM, IterativeAttack
from robustlab.attacks.surrogate import Ensemble
from robustlab.attacks.transforms import skip_gradient
from robustlab.core.threat import ThreatModel
from robustlab.errors import RobustlabError
from robustlab.models import build_model


def _linear(scale: float, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    m = nn.Linear(5, 3, dtype=torch.float64)
    with torch.no_grad():
        m.weight.mul_(scale)
    return m


def _x(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _input_grad(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    grad: torch.Tensor = torch.autograd.grad(fn(x).sum(), x)[0]
    return grad


def _unit(g: torch.Tensor) -> torch.Tensor:
    unit: torch.Tensor = g / g.norm(dim=1, keepdim=True)
    return unit


def test_logits_ensemble_normalises_each_member_before_combining() -> None:
    a, b = _linear(1.0, 0), _linear(1000.0, 1)  # b's gradients are 1000x larger
    ens = Ensemble([a, b], weights=[1, 3])
    x = _x()
    c = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ens(x), 0.25 * a(x) + 0.75 * b(x))
    grad = _input_grad(lambda t: ens(t) * c, x)
    expected = 0.25 * _unit(c @ a.weight) + 0.75 * _unit(c @ b.weight)
    torch.testing.assert_close(grad, expected)
    plain = Ensemble([a, b], weights=[1, 3], normalize="none")
    torch.testing.assert_close(
        _input_grad(lambda t: plain(t) * c, x), c @ (0.25 * a.weight + 0.75 * b.weight)
    )


def test_loss_ensemble_averages_normalised_member_loss_gradients() -> None:
    a, b = _linear(1.0, 0), _linear(50.0, 1)
    y = torch.tensor([0, 1, 2, 0])
    x = _x()
    for norm, p in (("l2", 2), ("l1", 1)):
        ens = Ensemble([a, b], combine="loss", normalize=norm)
        grad = _input_grad(lambda t, e=ens: e.loss(t, y, None), x)  # type: ignore[misc]  # a lambda default has no type
        ga = _input_grad(lambda t: F.cross_entropy(a(t), y, reduction="none"), x)
        gb = _input_grad(lambda t: F.cross_entropy(b(t), y, reduction="none"), x)
        expected = 0.5 * ga / ga.norm(p=p, dim=1, keepdim=True)
        expected += 0.5 * gb / gb.norm(p=p, dim=1, keepdim=True)
        torch.testing.assert_close(grad, expected)


def test_engine_on_an_ensemble_uses_the_combined_loss_and_stays_in_the_threat_model() -> None:
    torch.manual_seed(0)
    members = [build_model("resnet8", image_size=8).eval(), build_model("mlp", image_size=8)]
    x = torch.rand(6, 1, 8, 8)
    y = torch.randint(0, 10, (6,))
    steps: dict[str, torch.Tensor] = {}
    for combine in ("logits", "loss"):
        ens = Ensemble(members, combine=combine).eval()
        attack = MIFGSM(eps=0.1, steps=3)
        x_adv = attack(ens, x, y)
        assert attack.threat.contains(x, x_adv).all()
        assert not torch.equal(x_adv, x)
        # one step of the engine follows the sign of the ensemble's own objective
        one = IterativeAttack(eps=0.1, steps=1)(ens, x, y)
        grad = _input_grad(lambda t, e=ens: e.loss(t, y, None), x)  # type: ignore[misc]  # a lambda default has no type
        assert torch.equal(one, ThreatModel("linf", 0.1).project(x, x + 0.1 * grad.sign()))
        steps[combine] = one
    assert not torch.equal(steps["logits"], steps["loss"])  # the combinations differ
    # evaluate: the same objective as loss(), and the ensemble's mean logits
    ens = Ensemble(members, combine="loss").eval()
    with torch.no_grad():
        losses, logits = ens.evaluate(x, y, None)
        assert torch.equal(losses, ens.loss(x, y, None)) and torch.equal(logits, ens(x))


def test_skip_gradient_acts_on_the_residual_members_of_an_ensemble() -> None:
    torch.manual_seed(0)
    res, mlp = build_model("resnet8", image_size=8).eval(), build_model("mlp", image_size=8)
    ens = Ensemble([res, mlp.eval()])
    x = torch.rand(3, 1, 8, 8)
    plain = _input_grad(ens, x)
    with skip_gradient(ens, 0.3) as sites:
        assert {id(s.block) for s in sites} <= {id(m) for m in res.modules()}
        changed = _input_grad(ens, x)
    assert not torch.allclose(plain, changed)
    with (
        pytest.raises(RobustlabError, match="residual blocks"),
        skip_gradient(Ensemble([mlp]), 0.3),
    ):
        pass


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"models": []}, "at least one model"),
        ({"combine": "max"}, "combination"),
        ({"normalize": "linf"}, "normalisation"),
        ({"weights": [1.0]}, "weights"),
        ({"weights": [1.0, -1.0]}, "weights"),
    ],
)
def test_bad_ensembles_are_refused(kwargs: dict[str, object], message: str) -> None:
    models = kwargs.pop("models", [_linear(1, 0), _linear(1, 1)])
    with pytest.raises(RobustlabError, match=message):
        Ensemble(models, **kwargs)  # type: ignore[arg-type]  # bad arguments on purpose

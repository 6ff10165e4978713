"""One table of checks that every registered attack runs through (Foolbox style).

Per attack and norm: examples inside the threat model, the caller's model exactly as it was
(mode, parameters, requires_grad, hooks, gradients; also when the forward pass raises), eps 0
returns the inputs, the seed alone decides the result, a JSON-able config, and clear errors
for bad inputs and bad configurations. The per-attack test files only test what is specific.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from robustlab.attacks import ATTACKS, ThreatModel, make_attack
from robustlab.errors import RobustlabError

# small budgets keep the table fast; the published defaults are checked per attack elsewhere
FAST: dict[str, dict[str, object]] = {
    "pgd": {"steps": 5},
    "fgsm": {},
    "bim": {"steps": 5},
    "mifgsm": {"steps": 5},
    "difgsm": {"steps": 5},
    "tifgsm": {"steps": 5},
    "cw": {"steps": 10, "binary_steps": 2},
    "apgd-ce": {"steps": 10},
    "apgd-dlr": {"steps": 10},
    "apgd-t": {"steps": 10, "n_target_classes": 2},
    "fab": {"steps": 10},
    "fab-t": {"steps": 10, "n_target_classes": 2},
    "square": {"queries": 50},
    "autoattack": {"attacks": ("apgd-ce", "apgd-t"), "version": "custom"},
}
NORMS = {"cw": ["l2"]}
CASES = [(name, norm) for name in ATTACKS for norm in NORMS.get(name, ["linf", "l2", "l1"])]


EPS = {"linf": 0.1, "l2": 0.5, "l1": 2.0}
ZERO_EPS_REFUSED = {"fgsm", "bim", "mifgsm", "difgsm", "tifgsm"}  # their step size is from eps


def _model() -> nn.Module:
    """A small conv net with batch norm (train-mode state that must survive the attack)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 36, 5),
    )


class Flaky(nn.Module):
    """The table's model, raising on its ``fail_at``-th forward call (1-based)."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.body = _model()
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom")
        return self.body(x)


def _snapshot(model: nn.Module) -> tuple[object, ...]:
    """Everything an attack must leave as it was: modes, state, requires_grad, hooks, grads."""
    return (
        [m.training for m in model.modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
        [p.grad is None for p in model.parameters()],
    )


def _same(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    """Two snapshots agree (tensors compared exactly)."""
    sa, sb = a[1], b[1]
    assert isinstance(sa, dict) and isinstance(sb, dict)
    tensors = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    return tensors and a[0] == b[0] and a[2:] == b[2:]


def test_the_table_covers_every_registered_attack() -> None:
    assert set(FAST) == set(ATTACKS)


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_every_attack_passes_the_same_checks(name: str, norm: str) -> None:
    eps = EPS[norm]
    attack = make_attack(name, norm, eps, seed=1, **FAST[name])
    model = _model()
    model.train()
    model[0].weight.requires_grad_(False)
    before = _snapshot(model)
    x, y = torch.rand(12, 1, 6, 6), torch.randint(0, 5, (12,))
    with pytest.warns(UserWarning, match="train mode"):
        a = attack(model, x, y)
    # inside the threat model, same shape and dtype
    assert a.shape == x.shape and a.dtype == x.dtype
    assert bool(ThreatModel(norm, eps).contains(x, a).all())
    # the caller's model exactly as it was
    assert _same(_snapshot(model), before)
    # the seed alone gives the examples: the global generator plays no part
    model.eval()
    torch.manual_seed(123)
    first = attack(model, x, y)
    torch.manual_seed(456)
    assert torch.equal(attack(model, x, y), first)
    # eps 0: the inputs are the only admissible points (or a clear refusal, as FGSM's
    # step size eps must be > 0)
    try:
        zero = make_attack(name, norm, 0.0, seed=1, **FAST[name])
    except RobustlabError:
        assert name in ZERO_EPS_REFUSED
    else:
        assert torch.equal(zero(model, x, y), x)
    # the config is JSON-able and names the attack
    cfg = attack.config()
    assert cfg["eps"] == eps and isinstance(cfg["name"], str)
    json.dumps(cfg)


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_every_attack_restores_the_model_when_the_forward_pass_raises(name: str, norm: str) -> None:
    fail_at = 1 if name == "fgsm" else 2  # FGSM makes one pass; others raise mid-attack
    model = Flaky(fail_at)
    model.train()
    model.body[0].weight.requires_grad_(False)
    x = torch.rand(6, 1, 6, 6)
    with torch.no_grad():
        y = model.body.eval()(x).argmax(1)  # correctly classified: every attack has work
    model.body.train()
    before = _snapshot(model)
    attack = make_attack(name, norm, EPS[norm] / 10, seed=1, **FAST[name])
    with pytest.raises(RuntimeError, match="boom"), pytest.warns(UserWarning, match="train mode"):
        attack(model, x, y)
    assert model.calls == fail_at
    assert _same(_snapshot(model), before)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_every_attack_refuses_bad_inputs(name: str) -> None:
    norm = "l2" if name == "cw" else "linf"
    attack = make_attack(name, norm, 0.1, **FAST[name])
    model = _model().eval()
    x, y = torch.rand(4, 1, 6, 6), torch.randint(0, 5, (4,))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(RobustlabError, match="NaN"):
        attack(model, bad, y)
    with pytest.raises(RobustlabError, match=r"\[0,1\]"):
        attack(model, x * 3, y)
    with pytest.raises(RobustlabError, match="disagree"):
        attack(model, x, y[:3])
    with pytest.raises(RobustlabError, match="eps must be a finite number >= 0"):
        make_attack(name, norm, -1.0)
    with pytest.raises(RobustlabError, match="norm"):
        make_attack(name, "l3", 0.1)

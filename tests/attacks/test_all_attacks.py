"""One table of checks that every registered attack runs through (Foolbox style)."""

from __future__ import annotations

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
NORMS = {
    "cw": ["l2"],
    "fab": ["linf", "l2"],
    "fab-t": ["linf", "l2"],
    "square": ["linf", "l2"],
    "autoattack": ["linf", "l2", "l1"],
}
CASES = [(name, norm) for name in ATTACKS for norm in NORMS.get(name, ["linf", "l2", "l1"])]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 36, 5),
    )


def test_the_table_covers_every_registered_attack() -> None:
    assert set(FAST) == set(ATTACKS)


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_every_attack_passes_the_same_checks(name: str, norm: str) -> None:
    eps = {"linf": 0.1, "l2": 0.5, "l1": 2.0}[norm]
    attack = make_attack(name, norm, eps, seed=1, **FAST[name])
    model = _model()
    model.train()
    model[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    x, y = torch.rand(12, 1, 6, 6), torch.randint(0, 5, (12,))
    with pytest.warns(UserWarning, match="train mode"):
        a = attack(model, x, y)
    # inside the threat model, same shape and dtype
    assert a.shape == x.shape and a.dtype == x.dtype
    assert bool(ThreatModel(norm, eps).contains(x, a).all())
    # the caller's model exactly as it was
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    # the same seed gives the same examples
    model.eval()
    assert torch.equal(attack(model, x, y), attack(model, x, y))
    # the config is JSON-able and names the attack
    cfg = attack.config()
    assert cfg["eps"] == eps and isinstance(cfg["name"], str)


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

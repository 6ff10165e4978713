"""The one attack registry: every attack by name, names in records as typed, aliases recorded."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from torch import nn

import robustlab.attacks as attacks_pkg
from robustlab.analysis.transfer import BASES, TransferAttack, parse_attack
from robustlab.attacks import ATTACKS, REGISTRY, make_attack, register
from robustlab.attacks.base import Attack
from robustlab.attacks.iterative import IFGSM, IterativeAttack
from robustlab.attacks.registry import ALIASES, lookup
from robustlab.errors import RobustlabError

FIXED_ONLY = {"fgsm": {}, "autoattack": {"version": "custom", "attacks": ("apgd-ce",)}}


def test_every_attack_class_of_the_package_is_registered() -> None:
    classes = {
        obj
        for _, obj in inspect.getmembers(attacks_pkg, inspect.isclass)
        if issubclass(obj, Attack) and not inspect.isabstract(obj)
    }
    registered = {e.cls for e in REGISTRY.values()}
    assert classes <= registered, classes - registered
    assert REGISTRY["transfer"].cls is TransferAttack and REGISTRY["transfer"].kind == "transfer"
    for name in ("deepsloth", "pgd-final", "pgd-avg", "pgd-max"):
        assert REGISTRY[name].kind == "multi-exit"
    assert REGISTRY["iterative"].cls is IterativeAttack  # the engine, on models and ensembles
    assert set(ATTACKS) == {n for n, e in REGISTRY.items() if e.kind == "classifier"}


@pytest.mark.parametrize("name", [n for n, e in REGISTRY.items() if e.kind != "transfer"])
def test_every_name_builds_and_records_the_name_typed(name: str) -> None:
    norm = "l2" if name == "cw" else "linf"
    attack = make_attack(name, norm, 0.1, **FIXED_ONLY.get(name, {}))
    cfg = attack.config()
    assert cfg["name"] == name and "alias_of" not in cfg
    assert attack.record_name == name
    for key, value in REGISTRY[name].fixed.items():
        assert cfg[key] == value  # the entry's fixed options are what runs


@pytest.mark.parametrize(("alias", "canonical"), sorted(ALIASES.items()))
def test_an_alias_is_the_same_attack_recorded_as_typed(alias: str, canonical: str) -> None:
    norm = "l2" if canonical == "cw" else "linf"
    a, b = make_attack(alias, norm, 0.1), make_attack(canonical, norm, 0.1)
    assert a == b  # same class and options
    cfg_a, cfg_b = a.config(), b.config()
    assert cfg_a.pop("name") == alias and cfg_a.pop("alias_of") == canonical
    assert cfg_b.pop("name") == canonical
    assert cfg_a == cfg_b


def test_bim_and_cw_are_recorded_as_typed() -> None:
    assert make_attack("bim", "linf", 0.1).config()["name"] == "bim"  # was "ifgsm"
    assert make_attack("cw", "l2", 0.1).config()["name"] == "cw"  # was "cw-l2"
    assert make_attack("ifgsm", "linf", 0.1).config()["alias_of"] == "bim"
    assert IFGSM(eps=0.1).config()["name"] == "ifgsm"  # built directly: the class's name
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    x, y = torch.rand(5, 3, 2, 2), torch.randint(0, 3, (5,))
    assert torch.equal(make_attack("i-fgsm", "linf", 0.1)(model, x, y), IFGSM(eps=0.1)(model, x, y))


def test_unknown_names_and_wrong_uses_are_refused() -> None:
    with pytest.raises(RobustlabError, match="unknown attack 'magic'; available: .*pgd"):
        make_attack("magic", "linf", 0.1)
    with pytest.raises(RobustlabError, match="'transfer' is a transfer attack"):
        make_attack("transfer", "linf", 0.1)
    with pytest.raises(RobustlabError, match="has no option decay"):
        make_attack("bim", "linf", 0.1, decay=1.0)
    assert make_attack("apgd-ce", "linf", 0.1, loss="dlr").config()["loss"] == "ce"  # fixed
    with pytest.raises(ValueError, match="registered twice"):
        register("pgd")(IFGSM)
    with pytest.raises(ValueError, match="registered twice"):
        register("another-bim", aliases=("ifgsm",))(IFGSM)
    assert "another-bim" not in REGISTRY


@pytest.mark.parametrize("base", BASES)
def test_transfer_bases_are_the_registry_attacks_with_the_protocol_options(base: str) -> None:
    eps, steps = 0.1, 4
    spec = parse_attack(base, "linf", eps, steps=steps, seed=3)
    preset = make_attack(base, "linf", eps, seed=3)
    assert lookup(base).cls is type(preset)
    record = spec.config()
    assert record["base"] == base
    if lookup(base).name != base:
        assert record["base_alias_of"] == lookup(base).name
    engine = preset.engine  # type: ignore[attr-defined]  # every transfer base is an engine attack
    if base == "fgsm":
        # one step of eps; the protocol sets only the seed (for DI), which fgsm lacks
        assert spec.attack == dataclasses.replace(engine, seed=3)
        assert record["options"] == {
            "steps": 1,
            "alpha": eps,
            "random_start": False,
            "returns": "last",
            "seed": 3,
        }
        return
    # the same attack as the registry's, run with the protocol's options, which are recorded
    alpha = 2.5 * eps / steps
    expected = dataclasses.replace(
        engine, steps=steps, alpha=alpha, random_start=False, restarts=1, returns="last"
    )
    assert spec.attack == expected
    assert record["options"] == {
        "steps": steps,
        "alpha": alpha,
        "random_start": False,
        "returns": "last",
        "seed": 3,
    }
    assert record["engine"]["alpha"] == alpha
    if base in ("bim", "ifgsm", "i-fgsm"):
        assert preset.config()["alpha"] == eps / 10  # the registry's own bim: eps / steps

"""A stored attack configuration as a reader sees it: a name, its key parameters (whatever does
not change with eps; the step size, which does, apart), and whether it is leaderboard-grade
(full AutoAttack or MSA)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..attacks.autoattack import AutoAttack
from ..attacks.registry import make_attack
from ..errors import RobustlabError

#: Fields that are not parameters of the configuration: they change with eps along a curve
#: (eps, alpha: the step size, shown apart), are shown elsewhere (norm, seed) or are the name.
NOT_PARAMETERS = frozenset({"name", "alias_of", "norm", "eps", "alpha", "seed", "components"})
#: The parameters shown in their own columns, when the attack has them.
COLUMNS = ("steps", "restarts", "loss")
#: The leaderboard grades: evaluations whose robust accuracy the field accepts as such.
GRADES = ("AutoAttack", "MSA")


@dataclass(frozen=True)
class AttackSpec:
    """An attack configuration independent of eps: what one line of a robustness curve and one
    row of the attack table stand for."""

    name: str  # the name as shown, e.g. "pgd", "AutoAttack standard", "MSA"
    params: tuple[tuple[str, str], ...]  # (parameter, value) in display order
    grade: str | None = None  # "AutoAttack" or "MSA" when leaderboard-grade, else None

    def param(self, key: str) -> str:
        """One parameter's value as shown ('–' when the attack has none)."""
        return dict(self.params).get(key, "–")

    def further(self) -> list[str]:
        """The parameters without a column of their own, each as 'key: value'."""
        return [f"{k}: {v}" if v else k for k, v in self.params if k not in COLUMNS]


def _value(v: Any) -> str:
    """A parameter value as text: numbers short, lists joined, True as nothing (a flag)."""
    if isinstance(v, bool):
        return "" if v else "off"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v)
    return str(v)


def step_size(config: Mapping[str, Any]) -> str | None:
    """The step size of a stored attack relative to its eps (the convention of the papers),
    e.g. '2.5·eps/steps'; 'adaptive' for APGD; None when it has none (or eps is 0)."""
    if str(config.get("name", "")).startswith("apgd"):
        return "adaptive"
    alpha, eps, steps = config.get("alpha"), config.get("eps"), config.get("steps")
    if not isinstance(alpha, (int, float)) or not isinstance(eps, (int, float)) or eps <= 0:
        return None
    if isinstance(steps, int) and steps > 1:
        ratio = float(alpha) * steps / float(eps)
        return f"{ratio:.3g}·eps/steps"
    ratio = float(alpha) / float(eps)
    return "eps" if math.isclose(ratio, 1.0) else f"{ratio:.3g}·eps"


def _defaults(name: str, norm: Any, eps: Any) -> dict[str, Any] | None:
    """The attack's published configuration at this budget (None when it cannot be built,
    e.g. a name from another robustlab version)."""
    try:
        return make_attack(name, str(norm), float(eps)).config()
    except (RobustlabError, TypeError, ValueError, KeyError):
        return None


def _plain(config: Mapping[str, Any]) -> AttackSpec:
    """A single attack: key parameters always, the others where they differ from its defaults."""
    name = str(config.get("name", "?"))
    params: list[tuple[str, str]] = []
    for key in ("steps", "restarts"):
        if key in config:
            params.append((key, _value(config[key])))
    if "loss" in config:
        params.append(("loss", _value(config["loss"])))
    if "queries" in config:
        params.append(("queries", _value(config["queries"])))
    defaults = _defaults(name, config.get("norm"), config.get("eps"))
    shown = {"steps", "restarts", "loss", "queries"}
    for key, v in config.items():
        if key in NOT_PARAMETERS or key in shown or v is None:
            continue
        if defaults is not None and key in defaults and defaults[key] == v:
            continue
        if defaults is None and not isinstance(v, (list, tuple, dict)) and not v:
            continue  # without the defaults, show what is switched on
        params.append((key.replace("_", " "), _value(v)))
    return AttackSpec(name, tuple(params))


def _full_autoattack(config: Mapping[str, Any]) -> bool:
    """Whether an AutoAttack ran every member of its version (not a chosen subset)."""
    version = str(config.get("version", "standard"))
    try:
        members = AutoAttack(
            norm=str(config.get("norm", "linf")), eps=float(config.get("eps", 0.0)), version=version
        ).names()
    except (RobustlabError, TypeError, ValueError):
        return False
    ran = config.get("attacks") or members
    return version != "custom" and set(members) <= {str(a) for a in ran}


def _autoattack(config: Mapping[str, Any]) -> AttackSpec:
    """AutoAttack: its version and members; leaderboard-grade when it ran the whole version."""
    version = str(config.get("version", "standard"))
    full = _full_autoattack(config)
    name = f"AutoAttack {version}" if full else "AutoAttack subset"
    members = config.get("attacks") or []
    params = (("members", _value(list(members))),) if members else ()
    return AttackSpec(name, params, "AutoAttack" if full else None)


def _msa(config: Mapping[str, Any]) -> AttackSpec:
    """MSA: its surrogates and their attacks; leaderboard-grade when its AutoAttack is full."""
    inner = config.get("autoattack") or {}
    params = [
        ("surrogates", _value(list(config.get("surrogates") or []))),
        ("surrogate attacks", _value(list(config.get("surrogate_attacks") or []))),
    ]
    if isinstance(inner, Mapping):
        params.append(("AutoAttack", _autoattack(inner).name.removeprefix("AutoAttack ")))
    full = isinstance(inner, Mapping) and _full_autoattack(inner)
    return AttackSpec("MSA", tuple(params), "MSA" if full else None)


def describe_attack(attack: Mapping[str, Any]) -> AttackSpec:
    """The readable, eps-independent form of a stored attack configuration."""
    if not isinstance(attack, Mapping):
        raise TypeError(f"a stored attack configuration is a mapping, not {type(attack).__name__}")
    name = str(attack.get("name", "?"))
    if name == "autoattack":
        return _autoattack(attack)
    if name == "msa":
        return _msa(attack)
    return _plain(attack)


def attack_labels(specs: Iterable[AttackSpec]) -> dict[AttackSpec, str]:
    """A short label per configuration: its name, and where one name has several
    configurations, the parameters in which they differ, e.g. 'pgd (steps 100)'."""
    by_name: dict[str, list[AttackSpec]] = {}
    for spec in specs:
        if spec not in by_name.setdefault(spec.name, []):
            by_name[spec.name].append(spec)
    labels: dict[AttackSpec, str] = {}
    for name, group in by_name.items():
        if len(group) == 1:
            labels[group[0]] = name
            continue
        common = set.intersection(*(set(s.params) for s in group))
        for spec in group:
            differ = [
                f"{k} {v}".strip() if v else k for k, v in spec.params if (k, v) not in common
            ]
            labels[spec] = f"{name} ({', '.join(differ) or 'defaults'})"
    return labels

"""Attacks by name, for the command line and configs: ``make_attack("apgd-ce", "linf", 0.3)``."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from ..errors import RobustlabError
from .base import Attack

# name -> (module, class, fixed keyword arguments)
ATTACKS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "pgd": ("pgd", "PGD", {}),
    "fgsm": ("iterative", "FGSM", {}),
    "bim": ("iterative", "IFGSM", {}),
    "mifgsm": ("iterative", "MIFGSM", {}),
    "difgsm": ("iterative", "DIFGSM", {}),
    "tifgsm": ("iterative", "TIFGSM", {}),
    "cw": ("cw", "CWL2", {}),
    "apgd-ce": ("apgd", "APGD", {"loss": "ce"}),
    "apgd-dlr": ("apgd", "APGD", {"loss": "dlr"}),
    "apgd-t": ("apgd", "APGDT", {}),
    "fab": ("fab", "FAB", {"targeted": False}),
    "fab-t": ("fab", "FAB", {"targeted": True}),
    "square": ("square", "Square", {}),
    "autoattack": ("autoattack", "AutoAttack", {}),
}


def attack_class(name: str) -> type[Attack]:
    """The class behind an attack name, with a clear error for unknown names."""
    if name not in ATTACKS:
        raise RobustlabError(f"unknown attack '{name}'; available: {', '.join(ATTACKS)}")
    module, cls, _ = ATTACKS[name]
    try:
        found: type[Attack] = getattr(importlib.import_module(f"{__package__}.{module}"), cls)
    except (ImportError, AttributeError):
        raise RobustlabError(f"attack '{name}' is not available in this installation") from None
    return found


def make_attack(name: str, norm: str, eps: float, **options: Any) -> Attack:
    """Build an attack by name; options not set (None) keep the attack's published defaults."""
    cls = attack_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    given = {k: v for k, v in options.items() if v is not None}
    if "seed" not in fields:  # a deterministic attack has no seed to set
        given.pop("seed", None)
    unknown = sorted(set(given) - fields)
    if unknown:
        raise RobustlabError(
            f"attack '{name}' has no option {', '.join(unknown)}; "
            f"its options are {', '.join(sorted(fields - {'norm', 'eps'}))}"
        )
    kwargs = {**given, **ATTACKS[name][2]}
    if "norm" in fields:
        kwargs["norm"] = norm
    elif norm != "l2":
        raise RobustlabError(f"attack '{name}' supports only the l2 norm")
    try:
        return cls(eps=eps, **kwargs)  # type: ignore[call-arg]
    except TypeError as exc:
        raise RobustlabError(f"bad option for attack '{name}': {exc}") from None

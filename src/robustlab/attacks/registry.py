"""The one attack registry: every attack by name, registered beside its definition.

``@register("pgd")`` above a class adds it; a class may carry several entries that fix some
of its options (``@register("apgd-ce", loss="ce")``), and an entry may have aliases
(``@register("bim", aliases=("ifgsm", "i-fgsm"))``). Every command builds attacks with
:func:`make_attack` (or, for transfer attacks, resolves base names with :func:`lookup`).

Names in records: an attack made by :func:`make_attack` records (``config()["name"]``) the
name the user typed; when that name is an alias, ``config()["alias_of"]`` names the entry
it stands for (typed ``cw`` records ``"name": "cw"``; typed ``cw-l2`` records
``"name": "cw-l2", "alias_of": "cw"``). An attack built directly from its class records the
class's own ``name``.

Kinds: ``classifier`` (any classifier, ``make_attack(name, norm, eps)``; :data:`ATTACKS`
lists them), ``multi-exit`` (DeepSloth and the exit PGD baselines, on multi-exit networks),
``surrogate`` (the gradient engine with every option, also on :class:`Ensemble` surrogates)
and ``transfer`` (a transfer-matrix attack such as ``sgm+mi``; built by
``robustlab.analysis.transfer.parse_attack``, not by :func:`make_attack`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import RobustlabError
from .base import Attack

KINDS = ("classifier", "multi-exit", "surrogate", "transfer")

T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class Entry:
    """One registered name: the class, the options it fixes, its kind and its aliases."""

    name: str
    cls: type
    fixed: Mapping[str, Any] = field(default_factory=dict)
    kind: str = "classifier"
    aliases: tuple[str, ...] = ()


#: Every registered name -> its entry (aliases are not keys; see :data:`ALIASES`).
REGISTRY: dict[str, Entry] = {}
#: alias -> the registered name it stands for.
ALIASES: dict[str, str] = {}


def register(
    name: str, *, kind: str = "classifier", aliases: tuple[str, ...] = (), **fixed: Any
) -> Callable[[T], T]:
    """Class decorator: register the class under ``name`` (with options ``fixed``, aliases)."""
    if kind not in KINDS:
        raise ValueError(f"unknown attack kind '{kind}'; use one of {', '.join(KINDS)}")

    def add(cls: T) -> T:
        """Add the entry; a name or alias registered twice is a programming error."""
        for n in (name, *aliases):
            if n in REGISTRY or n in ALIASES:
                raise ValueError(f"attack name '{n}' is registered twice")
        REGISTRY[name] = Entry(name, cls, dict(fixed), kind, tuple(aliases))
        ALIASES.update(dict.fromkeys(aliases, name))
        return cls

    return add


class _KindView(Mapping[str, Entry]):
    """The registered names of one kind, in registration order (a live, read-only view)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def _names(self) -> list[str]:
        """The names of this kind, now."""
        return [n for n, e in REGISTRY.items() if e.kind == self.kind]

    def __getitem__(self, name: str) -> Entry:
        """The entry of a name of this kind."""
        entry = REGISTRY[name]
        if entry.kind != self.kind:
            raise KeyError(name)
        return entry

    def __iter__(self) -> Iterator[str]:
        """The names of this kind."""
        return iter(self._names())

    def __len__(self) -> int:
        """How many names this kind has."""
        return len(self._names())


#: The attacks that run on any classifier (what ``robustlab eval`` / ``attack`` offer).
ATTACKS: Mapping[str, Entry] = _KindView("classifier")


def lookup(typed: str) -> Entry:
    """The entry behind a typed name or alias, with a clear error for unknown names."""
    entry = REGISTRY.get(ALIASES.get(typed, typed))
    if entry is None:
        by_kind = {k: [n for n, e in REGISTRY.items() if e.kind == k] for k in KINDS[1:]}
        others = "; ".join(f"{k}: {', '.join(names)}" for k, names in by_kind.items() if names)
        raise RobustlabError(
            f"unknown attack '{typed}'; available: {', '.join(ATTACKS)} ({others})"
        )
    return entry


def attack_class(name: str) -> type[Attack]:
    """The class behind an attack name (or alias), with a clear error for unknown names."""
    cls = lookup(name).cls
    if not (isinstance(cls, type) and issubclass(cls, Attack)):
        raise RobustlabError(
            f"'{name}' is a {lookup(name).kind} attack, built from names such as 'sgm+mi' "
            "(robustlab transfer --attacks), not by make_attack"
        )
    return cls


def make_attack(name: str, norm: str, eps: float, **options: Any) -> Attack:
    """Build an attack by name; options not set (None) keep the attack's published defaults.

    The attack records ``name`` as typed (and ``alias_of`` when it is an alias).
    """
    entry = lookup(name)
    cls = attack_class(name)
    # every registered attack is a dataclass; the Attack ABC they share is not one
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
    kwargs = {**given, **entry.fixed}
    if "norm" in fields:
        kwargs["norm"] = norm
    elif norm != "l2":
        raise RobustlabError(f"attack '{name}' supports only the l2 norm")
    try:
        # the attack's dataclass __init__ takes eps; the Attack ABC declares no __init__
        attack = cls(eps=eps, **kwargs)  # type: ignore[call-arg]
    except TypeError as exc:
        raise RobustlabError(f"bad option for attack '{name}': {exc}") from None
    return attack.recorded_as(name, entry.name if name != entry.name else None)

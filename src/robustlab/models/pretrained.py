"""The pretrained models shipped with robustlab, its zoo: ``zoo:NAME`` wherever a model is
loaded (``robustlab.load``, ``--model``).

Each is an ordinary robustlab checkpoint (safetensors weights, a manifest with their SHA-256)
in ``robustlab/pretrained/NAME/``, beside a ``card.json`` that states how it was trained (one
command of our own training code) and its AutoAttack numbers on all 1,000 mnist5k test points
(the command, version, eps, seed, and which points the attack broke), as RobustBench's zoo
states its entries'. ``tests/models/test_pretrained.py`` checks that each model still has them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RobustlabError

PREFIX = "zoo:"
CARD = "card.json"


def zoo_root() -> Path:
    """The folder the shipped models are installed in."""
    return Path(__file__).resolve().parent.parent / "pretrained"


def zoo_names() -> list[str]:
    """The names of the shipped models, sorted."""
    root = zoo_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / CARD).is_file())


def is_zoo(spec: str | Path) -> bool:
    """Whether a model spec names a shipped model (``zoo:NAME``)."""
    return isinstance(spec, str) and spec.strip().lower().startswith(PREFIX)


def zoo_folder(spec: str) -> Path:
    """The checkpoint folder of ``zoo:NAME`` (or of a bare NAME)."""
    name = spec.strip()[len(PREFIX) :] if is_zoo(spec) else spec.strip()
    if name not in zoo_names():
        known = ", ".join(f"{PREFIX}{n}" for n in zoo_names()) or "none are installed"
        raise RobustlabError(f"no shipped model is called {name!r}; the zoo has: {known}")
    return zoo_root() / name


def resolve(spec: str | Path) -> str | Path:
    """The checkpoint folder a ``zoo:NAME`` spec stands for; any other spec unchanged."""
    return zoo_folder(str(spec)) if is_zoo(spec) else spec


@dataclass(frozen=True)
class ZooEntry:
    """One shipped model: its name, checkpoint folder and card (recipe and recorded numbers)."""

    name: str
    folder: Path
    card: dict[str, Any]

    @property
    def spec(self) -> str:
        """How to name it as a model: ``zoo:NAME``."""
        return f"{PREFIX}{self.name}"


def zoo_entry(name: str) -> ZooEntry:
    """The card and folder of one shipped model."""
    folder = zoo_folder(name)
    try:
        card = json.loads((folder / CARD).read_text())
    except (OSError, ValueError) as exc:
        raise RobustlabError(f"the card of shipped model {name} cannot be read: {exc}") from None
    return ZooEntry(folder.name, folder, card)


def zoo_entries() -> list[ZooEntry]:
    """Every shipped model with its card, sorted by name."""
    return [zoo_entry(n) for n in zoo_names()]

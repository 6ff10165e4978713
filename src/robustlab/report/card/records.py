"""Which stored records are a model's: those that carry its weights SHA-256 (``eval``,
``msa``, ``compress``, ``uap`` and ``sloth`` under ``model``, ``transfer`` under ``models``,
a stored ``train`` manifest under ``weights``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


def record_sha(record: dict[str, Any]) -> str | None:
    """The weights SHA-256 a record of one model carries."""
    section = record.get("weights") if record.get("kind") == "train" else record.get("model")
    sha = section.get("sha256") if isinstance(section, dict) else None
    return str(sha) if sha else None


def transfer_names(record: dict[str, Any], sha: str) -> list[str]:
    """The names a transfer record gives the model with this hash (source, target or both)."""
    models = record.get("models")
    if not isinstance(models, dict):
        return []
    return [n for n, info in models.items() if isinstance(info, dict) and info.get("sha256") == sha]


@dataclass
class Matched:
    """A store's records of one model, by what they measured (each list oldest first)."""

    evals: list[dict[str, Any]] = field(default_factory=list)
    transfers: list[tuple[dict[str, Any], list[str]]] = field(default_factory=list)
    sloths: list[dict[str, Any]] = field(default_factory=list)
    compresses: list[dict[str, Any]] = field(default_factory=list)
    uaps: list[dict[str, Any]] = field(default_factory=list)
    trains: list[dict[str, Any]] = field(default_factory=list)

    def all(self) -> list[dict[str, Any]]:
        """Every matched record."""
        transfers = [r for r, _ in self.transfers]
        return [*self.evals, *transfers, *self.sloths, *self.compresses, *self.uaps, *self.trains]

    def counts(self) -> dict[str, int]:
        """How many records of each kind matched."""
        out: dict[str, int] = {}
        for r in self.all():
            out[str(r.get("kind"))] = out.get(str(r.get("kind")), 0) + 1
        return out


def match_records(records: Iterable[dict[str, Any]], sha: str | None) -> Matched:
    """The records that carry this weights SHA-256 (none when the model has no hash)."""
    found = Matched()
    if not sha:
        return found
    by_kind = {
        "sloth": found.sloths,
        "compress": found.compresses,
        "uap": found.uaps,
        "train": found.trains,
    }
    for r in records:
        kind = r.get("kind")
        if kind == "transfer":
            names = transfer_names(r, sha)
            if names:
                found.transfers.append((r, names))
        elif record_sha(r) != sha:
            continue
        elif kind in ("eval", "msa"):
            if isinstance(r.get("threat_model"), dict) and "eps" in r["threat_model"]:
                found.evals.append(r)
        elif isinstance(kind, str) and kind in by_kind:
            by_kind[kind].append(r)
    return found

"""Which stored records are a model's: those that carry its weights SHA-256 (``eval``,
``msa``, ``compress``, ``uap`` and ``sloth`` under ``model``, ``transfer`` under ``models``,
a stored ``train`` manifest under ``weights``).

An int8 checkpoint keeps its float model's weights (and hash) beside its observers, so the
hash alone does not tell an int8 model's records from its float model's: a record of an int8
model says how it was attacked (``attacked_through``, a stored train manifest its
``quantization``), and only records that agree with the model on being int8 are its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


def is_int8(record: dict[str, Any]) -> bool:
    """Whether a record (or a transfer record's model entry, or a manifest) is of an int8
    model."""
    if record.get("kind") == "train" or "weights" in record:
        return isinstance(record.get("quantization"), dict)
    model = record.get("model")
    info: dict[str, Any] = model if isinstance(model, dict) else record
    return bool(info.get("attacked_through"))


def record_sha(record: dict[str, Any]) -> str | None:
    """The weights SHA-256 a record of one model carries."""
    section = record.get("weights") if record.get("kind") == "train" else record.get("model")
    sha = section.get("sha256") if isinstance(section, dict) else None
    return str(sha) if sha else None


def transfer_names(record: dict[str, Any], sha: str, int8: bool = False) -> list[str]:
    """The names a transfer record gives the model with this hash (source, target or both);
    ``int8``: the model is an int8 one (see the module's docstring)."""
    models = record.get("models")
    if not isinstance(models, dict):
        return []
    return [
        name
        for name, info in models.items()
        if isinstance(info, dict) and info.get("sha256") == sha and is_int8(info) == int8
    ]


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


def match_records(
    records: Iterable[dict[str, Any]], sha: str | None, *, int8: bool = False
) -> Matched:
    """The records that carry this weights SHA-256 (none when the model has no hash); of
    an int8 model (``int8``) or of a float one, as the model is."""
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
            names = transfer_names(r, sha, int8)
            if names:
                found.transfers.append((r, names))
        elif record_sha(r) != sha or is_int8(r) != int8:
            continue
        elif kind in ("eval", "msa"):
            if isinstance(r.get("threat_model"), dict) and "eps" in r["threat_model"]:
                found.evals.append(r)
        elif isinstance(kind, str) and kind in by_kind:
            by_kind[kind].append(r)
    return found

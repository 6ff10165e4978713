"""A model card's facts, gathered from a store's records of the model and its manifest."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from ...version import __version__
from .checks import CHECKS, MaskingWarning, masking_warnings
from .evals import CleanRow, Protocol, RobustRow, SummaryRow, clean_rows, robust_rows, summary
from .limits import commands, known_limits, versions
from .manifest import dataset, derived_from, early_exit, identity, recipe, stated, suggested_command
from .records import match_records
from .results import compress_rows, sloth_rows, transfer_rows, uap_rows
from .text import Rows


@dataclass(frozen=True)
class ModelCard:
    """Everything a model card says, each fact taken from a stored record or the manifest."""

    title: str
    model: str
    sha256: str | None
    store: str
    generated: str
    robustlab_version: str
    matched: dict[str, int]
    labels: list[str]
    identity: Rows
    derived_from: Rows
    dataset: Rows
    recipe: list[tuple[str, Rows]]
    stated: Rows
    summary: list[SummaryRow]
    clean: list[CleanRow]
    robust: list[RobustRow]
    protocols: list[Protocol]
    warnings: list[MaskingWarning]
    checks: list[str]
    transfer: list[dict[str, Any]]
    sloth: list[dict[str, Any]]
    early_exit: list[dict[str, Any]]
    compress: list[dict[str, Any]]
    uap: list[dict[str, Any]]
    limits: list[str]
    versions: Rows
    commands: list[tuple[str, str]]
    uncommanded: int
    suggest: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``kind`` "card")."""
        return {"kind": "card", **asdict(self)}


def build_card(
    records: Iterable[dict[str, Any]],
    manifest: dict[str, Any],
    *,
    model: str,
    store: str,
    parameters: int | None = None,
    title: str | None = None,
) -> ModelCard:
    """The card of the model whose ``manifest`` is given, from a store's ``records`` (those
    that carry its weights SHA-256). ``model``: how the user named it (used in the commands
    the card suggests); ``store``: the store's path; ``parameters``: its parameter count
    (from the loaded model); ``title``: else the records' one label, else ``model``."""
    sha = (manifest.get("weights") or {}).get("sha256") or None
    matched = match_records(records, sha, int8=isinstance(manifest.get("quantization"), dict))
    robust, protocols = robust_rows(matched.evals)
    transfer = transfer_rows(matched.transfers)
    suggest = suggested_command(model, store, manifest)
    labels = sorted({str(r["label"]) for r in matched.all() if r.get("label")})
    own = [label for label in labels if label not in ("transfer", "sloth", "uap")]
    name = title or (own[0] if len(own) == 1 else model)
    arch = str((manifest.get("model") or {}).get("arch", ""))
    cmds, uncommanded = commands(matched, robust)
    return ModelCard(
        title=f"Model card: {name}" + (f" ({arch})" if arch and arch not in name else ""),
        model=model,
        sha256=sha,
        store=store,
        generated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        robustlab_version=__version__,
        matched=matched.counts(),
        labels=labels,
        identity=identity(manifest, model, parameters),
        derived_from=derived_from(manifest),
        dataset=dataset(manifest),
        recipe=recipe(manifest),
        stated=stated(manifest),
        summary=summary(robust),
        clean=clean_rows(robust, manifest),
        robust=robust,
        protocols=protocols,
        warnings=masking_warnings(robust, transfer),
        checks=list(CHECKS),
        transfer=transfer,
        sloth=sloth_rows(matched.sloths),
        early_exit=early_exit(manifest),
        compress=compress_rows(matched.compresses),
        uap=uap_rows(matched.uaps),
        limits=known_limits(robust, manifest, matched, suggest),
        versions=versions(matched, manifest),
        commands=cmds,
        uncommanded=uncommanded,
        suggest=suggest,
    )

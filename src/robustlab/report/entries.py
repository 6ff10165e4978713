"""Stored evaluations (eval and MSA records) as the report reads them: one entry per model,
data, threat model and attack configuration at one eps, with the names shown for models and
datasets."""

from __future__ import annotations

import html
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .attack_spec import AttackSpec, describe_attack, step_size

#: The splits a dataset spec carries in records ("digits/test"); the dataset is before them.
SPLITS = ("train", "test", "calibration")
NORM_ORDER = {"linf": 0, "l2": 1, "l1": 2}

ModelKey = str  # which model: its weights hash (its label when it has none), and its mode


def dataset_name(data: Any) -> str:
    """The dataset a record's data spec names, without its split: 'digits/test' -> 'digits',
    'npz:/a/b.npz/test' -> 'npz:/a/b.npz'."""
    text = str(data)
    head, sep, tail = text.rpartition("/")
    return head if sep and tail in SPLITS else text


def format_eps(eps: float) -> str:
    """An eps as people write it: short decimals as they are, k/255 budgets as k/255."""
    short = f"{eps:g}"
    if len(short.replace("0.", "", 1)) <= 4 or eps == 0:
        return short
    k = eps * 255
    if abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return f"{eps:.4g}"


def norm_eps(norm: str, eps: float) -> str:
    """A threat model as a label, e.g. 'linf eps 8/255'."""
    return f"{norm} eps {format_eps(eps)}"


@dataclass(frozen=True)
class Entry:
    """One stored evaluation: a model's clean and robust accuracy under one attack at one eps."""

    label: str
    sha: str
    variant: str  # what makes the same weights behave differently (e.g. 'hpm mode ema')
    arch: str
    data: str
    norm: str
    eps: float
    robust: float
    clean: float | None
    n: int | None
    created: str
    kind: str
    attack: AttackSpec
    step: str | None  # the step size relative to eps (not part of the configuration: a user's
    alpha: float | None  # absolute --alpha gives another ratio at every eps)

    @property
    def model(self) -> ModelKey:
        """Which model this is, whatever label it was stored under: its weights (the label
        when the record has no hash), and the mode it ran in."""
        return model_key(self.label, self.sha, self.variant)

    @property
    def date(self) -> str:
        """The day the evaluation was stored ('' when unknown)."""
        return self.created[:10]


def model_key(label: str, sha: str, variant: str = "") -> ModelKey:
    """The identity of a model: its weights' hash (its label without one) and its mode."""
    return (sha or f"label:{label}") + (f"|{variant}" if variant else "")


def _variant(model: Mapping[str, Any]) -> str:
    """The settings a record's model ran with that change what the same weights compute."""
    parts = []
    hpm = model.get("hpm")
    if isinstance(hpm, Mapping) and hpm.get("mode"):
        parts.append(f"hpm mode {hpm['mode']}")
    if model.get("attacked_through"):
        parts.append(f"attacked through {model['attacked_through']}")
    return ", ".join(parts)


def _number(record: Mapping[str, Any], key: str) -> float | None:
    """A numeric field of a record, None when absent."""
    v = record.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def entry(record: Mapping[str, Any]) -> Entry:
    """The entry of one eval or MSA record; KeyError / TypeError / ValueError if it lacks the
    threat model, the robust accuracy or the attack."""
    tm = record["threat_model"]
    model = record.get("model") or {}
    if not isinstance(model, Mapping):
        model = {}
    n = record.get("n")
    return Entry(
        label=str(record.get("label") or "model"),
        sha=str(model.get("sha256") or ""),
        variant=_variant(model),
        arch=str(model.get("arch") or ""),
        data=dataset_name(record.get("data") or ""),
        norm=str(tm["norm"]),
        eps=float(tm["eps"]),
        robust=float(record["robust_accuracy"]),
        clean=_number(record, "clean_accuracy"),
        n=int(n) if isinstance(n, int) and not isinstance(n, bool) else None,
        created=str(record.get("created") or ""),
        kind=str(record.get("kind", "eval")),
        attack=describe_attack(record["attack"]),
        step=step_size(record["attack"]),
        alpha=_number(record["attack"], "alpha"),
    )


def read_entries(records: Iterable[Mapping[str, Any]]) -> tuple[list[Entry], list[str]]:
    """The entries of the records that can be read, in store order, and a short reason for
    each one that cannot."""
    entries, failed = [], []
    for record in records:
        try:
            entries.append(entry(record))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            failed.append(f"{type(exc).__name__} {str(exc)[:120]}")
    return entries, failed


def unread_note(kind: str, failed: list[str]) -> str:
    """A note for stored records that could not be shown ('' when there are none)."""
    if not failed:
        return ""
    reasons = "; ".join(sorted(set(failed))[:3])
    return (
        f"<p class=muted>({len(failed)} stored {html.escape(kind)} "
        f"record{'s' if len(failed) != 1 else ''} that could not be shown: "
        f"{html.escape(reasons)})</p>"
    )


def model_names(named: Iterable[tuple[ModelKey, str]]) -> dict[ModelKey, str]:
    """The name shown for each model, from (model, label) pairs in store order: the label it
    was last stored under, with its mode or the start of its hash where two models would
    otherwise share a name."""
    last: dict[ModelKey, str] = {}
    for key, label in named:
        last[key] = label
    count: dict[str, int] = defaultdict(int)
    for label in last.values():
        count[label] += 1
    names = {}
    for key, label in last.items():
        if count[label] == 1:
            names[key] = label
            continue
        sha, _, variant = key.partition("|")
        names[key] = f"{label} ({variant or sha.removeprefix('label:')[:8]})"
    return names


def entry_names(entries: Iterable[Entry]) -> dict[ModelKey, str]:
    """The name shown for each model of these entries (see :func:`model_names`)."""
    return model_names((e.model, e.label) for e in entries)


def threat_order(data: str, norm: str, eps: float) -> tuple[str, int, str, float]:
    """Sort key of threat models: by dataset, then linf, l2, l1, then eps."""
    return (data, NORM_ORDER.get(norm, 9), norm, eps)

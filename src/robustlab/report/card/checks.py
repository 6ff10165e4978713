"""Gradient-masking warnings on a model card: those the records carry, and those the card
derives honestly from several records (each derived warning names the rows it compares)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .evals import RobustRow
from .text import pct, threat_text

#: What the card checks, said on the card so a reader knows what "no warning" covers.
CHECKS = (
    "the warnings the records carry (outputs and gradients checked before attacking: "
    "non-deterministic outputs, probabilities instead of logits, all-zero gradients; a "
    "black-box member breaking points the gradient members missed; MSA's surrogates breaking "
    "points plain AutoAttack missed)",
    "robust accuracy rising with eps under one protocol",
    "a query-only attack, or a transfer attack from another model, beating a gradient attack "
    "on the same points and threat model",
    "high robust accuracy at linf eps >= 0.5",
)


@dataclass(frozen=True)
class MaskingWarning:
    """A gradient-masking warning: carried by records (``origin`` "record") or derived by
    the card from several results (``origin`` "derived"); ``rows``: the rows (R1, T1, ...)
    it concerns."""

    text: str
    origin: str
    rows: list[str] = field(default_factory=list)


def carried(rows: list[RobustRow]) -> list[MaskingWarning]:
    """The warnings the records carry, each once, with the rows that carry it."""
    found: dict[str, list[str]] = {}
    for row in rows:
        for w in row.warnings:
            found.setdefault(w, []).append(row.id)
    return [MaskingWarning(text, "record", ids) for text, ids in found.items()]


def rising(rows: list[RobustRow]) -> list[MaskingWarning]:
    """Robust accuracy rising with eps under one protocol (same attack, points, seed): a
    larger budget contains every example of a smaller one, so an attack that finds less with
    more room is failing, not the model succeeding."""
    out = []
    by_protocol: dict[str, list[RobustRow]] = {}
    for row in rows:
        by_protocol.setdefault(row.protocol, []).append(row)
    for pid, group in by_protocol.items():
        group = sorted(group, key=lambda r: r.eps)
        for i, low in enumerate(group):
            for high in group[i + 1 :]:
                if high.eps > low.eps and high.robust_accuracy > low.robust_accuracy:
                    out.append(
                        MaskingWarning(
                            f"under one protocol ({pid}) robust accuracy rises from "
                            f"{pct(low.robust_accuracy)} at eps {low.eps:g} to "
                            f"{pct(high.robust_accuracy)} at eps {high.eps:g}: a larger budget "
                            "contains every example of a smaller one, so the attack is failing "
                            "(gradient masking, or an attack too weak for this model)",
                            "derived",
                            [low.id, high.id],
                        )
                    )
    return out


def _same_points(a: RobustRow, data: str, n: int, norm: str, eps: float) -> bool:
    """Whether a row measured the same points (the first ``n`` of ``data``) at that budget."""
    return (a.data, a.n, a.norm, a.eps) == (data, n, norm, eps)


def black_box_wins(rows: list[RobustRow]) -> list[MaskingWarning]:
    """A query-only attack leaving lower robust accuracy than a gradient attack on the same
    points and threat model: gradients that mislead are the usual reason."""
    out = []
    for bb in (r for r in rows if r.gradient_free):
        for g in rows:
            same = _same_points(g, bb.data, bb.n, bb.norm, bb.eps)
            if same and not g.gradient_free and bb.robust_accuracy < g.robust_accuracy:
                out.append(
                    MaskingWarning(
                        f"the query-only {bb.attack} ({bb.id}) left {pct(bb.robust_accuracy)} "
                        f"robust where the gradient attack {g.attack} ({g.id}) left "
                        f"{pct(g.robust_accuracy)}, on the same {g.n} points at "
                        f"{threat_text(g.norm, g.eps)}: a sign of gradient masking",
                        "derived",
                        [bb.id, g.id],
                    )
                )
    return out


def transfer_wins(rows: list[RobustRow], transfer: list[dict[str, Any]]) -> list[MaskingWarning]:
    """Examples crafted on another model leaving this model less accurate than a white-box
    gradient attack did on the same points and threat model."""
    out = []
    for t in (t for t in transfer if t["role"] == "target" and not t["white_box"]):
        for g in rows:
            same = _same_points(g, t["data"], t["n_all"], t["norm"], t["eps"])
            if same and not g.gradient_free and t["adversarial_accuracy"] < g.robust_accuracy:
                out.append(
                    MaskingWarning(
                        f"examples crafted on {t['other']} ({t['attack']}, {t['id']}) left this "
                        f"model {pct(t['adversarial_accuracy'])} accurate where the white-box "
                        f"{g.attack} ({g.id}) left it {pct(g.robust_accuracy)} robust, on the "
                        f"same {g.n} points at {threat_text(g.norm, g.eps)}: a transfer attack "
                        "beating the white-box one is a sign of gradient masking",
                        "derived",
                        [g.id, t["id"]],
                    )
                )
    return out


def unbounded(rows: list[RobustRow]) -> list[MaskingWarning]:
    """High robust accuracy at a Linf budget of 0.5 or more, where every input in [0, 1] can
    be moved to the same grey image: at most the points of one class can stay robust."""
    return [
        MaskingWarning(
            f"{pct(row.robust_accuracy)} robust at linf eps {row.eps:g} ({row.id}): with eps >= "
            "0.5 every input can be moved to the same grey image, so only the points of one "
            "class can stay robust; unless one class holds more than half the points, the "
            "attack is failing",
            "derived",
            [row.id],
        )
        for row in rows
        if row.norm == "linf" and row.eps >= 0.5 and row.robust_accuracy > 0.5
    ]


def masking_warnings(rows: list[RobustRow], transfer: list[dict[str, Any]]) -> list[MaskingWarning]:
    """Every gradient-masking warning of a card: carried first, then derived."""
    return (
        carried(rows)
        + rising(rows)
        + black_box_wins(rows)
        + transfer_wins(rows, transfer)
        + unbounded(rows)
    )

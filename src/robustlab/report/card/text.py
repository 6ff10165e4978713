"""How a model card writes numbers and settings out for a reader (every part of the card
uses these, so a number reads the same wherever it appears)."""

from __future__ import annotations

import math
from typing import Any

Rows = list[tuple[str, str]]
"""Key/value rows of a card table, both already written out for a reader."""


def pct(value: Any) -> str:
    """An accuracy or rate as a percentage with two decimals, '–' when not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–"
    return f"{100 * float(value):.2f} %"


def value_text(value: Any) -> str:
    """A manifest or record value as a reader wants it: yes/no, '–' for none, 4 significant
    digits, short lists joined, long lists counted, mappings as key=value."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        if len(value) > 8:
            return f"({len(value)} values)"
        return ", ".join(value_text(v) for v in value) if value else "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}={value_text(v)}" for k, v in value.items()) if value else "none"
    return str(value)


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a proportion ``p`` measured on ``n`` points."""
    if n <= 0:
        return (0.0, 1.0)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def eps_text(eps: float) -> str:
    """An eps as a reader knows it: '0.3', or '0.03137 (8/255)' for a multiple of 1/255
    written out in full."""
    k = eps * 255
    if 0 < eps < 1 and abs(k - round(k)) < 1e-4 and len(f"{eps:g}") > 6:
        return f"{eps:.4g} ({round(k)}/255)"
    return f"{eps:g}"


def threat_text(norm: str, eps: float) -> str:
    """'linf eps 0.3'."""
    return f"{norm} eps {eps_text(eps)}"


def span(ids: list[str]) -> str:
    """'R1', 'R1, R2', 'R1–R7' for three or more consecutive rows; other names joined."""
    if len(ids) > 2 and all(i[:1] == "R" and i[1:].isdigit() for i in ids):
        nums = [int(i[1:]) for i in ids]
        if nums == list(range(nums[0], nums[0] + len(nums))):
            return f"{ids[0]}–{ids[-1]}"
    return ", ".join(ids)


def plural(n: int, one: str, many: str | None = None) -> str:
    """'1 record', '3 records'."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def flat_items(
    section: dict[str, Any], skip: tuple[str, ...] = (), prefix: str = ""
) -> list[tuple[str, Any]]:
    """A nested manifest or record section as (dotted name, value) pairs, leaving out the
    entries named in ``skip``; a nested ``config`` adds no level to the names."""
    out: list[tuple[str, Any]] = []
    for key, value in section.items():
        if key in skip:
            continue
        name = prefix if key == "config" else f"{prefix}{key}."
        if isinstance(value, dict) and value:
            out.extend(flat_items(value, skip, name))
        else:
            out.append((f"{prefix}{key}", value))
    return out


def setting_name(key: str) -> str:
    """A setting's name for a reader: underscores as spaces, a trailing ``_s`` as '(s)'."""
    if key.endswith("_s"):
        key = key[:-2] + " (s)"
    return key.replace("_", " ")

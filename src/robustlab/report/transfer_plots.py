"""Plots of transfer matrices (success-rate heatmap, SGM success vs gamma) and their report section."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .plots import embedded_png, plot, save_figure  # noqa: E402


def _cells(result: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """The cells (as dicts) and the target order of a TransferMatrix or its stored record."""
    record = result.to_dict() if hasattr(result, "to_dict") else result
    if not isinstance(record, Mapping) or not isinstance(record.get("cells"), Sequence):
        raise ValueError("expected a TransferMatrix or a transfer record with 'cells'")
    cells = [dict(c) for c in record["cells"]]
    targets = list(record.get("targets") or dict.fromkeys(c["target"] for c in cells))
    return cells, targets


def _row_label(cell: Mapping[str, Any]) -> str:
    """'source: attack' (with gamma for SGM rows)."""
    gamma = cell.get("gamma")
    attack = cell["attack"] if gamma is None else f"{cell['attack']} γ={gamma:g}"
    return f"{cell['source']}: {attack}"


@plot
def transfer_heatmap(
    result: Any,
    path: str | Path,
    *,
    title: str = "Transfer success rate (%)",
    key: str = "success_rate",
) -> Path:
    """Heatmap of success rates: one row per source and attack, one column per target; * marks white-box."""
    cells, targets = _cells(result)
    rows = list(dict.fromkeys(_row_label(c) for c in cells))
    grid = [[math.nan] * len(targets) for _ in rows]
    white = [[False] * len(targets) for _ in rows]
    for c in cells:
        i, j = rows.index(_row_label(c)), targets.index(c["target"])
        value = c.get(key)
        grid[i][j] = math.nan if value is None else 100 * float(value)
        white[i][j] = bool(c.get("white_box"))
    width = max(5.0, 1.2 + 0.9 * len(targets) + 0.08 * max(len(r) for r in rows))
    fig, ax = plt.subplots(figsize=(width, 1.2 + 0.45 * len(rows)), dpi=110)
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(targets)):
            v = grid[i][j]
            text = "-" if math.isnan(v) else f"{v:.0f}{'*' if white[i][j] else ''}"
            ax.text(j, i, text, ha="center", va="center", color="w" if v < 60 else "k", fontsize=8)
    ax.set_xticks(range(len(targets)), targets, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("target (* white-box)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    return save_figure(fig, path)


@plot
def gamma_sweep_plot(
    result: Any,
    path: str | Path,
    *,
    title: str = "SGM: transfer success vs gamma",
) -> Path:
    """Success rate against gamma, one line per (source, target, attack) with SGM cells."""
    cells, targets = _cells(result)
    lines: dict[str, list[tuple[float, float]]] = {}
    for c in cells:
        if c.get("gamma") is None or c.get("white_box"):
            continue
        label = f"{c['source']} → {c['target']}"
        if len({d["attack"] for d in cells if d.get("gamma") is not None}) > 1:
            label += f" ({c['attack']})"
        lines.setdefault(label, []).append((float(c["gamma"]), 100 * float(c["success_rate"])))
    if not lines:
        raise ValueError("the result has no SGM cells on black-box targets to plot against gamma")
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    markers = "osD^v<>p"
    for i, (label, points) in enumerate(lines.items()):
        pts = sorted(points)
        ax.plot([g for g, _ in pts], [s for _, s in pts], marker=markers[i % 8], label=label)
    ax.set_xlabel("gamma (1 = plain gradient)")
    ax.set_ylabel("success rate (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def transfer_section_html(record: Mapping[str, Any], *, title: str = "Transfer matrix") -> str:
    """An HTML fragment for a stored transfer record: heading, heatmap, gamma sweep, table."""
    cells, targets = _cells(record)
    tm = record.get("threat_model") or {}
    kind = "targeted" if record.get("targeted") else "untargeted"
    parts = [
        f"<h2>{html.escape(title)}</h2>",
        f"<p>{kind} success rate (%) of examples crafted on each source and evaluated on each "
        f"target, {html.escape(str(tm.get('norm', '')))} eps={html.escape(str(tm.get('eps', '')))}, "
        f"{int(record.get('n', 0))} points of {html.escape(str(record.get('data', '')))}; "
        "counted over the points the target classifies correctly when clean (in brackets: over "
        "all points). * marks white-box cells (the target is the source). Cost: "
        f"{record.get('generations')} attack generations, {record.get('target_forwards')} "
        "target passes.</p>",
        embedded_png("transfer heatmap", transfer_heatmap, record),
    ]
    gammas = {c.get("gamma") for c in cells if c.get("gamma") is not None}
    if len(gammas) > 1 and any(not c.get("white_box") for c in cells if c.get("gamma")):
        parts.append(embedded_png("success vs gamma", gamma_sweep_plot, record))
    rows: dict[str, dict[str, Mapping[str, Any]]] = {}
    for c in cells:
        rows.setdefault(_row_label(c), {})[c["target"]] = c
    head = "".join(f"<th>{html.escape(t)}</th>" for t in targets)
    body = []
    for label, by_target in rows.items():
        tds = []
        for t in targets:
            found = by_target.get(t)
            if found is None:
                tds.append("<td>-</td>")
                continue
            star = "*" if found.get("white_box") else ""
            tds.append(
                f"<td>{100 * float(found['success_rate']):.1f}{star} "
                f"<span class=muted>({100 * float(found['success_rate_all']):.1f})</span></td>"
            )
        body.append(f"<tr><td class=l>{html.escape(label)}</td>{''.join(tds)}</tr>")
    parts.append(f"<table><tr><th class=l>source: attack</th>{head}</tr>{''.join(body)}</table>")
    return "\n".join(parts)

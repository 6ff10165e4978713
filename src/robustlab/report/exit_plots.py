"""Plots of early-exit behaviour: exit histograms and efficacy curves (e.g. clean vs attacked)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..analysis.efficiency import efficacy_curve  # noqa: E402


def _field(record: Any, name: str) -> Any:
    """A field of an EfficiencyRecord or of its JSON dict."""
    return record[name] if isinstance(record, Mapping) else getattr(record, name)


def _save(fig: Any, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def exit_histogram(
    records: Mapping[str, Any], path: str | Path, *, title: str = "Where inputs exit"
) -> Path:
    """Bars of the fraction of inputs leaving at each exit, one group per record; a PNG."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    labels = list(records)
    width = 0.8 / max(1, len(labels))
    names: list[str] = []
    for i, label in enumerate(labels):
        fractions = _field(records[label], "exit_fractions")
        names = _field(records[label], "exit_names") or [str(k) for k in range(len(fractions))]
        xs = [k + (i - (len(labels) - 1) / 2) * width for k in range(len(fractions))]
        eff = _field(records[label], "efficacy")
        ax.bar(xs, [100 * f for f in fractions], width, label=f"{label} (efficacy {eff:.2f})")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace("after ", "") for n in names], rotation=30, ha="right")
    ax.set_ylabel("inputs exiting (%)")
    ax.set_ylim(0, 102)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="best")
    return _save(fig, path)


def efficacy_curves(
    records: Mapping[str, Any],
    path: str | Path,
    *,
    title: str = "Fraction of inputs exited vs computation paid",
) -> Path:
    """Cumulative fraction exited against normalised cost, one step curve per record; a PNG."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for label, rec in records.items():
        xs, ys = efficacy_curve(_field(rec, "exit_fractions"), _field(rec, "exit_flops"))
        eff = _field(rec, "efficacy")
        ax.plot(xs, ys, linewidth=2, label=f"{label} (area {eff:.2f})")
        ax.fill_between(xs, ys, alpha=0.12)
    ax.set_xlabel("cost paid / cost of the full network")
    ax.set_ylabel("fraction of inputs exited (cumulative)")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    return _save(fig, path)

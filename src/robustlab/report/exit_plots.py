"""Plots of early-exit behaviour: exit histograms and efficacy curves (e.g. clean vs attacked)."""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..analysis.efficiency import efficacy_curve  # noqa: E402
from .plots import embedded_png, plot, save_figure  # noqa: E402


def _field(record: Any, name: str) -> Any:
    """A field of an EfficiencyRecord or of its JSON dict."""
    return record[name] if isinstance(record, Mapping) else getattr(record, name)


def _save(fig: Any, path: str | Path) -> Path:
    """Lay the figure out and save it."""
    fig.tight_layout()
    return save_figure(fig, path)


def _legend_below(ax: Any, entries: int) -> None:
    """A legend under the axes, so that it never hides bars or curves."""
    ax.legend(
        loc="upper center",
        bbox_to_anchor=(0.5, -0.22),
        ncol=2 if entries > 2 else 1,
        fontsize="small",
        frameon=False,
    )


@plot
def exit_histogram(
    records: Mapping[str, Any], path: str | Path, *, title: str = "Where inputs exit"
) -> Path:
    """Bars of the fraction of inputs leaving at each exit, one group per record; a PNG."""
    fig, ax = plt.subplots(figsize=(6.4, 5.0), dpi=110)
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
    _legend_below(ax, len(labels))
    return _save(fig, path)


@plot
def efficacy_curves(
    records: Mapping[str, Any],
    path: str | Path,
    *,
    title: str = "Fraction of inputs exited vs computation paid",
) -> Path:
    """Cumulative fraction exited against normalised cost, one step curve per record; a PNG."""
    fig, ax = plt.subplots(figsize=(6.4, 5.0), dpi=110)
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
    _legend_below(ax, len(records))
    return _save(fig, path)


def sloth_runs(record: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The efficiency records of a stored ``robustlab sloth`` record, clean first, by label."""
    runs: dict[str, Mapping[str, Any]] = {
        "clean": record["clean"],
        str(record.get("variant", "attacked")): record["attacked"],
    }
    for label in record.get("extras", []):
        if isinstance(record.get(label), Mapping):
            runs[str(label)] = record[label]
    return runs


def _exit_names(record: Mapping[str, Any]) -> list[str]:
    """The internal exits' names of an efficiency record (the final exit left out)."""
    names = [str(n).replace("after ", "") for n in record.get("exit_names") or []]
    return names[:-1] or ["?"]


def sloth_section_html(record: Mapping[str, Any], *, title: str = "DeepSloth slowdown") -> str:
    """An HTML fragment for a stored sloth record: exit histogram, efficacy curves, table."""
    runs = sloth_runs(record)
    tm = record.get("threat_model") or {}
    model = record.get("model") or {}
    clean = runs["clean"]
    parts = [
        f"<h2>{html.escape(title)}</h2>",
        f"<p>Early-exit behaviour of {html.escape(str(model.get('arch', 'the model')))} "
        f"(internal exits after {html.escape(', '.join(_exit_names(clean)))}; "
        f"{html.escape(str(clean.get('rule', '')))} threshold {float(clean['threshold']):.4f}) "
        f"on {int(record.get('n', 0))} test points of {html.escape(str(record.get('data', '')))}, "
        f"clean and under {html.escape(str(record.get('variant', '')))} at "
        f"{html.escape(str(tm.get('norm', '')))} eps={html.escape(str(tm.get('eps', '')))}. "
        "Efficacy is the area under the fraction-exited vs normalised-cost curve (1: every "
        "input leaves for free, 0: every input runs the whole network). FLOPs saving is "
        "relative to the backbone alone, so it is negative when the exit heads cost more than "
        "early exits save. Latency is measured per input at batch size "
        f"{int(clean.get('latency_batch_size', 1))} (– where not measured).</p>",
        embedded_png("exit histogram", exit_histogram, runs, title="Where inputs exit"),
        embedded_png("efficacy curves", efficacy_curves, runs),
    ]
    head = (
        "<tr><th class=l>inputs</th><th>efficacy</th><th>efficacy drop</th><th>avg FLOPs</th>"
        "<th>FLOPs saving</th><th>latency (ms/input)</th><th>final-exit acc.</th>"
        "<th>early-exit acc.</th></tr>"
    )
    rows = []
    base = float(clean["efficacy"])
    for label, rec in runs.items():
        eff = float(rec["efficacy"])
        drop = "–" if label == "clean" or base <= 0 else f"{100 * (1 - eff / base):.1f} %"
        latency = float(rec.get("latency_ms", 0.0))
        rows.append(
            f"<tr><td class=l>{html.escape(label)}</td><td>{eff:.3f}</td><td>{drop}</td>"
            f"<td>{float(rec['avg_flops']) / 1e6:.2f} M</td>"
            f"<td>{100 * float(rec['flops_saving']):.1f} %</td>"
            f"<td>{f'{latency:.2f}' if rec.get('latency_samples') else '–'}</td>"
            f"<td>{100 * float(rec['accuracy_final']):.1f} %</td>"
            f"<td>{100 * float(rec['accuracy_early_exit']):.1f} %</td></tr>"
        )
    parts.append(f"<table>{head}{''.join(rows)}</table>")
    return "\n".join(parts)

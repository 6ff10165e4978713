"""The report's section for a stored compress record: per-layer compressibility (table and
plot), the robustness bound next to the measured gap, and the representations."""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from .plots import embedded_png, plot, save_figure


def _g(value: Any) -> str:
    """A number, short whatever its size ('-' when missing)."""
    return "-" if value is None else f"{float(value):.4g}"


@plot
def compress_plot(record: Mapping[str, Any], path: str | Path) -> Path:
    """Per-layer neuron and spectral compressibility (left), representation shift (right)."""
    kappa = f"{record['kappas'][0]:g}"
    layers = record["layers"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.6), dpi=110)
    idx = list(range(len(layers)))
    for key, label, marker in (
        ("neuron_compressibility", "neuron", "o"),
        ("spectral_compressibility", "spectral", "s"),
    ):
        left.plot(idx, [m[key][kappa] for m in layers], marker=marker, label=label)
    if len(layers) <= 16:  # the layers by name; more would overlap, so numbers (as the table)
        left.set_xticks(idx, [str(m["name"]) for m in layers], rotation=45, ha="right", fontsize=7)
    else:
        left.xaxis.set_major_locator(MaxNLocator(integer=True))
        left.set_xlabel("layer (module order, as in the table)")
    left.set_ylabel(f"best-k relative error, kappa={kappa}")
    left.set_ylim(0, 1.02)
    left.legend(loc="best", fontsize=8)
    reps = record["representations"]
    for norm in record["gap"]:
        right.plot(range(len(reps)), [r["shift"][norm] for r in reps], marker="o", label=norm)
    right.set_xticks(
        range(len(reps)), [r["name"] for r in reps], rotation=45, ha="right", fontsize=7
    )
    right.set_ylabel("||z_adv - z|| / ||z||")
    right.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def compress_section_html(record: Mapping[str, Any], *, title: str = "Compressibility") -> str:
    """An HTML fragment for a stored compress record: heading, plot, bound vs gap, layers."""
    kappa = f"{record['kappas'][0]:g}"
    model = record.get("model") or {}
    parts = [
        f"<h2>{html.escape(title)}</h2>",
        f"<p>{html.escape(str(model.get('arch', '')))} on {int(record['n'])} points of "
        f"{html.escape(str(record.get('data', '')))}. Compressibility is the relative best-k "
        f"error (q=2, k = ceil({kappa} x length); small = compressible) of each layer's row "
        "norms (neuron) and singular values (spectral). The bound is a guaranteed upper bound "
        "on the rise of any sample's cross-entropy within eps; the gap is what APGD-CE "
        "achieved (per-sample max and mean).</p>",
        embedded_png("compressibility per layer", compress_plot, record),
    ]
    rows = []
    for norm, gap in record["gap"].items():
        b = record["bound"].get(norm, {})
        if "refused" in b:
            bound = f"<td colspan=3 class=l>{html.escape(str(b['refused']))}</td>"
        else:
            bound = (
                f"<td>{_g(b['bound'])}</td><td>{_g(b['bound_compressibility'])}</td>"
                f"<td>{_g(b['alignment'])}</td>"
            )
        rows.append(
            f"<tr><td class=l>{html.escape(norm)}</td><td>{_g(gap['eps'])}</td>{bound}"
            f"<td>{_g(gap['max'])}</td><td>{_g(gap['mean'])}</td>"
            f"<td>{100 * float(gap['robust_accuracy']):.1f}</td></tr>"
        )
    parts.append(
        "<table><tr><th class=l>threat</th><th>eps</th><th>bound</th><th>bound (compr.)</th>"
        "<th>alignment</th><th>gap max</th><th>gap mean</th><th>robust acc %</th></tr>"
        + "".join(rows)
        + "</table>"
    )
    layer_rows = "".join(
        f"<tr><td class=l>{html.escape(str(m['name']))}</td>"
        f"<td>{html.escape('x'.join(str(s) for s in m['shape']))}</td>"
        f"<td>{_g(m['stable_rank'])}</td><td>{_g(m['effective_rank_exp'])}</td>"
        f"<td>{_g(m['spectral_norm'])}</td><td>{_g(m['frobenius_norm'])}</td>"
        f"<td>{_g(m['neuron_compressibility'][kappa])}</td>"
        f"<td>{_g(m['spectral_compressibility'][kappa])}</td>"
        f"<td>{_g(m['near_zero_fraction'])}</td></tr>"
        for m in record["layers"]
    )
    parts.append(
        "<table><tr><th class=l>layer</th><th>shape</th><th>stable rank</th>"
        "<th>exp(entropy) rank</th><th>spectral</th><th>Frobenius</th><th>neuron c</th>"
        f"<th>spectral c</th><th>near-zero</th></tr>{layer_rows}</table>"
    )
    return "\n".join(parts)

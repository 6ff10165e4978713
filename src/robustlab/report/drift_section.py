"""The drift monitor's plot (adjusted p-values over the stream's batches) and report section,
from a stored ``robustlab monitor`` summary record."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .attack_table import parameter_table  # noqa: E402
from .plots import DASHES, embedded_png, plot, save_figure  # noqa: E402


@plot
def drift_plot(record: Mapping[str, Any], path: str | Path, *, title: str = "") -> Path:
    """-log10 of each statistic's adjusted p-value per batch, the alarm line at alpha, the
    shifted batches shaded and the alarmed ones marked, as a PNG."""
    series = record["series"]
    batches = [int(b) for b in series["batch"]]
    alpha = float(record["alpha"])
    floor = 1.0 / (int(record["permutations"]) + 1)
    fig, ax = plt.subplots(figsize=(8.4, 4.8), dpi=110)
    for b, shifted in zip(batches, series["shifted"], strict=True):
        if shifted:
            ax.axvspan(b - 0.5, b + 0.5, color="#f6d8b8", linewidth=0)
    for i, (name, values) in enumerate(series["adjusted_p"].items()):
        ax.plot(
            batches,
            [-math.log10(max(float(p), floor)) for p in values],
            linestyle=DASHES[i // 10 % len(DASHES)],
            linewidth=1.4,
            label=name,
        )
    top = -math.log10(floor)
    ax.axhline(-math.log10(alpha), color="black", linewidth=1, linestyle="--")
    alarmed = [b for b, a in zip(batches, series["alarm"], strict=True) if a]
    ax.plot(alarmed, [top * 1.04] * len(alarmed), "v", color="#c0392b", markersize=5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("batch of the stream (shaded: shifted)")
    ax.set_ylabel("-log10 adjusted p-value")
    ax.set_ylim(0, top * 1.1)
    shift = record.get("shift")
    head = title or f"Drift alarms (alpha={alpha:g} per batch; triangles: alarmed batches)"
    ax.set_title(
        head + (f"\nshift {shift} from batch {record.get('shift_start')}" if shift else "")
    )
    ax.grid(True, alpha=0.3)
    ax.legend(
        loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, fontsize="small", frameon=False
    )
    fig.tight_layout()
    return save_figure(fig, path)


def _pct(value: Any) -> str:
    """A share as a percentage (– when there is none)."""
    return f"{100 * float(value):.1f} %" if isinstance(value, (int, float)) else "–"


def drift_section_html(record: Mapping[str, Any], *, title: str = "Drift monitoring") -> str:
    """An HTML fragment for a stored drift record: settings, the alarm plot, and per statistic
    the share of batches alarmed without and with the shift."""
    ref, stream = record["reference"], record["stream"]
    shift = record.get("shift")
    options = [
        ("reference", f"{ref['data']} ({ref['split']}, {int(ref['points'])} points)"),
        ("stream", f"{stream['data']} ({stream['split']}, {int(stream['points'])} points)"),
        ("shift", f"{shift} from batch {record.get('shift_start')}" if shift else "none"),
        ("batches", f"{int(record['batches'])} of {int(record['batch_size'])}"),
        ("alpha", record["alpha"]),
        ("permutations", record["permutations"]),
    ]
    delay = record.get("delay_batches")
    parts = [
        f"<h2>{html.escape(title)}</h2>",
        "<p>Each batch of the stream is tested against the reference window (held-out inputs) "
        "by every statistic below, with a permutation p-value; "
        f"{html.escape(str(record.get('correction', '')))}. Without shift, the share of "
        f"batches alarmed is the measured false-alarm rate: {_pct(record['false_alarm_rate'])} "
        f"(stated: at most {_pct(record['alpha'])}). Shifted batches alarmed: "
        f"{_pct(record['detection_rate'])}"
        + (f"; first alarm {int(delay)} batches after the onset" if delay is not None else "")
        + ".</p>",
        parameter_table(options),
        embedded_png("drift alarms", drift_plot, record),
    ]
    rows = "".join(
        f"<tr><td class=l>{html.escape(name)}</td>"
        f"<td class=l>{html.escape(str(record['statistics'][name]['test']))}</td>"
        f"<td class=l>{html.escape(str(record['statistics'][name]['of']))}</td>"
        f"<td>{int(s['alarms'])}</td><td>{_pct(s['alarmed_clean'])}</td>"
        f"<td>{_pct(s['alarmed_shifted'])}</td></tr>"
        for name, s in record["per_statistic"].items()
    )
    parts.append(
        "<table><tr><th class=l>statistic</th><th class=l>test</th><th class=l>of</th>"
        "<th>alarms</th><th>without shift</th><th>shifted</th></tr>"
        f"{rows}<tr><td class=l>any</td><td class=l>min-P</td><td class=l></td>"
        f"<td>{int(record['alarmed'])}</td><td>{_pct(record['false_alarm_rate'])}</td>"
        f"<td>{_pct(record['detection_rate'])}</td></tr></table>"
    )
    return "\n".join(parts)

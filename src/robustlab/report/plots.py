"""Plots for reports: robustness curves (accuracy vs eps per model)."""

from __future__ import annotations

import base64
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def png_base64(draw: Callable[..., Path], data: Any, **kw: Any) -> str:
    """Draw ``draw(data, path, **kw)`` into a temporary PNG and return it base64-encoded."""
    with tempfile.TemporaryDirectory() as tmp:
        png = draw(data, Path(tmp) / "plot.png", **kw)
        return base64.b64encode(png.read_bytes()).decode()


def robustness_curve(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    title: str = "Robust accuracy vs perturbation budget",
    xlabel: str = "eps",
) -> Path:
    """Plot accuracy (in %) against eps, one line per model, and save it as a PNG."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    markers = "osD^v<>p"
    for i, (label, points) in enumerate(curves.items()):
        pts = sorted(points)
        ax.plot(
            [e for e, _ in pts],
            [100 * a for _, a in pts],
            marker=markers[i % len(markers)],
            label=label,
            linewidth=2,
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out

"""Plots for reports: robustness curves (accuracy vs eps per model)."""

from __future__ import annotations

import base64
import functools
import html
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ParamSpec

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from ..errors import RobustlabError  # noqa: E402
from ..version import __version__  # noqa: E402

PNG_SOFTWARE = f"robustlab {__version__}"  # the marker of a PNG robustlab drew
P = ParamSpec("P")


def plot(draw: Callable[P, Path]) -> Callable[P, Path]:
    """Every plotting function goes through this: text from users (labels, names) is shown as
    text (no mathtext, so '$' and '\\' are plain characters), and a failure to draw is one
    RobustlabError sentence."""

    @functools.wraps(draw)
    def drawn(*args: P.args, **kw: P.kwargs) -> Path:
        """The plot, drawn with plain text."""
        try:
            with plt.rc_context({"text.parse_math": False, "text.usetex": False}):
                return draw(*args, **kw)
        except RobustlabError:
            raise
        except Exception as exc:  # matplotlib raises many kinds; the plot is what failed
            plt.close("all")
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise RobustlabError(
                f"could not draw the {draw.__name__.replace('_', ' ')} plot "
                f"({type(exc).__name__}: {detail})"
            ) from None

    return drawn


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write a figure as a PNG marked as robustlab's (creating the folder) and close it."""
    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, metadata={"Software": PNG_SOFTWARE})
    finally:
        plt.close(fig)
    return out


def is_robustlab_png(path: Path) -> bool:
    """Whether a file is a PNG plot robustlab drew (its Software text chunk says so)."""
    try:
        with Image.open(path) as img:
            software = str(getattr(img, "text", {}).get("Software", ""))
    except (OSError, UnidentifiedImageError, ValueError):
        return False
    return software.startswith("robustlab")


def png_base64(draw: Callable[..., Path], data: Any, **kw: Any) -> str:
    """Draw ``draw(data, path, **kw)`` into a temporary PNG and return it base64-encoded."""
    with tempfile.TemporaryDirectory() as tmp:
        png = draw(data, Path(tmp) / "plot.png", **kw)
        return base64.b64encode(png.read_bytes()).decode()


def embedded_png(alt: str, draw: Callable[..., Path], data: Any, **kw: Any) -> str:
    """An <img> of the plot for an HTML report; if it cannot be drawn, a note saying why,
    so that a plot never stops a report (or a record) from being written."""
    try:
        b64 = png_base64(draw, data, **kw)
    except RobustlabError as exc:
        return f"<p class=muted>({html.escape(alt)} not shown: {html.escape(str(exc))})</p>"
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


#: Line styles and markers telling attack configurations apart (colours tell models apart).
DASHES = ("-", "--", ":", "-.")
MARKERS = "osD^v<>p"


@plot
def robustness_curve(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    title: str = "Robust accuracy vs perturbation budget",
    xlabel: str = "eps",
    styles: Mapping[str, tuple[int, int]] | None = None,
) -> Path:
    """Plot accuracy (in %) against eps, one line per entry of ``curves`` (its points sorted
    by eps), and save it as a PNG. ``styles``: per line, (colour, dash) indices, so that lines
    of one model share a colour and lines of one attack a dash; by default each line its own.
    The legend sits under the axes, where it hides no point."""
    entries = len(curves)
    columns = 1 if entries <= 3 else 2
    legend_rows = -(-entries // columns)
    fig, ax = plt.subplots(figsize=(8.4, 4.6 + 0.24 * legend_rows), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, points) in enumerate(curves.items()):
        colour, dash = (styles or {}).get(label, (i, 0))
        pts = sorted(points)
        ax.plot(
            [e for e, _ in pts],
            [100 * a for _, a in pts],
            color=colours[colour % len(colours)],
            linestyle=DASHES[dash % len(DASHES)],
            marker=MARKERS[(dash if styles else i) % len(MARKERS)],
            label=label,
            linewidth=2,
            markersize=6,
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_xlim(left=0)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if entries:
        ax.legend(
            loc="upper center",
            bbox_to_anchor=(0.5, -0.14),
            ncol=columns,
            fontsize="small",
            frameon=False,
        )
    fig.tight_layout()
    return save_figure(fig, path)

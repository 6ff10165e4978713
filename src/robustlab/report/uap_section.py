"""The universal perturbation: its image (as saved by ``robustlab uap``) and its report section.

Display scaling (the image file and the report): mid grey is 0, white is ``+m`` and black
``-m`` with ``m`` the largest ``|v_i|`` over every perturbation shown, i.e. the pixel value
``0.5 + v / (2 m)`` per channel (RGB for three channels). The scale is printed in the title.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .attack_table import parameter_table  # noqa: E402
from .plots import embedded_png, plot, save_figure  # noqa: E402


def display_scaled(v: np.ndarray) -> tuple[np.ndarray, float]:
    """Perturbations (K, C, H, W) as images (K, H, W, C) in [0,1]: 0.5 + v / (2 m), with
    m = max |v| (returned; 1 where v is all zero)."""
    m = float(np.abs(v).max()) if v.size else 0.0
    scale = m if m > 0 else 1.0
    return np.transpose(0.5 + v / (2 * scale), (0, 2, 3, 1)).clip(0.0, 1.0), m


@plot
def uap_image(
    v: np.ndarray | Sequence[Any],
    path: str | Path,
    *,
    title: str = "Universal perturbation",
    names: Sequence[str] = (),
) -> Path:
    """The perturbation (C, H, W), or one per class (K, C, H, W) side by side, as a PNG."""
    arr = np.asarray(v, dtype=np.float32)
    arr = arr[None] if arr.ndim == 3 else arr
    images, m = display_scaled(arr)
    k = len(images)
    cols = min(k, 5)
    rows = (k + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols + 0.4, 2.2 * rows + 0.7), dpi=110)
    flat = np.atleast_1d(axes).ravel()
    for i, ax in enumerate(flat):
        ax.axis("off")
        if i < k:
            img = images[i]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            if k > 1:
                ax.set_title(names[i] if i < len(names) else f"class {i}", fontsize="small")
    fig.suptitle(f"{title}\ngrey 0, white +{m:.3g}, black -{m:.3g}", fontsize="small")
    fig.tight_layout()
    return save_figure(fig, path)


def _pct(value: Any) -> str:
    """A rate as a percentage (– when missing)."""
    return f"{100 * float(value):.1f} %" if isinstance(value, (int, float)) else "–"


def uap_section_html(record: Mapping[str, Any], *, title: str = "Universal perturbation") -> str:
    """An HTML fragment for a stored uap record: the perturbation's image and its numbers."""
    attack = record["attack"]
    tm = record["threat_model"]
    per_class = bool(record.get("per_class"))
    norms = record["norm_of_v"]
    norm_text = f"{min(norms):.4g} - {max(norms):.4g}" if per_class else f"{float(norms):.4g}"
    options = [
        ("method", attack["method"]),
        ("norm", tm["norm"]),
        ("eps", tm["eps"]),
        *((k, v) for k, v in attack.items() if k not in ("name", "norm", "xi", "method", "eps")),
    ]
    parts = [
        f"<h2>{html.escape(title)}</h2>",
        f"<p>{'Class-universal perturbations' if per_class else 'A universal perturbation'} "
        f"by the {html.escape(str(attack['method']))} method (configuration below), "
        f"{html.escape(str(tm['norm']))} eps={html.escape(str(tm['eps']))}, on "
        f"{html.escape(str(record.get('data', '')))}: crafted on {int(record['n_craft'])} "
        f"training points, measured on {int(record['n_eval'])} held-out test points. Fooling "
        "rate: the prediction on clip(x + v) differs from the prediction on x (the model's "
        "own, not the label); accuracy: predictions against the labels. Random: noise of the "
        "same norm (linf random signs, l2 a Gaussian direction) on the same points.</p>",
        parameter_table(options),
        embedded_png(
            "universal perturbation",
            uap_image,
            np.asarray(record["perturbation"], dtype=np.float32),
            title=f"{tm['norm']} eps={tm['eps']}",
        ),
    ]
    head = (
        "<tr><th>fooling rate</th><th>random noise</th><th>clean acc.</th>"
        "<th>perturbed acc.</th><th>norm of v</th><th>passes</th><th>time</th></tr>"
    )
    row = (
        f"<tr><td>{_pct(record['fooling_rate'])}</td><td>{_pct(record['random_fooling_rate'])}"
        f"</td><td>{_pct(record['clean_accuracy'])}</td>"
        f"<td>{_pct(record['perturbed_accuracy'])}</td><td>{html.escape(norm_text)}</td>"
        f"<td>{int(record['passes'])}</td><td>{float(record['seconds']):.1f} s</td></tr>"
    )
    parts.append(f"<table>{head}{row}</table>")
    if per_class:
        cells = "".join(
            f"<tr><td class=l>{c}</td><td>{int(s['n'])}</td><td>{_pct(s['fooling_rate'])}</td>"
            f"<td>{_pct(s['perturbed_accuracy'])}</td></tr>"
            for c, s in enumerate(record["classes"])
        )
        parts.append(
            "<table><tr><th class=l>class</th><th>points</th><th>fooling rate</th>"
            f"<th>perturbed acc.</th></tr>{cells}</table>"
        )
    return "\n".join(parts)

"""The HTML report: rendered from the results store, never from in-memory state."""

from __future__ import annotations

import html
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..io import atomic_write_text
from ..store import ResultStore
from ..version import __version__
from .compress_section import compress_section_html
from .exit_plots import sloth_section_html
from .msa_section import msa_section_html
from .plots import embedded_png, robustness_curve
from .transfer_plots import transfer_section_html
from .uap_section import uap_section_html

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:960px;margin:2em auto;
padding:0 1em;color:#1d2430;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #dde;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em} th,td{border:1px solid #ccd;padding:.3em .6em;text-align:right}
th{background:#f1f3f8} td.l,th.l{text-align:left} .muted{color:#667;font-size:.9em}
img{max-width:100%;border:1px solid #eee}
"""


GENERATOR = b'<meta name=generator content="robustlab'  # the marker of a report we wrote
LEGACY_HEAD = b"<!doctype html><html lang=en><head><meta charset=utf-8><title>"


def is_robustlab_report(path: Path) -> bool:
    """Whether a file is an HTML report robustlab wrote (its generator tag, or the exact head
    and style sheet of the reports written before the tag)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    if GENERATOR in head:
        return True
    return head.startswith(LEGACY_HEAD) and f"</title><style>{CSS}</style>".encode() in head


def _pct(v: Any) -> str:
    return f"{100 * float(v):.1f} %" if isinstance(v, (int, float)) else "–"


def _curves(evals: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Per model label: (eps, robust accuracy) points; the latest record wins per eps."""
    latest: dict[str, dict[float, float]] = defaultdict(dict)
    for r in evals:
        eps = float(r["threat_model"]["eps"])
        latest[r.get("label") or "model"][eps] = float(r["robust_accuracy"])
    return {label: sorted(points.items()) for label, points in latest.items()}


def _models_table(trains: list[dict[str, Any]]) -> str:
    rows = []
    for r in trains:
        t = r.get("training", {})
        rows.append(
            "<tr>"
            f"<td class=l>{html.escape(str(r.get('label')))}</td>"
            f"<td class=l>{html.escape(str(r.get('model', {}).get('arch', '')))}</td>"
            f"<td class=l>{html.escape(str(t.get('method', '')))}</td>"
            f"<td>{html.escape(str(t.get('eps') if t.get('eps') is not None else '–'))}</td>"
            f"<td>{html.escape(str(t.get('epochs', '')))}</td>"
            f"<td>{_pct(r.get('metrics', {}).get('clean_accuracy'))}"
            f" <span class=muted>({r.get('metrics', {}).get('test_samples', '?')} pts)</span></td>"
            f"<td>{float(r.get('train_time_s', 0)):.0f} s</td>"
            f"<td class=l><code>{html.escape(str(r.get('weights', {}).get('sha256', ''))[:12])}</code></td>"
            "</tr>"
        )
    head = (
        "<tr><th class=l>model</th><th class=l>architecture</th><th class=l>training</th>"
        "<th>eps</th><th>epochs</th><th>clean test acc.</th><th>training time</th>"
        "<th class=l>weights sha256</th></tr>"
    )
    return f"<table>{head}{''.join(rows)}</table>"


def _eval_table(evals: list[dict[str, Any]]) -> str:
    curves = _curves(evals)
    eps_all = sorted({e for pts in curves.values() for e, _ in pts})
    head = "<tr><th class=l>model</th>" + "".join(f"<th>eps {e:g}</th>" for e in eps_all) + "</tr>"
    body = []
    for label, pts in curves.items():
        got = dict(pts)
        cells = "".join(f"<td>{_pct(got.get(e))}</td>" for e in eps_all)
        body.append(f"<tr><td class=l>{html.escape(label)}</td>{cells}</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _attack_note(evals: list[dict[str, Any]]) -> str:
    if not evals:
        return ""
    per_eps = ("eps", "alpha")  # these change along a curve by design
    configs = {
        str(sorted((k, str(v)) for k, v in r["attack"].items() if k not in per_eps)) for r in evals
    }
    a = evals[-1]["attack"]
    desc = ", ".join(f"{k}={v}" for k, v in a.items() if k not in per_eps)
    more = "" if len(configs) == 1 else f" ({len(configs)} different attack configurations)"
    steps = {
        f"{float(r['attack']['alpha']) / float(r['attack']['eps']):.3g}·eps"
        for r in evals
        if r["attack"].get("alpha") and r["attack"].get("eps")
    }
    step_note = f"; step size {', '.join(sorted(steps))}" if steps else ""
    n = evals[-1].get("n")
    return (
        f"<p class=muted>Attack: {html.escape(desc)}{more}{step_note}; "
        f"{n} test points; a point is robust only if classified correctly clean and under attack, "
        "and a point broken at a smaller eps counts as broken at every larger one.</p>"
    )


def _timing_table(timings: list[dict[str, Any]]) -> str:
    if not timings:
        return ""
    rows = "".join(
        f"<tr><td class=l>{html.escape(str(t.get('step')))}</td><td>{float(t.get('seconds', 0)):.1f} s</td></tr>"
        for t in timings
    )
    return f"<h2>Time per step</h2><table><tr><th class=l>step</th><th>time</th></tr>{rows}</table>"


def _title(record: dict[str, Any], heading: str, default_label: str) -> str:
    """A stored record's section heading, with its store label unless that is the default."""
    label = record.get("label")
    return f"{heading}: {label}" if label and label != default_label else heading


def _evals_section(evals: list[dict[str, Any]]) -> str:
    """The robustness curve, its table and the attack note of the stored evaluations."""
    return "\n".join(
        [
            "<h2>Robustness curve</h2>",
            embedded_png(
                "accuracy vs eps",
                robustness_curve,
                _curves(evals),
                xlabel=f"{evals[-1]['threat_model']['norm']} eps",
            ),
            _eval_table(evals),
            _attack_note(evals),
        ]
    )


def _models_section(trains: list[dict[str, Any]]) -> str:
    """The table of trained models."""
    return "<h2>Models</h2>" + _models_table(trains)


def _section(kind: str, render: Callable[..., str], *args: Any, **kw: Any) -> str:
    """A section of the report; a stored record it cannot read gives a note, not a crash."""
    try:
        return render(*args, **kw)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        return (
            f"<p class=muted>(stored {html.escape(kind)} records that could not be shown: "
            f"{html.escape(type(exc).__name__)} {html.escape(str(exc)[:200])})</p>"
        )


def render_report(
    store: ResultStore, out: str | Path, *, title: str = "robustlab report", intro: str = ""
) -> Path:
    """Write a self-contained HTML report (plots embedded) of everything in the store."""
    evals = store.records(kind="eval")
    trains = store.records(kind="train")
    timings = store.records(kind="timing")
    transfers = store.records(kind="transfer")
    sloths = store.records(kind="sloth")
    uaps = store.records(kind="uap")
    out_path = Path(out)
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if intro:
        parts.append(f"<p>{html.escape(intro)}</p>")
    data_names = sorted({str(r.get("data")) for r in evals + transfers + sloths})
    if data_names:
        parts.append(f"<p class=muted>data: {html.escape(', '.join(data_names))}</p>")
    if trains:
        parts.append(_section("train", _models_section, trains))
    if evals:
        parts.append(_section("eval", _evals_section, evals))
    if msas := store.records(kind="msa"):
        parts.append(_section("msa", msa_section_html, msas))
    for record in transfers:
        title = _title(record, "Transfer matrix", "transfer")
        parts.append(_section("transfer", transfer_section_html, record, title=title))
    for record in sloths:
        title = _title(record, "DeepSloth", "sloth")
        parts.append(_section("sloth", sloth_section_html, record, title=title))
    for record in store.records(kind="compress"):
        title = _title(record, "Compressibility", "")
        parts.append(_section("compress", compress_section_html, record, title=title))
    parts += [
        _section("uap", uap_section_html, r, title=_title(r, "Universal perturbation", "uap"))
        for r in uaps
    ]
    parts.append(_section("timing", _timing_table, timings))
    doc = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f'<meta name=generator content="robustlab {__version__}">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>\n"
    )
    atomic_write_text(out_path, doc)
    return out_path

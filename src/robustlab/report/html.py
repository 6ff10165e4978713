"""The HTML report: rendered from the results store, never from in-memory state."""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..io import atomic_write_text
from ..store import ResultStore
from ..version import __version__
from .attack_table import attacks_section_html
from .compress_section import compress_section_html
from .curves import curves_section_html
from .detect_section import detect_section_html
from .drift_section import drift_section_html
from .entries import (
    Entry,
    dataset_name,
    entry_names,
    model_key,
    read_entries,
    unread_note,
)
from .exit_plots import sloth_section_html
from .leaderboard import SORT_JS, leaderboard_section_html
from .msa_section import msa_section_html
from .scan_section import scan_section_html
from .transfer_plots import transfer_section_html
from .uap_section import uap_section_html

#: The style sheet of the reports written before the generator tag (how they are recognised).
LEGACY_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:960px;margin:2em auto;
padding:0 1em;color:#1d2430;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #dde;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em} th,td{border:1px solid #ccd;padding:.3em .6em;text-align:right}
th{background:#f1f3f8} td.l,th.l{text-align:left} .muted{color:#667;font-size:.9em}
img{max-width:100%;border:1px solid #eee}
"""
CSS = (
    LEGACY_CSS
    + """h3{font-size:1.02em;margin:1.2em 0 .2em} .meta{color:#445;margin:.2em 0}
nav{font-size:.92em;margin:.6em 0 1em} nav a{color:#2a55a8;text-decoration:none;margin-right:.9em}
tr.ub td{color:#667;font-style:italic} tr.group td{background:#f7f7fa;color:#445;font-size:.9em}
.nw,td:not(.l){white-space:nowrap} .tag{white-space:nowrap;font-size:.78em;background:#e3ecfb;color:#234;border-radius:3px;padding:0 .35em}
table.js th{cursor:pointer;user-select:none} table.js th:hover{background:#e4e8f2}
th[aria-sort=ascending]::after{content:" \\25B2";font-size:.7em}
th[aria-sort=descending]::after{content:" \\25BC";font-size:.7em}
"""
)


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
    return head.startswith(LEGACY_HEAD) and f"</title><style>{LEGACY_CSS}</style>".encode() in head


def _pct(v: Any) -> str:
    """A fraction as a percentage ('–' when missing)."""
    return f"{100 * float(v):.1f} %" if isinstance(v, (int, float)) else "–"


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
            f"<td>{float(r.get('train_time_s', 0)):.3g} s</td>"
            f"<td class=l><code>{html.escape(str(r.get('weights', {}).get('sha256', ''))[:12])}</code></td>"
            "</tr>"
        )
    head = (
        "<tr><th class=l>model</th><th class=l>architecture</th><th class=l>training</th>"
        "<th>eps</th><th>epochs</th><th>clean test acc.</th><th>training time</th>"
        "<th class=l>weights sha256</th></tr>"
    )
    return f"<table>{head}{''.join(rows)}</table>"


def _timing_table(timings: list[dict[str, Any]]) -> str:
    if not timings:
        return ""
    rows = "".join(
        f"<tr><td class=l>{html.escape(str(t.get('step')))}</td><td>{float(t.get('seconds', 0)):.1f} s</td></tr>"
        for t in timings
    )
    return f"<h2>Time per step</h2><table><tr><th class=l>step</th><th>time</th></tr>{rows}</table>"


Section = tuple[str, str, str]  # (anchor, title in the contents, HTML)


#: The records shown one section each, in the report's order: kind -> (heading, the store
#: label that goes unsaid, renderer).
PER_RECORD: dict[str, tuple[str, str, Callable[..., str]]] = {
    "transfer": ("Transfer matrix", "transfer", transfer_section_html),
    "sloth": ("DeepSloth", "sloth", sloth_section_html),
    "compress": ("Compressibility", "", compress_section_html),
    "uap": ("Universal perturbation", "uap", uap_section_html),
    "detect": ("Adversarial-input detectors", "detect", detect_section_html),
    "drift": ("Drift monitoring", "drift", drift_section_html),
    "scan": ("Backdoor scan", "scan", scan_section_html),
}


def _title(record: dict[str, Any], heading: str, default_label: str, known: dict[str, str]) -> str:
    """A stored record's section heading, with its store label unless that is the default,
    else with the name its model has in the rest of the report (``known``: by weights hash)."""
    label = record.get("label")
    if label and label != default_label:
        return f"{heading}: {label}"
    model = record.get("model")
    name = known.get(str(model.get("sha256") or "")) if isinstance(model, dict) else None
    return f"{heading}: {name}" if name else heading


def _known_models(entries: list[Entry], trains: list[dict[str, Any]]) -> dict[str, str]:
    """Weights hash -> the model's name in the report (from evaluations, else training)."""
    known = {
        str((r.get("weights") or {}).get("sha256") or ""): str(r.get("label") or "") for r in trains
    }
    names = entry_names(entries)
    known.update({e.sha: names[e.model] for e in entries if e.sha and not e.variant})
    known.pop("", None)
    return known


def _leaderboard(entries: list[Entry], trains: list[dict[str, Any]]) -> list[Section]:
    """The leaderboard of the stored evaluations."""
    return [("leaderboard", "Leaderboard", leaderboard_section_html(entries, trains))]


def _curves(entries: list[Entry]) -> list[Section]:
    """The robustness curves of the stored evaluations and the attacks they ran."""
    return [
        ("curves", "Robustness curves", curves_section_html(entries)),
        ("attacks", "Attack configurations", attacks_section_html(entries)),
    ]


def _models(trains: list[dict[str, Any]]) -> list[Section]:
    """The section of trained models."""
    return [("models", "Models", "<h2>Models</h2>" + _models_table(trains))]


def _one(
    anchor: str, heading: str, render: Callable[..., str], *args: Any, **kw: Any
) -> list[Section]:
    """A section drawn by one of the section modules."""
    return [(anchor, heading, render(*args, **kw))]


def _section(
    kind: str, build: Callable[..., list[Section]], *args: Any, **kw: Any
) -> list[Section]:
    """Sections of the report; stored records they cannot read give a note, not a crash."""
    try:
        return build(*args, **kw)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        note = (
            f"<p class=muted>(stored {html.escape(kind)} records that could not be shown: "
            f"{html.escape(type(exc).__name__)} {html.escape(str(exc)[:200])})</p>"
        )
        return [(f"unread-{kind}", f"Unread {kind} records", note)]


def _datasets(measured: list[dict[str, Any]], trains: list[dict[str, Any]]) -> list[str]:
    """Every dataset the stored records name, each once (splits dropped)."""
    names = {dataset_name(r["data"]) for r in measured if r.get("data")}
    for r in trains:
        data = (r.get("training") or {}).get("data") or (r.get("dataset") or {}).get("name")
        if data:
            names.add(dataset_name(data))
    return sorted(names)


def _header(
    title: str,
    intro: str,
    datasets: list[str],
    entries: list[Entry],
    trains: list[dict[str, Any]],
    sections: list[Section],
) -> str:
    """The title, the introduction, one line of what the store holds (each dataset named
    once) and the contents."""
    models = {e.model for e in entries} | {
        model_key(str(r.get("label") or "model"), str((r.get("weights") or {}).get("sha256") or ""))
        for r in trains
    }
    facts = []
    if models:
        facts.append(f"{len(models)} model{'s' if len(models) != 1 else ''}")
    if entries:
        graded = sum(1 for e in entries if e.attack.grade)
        by = f"{graded} by AutoAttack or MSA" if graded else "none by AutoAttack or MSA"
        facts.append(f"{len(entries)} robust-accuracy evaluations ({by})")
    dates = sorted(e.date for e in entries if e.date)
    if dates:
        facts.append(dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}")
    facts.append(f"robustlab {__version__}")
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if intro:
        parts.append(f"<p>{html.escape(intro)}</p>")
    if datasets:
        parts.append(f"<p class=muted>data: {html.escape(', '.join(datasets))}</p>")
    parts.append(f"<p class=meta>{html.escape(' · '.join(facts))}</p>")
    if len(sections) > 1:
        links = "".join(f"<a href='#{a}'>{html.escape(t)}</a>" for a, t, _ in sections)
        parts.append(f"<nav>{links}</nav>")
    return "\n".join(parts)


def render_report(
    store: ResultStore, out: str | Path, *, title: str = "robustlab report", intro: str = ""
) -> Path:
    """Write a self-contained HTML report (plots and script embedded, nothing fetched) of
    everything in the store."""
    evals = store.records(kind="eval")
    trains = store.records(kind="train")
    timings = store.records(kind="timing")
    msas = store.records(kind="msa")
    entries, failed = read_entries(evals + msas)
    known = _known_models(entries, trains)
    sections: list[Section] = []
    if entries:
        sections += _section("eval", _leaderboard, entries, trains)
    if trains:
        sections += _section("train", _models, trains)
    if entries:
        sections += _section("eval", _curves, entries)
    if failed:
        sections.append(("unread", "Unread records", unread_note("eval", failed)))
    if msas:
        sections += _section("msa", _one, "msa", "MSA", msa_section_html, msas)
    per_record = [(kind, store.records(kind=kind)) for kind in PER_RECORD]
    for kind, records in per_record:
        word, anchor, render = PER_RECORD[kind]
        for i, record in enumerate(records):
            heading = _title(record, word, anchor, known)
            sections += _section(kind, _one, f"{kind}-{i}", heading, render, record, title=heading)
    if timings:
        sections += _section("timing", _one, "timing", "Time per step", _timing_table, timings)
    measured = evals + msas + [r for _, records in per_record for r in records]
    header = _header(title, intro, _datasets(measured, trains), entries, trains, sections)
    body = "\n".join(f"<section id={a}>\n{h}\n</section>" for a, _, h in sections)
    script = f"<script>{SORT_JS}</script>" if "class=sortable" in body else ""
    doc = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f'<meta name=generator content="robustlab {__version__}">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        + header
        + "\n"
        + body
        + script
        + "</body></html>\n"
    )
    atomic_write_text(Path(out), doc)
    return Path(out)

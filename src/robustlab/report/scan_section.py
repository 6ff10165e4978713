"""The report section of a stored scan record: what each method flagged, the classes it
suspects, precision and recall against a poison manifest when there was one, and the
per-class scores the decisions were made on."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

LABELS = {
    "activation_clustering": "activation clustering",
    "spectral_signatures": "spectral signatures",
}


def _pct(v: Any) -> str:
    """A fraction as a percentage with one decimal ('–' when missing)."""
    return f"{100 * float(v):.1f} %" if isinstance(v, (int, float)) else "–"


def _num(v: Any, digits: int = 3) -> str:
    """A number with a few significant digits ('–' when missing)."""
    return f"{float(v):.{digits}g}" if isinstance(v, (int, float)) else "–"


def _classes(values: Any) -> str:
    """A list of classes as text ('none' when empty)."""
    return ", ".join(str(c) for c in values) if values else "none"


def _summary(record: Mapping[str, Any]) -> str:
    """One row per method and one for their union: flagged, suspected classes, detection."""
    detection = record.get("detection") or {}
    scored = bool(detection)
    head = "<tr><th class=l>method</th><th>flagged</th><th class=l>suspected target class(es)</th>"
    if scored:
        head += "<th>precision</th><th>recall</th>"
    head += "</tr>"
    rows = []
    entries = [
        (LABELS.get(name, name), m["flagged_count"], m["suspected_classes"], detection.get(name))
        for name, m in record["methods"].items()
    ]
    entries.append(
        (
            "union (flagged)",
            record["flagged_count"],
            record["suspected_classes"],
            detection.get("union"),
        )
    )
    for label, count, classes, d in entries:
        row = (
            f"<tr><td class=l>{html.escape(label)}</td><td>{int(count)}</td>"
            f"<td class=l>{html.escape(_classes(classes))}</td>"
        )
        if scored:
            row += f"<td>{_pct((d or {}).get('precision'))}</td><td>{_pct((d or {}).get('recall'))}</td>"
        rows.append(row + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _per_class(record: Mapping[str, Any]) -> str:
    """The per-class scores of both methods side by side."""
    methods = record["methods"]
    ac = {r["class"]: r for r in (methods.get("activation_clustering") or {}).get("classes", [])}
    ss = {r["class"]: r for r in (methods.get("spectral_signatures") or {}).get("classes", [])}
    head = "<tr><th class=l>class</th><th>samples</th>"
    if ac:
        head += "<th>AC smaller cluster</th><th>its label agreement</th><th>silhouette</th><th>AC flagged</th>"
    if ss:
        head += "<th>SS top-score agreement</th><th>robust z</th><th>SS flagged</th>"
    head += "</tr>"
    rows = []
    for c in sorted(set(ac) | set(ss)):
        a, s = ac.get(c, {}), ss.get(c, {})
        n = a.get("n", s.get("n"))
        row = f"<tr><td class=l>{c}</td><td>{_num(n, 6)}</td>"
        if ac:
            row += (
                f"<td>{_pct(a.get('smaller_share'))}</td><td>{_num(a.get('agreement'), 2)}</td>"
                f"<td>{_num(a.get('silhouette'), 2)}</td><td>{_num(a.get('flagged'), 6)}</td>"
            )
        if ss:
            row += (
                f"<td>{_num(s.get('top_agreement'), 2)}</td><td>{_num(s.get('z'), 2)}</td>"
                f"<td>{_num(s.get('flagged'), 6)}</td>"
            )
        rows.append(row + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def scan_section_html(record: Mapping[str, Any], *, title: str = "Backdoor scan") -> str:
    """An HTML fragment for a stored scan record."""
    settings = record.get("settings") or {}
    poison = record.get("poison")
    truth = (
        f" The data carries a poison manifest ({int(record['poisoned_count'])} poisoned samples, "
        f"target class {html.escape(str(poison.get('target')))}, source "
        f"{html.escape(str(poison.get('source')))}, {html.escape(str(poison.get('trigger')))} "
        "trigger): precision and recall are against it."
        if isinstance(poison, Mapping) and "poisoned_count" in record
        else " No poison manifest: precision and recall were not measured."
    )
    parts = [
        f"<h2>{html.escape(title)}</h2>",
        f"<p>The {int(record['train_size'])} training samples of "
        f"{html.escape(str(record.get('data', '')))}, scanned with the model trained on them. "
        "Activation clustering (Chen et al. 2018): per class, penultimate features reduced to "
        f"{html.escape(str(settings.get('dims', 10)))} dimensions, 2-means; the smaller cluster "
        f"is flagged when it holds under {_pct(settings.get('max_share'))} of its class and its "
        f"label agreement (the share of its samples' {html.escape(str(settings.get('neighbours', 10)))} "
        f"nearest other training samples in input space, the cluster left out, that carry its "
        f"label) is under {_num(settings.get('min_agreement'), 2)}. Spectral signatures (Tran et "
        "al. 2018): per class, squared projections of the centred features on the top singular "
        "vector; only a suspect class (the label agreement of its highest scores below that "
        f"bar and a robust z-score under -{_num(settings.get('z_suspect'), 2)} among the "
        f"classes) loses its 1.5 x {_pct(settings.get('expected_rate'))} x n highest scores."
        f"{truth}</p>",
        _summary(record),
        _per_class(record),
    ]
    return "\n".join(parts)

"""The report section of a stored ``robustlab detect eval`` record: per detector, the attacks
that ignore it beside the adaptive attack on classifier + detector."""

from __future__ import annotations

import html
from typing import Any


def _pct(v: Any) -> str:
    """A fraction as a percentage with one decimal ('–' when missing)."""
    return f"{100 * float(v):.1f} %" if isinstance(v, (int, float)) else "–"


def _auc(v: Any) -> str:
    """An AUROC with three decimals ('–' when missing)."""
    return f"{float(v):.3f}" if isinstance(v, (int, float)) else "–"


def _side_by_side(record: dict[str, Any]) -> str:
    """Per detector: the strongest non-adaptive attack and the adaptive one, side by side."""
    head = (
        "<tr><th class=l rowspan=2>detector</th><th rowspan=2>threshold</th>"
        "<th rowspan=2>clean FPR (test)</th><th colspan=4>attack ignoring the detector "
        "(strongest)</th><th colspan=3>adaptive attack</th>"
        "<th rowspan=2>system robust acc., every attack (per input)</th></tr>"
        "<tr><th class=l>attack</th><th>AUROC</th><th>TPR</th><th>system robust acc.</th>"
        "<th>AUROC</th><th>TPR</th><th>system robust acc.</th></tr>"
    )
    rows = []
    detectors = record.get("detectors", {})
    for name, both in record["side_by_side"].items():
        a, b = both.get("non_adaptive") or {}, both.get("adaptive") or {}
        d = detectors.get(name, {})
        rows.append(
            "<tr>"
            f"<td class=l>{html.escape(name)}</td>"
            f"<td>{float(d['threshold']):.4g}</td><td>{_pct(d.get('fpr_clean_test'))}</td>"
            f"<td class=l>{html.escape(str(a.get('attack', '–')))}</td>"
            f"<td>{_auc(a.get('auroc'))}</td><td>{_pct(a.get('tpr_at_threshold'))}</td>"
            f"<td><b>{_pct(a.get('system_robust_accuracy'))}</b></td>"
            f"<td>{_auc(b.get('auroc'))}</td><td>{_pct(b.get('tpr_at_threshold'))}</td>"
            f"<td><b>{_pct(b.get('system_robust_accuracy'))}</b></td>"
            f"<td>{_pct(both.get('system_robust_accuracy_all_attacks'))}</td>"
            "</tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _details(record: dict[str, Any]) -> str:
    """Every detector against every attack."""
    head = (
        "<tr><th class=l>detector</th><th class=l>attack</th><th>AUROC</th><th>TPR</th>"
        "<th>successful examples</th><th>robust acc. (model)</th>"
        "<th>system robust acc.</th></tr>"
    )
    rows = [
        "<tr>"
        f"<td class=l>{html.escape(str(r['detector']))}</td>"
        f"<td class=l>{html.escape(str(r['attack']))}</td>"
        f"<td>{_auc(r.get('auroc'))}</td><td>{_pct(r.get('tpr_at_threshold'))}</td>"
        f"<td>{int(r['successful'])}</td><td>{_pct(r.get('robust_accuracy'))}</td>"
        f"<td>{_pct(r.get('system_robust_accuracy'))}</td>"
        "</tr>"
        for r in record["results"]
    ]
    return f"<table>{head}{''.join(rows)}</table>"


def detect_section_html(
    record: dict[str, Any], *, title: str = "Adversarial-input detectors"
) -> str:
    """The section of one detection evaluation."""
    tm = record.get("threat_model") or {}
    n = int(record["n"])
    meta = (
        f"{html.escape(str(record.get('data', '')))}, {n} test points, "
        f"{html.escape(str(tm.get('norm', '')))} eps {float(tm.get('eps', 0)):g}; clean accuracy "
        f"{_pct(record.get('clean_accuracy'))}"
    )
    adaptive = record.get("adaptive")
    if adaptive:
        cfg = adaptive.get("attack", {})
        budget = (
            f"<p class=muted>Adaptive attack: {int(cfg.get('steps', 0))} gradient steps of size "
            f"{float(cfg.get('alpha') or 0):.4g} from a random start, on "
            f"{html.escape(str(adaptive.get('objective', '')))}; "
            f"{html.escape(str(adaptive.get('keeps', '')))}. Gradients: "
            + "; ".join(
                f"{html.escape(str(p['detector']))}: {html.escape(str(p['gradient']))}"
                for p in adaptive.get("per_detector", [])
            )
            + ".</p>"
        )
    else:
        budget = "<p class=muted>No adaptive attack was run: the numbers below flatter the detectors.</p>"
    note = (
        "<p class=muted>TPR: share of successful adversarial examples (points classified "
        "correctly clean, misclassified under attack) flagged at the threshold fitted for a 5 % "
        "false-positive rate on clean held-out data. System robust accuracy: share of the "
        "attacked points classified correctly or flagged. An attack that ignores the detector "
        "says little of what it is worth: the adaptive column is what an attacker who knows "
        "it achieves (Carlini & Wagner 2017; Tramer et al. 2020).</p>"
    )
    return (
        f"<h2>{html.escape(title)}</h2><p class=meta>{meta}</p>{_side_by_side(record)}{budget}"
        f"{note}<h3>Every attack</h3>{_details(record)}"
    )

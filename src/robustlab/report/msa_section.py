"""The report section of stored MSA records: plain AutoAttack beside MSA, stage by stage."""

from __future__ import annotations

import html
from typing import Any


def _pct(v: Any) -> str:
    """A fraction as a percentage with one decimal ('–' when missing)."""
    return f"{100 * float(v):.1f} %" if isinstance(v, (int, float)) else "–"


def _stages(record: dict[str, Any]) -> str:
    """'plain 88.0 % → fc 85.0 % (broke 3) → ...' for one record."""
    parts = [
        f"{html.escape(str(s['stage']))} {_pct(s['robust_accuracy_after'])} "
        f"<span class=muted>(broke {int(s['broken'])}, {float(s['seconds']):.0f} s)</span>"
        for s in record.get("stages", [])
    ]
    return " → ".join(parts)


def msa_section_html(records: list[dict[str, Any]]) -> str:
    """The table of MSA evaluations: clean, plain AutoAttack, MSA and every stage."""
    head = (
        "<tr><th class=l>model</th><th>eps</th><th>points</th><th>eval. batch</th>"
        "<th>clean</th><th>plain AutoAttack</th><th>MSA</th><th class=l>stages</th></tr>"
    )
    rows = []
    for r in records:
        tm = r["threat_model"]
        rows.append(
            "<tr>"
            f"<td class=l>{html.escape(str(r.get('label') or 'model'))}</td>"
            f"<td>{html.escape(str(tm['norm']))} {float(tm['eps']):g}</td>"
            f"<td>{int(r['n'])}</td><td>{html.escape(str(r.get('batch_size')))}</td>"
            f"<td>{_pct(r['clean_accuracy'])}</td>"
            f"<td>{_pct(r['plain_robust_accuracy'])}</td>"
            f"<td><b>{_pct(r['robust_accuracy'])}</b></td>"
            f"<td class=l>{_stages(r)}</td>"
            "</tr>"
        )
    note = (
        "<p class=muted>MSA (Mixed Surrogate Attack): AutoAttack on the defended forward "
        "(plain), then its gradient members on each surrogate in turn, every example judged "
        "by the defended forward on its whole evaluation batch; a point is robust only if it "
        "survives every stage. The gap between plain AutoAttack and MSA is how much the "
        "defence's own gradients would have flattered it.</p>"
    )
    return f"<h2>Defended models under MSA</h2><table>{head}{''.join(rows)}</table>{note}"

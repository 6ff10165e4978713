"""The leaderboard, RobustBench style: per threat model (dataset, norm, eps), the models ranked
by AutoAttack (or MSA) robust accuracy with their clean accuracy; models measured only by a
weaker attack follow, marked as upper bounds. Sortable by clicking a header (inline script;
without it the table is already ranked)."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .attack_spec import AttackSpec, attack_labels
from .entries import Entry, ModelKey, entry_names, format_eps, norm_eps, threat_order

Threat = tuple[str, str, float]  # (dataset, norm, eps)


@dataclass
class Board:
    """One threat model's leaderboard: graded rows ranked, then upper-bound rows."""

    threat: Threat
    ranked: list[Entry] = field(default_factory=list)  # AutoAttack / MSA, best first
    upper: list[Entry] = field(default_factory=list)  # weaker attacks only, best first


def _rank_key(e: Entry) -> tuple[float, float, str]:
    """Higher robust accuracy first, then higher clean accuracy, then by name."""
    return (-e.robust, -(e.clean if e.clean is not None else -1.0), e.label)


def leaderboards(entries: Sequence[Entry]) -> tuple[list[Board], list[Threat]]:
    """The boards of the threat models with at least one leaderboard-grade evaluation, and the
    threat models evaluated by weaker attacks only.

    Per model, the graded row is its graded evaluation on the most points (then the lowest
    robust accuracy: the strongest); an ungraded model shows its lowest robust accuracy under
    any attack (the tightest upper bound)."""
    by_threat: dict[Threat, dict[ModelKey, list[Entry]]] = {}
    for e in entries:
        if e.eps <= 0:  # clean accuracy: no threat model to rank under
            continue
        by_threat.setdefault((e.data, e.norm, e.eps), {}).setdefault(e.model, []).append(e)
    boards, weaker_only = [], []
    for threat in sorted(by_threat, key=lambda t: threat_order(*t)):
        board = Board(threat)
        for found in by_threat[threat].values():
            graded = [e for e in found if e.attack.grade]
            if graded:
                board.ranked.append(max(graded, key=lambda e: (e.n or 0, -e.robust, e.created)))
            else:
                board.upper.append(min(found, key=lambda e: (e.robust, -(e.n or 0))))
        board.ranked.sort(key=_rank_key)
        board.upper.sort(key=_rank_key)
        if board.ranked:
            boards.append(board)
        else:
            weaker_only.append(threat)
    return boards, weaker_only


def threat_list(threats: Sequence[Threat], with_data: bool) -> str:
    """Threat models in one line, eps grouped per norm: 'linf eps 0.1, 0.2; l2 eps 0.5'."""
    grouped: dict[tuple[str, str], list[float]] = {}
    for data, norm, eps in threats:
        grouped.setdefault((data, norm), []).append(eps)
    return "; ".join(
        f"{norm} eps {', '.join(format_eps(e) for e in sorted(eps))}"
        + (f" ({data})" if with_data and data else "")
        for (data, norm), eps in grouped.items()
    )


def _training(trains: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Weights hash -> how the model was trained (from stored train records)."""
    out = {}
    for r in trains:
        sha = str((r.get("weights") or {}).get("sha256") or "")
        t = r.get("training") or {}
        if sha and isinstance(t, Mapping) and t.get("method"):
            eps = t.get("eps")
            out[sha] = str(t["method"]) + (f" (eps {eps:g})" if isinstance(eps, float) else "")
    return out


def _pct(v: float | None, prefix: str = "") -> tuple[str, str]:
    """A percentage cell's text and its sort value ('–' and an empty value when missing)."""
    return ("–", "") if v is None else (f"{prefix}{100 * v:.1f} %", f"{v:.6f}")


def _row(
    e: Entry,
    rank: str,
    name: str,
    training: str | None,
    attacks: dict[AttackSpec, str],
) -> str:
    """One leaderboard row; an upper-bound row is marked (class ub, '≤', its attack)."""
    upper = e.attack.grade is None
    clean, clean_v = _pct(e.clean)
    robust, robust_v = _pct(e.robust, "≤ " if upper else "")
    evaluation = f"upper bound: {attacks[e.attack]}" if upper else e.attack.name
    cells = [
        f"<td data-v='{html.escape(rank)}'>{html.escape(rank) or '–'}</td>",
        f"<td class=l>{html.escape(name)}</td>",
        f"<td class=l>{html.escape(e.arch or '–')}</td>",
    ]
    if training is not None:
        cells.append(f"<td class=l>{html.escape(training or '–')}</td>")
    cells += [
        f"<td data-v='{clean_v}'>{clean}</td>",
        f"<td data-v='{robust_v}'><b>{html.escape(robust)}</b></td>",
        f"<td class=l>{html.escape(evaluation)}</td>",
        f"<td data-v='{e.n if e.n is not None else ''}'>{e.n if e.n is not None else '–'}</td>",
        f"<td class=l>{html.escape(e.date or '–')}</td>",
    ]
    return f"<tr{' class=ub' if upper else ''}>{''.join(cells)}</tr>"


def _board_html(
    board: Board,
    heading: str,
    names: dict[ModelKey, str],
    trained: dict[str, str] | None,
    attacks: dict[AttackSpec, str],
) -> str:
    """One threat model's heading and sortable table."""
    head = ["<th data-sort=num>#</th>", "<th class=l>model</th>", "<th class=l>architecture</th>"]
    if trained is not None:
        head.append("<th class=l>training</th>")
    head += [
        "<th data-sort=num>clean</th>",
        "<th data-sort=num>robust</th>",
        "<th class=l>evaluation</th>",
        "<th data-sort=num>points</th>",
        "<th class=l>date</th>",
    ]

    def training(e: Entry) -> str | None:
        """The training cell's text (None: the column is not shown)."""
        return None if trained is None else trained.get(e.sha, "")

    ranked = "".join(
        _row(e, str(i), names[e.model], training(e), attacks) for i, e in enumerate(board.ranked, 1)
    )
    parts = [f"<h3>{html.escape(heading)}</h3>", "<table class=sortable>"]
    parts.append(f"<thead><tr>{''.join(head)}</tr></thead><tbody>{ranked}</tbody>")
    if board.upper:
        upper = "".join(_row(e, "", names[e.model], training(e), attacks) for e in board.upper)
        parts.append(
            f"<tbody><tr class=group><td colspan={len(head)} class=l>Evaluated by weaker "
            f"attacks only: their robust accuracy is an upper bound, not ranked</td></tr>"
            f"{upper}</tbody>"
        )
    parts.append("</table>")
    return "".join(parts)


NOTE = (
    "<p class=muted>Ranked by robust accuracy under AutoAttack (all members of its version) "
    "or MSA, the evaluations the field accepts as leaderboard-grade; clean accuracy is on the "
    "same points. A model evaluated more than once at a threat model shows the evaluation on "
    "the most points (then the lowest robust accuracy). Rows marked ≤ were measured only by a "
    "weaker attack (PGD, APGD alone, an AutoAttack subset, ...): an upper bound on the robust "
    "accuracy, not ranked. Click a column header to sort.</p>"
)


def leaderboard_section_html(
    entries: Sequence[Entry], trains: Sequence[Mapping[str, Any]] = ()
) -> str:
    """The leaderboard section: one sortable table per threat model with a graded evaluation,
    and a line naming the threat models that have none yet."""
    boards, weaker_only = leaderboards(entries)
    names = entry_names(entries)
    attacks = attack_labels(e.attack for e in entries)
    trained = _training(trains)
    shown_models = {e.sha for b in boards for e in b.ranked + b.upper}
    training_column = trained if any(sha in trained for sha in shown_models) else None
    datasets = {t[0] for t in [b.threat for b in boards] + weaker_only}
    parts = ["<h2 id=leaderboard>Leaderboard</h2>"]
    for board in boards:
        data, norm, eps = board.threat
        heading = norm_eps(norm, eps) + (f" · {data}" if len(datasets) > 1 and data else "")
        parts.append(_board_html(board, heading, names, training_column, attacks))
    if boards:
        parts.append(NOTE)
    if weaker_only:
        listed = html.escape(threat_list(weaker_only, len(datasets) > 1))
        command = "<code>robustlab eval --attack autoattack --eps E --store DB</code>"
        if boards:
            parts.append(
                f"<p class=muted>Threat models evaluated by weaker attacks only (not ranked; "
                f"their numbers are in the robustness curves): {listed}.</p>"
            )
        else:
            parts.append(
                "<p>No AutoAttack or MSA evaluation is stored yet, so no model is ranked. "
                f"Weaker attacks were run at {listed} (see the robustness curves); {command} "
                "puts a model on the board.</p>"
            )
    return "\n".join(parts)


#: Click a header to sort every body of its table (the header row of a group stays first);
#: numbers by their data-v, text by its content, missing values last; click again to reverse.
SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function (t) {
  t.classList.add("js");
  var heads = t.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    th.tabIndex = 0;
    function key(row) {
      var c = row.cells[col]; if (!c) return null;
      if (th.dataset.sort === "num") {
        var v = c.dataset.v; return v === undefined || v === "" ? null : parseFloat(v);
      }
      var s = c.textContent.trim(); return s === "" || s === "\\u2013" ? null : s.toLowerCase();
    }
    function go() {
      var num = th.dataset.sort === "num";
      var was = th.getAttribute("aria-sort");
      var asc = was ? was !== "ascending" : (!num || th.textContent === "#");
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      Array.prototype.forEach.call(t.tBodies, function (b) {
        var rows = Array.prototype.filter.call(b.rows, function (r) {
          return !r.classList.contains("group");
        });
        rows.sort(function (a, b) {
          var x = key(a), y = key(b);
          if (x === null || y === null) return x === y ? 0 : (x === null ? 1 : -1);
          return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
        });
        rows.forEach(function (r) { b.appendChild(r); });
      });
    }
    th.addEventListener("click", go);
    th.addEventListener("keydown", function (ev) {
      if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); go(); }
    });
  });
});
"""

"""Robustness curves from stored evaluations: one line per model and attack configuration,
whatever runs its points came from (one curve run or several single-eps runs), one plot per
dataset and norm."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field

from .attack_spec import AttackSpec, attack_labels
from .entries import Entry, ModelKey, entry_names, format_eps, threat_order
from .plots import embedded_png, robustness_curve

Group = tuple[str, str]  # (dataset, norm): one plot


@dataclass
class Series:
    """One line: a model under one attack configuration, on one dataset and norm."""

    model: ModelKey
    attack: AttackSpec
    data: str
    norm: str
    by_eps: dict[float, Entry] = field(default_factory=dict)  # the latest entry per eps

    @property
    def entries(self) -> list[Entry]:
        """The line's entries in eps order."""
        return [self.by_eps[e] for e in sorted(self.by_eps)]

    @property
    def clean(self) -> float | None:
        """Clean accuracy, from the latest evaluation that recorded it."""
        known = [e for e in self.by_eps.values() if e.clean is not None]
        return max(known, key=lambda e: e.created).clean if known else None

    def points(self) -> list[tuple[float, float]]:
        """(eps, accuracy) in eps order, starting at eps 0 with clean accuracy (robust
        accuracy at eps 0 is clean accuracy) unless eps 0 was evaluated."""
        pts = [(e.eps, e.robust) for e in self.entries]
        clean = self.clean
        if clean is not None and 0.0 not in self.by_eps:
            pts.insert(0, (0.0, clean))
        return pts


def curve_series(entries: Sequence[Entry]) -> dict[Group, list[Series]]:
    """The lines of every plot: entries grouped by (dataset, norm), then by (model, attack
    configuration); at an eps evaluated more than once, the latest stored entry counts."""
    groups: dict[Group, dict[tuple[ModelKey, AttackSpec], Series]] = {}
    for e in entries:
        lines = groups.setdefault((e.data, e.norm), {})
        line = lines.setdefault((e.model, e.attack), Series(e.model, e.attack, e.data, e.norm))
        line.by_eps[e.eps] = e  # store order: a later entry replaces an earlier one
    ordered = sorted(groups, key=lambda g: threat_order(g[0], g[1], 0.0))
    models = {m: i for i, m in enumerate(dict.fromkeys(e.model for e in entries))}
    attacks = {a: i for i, a in enumerate(dict.fromkeys(e.attack for e in entries))}
    return {
        g: sorted(groups[g].values(), key=lambda s: (models[s.model], attacks[s.attack]))
        for g in ordered
    }


def _pct(v: float | None) -> str:
    """A fraction as a percentage ('–' when missing)."""
    return "–" if v is None else f"{100 * v:.1f} %"


def _points_text(series: Series) -> str:
    """The points evaluated per eps, e.g. '200' or '200–1000' when runs differ."""
    ns = sorted({e.n for e in series.entries if e.n is not None})
    if not ns:
        return "–"
    return str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"


def _table(lines: list[Series], names: dict[ModelKey, str], attacks: dict[AttackSpec, str]) -> str:
    """The numbers behind one plot: a row per line, a column per eps."""
    eps_all = sorted({e for s in lines for e in s.by_eps})
    head = (
        "<thead><tr><th class=l>model</th><th class=l>attack</th><th>points</th><th>clean</th>"
        + "".join(f"<th>eps {html.escape(format_eps(e))}</th>" for e in eps_all)
        + "</tr></thead>"
    )
    rows = []
    for s in lines:
        cells = "".join(
            f"<td>{_pct(s.by_eps[e].robust) if e in s.by_eps else '–'}</td>" for e in eps_all
        )
        rows.append(
            f"<tr><td class=l>{html.escape(names[s.model])}</td>"
            f"<td class=l>{html.escape(attacks[s.attack])}</td><td>{_points_text(s)}</td>"
            f"<td>{_pct(s.clean)}</td>{cells}</tr>"
        )
    return f"<table>{head}<tbody>{''.join(rows)}</tbody></table>"


NOTE = (
    "<p class=muted>One line per model and attack configuration (see Attack configurations), "
    "whether its points were stored by one curve run or by separate runs; where one eps was "
    "evaluated more than once, the latest run counts. Eps 0 is clean accuracy. A point is "
    "robust only if it is classified correctly both clean and under attack; within one curve "
    "run, a point broken at a smaller eps counts as broken at every larger one.</p>"
)


def curves_section_html(entries: Sequence[Entry]) -> str:
    """The robustness-curve section: per dataset and norm, a plot and its table."""
    groups = curve_series(entries)
    every = [s for lines in groups.values() for s in lines]
    names = entry_names(entries)
    attacks = attack_labels(s.attack for s in every)
    colours = {m: i for i, m in enumerate(dict.fromkeys(s.model for s in every))}
    styles = {a: i for i, a in enumerate(dict.fromkeys(s.attack for s in every))}
    datasets = {data for data, _ in groups}
    parts = ["<h2 id=curves>Robustness curves</h2>", NOTE]
    for (data, norm), lines in groups.items():
        where = f" on {data}" if len(datasets) > 1 and data else ""
        if len(groups) > 1:
            parts.append(f"<h3>{html.escape(norm + where)}</h3>")
        one_attack = len({s.attack for s in lines}) == 1
        labels = {
            id(s): names[s.model] if one_attack else f"{names[s.model]} · {attacks[s.attack]}"
            for s in lines
        }
        title = f"Robust accuracy vs {norm} eps{where}"
        if one_attack:
            title += f": {attacks[lines[0].attack]}"
        parts.append(
            embedded_png(
                f"accuracy vs eps ({norm}{where})",
                robustness_curve,
                {labels[id(s)]: s.points() for s in lines},
                title=title,
                xlabel=f"{norm} eps",
                styles={labels[id(s)]: (colours[s.model], styles[s.attack]) for s in lines},
            )
        )
        parts.append(_table(lines, names, attacks))
    return "\n".join(parts)

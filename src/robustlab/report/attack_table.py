"""The report's table of attack configurations: one row per configuration and norm, its key
parameters as cells, the budgets it ran at and the models it evaluated."""

from __future__ import annotations

import html
from collections.abc import Sequence

from .attack_spec import AttackSpec, attack_labels
from .entries import Entry, ModelKey, entry_names, format_eps, threat_order


def parameter_table(params: Sequence[tuple[str, object]]) -> str:
    """One configuration as a one-row table: a column per parameter (names with spaces,
    numbers short)."""
    head = "".join(f"<th class=l>{html.escape(k.replace('_', ' '))}</th>" for k, _ in params)
    cells = "".join(
        f"<td class=l>{html.escape(f'{v:.4g}' if isinstance(v, float) else str(v))}</td>"
        for _, v in params
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody><tr>{cells}</tr></tbody></table>"


def _steps(entries: Sequence[Entry]) -> str:
    """The step sizes of a configuration's runs: one, or each with the eps it ran at."""
    by_step: dict[str, list[float]] = {}
    for e in entries:
        if e.step is not None and e.eps > 0:
            by_step.setdefault(e.step, []).append(e.eps)
    if len(by_step) <= 1:
        return next(iter(by_step), "–")
    alphas = {e.alpha for e in entries if e.eps > 0}
    if len(alphas) == 1 and None not in alphas:
        return f"{alphas.pop():.4g} at every eps"
    return ", ".join(
        f"{step} at eps {', '.join(format_eps(x) for x in sorted(set(eps)))}"
        for step, eps in by_step.items()
    )


def attacks_section_html(entries: Sequence[Entry]) -> str:
    """The attack-configuration table of the stored evaluations."""
    rows: dict[tuple[AttackSpec, str], list[Entry]] = {}
    for e in entries:
        rows.setdefault((e.attack, e.norm), []).append(e)
    labels = attack_labels(spec for spec, _ in rows)
    names = entry_names(entries)
    body = []
    order = sorted(rows, key=lambda r: (threat_order("", r[1], 0.0), labels[r[0]]))
    for spec, norm in order:
        got = rows[(spec, norm)]
        eps = ", ".join(format_eps(x) for x in sorted({e.eps for e in got}))
        models: list[ModelKey] = list(dict.fromkeys(e.model for e in got))
        grade = " <span class=tag>leaderboard-grade</span>" if spec.grade else ""
        body.append(
            f"<tr><td class=l>{html.escape(labels[spec])}{grade}</td>"
            f"<td class=l>{html.escape(norm)}</td><td class='l nw'>{html.escape(eps)}</td>"
            + "".join(f"<td>{html.escape(spec.param(k))}</td>" for k in ("steps", "restarts"))
            + f"<td class=l>{html.escape(_steps(got))}</td>"
            f"<td class=l>{html.escape(spec.param('loss'))}</td>"
            f"<td class=l>{'<br>'.join(html.escape(p) for p in spec.further()) or '–'}</td>"
            f"<td class=l>{html.escape(', '.join(names[m] for m in models))}</td></tr>"
        )
    head = (
        "<thead><tr><th class=l>attack</th><th class=l>norm</th><th class=l>eps</th>"
        "<th>steps</th><th>restarts</th><th class=l>step size</th><th class=l>loss</th>"
        "<th class=l>further parameters</th><th class=l>models</th></tr></thead>"
    )
    note = (
        "<p class=muted>Parameters at their published defaults are not listed under further "
        "parameters; steps, restarts, step size and loss always are. The step size is given "
        "relative to eps, so one configuration covers every eps it ran at. AutoAttack runs "
        "its members with the reference implementation's budgets.</p>"
    )
    return (
        "<h2 id=attacks>Attack configurations</h2>"
        f"<table>{head}<tbody>{''.join(body)}</tbody></table>{note}"
    )

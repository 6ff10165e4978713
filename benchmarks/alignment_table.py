"""The alignment mitigation's table: plain vs alignment-regularised models, unpruned and after
global magnitude pruning to 50 % and 90 % (``compress_sweep.py``'s rows), clean and robust
accuracy and the share of each kept after pruning.

    python benchmarks/alignment_table.py benchmarks/results_compress.jsonl \
        benchmarks/results_alignment.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

from compress_plots import Row, read, robust, uap

SPARSITIES = (0.5, 0.9)


def _pct(v: float | None) -> str:
    """A fraction as a percentage, '-' if missing."""
    return "-" if v is None else f"{100 * v:.1f}"


def _kept(v: float | None, base: float | None) -> str:
    """The share of ``base`` that ``v`` keeps."""
    return "-" if v is None or not base else f"{v / base:.3f}"


def rows_for(rows: dict[str, Row], method: str, origin: str, label: str = "") -> list[str]:
    """The unpruned model of ``origin`` and its two global prunings, as table lines."""
    base = rows.get(f"{method}/{origin}")
    if base is None:
        return []
    eps = 0.1 if method == "standard" else 0.3
    prefix = "" if origin == "base" else f"{origin}+"
    lines = []
    for s in (0.0, *SPARSITIES):
        r = base if s == 0 else rows.get(f"{method}/{prefix}prune-global={s:g}")
        if r is None:
            continue
        b = r["bound"]["linf"]
        lines.append(
            f"| {method} | {label or origin} | {'-' if s == 0 else f'{100 * s:.0f} %'} "
            f"| {_pct(r['clean_full'])} | {_kept(r['clean_full'], base['clean_full'])} "
            f"| {_pct(robust(r, eps))} (@{eps}) | {_kept(robust(r, eps), robust(base, eps))} "
            f"| {_pct(uap(r, eps))} | {b['alignment']:.2e} | {b['bound']:.3g} "
            f"| {b['aligned_estimate']:.3g} | {r['gap']['linf']['mean']:.3g} |"
        )
    return lines


def main() -> None:
    """Print the markdown table (rows of the second file that repeat a model of the first, a
    re-run of a plain model, are shown beside the first's, labelled as re-runs)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("plain", type=Path, help="the sweep's rows with the plain base and its pruning")
    p.add_argument("aligned", type=Path, help="the rows of the alignment-regularised models")
    args = p.parse_args()
    plain = {r["name"]: r for r in read(args.plain)}
    new = {r["name"]: r for r in read(args.aligned)}
    print(
        "| method | trained with | pruned (global) | clean % | kept (clean) | AutoAttack % "
        "| kept (robust) | UAP fooling % | alignment linf | bound linf | aligned estimate "
        "| gap linf mean |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    origins = sorted(
        {r["name"].split("/")[1].split("+")[0] for r in new.values() if r["family"] == "alignment"}
    )
    for method in ("standard", "pgd-at"):
        for line in rows_for(plain, method, "base"):
            print(line)
        for line in rows_for(new, method, "base", "base (re-run)"):
            print(line)
        for origin in origins:
            for line in rows_for(new, method, origin):
                print(line)


if __name__ == "__main__":
    main()

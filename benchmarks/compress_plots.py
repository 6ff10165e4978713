"""Figures and tables of the compression sweep (``benchmarks/compress_sweep.py``'s JSON lines).

Writes to ``--figures`` (PNG): robust accuracy (AutoAttack) vs compressibility, UAP fooling
rate vs compressibility, bound vs measured gap (log scales); prints a markdown table of every
model, the Spearman correlations (bound vs gap, compressibility vs robust accuracy and vs UAP
fooling rate, within each training method) and the pruning comparison (plain global vs
eps-targeted at the same sparsity).

    python benchmarks/compress_plots.py benchmarks/results_compress.jsonl \
        --figures benchmarks/figures > tables.md
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from robustlab.analysis import (  # noqa: E402
    bound_gap_correlation,
    layer_metrics,
    rank_correlation,
)
from robustlab.analysis.compressibility import compressibility, stable_rank  # noqa: E402
from robustlab.models.checkpoint import load  # noqa: E402
from robustlab.models.lowrank import LowRank  # noqa: E402

Row = dict[str, Any]
FAMILIES = (
    "base", "l1", "group-lasso", "nuclear", "rank", "wd", "prune-global", "prune-targeted",
    "base-seed", "filter-spread", "l1-middle", "gl+prune-global", "gl+prune-targeted",
    "renorm",
)  # fmt: skip
MARKERS = dict(zip(FAMILIES, "o^sDvx<>*Ph12d", strict=True))
COLOURS = {f: plt.get_cmap("tab20")((2 * i) % 20 + i // 10) for i, f in enumerate(FAMILIES)}
FLOOR = 1e-3  # compressibility below this (a numerically exact low rank) is drawn at it


def read(path: Path) -> list[Row]:
    """The sweep's rows (the last row of a name wins)."""
    rows: dict[str, Row] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["name"]] = row
    return list(rows.values())


def robust(row: Row, eps: float) -> float | None:
    """AutoAttack robust accuracy at eps (None if not measured)."""
    for a in row["autoattack"]:
        if abs(a["eps"] - eps) < 1e-9:
            return float(a["robust"])
    return None


def uap(row: Row, xi: float) -> float | None:
    """The SGD UAP's fooling rate at linf xi."""
    for u in row["uap"]:
        if abs(u["xi"] - xi) < 1e-9:
            return float(u["fooling_rate"])
    return None


def _pick(part: str, norm: str, key: str) -> Callable[[Row], float | None]:
    """A getter of ``row[part][norm][key]``."""
    return lambda r: float(r[part][norm][key])


def _fooling(xi: float) -> Callable[[Row], float | None]:
    """A getter of the UAP fooling rate at xi."""
    return lambda r: uap(r, xi)


def scatter(
    rows: Sequence[Row],
    x: Callable[[Row], float | None],
    y: Callable[[Row], float | None],
    xlabel: str,
    ylabel: str,
    title: str,
    out: Path,
    *,
    log: bool = False,
    logx: bool = False,
    diagonal: bool = False,
) -> None:
    """One panel per training method, points coloured by family."""
    methods = sorted({r["method"] for r in rows}, key=lambda m: m != "standard")
    fig, axes = plt.subplots(1, len(methods), figsize=(5.2 * len(methods), 4.2), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        seen = set()
        for r in rows:
            if r["method"] != method:
                continue
            xv, yv = x(r), y(r)
            if xv is None or yv is None:
                continue
            fam = r["family"]
            if logx and not log:
                xv = max(xv, FLOOR)
            ax.scatter(
                xv, yv, marker=MARKERS.get(fam, "o"), color=COLOURS.get(fam, "k"),
                label=None if fam in seen else fam, s=36,
            )  # fmt: skip
            seen.add(fam)
        if log or logx:
            ax.set_xscale("log")
        if log:
            ax.set_yscale("log")
        if diagonal:
            lo, hi = ax.get_xlim()
            ax.plot([lo, hi], [lo, hi], "k:", lw=0.8, label="y = x")
        ax.set_xlabel(
            xlabel + (f"\n(values < {FLOOR:g} drawn at {FLOOR:g})" if logx and not log else "")
        )
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} ({method})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90, metadata={"Software": "robustlab benchmarks/compress_plots.py"})
    plt.close(fig)


def spearman(
    rows: Sequence[Row], a: Callable[[Row], float | None], b: Callable[[Row], float | None]
) -> str:
    """Spearman's correlation of a and b over the rows where both exist, with the count."""
    pairs = [(a(r), b(r)) for r in rows]
    kept = [(p, q) for p, q in pairs if p is not None and q is not None]
    if len(kept) < 3:
        return "n/a"
    rho = rank_correlation([p for p, _ in kept], [q for _, q in kept])
    return f"{rho:+.3f} (n={len(kept)})" if not math.isnan(rho) else f"nan (n={len(kept)})"


def _bound_gap(rows: Sequence[Row], norm: str, gap: str, form: str = "bound") -> float:
    """Spearman's correlation between a form of the bound and the gap (NaN for fewer than 3
    models)."""
    return bound_gap_correlation(rows, norm, bound=form, gap=gap) if len(rows) >= 3 else math.nan


def table(rows: Sequence[Row]) -> list[str]:
    """A markdown table of every model."""
    head = (
        "| model | clean | AA@0.3 | AA@0.1 | neuron c. | spectral c. | stable rank | Frob. "
        "| sparsity | UAP@0.1 | UAP@0.2 | UAP@0.3 | bound linf | gap linf max | bound l2 | gap l2 max |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        m = r["middle"]

        def pct(v: float | None) -> str:
            """A fraction as a percentage."""
            return "-" if v is None else f"{100 * v:.1f}"

        lines.append(
            f"| {r['name']} | {pct(r['clean_full'])} | {pct(robust(r, 0.3))} | {pct(robust(r, 0.1))} "
            f"| {m['neuron_compressibility']:.3f} | {m['spectral_compressibility']:.3f} "
            f"| {m['stable_rank']:.1f} | {m['frobenius_norm']:.2f} | {pct(r['sparsity_model'])} "
            f"| {pct(uap(r, 0.1))} | {pct(uap(r, 0.2))} | {pct(uap(r, 0.3))} "
            f"| {r['bound']['linf']['bound']:.3g} | {r['gap']['linf']['max']:.3g} "
            f"| {r['bound']['l2']['bound']:.3g} | {r['gap']['l2']['max']:.3g} |"
        )
    return lines


def pruning(rows: Sequence[Row]) -> list[str]:
    """Plain global vs eps-targeted pruning at the same sparsity: clean and robust accuracy
    kept (fraction of the base's)."""
    by = {r["name"]: r for r in rows}
    lines = [
        "| model pruned | sparsity asked | pruning | sparsity reached (per layer) | target error | clean after prune "
        "| clean after fine-tune | kept (clean) | AA@0.3 | AA@0.1 | kept (robust) | UAP |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, origin in [
        (m, o) for o in ("base", "group-lasso=0.003") for m in ("standard", "pgd-at")
    ]:
        base = by.get(f"{method}/{origin}")
        if base is None:
            continue
        eps = 0.1 if method == "standard" else 0.3
        prefix = "" if origin == "base" else f"{origin}+"
        for s in (0.5, 0.9):
            for how in ("global", "targeted"):
                r = by.get(f"{method}/{prefix}prune-{how}={s:g}")
                if r is None:
                    continue
                p = r["pruning"]
                per_layer = " / ".join(f"{100 * v:.0f}" for v in p["layer_sparsity"].values())
                rb, rr, low = robust(base, eps), robust(r, eps), robust(r, 0.1)
                kept_r = "-" if not rb or rr is None else f"{rr / rb:.2f}"
                lines.append(
                    f"| {method}/{origin} | {s} | {how} | {100 * p['sparsity']:.1f} % ({per_layer}) "
                    f"| {'-' if how == 'global' else format(p['target_error'], '.4f')} "
                    f"| {100 * p['clean_after_prune']:.1f} | {100 * r['clean_full']:.1f} "
                    f"| {r['clean_full'] / base['clean_full']:.3f} "
                    f"| {100 * (robust(r, 0.3) or 0):.1f} "
                    f"| {'-' if low is None else f'{100 * low:.1f}'} "
                    f"| {kept_r} (AA@{eps}) | {100 * (uap(r, 0.1 if eps == 0.1 else 0.3) or 0):.1f} @{eps} |"
                )
    return lines


def layer_norms(runs: Path) -> list[str]:
    """Per layer l-inf operator norm (max row l1 norm: what an l-inf attacker meets) and
    Frobenius norm of every trained checkpoint in ``runs`` (pruned models are not saved)."""
    lines = ["| model | " + " | ".join(["linf op. norm per layer", "Frobenius per layer"]) + " |"]
    lines.append("|---|---|---|")
    for folder in sorted(p for p in runs.iterdir() if (p / "manifest.json").exists()):
        metrics = layer_metrics(load(folder), (0.1,))
        lines.append(
            f"| {folder.name.replace('_', '/', 1)} "
            f"| {' / '.join(f'{m.linf_operator_norm:.3g}' for m in metrics)} "
            f"| {' / '.join(f'{m.frobenius_norm:.3g}' for m in metrics)} |"
        )
    return lines


def composed_middle(checkpoint: Path) -> dict[str, float]:
    """For a low-rank model: compressibility (kappa 0.1), stable rank and Frobenius norm of
    the composed hidden-layer weights ``up @ down`` (the factors alone do not show the rank)."""
    model = load(checkpoint)
    found = []
    for module in model.modules():
        if isinstance(module, LowRank):
            w = module.composed_weight().detach().double()
            sv = torch.linalg.svdvals(w)
            found.append({
                "neuron_compressibility": compressibility(w.norm(dim=1), (0.1,))["0.1"],
                "spectral_compressibility": compressibility(sv, (0.1,))["0.1"],
                "stable_rank": stable_rank(sv),
                "frobenius_norm": float(w.norm()),
            })  # fmt: skip
    return {k: sum(f[k] for f in found) / len(found) for k in found[0]}


def main() -> None:
    """Figures to --figures, tables and correlations to stdout."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("results", type=Path)
    p.add_argument("--figures", type=Path, default=Path("benchmarks/figures"))
    p.add_argument("--runs", type=Path, help="the sweep's checkpoints: print their layer norms")
    args = p.parse_args()
    rows = read(args.results)
    for r in rows:  # low-rank models: the composed weights, not the factors
        folder = None if args.runs is None else args.runs / r["name"].replace("/", "_")
        if r["family"] == "rank" and folder is not None and folder.exists():
            r["middle_factors"] = r["middle"]
            r["middle"] = {**r["middle"], **composed_middle(folder)}
    args.figures.mkdir(parents=True, exist_ok=True)
    order = {name: i for i, name in enumerate(FAMILIES)}
    rows.sort(
        key=lambda r: (r["method"] != "standard", order.get(r["family"], 99), r["level"] or 0)
    )

    def ncomp(r: Row) -> float:
        """Neuron compressibility of the regularised layers (small = compressible)."""
        return float(r["middle"]["neuron_compressibility"])

    def scomp(r: Row) -> float:
        """Spectral compressibility of the regularised layers (small = compressible)."""
        return float(r["middle"]["spectral_compressibility"])

    def aa(r: Row) -> float | None:
        """AutoAttack at the budget where the method's models are not all broken."""
        return robust(r, 0.1) if r["method"] == "standard" else robust(r, 0.3)

    def fool(r: Row) -> float | None:
        """UAP fooling rate at the budget where the method's models are not all fooled."""
        return uap(r, 0.1) if r["method"] == "standard" else uap(r, 0.3)

    for name, comp, label in (
        ("neuron", ncomp, "neuron compressibility (kappa 0.1; lower = more compressible)"),
        ("spectral", scomp, "spectral compressibility (kappa 0.1; lower = more compressible)"),
    ):
        scatter(rows, comp, aa, label, "AutoAttack robust accuracy (std: 0.1, AT: 0.3)",
                "robust accuracy", args.figures / f"compress_robust_vs_{name}.png", logx=True)  # fmt: skip
        scatter(rows, comp, fool, label, "UAP fooling rate (SGD; std: linf 0.1, AT: 0.3)",
                "UAP", args.figures / f"compress_uap_vs_{name}.png", logx=True)  # fmt: skip
    for norm in ("linf", "l2"):
        scatter(
            rows, _pick("gap", norm, "max"), _pick("bound", norm, "bound"),
            f"measured gap ({norm}, APGD-CE, per-sample max)", "bound", f"bound vs gap {norm}",
            args.figures / f"compress_bound_vs_gap_{norm}.png", log=True,
        )  # fmt: skip
    print("## Every model\n")
    print("\n".join(table(rows)))
    print("\n## Spearman correlations\n")
    held = {n: all(r["bound_holds"].get(n, False) for r in rows) for n in ("linf", "l2")}
    print(f"- bound >= measured gap (per-sample max) on every model: {held}")
    for form in ("bound", "bound_compressibility", "aligned_estimate"):
        for norm in ("linf", "l2"):
            for gap in ("mean", "max"):
                every = _bound_gap(rows, norm, gap, form)
                per = {
                    m: _bound_gap([r for r in rows if r["method"] == m], norm, gap, form)
                    for m in ("standard", "pgd-at")
                }
                print(
                    f"- {form} vs gap ({norm}, {gap}): all {every:+.3f} (n={len(rows)}), "
                    + ", ".join(f"{m} {v:+.3f}" for m, v in per.items())
                )
    for method in ("standard", "pgd-at"):
        mine = [r for r in rows if r["method"] == method]
        for cname, comp in (("neuron", ncomp), ("spectral", scomp)):
            print(
                f"- {method}: {cname} compressibility vs AutoAttack {spearman(mine, comp, aa)}, "
                + ", ".join(
                    f"vs UAP@{xi} fooling {spearman(mine, comp, _fooling(xi))}"
                    for xi in (0.1, 0.2, 0.3)
                )
            )
        scale = {
            "Frobenius norm (regularised layers)": lambda r: float(r["middle"]["frobenius_norm"]),
            "stable rank (regularised layers)": lambda r: float(r["middle"]["stable_rank"]),
            "bound linf": _pick("bound", "linf", "bound"),
            "alignment linf": _pick("bound", "linf", "alignment"),
        }
        print(
            f"- {method}: AutoAttack vs "
            + ", ".join(f"{k} {spearman(mine, get, aa)}" for k, get in scale.items())
        )
    print("\n## Pruning: plain global vs eps-targeted\n")
    print("\n".join(pruning(rows)))
    if args.runs is not None:
        print("\n## Layer norms (first layer / hidden / hidden / head)\n")
        print("\n".join(layer_norms(args.runs)))


if __name__ == "__main__":
    main()

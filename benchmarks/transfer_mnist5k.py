"""SGM vs PGD / MI / DI transfer on mnist5k, a budget sweep, a gamma sweep, and the matrix's cost.

Sources resnet (ResNet-20, 9 blocks), resnet8 (3 blocks) and densenet; targets every other
zoo model, standard and PGD-AT. Models are trained (or reused from ROBUSTLAB_CACHE /
--cache) exactly as ``robustlab transfer`` does, and every number comes from
``robustlab transfer --json``. Prints one markdown table per eps (success rate over the
points each target classifies correctly, in %), the gamma sweep, and the cost of one matrix
against crafting separately for every target.

``--diagnose`` instead measures why SGM helps or not, on clean test points: per residual
block of each source, how the true input gradient splits between skip path and branch;
per gamma and target, how well the source's (SGM) input gradient aligns with the target's
(cosine, and the share of the target's best one-step Linf gain its sign step gets).

    python benchmarks/transfer_mnist5k.py --out runs/transfer [--n 1000] [--eps 0.1,0.15,0.2]
    python benchmarks/transfer_mnist5k.py --out runs/smoke --n 100 --epochs 1 --eps 0.15 \\
        --targets vgg,mlp --gammas 0.2,1.0          # a short smoke run
    python benchmarks/transfer_mnist5k.py --out runs/diag --diagnose --n 500
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from robustlab.cli import main as cli

SOURCES = "resnet,resnet8,densenet"
TARGETS = "resnet,resnet8,preact_resnet,densenet,vgg,vit,mlp,resnet8:pgd-at,mlp:pgd-at"
ATTACKS = "pgd,mi,di,sgm,sgm+mi+di"


def run(args: argparse.Namespace, out: Path, *extra: str) -> dict[str, Any]:
    """One ``robustlab transfer`` call; returns its JSON record."""
    common = ["--n", str(args.n), "--steps", str(args.steps), "--seed", str(args.seed)]
    if args.epochs:
        common += ["--epochs", str(args.epochs)]
    if args.cache:
        common += ["--cache", args.cache]
    if args.no_progress:
        common.append("--no-progress")
    code = cli(["transfer", *extra, *common, "--json", str(out)])
    if code != 0:
        raise SystemExit(f"robustlab transfer failed ({code}) for {' '.join(extra)}")
    record: dict[str, Any] = json.loads(out.read_text())
    return record


def table(record: dict[str, Any], attacks: list[str]) -> str:
    """Markdown: one row per (source, target), one column per attack, then SGM - PGD."""
    by: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for c in record["cells"]:
        by.setdefault((c["source"], c["target"]), {})[c["attack"]] = c
    head = ["source", "target", "n", *attacks]
    if "sgm" in attacks and "pgd" in attacks:
        head.append("sgm - pgd")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (source, target), cells in by.items():
        first = next(iter(cells.values()))
        mark = " (white-box)" if first["white_box"] else ""
        row = [source, target + mark, str(first["n"])]
        row += [f"{100 * cells[a]['success_rate']:.1f}" if a in cells else "-" for a in attacks]
        if "sgm" in attacks and "pgd" in attacks:
            row.append(
                f"{100 * (cells['sgm']['success_rate'] - cells['pgd']['success_rate']):+.1f}"
            )
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def diagnose(args: argparse.Namespace, out: Path) -> None:
    """Skip/branch gradient split per block and SGM gradient alignment, as markdown and JSON."""
    from robustlab.analysis.transfer import gradient_alignment, skip_branch_split
    from robustlab.cli.transfer import _obtain, parse_model
    from robustlab.data import load_data
    from robustlab.train.cache import cache_root

    splits = load_data("mnist5k")
    opts = argparse.Namespace(
        data="mnist5k", epochs=args.epochs, seed=args.seed, at_eps=0.3, no_progress=True
    )
    cache = Path(args.cache) if args.cache else cache_root()
    names = list(dict.fromkeys([*args.sources.split(","), *args.targets.split(",")]))
    models = {n: _obtain(parse_model(n), opts, splits, "cpu", cache)[0] for n in names if n}
    x, y = splits.test.x[: args.n], splits.test.y[: args.n]
    gammas = [float(g) for g in args.gammas.split(",") if g]
    record: dict[str, Any] = {"n": len(x), "split": {}, "alignment": {}}
    for source in [s for s in args.sources.split(",") if s]:
        split = skip_branch_split(models[source], x, y)
        record["split"][source] = split
        print(f"\n### {source}: true input gradient of each block, skip path vs branch\n")
        print("| block | skip share (median) | ||g_branch|| / ||g_skip|| (median) | cos |")
        print("|---|---|---|---|")
        for r in split:
            print(
                f"| {r['block']} | {r['skip_share']:.2f} | {r['branch_over_skip']:.2f} "
                f"| {r['cosine']:+.2f} |"
            )
        others = {t: models[t] for t in args.targets.split(",") if t and t != source}
        rows = gradient_alignment(models[source], others, x, y, gammas)
        record["alignment"][source] = rows
        print(f"\n### {source}: gradient alignment with each target, cos / sign gain\n")
        print("| target | " + " | ".join(f"γ={g:g}" for g in gammas) + " |")
        print("|---|" + "---|" * len(gammas))
        for t in others:
            by = {r["gamma"]: r for r in rows if r["target"] == t}
            values = [f"{by[g]['cosine']:.3f} / {by[g]['sign_gain']:.3f}" for g in gammas]
            print(f"| {t} | " + " | ".join(values) + " |")
        first = [r for r in rows if r["target"] == next(iter(others))]
        print(
            "| ‖g_γ‖/‖g_1‖, cos(g_γ, g_1) | "
            + " | ".join(f"{r['norm_ratio']:.2f}, {r['cos_plain']:.2f}" for r in first)
            + " |",
            flush=True,
        )
    (out / "diagnose.json").write_text(json.dumps(record, indent=2) + "\n")


def main() -> None:
    """Budget sweep, gamma sweep and cost, printed as markdown and JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the JSON records")
    p.add_argument("--sources", default=SOURCES)
    p.add_argument("--targets", default=TARGETS)
    p.add_argument("--attacks", default=ATTACKS)
    p.add_argument("--eps", default="0.1,0.15,0.2", help="Linf budgets of the budget sweep")
    p.add_argument("--gamma-eps", type=float, default=0.15, help="eps of the gamma sweep")
    p.add_argument("--gammas", default="0.1,0.2,0.3,0.5,0.7,1.0")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--epochs", type=int, help="override training epochs (smoke runs only)")
    p.add_argument("--cache", help="model cache folder (default ROBUSTLAB_CACHE/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-cost", action="store_true", help="skip the cost comparison")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--diagnose", action="store_true", help="gradient diagnostics only")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.diagnose:
        diagnose(args, out)
        return
    attacks = [a for a in args.attacks.split(",") if a]
    targets = [t for t in args.targets.split(",") if t]
    matrix = ["--sources", args.sources, "--targets", args.targets, "--attacks", args.attacks]

    for eps in [e for e in args.eps.split(",") if e]:
        record = run(args, out / f"matrix-eps{eps}.json", *matrix, "--eps", eps)
        print(f"\n### Linf eps {eps}: success rate (%) over points each target gets right\n")
        print(table(record, attacks), flush=True)

    record = run(
        args,
        out / "gamma-sweep.json",
        *["--sources", args.sources, "--targets", args.targets, "--attacks", "sgm"],
        *["--eps", str(args.gamma_eps), "--gamma", args.gammas],
    )
    print(f"\n### gamma sweep, SGM at Linf eps {args.gamma_eps} (success %, black-box targets)\n")
    gammas = sorted({c["gamma"] for c in record["cells"]})
    print("| source | target | " + " | ".join(f"γ={g:g}" for g in gammas) + " |")
    print("|---|---|" + "---|" * len(gammas))
    rows: dict[tuple[str, str], dict[float, float]] = {}
    for c in record["cells"]:
        if not c["white_box"]:
            rows.setdefault((c["source"], c["target"]), {})[c["gamma"]] = c["success_rate"]
    for (source, target), values in rows.items():
        cells = " | ".join(f"{100 * values[g]:.1f}" for g in gammas)
        print(f"| {source} | {target} | {cells} |", flush=True)

    if args.skip_cost:
        return
    source = args.sources.split(",")[0]
    one = ["--sources", source, "--attacks", "sgm", "--eps", str(args.gamma_eps)]
    t0 = time.perf_counter()
    joint = run(args, out / "cost-matrix.json", *one, "--targets", args.targets)
    matrix_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i, target in enumerate(targets):
        run(args, out / f"cost-separate-{i}.json", *one, "--targets", target)
    separate_s = time.perf_counter() - t0
    cost = {
        "source": source,
        "targets": len(targets),
        "matrix_generations": joint["generations"],
        "matrix_target_passes": joint["target_forwards"],
        "matrix_s": round(matrix_s, 1),
        "separate_generations": len(targets),
        "separate_s": round(separate_s, 1),
        "speedup": round(separate_s / matrix_s, 2),
    }
    print("\n### cost: one matrix vs crafting separately for every target\n")
    print(json.dumps(cost), flush=True)


if __name__ == "__main__":
    main()

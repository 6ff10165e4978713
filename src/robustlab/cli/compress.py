"""robustlab compress: a checkpoint's compressibility (weights and representations), its
robustness bound and its measured robustness gap, on the first --n test points."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import RobustlabError
from ..io import write_json
from .common import (
    DATA_HELP,
    add_command,
    add_common,
    add_model_options,
    add_store,
    add_trust_unhashed,
    checked_outputs,
    finished_record,
    floats,
    json_output,
    load_model_and_data,
    say,
    store_output,
)

DESCRIPTION = "compressibility of a checkpoint, its robustness bound and its measured gap"


def register(sub: Any) -> None:
    """Add the compress command."""
    p = add_command(sub, "compress", DESCRIPTION)
    add_model_options(p)
    p.add_argument("--data", default="mnist5k", help=f"test {DATA_HELP}")
    p.add_argument("--n", type=int, default=500, help="test points in the batch")
    p.add_argument(
        "--eps-linf",
        type=float,
        help="linf budget of the bound and the attack (default: 0.3 for one-channel images, "
        "8/255 for colour)",
    )
    p.add_argument(
        "--eps-l2",
        type=float,
        help="l2 budget of the bound and the attack (default: 2.0*sqrt(d/784) for one-channel "
        "images, 2.0 on MNIST; 0.5*sqrt(d/3072) for colour)",
    )
    p.add_argument(
        "--kappa",
        default="0.1,0.25,0.5",
        help="fractions of each layer's rows / singular values kept (k = ceil(kappa * len)); "
        "the smallest is used in the bound",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=100,
        help="APGD-CE iterations of the measured gap (default: 100, the published budget; "
        "fewer is faster and measures a smaller gap)",
    )
    p.add_argument(
        "--alignment-points",
        type=int,
        metavar="N",
        help="measure the bound's alignment term on the first N points of the batch (one "
        "backward pass per class each; default: 64, analysis.compress.ALIGNMENT_POINTS; 0 "
        "skips it; more than --n uses all)",
    )
    add_trust_unhashed(p)
    add_store(p, "the checkpoint folder's name")
    add_common(p)
    p.set_defaults(func=run)


def _num(value: float) -> str:
    """A number for the terminal table, short whatever its size."""
    return f"{value:.4g}"


def print_record(record: dict[str, Any]) -> None:
    """The terminal summary: one row per layer, then bound vs gap, then the representations."""
    kappa = f"{record['kappas'][0]:g}"
    print(
        f"{record['n']} points of {record.get('data', '?')}; compressibility at kappa={kappa} "
        "(relative best-k error, q=2: small = compressible)"
    )
    head = (
        "layer",
        "shape",
        "stable rk",
        "eff rk",
        "spectral",
        "frobenius",
        "neuron c",
        "spectr c",
    )
    rows = [head]
    for m in record["layers"]:
        rows.append(
            (
                m["name"],
                "x".join(str(s) for s in m["shape"]),
                _num(m["stable_rank"]),
                _num(m["effective_rank_exp"]),
                _num(m["spectral_norm"]),
                _num(m["frobenius_norm"]),
                _num(m["neuron_compressibility"][kappa]),
                _num(m["spectral_compressibility"][kappa]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        print(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    for norm, gap in record["gap"].items():
        b = record["bound"][norm]
        if "refused" in b:
            print(
                f"{norm} eps={gap['eps']:g}: no bound ({b['refused']}); measured gap "
                f"mean {gap['mean']:.4g}, max {gap['max']:.4g}"
            )
            continue
        aligned = "not measured" if b.get("alignment") is None else f"{b['alignment']:.3g}"
        print(
            f"{norm} eps={gap['eps']:g}: loss rise bound {b['bound']:.4g} (compressibility form "
            f"{b['bound_compressibility']:.4g}, alignment {aligned}) >= measured gap "
            f"max {gap['max']:.4g} (mean {gap['mean']:.4g}; robust accuracy "
            f"{100 * gap['robust_accuracy']:.1f} %)"
        )
    norms = list(record["gap"])
    print("representation  stable rk  PQ-index  zeros  " + "  ".join(f"shift {n}" for n in norms))
    for r in record["representations"]:
        shifts = "  ".join(f"{r['shift'][n]:>8.3f}" for n in norms)
        print(
            f"{r['name']:<14}  {r['stable_rank']:>9.3g}  {r['pq_index']:>8.3f}  "
            f"{r['zero_fraction']:>5.2f}  {shifts}"
        )


def run(args: argparse.Namespace) -> int:
    """Check the options and outputs, measure, print and write the record."""
    from ..analysis.compress import ALIGNMENT_POINTS, check_eps, compress_record, default_eps
    from ..analysis.compressibility import check_kappas

    kappas = check_kappas(floats(args.kappa, "--kappa"))
    if args.n < 1:
        raise RobustlabError(f"--n must be >= 1, got {args.n}")
    if args.steps < 1:
        raise RobustlabError(f"--steps must be >= 1, got {args.steps}")
    if args.alignment_points is not None and args.alignment_points < 0:
        raise RobustlabError(f"--alignment-points must be >= 0, got {args.alignment_points}")
    given = {"linf": args.eps_linf, "l2": args.eps_l2}
    check_eps({k: v for k, v in given.items() if v is not None})
    checked_outputs(
        args,
        [json_output(args.json), store_output(args.store)],
        models=[args.model],
        data=[args.data],
    )
    model, splits, device, info = load_model_and_data(args)
    batch = splits.test.head(min(args.n, len(splits.test)))
    x, y = batch.x.to(device), batch.y.to(device)
    eps = default_eps(tuple(x.shape[1:]))
    eps.update({k: v for k, v in given.items() if v is not None})
    if not args.no_progress:
        say(f"measuring {Path(args.model).name} on {len(y)} points of {splits.name}")
    record = compress_record(
        model,
        x,
        y,
        eps=eps,
        kappas=kappas,
        steps=args.steps,
        seed=args.seed,
        alignment_points=ALIGNMENT_POINTS
        if args.alignment_points is None
        else args.alignment_points,
    )
    record = {"kind": record.pop("kind"), "data": splits.name, "model": info, **record}
    record = finished_record(args, record)
    print_record(record)
    if args.json:
        write_json(args.json, record)
    if args.store:
        from ..store import ResultStore

        ResultStore(args.store).add(record, label=args.label or Path(args.model).name)
    return 0

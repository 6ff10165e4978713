"""robustlab eval: clean and robust accuracy of a checkpoint under an attack, at one eps or more."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import (
    add_attack_options,
    add_command,
    add_common,
    add_store,
    attack_options,
    check_output_file,
    check_store,
    floats,
    load_model_and_data,
    write_json,
)

DESCRIPTION = "clean and robust accuracy of a checkpoint under an attack, at one eps or a curve"
SAMPLE_COLUMNS = [
    "eps",
    "index",
    "label",
    "clean_pred",
    "final_pred",
    "robust",
    "broken_by",
    "perturbation_norm",
]


def register(sub: Any) -> None:
    """Add the eval command."""
    p = add_command(sub, "eval", DESCRIPTION)
    add_attack_options(p)
    p.add_argument(
        "--eps", required=True, help="budget, or a comma-separated list for a robustness curve"
    )
    p.add_argument("--n", type=int, default=1000, help="number of test points")
    p.add_argument(
        "--samples",
        metavar="PATH",
        help="per-sample CSV (default: beside --json as NAME.samples.csv, else not written)",
    )
    p.add_argument(
        "--no-resume", action="store_true", help="do not checkpoint per batch beside --json"
    )
    add_store(p, "the checkpoint folder's name")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the options and outputs, evaluate, print and write the records."""
    from ..attacks.registry import make_attack
    from ..evaluate import evaluate_curve

    options = attack_options(args)
    attacks = [
        make_attack(args.attack, args.norm, eps, **options) for eps in floats(args.eps, "--eps")
    ]
    samples = None
    if args.samples:
        samples = Path(args.samples)
    elif args.json:
        samples = Path(args.json).with_suffix(".samples.csv")
    for path, flag in ((args.json, "--json"), (samples, "--samples")):
        check_output_file(str(path) if path else None, flag)
    check_store(args.store)
    model, splits, device, info = load_model_and_data(args)
    resume = None
    if args.json and not args.no_resume:
        resume = Path(args.json + ".progress.jsonl")
    records = evaluate_curve(
        model,
        splits.test,
        attacks,
        n=args.n,
        batch_size=args.batch_size,
        device=device,
        seed=args.seed,
        progress=not args.no_progress,
        model_info=info,
        resume=resume,
    )
    for rec in records:
        eps = rec.threat_model["eps"]
        print(
            f"{rec.n} points, {args.norm} eps={eps}: clean {100 * rec.clean_accuracy:.2f} %, "
            f"robust {100 * rec.robust_accuracy:.2f} % ({rec.elapsed_s:.1f} s)"
        )
        for step in rec.per_attack:
            print(
                f"    after {step['attack']}: {100 * float(step['robust_accuracy_after']):.2f} % "  # type: ignore[arg-type]
                f"({step['seconds']} s)"
            )
        for warning in rec.warnings:
            print(f"    warning: {warning}")
    dicts = [r.to_dict() for r in records]
    if samples is not None:
        if args.json:
            for d in dicts:
                d["samples_file"] = str(samples)
        _write_samples(samples, records)
    write_json(args.json, dicts[0] if len(dicts) == 1 else {"records": dicts})
    if args.store:
        from ..store import ResultStore

        store = ResultStore(args.store)
        for d in dicts:
            store.add(d, label=args.label or Path(args.model).name)
    return 0


def _write_samples(path: Path, records: list[Any]) -> None:
    """The per-sample table of every record (one row per point and eps), as CSV."""
    import csv
    import io

    from ..io import atomic_write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SAMPLE_COLUMNS)
    writer.writeheader()
    for rec in records:
        for row in rec.samples:
            writer.writerow({"eps": rec.threat_model["eps"], **row})
    atomic_write_text(path, buf.getvalue())

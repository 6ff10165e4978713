"""robustlab demo: the main job on the built-in data, end to end, offline."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..io import Output, write_json
from .common import (
    add_command,
    add_common,
    cache_output,
    checked_outputs,
    json_output,
    store_output,
)

DESCRIPTION = (
    "the main job on the built-in data, end to end, offline: the shipped standard and PGD-AT "
    "ResNets (or trained afresh), a PGD robustness curve, an HTML report"
)


def register(sub: Any) -> None:
    """Add the demo command."""
    p = add_command(sub, "demo", DESCRIPTION)
    p.add_argument(
        "--out",
        default="robustlab-demo",
        help="folder for the report; the records are appended to results.sqlite there (a "
        "store there is never replaced)",
    )
    p.add_argument(
        "--retrain",
        action="store_true",
        help="train the two models afresh with the recipes their cards state (about 10 "
        "minutes on 2 cores; kept in --cache and reused after) instead of loading the shipped "
        "ones",
    )
    p.add_argument(
        "--cache",
        help="with --retrain, the folder of trained models to reuse (default: $ROBUSTLAB_CACHE/demo, else "
        "~/.cache/robustlab/demo)",
    )
    add_common(
        p,
        json_help="write the run's records (trainings, evaluations, timings) as JSON here "
        "(default: not written)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the outputs, run the demo, say where its report is."""
    from ..demo import REPORT, STORE, demo
    from ..report.html import is_robustlab_report
    from ..train.cache import cache_root

    out = Path(args.out)
    cache = Path(args.cache) if args.cache else cache_root()
    outputs = [
        Output(out, "--out", folder=True),
        Output(out / REPORT, "--out", ours=is_robustlab_report),
        store_output(out / STORE, "--out"),  # appended to, never replaced
        json_output(args.json),
        cache_output(cache),
    ]
    checked_outputs(args, outputs, inputs=[cache])  # the cached models it may reuse
    result = demo(
        out=Path(args.out),
        cache=Path(args.cache) if args.cache else None,
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress,
        retrain=args.retrain,
    )
    print(f"report: {result.report.resolve()}")
    record = {
        "kind": "demo",
        "report": str(result.report),
        "store": str(result.store),
        "records": result.records,
    }
    if args.json:
        write_json(args.json, record)
    return 0

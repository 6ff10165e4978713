"""robustlab compare: two evaluation runs of a results store, number by number and point by
point (``history.compare_runs``)."""

from __future__ import annotations

import argparse
from typing import Any

from ..io import write_json
from .common import add_command, add_common, checked_outputs, json_output

DESCRIPTION = "compare two evaluation runs: the numbers that moved and the points each broke"


def register(sub: Any) -> None:
    """Add the compare command (it reads the store only, so it has no --seed or --device)."""
    p = add_command(sub, "compare", DESCRIPTION)
    p.add_argument("run_a", type=int, metavar="RUN_A", help="a run id, as robustlab runs lists it")
    p.add_argument("run_b", type=int, metavar="RUN_B", help="the run to compare it with")
    p.add_argument(
        "--store", required=True, metavar="PATH", help="SQLite results store to read (read only)"
    )
    p.add_argument(
        "--eps", type=float, help="compare at this eps alone (default: every eps both runs ran)"
    )
    add_common(
        p,
        json_help="write the comparison, every point index included, as JSON here (default: "
        "not written)",
        seed=False,
        device=False,
        progress=False,
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Read the two runs, print what moved between them (and write it as JSON)."""
    from ..history import compare_runs, comparison_text
    from ..store import ResultStore

    checked_outputs(args, [json_output(args.json)], inputs=[args.store])
    store = ResultStore(args.store, read_only=True)
    result = compare_runs(store, args.run_a, args.run_b, eps=args.eps)
    print(comparison_text(result))
    if args.json:
        write_json(args.json, result.to_dict())
    return 0

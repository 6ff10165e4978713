"""robustlab report: render the HTML report of a results store."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import RobustlabError
from .common import add_command, check_output_file, write_json

DESCRIPTION = "render the HTML report of a results store"


def register(sub: Any) -> None:
    """Add the report command (it computes nothing, so it has no --seed or --device)."""
    p = add_command(sub, "report", DESCRIPTION)
    p.add_argument("--store", required=True, metavar="PATH", help="SQLite results store to read")
    p.add_argument(
        "--out", default="report.html", metavar="PATH", help="where to write the HTML report"
    )
    p.add_argument("--title", default="robustlab report", help="title of the report")
    p.add_argument(
        "--json",
        metavar="PATH",
        help="write what was rendered (report path, store, record counts by kind) as JSON here "
        "(default: not written)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the paths, render the store's records, say where the report is."""
    from ..report import render_report
    from ..store import ResultStore

    if not Path(args.store).exists():
        raise RobustlabError(f"results store {args.store} does not exist")
    check_output_file(args.out, "--out")
    check_output_file(args.json, "--json")
    store = ResultStore(args.store)
    out = render_report(store, args.out, title=args.title)
    print(f"report: {out.resolve()}")
    counts: dict[str, int] = {}
    for record in store.records():
        kind = str(record.get("kind", "eval"))
        counts[kind] = counts.get(kind, 0) + 1
    write_json(
        args.json, {"kind": "report", "report": str(out), "store": args.store, "records": counts}
    )
    return 0

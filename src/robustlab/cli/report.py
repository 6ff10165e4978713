"""robustlab report: render the HTML report of a results store."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..io import Output, write_json
from .common import add_command, add_common, checked_outputs, json_output

DESCRIPTION = "render the HTML report of a results store"


def register(sub: Any) -> None:
    """Add the report command (it computes nothing, so it has no --seed or --device)."""
    p = add_command(sub, "report", DESCRIPTION)
    p.add_argument(
        "--store", required=True, metavar="PATH", help="SQLite results store to read (read only)"
    )
    p.add_argument(
        "--out", default="report.html", metavar="PATH", help="where to write the HTML report"
    )
    p.add_argument("--title", default="robustlab report", help="title of the report")
    add_common(
        p,
        json_help="write what was rendered (report path, store, record counts by kind) as JSON "
        "here (default: not written)",
        seed=False,
        device=False,
        progress=False,
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the paths, render the store's records (read only), say where the report is."""
    from ..report import render_report
    from ..report.html import is_robustlab_report
    from ..store import ResultStore

    out = Output(Path(args.out), "--out", ours=is_robustlab_report)
    checked_outputs(args, [out, json_output(args.json)], inputs=[args.store])
    store = ResultStore(args.store, read_only=True)
    written = render_report(store, args.out, title=args.title)
    print(f"report: {written.resolve()}")
    counts: dict[str, int] = {}
    for record in store.records():
        kind = str(record.get("kind", "eval"))
        counts[kind] = counts.get(kind, 0) + 1
    if args.json:
        record = {"kind": "report", "report": str(written), "store": args.store, "records": counts}
        write_json(args.json, record)
    return 0

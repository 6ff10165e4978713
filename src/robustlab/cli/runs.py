"""robustlab runs: the runs a results store holds, filtered by model, kind, threat model and
date (``history``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import RobustlabError
from ..io import write_json
from .common import add_command, add_common, checked_outputs, json_output

DESCRIPTION = "list the runs a results store holds, filtered by model, kind, threat model and date"


def register(sub: Any) -> None:
    """Add the runs command (it reads the store only, so it has no --seed or --device)."""
    p = add_command(sub, "runs", DESCRIPTION)
    p.add_argument(
        "--store", required=True, metavar="PATH", help="SQLite results store to read (read only)"
    )
    p.add_argument(
        "--model",
        help="runs of this model: its store label, the start of its weights' SHA-256 (4 hex "
        "digits or more), or a checkpoint path, whose weights are hashed (default: every model)",
    )
    p.add_argument(
        "--kind",
        help="runs of this kind: eval, msa, transfer, ... (default: all but "
        "the demo's step timings)",
    )
    p.add_argument("--norm", help="runs under this norm: linf, l2 or l1 (default: any)")
    p.add_argument("--eps", type=float, help="records at this eps (default: any)")
    p.add_argument("--attack", help="runs of this attack, e.g. pgd, autoattack (default: any)")
    p.add_argument(
        "--since",
        help="runs made on or after this UTC date or time, e.g. 2025-01-31 or 2025-01-31T14:00 "
        "(default: no bound)",
    )
    p.add_argument(
        "--until",
        help="runs made on or before this UTC date or time; a date includes its whole day "
        "(default: no bound)",
    )
    add_common(
        p,
        json_help="write the runs as JSON here (default: not written)",
        seed=False,
        device=False,
        progress=False,
    )
    p.set_defaults(func=run)


def _checkpoint_sha(model: str | None) -> tuple[str, ...]:
    """The weights' SHA-256 of --model when it names an existing checkpoint (any other path
    that exists, a folder of the same name as a label, say, is matched as a label alone)."""
    if model is None:
        return ()
    from ..models.checkpoint import checkpoint_files, file_sha256
    from ..models.pretrained import is_zoo

    if not (is_zoo(model) or Path(model).expanduser().exists()):
        return ()

    try:
        return (file_sha256(checkpoint_files(model)[-1]),)
    except RobustlabError:
        return ()


def run(args: argparse.Namespace) -> int:
    """Read the store, print the runs that pass the filters (and write them as JSON)."""
    from ..history import RunFilter, list_runs, parse_when, runs_table
    from ..store import ResultStore

    checked_outputs(args, [json_output(args.json)], inputs=[args.store])
    store = ResultStore(args.store, read_only=True)
    where = RunFilter(
        model=args.model,
        model_shas=_checkpoint_sha(args.model),
        kind=args.kind,
        norm=args.norm,
        eps=args.eps,
        attack=args.attack,
        since=parse_when(args.since, "--since") if args.since else None,
        until=parse_when(args.until, "--until", end=True) if args.until else None,
    )
    runs = list_runs(store, where)
    print(runs_table(runs) if runs else f"no run in {store.path} passes the filters")
    if args.json:
        write_json(
            args.json,
            {"kind": "runs", "store": str(store.path), "runs": [r.to_dict() for r in runs]},
        )
    return 0

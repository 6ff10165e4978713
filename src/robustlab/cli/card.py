"""robustlab card: a model card (Markdown or HTML) written from stored results only: the
store's records that carry the model's weights SHA-256, and the model's own manifest."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import RobustlabError
from ..io import Output, write_json
from .common import (
    DATA_HELP,
    MODEL_HELP,
    add_command,
    add_common,
    add_model_options,
    add_trust_unhashed,
    checked_outputs,
    json_output,
    load_model,
    model_options,
    say,
)

DESCRIPTION = "a model card (Markdown or HTML) of a model, written from the results stored of it"


def register(sub: Any) -> None:
    """Add the card command (it computes nothing, so it has no --seed or --device)."""
    p = add_command(sub, "card", DESCRIPTION)
    add_model_options(
        p, MODEL_HELP + "; its stored records are those that carry its weights' SHA-256"
    )
    p.add_argument(
        "--store", required=True, metavar="PATH", help="SQLite results store to read (read only)"
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="where to write the card: a .md file for Markdown, .html for HTML",
    )
    p.add_argument(
        "--format", choices=("md", "html"), help="md or html (default: from the --out suffix)"
    )
    p.add_argument(
        "--title", help="the card's title (default: the records' label, else --model as given)"
    )
    p.add_argument(
        "--data",
        help=f"only for a legacy .pt/.pth (--arch) or a foreign model that does not declare its "
        f"input size: the {DATA_HELP} it is built for (default: none)",
    )
    add_trust_unhashed(p)
    add_common(
        p,
        json_help="write the card's facts as JSON here (default: not written)",
        seed=False,
        device=False,
        progress=False,
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the store and the outputs, load the model (its manifest and hash), match the
    store's records to it, write the card."""
    from ..data import load_data
    from ..report.card import build_card, card_format, is_markdown_card, write_card
    from ..report.html import is_robustlab_report
    from ..store import ResultStore

    fmt = card_format(args.out, args.format)
    if not fmt:
        raise RobustlabError(
            f"--out {args.out} does not say the card's format: name a .md or .html file, or "
            "pass --format md or --format html"
        )
    if args.arch is not None and args.data is None:
        raise RobustlabError(
            "--arch builds a legacy .pt/.pth file for a data set's input shape: give --data too"
        )
    store = ResultStore(args.store, read_only=True)  # a missing or foreign store: one sentence
    ours = is_robustlab_report if fmt == "html" else is_markdown_card
    out = Output(Path(args.out), "--out", ours=ours)
    checked_outputs(
        args,
        [out, json_output(args.json)],
        models=[args.model],
        data=[args.data],
        inputs=[args.store],
    )
    splits = load_data(args.data) if args.data else None
    ckpt = load_model(
        args.model,
        args.arch,
        splits,
        trust_unhashed=args.trust_unhashed,
        options=model_options(args),
    )
    parameters = sum(p.numel() for p in ckpt.model.parameters()) or None
    card = build_card(
        store.records(),
        ckpt.manifest,
        model=args.model,
        store=args.store,
        parameters=parameters,
        title=args.title,
    )
    write_card(card, args.out, fmt)
    if card.matched:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(card.matched.items()))
        print(f"model card of {args.model} from {kinds} record(s): {Path(args.out).resolve()}")
    else:
        print(f"model card of {args.model} (no stored results): {Path(args.out).resolve()}")
        say(
            f"no results of {args.model} are stored in {args.store}; the card says so. Produce "
            f"them with: {card.suggest}"
        )
    for w in card.warnings:
        say(f"warning: {w.text}")
    if args.json:
        write_json(args.json, card.to_dict())
    return 0

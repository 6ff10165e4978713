"""robustlab models: the registered architectures with their parameter counts."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import RobustlabError
from ..io import write_json
from .common import add_command, add_common, checked_outputs, json_output

DESCRIPTION = (
    "list the registered architectures with their parameter counts, or (--pretrained) the "
    "shipped models with their recorded accuracy"
)


def register(sub: Any) -> None:
    """Add the models command."""
    p = add_command(sub, "models", DESCRIPTION)
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="list the shipped pretrained models (use one as --model zoo:NAME) with the clean "
        "and AutoAttack accuracy their cards record, instead of the architectures",
    )
    p.add_argument(
        "--in-channels", type=int, default=1, help="input channels the models are built for"
    )
    p.add_argument(
        "--num-classes", type=int, default=10, help="classes the models are built to predict"
    )
    p.add_argument(
        "--image-size", type=int, default=28, help="image height and width the models are built for"
    )
    add_common(
        p,
        json_help="write the list as JSON here (default: not written)",
        seed=False,
        device=False,
        progress=False,
    )
    p.set_defaults(func=run)


def _count(name: str, args: argparse.Namespace) -> int:
    """The parameters of an architecture at the asked shape, counted on the meta device (no
    weight is allocated, so a huge --image-size cannot exhaust memory)."""
    import torch

    from ..models import build_model, count_parameters

    shape = (args.in_channels, args.num_classes, args.image_size)
    try:
        with torch.device("meta"):
            return count_parameters(build_model(name, *shape))
    except (RuntimeError, NotImplementedError):  # an architecture that needs real tensors
        return count_parameters(build_model(name, *shape))


#: What ``models --pretrained`` shows of a card's AutoAttack run.
AA_KEYS = ("version", "norm", "eps", "n", "seed", "robust_accuracy", "command")


def _pretrained(args: argparse.Namespace) -> int:
    """Print the shipped models with their recipes' methods and recorded numbers."""
    from ..models.pretrained import zoo_entries

    rows: list[dict[str, Any]] = []
    for entry in zoo_entries():
        card = entry.card
        aa = card["autoattack"]
        rows.append(
            {
                "model": entry.spec,
                "title": card["title"],
                "data": card["data"],
                "clean_accuracy": card["clean_accuracy"],
                "autoattack": {k: aa[k] for k in AA_KEYS if k in aa},
                "size_bytes": card["size_bytes"],
                "train_command": card["recipe"]["command"],
            }
        )
    threats = [
        f"{r['autoattack']['norm']} {r['autoattack']['eps']:g}, n={r['autoattack']['n']}"
        for r in rows
    ]
    width = max([len(r["model"]) for r in rows] + [5])
    tw = max([len(t) for t in threats] + [12])
    print(
        f"{'model':<{width}}  {'clean':>7}  {'AutoAttack':>10}  {'threat model':<{tw}}  what it is"
    )
    for r, threat in zip(rows, threats, strict=True):
        print(
            f"{r['model']:<{width}}  {100 * r['clean_accuracy']:>6.1f}%  "
            f"{100 * r['autoattack']['robust_accuracy']:>9.1f}%  {threat:<{tw}}  {r['title']}"
        )
    print(
        "AutoAttack: the standard version on all mnist5k test points; each card "
        "(robustlab/pretrained/NAME/card.json) has the commands that reproduce the model and "
        "its numbers"
    )
    if args.json:
        write_json(args.json, rows)
    return 0


def run(args: argparse.Namespace) -> int:
    """Build every architecture at the given shape and print its parameter count (or list
    the shipped models)."""
    from ..models import ARCHITECTURES

    checked_outputs(args, [json_output(args.json)])
    if args.pretrained:
        return _pretrained(args)
    rows: list[dict[str, Any]] = []
    for name in sorted(ARCHITECTURES):
        row: dict[str, Any] = {"arch": name, "description": ARCHITECTURES[name].description}
        try:  # one architecture that cannot take this shape does not hide the others
            row["parameters"] = _count(name, args)
        except RobustlabError as exc:
            row.update(parameters=None, error=str(exc))
        rows.append(row)
    if all(r["parameters"] is None for r in rows):
        raise RobustlabError(
            f"no architecture can be built for {args.in_channels}x{args.image_size}x"
            f"{args.image_size} inputs and {args.num_classes} classes ({rows[0]['error']})"
        )
    width = max(len(r["arch"]) for r in rows)
    print(
        f"{'architecture':<{width}}  {'parameters':>10}  description"
        f"   (for {args.in_channels}x{args.image_size}x{args.image_size}, {args.num_classes} classes)"
    )
    for r in rows:
        if r["parameters"] is None:
            print(
                f"{r['arch']:<{width}}  {'-':>10}  {r['description']} (not at this size: {r['error']})"
            )
        else:
            print(f"{r['arch']:<{width}}  {r['parameters']:>10,}  {r['description']}")
    print(
        "also torchvision:NAME and timm:NAME (built by those libraries when installed), and "
        "for evaluating a model of your own see README.md, 'Your own model'"
    )
    if args.json:
        write_json(args.json, rows)
    return 0

"""robustlab poison: a BadNets-style patch or a blended trigger stamped into a share of a
training split, relabelled to a target class, written as a dataset robustlab reads back.

The --out folder receives ``poisoned.npz`` (train on ``npz:OUT/poisoned.npz``: the poisoned
training split and the original test split), ``triggered.npz`` (``robustlab eval`` on
``npz:OUT/triggered.npz`` reports the attack's success rate as clean accuracy) and
``poison.json`` (the manifest: settings and the poisoned indices, which ``robustlab scan``
scores its flags against). See ``robustlab.monitor.poison`` for the trigger and the rate.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import RobustlabError
from ..io import Output, is_robustlab_json, npz_with_keys, write_json
from .common import (
    DATA_HELP,
    add_command,
    add_common,
    checked_outputs,
    finished_record,
    json_output,
)

DESCRIPTION = "stamp a backdoor trigger into a share of a training split, written as a new dataset"


def register(sub: Any) -> None:
    """Add the poison command."""
    p = add_command(sub, "poison", DESCRIPTION)
    p.add_argument("--data", default="mnist5k", help=f"{DATA_HELP}; its training split is poisoned")
    p.add_argument(
        "--target-class", type=int, required=True, help="the class the trigger sends inputs to"
    )
    p.add_argument(
        "--source-class",
        default="all",
        help="the class whose samples get the trigger, or all (every class but the target: "
        "BadNets' all-to-one attack; one class holds only about 1/K of the split)",
    )
    p.add_argument(
        "--rate",
        type=float,
        required=True,
        help="share of the whole training split to poison, strictly between 0 and 1 "
        "(round(rate * n) samples, drawn from the source class(es))",
    )
    p.add_argument("--trigger", default="patch", help="patch (BadNets) or blend (Chen et al. 2017)")
    p.add_argument(
        "--patch-size",
        type=int,
        default=3,
        help="patch: side in pixels of the checkerboard, one pixel in from the bottom-right corner",
    )
    p.add_argument(
        "--blend-alpha",
        type=float,
        default=0.2,
        help="blend: weight of the noise pattern, x' = (1 - alpha) x + alpha t",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder for poisoned.npz, triggered.npz and poison.json",
    )
    add_common(
        p,
        device=False,
        progress=False,
        json_help="also write the manifest here as a JSON record (default: not written)",
    )
    p.set_defaults(func=run)


def source_class(text: str) -> int | None:
    """--source-class as a class number, None for all; one sentence for anything else."""
    if text.strip().lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise RobustlabError(
            f"--source-class must be a class number or all, got {text!r}"
        ) from None


def run(args: argparse.Namespace) -> int:
    """Check the settings and outputs, poison, write the folder."""
    from ..data import load_data
    from ..monitor.poison import (
        MANIFEST,
        POISONED,
        POISONED_KEYS,
        TRIGGERED,
        PoisonConfig,
        check_rate,
        poison_splits,
        write_poisoned,
    )

    config = PoisonConfig(
        target=args.target_class,
        rate=args.rate,
        source=source_class(args.source_class),
        trigger=args.trigger,
        patch_size=args.patch_size,
        blend_alpha=args.blend_alpha,
        seed=args.seed,
    )
    check_rate(args.rate)  # said before the data is loaded
    out = Path(args.out)
    checked_outputs(
        args,
        [
            Output(out, "--out", folder=True),
            Output(out / POISONED, "--out", ours=npz_with_keys(POISONED_KEYS)),
            Output(out / TRIGGERED, "--out", ours=npz_with_keys(POISONED_KEYS)),
            Output(out / MANIFEST, "--out", ours=is_robustlab_json),
            json_output(args.json),
        ],
        data=[args.data],
    )
    splits = load_data(args.data)
    poisoned = poison_splits(splits, config)
    manifest = finished_record(args, write_poisoned(poisoned, out, splits.name))
    write_json(out / MANIFEST, manifest)  # with how it was made (the command line, versions)
    if args.json:
        write_json(args.json, manifest)
    n, k = len(poisoned.train), len(poisoned.indices)
    source = "every class but the target" if config.source is None else f"class {config.source}"
    trigger = (
        f"a {config.patch_size}x{config.patch_size} patch"
        if config.trigger == "patch"
        else f"a blended trigger (alpha {config.blend_alpha})"
    )
    print(
        f"poisoned {k} of the {n} training samples of {splits.name} ({100 * k / n:.2f} %) "
        f"with {trigger}, taken from {source} and relabelled {config.target}"
    )
    print(f"train on: npz:{out / POISONED} (its test split is the original one)")
    print(
        f"attack success of a model M: robustlab eval --model M --data npz:{out / TRIGGERED} "
        f"(its accuracy there, on {len(poisoned.triggered)} triggered test inputs)"
    )
    print(f"ground truth: {out / MANIFEST}")
    return 0

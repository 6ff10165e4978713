"""robustlab prune: magnitude or filter pruning of a checkpoint, optionally fine-tuned."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..io import write_json
from .common import (
    DATA_HELP,
    add_command,
    add_common,
    add_model_options,
    add_trust_unhashed,
    check_fit,
    checked_outputs,
    json_output,
    load_command_model,
    model_info,
)

DESCRIPTION = "prune a checkpoint (global, per layer or by filter), optionally fine-tune it"


def register(sub: Any) -> None:
    """Add the prune command."""
    p = add_command(sub, "prune", DESCRIPTION)
    add_model_options(p)
    p.add_argument("--data", default="mnist5k", help=f"{DATA_HELP} (test accuracy, fine-tuning)")
    p.add_argument(
        "--sparsity",
        type=float,
        help="fraction of weights (of filters with --structured) to zero, in (0, 1) "
        "(default: none; give it or --target-error)",
    )
    p.add_argument(
        "--target-error",
        type=float,
        metavar="EPS",
        help="instead of --sparsity: per layer, keep the fewest weights (filter norms with "
        "--structured) whose best-k relative l2 error is <= EPS (default: not used)",
    )
    p.add_argument(
        "--scope",
        default="global",
        choices=("global", "layer"),
        help="rank weights across the whole model or within each layer",
    )
    p.add_argument(
        "--structured",
        action="store_true",
        help="remove whole output filters by norm (first layer and head excluded)",
    )
    p.add_argument(
        "--finetune-epochs", type=int, default=0, help="epochs of fine-tuning with masks kept"
    )
    p.add_argument(
        "--finetune-method", default="standard", help="fine-tuning method: standard or pgd-at"
    )
    p.add_argument("--finetune-lr", type=float, default=0.01, help="peak fine-tuning rate")
    p.add_argument("--eps", type=float, help="budget of adversarial fine-tuning (default: none)")
    p.add_argument("--norm", default="linf", help="norm of the fine-tuning budget: linf or l2")
    p.add_argument(
        "--steps", type=int, help="inner steps of adversarial fine-tuning (default: the recipe's)"
    )
    p.add_argument("--out", required=True, help="folder of the pruned checkpoint")
    add_trust_unhashed(p)
    add_common(p, json_help="write the pruned checkpoint's manifest as JSON here (default: none)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the options and outputs, prune, fine-tune, write the checkpoint."""
    from ..data import load_data
    from ..models.checkpoint import checkpoint_outputs
    from ..train import make_method
    from ..train.prune import FinetuneConfig, PruneSpec, prune_checkpoint

    spec = PruneSpec(args.sparsity, args.scope, args.structured, args.target_error)
    finetuning = None
    if args.finetune_epochs:
        options = {"eps": args.eps, "norm": args.norm, "steps": args.steps}
        if args.finetune_method == "standard":
            options = {}
        method = make_method(
            args.finetune_method, **{k: v for k, v in options.items() if v is not None}
        )
        finetuning = FinetuneConfig(
            method, args.finetune_epochs, lr=args.finetune_lr, seed=args.seed
        )
    out = Path(args.out)
    checked_outputs(
        args,
        [*checkpoint_outputs(out), json_output(args.json)],
        models=[args.model],
        data=[args.data],
    )
    splits = load_data(args.data)
    ckpt = load_command_model(args, splits, "prune")
    check_fit(ckpt.manifest, splits)
    manifest = prune_checkpoint(
        ckpt.model,
        ckpt.manifest,
        splits,
        spec,
        out,
        finetuning=finetuning,
        base=model_info(ckpt.manifest, ckpt.path),
        device=args.device,
        progress=not args.no_progress,
    )
    m, record = manifest["metrics"], manifest["pruning"]
    kind = f"{100 * record['filter_sparsity']:.1f} % of the filters, " if spec.structured else ""
    line = (
        f"pruned {kind}{100 * record['sparsity']:.1f} % zero weights ({record['scope']}): "
        f"clean accuracy {100 * m['clean_accuracy_before_pruning']:.2f} % -> "
        f"{100 * m['clean_accuracy_after_pruning']:.2f} %"
    )
    if finetuning is not None:
        line += f" -> {100 * m['clean_accuracy']:.2f} % after {args.finetune_epochs} epoch(s)"
    print(f"{line}; checkpoint in {out}")
    if args.json:
        write_json(args.json, manifest)
    return 0

"""robustlab hpm: put the HPM l2-reclassifier head on a trained model and fine-tune it.

Reads a (preferably adversarially trained) checkpoint, wraps it in an HPM head whose dataset
prototypes start at the class means of the training features, fine-tunes the FC head (and
optionally the last block) for a few epochs of PGD on the HPM loss, and writes a checkpoint
that robustlab.load rebuilds and every other command accepts. It prints and records the
clean accuracy of the base's FC head and of HPM in both modes (mix and ema).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import RobustlabError
from ..io import write_json
from .common import (
    DATA_HELP,
    MODEL_HELP,
    add_command,
    add_common,
    add_model_options,
    add_trust_unhashed,
    check_fit,
    checked_outputs,
    is_foreign,
    json_output,
    load_command_model,
    model_info,
    say,
)

DESCRIPTION = "fine-tune the HPM l2-reclassifier head on a trained model"


def run(args: argparse.Namespace) -> int:
    """Wrap a checkpoint in the HPM head, fine-tune it, write the HPM checkpoint."""
    import torch

    from ..core.checks import check_batch_size
    from ..core.device import resolve_device
    from ..data import load_data
    from ..models.checkpoint import MANIFEST, checkpoint_outputs, save_checkpoint
    from ..models.hpm import HPMClassifier, HPMConfig, model_section
    from ..train.hpm import HPMTrainConfig, clean_accuracies, finetune_hpm
    from ..train.loop import accuracy

    out = Path(args.out)
    checked_outputs(
        args,
        [*checkpoint_outputs(out), json_output(args.json)],
        models=[args.model],
        data=[args.data],
    )
    head = HPMConfig(
        mix=args.mix,
        momentum=args.momentum,
        scale=args.scale,
        temperature=args.temperature,
        ste=not args.no_ste,
        mode=args.mode,
    )
    cfg = HPMTrainConfig(
        eps=args.eps,
        norm=args.norm,
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        tune=args.tune,
        fc_weight=args.fc_weight,
        seed=args.seed,
    )
    eval_batch = check_batch_size(args.eval_batch_size)
    device = resolve_device(args.device)
    # a legacy .pt or a foreign model is built for the data's shape, so the data is read first
    splits = load_data(args.data) if args.arch or is_foreign(args.model) else None
    ckpt = load_command_model(args, splits, "hpm")
    if "hpm" in ckpt.manifest["model"]:
        raise RobustlabError(f"{args.model} already has an HPM head; give the base's checkpoint")
    splits = splits or load_data(args.data)
    check_fit(ckpt.manifest, splits)
    base = ckpt.model.to(device)
    base_fc = accuracy(base, splits.test, eval_batch, device)
    torch.manual_seed(args.seed)
    model = HPMClassifier(base, head)
    say(f"fine-tuning HPM ({cfg.tune}) on {len(splits.train)} samples, {cfg.norm} eps {cfg.eps}")
    record = finetune_hpm(model, splits.train, cfg, device=device, progress=not args.no_progress)
    acc = clean_accuracies(model, splits.test, eval_batch, device)
    metrics: dict[str, Any] = {
        "clean_accuracy": acc["hpm_mix"] if model.mode == "mix" else acc["hpm_ema"],
        "clean_accuracy_base_fc": base_fc,
        "clean_accuracy_fc": acc["fc"],
        "clean_accuracy_hpm_mix": acc["hpm_mix"],
        "clean_accuracy_hpm_ema": acc["hpm_ema"],
        "eval_batch_size": eval_batch,
        "test_samples": len(splits.test),
    }
    base_info = model_info(ckpt.manifest, ckpt.path)
    manifest = {
        "model": model_section(ckpt.manifest["model"], model, base_info["sha256"]),
        "dataset": splits.info(),
        "training": {"base": ckpt.manifest.get("training", {}), "hpm": record},
        "metrics": metrics,
        "base": base_info,
    }
    save_checkpoint(model, out, manifest)
    print(
        f"HPM checkpoint in {out}: clean test accuracy base FC {100 * base_fc:.2f} %, "
        f"fine-tuned FC {100 * acc['fc']:.2f} %, HPM mix {100 * acc['hpm_mix']:.2f} % "
        f"(batches of {eval_batch}), HPM ema {100 * acc['hpm_ema']:.2f} %"
    )
    if args.json:
        write_json(args.json, json.loads((out / MANIFEST).read_text()))
    return 0


def register(sub: Any) -> None:
    """Add the hpm command."""
    p = add_command(sub, "hpm", DESCRIPTION)
    add_model_options(p, f"the base model: {MODEL_HELP[len('the model: ') :]}")
    p.add_argument("--data", default="mnist5k", help=f"the base's training {DATA_HELP}")
    p.add_argument("--out", required=True, help="folder for the HPM checkpoint")
    p.add_argument("--eps", type=float, default=0.3, help="budget of the PGD fine-tuning")
    p.add_argument("--norm", default="linf", help="norm of that budget: linf, l2 or l1")
    p.add_argument("--steps", type=int, default=10, help="PGD steps per training batch")
    p.add_argument("--epochs", type=int, default=3, help="epochs of fine-tuning")
    p.add_argument("--batch-size", type=int, default=128, help="batch size of fine-tuning")
    p.add_argument("--lr", type=float, default=0.01, help="peak learning rate (SGD, one-cycle)")
    p.add_argument(
        "--tune",
        default="head",
        help="what trains: head (the FC head) or last-block (the FC head and the last block)",
    )
    p.add_argument(
        "--fc-weight", type=float, default=1.0, help="weight of the FC head's cross-entropy"
    )
    p.add_argument(
        "--mix", type=float, default=0.5, help="weight of the batch prototypes, in [0, 1]"
    )
    p.add_argument(
        "--momentum",
        type=float,
        default=0.9,
        help="EMA momentum of the dataset prototypes, in (0, 1): the old prototype's weight",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=2.0,
        help="logit scale (> 0): the logit drop per mean within-class distance of the features",
    )
    p.add_argument(
        "--temperature", type=float, default=1.0, help="temperature of the STE's soft gradient"
    )
    p.add_argument(
        "--no-ste",
        action="store_true",
        help="no straight-through gradient: the hard assignment carries no gradient",
    )
    p.add_argument(
        "--mode",
        default="mix",
        help="inference mode the checkpoint is saved in, and fine-tuned in: mix (dataset and "
        "batch prototypes) or ema (dataset prototypes alone, batch-independent)",
    )
    p.add_argument(
        "--eval-batch-size",
        type=int,
        default=256,
        help="batch size of the clean accuracies (HPM's mix mode depends on the batch)",
    )
    add_trust_unhashed(p)
    add_common(
        p,
        json_help="write the HPM checkpoint's manifest as JSON here (default: not written)",
        overwrite_help="replace a checkpoint in --out, and output files robustlab did not write "
        "(files the command reads are never replaced)",
    )
    p.set_defaults(func=run)

"""robustlab exits: attach SDN exits to a trained backbone, train and calibrate them.

Reads a backbone checkpoint, holds a calibration split out of the training data, attaches
internal classifiers (default: at about 15/30/45/60/75/90 % of the backbone's FLOPs),
trains them, picks the early-exit thresholds on the calibration split for the allowed
relative accuracy drops, measures the efficiency on the test split, and writes a multi-exit
checkpoint that robustlab.load rebuilds and every other command accepts.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path
from typing import Any

from ..errors import RobustlabError
from ..io import write_json
from .common import (
    DATA_HELP,
    MODEL_HELP,
    add_command,
    add_common,
    add_engine,
    add_model_options,
    add_trust_unhashed,
    check_fit,
    checked_outputs,
    draw_plots,
    floats,
    ints,
    is_foreign,
    json_output,
    load_command_model,
    model_info,
    plot_outputs,
    say,
)

DESCRIPTION = "attach, train and calibrate early exits (SDN) on a trained backbone"
HISTOGRAM = "exit_histogram.png"
CURVES = "efficacy_curve.png"


def _held_out(manifest: dict[str, Any], data: str) -> tuple[int, int] | None:
    """The calibration split (size, seed) the backbone held out of this data (size 0: none);
    None when the backbone was trained on other data."""
    dataset = manifest.get("dataset")
    if not isinstance(dataset, dict) or dataset.get("name") != data:
        return None
    return int(dataset.get("calibration_size", 0) or 0), int(dataset.get("seed", 0) or 0)


def run(args: argparse.Namespace) -> int:
    """Attach, train and calibrate exits on a backbone checkpoint; write the multi-exit one."""
    import torch

    from ..analysis.efficiency import calibrate, check_drops, drop_key, measure_efficiency
    from ..core.device import resolve_device
    from ..data import load_data
    from ..models.checkpoint import MANIFEST, checkpoint_outputs, save_checkpoint
    from ..models.engine import check_engine
    from ..models.multiexit import (
        MultiExitNetwork,
        attach_exits,
        check_rule,
        check_threshold,
        plan_for,
    )
    from ..report.exit_plots import efficacy_curves, exit_histogram
    from ..train.sdn import SDNConfig, exit_accuracies, train_exits

    out = Path(args.out)
    outputs = [
        *checkpoint_outputs(out),
        *plot_outputs(out, [HISTOGRAM, CURVES], "--out"),
        json_output(args.json),
    ]
    checked_outputs(args, outputs, models=[args.model], data=[args.data])
    drops = floats(args.drops, "--drops")
    if args.drop not in drops:
        drops = [args.drop, *drops]
    check_drops(drops)
    check_rule(args.rule)
    check_engine(args.engine)
    positions = None if args.exits in ("auto", "all") else ints(args.exits, "--exits")
    cfg = SDNConfig(
        mode=args.mode,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        adversary=args.adv,
        adv_norm=args.adv_norm,
        adv_eps=args.adv_eps or 0.0,
        adv_steps=args.adv_steps,
        seed=args.seed,
    )
    device = resolve_device(args.device)
    # a legacy .pt or a foreign model is built for the data's shape, so the data is read first
    ckpt = load_command_model(
        args, load_data(args.data) if args.arch or is_foreign(args.model) else None, "exits"
    )
    if isinstance(ckpt.model, MultiExitNetwork) or "multi_exit" in ckpt.manifest["model"]:
        raise RobustlabError(f"{args.model} already has exits; give the backbone's checkpoint")
    held = _held_out(ckpt.manifest, args.data.strip())  # the name load_data gives the data
    held_size, held_seed = held or (0, 0)
    size = args.calibration if args.calibration is not None else (held_size or 500)
    data_seed = args.data_seed if args.data_seed is not None else held_seed
    if size < 1:
        raise RobustlabError(
            "the calibration split is empty: pass --calibration N with N >= 1 held-out samples "
            "(thresholds are never chosen on the test set)"
        )
    splits = load_data(args.data, calibration=size, seed=data_seed)
    check_fit(ckpt.manifest, splits)
    config = ckpt.manifest["model"]
    shape = (splits.in_channels, splits.image_size, splits.image_size)
    torch.manual_seed(args.seed)
    if args.exits == "all":  # after every unit but the last (whose exit is the final one)
        positions = list(range(len(plan_for(ckpt.model).units) - 1))
    model = attach_exits(
        ckpt.model.to(device), shape, int(config["num_classes"]), positions, rule=args.rule
    )
    say(
        f"exits after units {model.positions} of {len(model.plan.units)} "
        f"({', '.join(model.exit_names()[:-1])}); training {cfg.mode} on {len(splits.train)} samples"
    )
    record = train_exits(model, splits.train, cfg, device=device, progress=not args.no_progress)
    calib = calibrate(model, splits.calibration, drops, args.rule)
    # only the very split the backbone held out is unseen: another size or seed draws other
    # samples, some of which the backbone trained on
    seen = held is not None and held != (size, data_seed)
    if seen:
        how = (
            "on the whole training split"
            if held_size == 0
            else f"with another calibration split held out ({held_size} samples, seed {held_seed})"
        )
        say(
            f"  note: the backbone was trained {how}, so it saw (some of) these calibration "
            "samples and the thresholds may be optimistic (its confidence there is higher than "
            "on unseen inputs); train it with robustlab train --calibration N to avoid this"
        )
    model.threshold = check_threshold(calib.thresholds[drop_key(args.drop)])
    test_acc = exit_accuracies(model, splits.test)
    metrics: dict[str, Any] = {"exit_accuracy_test": test_acc}
    per_drop: dict[str, Any] = {}
    for key, q in calib.thresholds.items():
        rec = measure_efficiency(
            model,
            splits.test.x,
            splits.test.y,
            q,
            args.rule,
            latency_samples=args.latency_samples,
            engine=args.engine,
        )
        per_drop[key] = rec.to_dict()
        say(
            f"  drop <= {key} on calibration (q={q:.4f}): test accuracy "
            f"{100 * rec.accuracy_early_exit:.2f} % (final exit {100 * rec.accuracy_final:.2f} %), "
            f"FLOPs saved {100 * rec.flops_saving:.1f} %, efficacy {rec.efficacy:.3f}, "
            f"latency {rec.latency_ms:.2f} ms vs {rec.latency_full_ms:.2f} ms per input"
        )
    metrics["early_exit_test"] = per_drop
    manifest = {
        "model": {**config, "multi_exit": {**model.config(), "exit_costs": model.exit_costs()}},
        "dataset": splits.info(),
        "training": {"backbone": ckpt.manifest.get("training", {}), "exits": record},
        "calibration": {**calib.as_dict(), "seen_by_backbone": seen},
        "metrics": metrics,
        "backbone": model_info(ckpt.manifest, ckpt.path),
    }
    save_checkpoint(model, out, manifest)
    print(
        f"multi-exit checkpoint in {out}: {len(model.positions)} ICs, threshold "
        f"{model.threshold:.4f} ({args.rule}, <= {100 * args.drop:g} % drop on calibration); "
        f"test FLOPs saved {100 * per_drop[drop_key(args.drop)]['flops_saving']:.1f} %"
    )
    if args.json:
        write_json(args.json, json.loads((out / MANIFEST).read_text()))
    # the checkpoint and its record first: a plot that cannot be drawn never costs them
    records = {f"drop {k}": v for k, v in per_drop.items()}
    title = "Where test inputs exit"
    draw_plots(
        [
            partial(exit_histogram, records, out / HISTOGRAM, title=title),
            partial(efficacy_curves, records, out / CURVES),
        ]
    )
    return 0


def register(sub: Any) -> None:
    """Add the exits command."""
    p = add_command(sub, "exits", DESCRIPTION)
    add_model_options(p, f"the backbone: {MODEL_HELP[len('the model: ') :]}")
    p.add_argument("--data", default="mnist5k", help=f"the backbone's training {DATA_HELP}")
    p.add_argument("--out", required=True, help="folder for the multi-exit checkpoint and plots")
    p.add_argument(
        "--exits",
        default="auto",
        help="units to put exits after: auto (at ~15/30/45/60/75/90 %% of the FLOPs), all, or "
        "a list such as 1,3,5",
    )
    p.add_argument("--mode", default="ic-only", help="ic-only (backbone frozen) or end-to-end")
    p.add_argument("--epochs", type=int, default=10, help="epochs of exit training")
    p.add_argument("--batch-size", type=int, default=128, help="batch size of exit training")
    p.add_argument(
        "--lr", type=float, help="learning rate (default: 1e-3 ic-only with Adam, 0.05 end-to-end)"
    )
    p.add_argument("--rule", default="max_softmax", help="exit rule: max_softmax or entropy")
    p.add_argument(
        "--calibration",
        type=int,
        help="samples held out of the training split to choose thresholds (default: the split "
        "the backbone held out with robustlab train --calibration, else 500)",
    )
    p.add_argument(
        "--data-seed",
        type=int,
        help="seed of the calibration split (default: the backbone's, else 0)",
    )
    p.add_argument(
        "--drops",
        default="0.05,0.15",
        help="relative accuracy drops to calibrate thresholds for",
    )
    p.add_argument(
        "--drop", type=float, default=0.05, help="the drop whose threshold the checkpoint uses"
    )
    p.add_argument(
        "--adv", default="none", help="adversarial exit training: none, pgd or deepsloth"
    )
    p.add_argument(
        "--adv-eps", type=float, help="budget of the adversarial exit training (default: 0, none)"
    )
    p.add_argument("--adv-norm", default="linf", help="norm of that budget: linf, l2 or l1")
    p.add_argument(
        "--adv-steps", type=int, default=5, help="steps of the adversarial exit training"
    )
    p.add_argument(
        "--latency-samples",
        type=int,
        default=200,
        help="test inputs timed one by one for the latency (0: skip)",
    )
    add_engine(p)
    add_trust_unhashed(p)
    add_common(
        p,
        json_help="write the multi-exit checkpoint's manifest as JSON here (default: not written)",
        overwrite_help="replace a checkpoint in --out, and output files robustlab did not write "
        "(files the command reads are never replaced)",
    )
    p.set_defaults(func=run)

"""robustlab train: train a model with a method and write its checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io import write_json
from .common import DATA_HELP, add_command, add_common, checked_outputs, json_output, key_values

if TYPE_CHECKING:  # torch is imported when the command runs, not when the parser is built
    from ..core.distributed import Processes

DESCRIPTION = "train a model (standard, pgd-at, trades or mart) and write its checkpoint"
RECIPE = "(default: the method's recipe)"


def register(sub: Any) -> None:
    """Add the train command."""
    p = add_command(sub, "train", DESCRIPTION)
    p.add_argument("--arch", default="resnet8", help="architecture (see robustlab models)")
    p.add_argument("--data", default="mnist5k", help=DATA_HELP)
    p.add_argument("--method", default="standard", help="standard, pgd-at, trades or mart")
    p.add_argument(
        "--eps",
        type=float,
        help="perturbation budget of adversarial training (default: none; pgd-at and trades "
        "need it)",
    )
    p.add_argument("--norm", default="linf", help="norm of the budget: linf or l2")
    p.add_argument("--epochs", type=int, help=f"training epochs {RECIPE}")
    p.add_argument(
        "--batch-size",
        type=int,
        help=f"training batch size; under torchrun the global batch, split across the processes "
        f"{RECIPE}",
    )
    p.add_argument(
        "--lr", type=float, help=f"peak learning rate of the one-cycle schedule {RECIPE}"
    )
    p.add_argument("--steps", type=int, help=f"inner attack steps of adversarial training {RECIPE}")
    p.add_argument(
        "--beta", type=float, default=6.0, help="weight of the robustness term (trades, mart)"
    )
    p.add_argument(
        "--eps-warmup", type=float, help=f"fraction of training over which eps ramps up {RECIPE}"
    )
    p.add_argument(
        "--arch-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="architecture option, e.g. width=32; repeatable (default: the architecture's own)",
    )
    p.add_argument(
        "--regularizer",
        action="append",
        default=[],
        metavar="NAME=STRENGTH",
        help="compression penalty added to any method: l1, group-lasso, group-lasso-si, "
        "nuclear, filter-spread, alignment or alignment-l2, e.g. l1=1e-4; repeatable "
        "(default: none)",
    )
    p.add_argument(
        "--awp",
        type=float,
        metavar="GAMMA",
        help="adversarial weight perturbation of relative size GAMMA per layer on top of "
        "pgd-at, trades or mart, e.g. 5e-3 (default: none)",
    )
    p.add_argument(
        "--awp-warmup",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="epochs trained before AWP starts (default: 0)",
    )
    p.add_argument(
        "--out", required=True, help="checkpoint folder (an interrupted run there resumes)"
    )
    p.add_argument(
        "--calibration",
        type=int,
        default=0,
        help="hold this many training samples out: the calibration split that robustlab exits "
        "chooses thresholds on (0: train on all)",
    )
    p.add_argument("--data-seed", type=int, default=0, help="seed of the calibration split")
    p.add_argument(
        "--sync-bn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="under torchrun, normalise BatchNorm layers with the statistics of the whole global "
        "batch, as one process does, so N processes train the model one process would; "
        "--no-sync-bn: with each process's own part (torch DDP's default: fewer exchanges "
        "between the processes, but not the model one process trains) (default: on)",
    )
    add_common(
        p,
        json_help="write the checkpoint's manifest as JSON here (default: not written)",
        overwrite_help="replace a finished checkpoint in --out, and output files robustlab did "
        "not write (files the command reads are never replaced)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Under torchrun, join the run's processes (rank 0 alone speaks); then check, train, say
    how it went."""
    from ..core.device import resolve_device
    from ..core.distributed import one_voice, processes_of_run

    with one_voice(), processes_of_run(resolve_device(args.device)) as (processes, device):
        return _run(args, processes, device)


def _run(args: argparse.Namespace, processes: Processes, device: str) -> int:
    """Check the outputs, train (one of ``processes``), say how it went (rank 0)."""
    from ..models import get_architecture
    from ..models.checkpoint import checkpoint_outputs
    from ..train import TrainConfig, train
    from ..train.awp import awp_hooks
    from ..train.compression import parse_regularizers, regularizer_hooks
    from ..train.distributed import check_regularizers_for

    out = Path(args.out)
    outputs = [*checkpoint_outputs(out), json_output(args.json)]
    checked_outputs(args, outputs, data=[args.data])
    arch_options = key_values(args.arch_option)
    get_architecture(args.arch).arguments(**arch_options)  # its options, before any work
    strengths = parse_regularizers(args.regularizer)
    check_regularizers_for(strengths, processes)
    regularizers = regularizer_hooks(strengths)
    cfg = TrainConfig(
        arch=args.arch,
        data=args.data,
        method=args.method,
        eps=args.eps,
        norm=args.norm,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        steps=args.steps,
        beta=args.beta,
        eps_warmup=args.eps_warmup,
        seed=args.seed,
        arch_options=arch_options,
    )
    hooks = [*awp_hooks(cfg, args.awp, args.awp_warmup), *regularizers]
    splits = None
    if args.calibration:
        from ..data import load_data

        # the same seeded split `robustlab exits` holds out, so its thresholds are chosen on
        # samples the backbone never trained on
        splits = load_data(args.data, calibration=args.calibration, seed=args.data_seed)
    result = train(
        cfg,
        out,
        splits=splits,
        device=device,
        progress=not args.no_progress,
        hooks=hooks,
        processes=processes,
        sync_bn=args.sync_bn,
    )
    if not processes.main:
        return 0
    acc = result.manifest["metrics"]["clean_accuracy"]
    print(
        f"trained {cfg.arch} ({cfg.method}) in {result.manifest['train_time_s']:.0f} s: "
        f"clean test accuracy {100 * acc:.2f} %; checkpoint in {out}"
    )
    if args.json:
        write_json(args.json, result.manifest)
    return 0

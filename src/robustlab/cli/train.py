"""robustlab train: train a model with a method and write its checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io import write_json
from .common import DATA_HELP, add_command, add_common, checked_outputs, json_output, key_values

if TYPE_CHECKING:  # torch is imported when the command runs, not when the parser is built
    from ..core.distributed import Processes

DESCRIPTION = (
    "train a model (standard, pgd-at, trades, mart, fast-at or free-at; optionally with robust "
    "early stopping) and write its checkpoint"
)
RECIPE = "(default: the method's recipe)"
METHOD_HELP = (
    "standard; pgd-at (Madry et al.); trades; mart; fast-at (one FGSM step from a random "
    "start, with the catastrophic-overfitting check); free-at (each batch replayed --replays "
    "times, the perturbation carried over)"
)


def register(sub: Any) -> None:
    """Add the train command."""
    p = add_command(sub, "train", DESCRIPTION)
    p.add_argument("--arch", default="resnet8", help="architecture (see robustlab models)")
    p.add_argument("--data", default="mnist5k", help=DATA_HELP)
    p.add_argument("--method", default="standard", help=METHOD_HELP)
    p.add_argument(
        "--eps",
        type=float,
        help="perturbation budget of adversarial training (default: none; every method but "
        "standard needs it)",
    )
    p.add_argument("--norm", help="norm of the budget: linf, l2 or l1 (default: linf)")
    p.add_argument(
        "--epochs",
        type=int,
        help="training epochs; for free-at, passes over the data, each replaying every batch "
        "--replays times, so each costs about m standard epochs (the paper runs the standard "
        f"number of epochs divided by m) {RECIPE}",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help=f"training batch size; under torchrun the global batch, split across the processes "
        f"{RECIPE}",
    )
    p.add_argument(
        "--lr", type=float, help=f"peak learning rate of the one-cycle schedule {RECIPE}"
    )
    p.add_argument("--steps", type=int, help=f"inner PGD steps (pgd-at, trades, mart) {RECIPE}")
    p.add_argument(
        "--alpha-ratio",
        type=float,
        help="inner step size as a multiple of eps / steps (pgd-at, trades, mart; default 2.5) "
        "or of eps (fast-at; default 1.0 from its recipe: the paper's 1.25 overfits "
        "catastrophically on mnist5k at eps 0.3)",
    )
    p.add_argument(
        "--beta",
        type=float,
        help="weight of the robustness term (trades, mart; default: the method's, 6)",
    )
    p.add_argument(
        "--replays",
        type=int,
        help="free-at: steps made on each batch in a row (default: 4 from the recipe; the "
        "paper's CIFAR value is 8)",
    )
    p.add_argument(
        "--early-stop",
        action="store_true",
        help="robust early stopping (Rice et al. 2020), for any adversarial method: measure "
        "PGD-10 robust accuracy on the held-out samples (--calibration) after every epoch and "
        "keep the best epoch's weights",
    )
    p.add_argument(
        "--overfit-drop",
        type=float,
        metavar="DROP",
        help="catastrophic-overfitting check, for any adversarial method: stop, and roll back "
        "to the previous epoch, when held-out PGD-10 robust accuracy falls more than DROP "
        "(absolute) below its best (default: 0.2 for fast-at, else off; 0 turns it off)",
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
        help="hold this many training samples out, never trained on: --early-stop and the "
        "overfitting check measure on them, and robustlab exits chooses thresholds on them "
        "(default: 200 when a check is on, else 0: train on all)",
    )
    p.add_argument("--data-seed", type=int, default=0, help="seed of the held-out split")
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
    """Under torchrun, join the run's processes; then check, train, say how it went."""
    from ..core.device import resolve_device
    from ..core.distributed import processes_of_run

    with processes_of_run(resolve_device(args.device)) as (processes, device):
        return _run(args, processes, device)


def _run(args: argparse.Namespace, processes: Processes, device: str) -> int:
    """Check the outputs, train (one of ``processes``), say how it went (rank 0)."""
    from ..models import get_architecture
    from ..models.checkpoint import checkpoint_outputs
    from ..train import TrainConfig, train, training_splits
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
        alpha_ratio=args.alpha_ratio,
        replays=args.replays,
        early_stop=args.early_stop,
        overfit_drop=args.overfit_drop,
    )
    hooks = [*awp_hooks(cfg, args.awp, args.awp_warmup), *regularizers]
    # the same seeded split `robustlab exits` holds out, so its thresholds are chosen on
    # samples the backbone never trained on
    splits = training_splits(cfg.resolved(), args.calibration, args.data_seed)
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
    training = result.manifest["training"]
    kept = training.get("overfitting", {}).get("kept_epoch", training.get("best_epoch"))
    print(
        f"trained {cfg.arch} ({cfg.method}) in {result.manifest['train_time_s']:.0f} s: "
        f"clean test accuracy {100 * acc:.2f} %"
        + (f" (weights of epoch {kept})" if kept is not None else "")
        + f"; checkpoint in {out}"
    )
    if args.json:
        write_json(args.json, result.manifest)
    return 0

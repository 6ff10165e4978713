"""robustlab sloth: DeepSloth slowdown attacks on a multi-exit checkpoint, clean vs attacked.

Measures, on test points, the early-exit efficiency of the clean inputs and of their
DeepSloth examples (efficacy, average FLOPs, exit distribution, final-exit and early-exit
accuracy, wall-clock latency per input), optionally also for the universal and
class-universal variants, the PGD baselines, and a black-box transfer from a surrogate.

Under ``torchrun --nproc_per_node N -m robustlab sloth ...`` the test points' batches are
shared among the N processes (``analysis.slowdown``); rank 0 alone prints, shows progress
and writes the record, the store's row and the plots.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RobustlabError
from ..io import write_json
from .common import (
    DATA_HELP,
    add_command,
    add_common,
    add_engine,
    add_store,
    add_trust_unhashed,
    check_fit,
    checked_outputs,
    draw_plots,
    finished_record,
    json_output,
    model_info,
    plot_outputs,
    say,
    store_output,
)

if TYPE_CHECKING:
    from ..core.distributed import Processes

DESCRIPTION = "DeepSloth slowdown attack on a multi-exit checkpoint, clean vs attacked"
HISTOGRAM = "sloth_exit_histogram.png"
CURVES = "sloth_efficacy_curve.png"
#: How long, in seconds, a torchrun process waits for the others (rank 0 crafting a
#: universal perturbation, the slowest process's share).
WAIT_S = 24 * 3600.0


def _summary(label: str, rec: Any, clean: Any) -> str:
    """One line on an efficiency record next to the clean one."""
    drop = 1 - rec.efficacy / clean.efficacy if clean.efficacy > 0 else 0.0
    return (
        f"  {label:<22} efficacy {rec.efficacy:.3f} (drop {100 * drop:5.1f} %), "
        f"avg FLOPs {rec.avg_flops / 1e6:.2f} M, accuracy final {100 * rec.accuracy_final:.1f} % "
        f"/ early exit {100 * rec.accuracy_early_exit:.1f} %, latency {rec.latency_ms:.2f} ms"
    )


def _load_multi_exit(path: str, device: str, trust_unhashed: bool) -> tuple[Any, dict[str, Any]]:
    """Load a multi-exit checkpoint (from robustlab exits) onto the device."""
    from ..models.checkpoint import load_checkpoint
    from ..models.foreign import foreign_kind
    from ..models.multiexit import MultiExitNetwork

    if foreign_kind(path) is not None:
        raise RobustlabError(
            f"{path} is not a multi-exit checkpoint; attach exits first with robustlab exits "
            "(which takes torchvision: and timm: ResNets too)"
        )
    ckpt = load_checkpoint(path, trust_unhashed=trust_unhashed)
    if not isinstance(ckpt.model, MultiExitNetwork):
        raise RobustlabError(
            f"{path} is not a multi-exit checkpoint; attach exits first with robustlab exits"
        )
    return ckpt.model.to(device), ckpt.manifest


def run(args: argparse.Namespace) -> int:
    """Join torchrun's processes (if it started this one), then attack and measure."""
    from ..core.device import resolve_device
    from ..core.distributed import processes_of_run

    with processes_of_run(resolve_device(args.device), WAIT_S) as (processes, device):
        return run_sloth(args, processes, device)


def run_sloth(args: argparse.Namespace, processes: Processes, device: str) -> int:
    """Attack a multi-exit checkpoint with DeepSloth and report clean vs attacked efficiency."""
    from ..analysis.efficiency import drop_key
    from ..analysis.slowdown import (
        Perturb,
        attack_variant,
        measure_slowdown,
        shared_class_universal,
        shared_universal,
    )
    from ..attacks.deepsloth import apply, class_universal_perturbations, universal_perturbation
    from ..attacks.registry import make_attack
    from ..core.checks import check_batch_size
    from ..core.distributed import together
    from ..data import load_data
    from ..models.engine import check_engine
    from ..models.multiexit import check_threshold

    with together(processes):  # a bad option, output or input stops every process, said once
        attack: Any = make_attack(
            "deepsloth",
            args.norm,
            args.eps,
            steps=args.steps,
            alpha=args.alpha,
            objective=args.objective,
            optimizer=args.optimizer,
            restarts=args.restarts,
            margin=args.margin,
            seed=args.seed,
        )
        check_batch_size(args.batch_size)
        check_engine(args.engine)
        if (args.universal or args.class_universal) and min(
            args.universal_epochs, args.universal_samples
        ) < 1:
            raise RobustlabError("--universal-epochs and --universal-samples must be >= 1")
        outputs = [json_output(args.json), store_output(args.store)]
        checked_outputs(
            args,
            [*outputs, *plot_outputs(args.plots, [HISTOGRAM, CURVES], "--plots")],
            models=[args.model, args.surrogate],
            data=[args.data],
        )
        trust = args.trust_unhashed
        model, manifest = _load_multi_exit(args.model, device, trust)
        # the surrogate is loaded now, not after the (long) white-box attack
        surrogate, surrogate_manifest = (
            _load_multi_exit(args.surrogate, device, trust) if args.surrogate else (None, None)
        )
        if args.threshold is not None:
            model.threshold = check_threshold(args.threshold)
        elif args.drop is not None:
            table = manifest.get("calibration", {}).get("thresholds", {})
            key = drop_key(args.drop)
            if key not in table:
                raise RobustlabError(
                    f"the checkpoint has no threshold calibrated for a {key} drop; it has "
                    f"{', '.join(table) or 'none'}"
                )
            model.threshold = check_threshold(float(table[key]))
        splits = load_data(args.data)
        check_fit(manifest, splits)
        if surrogate_manifest is not None:  # before the long white-box attack, like the model
            check_fit(surrogate_manifest, splits)
        test = splits.test
        n = len(test) if args.n is None else args.n
        if not 1 <= n <= len(test):
            raise RobustlabError(f"n must be between 1 and {len(test)}, got {n}")
    m = manifest["model"]
    if processes.main:
        say(
            f"{n} test points, threshold {model.threshold:.4f} ({model.rule}), "
            f"{args.norm} eps={args.eps}, {attack.variant}"
            + (f", {processes.world_size} processes" if processes.distributed else "")
        )
    options = {
        "norm": args.norm,
        "eps": args.eps,
        "objective": args.objective,
        "margin": args.margin,
        "epochs": args.universal_epochs,
        "seed": args.seed,
    }
    crafting = splits.train.head(min(args.universal_samples, len(splits.train)))
    if args.universal or args.class_universal:
        cx, cy = crafting.x.to(device), crafting.y.to(device)
    # each per-sample attack runs batch by batch, each batch seeded by its start
    variants: dict[str, Perturb] = {attack.variant: attack_variant(attack, model)}
    if args.universal:  # optimised over the whole crafting set: crafted by rank 0
        delta = shared_universal(
            processes, lambda: universal_perturbation(model, cx, **options), device
        )
        variants["universal"] = lambda x, y, start: apply(x, delta)
    if args.class_universal:  # one per class, each on its class alone: shared by class
        deltas = shared_class_universal(
            processes,
            lambda classes: class_universal_perturbations(
                model, cx, cy, splits.num_classes, classes, **options
            ),
            splits.num_classes,
        )
        variants["class_universal"] = lambda x, y, start: apply(x, deltas[y])
    if args.baselines:
        for target in ("final", "avg", "max"):
            pgd: Any = make_attack(
                f"pgd-{target}", args.norm, args.eps, steps=args.steps, seed=args.seed
            )
            variants[pgd.variant] = attack_variant(pgd, model)
        paper: Any = make_attack(
            "deepsloth",
            args.norm,
            args.eps,
            steps=args.steps,
            objective="uniform",
            optimizer="pgd",
            seed=args.seed,
        )
        variants.setdefault(paper.variant, attack_variant(paper, model))
    if surrogate is not None:
        variants["black_box"] = attack_variant(attack, surrogate)
    config = {
        "attack": attack.config(),
        "universal": options if args.universal or args.class_universal else None,
        "universal_samples": len(crafting),
        "baselines": args.baselines,
    }
    result = measure_slowdown(
        model,
        test,
        n,
        variants,
        batch_size=args.batch_size,
        seed=args.seed,
        config=config,
        others=[] if surrogate is None else [surrogate],
        latency_samples=args.latency_samples,
        engine=args.engine,
        progress=not args.no_progress,
        processes=processes,
    )
    clean, attacked = result.records["clean"], result.records[attack.variant]
    extra = {label: result.records[label] for label in variants if label != attack.variant}
    record: dict[str, Any] = {
        "kind": "sloth",
        "variant": attack.variant,
        "attack": attack.config(),
        "threat_model": attack.threat.as_dict(),
        "model": {**model_info(manifest, args.model), "positions": m["multi_exit"]["positions"]},
        "data": splits.name,
        "n": n,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "world_size": result.world_size,
        "attack_seconds": round(result.seconds[attack.variant], 2),
        "clean": clean.to_dict(),
        "attacked": attacked.to_dict(),
        "efficacy_drop": _drop(clean.efficacy, attacked.efficacy),
        "latency_increase": _ratio(attacked.latency_ms, clean.latency_ms),
    }
    if surrogate is not None:
        record["surrogate"] = str(args.surrogate)
    for label, rec in extra.items():
        record[label] = {**rec.to_dict(), "efficacy_drop": _drop(clean.efficacy, rec.efficacy)}
    record["extras"] = list(extra)
    record["per_sample"] = {"label": test.y[:n].tolist(), **result.per_sample()}
    with together(processes):  # rank 0 alone speaks and writes, once
        if processes.main:
            _report(args, record, {"clean": clean, attack.variant: attacked, **extra})
    return 0


def _report(args: argparse.Namespace, record: dict[str, Any], shown: dict[str, Any]) -> None:
    """Print a sloth run's results and write its record, store row and plots."""
    clean = shown["clean"]
    for label, rec in shown.items():
        say(_summary(label, rec, clean))
    variant = record["variant"]
    attacked = shown[variant]
    print(
        f"{variant} at {args.norm} eps={args.eps}: efficacy {clean.efficacy:.3f} -> "
        f"{attacked.efficacy:.3f} ({100 * record['efficacy_drop']:.1f} % drop), latency "
        f"{clean.latency_ms:.2f} -> {attacked.latency_ms:.2f} ms per input, final-exit accuracy "
        f"{100 * attacked.accuracy_final:.1f} %"
    )
    record = finished_record(args, record)
    # the records first: a plot that cannot be drawn never costs one
    if args.json:
        write_json(args.json, record)
    if args.store:
        from ..store import ResultStore

        ResultStore(args.store).add(record, label=args.label or "sloth")
    if args.plots:
        from ..report.exit_plots import efficacy_curves, exit_histogram

        out = Path(args.plots)
        title = "Where inputs exit"
        draw_plots(
            [
                partial(exit_histogram, shown, out / HISTOGRAM, title=title),
                partial(efficacy_curves, shown, out / CURVES),
            ]
        )


def _drop(clean: float, attacked: float) -> float:
    """Relative efficacy drop (0 when the clean efficacy is 0)."""
    return 1 - attacked / clean if clean > 0 else 0.0


def _ratio(a: float, b: float) -> float:
    """a / b (0 when b is 0)."""
    return a / b if b > 0 else 0.0


def register(sub: Any) -> None:
    """Add the sloth command."""
    p = add_command(sub, "sloth", DESCRIPTION)
    p.add_argument("--model", required=True, help="multi-exit checkpoint (from robustlab exits)")
    p.add_argument("--data", default="mnist5k", help=f"test {DATA_HELP}")
    p.add_argument("--norm", default="linf", help="norm of the budget: linf, l2 or l1")
    p.add_argument("--eps", type=float, required=True, help="perturbation budget")
    p.add_argument("--steps", type=int, default=100, help="attack iterations")
    p.add_argument(
        "--restarts",
        type=int,
        default=1,
        help="attack runs per point (later ones from a random start); per point the example "
        "reaching the latest exit is kept",
    )
    p.add_argument("--alpha", type=float, help="step size (default: the optimizer's)")
    p.add_argument(
        "--objective",
        default="cost",
        help="cost (ours: expected saving under soft exits), threshold (ours: hinge on each "
        "IC's confidence above q) or uniform (the paper's)",
    )
    p.add_argument("--optimizer", default="apgd", help="apgd or pgd (the paper's)")
    p.add_argument("--margin", type=float, default=0.1, help="hinge margin in log-confidence")
    p.add_argument(
        "--threshold", type=float, help="exit threshold to attack (default: the model's)"
    )
    p.add_argument(
        "--drop",
        type=float,
        help="use the checkpoint's threshold calibrated for this drop (default: the model's)",
    )
    p.add_argument(
        "--n",
        "--points",
        type=int,
        default=500,
        help="test points (under torchrun write --points: torchrun takes --n for an "
        "abbreviation of its own options)",
    )
    p.add_argument("--batch-size", type=int, default=250, help="points attacked at once")
    p.add_argument("--universal", action="store_true", help="also one perturbation for all")
    p.add_argument("--class-universal", action="store_true", help="also one per class")
    p.add_argument(
        "--universal-samples",
        type=int,
        default=1000,
        help="training points the universal perturbations are crafted on",
    )
    p.add_argument(
        "--universal-epochs",
        type=int,
        default=10,
        help="passes over those points when crafting them",
    )
    p.add_argument(
        "--baselines", action="store_true", help="also PGD final/avg/max and the paper's attack"
    )
    p.add_argument(
        "--surrogate",
        help="multi-exit checkpoint to craft on for a black-box transfer (default: none)",
    )
    p.add_argument(
        "--plots",
        metavar="DIR",
        help="folder for exit histograms and efficacy curves (default: no plots)",
    )
    p.add_argument(
        "--latency-samples", type=int, default=200, help="inputs timed one by one (0: skip)"
    )
    add_store(p, "sloth")
    add_engine(p)
    add_trust_unhashed(p)
    add_common(p)
    p.set_defaults(func=run)

"""Multi-exit resnet on mnist5k: clean savings, and DeepSloth slowdown over an eps curve.

Trains (or reuses from --out) a resnet backbone with the standard recipe, attaches SDN exits
(IC-only training), calibrates the thresholds on a held-out calibration split (5 % and 15 %
relative accuracy drop), then measures on the test split:

1. clean: FLOPs saving and measured latency saving of early exit (batch 1, one thread);
2. attacked, per eps (linf, and the l2 / l1 budgets given): efficacy drop, latency increase and
   final-exit accuracy, for the paper's DeepSloth (uniform objective, signed PGD) and for ours
   (threshold-aware hinge, APGD-style step control);
3. with --extras: universal and class-universal DeepSloth, the PGD baselines, black-box
   transfer from a surrogate (same recipe, another seed) and the effect of adversarially
   trained exits (PGD-avg and DeepSloth exit training).

Prints one JSON record per measurement and writes them all to --json.

    python benchmarks/exits_mnist5k.py --out runs/exits [--arch resnet20] [--exits all]
        [--eps 0.05,0.1,0.15,0.2,0.25,0.3] [--l2-eps 1,2] [--l1-eps 10,20] [--n 500]
        [--steps 100] [--extras] [--json runs/exits/results.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from robustlab.analysis.efficiency import calibrate, measure_efficiency
from robustlab.attacks.deepsloth import (
    DeepSloth,
    ExitPGD,
    apply,
    class_universal_perturbations,
    universal_perturbation,
)
from robustlab.data import DataSplits, load_data
from robustlab.models.checkpoint import MANIFEST, load_checkpoint, save_checkpoint
from robustlab.models.multiexit import MultiExitNetwork, attach_exits
from robustlab.train import TrainConfig, train
from robustlab.train.sdn import SDNConfig, train_exits


def _emit(records: list[dict[str, Any]], rec: dict[str, Any]) -> None:
    records.append(rec)
    print(json.dumps(rec), flush=True)


def backbone(
    out: Path, arch: str, seed: int, splits: DataSplits, epochs: int | None = None
) -> torch.nn.Module:
    """The standard-recipe backbone, trained once on train minus calibration, kept under ``out``.

    A cached checkpoint whose training saw the calibration samples (another calibration size)
    is refused: thresholds calibrated on data the backbone was trained on are biased.
    """
    folder = out / f"{arch}-standard-seed{seed}"
    if (folder / MANIFEST).exists():
        ckpt = load_checkpoint(folder)
        held = ckpt.manifest.get("dataset", {}).get("calibration_size")
        want = 0 if splits.calibration is None else len(splits.calibration)
        if held != want:
            raise SystemExit(
                f"{folder} was trained with calibration_size={held}, not {want}: its training "
                "saw the calibration split; use another --out"
            )
        return ckpt.model
    cfg = TrainConfig(arch=arch, data="mnist5k", seed=seed, epochs=epochs)
    return train(cfg, folder, splits=splits, progress=False).model


def multi_exit(
    out: Path,
    arch: str,
    seed: int,
    positions: list[int] | None,
    splits: DataSplits,
    sdn: SDNConfig,
    tag: str = "",
    epochs: int | None = None,
) -> MultiExitNetwork:
    """Backbone + exits trained IC-only (or as ``sdn`` says) + calibrated thresholds, cached."""
    folder = out / f"{arch}-exits-seed{seed}{tag}"
    if (folder / MANIFEST).exists():
        model = load_checkpoint(folder).model
        assert isinstance(model, MultiExitNetwork)
        return model
    torch.manual_seed(seed)
    net = backbone(out, arch, seed, splits, epochs)
    shape = (splits.in_channels, splits.image_size, splits.image_size)
    model = attach_exits(net, shape, splits.num_classes, positions)
    record = train_exits(model, splits.train, sdn, progress=False)
    calib = calibrate(model, splits.calibration, (0.05, 0.15))
    model.threshold = calib.thresholds["5%"]
    config = load_checkpoint(out / f"{arch}-standard-seed{seed}").manifest["model"]
    manifest = {
        "model": {**config, "multi_exit": model.config()},
        "calibration": calib.as_dict(),
        "training": {"exits": record},
    }
    save_checkpoint(model, folder, manifest)
    return model


def main() -> None:
    """Run the benchmark and print/write its records."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--exits", default="all", help="all (after every block), auto, or 1,3,5")
    p.add_argument("--eps", default="0.05,0.1,0.15,0.2,0.25,0.3")
    p.add_argument("--l2-eps", default="")
    p.add_argument("--l1-eps", default="")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--ic-epochs", type=int, default=15)
    p.add_argument(
        "--backbone-epochs", type=int, default=None, help="default: the standard recipe's"
    )
    p.add_argument("--latency-samples", type=int, default=500, help="clean part; attacked: 200")
    p.add_argument("--extras", action="store_true")
    p.add_argument(
        "--extras-budgets", type=int, default=3, help="extras run on this many leading budgets"
    )
    p.add_argument("--extras-only", action="store_true", help="skip the per-sample eps curve")
    p.add_argument(
        "--ablation",
        action="store_true",
        help="every objective x optimizer of DeepSloth on the given budgets (no curve, no latency)",
    )
    p.add_argument(
        "--adv-ic-epochs", type=int, help="epochs of adversarial exit training (default: ic)"
    )
    p.add_argument("--json")
    args = p.parse_args()
    out = Path(args.out)
    splits = load_data("mnist5k", calibration=500)
    probe = backbone(out, args.arch, 0, splits, args.backbone_epochs)
    n_units = len(
        attach_exits(probe, (1, 28, 28), 10, [0]).plan.units
    )  # stem + blocks; exits go after 0..n-2
    positions: list[int] | None
    if args.exits == "all":
        positions = list(range(1, n_units - 1))
    elif args.exits == "auto":
        positions = None
    else:
        positions = [int(v) for v in args.exits.split(",")]
    sdn = SDNConfig(epochs=args.ic_epochs)
    model = multi_exit(out, args.arch, 0, positions, splits, sdn, epochs=args.backbone_epochs)
    x, y = splits.test.x[: args.n], splits.test.y[: args.n]
    records: list[dict[str, Any]] = []
    calib = calibrate(model, splits.calibration, (0.05, 0.15))
    for key, q in calib.thresholds.items():
        rec = measure_efficiency(
            model, splits.test.x, splits.test.y, q, latency_samples=args.latency_samples
        )
        _emit(
            records,
            {
                "part": "clean",
                "drop": key,
                "threshold": q,
                "positions": model.positions,
                "accuracy_final": rec.accuracy_final,
                "accuracy_early_exit": rec.accuracy_early_exit,
                "flops_saving": rec.flops_saving,
                "efficacy": rec.efficacy,
                "latency_ms": rec.latency_ms,
                "latency_full_ms": rec.latency_full_ms,
                "latency_saving": rec.latency_saving,
                "exit_fractions": rec.exit_fractions,
            },
        )
    model.threshold = calib.thresholds["5%"]
    clean = measure_efficiency(model, x, y, latency_samples=200)
    budgets = [("linf", float(e)) for e in args.eps.split(",") if e]
    budgets += [("l2", float(e)) for e in args.l2_eps.split(",") if e]
    budgets += [("l1", float(e)) for e in args.l1_eps.split(",") if e]

    def attacked(label: str, x_adv: torch.Tensor, norm: str, eps: float, secs: float) -> None:
        rec = measure_efficiency(model, x_adv, y, latency_samples=200)
        _emit(
            records,
            {
                "part": "attacked",
                "variant": label,
                "norm": norm,
                "eps": eps,
                "efficacy_clean": clean.efficacy,
                "efficacy": rec.efficacy,
                "efficacy_drop": 1 - rec.efficacy / clean.efficacy,
                "latency_clean_ms": clean.latency_ms,
                "latency_ms": rec.latency_ms,
                "latency_increase": rec.latency_ms / clean.latency_ms,
                "accuracy_final": rec.accuracy_final,
                "accuracy_early_exit": rec.accuracy_early_exit,
                "attack_seconds": round(secs, 1),
            },
        )

    def batched(attack: Any, target: MultiExitNetwork) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        parts = [attack(target, x[i : i + 250], y[i : i + 250]) for i in range(0, len(x), 250)]
        return torch.cat(parts), time.perf_counter() - t0

    if args.ablation:
        for norm, eps in budgets:
            for objective in ("uniform", "threshold", "cost"):
                for optimizer in ("pgd", "apgd"):
                    attack = DeepSloth(
                        norm=norm,
                        eps=eps,
                        steps=args.steps,
                        objective=objective,
                        optimizer=optimizer,
                    )
                    x_adv, secs = batched(attack, model)
                    rec = measure_efficiency(model, x_adv, y, latency_samples=0)
                    _emit(
                        records,
                        {
                            "part": "ablation",
                            "variant": attack.variant,
                            "norm": norm,
                            "eps": eps,
                            "efficacy_clean": clean.efficacy,
                            "efficacy": rec.efficacy,
                            "efficacy_drop": 1 - rec.efficacy / clean.efficacy,
                            "accuracy_final": rec.accuracy_final,
                            "attack_seconds": round(secs, 1),
                        },
                    )
    for norm, eps in [] if args.extras_only or args.ablation else budgets:
        for attack in (
            DeepSloth(norm=norm, eps=eps, steps=args.steps, objective="uniform", optimizer="pgd"),
            DeepSloth(norm=norm, eps=eps, steps=args.steps),
        ):
            x_adv, secs = batched(attack, model)
            attacked(attack.variant, x_adv, norm, eps, secs)
    if args.extras:
        crafting = splits.train.x[:1000]
        for norm, eps in budgets[: args.extras_budgets]:
            t0 = time.perf_counter()
            delta = universal_perturbation(model, crafting, norm=norm, eps=eps, epochs=10)
            attacked("universal", apply(x, delta), norm, eps, time.perf_counter() - t0)
            t0 = time.perf_counter()
            deltas = class_universal_perturbations(
                model, crafting, splits.train.y[:1000], 10, norm=norm, eps=eps, epochs=10
            )
            attacked("class-universal", apply(x, deltas[y]), norm, eps, time.perf_counter() - t0)
            for target in ("final", "avg", "max"):
                pgd = ExitPGD(norm=norm, eps=eps, steps=args.steps, target=target)
                x_adv, secs = batched(pgd, model)
                attacked(pgd.variant, x_adv, norm, eps, secs)
            surrogate = multi_exit(
                out, args.arch, 1, positions, splits, sdn, epochs=args.backbone_epochs
            )
            x_adv, secs = batched(DeepSloth(norm=norm, eps=eps, steps=args.steps), surrogate)
            attacked("black-box (surrogate seed 1)", x_adv, norm, eps, secs)
        for adversary in ("pgd", "deepsloth"):
            eps = budgets[0][1] if budgets else 0.1
            adv_epochs = args.adv_ic_epochs or args.ic_epochs
            adv_cfg = SDNConfig(epochs=adv_epochs, adversary=adversary, adv_eps=eps)
            defended = multi_exit(
                out,
                args.arch,
                0,
                positions,
                splits,
                adv_cfg,
                f"-at-{adversary}-eps{eps:g}-ep{adv_epochs}",
                epochs=args.backbone_epochs,
            )
            rec_clean = measure_efficiency(defended, x, y, latency_samples=0)
            for norm, e in budgets[: args.extras_budgets]:
                x_adv, secs = batched(DeepSloth(norm=norm, eps=e, steps=args.steps), defended)
                rec = measure_efficiency(defended, x_adv, y, latency_samples=0)
                _emit(
                    records,
                    {
                        "part": f"exits adversarially trained ({adversary}, eps {eps})",
                        "norm": norm,
                        "eps": e,
                        "efficacy_clean": rec_clean.efficacy,
                        "accuracy_early_exit_clean": rec_clean.accuracy_early_exit,
                        "efficacy": rec.efficacy,
                        "efficacy_drop": 1 - rec.efficacy / rec_clean.efficacy,
                        "accuracy_final": rec.accuracy_final,
                    },
                )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Drift monitoring on mnist5k: per made shift, the share of batches alarmed, and the
false-alarm rate with no shift over many batches, at a stated per-batch alpha.

The model is a checkpoint (--model, e.g. the zoo's resnet8-standard, which held out 500
training points as its calibration split) or, without one, an MLP trained here with 500
training points held out. The reference window is that held-out split, the stream the test
split (``monitor.drift_data``). Each shifted run tests --batches batches, all shifted; the
no-shift run tests --clean-batches batches (several passes over the 1000 test points).

Prints one JSON record per run, writes them to --json, and a Markdown table at the end.

    OMP_NUM_THREADS=1 python benchmarks/drift_mnist5k.py [--model runs/zoo/resnet8-standard]
        [--alpha 0.05] [--batch-size 50] [--batches 20] [--clean-batches 400]
        [--permutations 500] [--json runs/drift/results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustlab.models.checkpoint import load_checkpoint
from robustlab.monitor import (
    DriftConfig,
    DriftMonitor,
    held_out_windows,
    parse_shift,
    stream_batches,
)
from robustlab.monitor.drift_data import Windows
from robustlab.train import TrainConfig, train
from robustlab.train.loop import training_splits

SHIFTS = (
    "noise:0.05",
    "noise:0.1",
    "noise:0.3",
    "blur:0.5",
    "blur:1",
    "brightness:0.05",
    "brightness:0.1",
    "brightness:0.3",
    "prior:0.2",
    "prior:0.4",
    "prior:0.6",
    "adversarial:0.05",
    "adversarial:0.1",
    "adversarial:0.3",
)


def _model(path: str | None) -> tuple[nn.Module, dict[str, Any], str]:
    """The checkpoint at ``path``, else an MLP trained here (500 training points held out)."""
    if path:
        ckpt = load_checkpoint(path)
        return ckpt.model.eval(), ckpt.manifest, str(path)
    cfg = TrainConfig(arch="mlp", data="mnist5k", epochs=3, arch_options={"width": 32, "depth": 1})
    out = Path(tempfile.mkdtemp(prefix="drift-mlp-"))
    result = train(cfg, out, splits=training_splits(cfg, calibration=500), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    return result.model.eval(), manifest, "mlp (1x32, 3 epochs, trained here)"


def _run(
    monitor: DriftMonitor,
    windows: Windows,
    model: nn.Module,
    spec: str | None,
    args: argparse.Namespace,
    batches: int,
) -> dict[str, Any]:
    """Test ``batches`` batches (all shifted by ``spec``, or none) and count the alarms."""
    shift = parse_shift(spec, 10) if spec else None
    start = time.perf_counter()
    alarms = 0
    per_stat = dict.fromkeys(monitor.statistics, 0)
    accuracy = 0.0
    for b in stream_batches(
        windows.stream, args.batch_size, batches=batches, shift=shift, model=model, seed=args.seed
    ):
        check = monitor.check(b.x, b.index, b.y)
        alarms += check.alarm
        accuracy += check.accuracy or 0.0
        for name in check.alarms:
            per_stat[name] += 1
    share = alarms / batches
    half = 1.96 * math.sqrt(max(share * (1 - share), 1e-12) / batches)  # normal 95 % interval
    return {
        "shift": spec or "none",
        "batches": batches,
        "alarmed": alarms,
        "share_alarmed": share,
        "ci95": [max(0.0, share - half), min(1.0, share + half)],
        "per_statistic": {k: v / batches for k, v in per_stat.items()},
        "accuracy": accuracy / batches,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    """Run every shift and the no-shift stream; print and save the records."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint (default: train an MLP here)")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--batches", type=int, default=20, help="batches per shift")
    p.add_argument("--clean-batches", type=int, default=400, help="batches with no shift")
    p.add_argument("--permutations", type=int, default=500)
    p.add_argument("--shifts", default=",".join(SHIFTS), help="shifts separated by ';' or ','")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the records here")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    model, manifest, name = _model(args.model)
    windows = held_out_windows("mnist5k", "mnist5k", manifest)
    config = DriftConfig(alpha=args.alpha, permutations=args.permutations, seed=args.seed)
    monitor = DriftMonitor(model, windows.reference.x, config, num_classes=10)
    head = {"model": name, "alpha": args.alpha, "batch_size": args.batch_size, **windows.info()}
    print(json.dumps(head), flush=True)
    records = []
    shifts = [s for s in args.shifts.replace(";", ",").split(",") if s.strip()]
    for spec in [None, *shifts]:
        rec = _run(
            monitor,
            windows,
            model,
            spec,
            args,
            args.clean_batches if spec is None else args.batches,
        )
        records.append(rec)
        print(json.dumps(rec), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**head, "runs": records}, indent=2) + "\n")
    names = list(monitor.statistics)
    print(f"\n| shift | batches | any alarm | {' | '.join(names)} | accuracy | time |")
    print("|---" * (len(names) + 5) + "|")
    for r in records:
        cells = " | ".join(f"{100 * r['per_statistic'][n]:.0f} %" for n in names)
        lo, hi = r["ci95"]
        print(
            f"| {r['shift']} | {r['batches']} | {100 * r['share_alarmed']:.1f} % "
            f"({100 * lo:.1f}-{100 * hi:.1f}) | {cells} | {100 * r['accuracy']:.1f} % | {r['seconds']:.0f} s |"
        )


if __name__ == "__main__":
    main()

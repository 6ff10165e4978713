"""Time of `robustlab compress` on a resnet20, split: forward pass of the batch, SVDs and weight
metrics, the bound, the alignment term, the APGD-CE attacks, the representations.

Each part is given as a ratio to one forward pass of the data batch (the median of a few,
timed in the same process), for the published 100 APGD steps and for fewer. The model is a
resnet20 trained on mnist5k (reused from --cache, or trained there first), or --model.

    python benchmarks/compress_speed.py [--model CKPT] [--n 500] [--steps 100,10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from robustlab.analysis.compress import compress_record
from robustlab.core.guard import evaluating
from robustlab.data import load_data
from robustlab.models.checkpoint import load_checkpoint
from robustlab.train import TrainConfig
from robustlab.train.cache import cache_root, obtain

PARTS = ("svd", "bound", "alignment", "attack", "representations", "total")


def forward_seconds(model: torch.nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    """Median time of one forward pass of the batch (eval mode, no gradient)."""
    times = []
    with evaluating(model), torch.no_grad():
        model(x)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    """Measure and print the split as a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint (default: a resnet20 trained on mnist5k)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of the resnet20 trained here")
    p.add_argument("--cache", type=Path, help="model cache (default: robustlab's)")
    p.add_argument("--n", type=int, default=500, help="test points in the batch")
    p.add_argument("--steps", default="100,10", help="APGD steps to time, comma-separated")
    p.add_argument("--json", type=Path, help="write the measurements here")
    args = p.parse_args()
    torch.manual_seed(0)
    splits = load_data("mnist5k")
    if args.model:
        model = load_checkpoint(args.model).model
        where = args.model
    else:
        cfg = TrainConfig(arch="resnet20", data="mnist5k", epochs=args.epochs)
        got = obtain(cfg, args.cache or cache_root(), splits=splits, device="cpu", progress=False)
        model, where = got.model, str(got.folder)
    model.eval()
    batch = splits.test.head(args.n)
    x, y = batch.x, batch.y
    rows = []
    for steps in [int(s) for s in args.steps.split(",")]:
        before = forward_seconds(model, x)
        record = compress_record(model, x, y, steps=steps)
        # the machine is shared: the forward pass is timed just before and after each run
        forward = statistics.mean([before, forward_seconds(model, x)])
        sec = record["seconds"]
        rows.append(
            {
                "steps": steps,
                "forward_s": forward,
                "seconds": sec,
                "ratios": {k: sec[k] / forward for k in PARTS},
                "bound": {n: record["bound"][n].get("bound") for n in record["bound"]},
                "gap_max": {n: record["gap"][n]["max"] for n in record["gap"]},
                "robust_accuracy": {n: record["gap"][n]["robust_accuracy"] for n in record["gap"]},
            }
        )
    print(f"model {where}, {len(y)} mnist5k test points")
    print(
        "| APGD steps | forward (s) | " + " | ".join(PARTS) + " | (x one forward pass; seconds) |"
    )
    print("| ---: | ---: | " + " | ".join("---:" for _ in PARTS) + " | |")
    for r in rows:
        cells = " | ".join(f"{r['ratios'][k]:.1f}" for k in PARTS)
        secs = ", ".join(f"{k} {r['seconds'][k]:.2f}" for k in PARTS)
        print(f"| {r['steps']} | {r['forward_s']:.3f} | {cells} | {secs} |")
    for r in rows:
        print(
            f"steps {r['steps']}: bound {r['bound']}, gap max {r['gap_max']}, robust accuracy {r['robust_accuracy']}"
        )
    if args.json:
        args.json.write_text(json.dumps({"model": where, "n": len(y), "runs": rows}, indent=1))


if __name__ == "__main__":
    main()

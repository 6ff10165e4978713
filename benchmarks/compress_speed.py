"""Time of `robustlab compress` on a resnet20, split: the clean forward pass (which also takes
every clean representation and the gap's clean logits), SVDs and weight metrics, the bound, the
alignment term, the APGD-CE attacks, the representations (the one adversarial pass over every
threat model's batch, which also gives the gap's adversarial logits, and the metrics).

Each part is given as a ratio to one forward pass of the data batch (the median of a few,
timed in the same process), for the published 100 APGD steps and for fewer. The model is a
resnet20 trained on mnist5k (reused from --cache, or trained there first), or --model.

``--alignment-sweep`` also times the alignment term on the first N points for each N and
compares its value with the one on the whole batch (how the default of ``--alignment-points``
was chosen).

    python benchmarks/compress_speed.py [--model CKPT] [--n 500] [--steps 100,10]
        [--alignment-points 128] [--alignment-sweep 16,32,64,128,256,500] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from robustlab.analysis.bound import local_gains, robustness_bounds
from robustlab.analysis.compress import ALIGNMENT_POINTS, compress_record, default_eps
from robustlab.analysis.compressibility import layer_metrics
from robustlab.analysis.representations import representations_and_logits
from robustlab.core.guard import evaluating
from robustlab.data import load_data
from robustlab.models.checkpoint import load_checkpoint
from robustlab.train import TrainConfig
from robustlab.train.cache import cache_root, obtain

PARTS = ("forward", "svd", "bound", "alignment", "attack", "representations", "total")


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


def alignment_sweep(
    model: torch.nn.Module, x: torch.Tensor, sizes: list[int], forward: float
) -> list[dict[str, float]]:
    """The alignment term on the first N points for each N: seconds, multiple of one forward
    pass, and its value per norm as a fraction of the value on the whole batch."""
    eps = default_eps(tuple(x.shape[1:]))
    bounds = robustness_bounds(model, layer_metrics(model), tuple(x.shape[1:]), eps, 0.1)
    lip = {n: b.lipschitz["exact"] for n, b in bounds.items()}
    rows = []
    for size in sorted(set(sizes) | {len(x)}):
        t0 = time.perf_counter()
        gains = local_gains(model, x[:size])
        sec = time.perf_counter() - t0
        rows.append(
            {
                "points": size,
                "seconds": sec,
                "ratio": sec / forward,
                **{f"alignment_{n}": float(gains[n].max()) / lip[n] for n in lip},
            }
        )
    full = rows[-1]
    for r in rows:
        for n in lip:
            r[f"of_full_{n}"] = r[f"alignment_{n}"] / full[f"alignment_{n}"]
    return rows


def adversarial_pass_seconds(model: torch.nn.Module, x: torch.Tensor, copies: int) -> float:
    """Time of the shared adversarial pass alone (``copies`` stacked batches), for the split
    of the representations' time into that pass and the metrics."""
    stacked = torch.cat([x] * copies)
    t0 = time.perf_counter()
    representations_and_logits(model, stacked)
    return time.perf_counter() - t0


def main() -> None:
    """Measure and print the split as a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint (default: a resnet20 trained on mnist5k)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of the resnet20 trained here")
    p.add_argument("--cache", type=Path, help="model cache (default: robustlab's)")
    p.add_argument("--n", type=int, default=500, help="test points in the batch")
    p.add_argument("--steps", default="100,10", help="APGD steps to time, comma-separated")
    p.add_argument(
        "--alignment-points",
        type=int,
        default=ALIGNMENT_POINTS,
        help="points the alignment term is measured on (default: compress's own default)",
    )
    p.add_argument("--alignment-sweep", default="", help="N,N,...: time the alignment at each N")
    p.add_argument("--json", type=Path, help="write the measurements here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
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
        record = compress_record(model, x, y, steps=steps, alignment_points=args.alignment_points)
        adv_pass = adversarial_pass_seconds(model, x, len(record["gap"]))
        # the machine is shared: the forward pass is timed just before and after each run
        forward = statistics.mean([before, forward_seconds(model, x)])
        sec = dict(record["seconds"])
        sec["without_attack"] = sec["total"] - sec["attack"]
        sec["adversarial_pass"] = adv_pass
        rows.append(
            {
                "steps": steps,
                "alignment_points": record["alignment_points"],
                "forward_s": forward,
                "seconds": sec,
                "ratios": {
                    k: sec[k] / forward for k in (*PARTS, "without_attack", "adversarial_pass")
                },
                "bound": {n: record["bound"][n].get("bound") for n in record["bound"]},
                "gap_max": {n: record["gap"][n]["max"] for n in record["gap"]},
                "robust_accuracy": {n: record["gap"][n]["robust_accuracy"] for n in record["gap"]},
            }
        )
    cols = (*PARTS, "without_attack")
    print(f"model {where}, {len(y)} mnist5k test points, alignment on {args.alignment_points}")
    print("| APGD steps | forward (s) | " + " | ".join(cols) + " | (x one forward pass; seconds) |")
    print("| ---: | ---: | " + " | ".join("---:" for _ in cols) + " | |")
    for r in rows:
        cells = " | ".join(f"{r['ratios'][k]:.2f}" for k in cols)
        secs = ", ".join(f"{k} {r['seconds'][k]:.2f}" for k in cols)
        print(f"| {r['steps']} | {r['forward_s']:.3f} | {cells} | {secs} |")
    for r in rows:
        print(
            f"steps {r['steps']}: of the representations' {r['ratios']['representations']:.2f}x, "
            f"the adversarial pass alone {r['ratios']['adversarial_pass']:.2f}x"
        )
    sweep: list[dict[str, float]] = []
    if args.alignment_sweep:
        forward = forward_seconds(model, x)
        sizes = [int(s) for s in args.alignment_sweep.split(",")]
        sweep = alignment_sweep(model, x, sizes, forward)
        print("| points | alignment (x one forward pass) | linf alignment / all | l2 / all |")
        print("| ---: | ---: | ---: | ---: |")
        for a in sweep:
            print(
                f"| {a['points']} | {a['ratio']:.2f} | {a['of_full_linf']:.3f} | "
                f"{a['of_full_l2']:.3f} |"
            )
    for r in rows:
        print(
            f"steps {r['steps']}: bound {r['bound']}, gap max {r['gap_max']}, robust accuracy {r['robust_accuracy']}"
        )
    if args.json:
        out = {"model": where, "n": len(y), "runs": rows, "alignment_sweep": sweep}
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""AutoAttack (standard) on the default-recipe mnist5k models: strength and time per sub-attack.

Also reports the eager floor of the published budget: for every sub-attack, the passes its
budget asks for on the points that enter it (APGD-CE 100 forward+backward, APGD-T 9 x 100,
FAB-T 9 x 100 forward+backward plus a forward, Square 5,000 forwards), at the cost of one
pass measured on the same model and batch in the same run.

    python benchmarks/autoattack_mnist5k.py --models runs/bench/resnet8-pgd-at [--n 100]

Shards (``--start``, ``--n``) run as separate processes cover the 1,000 points on several
cores; robust accuracy and times then add up over the shards.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from robustlab.attacks import PGD, AutoAttack
from robustlab.data import load_data
from robustlab.evaluate import evaluate
from robustlab.models.checkpoint import load


def pass_costs(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    reps: int = 5,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[float, float]:
    """Seconds per point of one forward+backward w.r.t. the input, and of one forward.

    ``clock`` is ``time.perf_counter`` (wall) or ``time.process_time`` (CPU; the fair one on a
    shared machine with one torch thread)."""
    for _ in range(2):
        xx = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xx), y), xx)
    t0 = clock()
    for _ in range(reps):
        xx = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xx), y), xx)
    fb = (clock() - t0) / reps / len(x)
    t0 = clock()
    with torch.no_grad():
        for _ in range(reps):
            model(x)
    fw = (clock() - t0) / reps / len(x)
    return fb, fw


def main() -> None:
    """Evaluate each model under AutoAttack standard and PGD-100 x 5 and print JSON."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", required=True, help="comma-separated checkpoint folders")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--pgd", action="store_true", help="also run PGD-100 x 5 restarts")
    p.add_argument("--start", type=int, default=0, help="first test point (to run shards)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    test = load_data("mnist5k").test.subset(slice(args.start, args.start + args.n))
    for path in args.models.split(","):
        model = load(path)
        c0 = time.process_time()
        rec = evaluate(
            model,
            test,
            AutoAttack(norm="linf", eps=args.eps),
            batch_size=args.batch_size,
            progress=False,
        )
        cpu_s = time.process_time() - c0
        fb, fw = pass_costs(model.eval(), test.x[: args.batch_size], test.y[: args.batch_size])
        budget = {
            "apgd-ce": 100 * fb,
            "apgd-t": 9 * 100 * fb,
            "fab-t": 9 * 100 * (fb + fw),
            "square": 5000 * fw,
        }
        entering = rec.clean_accuracy * rec.n
        floor = 0.0
        steps = []
        for step in rec.per_attack:
            name = str(step["attack"])
            floor += entering * budget[name]
            steps.append({**step, "entering": round(entering)})
            entering = float(step["robust_accuracy_after"]) * rec.n
        out = {
            "model": path,
            "n": rec.n,
            "start": args.start,
            "threads": torch.get_num_threads(),
            "cpu_s": round(cpu_s, 1),
            "eps": args.eps,
            "clean": rec.clean_accuracy,
            "autoattack_robust": rec.robust_accuracy,
            "elapsed_s": rec.elapsed_s,
            "per_attack": steps,
            "eager_floor_s": round(floor, 1),
            "ratio_to_floor": round(rec.elapsed_s / floor, 3) if floor else None,
            "pass_cost_ms_per_point": {"fwd_bwd": round(1000 * fb, 4), "fwd": round(1000 * fw, 4)},
            "warnings": rec.warnings,
        }
        if args.pgd:
            t0 = time.perf_counter()
            pgd = evaluate(
                model,
                test,
                PGD(eps=args.eps, steps=100, restarts=5),
                batch_size=args.batch_size,
                progress=False,
            )
            out["pgd100x5_robust"] = pgd.robust_accuracy
            out["pgd100x5_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(out, indent=1), flush=True)


if __name__ == "__main__":
    main()

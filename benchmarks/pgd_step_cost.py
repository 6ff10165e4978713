"""PGD time per step vs the floor: one forward + backward w.r.t. the input, same model and batch.

Both are timed alternately in one process. PGD runs 1 restart without early exit effects:
the model is attacked at a budget it resists, so every point stays in the batch.

    python benchmarks/pgd_step_cost.py --model runs/bench/resnet8-pgd-at [--batch 250]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from robustlab.attacks import PGD
from robustlab.data import load_data
from robustlab.models.checkpoint import load


def floor_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Seconds per forward+backward w.r.t. the input (nothing else)."""
    t0 = time.perf_counter()
    for _ in range(steps):
        xx = x.detach().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xx), y), xx)
    return (time.perf_counter() - t0) / steps


def pgd_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Seconds per PGD step, the whole attack call divided by its steps."""
    attack = PGD(eps=0.05, steps=steps)
    t0 = time.perf_counter()
    attack(model, x, y)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    """Print the per-step ratio PGD / floor for contiguous and channels_last models."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    test = load_data("mnist5k").test
    x, y = test.x[: args.batch], test.y[: args.batch]
    out = {}
    for fmt in ("contiguous", "channels_last"):
        model = load(args.model).eval()
        xs = x
        if fmt == "channels_last":
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's Module.to overloads omit memory_format
            xs = x.contiguous(memory_format=torch.channels_last)
        for p_ in model.parameters():
            p_.requires_grad_(False)
        floor_step(model, xs, y, 3)
        fl, pg = [], []
        for _ in range(args.rounds):
            fl.append(floor_step(model, xs, y, args.steps))
            pg.append(pgd_step(model, xs, y, args.steps))
        out[fmt] = {
            "floor_ms": round(1000 * statistics.median(fl), 2),
            "pgd_step_ms": round(1000 * statistics.median(pg), 2),
            "ratio": round(statistics.median(pg) / statistics.median(fl), 3),
        }
    print(json.dumps({"batch": args.batch, "steps": args.steps, **out}, indent=1))


if __name__ == "__main__":
    main()

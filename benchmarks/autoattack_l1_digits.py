"""l1 AutoAttack and l1-APGD vs the reference implementation on a small digits MLP.

Trains a seeded one-hidden-layer MLP on scikit-learn's 8x8 digits (15 epochs, Adam), then
attacks the first 200 test points at l1 eps 2 with robustlab's l1-APGD (one run) and
AutoAttack standard l1, and, when the reference (fra31/auto-attack) is importable, with its
l1-APGD and AutoAttack standard L1, in one process, one torch thread:

    PYTHONPATH=/path/to/auto-attack python benchmarks/autoattack_l1_digits.py [--eps 2]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from robustlab.attacks import APGD, AutoAttack
from robustlab.data import load_data
from robustlab.models.mlp import MLP


def main() -> None:
    """Print robust points, time and threat-model check of every attack as JSON lines."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--eps", type=float, default=2.0)
    p.add_argument("--n", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(1)
    data = load_data("digits")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = MLP(1, 10, 8, depth=1, width=64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):
        order = torch.randperm(len(data.train), generator=gen)
        for i in range(0, len(order), 128):
            idx = order[i : i + 128]
            opt.zero_grad()
            F.cross_entropy(model(data.train.x[idx]), data.train.y[idx]).backward()
            opt.step()
    model.eval()
    x, y = data.test.x[: args.n], data.test.y[: args.n]

    def robust(xa: torch.Tensor) -> int:
        with torch.no_grad():
            return int((model(xa).argmax(1) == y).sum())

    def run(name: str, fn: Callable[[], torch.Tensor]) -> None:
        t0 = time.perf_counter()
        xa = fn()
        inside = bool((xa - x).abs().flatten(1).sum(1).max() <= args.eps * (1 + 1e-5))
        inside &= bool(xa.min() >= 0 and xa.max() <= 1)
        out = {"robust": robust(xa), "inside": inside, "s": round(time.perf_counter() - t0, 1)}
        print(json.dumps({name: out}), flush=True)

    print(json.dumps({"clean": robust(x), "n": args.n, "eps": args.eps}), flush=True)
    run("robustlab l1-apgd-ce (1 run)", lambda: APGD(norm="l1", eps=args.eps)(model, x, y))
    run(
        "robustlab autoattack standard l1", lambda: AutoAttack(norm="l1", eps=args.eps)(model, x, y)
    )
    try:
        from autoattack import AutoAttack as Reference  # the peer, for benchmarks only
        from autoattack.autopgd_base import APGDAttack
    except ImportError:
        print(json.dumps({"reference": "not importable; set PYTHONPATH to a checkout"}))
        return
    run(
        "reference l1-apgd-ce (1 run)",
        lambda: APGDAttack(
            model, norm="L1", eps=args.eps, n_iter=100, device="cpu", seed=0
        ).perturb(x, y),
    )
    ref = Reference(model, norm="L1", eps=args.eps, version="standard", device="cpu", seed=0)
    run("reference autoattack standard L1", lambda: ref.run_standard_evaluation(x, y, bs=args.n))


if __name__ == "__main__":
    main()

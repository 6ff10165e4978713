"""robustlab's AutoAttack vs the reference implementation, same model, points and budget.

The reference (fra31/auto-attack) is a peer, not a dependency: install it in the benchmark's
own environment (`pip install git+https://github.com/fra31/auto-attack`) or point
PYTHONPATH at a checkout. Both run in this one process, one after the other.

    python benchmarks/autoattack_vs_reference.py --model runs/bench/resnet8-pgd-at --n 100
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from robustlab.attacks import AutoAttack
from robustlab.data import load_data
from robustlab.evaluate import evaluate
from robustlab.models.checkpoint import load


def main() -> None:
    """Run both and print robust accuracy and wall time of each."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--eps", type=float, default=0.3)
    args = p.parse_args()
    from autoattack import AutoAttack as Reference  # the peer, installed for benchmarks only

    test = load_data("mnist5k").test.head(args.n)
    model = load(args.model).eval()
    t0 = time.perf_counter()
    ref = Reference(
        model, norm="Linf", eps=args.eps, version="standard", device="cpu", seed=0, verbose=True
    )
    x_ref = ref.run_standard_evaluation(test.x, test.y, bs=args.n)
    ref_s = time.perf_counter() - t0
    with torch.no_grad():
        ref_robust = float((model(x_ref).argmax(1) == test.y).float().mean())
    ours = evaluate(
        model, test, AutoAttack(norm="linf", eps=args.eps), batch_size=args.n, progress=False
    )
    print(
        json.dumps(
            {
                "n": args.n,
                "eps": args.eps,
                "reference": {"robust": ref_robust, "seconds": round(ref_s, 1)},
                "robustlab": {
                    "robust": ours.robust_accuracy,
                    "seconds": ours.elapsed_s,
                    "per_attack": ours.per_attack,
                },
                "time_ratio_ours_over_reference": round(ours.elapsed_s / ref_s, 3),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()

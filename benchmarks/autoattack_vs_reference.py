"""robustlab's AutoAttack vs the reference implementation, same model, points and budget.

The reference (fra31/auto-attack) is a peer, not a dependency: install it in the benchmark's
own environment (`pip install git+https://github.com/fra31/auto-attack`) or point
PYTHONPATH at a checkout. Both run in this one process, one after the other.

    python benchmarks/autoattack_vs_reference.py --model runs/bench/resnet8-pgd-at --n 100

robustlab runs once per engine of its forward-only passes (``--engines``, default
``torch,onnxruntime``: eager PyTorch for everything, then ONNX Runtime for the passes that need
no gradient; robustlab.models.engine). Reported for each: robust accuracy, wall and CPU seconds (with ``--threads 1`` CPU time is
the fair measure on a shared machine), the passes it ran through the model (points through
a forward with gradients, i.e. forward+backward, and points through a forward without), and
its eager floor: those passes at the cost per point of one eager pass measured on the same
model in the same process (CPU time with ``--threads``, wall time otherwise). The reference's floor is the issue's "eager floor of the budget";
``ours / reference floor`` says how far below the plain eager cost of that budget we got.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from autoattack_mnist5k import pass_costs
from robustlab.attacks import AutoAttack
from robustlab.data import load_data
from robustlab.evaluate import evaluate
from robustlab.models.checkpoint import load


class Tally:
    """Points seen with and without gradients; shared by a model and its deep copies."""

    def __init__(self) -> None:
        self.with_grad = 0
        self.without_grad = 0

    def __deepcopy__(self, memo: dict[int, object]) -> Tally:
        return self  # evaluate() attacks a private copy of the model: count its passes here


class PassCounter(nn.Module):
    """The model, counting the points it sees with and without gradients enabled."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.tally = Tally()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            self.tally.with_grad += len(x)
        else:
            self.tally.without_grad += len(x)
        logits: torch.Tensor = self.model(x)
        return logits


def main() -> None:
    """Run both and print robust accuracy, time, passes and floors of each."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument(
        "--engines",
        default="torch,onnxruntime",
        help="robustlab's forward-only engines to run, in turn (comma-separated)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from autoattack import AutoAttack as Reference  # the peer, installed for benchmarks only

    test = load_data("mnist5k").test.head(args.n)
    model = load(args.model).eval()
    # eager, contiguous, per point; in CPU time with --threads (a shared machine), else wall
    clock = time.process_time if args.threads else time.perf_counter
    fb, fw = pass_costs(model, test.x, test.y, reps=20, clock=clock)

    ref_model = PassCounter(model).eval()
    t0, c0 = time.perf_counter(), time.process_time()
    ref = Reference(
        ref_model, norm="Linf", eps=args.eps, version="standard", device="cpu", seed=0, verbose=True
    )
    x_ref = ref.run_standard_evaluation(test.x, test.y, bs=args.n)
    ref_s, ref_cpu = time.perf_counter() - t0, time.process_time() - c0
    with torch.no_grad():
        ref_robust_points = model(x_ref).argmax(1) == test.y
    ref_robust = float(ref_robust_points.float().mean())

    def floor(t: Tally) -> float:
        return t.with_grad * fb + t.without_grad * fw

    runs = {}
    for engine in args.engines.split(","):
        our_model = PassCounter(model).eval()
        t0, c0 = time.perf_counter(), time.process_time()
        ours = evaluate(
            our_model,
            test,
            AutoAttack(norm="linf", eps=args.eps),
            batch_size=args.n,
            progress=False,
            engine=engine,
        )
        our_s, our_cpu = time.perf_counter() - t0, time.process_time() - c0  # export included
        runs[engine] = {
            "engine": ours.engine,
            "robust": ours.robust_accuracy,
            "seconds": round(our_s, 1),
            "cpu_seconds": round(our_cpu, 1),
            "per_attack": ours.per_attack,
            # passes PyTorch ran (with ONNX Runtime, the forward-only ones are not counted)
            "points_fwd_bwd": our_model.tally.with_grad,
            "points_fwd_torch": our_model.tally.without_grad,
            "time_ratio_over_reference": round(our_s / ref_s, 3),
            "cpu_ratio_over_reference": round(our_cpu / ref_cpu, 3),
            "same_points_broken_as_reference": bool(
                torch.equal(
                    torch.tensor([bool(r["robust"]) for r in ours.samples]),
                    ref_robust_points,
                )
            ),
        }

    ref_floor = floor(ref_model.tally)
    print(
        json.dumps(
            {
                "n": args.n,
                "eps": args.eps,
                "threads": torch.get_num_threads(),
                "eager_cost_ms_per_point": {
                    "fwd_bwd": round(1e3 * fb, 4),
                    "fwd": round(1e3 * fw, 4),
                },
                "reference": {
                    "robust": ref_robust,
                    "seconds": round(ref_s, 1),
                    "cpu_seconds": round(ref_cpu, 1),
                    "points_fwd_bwd": ref_model.tally.with_grad,
                    "points_fwd": ref_model.tally.without_grad,
                    "eager_floor_s": round(ref_floor, 1),
                },
                "robustlab": runs,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()

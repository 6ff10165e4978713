"""Transfer matrices and early-exit (DeepSloth) evaluation, before and after the engine.

Each workload runs with ``engine="torch"`` (before: everything in eager PyTorch) and
``engine="onnxruntime"`` (after: forward-only passes in ONNX Runtime), in turn and
``--rounds`` times, in one process, so a busy machine slows both alike; CPU seconds of
the process (every thread) and wall seconds, and whether the results are equal.

- transfer: a PGD + SGM matrix crafted on ``--source``, evaluated on ``--targets`` and the
  source itself, ``--n`` points;
- exits: ``measure_efficiency`` of a multi-exit model (exits attached to ``--source``; their
  heads untrained, so this measures cost, not a calibrated model) on clean inputs and on
  DeepSloth examples crafted once beforehand; the latency timing is off (it always runs
  in PyTorch, as deployed).

    python benchmarks/engine_workloads.py --source runs/bench/resnet8-pgd-at \\
        --targets runs/hpm/pgdat-hpm --n 1000 --sloth-n 1000 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from robustlab.analysis.efficiency import measure_efficiency
from robustlab.analysis.transfer import parse_attack, transfer_matrix
from robustlab.attacks.registry import make_attack
from robustlab.data import load_data
from robustlab.models.checkpoint import load
from robustlab.models.multiexit import attach_exits

ENGINES = ("torch", "onnxruntime")


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    """Run both workloads with both engines, in turn; print one JSON object."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--source", required=True)
    p.add_argument("--targets", required=True)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--sloth-n", type=int, default=250)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    test = load_data("mnist5k").test
    source = load(args.source).eval()
    targets = {path: load(path).eval() for path in args.targets.split(",")}
    targets[args.source] = source
    attacks = [parse_attack("pgd", "linf", 0.3), parse_attack("sgm", "linf", 0.3)]
    torch.manual_seed(0)
    net = attach_exits(load(args.source), (1, 28, 28), 10, threshold=0.9).eval()
    x, y = test.x[: args.sloth_n], test.y[: args.sloth_n]
    sloth = make_attack("deepsloth", "linf", 0.3, steps=10)
    x_adv = torch.cat([sloth(net, x[i : i + 125], y[i : i + 125]) for i in range(0, len(x), 125)])

    results: dict[str, dict[str, list[float]]] = {}
    outcomes: dict[str, dict[str, Any]] = {}
    for _ in range(args.rounds):
        for engine in ENGINES:

            def matrix(e: str = engine) -> Any:
                return transfer_matrix(
                    {"source": source}, targets, attacks, test, n=args.n, engine=e
                )

            def exits(e: str = engine) -> Any:
                return [
                    measure_efficiency(net, inputs, y, latency_samples=0, engine=e)
                    for inputs in (x, x_adv)
                ]

            for name, fn in (("transfer", matrix), ("exits", exits)):
                out, wall, cpu = _timed(fn)
                slot = results.setdefault(f"{name}/{engine}", {"wall_s": [], "cpu_s": []})
                slot["wall_s"].append(round(wall, 2))
                slot["cpu_s"].append(round(cpu, 2))
                if name == "transfer":
                    key = [c.to_dict() for c in out.cells]
                    ran = {k: v["engine"] for k, v in out.engines.items()}
                else:
                    key = [r.exit_counts + [r.accuracy_early_exit] for r in out]
                    ran = out[0].engine["engine"]
                outcomes.setdefault(name, {})[engine] = {"result": key, "ran": ran}
    summary = {
        "n_transfer": args.n,
        "n_exits": args.sloth_n,
        "threads": args.threads,
        "times": results,
        "cpu_ratio_after_over_before": {
            name: round(
                min(results[f"{name}/onnxruntime"]["cpu_s"])
                / min(results[f"{name}/torch"]["cpu_s"]),
                3,
            )
            for name in ("transfer", "exits")
        },
        "same_results": {
            name: o["torch"]["result"] == o["onnxruntime"]["result"] for name, o in outcomes.items()
        },
        "engines": {name: {e: o[e]["ran"] for e in ENGINES} for name, o in outcomes.items()},
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

"""Sharded evaluation scaling: AutoAttack on the same points by 2 processes x 1 thread
(torchrun), 1 process x 1 thread, and 1 process x 2 threads, wall time of each whole
``robustlab eval`` command, ratios pair by pair.

Every run is the real command line on the same checkpoint, points, seed, batch size and
engine (its wall time includes starting Python and torch: a few seconds, small beside the
recorded setting's minutes); the 2-process run's per-sample table is compared with the 1-process x 1-thread one
(sharded evaluation must equal it sample for sample; with 2 threads the floats may round
differently, so that run is compared too but only reported).

    python benchmarks/sharded_eval_scaling.py --model runs/bench/resnet8-pgd-at \\
        [--data mnist5k] [--points 1000] [--eps 0.3] [--batch-size 125]

The recorded setting is a PGD-AT resnet8 on mnist5k, AutoAttack standard at linf 0.3 on 1,000
points. Run it on an otherwise idle machine: on a shared one the wall times (and so the
ratios) depend on what else runs. On GPUs the same comparison is
``torchrun --nproc_per_node N -m robustlab eval ... --device cuda`` against one process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGURATIONS = (
    # name, processes, threads per process
    ("2 processes x 1 thread", 2, 1),
    ("1 process x 1 thread", 1, 1),
    ("1 process x 2 threads", 1, 2),
)


def command(args: argparse.Namespace, processes: int, out: Path) -> list[str]:
    """The robustlab eval command of one configuration (torchrun for several processes)."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone"]
        launcher += ["--nproc_per_node", str(processes)]
    evaluation = [
        "-m", "robustlab", "eval", "--model", args.model, "--data", args.data,
        "--attack", "autoattack", "--norm", args.norm, "--eps", str(args.eps),
        "--points", str(args.points), "--batch-size", str(args.batch_size),
        "--seed", str(args.seed), "--engine", args.engine, "--no-progress",
        "--no-resume", "--json", str(out),
    ]  # fmt: skip
    if args.attacks:
        evaluation += ["--attacks", args.attacks]
    return launcher + evaluation


def run(args: argparse.Namespace, processes: int, threads: int, out: Path) -> float:
    """Wall seconds of one configuration's whole command."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    done = subprocess.run(
        command(args, processes, out), env=env, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{processes} x {threads} failed:\n{done.stderr}")
    return seconds


def main() -> None:
    """Run the three configurations, print their wall times, ratios and one JSON line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder (e.g. a PGD-AT resnet8)")
    p.add_argument("--data", default="mnist5k")
    p.add_argument("--points", type=int, default=1000)
    p.add_argument("--norm", default="linf")
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--attacks", help="AutoAttack members (default: the standard version's)")
    p.add_argument("--batch-size", type=int, default=125)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", default="torch", help="the same engine for every run")
    args = p.parse_args()
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tables: dict[str, str] = {}
        for name, processes, threads in CONFIGURATIONS:
            out = Path(tmp) / f"{processes}x{threads}.json"
            seconds[name] = run(args, processes, threads, out)
            tables[name] = out.with_suffix(".samples.csv").read_text()
            robust = json.loads(out.read_text())["robust_accuracy"]
            print(f"{name}: {seconds[name]:.1f} s wall, robust accuracy {100 * robust:.2f} %")
        base = tables["1 process x 1 thread"]
        equal = {name: table == base for name, table in tables.items()}
    # (faster candidate, baseline): the speed-up is the baseline's time over the candidate's
    pairs = [(0, 1), (0, 2), (2, 1)]
    names = [name for name, _, _ in CONFIGURATIONS]
    ratios = {
        f"{names[a]} over {names[b]}": seconds[names[b]] / seconds[names[a]] for a, b in pairs
    }
    for pair, ratio in ratios.items():
        print(f"speed-up of {pair}: {ratio:.2f}x")
    for name, same in equal.items():
        if name != "1 process x 1 thread":
            print(f"per-sample table of {name} equals 1 process x 1 thread's: {same}")
    print(json.dumps({"seconds": seconds, "speedup": ratios, "equal": equal, **vars(args)}))


if __name__ == "__main__":
    main()

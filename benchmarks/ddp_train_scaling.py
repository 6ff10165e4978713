"""Training throughput under torchrun: 2 processes x 1 thread against 1 process x 1 thread and
1 process x 2 threads, on the same work (the same global batches, the same model trained).

Each round runs the three set-ups one after the other (in a rotating order, so that machine
noise hits them alike) as real ``robustlab train`` commands, and reads the training time from
the manifest (``train_time_s``: the epochs themselves, measured by rank 0, without start-up and
rendezvous); images/s = epochs x training samples / that time. Ratios are taken pair by pair
within a round, and the medians over rounds are printed with every round's numbers (JSON). The
wall time of each whole command, start-up included, is printed too.

    python benchmarks/ddp_train_scaling.py [--rounds 3] [--epochs 1] [--arch resnet8]
        [--data mnist5k] [--method pgd-at] [--eps 0.3] [--steps 10] [--arch-option KEY=VALUE]

On GPUs the same comparison is ``torchrun --nproc_per_node N -m robustlab train ...
--device cuda`` against one process with ``--device cuda`` (NCCL is picked automatically).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: name -> (launcher prefix, threads per process)
SETUPS: dict[str, tuple[list[str], int]] = {
    "1x1": ([sys.executable, "-m", "robustlab"], 1),
    "1x2": ([sys.executable, "-m", "robustlab"], 2),
    "2x1": (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + ["-m", "robustlab"],
        1,
    ),
}
PAIRS = (("2x1", "1x1"), ("2x1", "1x2"), ("1x2", "1x1"))


def run_once(setup: str, train_args: list[str], samples: int, epochs: int) -> dict[str, float]:
    """One ``robustlab train`` under a set-up: images/s of its epochs and its wall seconds."""
    launcher, threads = SETUPS[setup]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        subprocess.run(
            [*launcher, "train", *train_args, "--no-progress", "--out", out],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - t0
        manifest = json.loads((Path(out) / "manifest.json").read_text())
    seconds = float(manifest["train_time_s"])
    return {"img_per_s": round(samples * epochs / seconds, 1), "train_s": seconds, "wall_s": wall}


def main() -> None:
    """Run the rounds and print every number and the median pairwise ratios."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--arch", default="resnet8")
    p.add_argument("--data", default="mnist5k")
    p.add_argument("--method", default="pgd-at")
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="the global batch")
    p.add_argument("--arch-option", action="append", default=[])
    args = p.parse_args()

    from robustlab.data import load_data

    samples = len(load_data(args.data).train)
    train_args = [
        *("--arch", args.arch, "--data", args.data, "--method", args.method),
        *("--epochs", str(args.epochs), "--batch-size", str(args.batch_size)),
        *(
            ["--eps", str(args.eps), "--steps", str(args.steps)]
            if args.method != "standard"
            else []
        ),
        *[a for option in args.arch_option for a in ("--arch-option", option)],
    ]
    names = list(SETUPS)
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        runs = {name: run_once(name, train_args, samples, args.epochs) for name in order}
        ratios = {
            f"{a}/{b}": round(runs[a]["img_per_s"] / runs[b]["img_per_s"], 3) for a, b in PAIRS
        }
        rounds.append({"order": order, "runs": runs, "ratios": ratios})
        print(json.dumps(rounds[-1]), file=sys.stderr, flush=True)
    medians = {
        pair: round(statistics.median(r["ratios"][pair] for r in rounds), 3)
        for pair in rounds[0]["ratios"]
    }
    print(
        json.dumps(
            {
                "work": {"command": ["robustlab", "train", *train_args], "samples": samples},
                "rounds": rounds,
                "median_ratios": medians,
                "median_img_per_s": {
                    name: round(statistics.median(r["runs"][name]["img_per_s"] for r in rounds), 1)
                    for name in names
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

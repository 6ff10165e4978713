"""Start-up time of the command line: `robustlab --help` against the floor of Python and torch.

Each command runs in a fresh interpreter, the variants interleaved round by round (A B C ...
A B C ...) so machine noise hits all alike; prints the median and the ratio to `python -c
pass` and to `python -c "import torch"`. ``--base DIR`` adds the same commands with
PYTHONPATH pointing at another checkout's src/ (say the commit before a change), measured in
the same rounds:

    git worktree add /tmp/base-cli 0be4c77
    python benchmarks/cli_startup.py --runs 15 --base /tmp/base-cli
    git worktree remove /tmp/base-cli

Results, with their date: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _time(cmd: list[str], env: dict[str, str]) -> float:
    """Wall-clock seconds of one run of a command (which must succeed)."""
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _env(src: Path) -> dict[str, str]:
    """The environment with this src/ first on the path and one thread."""
    return {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}


def measure(runs: int, base: Path | None) -> dict[str, float]:
    """Median seconds of each variant over ``runs`` interleaved rounds."""
    py = sys.executable
    variants: dict[str, tuple[list[str], dict[str, str]]] = {
        "python -c pass": ([py, "-c", "pass"], _env(SRC)),
        "python -c 'import torch'": ([py, "-c", "import torch"], _env(SRC)),
        "robustlab --help": ([py, "-m", "robustlab", "--help"], _env(SRC)),
        "robustlab eval --help": ([py, "-m", "robustlab", "eval", "--help"], _env(SRC)),
    }
    if base is not None:
        env = _env(base / "src")
        variants["base: robustlab --help"] = ([py, "-m", "robustlab", "--help"], env)
        variants["base: robustlab eval --help"] = ([py, "-m", "robustlab", "eval", "--help"], env)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for cmd, env in variants.values():  # warm the file cache once
        _time(cmd, env)
    for _ in range(runs):
        for name, (cmd, env) in variants.items():
            times[name].append(_time(cmd, env))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    """Measure and print the table (and a JSON line)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--base", type=Path, help="another checkout to measure side by side")
    args = parser.parse_args()
    medians = measure(args.runs, args.base)
    floor, torch_floor = medians["python -c pass"], medians["python -c 'import torch'"]
    print(f"median of {args.runs} runs each, interleaved; python {sys.version.split()[0]}")
    print(f"{'command':<30} {'seconds':>8} {'x pass':>8} {'x torch':>8}")
    for name, t in medians.items():
        print(f"{name:<30} {t:>8.3f} {t / floor:>8.2f} {t / torch_floor:>8.2f}")
    print(json.dumps({"runs": args.runs, "median_s": medians}))


if __name__ == "__main__":
    main()

"""The default recipes on mnist5k: clean accuracy, and robust accuracy under PGD-40 x 5 restarts.

Trains with nothing but (arch, data, method, eps), exactly as `robustlab train` does, then
evaluates on the 1,000 test points. Prints one JSON record per model.

    python benchmarks/recipes_mnist5k.py --out runs/bench [--arch resnet8] [--methods standard,pgd-at]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from robustlab.attacks import PGD
from robustlab.data import load_data
from robustlab.evaluate import evaluate
from robustlab.models.checkpoint import MANIFEST, load_checkpoint
from robustlab.train import TrainConfig, train


def main() -> None:
    """Train (or reuse) each recipe and evaluate it."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--arch", default="resnet8")
    p.add_argument("--methods", default="standard,pgd-at")
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--n", type=int, default=1000)
    args = p.parse_args()
    splits = load_data("mnist5k")
    for method in args.methods.split(","):
        eps = None if method == "standard" else args.eps
        cfg = TrainConfig(arch=args.arch, data="mnist5k", method=method, eps=eps)
        folder = Path(args.out) / f"{args.arch}-{method}"
        if (folder / MANIFEST).exists():
            ckpt = load_checkpoint(folder)
            model, manifest = ckpt.model, ckpt.manifest
        else:
            result = train(cfg, folder, splits=splits, progress=False)
            model, manifest = result.model, result.manifest
        t0 = time.perf_counter()
        rec = evaluate(
            model, splits.test, PGD(eps=args.eps, steps=40, restarts=5), n=args.n, progress=False
        )
        print(
            json.dumps(
                {
                    "arch": args.arch,
                    "method": method,
                    "threads": torch.get_num_threads(),
                    "train_time_s": manifest["train_time_s"],
                    "epochs": manifest["training"]["epochs"],
                    "clean_accuracy": rec.clean_accuracy,
                    "pgd40x5_robust_accuracy": rec.robust_accuracy,
                    "eps": args.eps,
                    "n": rec.n,
                    "eval_s": round(time.perf_counter() - t0, 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()

"""Backdoor poisoning of mnist5k and the scans that look for it, before and after removal.

For each poisoning rate (default 1 %, 5 %, 10 % of the training split, all-to-one into
--target with a BadNets 3x3 patch, ``robustlab poison``'s defaults): poison mnist5k (written
with ``write_poisoned`` and read back as ``npz:``, as the CLI does), train a resnet8 on it with
the library's train() and the standard recipe (20 epochs unless --epochs), measure clean test
accuracy and the backdoor success rate (triggered test inputs of the non-target classes
classified as the target), scan the training split (``monitor.scan``, expected rate = the
attack's rate: Tran et al. assume a known upper bound), drop every flagged sample, retrain
with the same recipe and seed, and measure again. Rate 0 is the clean reference: a model
trained on clean mnist5k, and how often the trigger alone sends its inputs to the target.

Resumable: one JSON line per rate in --results; a rate already there is skipped, and the
finished checkpoints under --out are loaded, not retrained. ``--rounds 2`` scans the kept
split again with the retrained model, removes what it flags and retrains once more.

    OMP_NUM_THREADS=1 python benchmarks/backdoor_scan.py --out runs/backdoor \\
        [--rates 0,0.01,0.05,0.1] [--trigger patch] [--epochs 20] \\
        [--results benchmarks/results_backdoor_scan.jsonl]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

from robustlab.data import DataSplits, load_data
from robustlab.models.checkpoint import MANIFEST, load_checkpoint
from robustlab.monitor.poison import POISONED, PoisonConfig, poison_splits, write_poisoned
from robustlab.monitor.scan import ScanConfig, scan
from robustlab.train import TrainConfig, accuracy, train


def _train(splits: DataSplits, data: str, out: Path, epochs: int | None, seed: int) -> Any:
    """A resnet8 with the standard recipe on these splits (a finished checkpoint in out is
    loaded instead: train() itself only resumes unfinished runs)."""
    if (out / MANIFEST).exists():
        return load_checkpoint(out).model
    cfg = TrainConfig(arch="resnet8", data=data, epochs=epochs, seed=seed)
    return train(cfg, out, splits=splits, progress=False).model


def _measure(model: torch.nn.Module, test: Any, triggered: Any) -> dict[str, float]:
    """Clean test accuracy and backdoor success (triggered inputs classified as the target)."""
    return {"clean_accuracy": accuracy(model, test), "backdoor_success": accuracy(model, triggered)}


def run_rate(rate: float, args: argparse.Namespace) -> dict[str, Any]:
    """Poison, train, measure, scan, remove, retrain, measure: one result line."""
    start = time.perf_counter()
    clean = load_data("mnist5k")
    source = None if args.source == "all" else int(args.source)
    config = PoisonConfig(
        target=args.target, rate=max(rate, 0.01), source=source, trigger=args.trigger
    )
    folder = args.out / f"rate{rate:g}"
    poisoned = poison_splits(clean, config)
    rec: dict[str, Any] = {
        "rate": rate,
        "poison": config.record() if rate > 0 else None,
        "arch": "resnet8",
        "epochs": args.epochs or 20,
        "seed": args.seed,
    }
    if rate == 0:  # the clean reference: the trigger on a model that never saw it
        model = _train(clean, "mnist5k", folder / "model", args.epochs, args.seed)
        rec["before"] = _measure(model, clean.test, poisoned.triggered)
        rec["seconds"] = time.perf_counter() - start
        return rec
    write_poisoned(poisoned, folder, "mnist5k")
    spec = f"npz:{folder / POISONED}"
    splits = load_data(spec)
    assert torch.equal(splits.train.y, poisoned.train.y)
    model = _train(splits, spec, folder / "model", args.epochs, args.seed)
    rec["poisoned_count"] = len(poisoned.indices)
    rec["before"] = _measure(model, splits.test, poisoned.triggered)
    result = scan(model, splits.train, ScanConfig(expected_rate=rate, seed=args.seed))
    truth = [int(i) for i in poisoned.indices]
    found = result.to_dict(truth)
    rec["scan"] = {
        "flagged_count": found["flagged_count"],
        "suspected_classes": found["suspected_classes"],
        "detection": found["detection"],
        "seconds": found["seconds"],
    }
    keep = torch.ones(len(splits.train), dtype=torch.bool)
    keep[torch.tensor(result.flagged, dtype=torch.int64)] = False
    kept = dataclasses.replace(splits, train=splits.train.subset(keep))
    rec["removed"] = int((~keep).sum())
    rec["poison_left"] = len(set(truth) - set(result.flagged))
    retrained = _train(
        kept, spec + " (flagged removed)", folder / "retrained", args.epochs, args.seed
    )
    rec["after"] = _measure(retrained, splits.test, poisoned.triggered)
    for r in range(2, args.rounds + 1):  # scan the kept split again with the retrained model
        left = torch.nonzero(keep).flatten()  # kept position -> index in the poisoned split
        again = scan(retrained, kept.train, ScanConfig(expected_rate=rate, seed=args.seed))
        newly = [int(left[i]) for i in again.flagged]
        keep[torch.tensor(newly, dtype=torch.int64)] = False
        kept = dataclasses.replace(splits, train=splits.train.subset(keep))
        if newly:  # else the kept split, and so the retrained model, stay the same
            out = folder / f"retrained{r}"
            retrained = _train(kept, spec + f" (round {r})", out, args.epochs, args.seed)
        rec[f"round{r}"] = {
            "flagged_count": len(newly),
            "poison_flagged": len(set(newly) & set(truth)),
            "removed_total": int((~keep).sum()),
            "poison_left": len(set(truth) - set(torch.nonzero(~keep).flatten().tolist())),
            "after": _measure(retrained, splits.test, poisoned.triggered),
        }
    rec["seconds"] = time.perf_counter() - start
    return rec


def main() -> None:
    """Run the rates not yet in the results file."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/backdoor"))
    p.add_argument("--rates", default="0,0.01,0.05,0.1")
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--source", default="all")
    p.add_argument("--trigger", default="patch")
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's 20")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="scan-remove-retrain rounds (2: the retrained model scans what was kept)",
    )
    p.add_argument("--results", type=Path, default=Path("benchmarks/results_backdoor_scan.jsonl"))
    args = p.parse_args()
    done: set[float] = set()
    if args.results.exists():
        for line in args.results.read_text().splitlines():
            if line.strip():
                done.add(float(json.loads(line)["rate"]))
    for rate in (float(r) for r in args.rates.split(",") if r.strip()):
        if rate in done:
            print(f"rate {rate:g}: already in {args.results}", flush=True)
            continue
        rec = run_rate(rate, args)
        rec["date"] = date.today().isoformat()
        rec["torch_threads"] = torch.get_num_threads()
        with open(args.results, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()

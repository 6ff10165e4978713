"""HPM on mnist5k: the base vs + HPM under AutoAttack and MSA, the ablations, the batch sizes.

Issue 12's table, on the same first ``--n`` test points (linf 0.3, AutoAttack standard):

- ``table``: AutoAttack on the base (CPU time: the unit), MSA on + HPM in mode ``mix``
  (its plain stage is plain AutoAttack on the real forward; five surrogates) and in mode
  ``ema`` (batch-independent), with the CPU-time ratio of each MSA to the base's AutoAttack;
- ``ablations`` (``--ablation-n`` points; ``--members`` the attacks run on each surrogate):
  mixing weight, logit scale and STE on/off changed at evaluation with ``with_config`` (the
  same fine-tuned head, no retraining), the FC head alone (AutoAttack on ``model.base``) and
  the pure-EMA l2 head (mode ``ema``); an EMA-momentum ablation needs a second fine-tuned
  checkpoint: pass it with ``--momentum-hpm``;
- ``batch``: MSA on + HPM (mix) judged in evaluation batches of ``--batch-sizes``.

Every result is one JSON line appended to ``--out`` as soon as it is measured; the table's
and batch rows also write their per-sample CSV beside it (``OUT.table-base.samples.csv``,
``OUT.batch-64.samples.csv``, ...).

    python benchmarks/hpm_mnist5k.py --base runs/bench/resnet8-pgd-at --hpm runs/hpm/pgdat-hpm \
        --n 250 --parts table --out hpm.jsonl --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustlab.attacks import AutoAttack
from robustlab.data import Dataset, load_data
from robustlab.evaluate import evaluate, evaluate_msa
from robustlab.evaluate.robust import EvalRecord, samples_csv
from robustlab.io import atomic_write_text
from robustlab.models.checkpoint import load
from robustlab.models.hpm import HPMClassifier, with_config


def _emit(out: Path, row: dict[str, Any]) -> None:
    """Print one result and append it to the JSON-lines file."""
    line = json.dumps(row)
    print(line, flush=True)
    with open(out, "a") as f:
        f.write(line + "\n")


def _samples_path(out: Path, tag: str) -> Path:
    """Where a row's per-sample CSV goes: beside ``--out``, named by its part and setting."""
    return out.with_suffix(f".{tag}.samples.csv")


def _write_samples(path: Path | None, rec: EvalRecord) -> None:
    """Write a run's per-sample CSV to ``path``, if one is asked for."""
    if path is not None:
        atomic_write_text(path, samples_csv([rec]))


def _msa(
    model: nn.Module,
    test: Dataset,
    n: int,
    batch_size: int,
    members: tuple[str, ...],
    samples: Path | None = None,
) -> tuple[dict[str, Any], float]:
    """One MSA run: its summary and CPU seconds; its per-sample CSV to ``samples`` if given."""
    c0 = time.process_time()
    rec = evaluate_msa(
        model, test, eps=0.3, n=n, batch_size=batch_size, surrogate_attacks=members, progress=False
    )
    spent = time.process_time() - c0
    _write_samples(samples, rec)
    summary = {
        "clean": rec.clean_accuracy,
        "plain_autoattack": rec.plain_robust_accuracy,
        "msa": rec.robust_accuracy,
        "stages": [
            {k: s[k] for k in ("stage", "robust_accuracy_after", "broken")} for s in rec.stages
        ],
        "surrogate_attacks": rec.attack.get("surrogate_attacks"),
        "final_batch_disagreements": rec.final_batch_disagreements,
        "cpu_s": round(spent, 1),
    }
    return summary, spent


def _autoattack(
    model: nn.Module, test: Dataset, n: int, batch_size: int, samples: Path | None = None
) -> tuple[dict[str, Any], float]:
    """AutoAttack standard: clean and robust accuracy, CPU seconds; per-sample CSV as ``_msa``."""
    c0 = time.process_time()
    rec = evaluate(model, test, AutoAttack(eps=0.3), n=n, batch_size=batch_size, progress=False)
    spent = time.process_time() - c0
    _write_samples(samples, rec)
    return {
        "clean": rec.clean_accuracy,
        "autoattack": rec.robust_accuracy,
        "cpu_s": round(spent, 1),
    }, spent


def main() -> None:
    """Run the parts asked and append their rows to ``--out``."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--base", required=True, help="the base checkpoint (PGD-AT or TRADES)")
    p.add_argument("--hpm", required=True, help="the HPM checkpoint fine-tuned on it")
    p.add_argument("--momentum-hpm", help="an HPM checkpoint fine-tuned with another momentum")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--ablation-n", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--batch-sizes", default="1,64,256")
    p.add_argument("--members", default="", help="attacks on each surrogate in the ablations")
    p.add_argument("--parts", default="table,ablations,batch")
    p.add_argument("--modes", default="mix,ema", help="the HPM modes of the table's MSA rows")
    p.add_argument("--variants", default="", help="run only these ablations (names as printed)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    test = load_data("mnist5k").test
    base, hpm = load(args.base), load(args.hpm)
    assert isinstance(hpm, HPMClassifier)
    members = tuple(m for m in args.members.split(",") if m)
    parts = set(args.parts.split(","))
    label = {"base": args.base, "hpm": args.hpm}
    if "table" in parts:
        csv = _samples_path(args.out, "table-base")
        row, unit = _autoattack(base, test, args.n, args.batch_size, csv)
        _emit(args.out, {**label, "part": "table", "model": "base", "n": args.n, **row})
        for mode in args.modes.split(","):
            with with_config(hpm, mode=mode):
                csv = _samples_path(args.out, f"table-{mode}")
                row, spent = _msa(hpm, test, args.n, args.batch_size, (), csv)
            _emit(
                args.out,
                {**label, "part": "table", "model": f"hpm-{mode}", "n": args.n, **row,
                 "cpu_ratio_to_autoattack_base": round(spent / unit, 2)},
            )  # fmt: skip
    if "ablations" in parts:
        n = args.ablation_n
        variants: list[tuple[str, Callable[[], AbstractContextManager[Any]]]] = [
            ("default", nullcontext),
            *((f"mix={m}", lambda m=m: with_config(hpm, mix=m)) for m in (0.0, 0.25, 0.75, 1.0)),
            *((f"scale={s}", lambda s=s: with_config(hpm, scale=s)) for s in (1.0, 4.0)),
            ("ste=off", lambda: with_config(hpm, ste=False)),
            ("pure-ema-l2", lambda: with_config(hpm, mode="ema")),
        ]
        only = {v for v in args.variants.split(",") if v}
        for name, context in variants:
            if only and name not in only:
                continue
            with context():
                row, _ = _msa(hpm, test, n, args.batch_size, members)
            _emit(args.out, {**label, "part": "ablation", "variant": name, "n": n, **row})
        if not only or "fc-only" in only:
            row, _ = _autoattack(hpm.base, test, n, args.batch_size)
            _emit(args.out, {**label, "part": "ablation", "variant": "fc-only", "n": n, **row})
        if args.momentum_hpm:
            other = load(args.momentum_hpm)
            row, _ = _msa(other, test, n, args.batch_size, members)
            _emit(
                args.out,
                {**label, "part": "ablation", "variant": f"momentum ({args.momentum_hpm})",
                 "n": n, **row},
            )  # fmt: skip
    if "batch" in parts:
        for size in (int(s) for s in args.batch_sizes.split(",")):
            csv = _samples_path(args.out, f"batch-{size}")
            row, _ = _msa(hpm, test, args.ablation_n, size, members, csv)
            _emit(
                args.out,
                {**label, "part": "batch", "batch_size": size, "n": args.ablation_n, **row},
            )


if __name__ == "__main__":
    main()

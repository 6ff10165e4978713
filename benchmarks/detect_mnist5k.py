"""Adversarial-input detectors on the zoo's standard and PGD-AT resnet8 (mnist5k): per detector,
AUROC, TPR at the 5 % FPR threshold and the system's robust accuracy (correct or flagged),
against attacks that ignore the detector and against the adaptive attack (issue 18).

The standard model held 500 training samples out (``robustlab train --calibration 500``): the
detectors are fitted there. The PGD-AT model held none out, so its detectors are fitted on the
last 500 test points (``--test-tail 500``) and both models are evaluated on the first ``--n``
test points. Each model's transfer attack is PGD crafted on the other model. One thread::

    OMP_NUM_THREADS=1 python benchmarks/detect_mnist5k.py --out runs/detect-bench
    python benchmarks/detect_mnist5k.py --out runs/detect-bench --table   # the Markdown table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from robustlab.cli import main

ZOO = Path("/work/runs/zoo")
MODELS = {
    "standard": (ZOO / "resnet8-standard", ["--calibration", "500"], ZOO / "resnet8-pgd-at"),
    "pgd-at": (ZOO / "resnet8-pgd-at", ["--test-tail", "500"], ZOO / "resnet8-standard"),
}


def run(args: argparse.Namespace) -> None:
    """Fit and evaluate the detectors of each model; a JSON record per model in ``--out``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        model, held, source = MODELS[name]
        art = out / f"detector-{name}"
        common = ["--model", str(model), "--data", "mnist5k", "--device", "cpu"]
        if not (art / "detector.json").exists():
            assert main(["detect", "fit", *common, *held, "--out", str(art)]) == 0
        ev = ["detect", "eval", *common, "--detector", str(art), "--eps", str(args.eps)]
        ev += ["--attacks", "pgd,apgd-ce,cw,square,transfer", "--source", str(source)]
        ev += ["--n", str(args.n), "--queries", str(args.queries), "--no-progress"]
        ev += ["--adaptive-steps", str(args.adaptive_steps), "--json", str(out / f"{name}.json")]
        ev += ["--adaptive-restarts", str(args.adaptive_restarts)]
        ev += ["--overwrite"]
        if args.store:
            ev += ["--store", args.store, "--label", f"resnet8-{name}"]
        assert main(ev) == 0


def _pct(v: Any) -> str:
    """A fraction as a percentage ('-' when missing)."""
    return "-" if v is None else f"{100 * float(v):.1f}"


def _auc(v: Any) -> str:
    """An AUROC ('-' when missing)."""
    return "-" if v is None else f"{float(v):.3f}"


def table(out: Path) -> str:
    """The Markdown table of the records in ``out``."""
    lines = [
        "| model | detector | FPR clean test | strongest non-adaptive | AUROC | TPR | system robust acc. "
        "| adaptive AUROC | adaptive TPR | adaptive system robust acc. |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in MODELS:
        path = out / f"{name}.json"
        if not path.exists():
            continue
        rec = json.loads(path.read_text())
        for det, both in rec["side_by_side"].items():
            a, b = both["non_adaptive"], both.get("adaptive", {})
            lines.append(
                f"| {name} | {det} | {_pct(rec['detectors'][det]['fpr_clean_test'])} "
                f"| {a['attack']} | {_auc(a['auroc'])} | {_pct(a['tpr_at_threshold'])} "
                f"| {_pct(a['system_robust_accuracy'])} | {_auc(b.get('auroc'))} "
                f"| {_pct(b.get('tpr_at_threshold'))} | {_pct(b.get('system_robust_accuracy'))} |"
            )
    lines.append("")
    lines.append(
        "| model | attack | robust acc. (model alone) | "
        + " | ".join(
            f"{d} AUROC / TPR / system" for d in ("mahalanobis", "lid", "squeeze", "margin")
        )
        + " |"
    )
    lines.append("| --- | --- | ---: |" + " ---: |" * 4)
    for name in MODELS:
        path = out / f"{name}.json"
        if not path.exists():
            continue
        rec = json.loads(path.read_text())
        by = {(r["detector"], r["attack"]): r for r in rec["results"]}
        for attack in [a["name"] for a in rec["attacks"]] + ["adaptive"]:
            cells = []
            for d in ("mahalanobis", "lid", "squeeze", "margin"):
                r = by.get((d, attack))
                cells.append(
                    "-"
                    if r is None
                    else f"{_auc(r['auroc'])} / {_pct(r['tpr_at_threshold'])} / "
                    f"{_pct(r['system_robust_accuracy'])}"
                )
            acc = next((a["robust_accuracy"] for a in rec["attacks"] if a["name"] == attack), None)
            lines.append(f"| {name} | {attack} | {_pct(acc)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cli() -> None:
    """Run the benchmark, or print its table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/detect-bench", help="folder for artifacts and records")
    p.add_argument("--models", default="standard,pgd-at", help="standard, pgd-at or both")
    p.add_argument("--eps", type=float, default=0.3, help="linf budget")
    p.add_argument("--n", type=int, default=200, help="test points attacked")
    p.add_argument("--queries", type=int, default=1000, help="Square's query budget")
    p.add_argument("--adaptive-steps", type=int, default=200, help="steps of the adaptive attack")
    p.add_argument("--adaptive-restarts", type=int, default=3, help="its random restarts")
    p.add_argument("--store", help="also append the records to this results store")
    p.add_argument("--table", action="store_true", help="print the Markdown table of --out")
    args = p.parse_args()
    if args.table:
        print(table(Path(args.out)))
        return
    torch.set_num_threads(1)
    run(args)
    print(table(Path(args.out)))


if __name__ == "__main__":
    cli()

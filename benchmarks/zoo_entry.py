"""Make (or refresh) a shipped model: copy a trained checkpoint into src/robustlab/pretrained/
NAME and write its card.json from the checkpoint's manifest and the record of the AutoAttack run
on it (``robustlab eval --attack autoattack --json AA.json``, its per-sample CSV beside it).

    python benchmarks/zoo_entry.py --name resnet8-pgd-at --checkpoint runs/zoo/resnet8-pgd-at \
        --aa runs/res/pgd-at-aa.json --title "PGD-AT resnet8 (linf 0.3)"

The card's commands name ``zoo:NAME``, so a user reproduces the numbers on the shipped file.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
from pathlib import Path
from typing import Any

from robustlab.models.checkpoint import MANIFEST, WEIGHTS, file_sha256
from robustlab.models.pretrained import CARD, PREFIX

ROOT = Path(__file__).resolve().parent.parent / "src" / "robustlab" / "pretrained"

#: The training flags a recipe states when they are set, in the order the command gives them.
FLAGS = ("arch", "method", "eps", "norm", "epochs", "steps", "beta", "early_stop")


def recipe(manifest: dict[str, Any]) -> dict[str, Any]:
    """The training config (as TrainConfig fields), hold-out and command of a model."""
    training = manifest["training"]
    backbone = training.get("backbone")
    base = backbone if isinstance(backbone, dict) else training
    given = {"arch": base["arch"], "method": base["method"]}
    if base.get("eps") is not None:
        given["eps"] = base["eps"]
    calibration = int(manifest["dataset"].get("calibration_size") or 0)
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in given.items() if k in FLAGS)
    held = f" --calibration {calibration}" if calibration else ""
    command = f"robustlab train {flags}{held} --out DIR"
    if isinstance(backbone, dict):  # exits on a trained backbone
        command = command.replace("--out DIR", "--out BACKBONE") + (
            " && robustlab exits --model BACKBONE --out DIR"
        )
    return {
        "config": given,
        "calibration": calibration,
        "command": command,
        "note": "one torch thread (OMP_NUM_THREADS=1) reproduces the shipped weights bit for "
        "bit on a CPU; other thread counts round differently and give a model of the same "
        "recipe, not the same file",
    }


#: A point's outcome in a card's ``outcome`` string, one letter per test point in order.
ROBUST, BROKEN, MISCLASSIFIED = "r", "b", "x"


def outcome(samples: Path) -> tuple[str, dict[str, list[int]]]:
    """Per test point: robust, broken by the attack, or misclassified clean (one letter
    each); and per sub-attack, the points it broke."""
    letters: dict[int, str] = {}
    broken_by: dict[str, list[int]] = {}
    with samples.open() as f:
        for row in csv.DictReader(f):
            i = int(row["index"])
            if row["clean_pred"] != row["label"]:
                letters[i] = MISCLASSIFIED
            elif row["robust"] == "True":
                letters[i] = ROBUST
            else:
                letters[i] = BROKEN
                broken_by.setdefault(row["broken_by"], []).append(i)
    return "".join(letters[i] for i in range(len(letters))), broken_by


def autoattack(record: dict[str, Any], name: str) -> dict[str, Any]:
    """What the card says of the AutoAttack run: protocol, numbers, command, outcome."""
    attack, threat = record["attack"], record["threat_model"]
    letters, broken_by = outcome(Path(record["samples_file"]))
    command = (
        f"robustlab eval --model {PREFIX}{name} --attack autoattack --version "
        f"{attack['version']} --norm {threat['norm']} --eps {threat['eps']:g} --n {record['n']} "
        f"--batch-size {record['batch_size']} --seed {record['seed']} --json aa.json"
    )
    return {
        "version": attack["version"],
        "norm": threat["norm"],
        "eps": threat["eps"],
        "n": record["n"],
        "seed": record["seed"],
        "batch_size": record["batch_size"],
        "clean_accuracy": record["clean_accuracy"],
        "robust_accuracy": record["robust_accuracy"],
        "per_attack": record["per_attack"],
        "elapsed_s": record["elapsed_s"],
        "engine": record["engine"]["engine"] if record.get("engine") else "torch",
        "command": command,
        "date": record["created"][:10],
        "robustlab_version": record["robustlab_version"],
        "environment": record.get("environment", {}),
        "outcome": letters,
        "broken_by": broken_by,
        "outcome_letters": {ROBUST: "robust", BROKEN: "broken", MISCLASSIFIED: "misclassified"},
    }


def main() -> None:
    """Copy the checkpoint, check the AutoAttack record is of its weights, write the card."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--aa", required=True, type=Path, help="robustlab eval --json record")
    p.add_argument("--title", required=True)
    p.add_argument("--description", default="")
    a = p.parse_args()
    manifest = json.loads((a.checkpoint / MANIFEST).read_text())
    sha = file_sha256(a.checkpoint / WEIGHTS)
    record = json.loads(a.aa.read_text())
    if record["model"]["sha256"] != sha or manifest["weights"]["sha256"] != sha:
        raise SystemExit(f"{a.aa} is not a run on {a.checkpoint}'s weights")
    out = ROOT / a.name
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(a.checkpoint / WEIGHTS, out / WEIGHTS)
    backbone = manifest.get("backbone")
    if isinstance(backbone, dict) and backbone.get("path"):  # name the shipped backbone
        match = [p.name for p in ROOT.iterdir() if (p / WEIGHTS).exists()]
        shipped = [m for m in match if file_sha256(ROOT / m / WEIGHTS) == backbone["sha256"]]
        backbone["path"] = f"{PREFIX}{shipped[0]}" if shipped else Path(backbone["path"]).name
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    card: dict[str, Any] = {
        "name": a.name,
        "title": a.title,
        "description": a.description,
        "data": manifest["dataset"]["name"],
        "arch": manifest["model"]["arch"],
        "sha256": sha,
        "size_bytes": (out / WEIGHTS).stat().st_size,
        "recipe": {**recipe(manifest), "train_time_s": manifest.get("train_time_s")},
        "trained": manifest["created"][:10],
        "clean_accuracy": record["clean_accuracy"],
        "autoattack": autoattack(record, a.name),
    }
    exits = (manifest.get("metrics") or {}).get("early_exit_test")
    if isinstance(exits, dict):
        card["early_exit"] = {
            drop: {k: v[k] for k in ("accuracy_early_exit", "accuracy_final", "flops_saving")}
            for drop, v in exits.items()
        }
    text = json.dumps(card, indent=2)  # lists of numbers on one line each
    text = re.sub(r"\[([\d,\s]*)\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    (out / CARD).write_text(text + "\n")
    print(f"{PREFIX}{a.name}: {out} ({card['size_bytes']:,} bytes)")


if __name__ == "__main__":
    main()

"""MSA's cost against one AutoAttack on the base model, side by side in one run (CPU time).

The issue asks that MSA with five surrogates cost at most 2x one AutoAttack (standard) on
the base model. Measured here, on the same points, one torch thread, CPU seconds
(``time.process_time``, fair on a shared machine):

1. AutoAttack standard on the base model (``evaluate``): the unit;
2. MSA on the defended model with its five surrogates, once per member set run on the
   surrogates (``--variants``; ``default`` = the version's gradient members APGD-CE,
   APGD-T, FAB-T).

Without ``--model``, the stand-in defended model is the base itself with five surrogates
that are the base too: every stage then costs what a surrogate as large as the base costs
(HPM's five are), and no surrogate after the first breaks anything new, so every robust
point is attacked by every stage: the worst case for time. With ``--model`` (a checkpoint
that declares its surrogates, e.g. an HPM one) its own surrogates are used.

    python benchmarks/msa_cost.py --base runs/bench/resnet8-pgd-at --n 20 --threads 1
    python benchmarks/msa_cost.py --base runs/bench/resnet8-pgd-at --model runs/hpm/pgd-at \
        --n 20 --threads 1 --variants "default;apgd-ce,apgd-t"
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from robustlab.attacks import AutoAttack
from robustlab.data import load_data
from robustlab.evaluate import evaluate, evaluate_msa
from robustlab.evaluate.msa import PLAIN
from robustlab.evaluate.robust import AttackStep
from robustlab.models.checkpoint import load
from robustlab.models.structure import surrogates_for


def _member_shares(per_attack: list[AttackStep]) -> dict[str, float]:
    """Each member's share of the time all surrogate stages took (wall time, in one run)."""
    spent: dict[str, float] = {}
    for step in per_attack:
        stage, member = step["attack"].split("/")
        if stage != PLAIN:
            spent[member] = spent.get(member, 0.0) + step["seconds"]
    total = sum(spent.values())
    return {k: round(v / total, 3) if total else 0.0 for k, v in spent.items()}


def main() -> None:
    """Time AutoAttack on the base and MSA per member set; print JSON with the ratios."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--base", required=True, help="the base model's checkpoint")
    p.add_argument("--model", help="a defended checkpoint that declares its surrogates")
    p.add_argument("--data", default="mnist5k")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument(
        "--variants",
        default="default;apgd-ce,apgd-t;apgd-ce,apgd-dlr",
        help="member sets run on each surrogate, ';'-separated (default: the version's)",
    )
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    test = load_data(args.data).test
    base = load(args.base)
    if args.model:
        defended = load(args.model)
        surrogates = surrogates_for(defended)
    else:
        defended = base
        surrogates = [(f"base{k}", base) for k in range(1, 6)]
    c0 = time.process_time()
    ref = evaluate(
        base, test, AutoAttack(eps=args.eps), n=args.n, batch_size=args.batch_size, progress=False
    )
    unit = time.process_time() - c0
    out: dict[str, object] = {
        "n": args.n,
        "batch_size": args.batch_size,
        "surrogates": [name for name, _ in surrogates],
        "autoattack_base": {
            "cpu_s": round(unit, 2),
            "clean": ref.clean_accuracy,
            "robust": ref.robust_accuracy,
        },
        "msa": [],
    }
    for variant in args.variants.split(";"):
        members = () if variant == "default" else tuple(variant.split(","))
        c0 = time.process_time()
        rec = evaluate_msa(
            defended,
            test,
            [(name, s) for name, s in surrogates if isinstance(s, nn.Module)],
            eps=args.eps,
            surrogate_attacks=members,
            n=args.n,
            batch_size=args.batch_size,
            progress=False,
        )
        spent = time.process_time() - c0
        wall = sum(s["seconds"] for s in rec.stages)
        runs = out["msa"]
        assert isinstance(runs, list)
        runs.append(
            {
                "surrogate_attacks": rec.attack["surrogate_attacks"],
                "cpu_s": round(spent, 2),
                "ratio_to_autoattack_base": round(spent / unit, 2),
                "plain": rec.plain_robust_accuracy,
                "msa": rec.robust_accuracy,
                "stage_share": {
                    s["stage"]: round(s["seconds"] / wall, 3) if wall else 0.0 for s in rec.stages
                },
                "member_share_on_surrogates": _member_shares(rec.per_attack),
            }
        )
        print(json.dumps(runs[-1]), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

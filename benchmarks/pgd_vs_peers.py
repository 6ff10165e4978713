"""PGD side by side with torchattacks and Foolbox: same model, points, budget, one process.

torchattacks and Foolbox are peers, not dependencies: install them in the benchmark's own
environment. With torch 2.13.0 (CPU) both import without torchvision when installed with
``--no-deps`` (see benchmarks/README.md):

    python benchmarks/pgd_vs_peers.py --model runs/bench/resnet8-pgd-at --n 1000

Every library runs linf PGD with the same eps, step size, steps and one random start on the
same model object (contiguous weights, BatchNorm unfolded), batch by batch, the libraries
taking turns on each batch (who goes first rotates) so that machine noise hits all of them alike. Reported: robust
accuracy (correct clean and under attack), wall and CPU seconds (CPU time is the fairer
measure on a shared machine with ``--threads 1``), each relative to ours. A last row
runs ours through ``robustlab.evaluate`` (BatchNorm folded, channels_last), which is what
``robustlab eval`` does.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from torch import nn

from robustlab.attacks import PGD
from robustlab.data import load_data
from robustlab.evaluate import evaluate
from robustlab.models.checkpoint import load

AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def peers(model: nn.Module, eps: float, alpha: float, steps: int) -> dict[str, AttackFn]:
    """The three PGDs as functions (x, y) -> x_adv."""
    import foolbox
    import torchattacks

    ours = PGD(norm="linf", eps=eps, alpha=alpha, steps=steps, restarts=1, seed=0)
    ta = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
    fmodel = foolbox.PyTorchModel(model, bounds=(0, 1))
    fb = foolbox.attacks.LinfPGD(abs_stepsize=alpha, steps=steps, random_start=True)

    def run_fb(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, clipped, _ = fb(fmodel, x, y, epsilons=eps)
        adversarial: torch.Tensor = clipped  # foolbox returns it untyped
        return adversarial

    return {
        "robustlab": lambda x, y: ours(model, x, y),
        "torchattacks": lambda x, y: ta(x, y),
        "foolbox": run_fb,
    }


def main() -> None:
    """Print robust accuracy and seconds of each library's PGD."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--alpha", type=float, default=0.01)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    test = load_data("mnist5k").test.head(args.n)
    model = load(args.model).eval()
    for q in model.parameters():
        q.requires_grad_(False)
    fns = peers(model, args.eps, args.alpha, args.steps)
    seconds = dict.fromkeys(fns, 0.0)
    cpu = dict.fromkeys(fns, 0.0)
    robust = dict.fromkeys(fns, 0)
    clean_total = 0
    names = list(fns)
    for i, start in enumerate(range(0, args.n, args.batch)):
        x, y = test.x[start : start + args.batch], test.y[start : start + args.batch]
        with torch.no_grad():
            clean = model(x).argmax(1) == y
        clean_total += int(clean.sum())
        turn = names[i % len(names) :] + names[: i % len(names)]  # who goes first rotates
        for name in turn:
            fn = fns[name]
            torch.manual_seed(start)
            t0, c0 = time.perf_counter(), time.process_time()
            x_adv = fn(x, y)
            seconds[name] += time.perf_counter() - t0
            cpu[name] += time.process_time() - c0
            linf = (x_adv - x).abs().flatten(1).amax(1)
            if bool((linf > args.eps + 1e-6).any()) or x_adv.min() < 0 or x_adv.max() > 1:
                raise RuntimeError(f"{name} left the threat model")
            with torch.no_grad():
                robust[name] += int(((model(x_adv).argmax(1) == y) & clean).sum())
    attack = PGD(norm="linf", eps=args.eps, alpha=args.alpha, steps=args.steps, restarts=1)
    rec = evaluate(model, test, attack, batch_size=args.batch, progress=False)
    out = {
        "n": args.n,
        "eps": args.eps,
        "alpha": args.alpha,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "clean_accuracy": clean_total / args.n,
        "libraries": {
            name: {
                "robust_accuracy": robust[name] / args.n,
                "seconds": round(seconds[name], 2),
                "time_vs_robustlab": round(seconds[name] / seconds["robustlab"], 3),
                "cpu_seconds": round(cpu[name], 2),
                "cpu_vs_robustlab": round(cpu[name] / cpu["robustlab"], 3),
            }
            for name in fns
        },
        "robustlab_evaluate": {
            "robust_accuracy": rec.robust_accuracy,
            "seconds": rec.elapsed_s,
            "time_vs_robustlab_same_model": round(rec.elapsed_s / seconds["robustlab"], 3),
        },
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

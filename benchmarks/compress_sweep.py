"""Issue 13's sweep on mnist5k: compressibility vs robustness, the bound vs the measured gap,
and plain vs eps-targeted pruning, for standard and PGD-AT training.

One small model family so that the whole sweep runs in about an hour of one CPU thread:
``mlp`` (``--depth`` hidden layers of ``--width`` units; default 3 x 256, so two hidden layers
besides the first one are regularised and pruned; the first layer and the head never are).
Training recipe (ours, for speed): SGD, the library's one-cycle schedule, batch 64, lr 0.05,
weight decay 5e-4; standard training ``--epochs`` (10) epochs; PGD-AT at linf 0.3,
``--at-epochs`` (30) epochs of PGD-``--at-steps`` (10) with the library's eps warm-up (30 %).
Models (each for both methods):

- ``base``: no regulariser;
- ``l1``, ``group-lasso``, ``nuclear``: three strengths each (``STRENGTHS``);
- ``rank``: the low-rank option (``arch_options={"rank": r}``) at ``RANKS``;
- ``wd`` (the control, ours): the base recipe with a strong weight decay. It shrinks every
  weight's scale (the Frobenius norms) without favouring few rows or few singular values,
  so it separates "smaller weights" from "more compressible weights" (the paper's control
  renormalises layers back to their initial Frobenius norm instead; we chose the direction
  that adds no new training code);
- ``prune-global``: the base pruned by global magnitude to ``SPARSITIES``, then a 1-epoch
  fine-tune with the base's method (masks kept);
- ``prune-targeted`` (the paper's mitigation): eps-targeted per-layer pruning of the base,
  its target error found by bisection so that its sparsity matches the global pruning's,
  the same fine-tune;
- ``base-seed``: the base at seeds ``SEEDS`` (the other models use seed 0): the noise level;
- ``filter-spread`` (a mitigation): the ``filter-spread`` regulariser at ``SPREAD``, alone and
  with group lasso 3e-3 (does evening out the filter norms keep the robustness group lasso
  costs?);
- ``l1-middle``: l1 on the hidden layers only, at ``L1_MIDDLE`` (added once l1 turned out to
  raise robust accuracy: the library's l1 also covers the first layer, whose l-inf operator
  norm is exactly what an l-inf attacker meets first);
- ``renorm`` (the paper's control, added once weight decay turned out to compress too):
  nuclear and group lasso at 1e-2 with each hidden layer rescaled to its initial Frobenius
  norm after every step;
- ``gl+prune-*``: the same two prunings of the group-lasso 3e-3 model (added once the base's
  two hidden layers turned out too alike for eps-targeted pruning to differ from global);
- ``alignment`` (the third mitigation): the ``alignment`` regulariser (the mean l-inf local
  gain of the batch, ``train/compression.py``) at ``ALIGNMENT[method]`` (per method, from a
  pilot of 3-8 epochs: the standard model kept its clean accuracy at 1e-2; PGD-AT's gains
  are several times smaller, and 1e-2 collapsed them in a 3-epoch pilot, so 3e-3 first, then
  1e-2 for the full 30 epochs too), and ``alignment+prune-global``: that model pruned by global magnitude
  to ``SPARSITIES`` with the same 1-epoch fine-tune as the base's pruning (the method only,
  without the regulariser), to set against ``prune-global`` of the plain base
  (``benchmarks/results_alignment.md``).

Per model (one JSON line appended to ``--results`` as soon as it is measured; a model
already there is skipped, so a killed run resumes): clean accuracy on the 1,000 test points,
AutoAttack standard (linf 0.3, and linf ``--low-eps`` for standard-trained models, which
are all broken at 0.3) on the first ``--n`` test points, the ``compress_record`` on the
same points (network summary, bound, measured APGD-CE gap, linf 0.3 and l2 2.0), the SGD
UAP (Shafahi et al.) fooling rate at linf ``UAP_XI`` crafted on 500 training points and
measured on 500 held-out test points, and a random perturbation's fooling rate.

    OMP_NUM_THREADS=1 python benchmarks/compress_sweep.py --runs runs/compress-sweep \
        --results benchmarks/results_compress.jsonl
    python benchmarks/compress_plots.py benchmarks/results_compress.jsonl  # figures, tables
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustlab.analysis import compress_record
from robustlab.attacks import AutoAttack, UAPConfig, universal_perturbation
from robustlab.data import DataSplits, load_data
from robustlab.evaluate import evaluate
from robustlab.models.checkpoint import MANIFEST, load
from robustlab.models.weights import as_matrix, layer_weight
from robustlab.train import TrainConfig, train
from robustlab.train.compression import (
    PENALTIES,
    penalized_layers,
    regularizer_hooks,
)
from robustlab.train.loop import accuracy
from robustlab.train.methods import Hook, Step, make_method
from robustlab.train.prune import FinetuneConfig, PruneSpec, finetune, prune, sparsity_of

METHODS = ("standard", "pgd-at")
STRENGTHS = {
    "l1": (1e-4, 3e-4, 1e-3),
    "group-lasso": (1e-3, 3e-3, 1e-2),
    "nuclear": (1e-3, 3e-3, 1e-2),
}
RANKS = (32, 8)
WEIGHT_DECAYS = (5e-3, 2e-2)
SPARSITIES = (0.5, 0.9)
UAP_XI = (0.1, 0.2, 0.3)
SEEDS = (1, 2)
SPREAD = 0.05
L1_MIDDLE = (3e-4, 1e-3)
GL_PRUNED = "group-lasso=0.003"
ALIGNMENT = {"standard": (1e-2,), "pgd-at": (3e-3, 1e-2)}
KAPPA = 0.1


@dataclass(frozen=True)
class Spec:
    """One model of the sweep: how it is made (trained, or pruned from its method's base)."""

    name: str
    method: str
    family: str
    level: float | None = None
    strengths: dict[str, float] = field(default_factory=dict)
    arch_options: dict[str, Any] = field(default_factory=dict)
    weight_decay: float | None = None
    prune: str | None = None  # "global" or "targeted"
    seed: int = 0
    l1_middle: float = 0.0  # l1 on the hidden layers only (first layer and head left out)
    pruned_from: str = "base"  # the model (of the same method) a pruned model starts from
    renorm: bool = False  # keep each hidden layer at its initial Frobenius norm (the control)


def specs() -> list[Spec]:
    """Every model, in the order they run (each variant for both methods before the next)."""
    out: list[Spec] = []

    def both(make: Any) -> None:
        """Add the variant for each method."""
        out.extend(make(m) for m in METHODS)

    both(lambda m: Spec(f"{m}/base", m, "base"))
    levels = [(name, s) for i in range(3) for name, ss in STRENGTHS.items() for s in [ss[i]]]
    for name, s in levels:
        both(lambda m, name=name, s=s: Spec(f"{m}/{name}={s:g}", m, name, s, {name: s}))
    for s in SPARSITIES:
        for how in ("global", "targeted"):
            both(
                lambda m, s=s, how=how: Spec(
                    f"{m}/prune-{how}={s:g}", m, f"prune-{how}", s, prune=how
                )
            )
    for r in RANKS:
        both(lambda m, r=r: Spec(f"{m}/rank={r}", m, "rank", r, arch_options={"rank": r}))
    for wd in WEIGHT_DECAYS:
        both(lambda m, wd=wd: Spec(f"{m}/wd={wd:g}", m, "wd", wd, weight_decay=wd))
    for seed in SEEDS:  # the base again at other seeds: how much of a difference is noise
        both(lambda m, seed=seed: Spec(f"{m}/base-seed={seed}", m, "base-seed", seed=seed))
    for extra in ({}, {"group-lasso": 3e-3}):  # the filter-spread mitigation, alone and against
        strengths = {**extra, "filter-spread": SPREAD}
        label = "+".join(f"{k}={v:g}" for k, v in strengths.items())
        both(
            lambda m, st=strengths, label=label: Spec(
                f"{m}/{label}", m, "filter-spread", SPREAD, st
            )
        )
    for s in L1_MIDDLE:
        both(lambda m, s=s: Spec(f"{m}/l1-middle={s:g}", m, "l1-middle", s, l1_middle=s))
    for s in SPARSITIES:  # pruning a model whose two hidden layers differ (group lasso)
        for how in ("global", "targeted"):
            both(
                lambda m, s=s, how=how: Spec(
                    f"{m}/{GL_PRUNED}+prune-{how}={s:g}", m, f"gl+prune-{how}", s, prune=how,
                    pruned_from=GL_PRUNED,
                )
            )  # fmt: skip
    for name in ("nuclear", "group-lasso"):  # the paper's control: compression without scale
        both(
            lambda m, name=name: Spec(
                f"{m}/{name}=0.01+renorm", m, "renorm", 0.01, {name: 0.01}, renorm=True
            )
        )  # fmt: skip
    for m, a in [(k, a) for k in METHODS for a in ALIGNMENT[k]]:  # the alignment mitigation
        out.append(Spec(f"{m}/alignment={a:g}", m, "alignment", a, {"alignment": a}))
        for s in SPARSITIES:  # then pruned like the base
            out.append(
                Spec(
                    f"{m}/alignment={a:g}+prune-global={s:g}", m, "alignment+prune-global", s,
                    prune="global", pruned_from=f"alignment={a:g}",
                )
            )  # fmt: skip
    return out


class Renormalize(Hook):
    """After every step, rescale each hidden layer's weight back to its Frobenius norm at the
    start of training (the paper's control: the regulariser can reshape, not shrink)."""

    def __init__(self) -> None:
        self.norms: dict[str, float] = {}

    def start(self, model: nn.Module) -> None:
        """Remember the initial Frobenius norms."""
        self.norms = {
            n: float(layer_weight(m).detach().norm())
            for n, m in penalized_layers(model, everything=False)
        }

    def after_step(self, step: Step) -> None:
        """Rescale to the remembered norms."""
        with torch.no_grad():
            for n, m in penalized_layers(step.model, everything=False):
                weight = layer_weight(m)
                weight.mul_(self.norms[n] / weight.norm().clamp_min(1e-12))

    def config(self) -> dict[str, object]:
        """Recorded in the manifest's add-ons."""
        return {"name": "renormalize", "to": "initial frobenius norm"}


class MiddleL1(Hook):
    """l1 on the weights the other regularisers see (not the first layer, not the head): does
    l1's effect come from the first layer?"""

    def __init__(self, strength: float) -> None:
        self.strength = strength

    def after_backward(self, step: Step) -> None:
        """Add the gradient of ``strength * sum |w|`` over the hidden layers."""
        for _, layer in penalized_layers(step.model, everything=False):
            weight = layer_weight(layer)
            with torch.enable_grad():
                value = self.strength * PENALTIES["l1"].formula(as_matrix(weight))
                (grad,) = torch.autograd.grad(value, weight)
            if weight.grad is None:
                weight.grad = grad.detach().clone()
            else:
                weight.grad.add_(grad)

    def config(self) -> dict[str, object]:
        """Recorded in the manifest's add-ons."""
        return {"name": "l1-middle", "strength": self.strength}


def _config(spec: Spec, args: argparse.Namespace) -> TrainConfig:
    """The training config of a trained model of the sweep."""
    options: dict[str, Any] = {"depth": args.depth, "width": args.width, **spec.arch_options}
    adversarial = spec.method != "standard"
    return TrainConfig(
        arch="mlp",
        data="mnist5k",
        method=spec.method,
        eps=0.3 if adversarial else None,
        steps=args.at_steps if adversarial else None,
        epochs=args.at_epochs if adversarial else args.epochs,
        weight_decay=spec.weight_decay,
        seed=spec.seed,
        arch_options=options,
    )


def _trained(spec: Spec, args: argparse.Namespace, splits: DataSplits) -> nn.Module:
    """Train (or reload) a model of the sweep."""
    out = args.runs / spec.name.replace("/", "_")
    if (out / MANIFEST).exists():
        return load(out)
    result = train(
        _config(spec, args), out, splits=splits, device="cpu", progress=False,
        hooks=[*regularizer_hooks(spec.strengths),
               *([MiddleL1(spec.l1_middle)] if spec.l1_middle else []),
               *([Renormalize()] if spec.renorm else [])],
    )  # fmt: skip
    return result.model


def _target_for(model: nn.Module, sparsity: float) -> tuple[float, float]:
    """The target error whose eps-targeted pruning reaches ``sparsity`` (bisection) and the
    sparsity it reaches."""
    lo, hi = 1e-4, 0.9999
    names = [n for n, _ in penalized_layers(model, everything=False)]
    best = (hi, 0.0)
    for _ in range(30):
        mid = (lo + hi) / 2
        trial = copy.deepcopy(model)
        prune(trial, PruneSpec(target_error=mid))
        got = sparsity_of(trial, names)
        if abs(got - sparsity) < abs(best[1] - sparsity):
            best = (mid, got)
        if got < sparsity:
            lo = mid
        else:
            hi = mid
    return best


def _pruned(
    spec: Spec, base: nn.Module, args: argparse.Namespace, splits: DataSplits
) -> tuple[nn.Module, dict[str, Any]]:
    """Prune a copy of the base and fine-tune it one epoch with the base's method."""
    assert spec.level is not None
    model = copy.deepcopy(base)
    info: dict[str, Any] = {"sparsity_asked": spec.level}
    if spec.prune == "global":
        prune_spec = PruneSpec(sparsity=spec.level)
    else:
        target, _ = _target_for(base, spec.level)
        prune_spec = PruneSpec(target_error=target)
        info["target_error"] = target
    pruned = prune(model, prune_spec)
    info["sparsity"] = pruned.sparsity
    info["layer_sparsity"] = {layer["name"]: layer["sparsity"] for layer in pruned.layers}
    info["clean_after_prune"] = accuracy(model, splits.test)
    adversarial = spec.method != "standard"
    method = make_method(
        spec.method, **({"eps": 0.3, "steps": args.at_steps} if adversarial else {})
    )
    finetune(model, pruned.masks, splits.train, FinetuneConfig(method, epochs=1))
    info["finetune"] = {"method": spec.method, "epochs": 1, "lr": 0.01}
    return model, info


def _autoattack(model: nn.Module, splits: DataSplits, eps: float, n: int) -> dict[str, Any]:
    """AutoAttack standard at linf eps on the first n test points."""
    rec = evaluate(model, splits.test, AutoAttack(eps=eps), n=n, progress=False)
    return {
        "eps": eps,
        "clean": rec.clean_accuracy,
        "robust": rec.robust_accuracy,
        "per_attack": [
            {k: s[k] for k in ("attack", "robust_accuracy_after")} for s in rec.per_attack
        ],
        "seconds": round(rec.elapsed_s, 1),
    }


def _uap(model: nn.Module, splits: DataSplits, xi: float) -> dict[str, Any]:
    """The SGD UAP's fooling rate at linf xi on held-out test points, and random noise's."""
    res = universal_perturbation(
        model,
        (splits.train.x, splits.train.y),
        (splits.test.x, splits.test.y),
        UAPConfig(method="sgd", norm="linf", xi=xi, max_passes=5),
        n_craft=500,
        n_eval=500,
    )
    return {
        "xi": xi,
        "fooling_rate": res.scores.fooling_rate,
        "perturbed_accuracy": res.scores.perturbed_accuracy,
        "random_fooling_rate": res.random.fooling_rate,
        "seconds": round(res.seconds, 1),
    }


def _at_kappa(values: dict[Any, Any]) -> float:
    """A compressibility at KAPPA (keyed by the float or by its string)."""
    for key in (KAPPA, str(KAPPA), f"{KAPPA:g}"):
        if key in values:
            return float(values[key])
    raise KeyError(f"no kappa {KAPPA} in {list(values)}")


def _middle(layers: list[dict[str, Any]], names: set[str]) -> dict[str, float]:
    """Mean compressibility, stable rank and Frobenius norm over the regularised layers."""
    chosen = [layer for layer in layers if layer["name"] in names] or layers

    def mean(get: Any) -> float:
        """Unweighted mean over the chosen layers."""
        return sum(float(get(layer)) for layer in chosen) / len(chosen)

    return {
        "neuron_compressibility": mean(lambda m: _at_kappa(m["neuron_compressibility"])),
        "spectral_compressibility": mean(lambda m: _at_kappa(m["spectral_compressibility"])),
        "stable_rank": mean(lambda m: m["stable_rank"]),
        "frobenius_norm": mean(lambda m: m["frobenius_norm"]),
        "near_zero_fraction": mean(lambda m: m["near_zero_fraction"]),
    }


def measure(
    spec: Spec, model: nn.Module, splits: DataSplits, args: argparse.Namespace
) -> dict[str, Any]:
    """Every number of one row of the sweep."""
    model.eval()
    x, y = splits.test.x[: args.n], splits.test.y[: args.n]
    row: dict[str, Any] = {"clean_full": accuracy(model, splits.test)}
    eps_list = [0.3] + ([args.low_eps] if spec.method == "standard" else [])
    row["autoattack"] = [_autoattack(model, splits, e, args.n) for e in eps_list]
    rec = compress_record(  # the alignment on every point, as the sweep always measured it
        model, x, y, kappas=(KAPPA, 0.25, 0.5), steps=100, alignment_points=None
    )
    names = {n for n, _ in penalized_layers(model, everything=False)}
    net = rec["network"]
    row["network"] = {
        "neuron_compressibility": _at_kappa(net["neuron_compressibility"]),
        "spectral_compressibility": _at_kappa(net["spectral_compressibility"]),
        "stable_rank": net["stable_rank"],
        "frobenius_norm": net["frobenius_norm"],
        "near_zero_fraction_all_weights": net["near_zero_fraction_all_weights"],
    }
    row["middle"] = _middle(rec["layers"], names)
    row["sparsity_model"] = sparsity_of(model)
    row["bound"] = {
        n: {k: b.get(k) for k in ("eps", "bound", "bound_compressibility", "alignment",
                                  "aligned_estimate")}
        for n, b in rec["bound"].items()
    }  # fmt: skip
    row["gap"] = {
        n: {k: g[k] for k in ("eps", "mean", "max", "clean_loss", "robust_accuracy")}
        for n, g in rec["gap"].items()
    }
    row["bound_holds"] = rec["bound_holds"]
    row["layers"] = [
        {k: layer[k] for k in ("name", "shape", "stable_rank", "frobenius_norm", "spectral_norm",
                               "neuron_compressibility", "spectral_compressibility")}
        for layer in rec["layers"]
    ]  # fmt: skip
    row["uap"] = [_uap(model, splits, xi) for xi in UAP_XI]
    return row


def _done(path: Path) -> set[str]:
    """Names of the models already measured."""
    if not path.exists():
        return set()
    return {json.loads(line)["name"] for line in path.read_text().splitlines() if line.strip()}


def main() -> None:
    """Train / prune every model not yet measured and append its row."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=Path, default=Path("runs/compress-sweep"))
    p.add_argument("--results", type=Path, default=Path("benchmarks/results_compress.jsonl"))
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--low-eps", type=float, default=0.1)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--epochs", type=int, default=10, help="standard training's epochs")
    p.add_argument("--at-epochs", type=int, default=30, help="PGD-AT's epochs")
    p.add_argument("--at-steps", type=int, default=10)
    p.add_argument("--only", default="", help="comma-separated model names (default: all)")
    p.add_argument("--list", action="store_true", help="print the model names and stop")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    todo = specs()
    if args.list:
        print("\n".join(s.name for s in todo))
        return
    if args.only:
        wanted = set(args.only.split(","))
        todo = [s for s in todo if s.name in wanted]
    splits = load_data("mnist5k", seed=0)
    done = _done(args.results)
    bases: dict[str, nn.Module] = {}
    for spec in todo:
        if spec.name in done:
            continue
        start = time.perf_counter()
        info: dict[str, Any] = {}
        if spec.prune is None:
            model = _trained(spec, args, splits)
        else:
            key = f"{spec.method}/{spec.pruned_from}"
            if key not in bases:
                origin = next(s for s in specs() if s.name == key)
                bases[key] = _trained(origin, args, splits)
            model, info = _pruned(spec, bases[key], args, splits)
            info["pruned_from"] = key
        built = time.perf_counter() - start
        row = {
            "name": spec.name,
            "method": spec.method,
            "family": spec.family,
            "level": spec.level,
            "recipe": {
                "arch": "mlp", "depth": args.depth, "width": args.width, "seed": spec.seed,
                "epochs": args.at_epochs if spec.method != "standard" else args.epochs,
                "at": {"eps": 0.3, "steps": args.at_steps} if spec.method != "standard" else None,
                "strengths": spec.strengths, "arch_options": spec.arch_options,
                "weight_decay": spec.weight_decay if spec.weight_decay is not None else 5e-4,
            },
            "n": args.n,
            **({"pruning": info} if info else {}),
            **measure(spec, model, splits, args),
        }  # fmt: skip
        row["seconds"] = {"build": round(built, 1), "total": round(time.perf_counter() - start, 1)}
        line = json.dumps(row)
        with open(args.results, "a") as f:
            f.write(line + "\n")
        aa = row["autoattack"]
        print(
            f"{spec.name}: clean {row['clean_full']:.3f} "
            + " ".join(f"AA@{a['eps']} {a['robust']:.3f}" for a in aa)
            + f" ncomp {row['middle']['neuron_compressibility']:.3f}"
            f" scomp {row['middle']['spectral_compressibility']:.3f}"
            f" UAP {[u['fooling_rate'] for u in row['uap']]}"
            f" bound/gap linf {row['bound']['linf']['bound']:.3g}/{row['gap']['linf']['max']:.3g}"
            f" ({row['seconds']['total']} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()

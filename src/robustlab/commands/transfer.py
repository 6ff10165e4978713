"""``robustlab transfer``: a transfer matrix of attacks crafted on sources, evaluated on targets.

Sources and targets are architecture names from ``robustlab models`` (trained on ``--data``
or reused from the model cache; ``NAME:pgd-at`` is its PGD-adversarially-trained version)
or checkpoint paths; a source ``A+B`` is an ensemble of A and B. Each source's examples are
crafted once per attack and evaluated on every target.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import RobustlabError

DEFAULT_ATTACKS = "pgd,mi,di,sgm,sgm+mi+di"
AT_METHODS = ("pgd-at", "trades")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _floats(text: str, what: str) -> list[float]:
    """'0.1,0.2' -> [0.1, 0.2], with a clear error for anything else."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RobustlabError(f"{what} must be comma-separated numbers, got '{text}'") from None
    if not values:
        raise RobustlabError(f"{what} needs at least one value")
    return values


def _names(text: str, what: str) -> list[str]:
    """'a,b' -> ['a', 'b'] without blanks or repeats."""
    names = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    if not names:
        raise RobustlabError(f"{what} needs at least one name")
    return names


@dataclass(frozen=True)
class ModelSpec:
    """What a source or target name stands for: a zoo architecture to train, or a checkpoint."""

    name: str
    arch: str | None = None
    method: str = "standard"
    path: Path | None = None


def parse_model(name: str) -> ModelSpec:
    """Read a model name: ``ARCH``, ``ARCH:pgd-at``, ``ARCH:trades`` or a checkpoint path."""
    from ..models import ARCHITECTURES

    arch, sep, method = name.partition(":")
    if arch in ARCHITECTURES and (not sep or method in AT_METHODS or method == "standard"):
        return ModelSpec(name, arch=arch, method=method or "standard")
    if arch in ARCHITECTURES:
        raise RobustlabError(
            f"unknown training method '{method}' in '{name}'; use {arch}, "
            + ", ".join(f"{arch}:{m}" for m in AT_METHODS)
        )
    path = Path(name)
    if path.exists():
        return ModelSpec(name, path=path)
    if "/" in name or path.suffix in (".json", ".safetensors", ".pt", ".pth"):
        raise RobustlabError(f"checkpoint {name} does not exist")
    raise RobustlabError(
        f"unknown model '{name}': neither an architecture ({', '.join(sorted(ARCHITECTURES))}, "
        "optionally with :pgd-at) nor an existing checkpoint path"
    )


def _train_config(spec: ModelSpec, args: argparse.Namespace) -> Any:
    """The training configuration of a zoo model (the demo's, so its cached models are reused)."""
    from ..train import TrainConfig

    assert spec.arch is not None
    if spec.method == "standard":
        return TrainConfig(arch=spec.arch, data=args.data, epochs=args.epochs, seed=args.seed)
    return TrainConfig(
        arch=spec.arch,
        data=args.data,
        method=spec.method,
        eps=args.at_eps,
        epochs=args.epochs or 10,
        steps=5,
        eps_warmup=0.3,
        seed=args.seed,
    )


def _obtain(
    spec: ModelSpec, args: argparse.Namespace, splits: Any, device: str, cache: Path
) -> tuple[Any, dict[str, Any]]:
    """Load a checkpoint, or reuse / train a zoo model; returns it and a description."""
    from ..demo import config_key
    from ..models.checkpoint import MANIFEST, load_checkpoint
    from ..train import train

    if spec.path is not None:
        ckpt = load_checkpoint(spec.path)
        manifest, model, where = ckpt.manifest, ckpt.model, ckpt.path
    else:
        cfg = _train_config(spec, args)
        where = cache / config_key(cfg)
        if (where / MANIFEST).exists():
            _say(f"reusing {spec.name} from {where}")
            ckpt = load_checkpoint(where)
            manifest, model = ckpt.manifest, ckpt.model
        else:
            _say(f"training {spec.name} ({cfg.method}) on {splits.name}, kept in {where}")
            result = train(cfg, where, splits=splits, device=device, progress=not args.no_progress)
            manifest, model = result.manifest, result.model
    m = manifest.get("model", {})
    info = {
        "path": str(where),
        "arch": m.get("arch"),
        "method": (manifest.get("training") or {}).get("method", spec.method),
        "sha256": (manifest.get("weights") or {}).get("sha256"),
        "input_shape": [m.get("in_channels"), m.get("image_size"), m.get("image_size")],
        "clean_accuracy": (manifest.get("metrics") or {}).get("clean_accuracy"),
    }
    return model.to(device).eval(), info


def _check_shape(name: str, role: str, info: dict[str, Any], splits: Any, others: str) -> None:
    """A checkpoint must take the data's input shape, the shape every other model takes."""
    have = [splits.in_channels, splits.image_size, splits.image_size]
    want = info["input_shape"]
    if None in want or list(want) == have:
        return
    shape, data_shape = "x".join(str(v) for v in want), "x".join(str(v) for v in have)
    raise RobustlabError(
        f"{role} '{name}' takes {shape} inputs, but {others} take {data_shape} inputs "
        f"({splits.name} images); sources and targets must share the input shape"
    )


def cmd_transfer(args: argparse.Namespace) -> int:
    """Build the transfer matrix the flags ask for, print it, write JSON / plots / store."""
    from ..analysis.transfer import gamma_sweep, parse_attack, transfer_matrix
    from ..attacks.surrogate import Ensemble
    from ..core.device import resolve_device
    from ..data import load_data
    from ..demo import cache_root

    sources = _names(args.sources, "--sources")
    targets = _names(args.targets, "--targets")
    gammas = _floats(args.gamma, "--gamma") if args.gamma else None
    attacks = []
    for name in _names(args.attacks, "--attacks"):
        attack = parse_attack(
            name,
            args.norm,
            args.eps,
            steps=args.steps,
            alpha=args.alpha,
            linbp_block=args.linbp_block,
            seed=args.seed,
        )
        attacks.extend(gamma_sweep(attack, gammas) if gammas and attack.sgm else [attack])
    if gammas and not any(a.sgm for a in attacks):
        raise RobustlabError("--gamma sets SGM's decay, but no attack in --attacks uses sgm")
    if args.n is not None and args.n < 1:
        raise RobustlabError(f"--n must be >= 1, got {args.n}")
    members = {m: parse_model(m) for s in sources for m in s.split("+") if m}
    members.update({t: parse_model(t) for t in targets})
    for s in sources:
        if "" in s.split("+"):
            raise RobustlabError(f"source '{s}' has an empty ensemble member")
    device = resolve_device(args.device)
    splits = load_data(args.data)
    cache = Path(args.cache) if args.cache else cache_root()
    models: dict[str, Any] = {}
    infos: dict[str, dict[str, Any]] = {}
    # checkpoints first: a shape mismatch shows before any training
    for name, member in sorted(members.items(), key=lambda kv: kv[1].path is None):
        models[name], infos[name] = _obtain(member, args, splits, device, cache)
        role = "target" if name in targets else "source"
        peers = [n for n in (sources if role == "target" else targets) if n != name]
        other_role = "source" if role == "target" else "target"
        others = f"the {other_role}s ({', '.join(peers)})"
        _check_shape(name, role, infos[name], splits, others if peers else "the data's")
    source_models = {
        s: models[s] if "+" not in s else Ensemble([models[m] for m in s.split("+")]).eval()
        for s in sources
    }
    result = transfer_matrix(
        source_models,
        {t: models[t] for t in targets},
        attacks,
        splits.test,
        n=min(args.n, len(splits.test)) if args.n else None,
        batch_size=args.batch_size,
        targeted=args.targeted,
        seed=args.seed,
        device=device,
        progress=not args.no_progress,
    )
    result = replace(result, models=infos)
    kind = "targeted" if args.targeted else "untargeted"
    print(
        f"{kind} transfer success (%) on {result.n} {splits.name} points, {args.norm} "
        f"eps={args.eps}, over the points each target classifies correctly (* white-box):"
    )
    print(result.table())
    print(
        f"cost: {result.generations} attack generations and {result.target_forwards} target "
        f"passes over the points, {result.elapsed_s:.1f} s"
    )
    record = result.to_dict()
    if args.plots:
        from ..report.transfer_plots import gamma_sweep_plot, transfer_heatmap

        folder = Path(args.plots)
        record["plots"] = [str(transfer_heatmap(result, folder / "transfer_heatmap.png"))]
        if gammas and len(gammas) > 1 and any(not c.white_box for c in result.cells):
            record["plots"].append(str(gamma_sweep_plot(result, folder / "gamma_sweep.png")))
        print(f"plots: {', '.join(record['plots'])}")
    if args.json:
        from ..io import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(record, indent=2, sort_keys=True) + "\n")
    if args.store:
        from ..store import ResultStore

        ResultStore(args.store).add(record, label=args.label or "transfer")
    return 0


def register(sub: Any) -> None:
    """Add the ``transfer`` subcommand to the CLI's subparsers."""
    p = sub.add_parser(
        "transfer",
        help="transfer matrix: attacks crafted on sources, evaluated on targets (SGM, MI, DI)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--sources",
        required=True,
        help="comma-separated models to craft on: architecture names (resnet8, densenet, "
        "vit:pgd-at, ...), checkpoint paths, or ensembles A+B",
    )
    p.add_argument(
        "--targets", required=True, help="comma-separated models to evaluate on (as --sources)"
    )
    p.add_argument(
        "--attacks",
        default=DEFAULT_ATTACKS,
        help="comma-separated attacks, each a '+' of pgd|fgsm and mi, di, ti, sgm, linbp "
        f"(default {DEFAULT_ATTACKS})",
    )
    p.add_argument("--norm", default="linf", choices=["linf", "l2", "l1"])
    p.add_argument("--eps", type=float, default=0.2, help="perturbation budget (default 0.2)")
    p.add_argument("--steps", type=int, default=10, help="attack iterations (default 10)")
    p.add_argument("--alpha", type=float, help="step size (default 2.5 * eps / steps)")
    p.add_argument(
        "--gamma",
        help="SGM decay in (0, 1]; a comma-separated list runs a gamma sweep "
        "(default per source: 0.2 ResNets, 0.5 DenseNets, 0.6 ViTs; with fgsm 0.5 / 0.7 / 0.6)",
    )
    p.add_argument(
        "--linbp-block",
        type=int,
        default=-2,
        help="LinBP starts at this residual block (negative: from the end; default -2)",
    )
    p.add_argument("--targeted", action="store_true", help="random target labels (seeded)")
    p.add_argument("--n", type=int, default=1000, help="test points (default 1000)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--data", default="mnist5k", help="data the zoo models train and test on")
    p.add_argument(
        "--epochs", type=int, help="training epochs for zoo models trained here (default: recipe)"
    )
    p.add_argument(
        "--at-eps", type=float, default=0.3, help="Linf eps of :pgd-at models (default 0.3)"
    )
    p.add_argument("--cache", help="folder of trained zoo models (default ROBUSTLAB_CACHE/demo)")
    p.add_argument("--plots", metavar="DIR", help="write the heatmap (and gamma sweep) here")
    p.add_argument("--store", help="also append the record to this SQLite results store")
    p.add_argument("--label", help="label of the record in the store")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--json", metavar="PATH", help="write the result record (key 'cells') here")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_transfer)

"""robustlab transfer: a transfer matrix of attacks crafted on sources, evaluated on targets.

Sources and targets are architecture names from robustlab models (trained on --data or
reused from the model cache; NAME:pgd-at is its PGD-adversarially-trained version),
checkpoint paths or foreign models (torchvision:NAME, timm:NAME, robustbench:NAME,
python:FILE.py:FACTORY, TorchScript files); --weights, --mean, ... may be repeated, each
bare (every foreign model without its own) or as MEMBER=VALUE (that model alone), and the
record says what each model was given. A source A+B is an ensemble of A and B. The test
points are --data's test split; a user file without one is all test points, unless a zoo
model is trained on it here or a checkpoint was trained on it (then its held-out 20 %, as in
training). Each source's examples are crafted once per attack and evaluated on every target.
Everything that can fail without training (names, budgets, output paths, checkpoint shapes,
whether a source has the residual blocks SGM and LinBP need, each model's options) is checked
before any model is trained.

Under ``torchrun --nproc_per_node N -m robustlab transfer ...`` the matrix's batches are
shared among the N processes (``analysis.transfer.transfer_matrix``); rank 0 trains the zoo
models the cache lacks before the others reuse them, and alone prints and writes the record,
the store row and the plots.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RobustlabError
from ..io import write_json
from .common import (
    DATA_HELP,
    add_command,
    add_common,
    add_engine,
    add_foreign_options,
    add_store,
    add_trust_unhashed,
    cache_output,
    checked_outputs,
    draw_plots,
    finished_record,
    floats,
    is_foreign,
    json_output,
    load_model,
    member_options,
    model_info,
    names,
    plot_outputs,
    say,
    store_output,
)

if TYPE_CHECKING:
    from ..core.distributed import Processes

DESCRIPTION = "transfer matrix: attacks crafted on sources (SGM, MI, DI, ...), evaluated on targets"
DEFAULT_ATTACKS = "pgd,mi,di,sgm,sgm+mi+di"
AT_METHODS = ("pgd-at", "trades")
HEATMAP = "transfer_heatmap.png"
SWEEP = "gamma_sweep.png"
#: How long, in seconds, a torchrun process waits for the others (rank 0 may train zoo models
#: the others then reuse, and processes finish their shares at different times).
WAIT_S = 24 * 3600.0


@dataclass(frozen=True)
class ModelSpec:
    """What a source or target name stands for: a zoo architecture to train, a checkpoint,
    or a foreign model."""

    name: str
    arch: str | None = None
    method: str = "standard"
    path: Path | None = None
    foreign: bool = False


def register(sub: Any) -> None:
    """Add the transfer command."""
    p = add_command(sub, "transfer", DESCRIPTION)
    p.add_argument(
        "--sources",
        required=True,
        help="comma-separated models to craft on: architecture names (resnet8, densenet, "
        "vit:pgd-at, ...), checkpoint paths, foreign models (torchvision:NAME, timm:NAME, "
        "robustbench:NAME, python:FILE.py:FACTORY, TorchScript files), or ensembles A+B",
    )
    p.add_argument(
        "--targets", required=True, help="comma-separated models to evaluate on (as --sources)"
    )
    p.add_argument(
        "--attacks",
        default=DEFAULT_ATTACKS,
        help="comma-separated attacks, each a '+' of pgd or fgsm with any of mi, di, ti, sgm, linbp",
    )
    p.add_argument(
        "--norm", default="linf", choices=["linf", "l2", "l1"], help="norm of the budget"
    )
    p.add_argument("--eps", type=float, default=0.2, help="perturbation budget")
    p.add_argument("--steps", type=int, default=10, help="attack iterations")
    p.add_argument("--alpha", type=float, help="step size (default: 2.5 * eps / steps)")
    p.add_argument(
        "--gamma",
        help="SGM decay in (0, 1]; a comma-separated list runs a gamma sweep (default per "
        "source: 0.2 ResNets, 0.5 DenseNets, 0.6 ViTs; with fgsm 0.5 / 0.7 / 0.6)",
    )
    p.add_argument(
        "--linbp-block",
        type=int,
        default=-2,
        help="LinBP starts at this residual block (negative: counted from the end)",
    )
    p.add_argument("--targeted", action="store_true", help="random target labels (seeded)")
    p.add_argument(
        "--n",
        "--points",
        type=int,
        default=1000,
        help="test points (under torchrun write --points: torchrun takes --n for an "
        "abbreviation of its own options)",
    )
    p.add_argument("--batch-size", type=int, default=250, help="points attacked at once")
    p.add_argument(
        "--data", default="mnist5k", help=f"the zoo models train and test on this {DATA_HELP}"
    )
    p.add_argument(
        "--epochs", type=int, help="training epochs of zoo models trained here (default: recipe)"
    )
    p.add_argument("--at-eps", type=float, default=0.3, help="Linf eps of :pgd-at models")
    p.add_argument(
        "--cache",
        help="folder of trained zoo models (default: $ROBUSTLAB_CACHE/demo, else "
        "~/.cache/robustlab/demo)",
    )
    p.add_argument(
        "--plots",
        metavar="DIR",
        help="write the heatmap (and gamma sweep) into this folder (default: no plots)",
    )
    add_store(p, "transfer")
    add_engine(p)
    add_common(p, json_help="write the result record (key 'cells') here (default: not written)")
    add_trust_unhashed(p)
    add_foreign_options(p, "a source or target", per_member=True)
    p.set_defaults(func=run)


def parse_model(name: str) -> ModelSpec:
    """Read a model name: ARCH, ARCH:pgd-at, ARCH:trades, a checkpoint path or a foreign model."""
    from ..models import ARCHITECTURES

    if is_foreign(name):
        return ModelSpec(name, method="unknown", foreign=True)
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
        "optionally with :pgd-at), an existing checkpoint path nor a foreign model "
        "(torchvision:NAME, timm:NAME, robustbench:NAME, python:FILE.py:FACTORY)"
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


def _describe(
    manifest: dict[str, Any], where: Path, spec: ModelSpec, options: Any = None
) -> dict[str, Any]:
    """The record's description of a model: where it is, what it is, how it was trained, and
    a foreign model's ``options`` (what it was given: ``ForeignOptions.given``)."""
    m = manifest.get("model", {})
    info = {
        **model_info(manifest, where),
        "method": (manifest.get("training") or {}).get("method", spec.method),
        "input_shape": [m.get("in_channels"), m.get("image_size"), m.get("image_size")],
        "clean_accuracy": (manifest.get("metrics") or {}).get("clean_accuracy"),
        "trained_on": (manifest.get("dataset") or {}).get("name"),
    }
    if options is not None:
        info["options"] = options.given()
    return info


def _obtain(
    spec: ModelSpec,
    args: argparse.Namespace,
    splits: Any,
    device: str,
    cache: Path,
    *,
    trust_unhashed: bool = False,
    options: Any = None,
    quiet: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Load a checkpoint (one without a weights hash only if ``trust_unhashed``) or a foreign
    model (with its ``options``, for the data's shape where it has none), or reuse / train a
    zoo model; returns it and a description. ``quiet``: say nothing, show no progress (the
    processes of a torchrun run other than rank 0)."""
    from ..train.cache import cached_folder, is_cached, obtain

    if spec.path is not None or spec.foreign:
        ckpt = load_model(
            spec.name if spec.foreign else str(spec.path),
            splits=splits,
            trust_unhashed=trust_unhashed,
            options=options,
        )
        return ckpt.model.to(device).eval(), _describe(ckpt.manifest, ckpt.path, spec, options)
    cfg = _train_config(spec, args)
    where = cached_folder(cfg, cache)
    if not quiet and is_cached(cfg, cache):
        say(f"reusing {spec.name} from {where}")
    elif not quiet:
        say(f"training {spec.name} ({cfg.method}) on {splits.name}, kept in {where}")
    progress = not args.no_progress and not quiet
    got = obtain(cfg, cache, splits=splits, device=device, progress=progress)
    return got.model.to(device).eval(), _describe(got.manifest, where, spec)


def _skeleton(spec: ModelSpec, splits: Any) -> Any:
    """A zoo model built untrained for the data: enough to check its structure before training."""
    from ..models import build_model

    assert spec.arch is not None
    return build_model(spec.arch, splits.in_channels, splits.num_classes, splits.image_size)


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


def _ensembles(sources: list[str], models: dict[str, Any]) -> dict[str, Any]:
    """Each source as one model: a member itself, or the ensemble of A+B."""
    from ..attacks.surrogate import Ensemble

    return {
        s: models[s] if "+" not in s else Ensemble([models[m] for m in s.split("+")]).eval()
        for s in sources
    }


def _attacks(args: argparse.Namespace, gammas: list[float] | None) -> list[Any]:
    """The transfer attacks --attacks names, one per gamma of a sweep for SGM ones."""
    from ..analysis.transfer import gamma_sweep, parse_attack

    attacks = []
    for name in names(args.attacks, "--attacks"):
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
    return attacks


def run(args: argparse.Namespace) -> int:
    """Join torchrun's processes (if it started this one), then build and report the matrix."""
    from ..core.device import resolve_device
    from ..core.distributed import processes_of_run

    with processes_of_run(resolve_device(args.device), WAIT_S) as (processes, device):
        return _run(args, processes, device)


def _rank_zero_first(processes: Processes, load: Callable[[], None]) -> None:
    """``load()`` on rank 0, then on the other processes: what rank 0 trains or fetches into
    the model cache, they reuse. A failure on any process stops every one, said once."""
    from ..core.distributed import together

    for first in (True, False):
        with together(processes):
            if processes.main == first:
                load()


def _run(args: argparse.Namespace, processes: Processes, device: str) -> int:
    """Check everything cheap first, then obtain the models, build the matrix (its batches
    shared among the processes) and report it (rank 0)."""
    from ..analysis.transfer import check_sources, transfer_matrix
    from ..core.checks import check_batch_size
    from ..core.distributed import check_share, together
    from ..data import load_data
    from ..data.datasets import same_source
    from ..evaluate.sharded import BATCH_NAMES
    from ..models.engine import check_engine
    from ..train.cache import cache_root

    with together(processes):  # a bad option or output stops every process, said once
        sources = names(args.sources, "--sources")
        targets = names(args.targets, "--targets")
        gammas = floats(args.gamma, "--gamma") if args.gamma else None
        attacks = _attacks(args, gammas)
        if args.n is not None and args.n < 1:
            raise RobustlabError(f"--n must be >= 1, got {args.n}")
        check_batch_size(args.batch_size)
        check_engine(args.engine)
        members = {m: parse_model(m) for s in sources for m in s.split("+") if m}
        members.update({t: parse_model(t) for t in targets})
        options = member_options(args, list(members))  # each foreign model's, before any work
        for s in sources:
            if "" in s.split("+"):
                raise RobustlabError(f"source '{s}' has an empty ensemble member")
        pngs = [HEATMAP, SWEEP] if gammas and len(gammas) > 1 else [HEATMAP]
        outputs = [json_output(args.json), store_output(args.store)]
        cache = Path(args.cache) if args.cache else cache_root()
        trust = args.trust_unhashed
        zoo = any(m.arch is not None for m in members.values())  # trained here or reused
        checked_outputs(
            args,
            [
                *outputs,
                *plot_outputs(args.plots, pngs, "--plots"),
                cache_output(cache) if zoo else None,
            ],
            models=[m.path or (m.name if m.foreign else None) for m in members.values()],
            data=[args.data],
            inputs=[cache] if zoo else [],
            options=options,
        )
        models: dict[str, Any] = {}
        infos: dict[str, dict[str, Any]] = {}
        # checkpoints first: the data a checkpoint was trained on decides whether a user file
        # without a test split is all test points (as for eval) or keeps its held-out 20 %
        trained_on = []
        for name, member in members.items():
            if member.path is not None:
                models[name], infos[name] = _obtain(
                    member, args, None, device, cache, trust_unhashed=trust
                )
                trained_on.append(infos[name].get("trained_on") or "")
        keep_split = zoo or any(same_source(args.data, t) for t in trained_on if t)
        splits = load_data(args.data, test_only=not keep_split)
        points = min(args.n, len(splits.test)) if args.n else len(splits.test)
        batches = -(-points // args.batch_size)  # refused before any training, not after
        check_share(processes, batches, BATCH_NAMES, "use a smaller batch size")
    quiet = not processes.main  # the other processes reuse what rank 0 says it obtains

    def foreign() -> None:
        """Foreign models, which take the data's shape if they have none."""
        for name, member in members.items():
            if member.foreign:
                models[name], infos[name] = _obtain(
                    member, args, splits, device, cache, options=options[name], quiet=quiet
                )

    _rank_zero_first(processes, foreign)
    with together(processes):
        # before any training: the loaded models' shapes, then the sources' structure (zoo
        # models built untrained) against what the attacks' transforms need
        for name in models:
            role = "target" if name in targets else "source"
            peers = [n for n in (sources if role == "target" else targets) if n != name]
            other_role = "source" if role == "target" else "target"
            others = f"the {other_role}s ({', '.join(peers)})"
            _check_shape(name, role, infos[name], splits, others if peers else "the data's")
        skeletons = {
            n: models[n] if n in models else _skeleton(m, splits) for n, m in members.items()
        }
        check_sources(attacks, _ensembles(sources, skeletons))

    def zoo_models() -> None:
        """The zoo models, reused from the cache or trained into it."""
        for name, member in members.items():
            if member.arch is not None:
                models[name], infos[name] = _obtain(
                    member, args, splits, device, cache, trust_unhashed=trust, quiet=quiet
                )

    _rank_zero_first(processes, zoo_models)
    result = transfer_matrix(
        _ensembles(sources, models),
        {t: models[t] for t in targets},
        attacks,
        splits.test,
        n=points,
        batch_size=args.batch_size,
        targeted=args.targeted,
        seed=args.seed,
        device=device,
        progress=not args.no_progress,
        engine=args.engine,
        processes=processes,
    )
    result = replace(result, models=infos)
    with together(processes):
        if processes.main:
            _report(args, result, splits.name, gammas)
    return 0


def _report(
    args: argparse.Namespace, result: Any, data_name: str, gammas: list[float] | None
) -> None:
    """Print the matrix, write its record (JSON, store) and draw its plots."""
    kind = "targeted" if args.targeted else "untargeted"
    print(
        f"{kind} transfer success (%) on {result.n} {data_name} points, {args.norm} "
        f"eps={args.eps}, over the points each target classifies correctly (* white-box):"
    )
    print(result.table())
    shared = f", {result.world_size} processes" if result.world_size > 1 else ""
    print(
        f"cost: {result.generations} attack generations and {result.target_forwards} target "
        f"passes over the points, {result.elapsed_s:.1f} s{shared}"
    )
    record = finished_record(args, result.to_dict())
    sweep = bool(gammas and len(gammas) > 1 and any(not c.white_box for c in result.cells))
    drawn = [HEATMAP, SWEEP] if sweep else [HEATMAP]
    if args.plots:
        record["plots"] = [str(Path(args.plots) / name) for name in drawn]
    # the records first: a plot that cannot be drawn never costs one
    if args.json:
        write_json(args.json, record)
    if args.store:
        from ..store import ResultStore

        ResultStore(args.store).add(record, label=args.label or "transfer")
    if args.plots:
        from ..report.transfer_plots import gamma_sweep_plot, transfer_heatmap

        draw = {HEATMAP: transfer_heatmap, SWEEP: gamma_sweep_plot}
        draw_plots(partial(draw[name], result, Path(args.plots) / name) for name in drawn)
        print(f"plots: {', '.join(record['plots'])}")

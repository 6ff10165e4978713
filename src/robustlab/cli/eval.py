"""robustlab eval: clean and robust accuracy of a checkpoint under an attack, at one eps or more.

Under ``torchrun --nproc_per_node N -m robustlab eval ...`` the evaluation batches are shared
among the N processes (``evaluate.sharded``): each keeps its share in a progress file of its
own beside --json, rank 0 alone prints, shows progress and writes the record, the per-sample
table and the store's rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RobustlabError, RunStopped
from ..io import Output, atomic_write_text, resume_state, write_json
from .common import (
    add_attack_options,
    add_command,
    add_common,
    add_engine,
    add_store,
    attack_options,
    checked_outputs,
    finished_record,
    floats,
    json_output,
    load_model_and_data,
    say_engine,
    store_output,
)

if TYPE_CHECKING:
    from ..core.distributed import Processes

DESCRIPTION = "clean and robust accuracy of a checkpoint under an attack, at one eps or a curve"
DEFAULT_N = 1000  # test points evaluated when --n is not given (all of mnist5k's test split)
PROTOCOLS = ("plain", "msa")
#: How long, in seconds, a torchrun process that finished its share waits for the others.
WAIT_S = 24 * 3600.0


def register(sub: Any) -> None:
    """Add the eval command."""
    p = add_command(sub, "eval", DESCRIPTION)
    add_attack_options(p)
    p.add_argument(
        "--eps", required=True, help="budget, or a comma-separated list for a robustness curve"
    )
    p.add_argument(
        "--n",
        "--points",
        type=int,
        help=f"number of test points (default: all, at most {DEFAULT_N}; under torchrun write "
        "--points: torchrun takes --n for an abbreviation of its own options)",
    )
    p.add_argument(
        "--samples",
        metavar="PATH",
        help="per-sample CSV (default: beside --json as NAME.samples.csv, else not written)",
    )
    p.add_argument(
        "--no-resume", action="store_true", help="do not checkpoint per batch beside --json"
    )
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="plain",
        help="plain: --attack on the model's own forward; msa: the Mixed Surrogate Attack "
        "for defended models (AutoAttack, --version/--attacks, on the model and on each "
        "surrogate it declares, every example judged by the model; one eps)",
    )
    p.add_argument(
        "--hpm-mode",
        choices=("mix", "ema"),
        help="an HPM checkpoint's inference mode: mix (batch prototypes; depends on the "
        "batch) or ema (dataset prototypes alone; batch-independent) (default: its saved mode)",
    )
    p.add_argument(
        "--surrogate-attacks",
        help="with --protocol msa: the AutoAttack members run on each surrogate, e.g. "
        "apgd-ce,apgd-t,fab-t (default: the version's APGD members)",
    )
    add_store(p, "the checkpoint folder's name")
    add_engine(p)
    add_common(p)
    p.set_defaults(func=run)


def _samples_path(args: argparse.Namespace) -> Path | None:
    """Where the per-sample CSV goes: --samples, else beside --json, else nowhere."""
    if args.samples:
        return Path(args.samples)
    return Path(args.json).with_suffix(".samples.csv") if args.json else None


def _progress_path(args: argparse.Namespace) -> Path | None:
    """The per-batch progress file beside --json (none without --json or with --no-resume)."""
    return Path(args.json + ".progress.jsonl") if args.json and not args.no_resume else None


def _outputs(args: argparse.Namespace, samples: Path | None, progress: Path | None) -> list[Any]:
    """Every file the command writes: the record, the per-sample CSV, the store, progress."""
    from ..evaluate.progress import is_progress_file
    from ..evaluate.robust import is_samples_csv

    return [
        json_output(args.json),
        Output(samples, "--samples", ours=is_samples_csv) if samples else None,
        store_output(args.store),
        Output(progress, "--json (its .progress.jsonl)", ours=is_progress_file)
        if progress
        else None,
    ]


def _write(args: argparse.Namespace, records: list[Any], samples: Path | None) -> None:
    """Write the records' per-sample CSV, their JSON, and their rows and per-sample outcomes
    in the store."""
    from ..evaluate.robust import samples_csv
    from ..store import ResultStore

    dicts = [finished_record(args, r.to_dict()) for r in records]
    if samples is not None:
        if args.json:
            for d in dicts:
                d["samples_file"] = str(samples)
        atomic_write_text(samples, samples_csv(records))
    if args.json:
        write_json(args.json, dicts[0] if len(dicts) == 1 else {"records": dicts})
    if args.store:  # every eps of the run with its per-sample outcomes, in one transaction
        stored = [{**d, "samples": r.samples} for d, r in zip(dicts, records, strict=True)]
        ResultStore(args.store).add_many(stored, label=args.label or Path(args.model).name)


def _loaded(args: argparse.Namespace, device: str) -> tuple[Any, Any, dict[str, object]]:
    """The model (on ``device``) and data, the model in the HPM mode asked (and its record
    saying so)."""
    from ..models.hpm import HPMClassifier

    model, splits, _, info = load_model_and_data(args, device, test_only=True)
    if args.n is None:
        args.n = min(DEFAULT_N, len(splits.test))
    if args.hpm_mode is not None:
        if not isinstance(model, HPMClassifier):
            raise RobustlabError("--hpm-mode needs an HPM checkpoint (see robustlab hpm)")
        model.mode = args.hpm_mode
        saved = info.get("hpm")
        info["hpm"] = {**(saved if isinstance(saved, dict) else {}), "mode": args.hpm_mode}
    return model, splits, info


def run(args: argparse.Namespace) -> int:
    """Join torchrun's processes (if it started this one), then evaluate with the protocol; a
    stopped run says where its finished batches stay."""
    from ..core.device import resolve_device
    from ..core.distributed import processes_of_run

    with processes_of_run(resolve_device(args.device), WAIT_S) as (processes, device):
        try:
            if args.protocol == "msa":
                return run_msa(args, processes, device)
            return run_plain(args, processes, device)
        except RunStopped:
            kept = _kept(_progress_path(args), processes)
            if kept is None:
                raise
            raise RunStopped(kept) from None


def _kept(progress: Path | None, processes: Processes) -> str | None:
    """Where a stopped run's finished batches stay (None: in no file)."""
    from ..core.distributed import shard_path

    if progress is None or not shard_path(progress, processes).exists():
        return None
    if not processes.distributed:
        return f"the finished batches stay in {progress}"
    files = progress.with_name(f"{progress.stem}.rank*-of-{processes.world_size}{progress.suffix}")
    return f"the finished batches stay in {files}"


def _prepared(
    args: argparse.Namespace, processes: Processes, device: str
) -> tuple[Path | None, Path | None, Path | None, Any, Any, dict[str, object]]:
    """Check the outputs (this process's progress file among them), load the model and data:
    the per-sample CSV, the run's progress path, this process's, the model, splits, info."""
    from ..core.distributed import shard_path

    samples, progress = _samples_path(args), _progress_path(args)
    own = shard_path(progress, processes) if progress is not None else None
    checked_outputs(args, _outputs(args, samples, own), models=[args.model], data=[args.data])
    model, splits, info = _loaded(args, device)
    return samples, progress, own, model, splits, info


def run_plain(args: argparse.Namespace, processes: Processes, device: str) -> int:
    """Check the options and outputs, evaluate, print and write the records (rank 0)."""
    from ..attacks.registry import make_attack
    from ..core.distributed import together
    from ..evaluate import evaluate_curve
    from ..models.engine import check_engine

    with together(processes):  # a bad option or output stops every process, said once
        check_engine(args.engine)
        if args.surrogate_attacks:
            raise RobustlabError("--surrogate-attacks goes with --protocol msa")
        options = attack_options(args)
        attacks = [
            make_attack(args.attack, args.norm, eps, **options) for eps in floats(args.eps, "--eps")
        ]
        samples, progress, own, model, splits, info = _prepared(args, processes, device)
    # the resume state goes only once every output below was written
    with resume_state(own):
        records = evaluate_curve(
            model,
            splits.test,
            attacks,
            n=args.n,
            batch_size=args.batch_size,
            device=device,
            seed=args.seed,
            progress=not args.no_progress,
            model_info=info,
            resume=progress,
            keep_resume=True,
            engine=args.engine,
            processes=processes,
        )
        with together(processes):
            if processes.main:
                _show(records, args.norm)
                _write(args, records, samples)
    return 0


def _show(records: list[Any], norm: str) -> None:
    """Print the records of a plain evaluation: one line per eps, its steps and warnings."""
    say_engine(records[0].engine)
    for rec in records:
        eps = rec.threat_model["eps"]
        shared = f", {rec.world_size} processes" if rec.world_size > 1 else ""
        print(
            f"{rec.n} points, {norm} eps={eps}: clean {100 * rec.clean_accuracy:.2f} %, "
            f"robust {100 * rec.robust_accuracy:.2f} % ({rec.elapsed_s:.1f} s{shared})"
        )
        for step in rec.per_attack:
            print(
                f"    after {step['attack']}: {100 * step['robust_accuracy_after']:.2f} % "
                f"({step['seconds']} s)"
            )
        for warning in rec.warnings:
            print(f"    warning: {warning}")


def run_msa(args: argparse.Namespace, processes: Processes, device: str) -> int:
    """The MSA protocol: check, evaluate the model with its declared surrogates, print, write."""
    from ..attacks.autoattack import AutoAttack
    from ..attacks.registry import make_attack
    from ..core.distributed import together
    from ..evaluate.msa import evaluate_msa
    from ..models.engine import check_engine

    with together(processes):  # a bad option or output stops every process, said once
        check_engine(args.engine)
        eps = floats(args.eps, "--eps")
        if len(eps) != 1:
            raise RobustlabError(f"--protocol msa evaluates one --eps, got {args.eps}")
        if args.attack not in ("pgd", "autoattack"):  # pgd: the option's default, left unset
            raise RobustlabError(
                f"--protocol msa runs AutoAttack (choose its parts with --version or "
                f"--attacks), not --attack {args.attack}"
            )
        ensemble = make_attack("autoattack", args.norm, eps[0], **attack_options(args))
        assert isinstance(ensemble, AutoAttack)
        samples, progress, own, model, splits, info = _prepared(args, processes, device)
    with resume_state(own):  # removed only once every output was written
        rec = evaluate_msa(
            model,
            splits.test,
            norm=ensemble.norm,
            eps=ensemble.eps,
            version=ensemble.version,
            attacks=ensemble.attacks,
            surrogate_attacks=tuple(
                a.strip() for a in (args.surrogate_attacks or "").split(",") if a.strip()
            ),
            n=args.n,
            batch_size=args.batch_size,
            device=device,
            seed=args.seed,
            progress=not args.no_progress,
            model_info=info,
            resume=progress,
            keep_resume=True,
            engine=args.engine,
            processes=processes,
        )
        with together(processes):
            if processes.main:
                say_engine(rec.engine)
                _show_msa(rec, args.norm)
                _write(args, [rec], samples)
    return 0


def _show_msa(rec: Any, norm: str) -> None:
    """Print an MSA record: the three numbers, then every stage and warning."""
    print(
        f"{rec.n} points, {norm} eps={rec.threat_model['eps']}, evaluation batch "
        f"{rec.batch_size}: clean {100 * rec.clean_accuracy:.2f} %, plain AutoAttack "
        f"{100 * rec.plain_robust_accuracy:.2f} %, MSA {100 * rec.robust_accuracy:.2f} % "
        f"({rec.elapsed_s:.1f} s)"
    )
    for stage in rec.stages:
        print(
            f"    after {stage['stage']}: {100 * stage['robust_accuracy_after']:.2f} % "
            f"(broke {stage['broken']}, {stage['seconds']} s)"
        )
    for warning in rec.warnings:
        print(f"    warning: {warning}")

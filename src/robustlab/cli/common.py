"""Argument helpers every command shares: common options, list parsing, the declaration of
a command's outputs and inputs for ``io.check_outputs``, loading checkpoints, what every
record says of how it was made, messages."""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import RobustlabError
from ..io import Output, check_outputs, is_robustlab_json
from ..version import __version__

DEVICE_HELP = "auto (CUDA when present), cpu, cuda, cuda:N or mps"
DATA_HELP = "data: mnist5k, digits, npz:PATH, folder:PATH or torchvision:NAME"
OVERWRITE_HELP = (
    "replace existing output files that robustlab did not write (files the command reads are "
    "never replaced, and a results store is only ever appended to)"
)
TRUST_HELP = (
    "load a checkpoint whose manifest has no weights hash, so its weights cannot be checked "
    "(the record says so)"
)


class ShownLater(str):
    """Help text completed only when --help shows it: ``fill`` may import modules that load
    torch, which building the parser must not (``robustlab --help`` stays fast)."""

    fill: Callable[[], str]

    def __new__(cls, text: str, fill: Callable[[], str]) -> ShownLater:
        """The short text (what the option is), completed by ``fill()`` when shown."""
        obj = super().__new__(cls, text)
        obj.fill = fill
        return obj


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default after its help, unless the help already names it.

    Flags (default off) and options whose default is None (the help then says in words what
    happens when they are left out) get no "(default: ...)" suffix.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        """The help text, with the default appended where it says something."""
        text = action.help.fill() if isinstance(action.help, ShownLater) else action.help or ""
        if "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        return text + " (default: %(default)s)"


def add_command(sub: Any, name: str, description: str) -> argparse.ArgumentParser:
    """A subcommand whose one-line description serves as both its summary and its --help text."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=description,
        description=description[:1].upper() + description[1:] + ".",
        formatter_class=HelpFormatter,
    )
    return parser


def add_common(
    p: argparse.ArgumentParser,
    *,
    json_help: str = "write the result record as JSON here (default: not written)",
    seed: bool = True,
    device: bool = True,
    progress: bool = True,
    overwrite_help: str = OVERWRITE_HELP,
) -> None:
    """The options (--seed, --device, --json, --overwrite, --no-progress) shared by the
    commands."""
    if seed:
        p.add_argument("--seed", type=int, default=0, help="random seed")
    if device:
        p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", metavar="PATH", help=json_help)
    add_overwrite(p, overwrite_help)
    if progress:
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_engine(p: argparse.ArgumentParser) -> None:
    """--engine: what runs the forward-only passes (robustlab.models.engine)."""
    p.add_argument(
        "--engine",
        default="auto",
        help="what runs the passes that need no gradient (Square's queries, clean and "
        "checking passes): auto (ONNX Runtime where installed, faithful on a probe batch and "
        "faster, else PyTorch), torch or onnxruntime; gradients always run in PyTorch",
    )


def add_overwrite(p: argparse.ArgumentParser, text: str = OVERWRITE_HELP) -> None:
    """--overwrite: the one permission to replace a file robustlab did not write."""
    p.add_argument("--overwrite", action="store_true", help=text)


def add_trust_unhashed(p: argparse.ArgumentParser) -> None:
    """--trust-unhashed: load a checkpoint without a weights hash, recorded as such."""
    p.add_argument("--trust-unhashed", action="store_true", help=TRUST_HELP)


def add_store(p: argparse.ArgumentParser, default_label: str) -> None:
    """--store and --label: append the command's records to a results store."""
    p.add_argument(
        "--store",
        metavar="PATH",
        help="also append the record(s) to this SQLite results store (default: none)",
    )
    p.add_argument(
        "--label", help=f"name of the record(s) in the store and reports (default: {default_label})"
    )


def add_legacy_arch(p: argparse.ArgumentParser) -> None:
    """--arch: the architecture of a legacy .pt/.pth weights file, which has no manifest."""
    p.add_argument(
        "--arch",
        help="architecture of a legacy .pt/.pth weights file without a manifest, built for the "
        "data's input shape and classes (default: the architecture the manifest names)",
    )


def check_seeds(args: argparse.Namespace) -> None:
    """--seed and --data-seed, where a command takes them, within what every generator takes."""
    from ..data.validate import check_seed

    for dest, option in (("seed", "--seed"), ("data_seed", "--data-seed")):
        value = getattr(args, dest, None)
        if value is not None:
            check_seed(value, option)


def json_output(path: str | None, option: str = "--json") -> Output | None:
    """A JSON record output (replaced only if robustlab wrote it); None when not asked for."""
    return Output(Path(path), option, ours=is_robustlab_json) if path else None


def _store_to_append(path: Path) -> bool:
    """Whether an existing file is a results store robustlab may append to; any other file is
    refused with the store's own reason (another application's database, a damaged file)."""
    from ..store import ResultStore

    ResultStore(path, read_only=True)
    return True


def store_output(path: str | Path | None, option: str = "--store") -> Output | None:
    """A results store the command appends to (never replaced); None when not asked for."""
    return Output(Path(path), option, ours=_store_to_append, appends=True) if path else None


def cache_output(folder: Path) -> Output:
    """The model cache a command trains zoo models into (its models are inputs as well)."""
    return Output(folder, "--cache", folder=True)


def plot_outputs(folder: str | Path | None, files: Iterable[str], option: str) -> list[Output]:
    """A folder of plots and each PNG the command draws there (none when not asked for)."""
    if not folder:
        return []
    from ..report.plots import is_robustlab_png

    root = Path(folder)
    pngs = [Output(root / name, option, ours=is_robustlab_png) for name in files]
    return [Output(root, option, folder=True), *pngs]


def checked_outputs(
    args: argparse.Namespace,
    outputs: Iterable[Output | None],
    *,
    models: Iterable[str | Path | None] = (),
    data: Iterable[str | None] = (),
    inputs: Iterable[str | Path | None] = (),
    options: dict[str, Any] | None = None,
) -> None:
    """Check every output of a command before it does any work (``io.check_outputs``), with
    the files it reads as inputs: each checkpoint's files, each foreign model's code and
    weights (its own ``options`` where a command gives each its own, by name as in
    ``models``; else the command's --weights) and each data source."""
    from ..data.datasets import source_path
    from ..models.checkpoint import checkpoint_files
    from ..models.foreign import foreign_inputs
    from ..models.pretrained import resolve as resolve_zoo

    read: list[str | Path | None] = list(inputs)
    for model in models:
        if model is not None and is_foreign(model):  # its code, archive and weights files
            if options is None:
                weights = getattr(args, "weights", None)
            else:
                weights = options[str(model)].weights if str(model) in options else None
            read.extend(foreign_inputs(model, weights))
        elif model is not None:  # a path that does not exist is said by the loader
            path = Path(resolve_zoo(model)).expanduser()
            read.extend(checkpoint_files(path) if path.exists() else [path])
    read.extend(source_path(spec) for spec in data if spec)
    check_outputs(outputs, read, overwrite=bool(getattr(args, "overwrite", False)))


def draw_plots(plots: Iterable[Callable[[], Path]]) -> list[Path]:
    """Draw each plot once the records are written; one that fails does not stop the others,
    and the error says the records were kept."""
    drawn, failed = [], []
    for draw in plots:
        try:
            drawn.append(draw())
        except RobustlabError as exc:
            failed.append(str(exc))
    if failed:
        which = "this plot" if len(failed) == 1 else "these plots"
        raise RobustlabError(f"{'; '.join(failed)}; the records were written, without {which}")
    return drawn


def provenance(args: argparse.Namespace) -> dict[str, Any]:
    """How a record was made: the command line as typed (``command``, when the command ran
    through ``robustlab.cli.main``, which keeps it in ``args.command_line``) and the versions
    of Python, torch and numpy (``environment``), for a model card's reproducibility block."""
    import numpy
    import torch

    out: dict[str, Any] = {
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "platform": platform.platform(terse=True),
        }
    }
    argv = getattr(args, "command_line", None)
    if argv is not None:
        out["command"] = shlex.join(["robustlab", *argv])
    return out


def finished_record(args: argparse.Namespace, record: dict[str, Any]) -> dict[str, Any]:
    """A command's record as it is written (JSON and store): with when and by which robustlab
    it was made where it does not say so itself, and how (``provenance``). Every command that
    writes records passes them through here, the one place that says how a record was made."""
    from datetime import datetime, timezone

    made = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "robustlab_version": __version__,
    }
    return {**made, **record, **provenance(args)}


def say(msg: str) -> None:
    """A progress message on stderr (stdout carries the results)."""
    print(msg, file=sys.stderr, flush=True)


def say_engine(choice: dict[str, Any] | None) -> None:
    """Say which engine ran the forward-only passes, and why."""
    if choice is not None:
        say(f"forward-only passes: {choice['engine']} ({choice['reason']})")


def floats(text: str, what: str) -> list[float]:
    """'0.1,0.2' -> [0.1, 0.2], with a clear error for anything else."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RobustlabError(
            f"{what} must be a number or comma-separated numbers, got '{text}'"
        ) from None
    if not values:
        raise RobustlabError(f"{what} needs at least one value")
    return values


def ints(text: str, what: str) -> list[int]:
    """'1,3,5' -> [1, 3, 5], with a clear error for anything else."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RobustlabError(
            f"{what} must be comma-separated whole numbers, got '{text}'"
        ) from None


def names(text: str, what: str) -> list[str]:
    """'a,b' -> ['a', 'b'] without blanks or repeats."""
    found = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    if not found:
        raise RobustlabError(f"{what} needs at least one name")
    return found


def key_values(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings to a dict, values read as JSON where they parse (numbers, booleans)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RobustlabError(f"option '{item}' must look like KEY=VALUE")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


MODEL_HELP = (
    "the model: a robustlab checkpoint (folder, manifest.json or legacy .pt/.pth), a shipped "
    "model zoo:NAME (robustlab models --pretrained), torchvision:NAME, timm:NAME, robustbench:NAME, python:FILE.py:FACTORY or a TorchScript "
    "file (see README, 'Your own model')"
)


def add_model_options(p: argparse.ArgumentParser, help_text: str = MODEL_HELP) -> None:
    """--model, with --arch for a legacy .pt/.pth and what a foreign model is given."""
    p.add_argument("--model", required=True, help=help_text)
    add_legacy_arch(p)
    add_foreign_options(p)


#: The options a foreign model is given: (attribute of the parsed arguments, option).
FOREIGN_OPTIONS = (
    ("weights", "--weights"),
    ("mean", "--mean"),
    ("std", "--std"),
    ("input_size", "--input-size"),
    ("num_classes", "--num-classes"),
    ("dataset", "--dataset"),
    ("threat_model", "--threat-model"),
)
PER_MEMBER_HELP = (
    "Each of these options may be repeated: a bare VALUE applies to every foreign source and "
    "target without a value of its own, MEMBER=VALUE only to MEMBER, a source or target named "
    "exactly as in --sources/--targets (e.g. --weights python:net.py:make=a.safetensors "
    "--weights timm:resnet18=b.pth); a value is split at the '=' after such a name only, so a "
    "file name with '=' in it is a bare value."
)


def add_foreign_options(
    p: argparse.ArgumentParser, which: str = "the model", *, per_member: bool = False
) -> None:
    """What a foreign model is given: --weights, --mean, --std, --input-size, --num-classes,
    and RobustBench's --dataset and --threat-model; ``per_member`` (transfer, which loads many
    models) lets each be repeated, as VALUE or MEMBER=VALUE (read by ``member_options``)."""
    group = p.add_argument_group(
        f"when {which} is foreign (torchvision:, timm:, robustbench:, python:, TorchScript)",
        PER_MEMBER_HELP if per_member else None,
    )

    def option(flag: str, metavar: str | None, help_text: str, **kw: Any) -> None:
        """One option: single-valued, or repeatable as [MEMBER=]VALUE (values read later)."""
        if per_member:
            kw = {"action": "append", "metavar": f"[MEMBER=]{metavar or 'VALUE'}"}
        elif metavar is not None:
            kw["metavar"] = metavar
        group.add_argument(flag, help=help_text, **kw)

    option(
        "--weights",
        "FILE",
        "weights of a torchvision:, timm: or python: model: a safetensors file or a "
        ".pt/.pth state dict (read without running code), or 'hub' (hub:TAG) for the library's "
        "pretrained weights, which needs a network once (default: none)",
    )
    option(
        "--mean",
        None,
        "per-channel mean the model was trained with, e.g. 0.485,0.456,0.406; robustlab "
        "puts the normalisation inside the model (default: what the source declares)",
    )
    option("--std", None, "per-channel std to go with --mean (default: what the source declares)")
    option(
        "--input-size",
        "C,H,W",
        "input the model takes, e.g. 3,32,32 (default: the model's, else the data's)",
    )
    option(
        "--num-classes",
        "N" if per_member else None,
        "classes the model predicts (default: the weights', else the data's)",
        type=int,
    )
    option(
        "--dataset",
        None,
        "RobustBench's dataset of a robustbench: model: cifar10, cifar100 or imagenet "
        "(default: cifar10)",
    )
    option(
        "--threat-model",
        None,
        "RobustBench's threat model of a robustbench: model: Linf, L2 or corruptions "
        "(default: Linf)",
    )


def _whole(value: int | str, what: str) -> int:
    """A whole number typed on the command line (argparse has already read a single one)."""
    if isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        raise RobustlabError(f"{what} must be a whole number, got '{value}'") from None


def foreign_options(values: dict[str, Any]) -> Any:
    """``models.foreign.ForeignOptions`` from the options' values as typed, keyed as in
    ``FOREIGN_OPTIONS`` (a missing or None value: not given), each checked."""
    from ..models.foreign import ForeignOptions

    mean, std, size = values.get("mean"), values.get("std"), values.get("input_size")
    classes = values.get("num_classes")
    return ForeignOptions.of(
        weights=values.get("weights"),
        mean=floats(mean, "--mean") if mean else None,
        std=floats(std, "--std") if std else None,
        input_size=ints(size, "--input-size") if size else None,
        num_classes=None if classes is None else _whole(classes, "--num-classes"),
        dataset=values.get("dataset"),
        threat_model=values.get("threat_model"),
    )


def model_options(args: argparse.Namespace) -> Any:
    """The foreign-model options a command was given (``models.foreign.ForeignOptions``)."""
    return foreign_options({dest: getattr(args, dest, None) for dest, _ in FOREIGN_OPTIONS})


def _split_member(text: str, option: str, members: list[str]) -> tuple[str | None, str]:
    """One value of a repeatable foreign-model option: (MEMBER, VALUE) when it starts with a
    member's name and '=', else (None, the whole text); a text with '=' that names no member
    is refused, unless it is an existing --weights file."""
    named = [m for m in members if text.startswith(f"{m}=")]
    if named:
        member = max(named, key=len)  # the longest name, should one name begin another's
        value = text[len(member) + 1 :]
        if not value.strip():
            raise RobustlabError(f"{option} {text} gives {member} no value")
        return member, value
    if "=" in text and not (option == "--weights" and Path(text).expanduser().exists()):
        left = text.partition("=")[0]
        raise RobustlabError(
            f"'{left}' in {option} {text} is not a source or target of this command "
            f"({', '.join(members)}); write MEMBER=VALUE with MEMBER exactly as in "
            "--sources/--targets"
        )
    return None, text


def member_options(args: argparse.Namespace, members: list[str]) -> dict[str, Any]:
    """Each foreign member's options (``models.foreign.ForeignOptions``) when the options may
    be repeated (``add_foreign_options(per_member=True)``): MEMBER=VALUE gives VALUE to that
    member, a bare VALUE to every foreign member without a value of its own. Refused: a member
    given two values of one option, two bare values of one option, options for a member that
    is not foreign, and bare values that apply to no member."""
    foreign = [m for m in members if is_foreign(m)]
    own: dict[str, dict[str, str]] = {m: {} for m in members}
    bare: dict[str, str] = {}
    for dest, option in FOREIGN_OPTIONS:
        for text in getattr(args, dest, None) or []:
            member, value = _split_member(text, option, members)
            if member is None and dest in bare:
                raise RobustlabError(
                    f"{option} is given twice without a member name ({bare[dest]} and {value}); "
                    f"give each source or target its own as {option} MEMBER=VALUE"
                )
            if member is not None and dest in own[member]:
                raise RobustlabError(
                    f"{option} is given twice for {member} ({own[member][dest]} and {value})"
                )
            (bare if member is None else own[member])[dest] = value
    flags = dict(FOREIGN_OPTIONS)
    for member, values in own.items():
        if values and member not in foreign:
            raise RobustlabError(
                f"{', '.join(flags[d] for d in values)} given for {member}, which is not a "
                "foreign model (a zoo architecture or a checkpoint, whose weights, shape and "
                "normalisation robustlab knows)"
            )
    if bare and not foreign:
        verb = "applies" if len(bare) == 1 else "apply"
        raise RobustlabError(
            f"{', '.join(flags[d] for d in bare)} {verb} to foreign sources and targets, and "
            "there are none"
        )
    for dest, value in bare.items():
        if all(dest in own[m] for m in foreign):
            raise RobustlabError(
                f"every foreign source and target has its own {flags[dest]}, so {flags[dest]} "
                f"{value}, given without a member name, applies to none"
            )
    return {m: foreign_options({**bare, **own[m]}) for m in foreign}


def is_foreign(model: str | Path) -> bool:
    """Whether --model names a foreign model rather than a robustlab checkpoint."""
    from ..models.foreign import foreign_kind

    return foreign_kind(model) is not None


def load_model(
    path: str,
    arch: str | None = None,
    splits: Any = None,
    *,
    trust_unhashed: bool = False,
    options: Any = None,
    saves: str | None = None,
) -> Any:
    """Load a checkpoint or a foreign model; ``arch`` builds a legacy .pt/.pth for the data's
    shape and classes (``splits``), which also fill in a foreign model's where it has none;
    ``trust_unhashed`` (--trust-unhashed) accepts a manifest without a weights hash;
    ``options`` are the foreign model's (``model_options``); ``saves`` names the command when
    it will save a checkpoint of the model, which a python:/TorchScript model cannot give."""
    from ..models.checkpoint import load_checkpoint
    from ..models.foreign import DataShape, check_rebuilt

    if is_foreign(path):
        shape = (
            None
            if splits is None
            else DataShape(splits.in_channels, splits.image_size, splits.num_classes)
        )
        if arch is not None:
            raise RobustlabError(
                f"--arch names the architecture of a legacy .pt/.pth file; {path} names its own"
            )
        ckpt = load_checkpoint(path, foreign=options, data=shape)
        if saves is not None:
            check_rebuilt(ckpt.manifest, saves)
        return ckpt
    if arch is None:
        return load_checkpoint(path, trust_unhashed=trust_unhashed, foreign=options)
    legacy = {
        "in_channels": splits.in_channels,
        "image_size": splits.image_size,
        "num_classes": splits.num_classes,
    }
    ckpt = load_checkpoint(
        path, trust_unhashed=trust_unhashed, foreign=options, arch=arch, **legacy
    )
    if ckpt.manifest["model"]["arch"] != arch:
        raise RobustlabError(
            f"{path} is a {ckpt.manifest['model']['arch']} checkpoint with a manifest; --arch "
            "only names the architecture of a legacy .pt/.pth weights file"
        )
    return ckpt


def model_info(manifest: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """What a record says of the model it used: where, its weights' hash, its architecture,
    ``trusted_unhashed`` when its manifest had no hash and --trust-unhashed let it load, and
    for a foreign model its ``source`` (kind, name, weights file and SHA-256, code SHA-256)."""
    weights = manifest.get("weights") or {}
    info: dict[str, Any] = {
        "path": str(path),
        "sha256": weights.get("sha256"),
        "arch": (manifest.get("model") or {}).get("arch"),
    }
    if weights.get("trusted_unhashed"):
        info["trusted_unhashed"] = True
    if isinstance(manifest.get("source"), dict):  # a foreign model: what was loaded, and from where
        info["source"] = dict(manifest["source"])
    hpm = (manifest.get("model") or {}).get("hpm")
    if isinstance(hpm, dict):  # the head's settings, mode included: HPM's numbers depend on them
        info["hpm"] = hpm.get("config")
    quantization = manifest.get("quantization")
    if isinstance(quantization, dict):  # int8: attacks follow the float model's gradient
        info["attacked_through"] = quantization.get("robustness")
    return info


def check_fit(manifest: dict[str, Any], splits: Any) -> None:
    """The model must take the data's input shape and predict at least its classes."""
    m = manifest["model"]
    want = (int(m["in_channels"]), int(m["image_size"]))
    have = (splits.in_channels, splits.image_size)
    if want != have:
        raise RobustlabError(
            f"the model takes {want[0]}x{want[1]}x{want[1]} inputs but {splits.name} has "
            f"{have[0]}x{have[1]}x{have[1]} images"
        )
    if int(splits.num_classes) > int(m["num_classes"]):
        raise RobustlabError(
            f"{splits.name} has {splits.num_classes} classes but the model predicts {m['num_classes']}"
        )


def attack_names() -> str:
    """The attacks eval and attack offer, as users type them (from the attack registry)."""
    from ..attacks.registry import ALIASES, ATTACKS

    names = sorted(ATTACKS)
    text = f"attack to run: {', '.join(names[:-1])} or {names[-1]}"
    aliases = sorted(f"{a} = {n}" for a, n in ALIASES.items() if n in ATTACKS)
    return text + (f" (also {', '.join(aliases)})" if aliases else "")


def add_attack_options(p: argparse.ArgumentParser) -> None:
    """--model, --data and the attack's options, shared by eval and attack."""
    add_model_options(p)
    p.add_argument("--data", default="mnist5k", help=f"test {DATA_HELP}")
    p.add_argument("--attack", default="pgd", help=ShownLater("attack to run", attack_names))
    p.add_argument("--norm", default="linf", help="norm of the budget: linf, l2 or l1")
    p.add_argument("--steps", type=int, help="iterations (default: the attack's published number)")
    p.add_argument("--restarts", type=int, help="random restarts (default: the attack's)")
    p.add_argument(
        "--alpha", type=float, help="step size of pgd-like attacks (default: the attack's)"
    )
    p.add_argument("--queries", type=int, help="query budget of square (default: the attack's)")
    p.add_argument("--loss", help="loss of pgd and apgd: ce, cw or dlr (default: the attack's)")
    p.add_argument(
        "--version", help="AutoAttack version: standard, plus or rand (default: standard)"
    )
    p.add_argument(
        "--attacks",
        help="AutoAttack sub-attacks to run, e.g. apgd-ce,apgd-t (default: the version's)",
    )
    p.add_argument("--batch-size", type=int, default=250, help="points attacked at once")
    add_trust_unhashed(p)


def attack_options(args: argparse.Namespace) -> dict[str, Any]:
    """The attack options the user set on the command line (unset ones keep the defaults)."""
    opts: dict[str, Any] = {
        "steps": args.steps,
        "restarts": args.restarts,
        "alpha": args.alpha,
        "queries": args.queries,
        "loss": args.loss,
        "version": args.version,
        "seed": args.seed,
    }
    if args.attacks:
        opts["attacks"] = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
        opts["version"] = opts["version"] or "custom"
    return opts


def load_command_model(args: argparse.Namespace, splits: Any, saves: str) -> Any:
    """The ``--model`` of a command that writes a checkpoint of its own (``saves``: its name),
    with the model options every command shares (see ``load_model``)."""
    return load_model(
        args.model,
        args.arch,
        splits,
        trust_unhashed=args.trust_unhashed,
        options=model_options(args),
        saves=saves,
    )


def load_args_model(
    args: argparse.Namespace, data: str, *, test_only: bool = False, read_data: bool = True
) -> tuple[Any, Any]:
    """``--model`` (with ``--arch`` and the foreign-model options) and the data ``data`` names
    that it runs on: a checkpoint is read first (a bad path fails before the data), then the
    data; a legacy file or a foreign model is built for the data's shape where it has none.

    ``test_only`` (commands that only evaluate): a user file without its own test split is all
    test points, unless the checkpoint was trained on that very file, whose held-out 20 % it
    then keeps as in training (``data.load_data``).

    ``read_data=False`` (callers that read the data their own way): a checkpoint is returned
    with ``None`` for the data, which only a model built for the data's shape needs read.
    """
    from ..data import load_data
    from ..data.datasets import same_source

    trust = args.trust_unhashed
    options = model_options(args)
    if args.arch is None and not is_foreign(args.model):
        ckpt = load_model(args.model, trust_unhashed=trust, options=options)
        if not read_data:
            return ckpt, None
        trained_on = str(ckpt.manifest.get("dataset", {}).get("name", ""))
        splits = load_data(data, test_only=test_only and not same_source(data, trained_on))
    else:
        splits = load_data(data, test_only=test_only)
        ckpt = load_model(args.model, args.arch, splits, trust_unhashed=trust, options=options)
    return ckpt, splits


def load_model_and_data(
    args: argparse.Namespace, device: str | None = None, *, test_only: bool = False
) -> tuple[Any, Any, str, dict[str, object]]:
    """Load the checkpoint and ``--data`` (``load_args_model``), check they fit, pick the
    device (``device``: the one already picked, e.g. this torchrun process's GPU)."""
    from ..core.device import resolve_device

    device = device or resolve_device(args.device)
    ckpt, splits = load_args_model(args, args.data, test_only=test_only)
    check_fit(ckpt.manifest, splits)
    return ckpt.model.to(device), splits, device, model_info(ckpt.manifest, ckpt.path)

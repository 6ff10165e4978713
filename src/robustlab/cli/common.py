"""Argument helpers every command shares: common options, list parsing, output checks, messages."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import RobustlabError

DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N"
DATA_HELP = "data: mnist5k, digits, npz:PATH, folder:PATH or torchvision:NAME"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default after its help, unless the help already names it.

    Flags (default off) and options whose default is None (the help then says in words what
    happens when they are left out) get no "(default: ...)" suffix.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        """The help text, with the default appended where it says something."""
        text = action.help or ""
        if "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


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
) -> None:
    """The options (--seed, --device, --json, --no-progress) shared by the commands."""
    if seed:
        p.add_argument("--seed", type=int, default=0, help="random seed")
    if device:
        p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", metavar="PATH", help=json_help)
    if progress:
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")


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


def say(msg: str) -> None:
    """A progress message on stderr (stdout carries the results)."""
    print(msg, file=sys.stderr, flush=True)


def write_json(path: str | None, record: Any) -> None:
    """Write a record as indented JSON, atomically (nothing when no path was given)."""
    if path:
        from ..io import atomic_write_text

        atomic_write_text(Path(path), json.dumps(record, indent=2, sort_keys=True) + "\n")


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


def _existing_ancestor(path: Path) -> Path:
    """The nearest part of ``path`` (itself included) that exists."""
    here = path.absolute()
    while not here.exists() and here != here.parent:
        here = here.parent
    return here


def check_output_file(path: str | None, flag: str) -> None:
    """Refuse, before any work, an output file that names a folder or cannot be created."""
    if not path:
        return
    p = Path(path)
    if p.is_dir():
        raise RobustlabError(f"{flag} {p} is a folder; give a file path")
    _check_creatable(p.parent, p, flag)


def check_output_dir(path: str | None, flag: str) -> None:
    """Refuse, before any work, an output folder that names a file or cannot be created."""
    if not path:
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise RobustlabError(f"{flag} {p} is a file; give a folder")
    _check_creatable(p, p, flag)


def check_store(path: str | None, flag: str = "--store") -> None:
    """Refuse, before any work, a store path that cannot be written or an existing file that
    is not a results store (a store that does not exist yet is created only at the end)."""
    check_output_file(path, flag)
    if path and Path(path).exists():
        from ..store import ResultStore

        ResultStore(path)


def _check_creatable(folder: Path, target: Path, flag: str) -> None:
    """The folder that will hold an output must exist or be creatable, and be writable."""
    base = _existing_ancestor(folder)
    if not base.is_dir():
        raise RobustlabError(f"{flag} {target} cannot be created: {base} is a file")
    if not os.access(base, os.W_OK | os.X_OK):
        raise RobustlabError(f"{flag} {target} cannot be created: {base} is not writable")


def load_model(path: str, arch: str | None = None, splits: Any = None) -> Any:
    """Load a checkpoint; ``arch`` builds a legacy .pt/.pth for the data's shape and classes."""
    from ..models.checkpoint import load_checkpoint

    if arch is None:
        return load_checkpoint(path)
    shape = {
        "in_channels": splits.in_channels,
        "image_size": splits.image_size,
        "num_classes": splits.num_classes,
    }
    ckpt = load_checkpoint(path, arch=arch, **shape)
    if ckpt.manifest["model"]["arch"] != arch:
        raise RobustlabError(
            f"{path} is a {ckpt.manifest['model']['arch']} checkpoint with a manifest; --arch "
            "only names the architecture of a legacy .pt/.pth weights file"
        )
    return ckpt


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


ATTACKS_HELP = (
    "pgd, fgsm, bim, mifgsm, difgsm, tifgsm, cw, apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square "
    "or autoattack"
)


def add_attack_options(p: argparse.ArgumentParser) -> None:
    """--model, --data and the attack's options, shared by eval and attack."""
    p.add_argument("--model", required=True, help="checkpoint folder, manifest or legacy .pt/.pth")
    add_legacy_arch(p)
    p.add_argument("--data", default="mnist5k", help=f"test {DATA_HELP}")
    p.add_argument("--attack", default="pgd", help=ATTACKS_HELP)
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


def load_model_and_data(args: argparse.Namespace) -> tuple[Any, Any, str, dict[str, object]]:
    """Load the checkpoint and the data, check they fit, pick the device."""
    from ..core.device import resolve_device
    from ..data import load_data

    device = resolve_device(args.device)
    if args.arch is None:  # a bad checkpoint path fails before the data is read
        ckpt = load_model(args.model)
        splits = load_data(args.data)
    else:
        splits = load_data(args.data)
        ckpt = load_model(args.model, args.arch, splits)
    check_fit(ckpt.manifest, splits)
    info = {
        "path": str(ckpt.path),
        "sha256": ckpt.manifest["weights"]["sha256"],
        "arch": ckpt.manifest["model"]["arch"],
    }
    return ckpt.model.to(device), splits, device, info

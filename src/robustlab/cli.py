"""The ``robustlab`` command line: each command a few lines over the library."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import RobustlabError


def _write_json(path: str | None, record: Any) -> None:
    if path:
        from .io import atomic_write_text

        atomic_write_text(Path(path), json.dumps(record, indent=2, sort_keys=True) + "\n")


def _common(p: argparse.ArgumentParser, json_out: bool = True) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    if json_out:
        p.add_argument("--json", metavar="PATH", help="write the result record as JSON here")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def cmd_models(args: argparse.Namespace) -> int:
    """List the registered architectures with their parameter counts."""
    from .models import ARCHITECTURES, build_model, count_parameters

    rows: list[dict[str, Any]] = []
    for name in sorted(ARCHITECTURES):
        m = build_model(name, args.in_channels, args.num_classes, args.image_size)
        rows.append(
            {
                "arch": name,
                "parameters": count_parameters(m),
                "description": ARCHITECTURES[name].description,
            }
        )
    width = max(len(r["arch"]) for r in rows)
    print(
        f"{'architecture':<{width}}  {'parameters':>10}  description"
        f"   (for {args.in_channels}x{args.image_size}x{args.image_size}, {args.num_classes} classes)"
    )
    for r in rows:
        print(f"{r['arch']:<{width}}  {r['parameters']:>10,}  {r['description']}")
    _write_json(args.json, rows)
    return 0


def _parse_options(items: list[str]) -> dict[str, Any]:
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


def cmd_train(args: argparse.Namespace) -> int:
    """Train a model with a method and write its checkpoint."""
    from .models.checkpoint import MANIFEST
    from .train import TrainConfig, train
    from .train.loop import RESUME

    out = Path(args.out)
    if (out / MANIFEST).exists() and not (out / RESUME).exists() and not args.overwrite:
        raise RobustlabError(
            f"{out} already holds a trained checkpoint; pass --overwrite or choose another --out"
        )
    cfg = TrainConfig(
        arch=args.arch,
        data=args.data,
        method=args.method,
        eps=args.eps,
        norm=args.norm,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        steps=args.steps,
        beta=args.beta,
        eps_warmup=args.eps_warmup,
        seed=args.seed,
        arch_options=_parse_options(args.arch_option),
    )
    splits = None
    if args.calibration:
        from .data import load_data

        # the same seeded split `robustlab exits` holds out, so its thresholds are chosen on
        # samples the backbone never trained on
        splits = load_data(args.data, calibration=args.calibration, seed=args.data_seed)
    result = train(cfg, out, splits=splits, device=args.device, progress=not args.no_progress)
    acc = result.manifest["metrics"]["clean_accuracy"]
    print(
        f"trained {cfg.arch} ({cfg.method}) in {result.manifest['train_time_s']:.0f} s: "
        f"clean test accuracy {100 * acc:.2f} %; checkpoint in {out}"
    )
    _write_json(args.json, result.manifest)
    return 0


def _eps_list(text: str) -> list[float]:
    """'0.1,0.2' -> [0.1, 0.2], with a clear error for anything else."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RobustlabError(
            f"--eps must be a number or a comma-separated list, got '{text}'"
        ) from None
    if not values:
        raise RobustlabError("--eps needs at least one value")
    return values


def _attack_options(args: argparse.Namespace) -> dict[str, Any]:
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
        opts.setdefault("version", None)
        opts["version"] = opts["version"] or "custom"
    return opts


def _setup(args: argparse.Namespace) -> tuple[Any, Any, str, dict[str, object]]:
    """Load the checkpoint and the data, check they fit, pick the device."""
    from .core.device import resolve_device
    from .data import load_data
    from .models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.model)
    device = resolve_device(args.device)
    splits = load_data(args.data)
    _check_fit(ckpt.manifest, splits)
    info = {
        "path": str(ckpt.path),
        "sha256": ckpt.manifest["weights"]["sha256"],
        "arch": ckpt.manifest["model"]["arch"],
    }
    return ckpt.model.to(device), splits, device, info


def _write_samples(path: Path, records: list[Any]) -> None:
    import csv
    import io

    from .io import atomic_write_text

    buf = io.StringIO()
    cols = [
        "eps",
        "index",
        "label",
        "clean_pred",
        "final_pred",
        "robust",
        "broken_by",
        "perturbation_norm",
    ]
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    for rec in records:
        for row in rec.samples:
            writer.writerow({"eps": rec.threat_model["eps"], **row})
    atomic_write_text(path, buf.getvalue())


def cmd_eval(args: argparse.Namespace) -> int:
    """Clean and robust accuracy of a checkpoint under an attack, at one or several eps."""
    from .attacks.registry import make_attack
    from .evaluate import evaluate_curve

    options = _attack_options(args)
    attacks = [make_attack(args.attack, args.norm, eps, **options) for eps in _eps_list(args.eps)]
    model, splits, device, info = _setup(args)
    resume = None
    if args.json and not args.no_resume:
        resume = Path(args.json + ".progress.jsonl")
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
        resume=resume,
    )
    for rec in records:
        eps = rec.threat_model["eps"]
        print(
            f"{rec.n} points, {args.norm} eps={eps}: clean {100 * rec.clean_accuracy:.2f} %, "
            f"robust {100 * rec.robust_accuracy:.2f} % ({rec.elapsed_s:.1f} s)"
        )
        for step in rec.per_attack:
            print(
                f"    after {step['attack']}: {100 * float(step['robust_accuracy_after']):.2f} % "  # type: ignore[arg-type]
                f"({step['seconds']} s)"
            )
        for warning in rec.warnings:
            print(f"    warning: {warning}")
    dicts = [r.to_dict() for r in records]
    if args.json:
        samples = (
            Path(args.samples) if args.samples else Path(args.json).with_suffix(".samples.csv")
        )
        for d in dicts:
            d["samples_file"] = str(samples)
        _write_samples(samples, records)
    elif args.samples:
        _write_samples(Path(args.samples), records)
    _write_json(args.json, dicts[0] if len(dicts) == 1 else {"records": dicts})
    if args.store:
        from .store import ResultStore

        store = ResultStore(args.store)
        for d in dicts:
            store.add(d, label=args.label or Path(args.model).name)
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    """Run an attack on test points and save the adversarial examples as .npz."""
    import numpy as np
    import torch

    from .attacks.registry import make_attack
    from .io import atomic_write

    eps = _eps_list(args.eps)
    if len(eps) != 1:
        raise RobustlabError("robustlab attack takes one eps; use robustlab eval for a curve")
    attack = make_attack(args.attack, args.norm, eps[0], **_attack_options(args))
    model, splits, device, info = _setup(args)
    test = splits.test
    n = len(test) if args.n is None else args.n
    if not 1 <= n <= len(test):
        raise RobustlabError(f"n must be between 1 and {len(test)}, got {n}")
    xs, clean, adv = [], [], []
    for start in range(0, n, args.batch_size):
        x = test.x[start : min(n, start + args.batch_size)].to(device)
        y = test.y[start : min(n, start + args.batch_size)].to(device)
        x_adv = attack(model, x, y)
        with torch.no_grad():
            clean.append(model(x).argmax(1).cpu())
            adv.append(model(x_adv).argmax(1).cpu())
        xs.append(x_adv.cpu())
    x_all, y_all = torch.cat(xs), test.y[:n]
    c, a = torch.cat(clean), torch.cat(adv)
    arrays = {
        "x_adv": x_all.numpy().astype(np.float32),
        "y": y_all.numpy(),
        "index": np.arange(n),
        "clean_pred": c.numpy(),
        "adv_pred": a.numpy(),
    }

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: numpy would append .npz to a path
            np.savez_compressed(f, **arrays)

    atomic_write(Path(args.save), write)
    robust = float(((c == y_all) & (a == y_all)).float().mean())
    print(
        f"saved {n} adversarial examples to {args.save}: clean {100 * float((c == y_all).float().mean()):.2f} %, "
        f"robust {100 * robust:.2f} %"
    )
    _write_json(
        args.json,
        {
            "kind": "attack",
            "attack": attack.config(),
            "model": info,
            "n": n,
            "robust_accuracy": robust,
            "saved": str(args.save),
        },
    )
    return 0


def _check_fit(manifest: dict[str, Any], splits: Any) -> None:
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


def cmd_demo(args: argparse.Namespace) -> int:
    """Train (or reuse) a standard and a PGD-AT model, evaluate both, write an HTML report."""
    from .demo import run_demo

    report = run_demo(
        out=Path(args.out),
        cache=Path(args.cache) if args.cache else None,
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(f"report: {report.resolve()}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Render the HTML report of a results store."""
    from .report import render_report
    from .store import ResultStore

    if not Path(args.store).exists():
        raise RobustlabError(f"results store {args.store} does not exist")
    out = render_report(ResultStore(args.store), args.out, title=args.title)
    print(f"report: {out.resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="robustlab",
        description="Attack, defend and audit the adversarial robustness of image classifiers.",
    )
    parser.add_argument("--version", action="version", version=f"robustlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the registered architectures")
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--json", metavar="PATH", help="write the list as JSON here")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "train", help="train a model (standard, pgd-at, trades) and write a checkpoint"
    )
    p.add_argument("--arch", default="resnet8", help="architecture (see `robustlab models`)")
    p.add_argument(
        "--data", default="mnist5k", help="mnist5k, digits, npz:PATH, folder:PATH, torchvision:NAME"
    )
    p.add_argument("--method", default="standard", help="standard, pgd-at or trades")
    p.add_argument("--eps", type=float, help="perturbation budget of adversarial training")
    p.add_argument("--norm", default="linf", help="linf or l2")
    p.add_argument("--epochs", type=int, help="epochs (default: the method's recipe)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--steps", type=int, help="inner attack steps of adversarial training")
    p.add_argument("--beta", type=float, default=6.0, help="TRADES beta")
    p.add_argument("--eps-warmup", type=float, help="fraction of training over which eps ramps up")
    p.add_argument(
        "--arch-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="architecture option, e.g. width=32 (repeatable)",
    )
    p.add_argument(
        "--out", required=True, help="checkpoint folder (an interrupted run there resumes)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a finished checkpoint in --out"
    )
    p.add_argument(
        "--calibration",
        type=int,
        default=0,
        help="hold this many training samples out (the calibration split that robustlab exits "
        "chooses thresholds on; default 0: train on all)",
    )
    p.add_argument("--data-seed", type=int, default=0, help="seed of the calibration split")
    _common(p)
    p.set_defaults(func=cmd_train)

    for command, helptext in (
        ("eval", "clean and robust accuracy of a checkpoint under an attack (one eps or a curve)"),
        ("attack", "run an attack on test points and save the adversarial examples"),
    ):
        p = sub.add_parser(command, help=helptext)
        p.add_argument("--model", required=True, help="checkpoint folder or manifest")
        p.add_argument("--data", default="mnist5k")
        p.add_argument(
            "--attack",
            default="pgd",
            help="pgd, fgsm, bim, mifgsm, difgsm, tifgsm, cw, apgd-ce, apgd-dlr, apgd-t, fab, "
            "fab-t, square, autoattack",
        )
        p.add_argument("--norm", default="linf", help="linf, l2 or l1")
        p.add_argument("--eps", required=True, help="budget; eval takes a comma-separated list")
        p.add_argument("--steps", type=int, help="iterations (default: the attack's published one)")
        p.add_argument("--restarts", type=int, help="random restarts (default: the attack's)")
        p.add_argument("--alpha", type=float, help="step size of pgd-like attacks")
        p.add_argument("--queries", type=int, help="query budget of square")
        p.add_argument("--loss", help="loss of pgd/apgd: ce, cw or dlr")
        p.add_argument("--version", help="AutoAttack version: standard, plus, rand")
        p.add_argument("--attacks", help="AutoAttack sub-attacks to run, e.g. apgd-ce,apgd-t")
        p.add_argument(
            "--n",
            type=int,
            default=1000 if command == "eval" else None,
            help="number of test points (eval default 1000; attack default all)",
        )
        p.add_argument("--batch-size", type=int, default=250)
        if command == "eval":
            p.add_argument("--samples", help="per-sample CSV (default: beside --json)")
            p.add_argument(
                "--no-resume", action="store_true", help="do not checkpoint per batch beside --json"
            )
            p.add_argument("--store", help="also append the records to this SQLite results store")
            p.add_argument("--label", help="name of the model in the store and reports")
            p.set_defaults(func=cmd_eval)
        else:
            p.add_argument("--save", required=True, help="where to write the .npz")
            p.set_defaults(func=cmd_attack)
        _common(p)

    p = sub.add_parser("demo", help="the main job on the built-in data, end to end, offline")
    p.add_argument("--out", default="robustlab-demo", help="folder for the report and results")
    p.add_argument(
        "--cache", help="folder of trained models to reuse (default: ROBUSTLAB_CACHE/demo)"
    )
    _common(p, json_out=False)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("report", help="render the HTML report of a results store")
    p.add_argument("--store", required=True, help="SQLite results store")
    p.add_argument("--out", default="report.html")
    p.add_argument("--title", default="robustlab report")
    p.set_defaults(func=cmd_report)

    # Commands registered from robustlab.commands: one line each, in CLI order.
    from .commands import transfer

    transfer.register(sub)
    from .commands import exits, sloth

    exits.register(sub)
    sloth.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run a command; user errors print one sentence and exit non-zero."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            return int(args.func(args))
    except RobustlabError as exc:
        print(f"robustlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "robustlab: interrupted (finished epochs/batches are kept; run again to resume)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())

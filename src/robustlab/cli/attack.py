"""robustlab attack: run an attack on test points and save the adversarial examples as .npz."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import RobustlabError
from ..io import Output, atomic_write, npz_with_keys, write_json
from .common import (
    add_attack_options,
    add_command,
    add_common,
    add_engine,
    attack_options,
    checked_outputs,
    floats,
    json_output,
    load_model_and_data,
    say_engine,
)

DESCRIPTION = "run an attack on test points and save the adversarial examples as .npz"
ARRAYS = ("x_adv", "y", "index", "clean_pred", "adv_pred")  # what the saved .npz holds


def register(sub: Any) -> None:
    """Add the attack command."""
    p = add_command(sub, "attack", DESCRIPTION)
    add_attack_options(p)
    p.add_argument("--eps", required=True, help="perturbation budget (one number)")
    p.add_argument("--n", type=int, help="number of test points (default: all)")
    p.add_argument("--save", required=True, metavar="PATH", help="where to write the .npz")
    add_engine(p)
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the options and outputs, attack batch by batch, save the examples."""
    import numpy as np
    import torch

    from ..attacks.registry import make_attack
    from ..core.checks import check_batch_size
    from ..models.engine import check_engine, infer, inference_engine

    eps = floats(args.eps, "--eps")
    if len(eps) != 1:
        raise RobustlabError("robustlab attack takes one eps; use robustlab eval for a curve")
    attack = make_attack(args.attack, args.norm, eps[0], **attack_options(args))
    check_batch_size(args.batch_size)
    check_engine(args.engine)
    save = Output(Path(args.save), "--save", ours=npz_with_keys(ARRAYS))
    checked_outputs(args, [save, json_output(args.json)], models=[args.model], data=[args.data])
    model, splits, device, info = load_model_and_data(args, test_only=True)
    test = splits.test
    n = len(test) if args.n is None else args.n
    if not 1 <= n <= len(test):
        raise RobustlabError(f"n must be between 1 and {len(test)}, got {n}")
    xs, clean, adv = [], [], []
    probe = test.x[: min(n, args.batch_size)].to(device)
    with inference_engine(model, probe, args.engine) as engine:
        for start in range(0, n, args.batch_size):
            x = test.x[start : min(n, start + args.batch_size)].to(device)
            y = test.y[start : min(n, start + args.batch_size)].to(device)
            x_adv = attack(model, x, y)
            with torch.no_grad():
                clean.append(infer(model, x).argmax(1).cpu())
                adv.append(infer(model, x_adv).argmax(1).cpu())
            xs.append(x_adv.cpu())
    say_engine(engine.as_dict())
    x_all, y_all = torch.cat(xs), test.y[:n]
    c, a = torch.cat(clean), torch.cat(adv)
    values = (x_all.numpy().astype(np.float32), y_all.numpy(), np.arange(n), c.numpy(), a.numpy())
    arrays = dict(zip(ARRAYS, values, strict=True))

    def write(tmp: Path) -> None:
        """Write the arrays into the temporary file."""
        with open(tmp, "wb") as f:  # a file object: numpy would append .npz to a path
            np.savez_compressed(f, **arrays)

    atomic_write(Path(args.save), write)
    robust = float(((c == y_all) & (a == y_all)).float().mean())
    print(
        f"saved {n} adversarial examples to {args.save}: clean {100 * float((c == y_all).float().mean()):.2f} %, "
        f"robust {100 * robust:.2f} %"
    )
    if args.json:
        record = {
            "kind": "attack",
            "attack": attack.config(),
            "model": info,
            "n": n,
            "robust_accuracy": robust,
            "saved": str(args.save),
            "engine": engine.as_dict(),
        }
        write_json(args.json, record)
    return 0

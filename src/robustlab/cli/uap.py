"""robustlab uap: a universal adversarial perturbation, crafted on training points and
measured on held-out test points; saved as an image and a numpy array.

The --out folder receives ``uap.npy`` (the perturbation as float32, (C, H, W) or per class
(K, C, H, W); plain numpy, no pickle), ``uap.png`` (the perturbation scaled for display:
grey 0, white/black +/- its largest entry) and ``uap.json`` (the record, also written where
--json says). A ``uap.npy`` is recognised as robustlab's by the ``uap.json`` record beside it.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import RobustlabError
from ..io import Output, atomic_write, is_robustlab_json, read_regular_bytes, write_json
from .common import (
    DATA_HELP,
    add_command,
    add_common,
    add_model_options,
    add_store,
    add_trust_unhashed,
    checked_outputs,
    finished_record,
    json_output,
    load_model_and_data,
    plot_outputs,
    say,
    store_output,
)

DESCRIPTION = (
    "universal adversarial perturbation (DeepFool or SGD algorithm), saved as image + array"
)
ARRAY, IMAGE, RECORD = "uap.npy", "uap.png", "uap.json"


def register(sub: Any) -> None:
    """Add the uap command."""
    p = add_command(sub, "uap", DESCRIPTION)
    add_model_options(p)
    p.add_argument("--data", default="mnist5k", help=f"{DATA_HELP}; crafted on its training split")
    p.add_argument(
        "--method",
        default="deepfool",
        help="deepfool (Moosavi-Dezfooli et al. 2017) or sgd (Shafahi et al. 2020)",
    )
    p.add_argument("--norm", default="linf", help="norm of the budget: linf or l2")
    p.add_argument("--eps", type=float, required=True, help="the budget xi: ||v|| <= eps")
    p.add_argument(
        "--per-class", action="store_true", help="one perturbation per class (class-universal)"
    )
    p.add_argument(
        "--n-craft", type=int, help="training points to craft on (default: 500, or all if fewer)"
    )
    p.add_argument("--n-eval", type=int, help="held-out test points to measure on (default: all)")
    p.add_argument(
        "--delta",
        type=float,
        default=0.2,
        help="deepfool: stop once the crafting fooling rate reaches 1 - delta",
    )
    p.add_argument("--max-passes", type=int, default=10, help="passes over the crafting points")
    p.add_argument("--df-steps", type=int, default=10, help="deepfool: DeepFool's iterations")
    p.add_argument(
        "--clip", type=float, default=12.0, help="sgd: the cross-entropy is clipped at this value"
    )
    p.add_argument("--step", type=float, help="sgd: step size (default: 0.8 * eps)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="sgd: minibatch; deepfool: points checked at once (the result does not change)",
    )
    p.add_argument(
        "--keep",
        default="last",
        help="which v to return: after the last pass (last, as the references do) or after "
        "the pass that fooled the most crafting points (best)",
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help=f"folder for {ARRAY}, {IMAGE}, {RECORD}"
    )
    add_store(p, "uap")
    add_common(p, progress=False)
    add_trust_unhashed(p)
    p.set_defaults(func=run)


def is_uap_array(path: Path) -> bool:
    """Whether a .npy file is one robustlab uap wrote: the uap record beside it names it."""
    record = path.parent / RECORD
    if not is_robustlab_json(record):
        return False
    try:
        obj = json.loads(read_regular_bytes(record, "file"))
    except (RobustlabError, ValueError):
        return False
    return (
        isinstance(obj, dict)
        and obj.get("kind") == "uap"
        and ((obj.get("files") or {}).get("array") == path.name)
    )


def run(args: argparse.Namespace) -> int:
    """Check options and outputs, craft, measure, write the array, record and image."""
    import numpy as np

    from ..attacks.universal import UAPConfig, pick_points, universal_perturbation
    from ..report.uap_section import uap_image

    config = UAPConfig(
        method=args.method,
        norm=args.norm,
        xi=args.eps,
        delta=args.delta,
        max_passes=args.max_passes,
        df_steps=args.df_steps,
        clip=args.clip,
        step=args.step,
        batch_size=args.batch_size,
        keep=args.keep,
        seed=args.seed,
    )
    out = Path(args.out)
    checked_outputs(
        args,
        [
            *plot_outputs(out, [IMAGE], "--out"),
            Output(out / ARRAY, "--out", ours=is_uap_array),
            Output(out / RECORD, "--out", ours=is_robustlab_json),
            json_output(args.json),
            store_output(args.store),
        ],
        models=[args.model],
        data=[args.data],
    )
    model, splits, device, info = load_model_and_data(args)
    train, test = splits.train, splits.test
    n_craft = min(500, len(train)) if args.n_craft is None else args.n_craft
    pick_points(len(train), len(test), n_craft, args.n_eval, args.seed)  # refused before work
    say(
        f"crafting a {args.method} {'per-class ' if args.per_class else ''}UAP "
        f"({args.norm} eps={args.eps}) on {splits.name}"
    )
    result = universal_perturbation(
        model,
        (train.x.to(device), train.y.to(device)),
        (test.x.to(device), test.y.to(device)),
        config,
        n_craft=n_craft,
        n_eval=args.n_eval,
        per_class=args.per_class,
        num_classes=splits.num_classes,
    )
    record = {
        "kind": "uap",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": info,
        "data": splits.name,
        "splits": {"craft": "train", "eval": "test"},
        **result.to_dict(),
        "files": {"array": ARRAY, "image": IMAGE, "folder": str(out)},
    }
    record = finished_record(args, record)
    v = result.v.detach().cpu().numpy().astype(np.float32)

    def write_array(tmp: Path) -> None:
        """Write the array into the temporary file (a file object: numpy adds no suffix)."""
        with open(tmp, "wb") as f:
            np.save(f, v, allow_pickle=False)

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / ARRAY, write_array)
    write_json(out / RECORD, record)
    if args.json:
        write_json(args.json, record)
    if args.store:
        from ..store import ResultStore

        ResultStore(args.store).add(record, label=args.label or "uap")
    uap_image(v, out / IMAGE, title=f"{args.method} UAP, {args.norm} eps={args.eps}")
    s = result.scores
    print(
        f"{args.method} UAP ({args.norm} eps={args.eps}, norm {max(result.norms()):.4g}): "
        f"fooling rate {100 * s.fooling_rate:.1f} % on {s.n} held-out test points "
        f"(random noise of the same norm: {100 * result.random.fooling_rate:.1f} %); accuracy "
        f"{100 * s.clean_accuracy:.1f} % clean, {100 * s.perturbed_accuracy:.1f} % perturbed; "
        f"crafted on {record['n_craft']} training points in {record['passes']} passes, "
        f"{result.seconds:.1f} s"
    )
    print(f"saved {out / ARRAY}, {out / IMAGE}, {out / RECORD}")
    return 0

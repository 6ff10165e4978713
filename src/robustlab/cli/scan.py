"""robustlab scan: look for backdoor poison in a training split with a model trained on it
(activation clustering and spectral signatures, ``robustlab.monitor.scan``).

The record lists ``flagged`` (indices into the scanned training split: the union of the
methods' flags), the suspected target class(es) and, per method, its flags and per-class
scores. When the data is a ``poisoned.npz`` that ``robustlab poison`` wrote (its manifest
``poison.json`` beside it, naming this very file), or --manifest names one, the record also
has the precision and recall of the flags against the poisoned indices.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import RobustlabError
from ..io import write_json
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
    names,
    say,
    store_output,
)

DESCRIPTION = "scan a training split for backdoor poison with a model trained on it"
METHOD_NAMES = {"ac": "activation_clustering", "spectral": "spectral_signatures"}


def register(sub: Any) -> None:
    """Add the scan command."""
    p = add_command(sub, "scan", DESCRIPTION)
    add_model_options(
        p,
        "the model trained on the data: a robustlab checkpoint or any model the other "
        "commands take (see README, 'Your own model')",
    )
    p.add_argument("--data", default="mnist5k", help=f"{DATA_HELP}; its training split is scanned")
    p.add_argument(
        "--manifest",
        metavar="PATH",
        help="poison manifest to score the flags against (default: the poison.json beside an "
        "npz:.../poisoned.npz that robustlab poison wrote, if any)",
    )
    p.add_argument(
        "--methods", default="ac,spectral", help="ac (activation clustering) and/or spectral"
    )
    p.add_argument(
        "--expected-rate",
        type=float,
        default=0.05,
        help="spectral: the expected poisoning rate, a share of the training split; a suspect "
        "class loses its ceil(1.5 * rate * n) highest scores",
    )
    p.add_argument(
        "--max-share",
        type=float,
        default=0.35,
        help="ac: a cluster is flagged only if it holds less than this share of its class",
    )
    p.add_argument("--dims", type=int, default=10, help="ac: dimensions kept by PCA")
    p.add_argument(
        "--neighbours",
        type=int,
        default=10,
        help="nearest training samples (pixel distance) whose labels give a sample's label "
        "agreement",
    )
    p.add_argument("--batch-size", type=int, default=500, help="samples per forward pass")
    add_store(p, "scan")
    add_common(p, progress=False)
    add_trust_unhashed(p)
    p.set_defaults(func=run)


def _manifest(args: argparse.Namespace, n: int) -> tuple[dict[str, Any] | None, str | None]:
    """The poison manifest to score against and where it is (None, None: there is none)."""
    from ..data.datasets import source_path
    from ..monitor.poison import manifest_for, read_manifest, sha256_of

    data_file = source_path(args.data)
    manifest: dict[str, Any] | None
    where: str | None
    if args.manifest:
        manifest = read_manifest(args.manifest)
        where = str(args.manifest)
        digest = manifest.get("poisoned_sha256")
        if data_file is None or not data_file.is_file() or digest != sha256_of(data_file):
            named = (manifest.get("files") or {}).get("poisoned", "poisoned.npz")
            raise RobustlabError(
                f"the poison manifest {where} describes the {named} it was written with, not "
                f"{args.data}: scan that file (--data npz:PATH/{named})"
            )
    elif data_file is not None and data_file.is_file():
        manifest = manifest_for(data_file)
        where = str(data_file.parent / "poison.json") if manifest else None
    else:
        return None, None
    if manifest is None:
        return None, None
    if int(manifest.get("train_size", -1)) != n or any(
        not 0 <= i < n for i in manifest["poisoned_indices"]
    ):
        raise RobustlabError(
            f"the poison manifest {where} describes a training split of "
            f"{manifest.get('train_size')} samples, but {args.data} has {n}"
        )
    return manifest, where


def run(args: argparse.Namespace) -> int:
    """Check options and outputs, load, scan, write the record."""
    from ..monitor.scan import ScanConfig, scan

    wanted = names(args.methods, "--methods")
    unknown = [m for m in wanted if m not in METHOD_NAMES]
    if unknown:
        raise RobustlabError(f"unknown scan method {', '.join(unknown)}; use ac and/or spectral")
    config = ScanConfig(
        dims=args.dims,
        max_share=args.max_share,
        neighbours=args.neighbours,
        expected_rate=args.expected_rate,
        methods=tuple(METHOD_NAMES[m] for m in wanted),
        batch_size=args.batch_size,
        seed=args.seed,
    )
    config.check()
    checked_outputs(
        args,
        [json_output(args.json), store_output(args.store)],
        models=[args.model],
        data=[args.data],
        inputs=[args.manifest],
    )
    model, splits, device, info = load_model_and_data(args)
    train = splits.train
    if len(train) == 0:
        raise RobustlabError(f"{args.data} has no training split to scan")
    manifest, where = _manifest(args, len(train))
    say(f"scanning the {len(train)} training samples of {splits.name}")
    result = scan(model, train, config, device=device)
    truth = None if manifest is None else [int(i) for i in manifest["poisoned_indices"]]
    record: dict[str, Any] = {
        "kind": "scan",
        "model": info,
        "data": splits.name,
        "split": "train",
        "settings": {
            "methods": list(config.methods),
            "dims": config.dims,
            "max_share": config.max_share,
            "neighbours": config.neighbours,
            "min_agreement": config.min_agreement,
            "expected_rate": config.expected_rate,
            "removal_factor": config.removal_factor,
            "z_suspect": config.z_suspect,
            "seed": config.seed,
        },
        **result.to_dict(truth),
    }
    if manifest is not None:
        record["poison"] = {"manifest": where, **dict(manifest.get("poison") or {})}
    record = finished_record(args, record)
    if args.json:
        write_json(args.json, record)
    if args.store:
        from ..store import ResultStore

        ResultStore(args.store).add(record, label=args.label or "scan")
    for name, found in record["methods"].items():
        classes = ", ".join(str(c) for c in found["suspected_classes"]) or "none"
        line = f"{name}: {found['flagged_count']} flagged, suspected target class(es): {classes}"
        if truth is not None:
            d = record["detection"][name]
            line += f"; {_pr(d)}"
        print(line)
    tail = f" ({_pr(record['detection']['union'])})" if truth is not None else ""
    print(f"flagged {record['flagged_count']} of {len(train)} training samples{tail}")
    if truth is None:
        print("no poison manifest: precision and recall not measured")
    return 0


def _pr(d: dict[str, Any]) -> str:
    """Precision and recall as the summary prints them."""
    p = "–" if d["precision"] is None else f"{100 * d['precision']:.1f} %"
    r = "–" if d["recall"] is None else f"{100 * d['recall']:.1f} %"
    return f"precision {p}, recall {r}"

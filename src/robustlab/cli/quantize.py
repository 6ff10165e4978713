"""robustlab quantize: post-training int8 quantization of a checkpoint (CPU)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import RobustlabError
from ..io import Output, write_json
from .common import (
    DATA_HELP,
    add_command,
    add_common,
    add_model_options,
    add_trust_unhashed,
    check_fit,
    checked_outputs,
    json_output,
    load_command_model,
    model_info,
)

DESCRIPTION = "quantize a checkpoint to int8 after training (PyTorch static quantization, CPU)"


def register(sub: Any) -> None:
    """Add the quantize command."""
    p = add_command(sub, "quantize", DESCRIPTION)
    add_model_options(p)
    p.add_argument("--data", default="mnist5k", help=f"{DATA_HELP} (calibration, test accuracy)")
    p.add_argument(
        "--backend", default="x86", help="quantized engine: x86, fbgemm, qnnpack, onednn"
    )
    p.add_argument(
        "--calibration-samples",
        type=int,
        default=256,
        help="training samples (drawn with --seed) the activation ranges are calibrated on",
    )
    p.add_argument("--out", required=True, help="folder of the quantized checkpoint")
    add_trust_unhashed(p)
    add_common(
        p, json_help="write the quantized checkpoint's manifest as JSON here (default: none)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the options and outputs, calibrate, quantize, write the checkpoint."""
    from ..data import load_data
    from ..models.checkpoint import checkpoint_outputs
    from ..models.quantized import OBSERVERS, check_backend
    from ..train.quantize import quantize_checkpoint

    check_backend(args.backend)
    if args.calibration_samples < 1:
        raise RobustlabError(f"--calibration-samples must be >= 1, got {args.calibration_samples}")
    out = Path(args.out)
    outputs = checkpoint_outputs(out)
    observers = Output(out / OBSERVERS, "--out", ours=outputs[1].ours)
    checked_outputs(
        args, [*outputs, observers, json_output(args.json)], models=[args.model], data=[args.data]
    )
    splits = load_data(args.data)
    ckpt = load_command_model(args, splits, "quantize")
    check_fit(ckpt.manifest, splits)
    _, manifest = quantize_checkpoint(
        ckpt.model,
        ckpt.manifest,
        splits,
        out,
        backend=args.backend,
        samples=args.calibration_samples,
        seed=args.seed,
        base=model_info(ckpt.manifest, ckpt.path),
    )
    m = manifest["metrics"]
    print(
        f"int8 ({args.backend}): clean accuracy {100 * m['clean_accuracy']:.2f} % "
        f"(float {100 * m['clean_accuracy_float']:.2f} %, same prediction on "
        f"{100 * m['agreement_with_float']:.1f} %); checkpoint in {out}"
    )
    if args.json:
        write_json(args.json, manifest)
    return 0

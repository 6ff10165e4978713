"""Forward-pass cost per engine for each zoo architecture, side by side in one process.

For every architecture (1x28x28 inputs, 10 classes, fresh weights in eval mode) and batch
sizes 1, 85 and 500: the median time of one forward pass in eager PyTorch as robustlab's
evaluation runs it (BatchNorm folded, channels_last for convolutional nets:
``evaluate.fast.fast_copy``) and in ONNX Runtime through ``robustlab.models.engine``, the
two timed in turn (interleaved, so a busy machine slows both alike), their ratio, the
largest logit difference, and whether predictions agree.

    python benchmarks/engine_forward.py --threads 1 --out benchmarks/results_engine_forward.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from robustlab.evaluate.fast import fast_copy
from robustlab.models import ARCHITECTURES, build_model
from robustlab.models.engine import choose_engine, detach_engine, infer

GENERIC = ("resnet", "vgg", "densenet", "preact_resnet")  # families: their sized members run


def _time(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    """Time both engines on every architecture and batch size; print a table, write JSON lines."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", default="1,85,500")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", help="JSON lines file to append the rows to")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    archs = [a for a in ARCHITECTURES if a not in GENERIC or a in ("densenet",)]
    rows = []
    for arch in archs:
        torch.manual_seed(0)
        base = build_model(arch).eval()
        conv = any(isinstance(m, torch.nn.Conv2d) for m in base.modules())
        model = fast_copy(base, channels_last=conv)
        probe = torch.rand(64, 1, 28, 28)
        choice = choose_engine(model, probe, "onnxruntime")
        for b in (int(v) for v in args.batches.split(",")):
            x = torch.rand(b, 1, 28, 28)
            xt = x.contiguous(memory_format=torch.channels_last) if conv else x
            with torch.inference_mode():
                ref, got = model(xt), infer(model, x)
                t_torch, t_ort = [], []
                for _ in range(args.reps):
                    t_torch.append(_time(lambda: model(xt)))  # noqa: B023 (timed at once)
                    t_ort.append(_time(lambda: infer(model, x)))  # noqa: B023
            torch_ms = 1e3 * statistics.median(t_torch)
            ort_ms = 1e3 * statistics.median(t_ort)
            row = {
                "arch": arch,
                "batch": b,
                "threads": args.threads,
                "torch_ms": round(torch_ms, 3),
                "onnxruntime_ms": round(ort_ms, 3),
                "ratio": round(ort_ms / torch_ms, 3),
                "max_logit_diff": float((ref - got).abs().max()),
                "same_predictions": bool(torch.equal(ref.argmax(1), got.argmax(1))),
                "export": choice.reason,
            }
            rows.append(row)
            print(
                f"{arch:16s} batch {b:4d}: torch {torch_ms:8.2f} ms  onnxruntime {ort_ms:8.2f} ms"
                f"  ratio {row['ratio']:.2f}  max diff {row['max_logit_diff']:.1e}"
                f"  same {row['same_predictions']}",
                flush=True,
            )
        detach_engine(model)
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

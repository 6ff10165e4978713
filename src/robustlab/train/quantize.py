"""Post-training int8 quantization of a checkpoint: calibration on a seeded sample of the
training split, accuracy of the int8 model beside the float one, and a checkpoint that rebuilds
it (``models.quantized`` says how it is stored and how its robustness is measured)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.guard import evaluating
from ..data import Dataset, DataSplits
from ..errors import RobustlabError
from ..models.checkpoint import MANIFEST, save_quantized_checkpoint
from ..models.quantized import QuantizedModel, quantize
from .loop import accuracy

#: What a quantized checkpoint's record says of attacks on it.
ROBUSTNESS_NOTE = (
    "the int8 forward gives no useful gradient: attacks follow the float model's gradient "
    "(straight-through; the float model is the declared surrogate) and are judged on the int8 "
    "model's predictions"
)
SCHEME = "static post-training int8 (torch.ao FX graph mode, the backend's default qconfig)"


def calibration_indices(n_train: int, samples: int, seed: int) -> list[int]:
    """A seeded sample of ``samples`` training indices (sorted), the calibration batch."""
    if samples < 1:
        raise RobustlabError(f"quantization needs at least one calibration sample, got {samples}")
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n_train, generator=gen)[: min(samples, n_train)]
    return sorted(int(i) for i in chosen)


def agreement(a: nn.Module, b: nn.Module, data: Dataset, batch_size: int = 500) -> float:
    """Fraction of inputs on which two models predict the same class (eval mode, no gradient)."""
    same = 0
    with torch.inference_mode(), evaluating(a), evaluating(b):
        for i in range(0, len(data), batch_size):
            x = data.x[i : i + batch_size]
            same += int((a(x).argmax(1) == b(x).argmax(1)).sum())
    return same / len(data)


def quantize_checkpoint(
    model: nn.Module,
    manifest: Mapping[str, Any],
    splits: DataSplits,
    out: str | Path,
    *,
    backend: str = "x86",
    samples: int = 256,
    seed: int = 0,
    base: Mapping[str, Any] | None = None,
) -> tuple[QuantizedModel, dict[str, Any]]:
    """Quantize a loaded checkpoint's float model to int8, write its checkpoint to ``out``;
    returns the int8 model and the manifest written.

    The manifest keeps the base's ``model``, ``dataset``, ``training`` and ``pruning`` sections
    and adds ``quantization`` (scheme, backend, the calibration indices, the base's hash, how
    robustness is measured) and ``metrics`` (int8 and float clean accuracy, their agreement)."""
    if "quantization" in manifest:
        raise RobustlabError("this checkpoint is already int8; quantize its float base model")
    indices = calibration_indices(len(splits.train), samples, seed)
    float_model = model.cpu().eval()
    int8 = quantize(float_model, splits.train.x[indices], backend)
    section = {
        "scheme": SCHEME,
        "backend": backend,
        "calibration": {
            "data": splits.name,
            "split": "train",
            "samples": len(indices),
            "seed": seed,
            "indices": indices,
        },
        "base": dict(base or {}),
        "torch_version": torch.__version__,
        "robustness": ROBUSTNESS_NOTE,
    }
    new: dict[str, Any] = {
        "model": manifest["model"],
        "dataset": manifest.get("dataset", splits.info()),
        "quantization": section,
        "metrics": {
            "clean_accuracy": accuracy(int8, splits.test),
            "clean_accuracy_float": accuracy(float_model, splits.test),
            "agreement_with_float": agreement(int8, float_model, splits.test),
            "test_samples": len(splits.test),
        },
    }
    for key in ("training", "pruning"):
        if key in manifest:
            new[key] = manifest[key]
    save_quantized_checkpoint(int8, out, new)
    saved: dict[str, Any] = json.loads((Path(out) / MANIFEST).read_text())
    return int8, saved

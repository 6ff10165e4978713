"""A model's identity as a hash: its structure and every weight and buffer, never a path."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn


def tensor_digest(h: Any, tensor: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and bytes into a hash."""
    t = tensor.detach().cpu().contiguous().reshape(-1)
    h.update(f"{t.dtype}{tuple(tensor.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes())


def model_digest(h: Any, model: nn.Module) -> None:
    """Feed a model's structure (its repr) and every named weight and buffer into a hash."""
    h.update(repr(model).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        tensor_digest(h, tensor)


def model_fingerprint(model: nn.Module) -> str:
    """The SHA-256 of a model's structure and state: equal models, equal fingerprints."""
    h = hashlib.sha256()
    model_digest(h, model)
    return h.hexdigest()

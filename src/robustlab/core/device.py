"""Devices: auto picks CUDA when present; other names are checked."""

from __future__ import annotations

import torch

from ..errors import RobustlabError


def resolve_device(device: str = "auto") -> str:
    """'auto' picks CUDA when present, else CPU; other names are checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RobustlabError(f"device '{device}' asked for, but CUDA is not available here")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise RobustlabError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N")
    return device

"""Devices: auto picks CUDA when present; other names are checked against this machine."""

from __future__ import annotations

import re

import torch

from ..errors import RobustlabError

DEVICE_NAMES = "auto, cpu, mps, cuda or cuda:N"


def _mps_available() -> bool:
    """Whether Apple's Metal backend can be used here."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: str = "auto") -> str:
    """'auto' picks CUDA when present, else CPU; other names are checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "mps":
        if not _mps_available():
            raise RobustlabError("device 'mps' asked for, but Apple's MPS is not available here")
        return device
    found = re.fullmatch(r"cuda(?::(\d{1,4}))?", device)
    if found is None:
        raise RobustlabError(f"unknown device '{device}'; use {DEVICE_NAMES}")
    if not torch.cuda.is_available():
        raise RobustlabError(f"device '{device}' asked for, but CUDA is not available here")
    if found.group(1) is not None and int(found.group(1)) >= torch.cuda.device_count():
        raise RobustlabError(
            f"device '{device}' asked for, but this machine has {torch.cuda.device_count()} "
            "CUDA device(s), numbered from 0"
        )
    return device

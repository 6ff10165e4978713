"""Files of weights: their hash, reading them without running code (safetensors, or a torch
file read with ``weights_only=True``), and loading a state dict into a model with a message
that names the keys or shapes that do not fit."""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..errors import RobustlabError
from ..io import check_regular, limits


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a regular file's bytes (a device or FIFO is refused, never read)."""
    check_regular(path, "file")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _unpickling_reason(message: str) -> str:
    """The useful part of torch's weights-only error (which also suggests the unsafe way out)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", message)
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if found is not None:
        reason = found.group(1)
    else:
        hits = [
            line
            for line in text.splitlines()
            if re.search(r"unsupported|GLOBAL", line, re.IGNORECASE) and "weights_only" not in line
        ]
        reason = hits[0] if hits else ""
    reason = reason.strip().split(". Please use")[0].rstrip(".")
    return reason[:160] or "unsafe or unknown content"


def read_torch_file(
    p: Path, what: str = "a PyTorch weights file", map_location: str | torch.device = "cpu"
) -> Any:
    """A ``torch.load(weights_only=True)`` of a regular file, every failure one sentence that
    never repeats torch's advice to load unsafely (weights files and training resume state)."""
    check_regular(p, what.removeprefix("a "), limits().data_bytes)
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise RobustlabError(
            f"refusing to load {p}: it is not {what} of plain tensors and unpickling it could "
            f"run code ({_unpickling_reason(str(exc))})"
        ) from None
    except EOFError:
        raise RobustlabError(f"cannot read {p} as {what}: it is empty or cut short") from None
    except Exception as exc:  # a corrupt file makes torch's unpickler raise nearly anything
        text = _unpickling_reason(str(exc)) if "weights_only" in str(exc) else str(exc).strip()
        first = text.splitlines()[0][:200] if text else "no details"
        raise RobustlabError(
            f"cannot read {p} as {what}, it is corrupt or of another kind "
            f"({type(exc).__name__}: {first})"
        ) from None


def is_torchscript(path: Path) -> bool:
    """Whether a file is a TorchScript archive (a zip with compiled code, not a state dict)."""
    try:
        if not path.is_file() or not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return any(
                "/code/" in entry or entry.endswith("/constants.pkl")
                for entry in archive.namelist()
            )
    except (OSError, zipfile.BadZipFile):
        return False


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: safetensors (by content), else a ``.pt``/``.pth`` state
    dict read with ``weights_only=True`` (a ``{"state_dict": ...}`` wrapper is unwrapped)."""
    check_regular(path, "weights file", limits().data_bytes)
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header ('{')
    if len(head) == 9 and head[8:9] == b"{":
        try:
            return dict(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise RobustlabError(f"cannot read weights {path}: {exc}") from None
    if is_torchscript(path):
        raise RobustlabError(
            f"{path} is a TorchScript file, not a state dict: give it as the model itself "
            "(--model PATH), not as --weights"
        )
    obj = read_torch_file(path)
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise RobustlabError(f"{path} does not hold a state dict (a dict of named tensors)")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise RobustlabError(f"{path} does not hold a state dict of tensors only")
    return dict(obj)


def _names(keys: list[str], limit: int = 4) -> str:
    """A few key names, and how many more there are."""
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def state_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """What keeps ``state`` from loading into ``model``: the missing and unexpected keys and
    the shapes that differ, in a few words; None when it fits exactly."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} is {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the architecture"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    parts = []
    if missing:
        parts.append(f"Missing keys {_names(missing)}")
    if unexpected:
        parts.append(f"Unexpected keys {_names(unexpected)}")
    if shapes:
        parts.append(f"size mismatch: {_names(shapes, 2)}")
    return "; ".join(parts) or None


def load_state(model: nn.Module, state: dict[str, torch.Tensor], where: Path | str) -> None:
    """Load a state dict strictly; if it does not fit, one sentence names the keys that are
    missing or unexpected and the shapes that differ."""
    problem = state_mismatch(model, state)
    if problem is not None:
        raise RobustlabError(f"weights in {where} do not fit the architecture: {problem}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # e.g. a dtype torch cannot copy
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
            lines = lines[1:]  # the first line only names the module class
        detail = lines[0][:200] if lines else "unknown mismatch"
        raise RobustlabError(f"weights in {where} do not fit the architecture: {detail}") from None

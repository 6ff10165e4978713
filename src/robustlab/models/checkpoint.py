"""Safe checkpoints: safetensors weights plus a JSON manifest; loading never runs code from a file."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import RobustlabError
from ..io import atomic_path, atomic_write_text
from .blocks import Normalize
from .multiexit import MultiExitNetwork
from .registry import build_model

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    """A rebuilt model (in eval mode) and the manifest it was saved with."""

    model: nn.Module
    manifest: dict[str, Any]
    path: Path


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_config(
    arch: str,
    in_channels: int,
    num_classes: int,
    image_size: int,
    mean: list[float] | tuple[float, ...],
    std: list[float] | tuple[float, ...],
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest's ``model`` section: everything ``build_model`` needs to rebuild it."""
    return {
        "arch": arch,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "image_size": image_size,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "options": dict(options or {}),
    }


def build_from_config(config: dict[str, Any]) -> nn.Sequential:
    """Rebuild an (untrained) model from a manifest's ``model`` section."""
    try:
        return build_model(
            config["arch"],
            in_channels=int(config["in_channels"]),
            num_classes=int(config["num_classes"]),
            image_size=int(config["image_size"]),
            mean=config["mean"],
            std=config["std"],
            **config.get("options", {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RobustlabError(
            f"checkpoint manifest has an incomplete or invalid model section ({exc})"
        ) from None


def multiexit_from_config(config: dict[str, Any]) -> MultiExitNetwork:
    """Rebuild an (untrained) multi-exit network from a manifest's ``model`` section."""
    spec = config.get("multi_exit")
    if not isinstance(spec, dict) or not isinstance(spec.get("positions"), list):
        raise RobustlabError("checkpoint manifest has an invalid multi_exit section")
    backbone = build_from_config({k: v for k, v in config.items() if k != "multi_exit"})
    try:
        shape = (int(config["in_channels"]), int(config["image_size"]), int(config["image_size"]))
        return MultiExitNetwork(
            backbone,
            shape,
            int(config["num_classes"]),
            spec["positions"],
            rule=str(spec.get("rule", "max_softmax")),
            threshold=float(spec.get("threshold", 1.0)),
            output=str(spec.get("output", "final")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RobustlabError(
            f"checkpoint manifest has an invalid multi_exit section ({exc})"
        ) from None


def save_checkpoint(model: nn.Module, directory: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``manifest.json`` (with the weights' hash) into a folder."""
    if "model" not in manifest:
        raise ValueError("manifest needs a 'model' section (see model_config)")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(state, str(tmp))
        digest = file_sha256(tmp)
    full = {"format": "robustlab-checkpoint", "format_version": FORMAT_VERSION, **manifest}
    full["weights"] = {"file": WEIGHTS, "sha256": digest}
    atomic_write_text(out / MANIFEST, json.dumps(full, indent=2, sort_keys=True) + "\n")
    return out


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RobustlabError(f"cannot read checkpoint manifest {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "robustlab-checkpoint":
        raise RobustlabError(f"{path} is not a robustlab checkpoint manifest")
    return manifest


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
            lines = lines[1:]  # the first line only names the module class
        detail = lines[0][:200] if lines else "unknown mismatch"
        raise RobustlabError(f"weights in {where} do not fit the architecture: {detail}") from None


def load_checkpoint(path: str | Path, **legacy: Any) -> Checkpoint:
    """Rebuild a model from a checkpoint folder, its manifest or weights file, or a legacy .pt.

    A legacy ``.pt``/``.pth`` holds only weights: pass the architecture as keyword arguments
    (``arch=..., in_channels=..., num_classes=..., image_size=..., mean=..., std=...``). It is
    read with ``weights_only=True``; a file that needs arbitrary code to unpickle is refused.
    """
    p = Path(path)
    if not p.exists():
        raise RobustlabError(f"checkpoint {p} does not exist")
    if p.suffix in (".pt", ".pth", ".bin"):
        return _load_legacy(p, legacy)
    if p.is_dir():
        manifest_path, weights_path = p / MANIFEST, p / WEIGHTS
    elif p.name.endswith(".json"):
        manifest_path, weights_path = p, p.parent / WEIGHTS
    elif p.suffix == ".safetensors":
        manifest_path, weights_path = p.parent / MANIFEST, p
    else:
        raise RobustlabError(
            f"{p} is not a checkpoint: give a checkpoint folder, its manifest.json, "
            "its model.safetensors, or a legacy .pt/.pth file"
        )
    if not manifest_path.exists():
        raise RobustlabError(f"checkpoint {p} has no {MANIFEST}")
    if not weights_path.exists():
        raise RobustlabError(f"checkpoint {p} has no {WEIGHTS}")
    manifest = _read_manifest(manifest_path)
    weights_info = manifest.get("weights", {})
    if not isinstance(weights_info, dict):
        raise RobustlabError(f"{manifest_path} has an invalid 'weights' section")
    expected = weights_info.get("sha256")
    if expected and file_sha256(weights_path) != expected:
        raise RobustlabError(
            f"weights {weights_path} do not match the hash in its manifest (corrupted or replaced)"
        )
    config = manifest.get("model", {})
    if isinstance(config, dict) and "multi_exit" in config:  # exits over a zoo backbone
        model: nn.Module = multiexit_from_config(config)
    else:
        model = build_from_config(config)
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RobustlabError(f"cannot read weights {weights_path}: {exc}") from None
    _load_state(model, state, weights_path)
    model.eval()
    return Checkpoint(model, manifest, weights_path.parent)


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


def _load_legacy(p: Path, legacy: dict[str, Any]) -> Checkpoint:
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise RobustlabError(
            f"refusing to load {p}: it is not a plain weights file and unpickling it could run "
            f"code ({_unpickling_reason(str(exc))})"
        ) from None
    except EOFError:
        raise RobustlabError(
            f"cannot read {p} as a PyTorch weights file: it is empty or cut short"
        ) from None
    except Exception as exc:  # a corrupt file makes torch's unpickler raise nearly anything
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "no details"
        raise RobustlabError(
            f"cannot read {p} as a PyTorch weights file, it is corrupt or of another kind "
            f"({type(exc).__name__}: {first})"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise RobustlabError(f"{p} does not hold a state dict of tensors")
    if "arch" not in legacy:
        raise RobustlabError(
            f"{p} is a legacy weights file without a manifest; say which architecture it is "
            "(arch=..., in_channels=..., num_classes=..., image_size=...)"
        )
    try:
        in_channels = int(legacy.pop("in_channels", 1))
        num_classes = int(legacy.pop("num_classes", 10))
        image_size = int(legacy.pop("image_size", 28))
        mean = [float(m) for m in legacy.pop("mean", [0.0] * in_channels)]
        std = [float(s) for s in legacy.pop("std", [1.0] * in_channels)]
    except (TypeError, ValueError) as exc:
        raise RobustlabError(f"invalid architecture arguments for {p}: {exc}") from None
    config = model_config(
        legacy.pop("arch"), in_channels, num_classes, image_size, mean, std, legacy
    )
    model = build_from_config(config)
    state = dict(obj)
    if not any(k.startswith("normalize.") for k in state):
        state = {f"net.{k}": v for k, v in state.items()}
        normalize = model[0]
        state.update({f"normalize.{k}": v for k, v in normalize.state_dict().items()})
    _load_state(model, state, p)
    model.eval()
    # a full state dict brings its own normalisation: report the one the model now uses
    normalize = model[0]
    if isinstance(normalize, Normalize):
        config["mean"] = normalize.mean.flatten().tolist()
        config["std"] = normalize.std.flatten().tolist()
    manifest = {"format": "legacy-pt", "model": config, "weights": {"sha256": file_sha256(p)}}
    return Checkpoint(model, manifest, p)


def load(path: str | Path, **legacy: Any) -> nn.Module:
    """Rebuild a model (in eval mode) from a checkpoint; see ``load_checkpoint``."""
    return load_checkpoint(path, **legacy).model

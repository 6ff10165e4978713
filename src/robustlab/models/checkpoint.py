"""Safe checkpoints: safetensors weights plus a JSON manifest; loading one never runs code
from a file. The same entry point loads the foreign models a user names explicitly
(``models.foreign``), of which a python: factory and a TorchScript file do run code."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import RobustlabError
from ..io import (
    Output,
    atomic_path,
    atomic_write_text,
    check_regular,
    limits,
    read_regular_bytes,
)
from ..version import __version__
from .blocks import Normalize
from .foreign import DataShape, ForeignOptions, foreign_kind, load_foreign
from .hpm import HPMClassifier, HPMConfig
from .multiexit import MultiExitNetwork
from .pretrained import is_zoo
from .pretrained import resolve as resolve_zoo
from .quantized import OBSERVERS, QuantizedModel, rebuild
from .registry import build_model, shapes_only
from .registry import model_config as model_config  # re-exported: callers import it here
from .weightfile import file_sha256 as file_sha256  # re-exported
from .weightfile import load_state
from .weightfile import read_torch_file as read_torch_file  # re-exported

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    """A rebuilt model (in eval mode) and the manifest it was saved with."""

    model: nn.Module
    manifest: dict[str, Any]
    path: Path


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


def hpm_from_config(config: dict[str, Any]) -> HPMClassifier:
    """Rebuild an (untrained) HPM model from a manifest's ``model`` section: its base from the
    rest of the section (a zoo model, or one with exits), the head from the ``hpm`` object."""
    spec = config.get("hpm")
    if not isinstance(spec, dict):
        raise RobustlabError("checkpoint manifest has an invalid hpm section")
    rest = {k: v for k, v in config.items() if k != "hpm"}
    base = multiexit_from_config(rest) if "multi_exit" in rest else build_from_config(rest)
    shape = (int(rest["in_channels"]), int(rest["image_size"]), int(rest["image_size"]))
    model = HPMClassifier(base, HPMConfig.from_dict(spec.get("config")), input_shape=shape)
    if spec.get("feature_dim") != model.feature_dim:
        raise RobustlabError(
            f"checkpoint manifest's hpm section records {spec.get('feature_dim')!r} features "
            f"but its model has {model.feature_dim}"
        )
    return model


def save_checkpoint(model: nn.Module, directory: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``manifest.json`` (with the weights' hash) into a folder;
    the manifest is stamped with when and by which robustlab version it was written."""
    if "model" not in manifest:
        raise ValueError("manifest needs a 'model' section (see model_config)")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(state, str(tmp))
        digest = file_sha256(tmp)
    stamp = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "robustlab_version": __version__,
    }
    full = {"format": "robustlab-checkpoint", "format_version": FORMAT_VERSION, **stamp, **manifest}
    full["weights"] = {"file": WEIGHTS, "sha256": digest}
    atomic_write_text(out / MANIFEST, json.dumps(full, indent=2, sort_keys=True) + "\n")
    return out


def checkpoint_outputs(directory: str | Path, option: str = "--out") -> list[Output]:
    """The outputs of writing a checkpoint into a folder, for ``io.check_outputs``: a file
    there counts as robustlab's when the folder's manifest is a robustlab manifest, and a
    finished checkpoint (its manifest) is replaced only with --overwrite."""
    folder = Path(directory).expanduser()

    def in_checkpoint(_: Path) -> bool:
        """Whether the folder holds a robustlab checkpoint manifest."""
        try:
            return _read_manifest(folder / MANIFEST) is not None
        except RobustlabError:
            return False

    return [
        Output(folder, option, folder=True),
        Output(folder / WEIGHTS, option, ours=in_checkpoint),
        Output(
            folder / MANIFEST, option, ours=in_checkpoint, keep="a trained checkpoint's manifest"
        ),
    ]


def checkpoint_files(path: str | Path) -> list[Path]:
    """The files a checkpoint path stands for: [manifest, weights], or [file] for a legacy
    .pt/.pth (the inputs ``io.check_outputs`` must never write over); ``zoo:NAME`` stands
    for the shipped model's folder."""
    p = Path(resolve_zoo(path)).expanduser()
    if p.suffix in (".pt", ".pth", ".bin"):
        return [p]
    if p.is_dir():
        return [p / MANIFEST, p / WEIGHTS]
    if p.name.endswith(".json"):
        return [p, p.parent / WEIGHTS]
    if p.suffix == ".safetensors":
        return [p.parent / MANIFEST, p]
    raise RobustlabError(
        f"{p} is not a checkpoint: give a checkpoint folder, its manifest.json, "
        "its model.safetensors, or a legacy .pt/.pth file"
    )


def _read_manifest(path: Path) -> dict[str, Any]:
    raw = read_regular_bytes(path, "checkpoint manifest")
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise RobustlabError(f"cannot read checkpoint manifest {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "robustlab-checkpoint":
        raise RobustlabError(f"{path} is not a robustlab checkpoint manifest")
    return manifest


def _within(config: dict[str, Any], key: str, limit: int, what: str) -> None:
    """A manifest number that sizes the model is within its limit (other faults of it are
    left to ``build_from_config``, which names them)."""
    try:
        value = int(config[key])
    except (KeyError, TypeError, ValueError, OverflowError):
        return
    if value > limit:
        raise RobustlabError(
            f"checkpoint manifest asks for {key} {value}, more than the limit of {limit} {what} "
            f"(ROBUSTLAB_MAX_{'IMAGE_SIDE' if key == 'image_size' else 'CLASSES'})"
        )


def check_model_size(config: dict[str, Any]) -> None:
    """Refuse a manifest whose model would exhaust memory, before any weight is allocated:
    image size and classes are checked, then the parameters counted on the meta device."""
    if not isinstance(config, dict):
        raise RobustlabError("checkpoint manifest has an incomplete or invalid model section")
    bounds = limits()
    _within(config, "image_size", bounds.image_side, "pixels")
    _within(config, "num_classes", bounds.classes, "classes")
    backbone = {k: v for k, v in config.items() if k != "multi_exit"}
    try:
        with shapes_only():
            shape = build_from_config(backbone)
    except (RuntimeError, NotImplementedError):
        return  # an architecture that cannot be sized on meta is sized by its real build
    count = sum(t.numel() for t in shape.parameters()) + sum(t.numel() for t in shape.buffers())
    if count > bounds.parameters:
        raise RobustlabError(
            f"checkpoint manifest describes a model of {count:,} parameters, more than the "
            f"limit of {bounds.parameters:,} (ROBUSTLAB_MAX_PARAMETERS)"
        )


def _checked_weights(
    manifest: dict[str, Any], manifest_path: Path, weights_path: Path, trust_unhashed: bool
) -> dict[str, Any]:
    """The manifest's weights section after the hash check; an unhashed one only if trusted,
    and then recorded (``trusted_unhashed``) with the hash of the weights actually loaded."""
    check_regular(weights_path, "weights file", limits().data_bytes)
    info = manifest.get("weights")
    if info is None and "weights" in manifest or info is not None and not isinstance(info, dict):
        raise RobustlabError(f"{manifest_path} has an invalid 'weights' section")
    expected = (info or {}).get("sha256")
    if expected is not None and not isinstance(expected, str):
        raise RobustlabError(f"{manifest_path} has an invalid 'weights' section")
    actual = file_sha256(weights_path)
    if expected:
        if actual != expected:
            raise RobustlabError(
                f"weights {weights_path} do not match the hash in its manifest "
                "(corrupted or replaced)"
            )
        return dict(info or {})
    missing = "no 'weights' section" if info is None else "an empty or missing weights hash"
    if not trust_unhashed:
        raise RobustlabError(
            f"{manifest_path} has {missing}, so the weights cannot be checked; "
            "load it only if you trust it (trust_unhashed, --trust-unhashed)"
        )
    return {**(info or {}), "file": WEIGHTS, "sha256": actual, "trusted_unhashed": True}


def load_checkpoint(
    path: str | Path,
    *,
    trust_unhashed: bool = False,
    foreign: ForeignOptions | None = None,
    data: DataShape | None = None,
    **legacy: Any,
) -> Checkpoint:
    """Rebuild a model from a checkpoint folder, its manifest or weights file, a shipped model
    (``zoo:NAME``, ``models.pretrained``), or a legacy .pt; or load a foreign model (``torchvision:NAME``, ``timm:NAME``, ``robustbench:NAME``,
    ``python:FILE.py:FACTORY``, a TorchScript file) with ``foreign`` options (``models.foreign``),
    ``data`` giving the input shape and classes where neither the options nor the model do.

    The weights must match the SHA-256 in the manifest; a manifest without one is refused
    unless ``trust_unhashed``, and then the returned manifest says so (``trusted_unhashed``).
    A legacy ``.pt``/``.pth`` holds only weights: pass the architecture as keyword arguments
    (``arch=..., in_channels=..., num_classes=..., image_size=..., mean=..., std=...``). It is
    read with ``weights_only=True``; a file that needs arbitrary code to unpickle is refused.
    """
    if foreign_kind(path) is not None:
        if legacy:
            raise RobustlabError(
                f"{path} is not a legacy weights file; {', '.join(sorted(legacy))} do not apply"
            )
        return Checkpoint(*load_foreign(path, foreign, data), Path(str(path)))
    if foreign is not None and foreign != ForeignOptions():
        raise RobustlabError(
            f"{path} is a robustlab checkpoint, which declares its own weights, shape and "
            "normalisation; --weights, --mean, --std, --input-size, --num-classes, --dataset "
            "and --threat-model only apply to foreign models"
        )
    p = Path(resolve_zoo(path))  # zoo:NAME, a shipped model, is a checkpoint like any other
    if not p.exists():
        raise RobustlabError(f"checkpoint {p} does not exist")
    files = checkpoint_files(p)
    if len(files) == 1:
        return _load_legacy(p, legacy)
    manifest_path, weights_path = files
    if not manifest_path.exists():
        raise RobustlabError(f"checkpoint {p} has no {MANIFEST}")
    if not weights_path.exists():
        raise RobustlabError(f"checkpoint {p} has no {WEIGHTS}")
    manifest = _read_manifest(manifest_path)
    manifest["weights"] = _checked_weights(manifest, manifest_path, weights_path, trust_unhashed)
    config = manifest.get("model", {})
    check_model_size(config)
    if isinstance(config, dict) and "hpm" in config:  # the HPM head over a base model
        model: nn.Module = hpm_from_config(config)
    elif isinstance(config, dict) and "multi_exit" in config:  # exits over a zoo backbone
        model = multiexit_from_config(config)
    else:
        model = build_from_config(config)
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RobustlabError(f"cannot read weights {weights_path}: {exc}") from None
    load_state(model, state, weights_path)
    model.eval()
    if "quantization" in manifest:  # int8: the float model above, requantized
        model = _requantized(model, manifest, weights_path.parent)
    # a shipped model is named as the user named it (as a foreign one is), not by its folder
    where = Path(str(path).strip()) if is_zoo(path) else weights_path.parent
    return Checkpoint(model, manifest, where)


def save_quantized_checkpoint(
    model: QuantizedModel, directory: str | Path, manifest: dict[str, Any]
) -> Path:
    """Write an int8 model as its float weights plus its calibrated observers (``OBSERVERS``,
    hashed in the manifest's ``quantization`` section), which ``load_checkpoint`` requantizes."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / OBSERVERS) as tmp:
        save_file(dict(model.observers), str(tmp))
        digest = file_sha256(tmp)
    section = {**manifest.get("quantization", {}), "backend": model.backend}
    section["observers"] = {"file": OBSERVERS, "sha256": digest}
    return save_checkpoint(model.float_model, out, {**manifest, "quantization": section})


def _requantized(model: nn.Module, manifest: dict[str, Any], folder: Path) -> QuantizedModel:
    """The int8 model of a quantized checkpoint: its observers checked against their hash."""
    section = manifest["quantization"]
    info = section.get("observers") if isinstance(section, dict) else None
    if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
        raise RobustlabError("checkpoint manifest has an invalid quantization section")
    path = folder / OBSERVERS
    if not path.exists():
        raise RobustlabError(f"quantized checkpoint {folder} has no {OBSERVERS}")
    check_regular(path, "quantization observers file", limits().data_bytes)
    if file_sha256(path) != info["sha256"]:
        raise RobustlabError(
            f"quantization observers {path} do not match the hash in its manifest "
            "(corrupted or replaced)"
        )
    try:
        observers = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RobustlabError(f"cannot read quantization observers {path}: {exc}") from None
    config = manifest["model"]
    shape = (int(config["in_channels"]), int(config["image_size"]), int(config["image_size"]))
    return rebuild(model, observers, str(section.get("backend", "x86")), shape)


def _load_legacy(p: Path, legacy: dict[str, Any]) -> Checkpoint:
    obj = read_torch_file(p)
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
    check_model_size(config)
    model = build_from_config(config)
    state = dict(obj)
    if not any(k.startswith("normalize.") for k in state):
        state = {f"net.{k}": v for k, v in state.items()}
        normalize = model[0]
        state.update({f"normalize.{k}": v for k, v in normalize.state_dict().items()})
    load_state(model, state, p)
    model.eval()
    # a full state dict brings its own normalisation: report the one the model now uses
    normalize = model[0]
    if isinstance(normalize, Normalize):
        config["mean"] = normalize.mean.flatten().tolist()
        config["std"] = normalize.std.flatten().tolist()
    manifest = {"format": "legacy-pt", "model": config, "weights": {"sha256": file_sha256(p)}}
    return Checkpoint(model, manifest, p)


def load(path: str | Path, **options: Any) -> nn.Module:
    """A model (in eval mode, its normalisation inside) from a checkpoint, or from a foreign
    source: ``load("torchvision:resnet18", weights="w.safetensors", mean=..., std=...,
    input_size=(3, 32, 32))``, ``load("python:net.py:make", weights=..., mean=0, std=1,
    input_size=...)``, ``load("model.ts", ...)``, ``load("robustbench:NAME", dataset=...,
    threat_model=...)``; see ``load_checkpoint`` and ``models.foreign``."""
    if foreign_kind(path) is not None:
        return load_checkpoint(path, foreign=ForeignOptions.of(**options)).model
    return load_checkpoint(path, **options).model

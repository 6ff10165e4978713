"""The model cache: a zoo model is trained once per resolved configuration and reused after."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..data import DataSplits, cache_dir
from ..models.checkpoint import MANIFEST, load_checkpoint
from .loop import TrainConfig, train, training_splits


def cache_root() -> Path:
    """Where trained zoo models are kept for reuse (ROBUSTLAB_CACHE, else ~/.cache/robustlab)."""
    return cache_dir() / "demo"


def config_key(cfg: TrainConfig, calibration: int = 0) -> str:
    """A short hash that names a training configuration in the cache.

    The config is hashed with the recipe's defaults filled in, so a model trained under an
    older recipe (say 15 epochs where the recipe now says 20) is never reused silently; a
    calibration hold-out (training samples never trained on) makes another model."""
    record = cfg.resolved().record()
    if calibration:
        record = {**record, "calibration": calibration}
    blob = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_folder(cfg: TrainConfig, cache: Path | None = None, calibration: int = 0) -> Path:
    """The folder that holds (or will hold) the model of this configuration."""
    return (cache or cache_root()) / config_key(cfg, calibration)


def is_cached(cfg: TrainConfig, cache: Path | None = None, calibration: int = 0) -> bool:
    """Whether a finished model of this configuration is in the cache."""
    return (cached_folder(cfg, cache, calibration) / MANIFEST).exists()


@dataclass(frozen=True)
class CachedModel:
    """A model from the cache: the network, its manifest, its folder, and whether it was reused."""

    model: nn.Module
    manifest: dict[str, Any]
    folder: Path
    reused: bool


def obtain(
    cfg: TrainConfig,
    cache: Path | None = None,
    *,
    calibration: int = 0,
    splits: DataSplits | None = None,
    device: str = "auto",
    progress: bool = True,
) -> CachedModel:
    """The model of a configuration: reused from the cache, or trained into it (on ``splits``,
    which must hold out ``calibration`` samples; loaded when not given)."""
    folder = cached_folder(cfg, cache, calibration)
    if is_cached(cfg, cache, calibration):
        ckpt = load_checkpoint(folder)
        return CachedModel(ckpt.model, ckpt.manifest, folder, reused=True)
    if splits is None or calibration:
        splits = training_splits(cfg, calibration)
    result = train(cfg, folder, splits=splits, device=device, progress=progress)
    return CachedModel(result.model, result.manifest, folder, reused=False)

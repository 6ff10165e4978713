"""robustlab: attack, defend and audit the adversarial robustness of PyTorch classifiers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import RobustlabError
from .version import __version__

if TYPE_CHECKING:
    from torch import nn


def load(path: str | Path, **legacy: Any) -> nn.Module:
    """Rebuild a model (in eval mode) from a robustlab checkpoint; never unpickles code."""
    from .models.checkpoint import load as _load

    return _load(path, **legacy)


__all__ = ["RobustlabError", "__version__", "load"]

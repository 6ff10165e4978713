"""robustlab: attack, defend and audit the adversarial robustness of PyTorch classifiers.

The public API, one import away: ``robustlab.load`` (a checkpoint, or a torchvision:,
timm:, robustbench:, python: or TorchScript model, as a model with its normalisation inside),
``robustlab.load_data`` (a data source by name), ``robustlab.make_attack`` (an attack by
name), ``robustlab.AutoAttack`` and ``robustlab.ThreatModel``; evaluations are in
``robustlab.evaluate`` (``from robustlab.evaluate import evaluate``: clean and robust
accuracy on a Dataset, an ``(x, y)`` pair, a ``TensorDataset`` or a ``DataLoader``). They
are imported on first use, so the command line starts without loading what it does not run.
"""

import importlib as _importlib
import typing as _typing

from .errors import RobustlabError
from .version import __version__

if _typing.TYPE_CHECKING:
    from .attacks import AutoAttack, make_attack
    from .core.threat import ThreatModel
    from .data import Dataset, load_data
    from .models.checkpoint import load

#: Each public name and the module that defines it.
_LAZY = {
    "AutoAttack": "attacks",
    "Dataset": "data",
    "ThreatModel": "core.threat",
    "load": "models.checkpoint",
    "load_data": "data",
    "make_attack": "attacks",
}

__all__ = [
    "AutoAttack",
    "Dataset",
    "RobustlabError",
    "ThreatModel",
    "__version__",
    "load",
    "load_data",
    "make_attack",
]


def __getattr__(name: str) -> object:
    """Import a public name's module on first use."""
    if name not in _LAZY:
        raise AttributeError(f"module 'robustlab' has no attribute {name!r}")
    return getattr(_importlib.import_module(f".{_LAZY[name]}", __name__), name)


def __dir__() -> list[str]:
    """The public API only."""
    return sorted(__all__)

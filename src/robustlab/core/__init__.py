"""The ground every other part stands on: threat models, the model guard, input checks,
success criteria and devices. Depends on nothing else in robustlab but its error type."""

from .checks import check_batch, check_batch_size
from .criteria import success
from .device import resolve_device
from .guard import evaluating, frozen_eval, preserved
from .threat import NORMS, ThreatModel

__all__ = [
    "NORMS",
    "ThreatModel",
    "check_batch",
    "check_batch_size",
    "evaluating",
    "frozen_eval",
    "preserved",
    "resolve_device",
    "success",
]

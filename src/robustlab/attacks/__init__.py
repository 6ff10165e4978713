"""Attacks: threat models, losses, the model guard, and the attacks themselves."""

from .base import Attack, check_batch, success
from .guard import frozen_eval
from .losses import LOSSES, cross_entropy, cw_margin, dlr, get_loss
from .pgd import PGD
from .threat import NORMS, ThreatModel

__all__ = [
    "LOSSES",
    "NORMS",
    "PGD",
    "Attack",
    "ThreatModel",
    "check_batch",
    "cross_entropy",
    "cw_margin",
    "dlr",
    "frozen_eval",
    "get_loss",
    "success",
]

"""Attacks: threat models, the model guard, and gradient attacks."""

from .guard import frozen_eval
from .pgd import PGD
from .threat import NORMS, ThreatModel

__all__ = ["NORMS", "PGD", "ThreatModel", "frozen_eval"]

"""Attacks: threat models, losses, the model guard, and the attacks themselves."""

from .apgd import APGD, APGDT
from .autoattack import AutoAttack
from .base import Attack, check_batch, success
from .cw import CWL2
from .fab import FAB
from .guard import frozen_eval
from .iterative import BIM, DIFGSM, FGSM, IFGSM, MIFGSM, TIFGSM, IterativeAttack
from .losses import LOSSES, cross_entropy, cw_margin, dlr, get_loss
from .pgd import PGD
from .registry import ATTACKS, make_attack
from .square import Square
from .threat import NORMS, ThreatModel

__all__ = [
    "APGD",
    "APGDT",
    "ATTACKS",
    "BIM",
    "CWL2",
    "DIFGSM",
    "FAB",
    "FGSM",
    "IFGSM",
    "LOSSES",
    "MIFGSM",
    "NORMS",
    "PGD",
    "TIFGSM",
    "Attack",
    "AutoAttack",
    "IterativeAttack",
    "Square",
    "ThreatModel",
    "check_batch",
    "cross_entropy",
    "cw_margin",
    "dlr",
    "frozen_eval",
    "get_loss",
    "make_attack",
    "success",
]

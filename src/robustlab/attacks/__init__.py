"""Attacks: threat models, losses, the model guard, and the attacks themselves."""

from ..core.checks import check_batch
from ..core.criteria import success
from ..core.guard import frozen_eval
from ..core.threat import NORMS, ThreatModel
from .apgd import APGD, APGDT
from .autoattack import AutoAttack
from .base import Attack
from .cw import CWL2
from .deepfool import DeepFool
from .deepsloth import DeepSloth, ExitPGD
from .fab import FAB
from .iterative import BIM, DIFGSM, FGSM, IFGSM, MIFGSM, TIFGSM, IterativeAttack
from .losses import LOSSES, cross_entropy, cw_margin, dlr, get_loss
from .optim import MomentumStep, SteepestStep, ascend, iterates
from .pgd import PGD
from .registry import ATTACKS, REGISTRY, make_attack, register
from .square import Square
from .surrogate import Ensemble
from .transforms import declare_residual, linbp, skip_gradient
from .universal import UAPConfig, craft_uap, score_uap, universal_perturbation

__all__ = [
    "APGD",
    "APGDT",
    "ATTACKS",
    "Attack",
    "AutoAttack",
    "BIM",
    "CWL2",
    "DIFGSM",
    "DeepFool",
    "DeepSloth",
    "Ensemble",
    "ExitPGD",
    "FAB",
    "FGSM",
    "IFGSM",
    "IterativeAttack",
    "LOSSES",
    "MomentumStep",
    "MIFGSM",
    "NORMS",
    "PGD",
    "REGISTRY",
    "Square",
    "SteepestStep",
    "TIFGSM",
    "UAPConfig",
    "ThreatModel",
    "check_batch",
    "ascend",
    "craft_uap",
    "cross_entropy",
    "cw_margin",
    "declare_residual",
    "dlr",
    "frozen_eval",
    "get_loss",
    "iterates",
    "linbp",
    "make_attack",
    "register",
    "score_uap",
    "skip_gradient",
    "success",
    "universal_perturbation",
]

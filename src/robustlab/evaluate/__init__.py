"""Evaluation protocols and their result records."""

from .checks import masking_checks
from .msa import MSARecord, evaluate_msa
from .robust import EvalRecord, evaluate, evaluate_curve

__all__ = [
    "EvalRecord",
    "MSARecord",
    "evaluate",
    "evaluate_curve",
    "evaluate_msa",
    "masking_checks",
]

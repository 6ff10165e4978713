"""Evaluation protocols and their result records."""

from .checks import masking_checks
from .robust import EvalRecord, evaluate, evaluate_curve

__all__ = ["EvalRecord", "evaluate", "evaluate_curve", "masking_checks"]

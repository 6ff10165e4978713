"""Evaluation protocols and their result records."""

from .checks import masking_checks
from .robust import EvalRecord, check_inputs, evaluate, evaluate_curve

__all__ = ["EvalRecord", "check_inputs", "evaluate", "evaluate_curve", "masking_checks"]

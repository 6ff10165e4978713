"""Evaluation protocols and their result records."""

from .robust import EvalRecord, check_inputs, evaluate, evaluate_curve

__all__ = ["EvalRecord", "check_inputs", "evaluate", "evaluate_curve"]

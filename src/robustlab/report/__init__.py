"""Reports and plots rendered from stored results."""

from .html import render_report
from .plots import robustness_curve

__all__ = ["render_report", "robustness_curve"]

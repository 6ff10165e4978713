"""Audits of a model: FLOPs and early-exit efficiency, transfer matrices, compressibility."""

from .efficiency import efficacy, measure_efficiency
from .flops import exit_flops
from .transfer import gamma_sweep, parse_attack, transfer_matrix

__all__ = [
    "efficacy",
    "exit_flops",
    "gamma_sweep",
    "measure_efficiency",
    "parse_attack",
    "transfer_matrix",
]

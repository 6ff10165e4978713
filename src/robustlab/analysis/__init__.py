"""Audits of a model: FLOPs and early-exit efficiency (threshold calibration included),
transfer matrices, gradient diagnostics."""

from .efficiency import Calibration, calibrate, efficacy, measure_efficiency
from .flops import count_flops, exit_flops
from .transfer import gamma_sweep, parse_attack, transfer_matrix

__all__ = [
    "Calibration",
    "calibrate",
    "count_flops",
    "efficacy",
    "exit_flops",
    "gamma_sweep",
    "measure_efficiency",
    "parse_attack",
    "transfer_matrix",
]

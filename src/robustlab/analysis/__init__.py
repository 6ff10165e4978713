"""Audits of a model: FLOPs and early-exit efficiency (threshold calibration included),
transfer matrices, gradient diagnostics, compressibility and the robustness bound."""

from .bound import local_gains, robustness_bounds, with_alignment
from .compress import compress_record
from .compressibility import layer_metrics, network_summary
from .efficiency import Calibration, calibrate, efficacy, measure_efficiency
from .flops import count_flops, exit_flops
from .gap import bound_gap_correlation, measure_gap, rank_correlation
from .representations import representation_metrics
from .transfer import gamma_sweep, parse_attack, transfer_matrix

__all__ = [
    "Calibration",
    "bound_gap_correlation",
    "calibrate",
    "compress_record",
    "count_flops",
    "efficacy",
    "exit_flops",
    "gamma_sweep",
    "layer_metrics",
    "local_gains",
    "measure_efficiency",
    "measure_gap",
    "network_summary",
    "parse_attack",
    "rank_correlation",
    "representation_metrics",
    "robustness_bounds",
    "transfer_matrix",
    "with_alignment",
]

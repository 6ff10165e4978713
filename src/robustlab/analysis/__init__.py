"""Audits of a model: FLOPs and early-exit efficiency, transfer matrices, compressibility."""

from .transfer import gamma_sweep, parse_attack, transfer_matrix

__all__ = ["gamma_sweep", "parse_attack", "transfer_matrix"]

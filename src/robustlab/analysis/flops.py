"""FLOPs of models and of each exit of a multi-exit network, for audits.

The counter lives with the models (:mod:`robustlab.models.flops`, which states the counting
convention) and the per-unit, per-head and per-exit costs beside the multi-exit network
(:mod:`robustlab.models.multiexit`), because models need them to place their exits; they are
re-exported here, where the efficiency measures use them.
"""

from __future__ import annotations

from ..models.flops import FlopCounter, count_flops, flops_per_input, layer_flops
from ..models.multiexit import exit_flops, head_flops, unit_flops

__all__ = [
    "FlopCounter",
    "count_flops",
    "exit_flops",
    "flops_per_input",
    "head_flops",
    "layer_flops",
    "unit_flops",
]

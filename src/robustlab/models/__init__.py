"""Model zoo: architecture registry, normalisation, residual blocks, structure, checkpoints."""

from .blocks import DenseLayer, Normalize, ResidualBlock, residual_blocks
from .multiexit import MultiExitNetwork, attach_exits
from .registry import (
    ARCHITECTURES,
    Architecture,
    build_model,
    count_parameters,
    get_architecture,
    register,
)
from .structure import (
    Plan,
    ResidualSite,
    classifier_head,
    declare_features,
    declare_residual,
    declare_units,
    feature_shape,
    find_residual_sites,
    penultimate_features,
    plan_for,
    weight_layers,
)

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "DenseLayer",
    "MultiExitNetwork",
    "Normalize",
    "Plan",
    "ResidualBlock",
    "ResidualSite",
    "attach_exits",
    "build_model",
    "classifier_head",
    "count_parameters",
    "declare_features",
    "declare_residual",
    "declare_units",
    "feature_shape",
    "find_residual_sites",
    "get_architecture",
    "penultimate_features",
    "plan_for",
    "register",
    "residual_blocks",
    "weight_layers",
]

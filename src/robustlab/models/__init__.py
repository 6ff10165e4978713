"""Model zoo: architecture registry, normalisation, residual blocks, structure, checkpoints.

Each zoo module registers its architectures and declares its structure beside its definition;
importing them here (in the order they were always registered) completes the registry.
"""

from . import resnet, preact_resnet, vgg, densenet, vit, mlp  # noqa: I001  (keeps registration order)
from .blocks import DenseLayer, Normalize, ResidualBlock, residual_blocks
from .hpm import HPMClassifier, HPMConfig, with_mode
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
    "HPMClassifier",
    "HPMConfig",
    "MultiExitNetwork",
    "Normalize",
    "Plan",
    "ResidualBlock",
    "ResidualSite",
    "attach_exits",
    "build_model",
    "classifier_head",
    "count_parameters",
    "densenet",
    "declare_features",
    "declare_residual",
    "declare_units",
    "feature_shape",
    "find_residual_sites",
    "get_architecture",
    "mlp",
    "penultimate_features",
    "preact_resnet",
    "plan_for",
    "register",
    "residual_blocks",
    "resnet",
    "vgg",
    "vit",
    "weight_layers",
    "with_mode",
]

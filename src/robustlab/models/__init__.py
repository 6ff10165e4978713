"""Model zoo: architecture registry, normalisation, residual blocks, checkpoints."""

from .blocks import DenseLayer, Normalize, ResidualBlock, residual_blocks
from .multiexit import MultiExitNetwork, attach_exits, calibrate
from .registry import (
    ARCHITECTURES,
    Architecture,
    build_model,
    count_parameters,
    get_architecture,
    register,
)

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "DenseLayer",
    "MultiExitNetwork",
    "Normalize",
    "ResidualBlock",
    "attach_exits",
    "build_model",
    "calibrate",
    "count_parameters",
    "get_architecture",
    "register",
    "residual_blocks",
]

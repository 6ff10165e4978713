"""Model zoo: architecture registry, normalisation, residual blocks, checkpoints."""

from .blocks import DenseLayer, Normalize, ResidualBlock, residual_blocks
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
    "Normalize",
    "ResidualBlock",
    "build_model",
    "count_parameters",
    "get_architecture",
    "register",
    "residual_blocks",
]

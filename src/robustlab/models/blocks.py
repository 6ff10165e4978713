"""Building blocks shared by the zoo: input normalisation and residual blocks.

Residual blocks expose their residual branch and their shortcut as separate submodules
(``branch`` and ``shortcut``) so that gradient transforms (SGM, LinBP) can find them by
structure, never by name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Map [0,1] pixels to (x - mean) / std per channel; the first layer of every model."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError("mean and std need one value per channel")
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        )
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class ResidualBlock(nn.Module):
    """``post(shortcut(x) + branch(x))``: the residual branch and the skip path, apart."""

    merge = "add"

    def __init__(
        self, branch: nn.Module, shortcut: nn.Module | None = None, post: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.post = post if post is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.post(self.shortcut(x) + self.branch(x))
        return out

    def flops(self, inp: torch.Tensor, out: torch.Tensor) -> int:
        """Cost of the merge itself: one addition per output element."""
        return out.numel()


class DenseLayer(ResidualBlock):
    """``cat([shortcut(x), branch(x)])``: a DenseNet layer, whose new features are its branch."""

    merge = "concat"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.post(torch.cat([self.shortcut(x), self.branch(x)], dim=1))
        return out

    def flops(self, inp: torch.Tensor, out: torch.Tensor) -> int:
        """A concatenation costs no arithmetic."""
        return 0


def residual_blocks(model: nn.Module) -> list[ResidualBlock]:
    """Every residual block of a model, in module order."""
    return [m for m in model.modules() if isinstance(m, ResidualBlock)]

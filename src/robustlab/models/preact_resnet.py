"""Pre-activation ResNets (He et al. 2016b): bn-relu-conv inside the branch, nothing after the sum."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ResidualBlock
from .registry import Architecture, register
from .structure import Plan, declare_features, declare_units


def preact_block(c_in: int, c_out: int, stride: int) -> ResidualBlock:
    """bn-relu-conv-bn-relu-conv on the branch; the shortcut is identity or a 1x1 conv."""
    branch = nn.Sequential(
        nn.BatchNorm2d(c_in),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
    )
    shortcut: nn.Module | None = None
    if stride != 1 or c_in != c_out:
        shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)
    return ResidualBlock(branch, shortcut)


class PreActResNet(nn.Module):
    """Pre-activation ResNet with three stages, for small images."""

    def __init__(
        self, in_channels: int, num_classes: int, image_size: int, depth: int = 20, width: int = 16
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"preact_resnet depth must be 6n+2 with n >= 1, got {depth}")
        if width < 1:
            raise ValueError(f"preact_resnet width must be >= 1, got {width}")
        n = (depth - 2) // 6
        self.stem = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        c_in = width
        for stage, mult in enumerate((1, 2, 4)):
            c_out = width * mult
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0 and image_size >= 8) else 1
                blocks.append(preact_block(c_in, c_out, stride))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.BatchNorm2d(c_in), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.fc(self.head(self.blocks(self.stem(x))))
        return logits


def preact_resnet_units(net: PreActResNet) -> Plan:
    """Units of a pre-activation ResNet: the stem, then each block; bn-relu-pool head."""
    blocks = tuple((("call", f"blocks.{i}"),) for i in range(len(net.blocks)))
    names = ("stem", *(f"blocks.{i}" for i in range(len(net.blocks))))
    return Plan(((("call", "stem"),), *blocks), names, (("call", "head"), ("call", "fc")))


register(
    Architecture(
        "preact_resnet", PreActResNet, {}, "pre-activation ResNet, depth 6n+2 (default 20)"
    )
)
register(
    Architecture("preact_resnet8", PreActResNet, {"depth": 8}, "pre-activation ResNet, 3 blocks")
)
declare_units(PreActResNet, preact_resnet_units)
declare_features(PreActResNet, "fc")

"""ResNets with BasicBlocks (post-activation, He et al. 2016) sized for small images."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ResidualBlock
from .registry import Architecture, register
from .structure import Plan, declare_features, declare_units


def basic_block(c_in: int, c_out: int, stride: int) -> ResidualBlock:
    """conv-bn-relu-conv-bn on the branch, 1x1 conv-bn shortcut when the shape changes."""
    branch = nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
        nn.BatchNorm2d(c_out),
    )
    shortcut: nn.Module | None = None
    if stride != 1 or c_in != c_out:
        shortcut = nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
        )
    return ResidualBlock(branch, shortcut, nn.ReLU(inplace=True))


class ResNet(nn.Module):
    """CIFAR-style ResNet: a 3x3 stem, three stages of BasicBlocks, global pooling, linear."""

    def __init__(
        self, in_channels: int, num_classes: int, image_size: int, depth: int = 20, width: int = 16
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(
                f"resnet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, ...), got {depth}"
            )
        if width < 1:
            raise ValueError(f"resnet width must be >= 1, got {width}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        c_in = width
        for stage, mult in enumerate((1, 2, 4)):
            c_out = width * mult
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0 and image_size >= 8) else 1
                blocks.append(basic_block(c_in, c_out, stride))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.fc(self.pool(self.blocks(self.stem(x))))
        return logits


def resnet_units(net: ResNet) -> Plan:
    """Units of a ResNet: the stem, then each residual block; the head pools and classifies."""
    blocks = tuple((("call", f"blocks.{i}"),) for i in range(len(net.blocks)))
    names = ("stem", *(f"blocks.{i}" for i in range(len(net.blocks))))
    return Plan(((("call", "stem"),), *blocks), names, (("call", "pool"), ("call", "fc")))


register(Architecture("resnet8", ResNet, {"depth": 8}, "ResNet, 3 BasicBlocks (1 per stage)"))
register(Architecture("resnet14", ResNet, {"depth": 14}, "ResNet, 6 BasicBlocks"))
register(Architecture("resnet20", ResNet, {"depth": 20}, "ResNet, 9 BasicBlocks"))
register(Architecture("resnet", ResNet, {}, "ResNet with BasicBlocks, depth 6n+2 (default 20)"))
declare_units(ResNet, resnet_units)
declare_features(ResNet, "fc")

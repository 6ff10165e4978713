"""Plain VGG-style convolutional networks: no skip connections anywhere."""

from __future__ import annotations

import torch
from torch import nn

from .registry import Architecture, register
from .structure import Plan, declare_features, declare_units, sequential_units

CONFIGS: dict[int, list[list[int]]] = {
    8: [[1], [2], [4]],
    11: [[1], [2], [4, 4], [8, 8]],
    16: [[1, 1], [2, 2], [4, 4, 4], [8, 8, 8]],
}


class VGG(nn.Module):
    """conv-bn-relu stages with max pooling between them, then a linear classifier."""

    def __init__(
        self, in_channels: int, num_classes: int, image_size: int, depth: int = 8, width: int = 32
    ) -> None:
        super().__init__()
        if depth not in CONFIGS:
            raise ValueError(f"vgg depth must be one of {sorted(CONFIGS)}, got {depth}")
        if width < 1:
            raise ValueError(f"vgg width must be >= 1, got {width}")
        layers: list[nn.Module] = []
        c_in, size = in_channels, image_size
        for stage in CONFIGS[depth]:
            for mult in stage:
                layers += [
                    nn.Conv2d(c_in, width * mult, 3, 1, 1, bias=False),
                    nn.BatchNorm2d(width * mult),
                    nn.ReLU(inplace=True),
                ]
                c_in = width * mult
            if size >= 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.fc(self.pool(self.features(x)))
        return logits


def vgg_units(net: VGG) -> Plan:
    """Units of a VGG: one per conv layer (with its bn, relu and any pooling after it)."""
    units, names = sequential_units(net.features, nn.Conv2d, "conv", "features")
    return Plan(tuple(tuple(u) for u in units), tuple(names), (("call", "pool"), ("call", "fc")))


register(
    Architecture("vgg", VGG, {}, "plain VGG-style CNN without skip connections (default depth 8)")
)
register(Architecture("vgg11", VGG, {"depth": 11}, "VGG-11-style CNN"))
declare_units(VGG, vgg_units)
declare_features(VGG, "fc")

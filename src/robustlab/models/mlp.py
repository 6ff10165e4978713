"""A fully connected network on flattened pixels."""

from __future__ import annotations

import torch
from torch import nn

from .registry import Architecture, register
from .structure import Plan, declare_features, declare_units, sequential_units


class MLP(nn.Module):
    """flatten, ``depth`` hidden linear-relu layers of ``width`` units, linear head."""

    def __init__(
        self, in_channels: int, num_classes: int, image_size: int, depth: int = 2, width: int = 256
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError("mlp needs depth >= 1 and width >= 1")
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_channels * image_size * image_size
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU(inplace=True)]
            d = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.fc(self.features(x))
        return logits


def mlp_units(net: MLP) -> Plan:
    """Units of an MLP: one per hidden linear layer (with its activation)."""
    units, names = sequential_units(net.features, nn.Linear, "hidden", "features")
    return Plan(tuple(tuple(u) for u in units), tuple(names), (("call", "fc"),))


register(Architecture("mlp", MLP, {}, "fully connected network on flattened pixels"))
declare_units(MLP, mlp_units)
declare_features(MLP, "fc")

"""A small DenseNet-BC (Huang et al. 2017): dense layers concatenate their branch's features."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import DenseLayer
from .registry import Architecture, register
from .structure import Plan, Step, declare_features, declare_units


def dense_layer(c_in: int, growth: int) -> DenseLayer:
    """bn-relu-conv1x1-bn-relu-conv3x3 branch producing ``growth`` new channels."""
    branch = nn.Sequential(
        nn.BatchNorm2d(c_in),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_in, 4 * growth, 1, bias=False),
        nn.BatchNorm2d(4 * growth),
        nn.ReLU(inplace=True),
        nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False),
    )
    return DenseLayer(branch)


class DenseNet(nn.Module):
    """Three dense stages joined by transition layers (bn-relu-conv1x1-avgpool, compression 0.5)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        layers_per_stage: int = 4,
        growth: int = 12,
    ) -> None:
        super().__init__()
        if layers_per_stage < 1 or growth < 1:
            raise ValueError("densenet needs layers_per_stage >= 1 and growth >= 1")
        c = 2 * growth
        modules: list[nn.Module] = [nn.Conv2d(in_channels, c, 3, 1, 1, bias=False)]
        size = image_size
        for stage in range(3):
            for _ in range(layers_per_stage):
                modules.append(dense_layer(c, growth))
                c += growth
            if stage < 2:
                c_out = c // 2
                transition: list[nn.Module] = [
                    nn.BatchNorm2d(c),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(c, c_out, 1, bias=False),
                ]
                if size >= 8:
                    transition.append(nn.AvgPool2d(2))
                    size //= 2
                modules.append(nn.Sequential(*transition))
                c = c_out
        self.features = nn.Sequential(*modules)
        self.head = nn.Sequential(
            nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.fc(self.head(self.features(x)))
        return logits


def densenet_units(net: DenseNet) -> Plan:
    """Units of a DenseNet: the stem, then each dense layer; a transition joins the layer before."""
    units: list[list[Step]] = []
    names: list[str] = []
    for i, layer in enumerate(net.features):
        step = ("call", f"features.{i}")
        if i == 0:
            units.append([step])
            names.append("stem")
        elif isinstance(layer, nn.Sequential):
            units[-1].append(step)
            names[-1] += "+transition"
        else:
            units.append([step])
            names.append(f"features.{i}")
    return Plan(tuple(tuple(u) for u in units), tuple(names), (("call", "head"), ("call", "fc")))


register(Architecture("densenet", DenseNet, {}, "small DenseNet-BC, 3 dense stages"))
declare_units(DenseNet, densenet_units)
declare_features(DenseNet, "fc")

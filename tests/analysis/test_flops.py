"""The FLOPs counter against hand-computed counts, and cumulative exit costs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from robustlab.analysis.flops import count_flops, exit_flops, head_flops, unit_flops
from robustlab.models import build_model
from robustlab.models.multiexit import ExitHead, attach_exits


def _tiny() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)
    )


def test_tiny_conv_linear_net_by_hand() -> None:
    # conv: 2 x 4 x 4 outputs x (1 channel x 3 x 3) = 288; relu: 32; linear: 3 x 32 + 3 bias
    assert count_flops(_tiny(), torch.zeros(1, 1, 4, 4)) == 288 + 32 + 99
    assert count_flops(_tiny(), torch.zeros(5, 1, 4, 4)) == 5 * (288 + 32 + 99)


def test_strided_grouped_conv_pool_and_batchnorm_by_hand() -> None:
    net = nn.Sequential(
        nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2),  # out 8 x 4 x 4
        nn.BatchNorm2d(8),
        nn.MaxPool2d(2),  # reads 128
        nn.AdaptiveAvgPool2d(1),  # reads 32
    )
    conv = 8 * 4 * 4 * (4 // 2) * 9 + 8 * 4 * 4
    assert count_flops(net, torch.zeros(1, 4, 8, 8)) == conv + 128 + 128 + 32


def test_matches_torch_counter_on_conv_and_linear() -> None:
    """torch counts 2 FLOPs per multiply-accumulate and skips biases and elementwise layers."""
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, bias=False), nn.Flatten(), nn.Linear(6 * 6 * 6, 7, bias=False)
    )
    x = torch.zeros(2, 3, 8, 8)
    with FlopCounterMode(display=False) as ref:
        net(x)
    assert 2 * count_flops(net, x) == ref.get_total_flops()


def test_exit_head_cost_by_hand() -> None:
    head = ExitHead((2, 8, 8), 10)
    # blend: max and avg pools read 128 each, the mix touches 2 x 32; linear: 32 x 10 + 10
    assert count_flops(head, torch.zeros(1, 2, 8, 8)) == 2 * 128 + 2 * 32 + 330
    small = ExitHead((2, 4, 4), 10)  # already 4x4: no pooling
    assert count_flops(small, torch.zeros(1, 2, 4, 4)) == 330


def test_exit_costs_are_cumulative_and_count_earlier_heads() -> None:
    torch.manual_seed(0)
    model = attach_exits(build_model("resnet14", 1, 10, 8), (1, 8, 8), 10, [0, 2, 4])
    units, head = unit_flops(model), head_flops(model)
    backbone = count_flops(model.backbone, torch.zeros(1, 1, 8, 8))
    assert sum(units) + head == backbone
    heads = [count_flops(h, torch.zeros(1, *h.feature_shape)) for h in model.exit_heads]
    costs = exit_flops(model)
    assert costs[0] == units[0] + heads[0]
    assert costs[1] == sum(units[:3]) + heads[0] + heads[1]
    assert costs[2] == sum(units[:5]) + sum(heads)
    assert costs[-1] == backbone + sum(heads)
    assert model.exit_costs() == costs


@pytest.mark.parametrize("arch", ["vit", "densenet", "vgg", "mlp", "preact_resnet"])
def test_units_add_up_to_the_backbone(arch: str) -> None:
    torch.manual_seed(0)
    model = attach_exits(build_model(arch, 1, 10, 8), (1, 8, 8), 10)
    assert sum(unit_flops(model)) + head_flops(model) == count_flops(
        model.backbone, torch.zeros(1, 1, 8, 8)
    )

"""Explicitly low-rank layers: every conv and linear but the first layer and the head, factorised.

A convolution ``C_in -> C_out`` with a ``kh x kw`` kernel, as the matrix
``W = C_out x C_in*kh*kw``, becomes ``W = U V`` of rank at most ``r``: ``V`` is a ``kh x kw``
convolution ``C_in -> r`` (the original stride, padding and dilation, no bias) and ``U`` a
``1x1`` convolution ``r -> C_out`` (the original bias). A linear layer becomes two linear layers
the same way. Both factors are ordinary layers, so ``structure.weight_layers`` lists them (as
``<layer>.down`` and ``<layer>.up``) and checkpoints store them as any weight.

Initialisation (ours): ``V`` has entries of variance ``1 / (C_in*kh*kw)`` and ``U`` of
``var(W0) * C_in*kh*kw / r``, where ``W0`` is the layer being replaced as its architecture
initialised it, so that the composed ``U V`` has the entry variance of ``W0``. Grouped
convolutions, transposed convolutions and an ``nn.MultiheadAttention``'s projections (its
packed input projection, a weight layer of its own, and its ``out_proj``: the attention reads
their weights directly, not through a module call) are left as they are.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import nn

from ..errors import RobustlabError
from .structure import classifier_head, weight_layers

#: The layers that are factorised (transposed convolutions are not).
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: The architecture option every zoo model takes: factorise to this rank.
RANK_OPTION = "rank"


class LowRank(nn.Module):
    """A layer ``up(down(x))`` whose composed weight ``up.weight @ down.weight`` has rank <= r."""

    def __init__(self, down: nn.Module, up: nn.Module) -> None:
        super().__init__()
        self.down = down
        self.up = up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.up(self.down(x))
        return out

    @property
    def rank(self) -> int:
        """The inner dimension r of the factorisation."""
        weight = self.down.weight
        assert isinstance(weight, torch.Tensor)
        return int(weight.shape[0])

    def composed_weight(self) -> torch.Tensor:
        """The weight of the single layer this one equals, as ``C_out x C_in*kh*kw``."""
        up, down = self.up.weight, self.down.weight
        assert isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor)
        product: torch.Tensor = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        return product


def max_rank(layer: nn.Module) -> int:
    """The largest rank a conv or linear layer's weight matrix can have."""
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    return min(int(weight.shape[0]), weight[0].numel())


def _factors(layer: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
    """Fresh ``down`` and ``up`` layers for ``layer`` at this rank (uninitialised values)."""
    bias = getattr(layer, "bias", None) is not None
    w = layer.weight
    assert isinstance(w, torch.Tensor)
    dev, dtype = w.device, w.dtype
    if isinstance(layer, nn.Linear):
        return (
            nn.Linear(layer.in_features, rank, bias=False, device=dev, dtype=dtype),
            nn.Linear(rank, layer.out_features, bias=bias, device=dev, dtype=dtype),
        )
    assert isinstance(layer, CONVS)
    conv: Any = type(layer)
    down = conv(
        layer.in_channels,
        rank,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
        bias=False,
        padding_mode=layer.padding_mode,
        device=dev,
        dtype=dtype,
    )
    up = conv(rank, layer.out_channels, 1, bias=bias, device=dev, dtype=dtype)
    return down, up


def low_rank_of(layer: nn.Module, rank: int) -> LowRank:
    """A rank-``rank`` replacement of a conv or linear layer, initialised at its entry variance."""
    down, up = _factors(layer, rank)
    w0 = layer.weight
    dw, uw = down.weight, up.weight
    assert isinstance(w0, torch.Tensor) and isinstance(dw, torch.Tensor)
    assert isinstance(uw, torch.Tensor)
    fan = w0[0].numel()
    with torch.no_grad():
        dw.copy_(torch.randn_like(dw) / fan**0.5)
        uw.copy_(torch.randn_like(uw) * (w0.var() * fan / rank).sqrt())
        bias, up_bias = getattr(layer, "bias", None), getattr(up, "bias", None)
        if isinstance(bias, torch.Tensor) and isinstance(up_bias, torch.Tensor):
            up_bias.copy_(bias.reshape(up_bias.shape))
    return LowRank(down, up)


def factorizable(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers ``factorize`` replaces: every conv and linear layer but the first weight
    layer, the head, grouped and transposed convolutions and attention's own projections."""
    layers = weight_layers(net)
    if not layers:
        raise RobustlabError(
            f"{type(net).__name__} has no conv or linear layer to factorise at low rank"
        )
    head = classifier_head(net)
    inside_attention = {
        id(m)
        for attn in net.modules()
        if isinstance(attn, nn.MultiheadAttention)
        for m in attn.modules()
    }
    return [
        (name, m)
        for name, m in layers[1:]
        if isinstance(m, (nn.Linear, *CONVS))
        and m is not head
        and id(m) not in inside_attention
        and getattr(m, "groups", 1) == 1
    ]


def check_rank(rank: object) -> int:
    """A rank is a whole number >= 1 (else one sentence)."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or int(rank) < 1:
        raise RobustlabError(f"the low-rank option rank must be a whole number >= 1, got {rank!r}")
    return int(rank)


def factorize(net: nn.Module, rank: object) -> nn.Module:
    """Replace every factorizable layer of ``net`` by a rank-``rank`` ``LowRank`` in place."""
    r = check_rank(rank)
    targets = factorizable(net)
    for name, layer in targets:
        if r > max_rank(layer):
            weight = layer.weight
            assert isinstance(weight, torch.Tensor)
            shape = f"{weight.shape[0]} x {weight[0].numel()}"
            raise RobustlabError(
                f"rank {r} is larger than layer {name} allows: its weight matrix is {shape}, "
                f"so its rank is at most {max_rank(layer)}"
            )
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, low_rank_of(layer, r))
    return net

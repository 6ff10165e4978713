"""A FLOPs counter for the zoo's layers (and any layer that knows its own cost).

Convention (the one of the SDN and DeepSloth profilers, thop and fvcore): one FLOP is one
multiply-accumulate. Per forward call of a layer:

- ``Conv2d``: output elements x (input channels / groups) x kernel area, plus one per output
  element for the bias;
- ``Linear``: output elements x input features, plus one per output element for the bias;
- normalisation (``Normalize``, batch/layer/group norm) and activations: one per output element;
- pooling: one per input element;
- a layer with a ``flops(inp, out)`` method counts what it returns: a residual block's sum
  (one per output element; a dense layer's concatenation: none), self-attention's two
  batched products ``Q K^T`` and ``A V`` (2 x batch x tokens^2 x dim; its linear maps count
  as ``Linear``), an exit head's pooling blend;
- containers, ``Flatten``, ``Identity``, ``Dropout``: none.

A leaf layer of any other kind counts as zero and is listed in :attr:`FlopCounter.unknown`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..core.guard import evaluating
from .blocks import Normalize

_ELEMENTWISE = (
    Normalize,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.ReLU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Softmax,
)
_POOLS = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveMaxPool1d,
)
_FREE = (nn.Flatten, nn.Identity, nn.Dropout, nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor of a hook's input tuple or output (None when there is none)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def layer_flops(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int | None:
    """Multiply-accumulates of one call of ``module`` (None: a leaf layer of unknown kind)."""
    if isinstance(module, nn.Conv2d):
        kernel = math.prod(module.kernel_size)
        macs = out.numel() * (module.in_channels // module.groups) * kernel
        return macs + (out.numel() if module.bias is not None else 0)
    if isinstance(module, nn.Linear):
        macs = out.numel() * module.in_features
        return macs + (out.numel() if module.bias is not None else 0)
    if isinstance(module, _ELEMENTWISE):
        return out.numel()
    if isinstance(module, _POOLS):
        return inp.numel()
    flops = getattr(module, "flops", None)
    if callable(flops):  # a layer that knows its own cost (residual merge, attention, exit head)
        return int(flops(inp, out))
    if isinstance(module, _FREE) or len(list(module.children())) > 0:
        return 0
    return None


class FlopCounter:
    """Counts the multiply-accumulates of every forward call inside ``module`` while active."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.total = 0
        self.unknown: set[str] = set()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        inp, out = _first_tensor(inputs), _first_tensor(output)
        if inp is None or out is None:
            return
        cost = layer_flops(module, inp, out)
        if cost is None:
            self.unknown.add(type(module).__name__)
        else:
            self.total += cost

    def __enter__(self) -> FlopCounter:
        """Start counting (hooks on every submodule)."""
        self._handles = [m.register_forward_hook(self._hook) for m in self.module.modules()]
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop counting and remove every hook."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset(self) -> int:
        """The count so far, then start again from zero."""
        total, self.total = self.total, 0
        return total


def count_flops(
    model: nn.Module, x: torch.Tensor, run: Callable[[torch.Tensor], Any] | None = None
) -> int:
    """Multiply-accumulates of ``run(x)`` (default ``model(x)``) for the batch ``x``, in eval mode."""
    with evaluating(model), torch.no_grad(), FlopCounter(model) as counter:
        (run or model)(x)
    return counter.total


def flops_per_input(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of one input of shape ``input_shape`` (C, H, W)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return count_flops(model, torch.zeros(1, *input_shape, device=device))

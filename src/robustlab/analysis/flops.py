"""A FLOPs counter for the zoo's layers, and the cumulative cost of each exit of a network.

Convention (the one of the SDN and DeepSloth profilers, thop and fvcore): one FLOP is one
multiply-accumulate. Per forward call of a layer:

- ``Conv2d``: output elements x (input channels / groups) x kernel area, plus one per output
  element for the bias;
- ``Linear``: output elements x input features, plus one per output element for the bias;
- self-attention (``robustlab.models.vit.SelfAttention``): the two batched products
  ``Q K^T`` and ``A V``, 2 x batch x tokens^2 x dim (its linear maps count as ``Linear``);
- normalisation (``Normalize``, batch/layer/group norm) and activations: one per output element;
- pooling: one per input element;
- a residual block's sum: one per output element (a dense layer's concatenation: none);
- containers, ``Flatten``, ``Identity``, ``Dropout``: none.

A leaf layer of any other kind counts as zero and is listed in :attr:`FlopCounter.unknown`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..models.blocks import DenseLayer, Normalize, ResidualBlock
from ..models.vit import SelfAttention

if TYPE_CHECKING:
    from ..models.multiexit import MultiExitNetwork

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
    if isinstance(module, SelfAttention):
        b, n, d = inp.shape
        return 2 * b * n * n * d
    if isinstance(module, DenseLayer):
        return 0
    if isinstance(module, ResidualBlock):
        return out.numel()
    if isinstance(module, _ELEMENTWISE):
        return out.numel()
    if isinstance(module, _POOLS):
        return inp.numel()
    flops = getattr(module, "flops", None)
    if callable(flops):  # a layer that knows its own cost, e.g. an exit head's pooling blend
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


@contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for a probe pass; restore every module's mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def count_flops(
    model: nn.Module, x: torch.Tensor, run: Callable[[torch.Tensor], Any] | None = None
) -> int:
    """Multiply-accumulates of ``run(x)`` (default ``model(x)``) for the batch ``x``, in eval mode."""
    with _eval_no_grad(model), FlopCounter(model) as counter:
        (run or model)(x)
    return counter.total


def flops_per_input(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of one input of shape ``input_shape`` (C, H, W)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return count_flops(model, torch.zeros(1, *input_shape, device=device))


def _probe(model: MultiExitNetwork) -> torch.Tensor:
    """A zero input of the model's shape on its device, batch of one."""
    param = next(model.parameters())
    return torch.zeros(1, *model.input_shape, device=param.device, dtype=param.dtype)


def unit_flops(model: MultiExitNetwork) -> list[int]:
    """Multiply-accumulates per input of each backbone unit of a multi-exit network."""
    costs: list[int] = []
    with _eval_no_grad(model), FlopCounter(model) as counter:
        h = _probe(model)
        for unit in model.plan.units:
            h = model.run_steps(unit, h)
            costs.append(counter.reset())
    return costs


def head_flops(model: MultiExitNetwork) -> int:
    """Multiply-accumulates per input of the backbone's own (final) head."""
    with _eval_no_grad(model):
        h = _probe(model)
        for unit in model.plan.units:
            h = model.run_steps(unit, h)
        with FlopCounter(model) as counter:
            model.run_steps(model.plan.head, h)
    return counter.total


def exit_flops(model: MultiExitNetwork) -> list[int]:
    """Cumulative multiply-accumulates per input to reach each exit, the final one last.

    An input leaving at IC k has paid for the backbone up to IC k's unit and for ICs 0..k;
    one reaching the final exit has paid for the whole backbone and every IC.
    """
    units = unit_flops(model)
    heads: list[int] = []
    with _eval_no_grad(model), FlopCounter(model) as counter:
        h = _probe(model)
        k = 0
        for u, unit in enumerate(model.plan.units):
            h = model.run_steps(unit, h)
            counter.reset()
            if k < len(model.positions) and model.positions[k] == u:
                model.heads[k](h)
                heads.append(counter.reset())
                k += 1
    costs = [sum(units[: p + 1]) + sum(heads[: k + 1]) for k, p in enumerate(model.positions)]
    costs.append(sum(units) + sum(heads) + head_flops(model))
    return costs

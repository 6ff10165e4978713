"""A weight layer's weight (and its name), as a matrix, and the best-k error of a vector: what
compressibility metrics (analysis), compression penalties, AWP and pruning (train) all measure.

A weight layer (``structure.weight_layers``) is a convolution or linear layer, whose weight is
its ``weight``, or an ``nn.MultiheadAttention`` with a packed input projection, whose weight is
``in_proj_weight`` (``3E x E``: the query, key and value projections stacked, in that order)
and bias ``in_proj_bias``. Code that names a layer's parameters asks :func:`weight_name` and
:func:`bias_name`, never ``f"{layer}.weight"``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import RobustlabError


def _attributes(module: nn.Module) -> tuple[str, str]:
    """The attribute names of a weight layer's weight and bias."""
    if isinstance(module, nn.MultiheadAttention):
        return "in_proj_weight", "in_proj_bias"
    return "weight", "bias"


def _join(layer: str, attribute: str) -> str:
    """A parameter's state-dict name from its layer's module path ('' is the model itself)."""
    return f"{layer}.{attribute}" if layer else attribute


def weight_name(layer: str, module: nn.Module) -> str:
    """The state-dict name of a weight layer's weight, from the layer's module path."""
    return _join(layer, _attributes(module)[0])


def bias_name(layer: str, module: nn.Module) -> str:
    """The state-dict name of a weight layer's bias (whether or not it has one)."""
    return _join(layer, _attributes(module)[1])


def layer_weight(module: nn.Module) -> torch.Tensor:
    """A weight layer's weight tensor, as stored (an attention's packed ``in_proj_weight``)."""
    weight = getattr(module, _attributes(module)[0], None)
    if not isinstance(weight, torch.Tensor):
        raise RobustlabError(f"{type(module).__name__} has no weight tensor")
    return weight


def layer_bias(module: nn.Module) -> torch.Tensor | None:
    """A weight layer's bias tensor (an attention's ``in_proj_bias``), None if it has none."""
    bias = getattr(module, _attributes(module)[1], None)
    return bias if isinstance(bias, torch.Tensor) else None


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A weight tensor as a matrix: one row per output unit (a conv's filters, flattened)."""
    return weight.reshape(weight.shape[0], -1)


def best_k_error(theta: torch.Tensor, k: int, q: float = 2.0) -> float:
    """``||theta - theta_k||_q / ||theta||_q``, theta_k keeping the k largest-magnitude entries."""
    mags = theta.detach().abs().flatten().to(torch.float64)
    total = torch.linalg.vector_norm(mags, ord=q)
    if float(total) == 0.0:
        return 0.0
    tail = torch.sort(mags, descending=True).values[k:]
    return float(torch.linalg.vector_norm(tail, ord=q) / total)


def k_for_error(theta: torch.Tensor, error: float, q: float = 2.0) -> int:
    """The fewest entries to keep so that the best-k relative error is at most ``error``
    (the per-layer k of eps-targeted pruning); 0 for a zero vector."""
    if not (math.isfinite(error) and 0 <= error < 1):
        raise RobustlabError(f"the target error must be in [0, 1), got {error}")
    mags = torch.sort(theta.detach().abs().flatten().to(torch.float64), descending=True).values
    powers = mags**q
    total = float(powers.sum())
    if total == 0.0:
        return 0
    # tails[k] = sum of the entries from k on, for k = 0 .. n (tails[n] = 0)
    tails = torch.cat([powers.flip(0).cumsum(0).flip(0), powers.new_zeros(1)])
    ok = (tails / total) ** (1 / q) <= error + 1e-12
    return int(torch.nonzero(ok)[0])

"""Regularisers that make a network more compressible, as an add-on hook of the training loop.

Each regulariser is a penalty ``strength * sum over its layers of f(W)``, where ``W`` is a
layer's weight as a matrix (a convolution's ``C_out x C_in*kh*kw``):

- ``l1``: ``sum |W_ij|`` on every convolution and linear weight (head and first layer included);
- ``group-lasso``: ``sum_i ||W_i||_2`` over the rows (a convolution's output filters);
- ``group-lasso-si``: the scale-invariant variant ``sum_i ||W_i||_2 / ||W||_F`` (ours: the
  l2,1 norm over the Frobenius norm, which rescaling the layer does not change, so it rewards
  concentration of the row norms and not shrinkage);
- ``nuclear``: ``||W||_*``, the sum of singular values (convolutions too, reshaped as above;
  the reference code skips them, we do not);
- ``filter-spread`` (a mitigation, not a compressor: the paper's "control of the spread of the
  top filter norms", formula ours): with row norms ``r_i = ||W_i||_2`` and their mean ``m``,
  ``sum_i max(r_i - m, 0)^2 / m^2``: how far the filters above the mean stand out, relative to
  the mean. It is 0 when every row has the same norm, ignores the layer's scale (so it does not
  fight weight decay or shrink the layer) and pulls only the dominant filters back.

The group lasso variants and the nuclear norm leave out the classifier head and the first
weight layer (as the reference code does for group lasso; ours for the nuclear norm), found by
structure (``models.structure.weight_layers`` and ``classifier_head``). Biases and
normalisation layers are never penalised.

The hook adds the penalty's gradient to ``.grad`` after the method's backward, so it composes
with every method (standard, PGD-AT, TRADES, ...) without touching their losses; the loss the
loop reports stays the method's own. ``train(cfg, out, hooks=regularizer_hooks({...}))`` runs
it; the manifest records it in ``training.add_ons`` (read back with ``regularizers_of``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import RobustlabError
from ..models.structure import classifier_head, weight_layers
from ..models.weights import as_matrix, layer_weight
from .methods import Hook, Step

#: The name under which the manifest records the regularizers (``training.add_ons``).
ADD_ON = "regularizers"


def _l1(w: torch.Tensor) -> torch.Tensor:
    """Sum of absolute entries."""
    out: torch.Tensor = w.abs().sum()
    return out


def _group_lasso(w: torch.Tensor) -> torch.Tensor:
    """Sum of the rows' Euclidean norms (the l2,1 norm)."""
    out: torch.Tensor = torch.linalg.vector_norm(w, dim=1).sum()
    return out


def _group_lasso_si(w: torch.Tensor) -> torch.Tensor:
    """The l2,1 norm over the Frobenius norm (0 for an all-zero layer)."""
    fro: torch.Tensor = torch.linalg.vector_norm(w)
    if float(fro.detach()) == 0.0:
        return fro * 0.0
    out: torch.Tensor = torch.linalg.vector_norm(w, dim=1).sum() / fro
    return out


def _filter_spread(w: torch.Tensor) -> torch.Tensor:
    """Squared excess of the above-mean row norms over the mean, over the mean squared
    (0 for an all-zero layer)."""
    rows = torch.linalg.vector_norm(w, dim=1)
    mean = rows.mean()
    if float(mean.detach()) == 0.0:
        zero: torch.Tensor = mean * 0.0
        return zero
    out: torch.Tensor = (torch.relu(rows - mean) ** 2).sum() / mean**2
    return out


def _nuclear(w: torch.Tensor) -> torch.Tensor:
    """Sum of singular values."""
    out: torch.Tensor = torch.linalg.matrix_norm(w, ord="nuc")
    return out


@dataclass(frozen=True)
class Penalty:
    """One regulariser: its formula on a weight matrix, and whether head and first layer count."""

    name: str
    formula: Callable[[torch.Tensor], torch.Tensor]
    all_layers: bool
    description: str


PENALTIES: dict[str, Penalty] = {
    p.name: p
    for p in (
        Penalty("l1", _l1, True, "sum |w| over every conv and linear weight"),
        Penalty(
            "group-lasso", _group_lasso, False, "sum of row (filter) norms, head and first out"
        ),
        Penalty(
            "group-lasso-si",
            _group_lasso_si,
            False,
            "sum of row norms / Frobenius norm per layer, head and first out",
        ),
        Penalty("nuclear", _nuclear, False, "sum of singular values, head and first out"),
        Penalty(
            "filter-spread",
            _filter_spread,
            False,
            "squared excess of the row norms above their mean, over the mean squared (a "
            "mitigation), head and first out",
        ),
    )
}


def check_regularizers(strengths: Mapping[str, object]) -> dict[str, float]:
    """Known regulariser names with finite strengths >= 0, as a plain dict (else one sentence)."""
    checked: dict[str, float] = {}
    for name, value in strengths.items():
        if name not in PENALTIES:
            raise RobustlabError(f"unknown regularizer '{name}'; use one of {', '.join(PENALTIES)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RobustlabError(f"regularizer {name} needs a number as strength, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise RobustlabError(f"regularizer {name} needs a finite strength >= 0, got {value}")
        checked[name] = float(value)
    return checked


def parse_regularizers(items: list[str]) -> dict[str, float]:
    """``['l1=1e-4', 'nuclear=1e-3']`` (the command line's form) to a checked dict."""
    found: dict[str, object] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise RobustlabError(f"regularizer '{item}' must look like NAME=STRENGTH, e.g. l1=1e-4")
        try:
            found[name.strip()] = float(raw)
        except ValueError:
            raise RobustlabError(
                f"regularizer {name.strip()} needs a number as strength, got '{raw}'"
            ) from None
    return check_regularizers(found)


def penalized_layers(model: nn.Module, everything: bool) -> list[tuple[str, nn.Module]]:
    """The conv and linear layers a penalty sees: all, or all but the first and the head."""
    layers = weight_layers(model)
    if everything:
        return layers
    if not layers:
        return []
    head = classifier_head(model)
    return [(n, m) for n, m in layers[1:] if m is not head]


def penalty(model: nn.Module, strengths: Mapping[str, float]) -> torch.Tensor:
    """The total penalty ``sum strength * sum_layers f(W)`` of the model (differentiable)."""
    total = torch.zeros(())
    for name, strength in strengths.items():
        if strength == 0:
            continue
        spec = PENALTIES[name]
        for _, layer in penalized_layers(model, spec.all_layers):
            weight = layer_weight(layer)
            total = total.to(weight.device) + strength * spec.formula(as_matrix(weight))
    return total


class Regularize(Hook):
    """Adds the gradient of the compression penalty to the weights' gradients after backward."""

    def __init__(self, strengths: Mapping[str, float]) -> None:
        self.strengths = check_regularizers(strengths)

    def add_gradient(self, model: nn.Module) -> None:
        """``w.grad += d penalty / d w`` for every penalised weight."""
        weights = [layer_weight(m) for _, m in weight_layers(model)]
        if not weights or not any(self.strengths.values()):
            return
        with torch.enable_grad():
            value = penalty(model, self.strengths)
            if not value.requires_grad:
                return
            grads = torch.autograd.grad(value, weights, allow_unused=True)
        for weight, grad in zip(weights, grads, strict=True):
            if grad is None:
                continue
            if weight.grad is None:
                weight.grad = grad.detach().clone()
            else:
                weight.grad.add_(grad)

    def after_backward(self, step: Step) -> None:
        """Add the penalty's gradient before the optimiser steps."""
        self.add_gradient(step.model)

    def config(self) -> dict[str, object]:
        """The manifest's record of this add-on: its name and the strengths."""
        return {"name": ADD_ON, "strengths": dict(self.strengths)}


def regularizers_of(manifest: Mapping[str, Any]) -> dict[str, float]:
    """The regularizer strengths a checkpoint was trained with (none: an empty dict)."""
    training = manifest.get("training") or {}
    for add_on in training.get("add_ons", []):
        if isinstance(add_on, dict) and add_on.get("name") == ADD_ON:
            return dict(add_on.get("strengths", {}))
    return {}


def regularizer_hooks(strengths: Mapping[str, float]) -> list[Hook]:
    """The hooks a training run installs for these strengths (none when all are zero or unset)."""
    checked = check_regularizers(strengths)
    return [Regularize(checked)] if any(checked.values()) else []

"""Regularisers that make a network more compressible (or mitigate what compression does to
its robustness), as an add-on hook of the training loop.

Each weight regulariser is a penalty ``strength * sum over its layers of f(W)``, where ``W`` is
a layer's weight as a matrix (a convolution's ``C_out x C_in*kh*kw``):

- ``l1``: ``sum |W_ij|`` on every weight layer's weight (convolutions, linear layers and an
  ``nn.MultiheadAttention``'s packed input projection; head and first layer included);
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

The batch regularisers are ``strength * f(model, x)`` on the step's clean batch ``x``:

- ``alignment`` and ``alignment-l2`` (the paper's third mitigation, "a regulariser on the
  alignment term"; what is penalised is ours, the paper does not spell it out): the mean over
  the training batch's clean points of the network's local gain, ``||J(x_i)||_{inf->inf}``
  (the largest row l1 norm of the logits' Jacobian at ``x_i``) for ``alignment`` and its top
  singular value ``||J(x_i)||_2`` for ``alignment-l2``: the numerator of the bound's
  alignment term (``robustlab.analysis.bound``: ``alignment = max_i ||J(x_i)|| /
  Lip_exact``), computed by the same function (``models.gains.local_gains``), in eval mode
  (BatchNorm on its running statistics, as the bound and the attacks see the network). Why
  the numerator and not the ratio: the denominator is the plain product of the layers'
  norms, and a ratio differentiated through it would reward growing those norms (the
  guaranteed bound), so we penalise how much of the worst case the network realises on real
  inputs and leave the norms to weight decay and the other penalties. The mean, not the
  max, over the batch (ours: the max gives one sample's gradient per step). ``alignment *
  bound = CE-Lipschitz * eps * max_i gain_i`` is the aligned estimate of the gap, so the
  penalty lowers it directly. It is computed on at most the first ``ALIGNMENT_POINTS`` points
  of each (shuffled) batch (ours, for cost: one backward pass per class with
  ``create_graph``, then a double backward), and differentiated in every trainable
  parameter (BatchNorm gains shape the Jacobian too). It needs the batch, so it is a
  ``BatchPenalty``: it has no per-layer formula and no layer selection.

The group lasso variants and the nuclear norm leave out the classifier head and the first
weight layer (as the reference code does for group lasso; ours for the nuclear norm), found by
structure (``models.structure.weight_layers`` and ``classifier_head``). Biases and
normalisation layers are never penalised by the weight regularisers.

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
from ..models.gains import local_gains
from ..models.structure import classifier_head, weight_layers
from ..models.weights import as_matrix, layer_weight
from .methods import Hook, Step

#: The name under which the manifest records the regularizers (``training.add_ons``).
ADD_ON = "regularizers"
#: The most points of a training batch the alignment penalty is computed on (ours, for cost).
ALIGNMENT_POINTS = 32


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
        Penalty("l1", _l1, True, "sum |w| over every conv, linear and attention in_proj weight"),
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


def _mean_gain(norm: str) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """The mean local gain in ``norm`` over (at most ``ALIGNMENT_POINTS`` of) a batch."""

    def formula(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Differentiable in the model's parameters."""
        gains = local_gains(model, x[:ALIGNMENT_POINTS], (norm,), create_graph=True)
        return gains[norm].mean()

    return formula


@dataclass(frozen=True)
class BatchPenalty:
    """A regulariser that depends on the training batch, not on one weight matrix at a time."""

    name: str
    formula: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    description: str


BATCH_PENALTIES: dict[str, BatchPenalty] = {
    p.name: p
    for p in (
        BatchPenalty(
            "alignment",
            _mean_gain("linf"),
            "mean over the batch of the l-inf local gain (largest row l1 norm of the logits' "
            "Jacobian), the numerator of the bound's alignment term (a mitigation)",
        ),
        BatchPenalty(
            "alignment-l2",
            _mean_gain("l2"),
            "mean over the batch of the l2 local gain (top singular value of the logits' "
            "Jacobian), the numerator of the bound's l2 alignment term (a mitigation)",
        ),
    )
}
#: Every regulariser name ``--regularizer`` accepts.
REGULARIZERS = (*PENALTIES, *BATCH_PENALTIES)


def check_regularizers(strengths: Mapping[str, object]) -> dict[str, float]:
    """Known regulariser names with finite strengths >= 0, as a plain dict (else one sentence)."""
    checked: dict[str, float] = {}
    for name, value in strengths.items():
        if name not in REGULARIZERS:
            raise RobustlabError(
                f"unknown regularizer '{name}'; use one of {', '.join(REGULARIZERS)}"
            )
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
    """The weight layers a penalty sees: all, or all but the first and the head."""
    layers = weight_layers(model)
    if everything:
        return layers
    if not layers:
        return []
    head = classifier_head(model)
    return [(n, m) for n, m in layers[1:] if m is not head]


def penalty(
    model: nn.Module, strengths: Mapping[str, float], x: torch.Tensor | None = None
) -> torch.Tensor:
    """The total penalty ``sum strength * sum_layers f(W)`` of the model, plus ``strength *
    f(model, x)`` for each batch penalty (differentiable); batch penalties need ``x``."""
    total = torch.zeros(())
    for name, strength in strengths.items():
        if strength == 0:
            continue
        if name in BATCH_PENALTIES:
            if x is None:
                raise RobustlabError(f"the {name} penalty needs a batch of inputs")
            value = BATCH_PENALTIES[name].formula(model, x)
            total = total.to(value.device) + strength * value
            continue
        spec = PENALTIES[name]
        for _, layer in penalized_layers(model, spec.all_layers):
            weight = layer_weight(layer)
            total = total.to(weight.device) + strength * spec.formula(as_matrix(weight))
    return total


class Regularize(Hook):
    """Adds the gradient of the compression penalty to the parameters' gradients after backward."""

    def __init__(self, strengths: Mapping[str, float]) -> None:
        self.strengths = check_regularizers(strengths)

    def add_gradient(self, model: nn.Module, x: torch.Tensor | None = None) -> None:
        """``p.grad += d penalty / d p`` for every trainable parameter the penalty depends on
        (``x``: the batch, for batch penalties such as ``alignment``)."""
        params = [p for p in model.parameters() if p.requires_grad]
        if not weight_layers(model) or not params or not any(self.strengths.values()):
            return
        with torch.enable_grad():
            value = penalty(model, self.strengths, x)
            if not value.requires_grad:
                return
            grads = torch.autograd.grad(value, params, allow_unused=True)
        for param, grad in zip(params, grads, strict=True):
            if grad is None:
                continue
            if param.grad is None:
                param.grad = grad.detach().clone()
            else:
                param.grad.add_(grad)

    def after_backward(self, step: Step) -> None:
        """Add the penalty's gradient before the optimiser steps (batch penalties on the
        step's clean inputs)."""
        self.add_gradient(step.model, step.x)

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

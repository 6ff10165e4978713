"""Surrogates for transfer attacks: ensembles whose members' input gradients are normalised.

An :class:`Ensemble` is a model (it returns the weighted mean of its members' logits, so
predictions and success checks work as for any model) whose backward pass normalises each
member's input gradient, per sample, before the members are combined. Without that, a
member with larger gradients (or one whose gradients SGM shrank less) dominates the
direction (Wu et al. 2020; Dong et al. 2018 combine in logits).

Two ways of combining:

- ``combine="logits"``: the attack's loss is taken on the averaged logits. Works with every
  attack of robustlab (PGD, APGD, the FGSM family...) since the ensemble is just a model.
- ``combine="loss"``: the loss is averaged over the members (each member's loss on its own
  logits). The gradient engine (FGSM family, PGD) asks an ensemble for this objective
  itself (:meth:`Ensemble.evaluate`); other attacks see averaged logits.

Gradient transforms apply to ensembles as to any model: ``skip_gradient(ensemble, 0.2)``
scales the residual branches of every member that has some (and refuses only when none
has), or apply a transform to chosen members: ``skip_gradient(ensemble.members[0], 0.2)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import RobustlabError
from .losses import Loss, get_loss

COMBINE = ("logits", "loss")
NORMALIZE = ("l2", "l1", "none")


class _NormalizeGrad(torch.autograd.Function):
    """Identity forward; backward: each sample's gradient scaled to unit norm, times a weight."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float, weight: float) -> torch.Tensor:
        ctx.p, ctx.weight = p, weight
        return x.clone()  # a copy: members may work in place on their input

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        norms = grad.flatten(1).norm(p=ctx.p, dim=1).clamp_min(1e-30)
        scale = ctx.weight / norms
        return grad * scale.view(-1, *([1] * (grad.dim() - 1))).to(grad.dtype), None, None


# torch leaves Function.apply unannotated: this is its typed entry point
_normalize_grad: Callable[[torch.Tensor, float, float], torch.Tensor] = _NormalizeGrad.apply


class Ensemble(nn.Module):
    """Several models as one surrogate; each member's input gradient is normalised, then weighted.

    ``weights`` (default equal) must be positive; they are normalised to sum to one.
    ``normalize`` is the per-sample norm ("l2", "l1") each member's input gradient is
    scaled to before combining, or "none" for the plain gradient of the combined objective.
    """

    members: nn.ModuleList

    def __init__(
        self,
        models: Sequence[nn.Module],
        *,
        combine: str = "logits",
        normalize: str = "l2",
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        models = list(models)
        if not models or not all(isinstance(m, nn.Module) for m in models):
            raise RobustlabError("an ensemble needs at least one model (torch nn.Module)")
        if combine not in COMBINE:
            raise RobustlabError(
                f"unknown ensemble combination '{combine}'; use {' or '.join(COMBINE)}"
            )
        if normalize not in NORMALIZE:
            raise RobustlabError(
                f"unknown gradient normalisation '{normalize}'; use one of {', '.join(NORMALIZE)}"
            )
        w = [1.0] * len(models) if weights is None else [float(v) for v in weights]
        if len(w) != len(models) or not all(math.isfinite(v) and v > 0 for v in w):
            raise RobustlabError(
                f"ensemble weights must be {len(models)} positive numbers, got {weights!r}"
            )
        self.members = nn.ModuleList(models)
        self.combine = combine
        self.normalize = normalize
        self.weights = tuple(v / sum(w) for v in w)

    def extra_repr(self) -> str:
        """The combination, normalisation and weights, for printing."""
        return f"combine={self.combine}, normalize={self.normalize}, weights={self.weights}"

    def _inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each member's input: ``x`` itself, behind a gradient normalisation when it is on."""
        if not self._normalising(x):
            return [x] * len(self.members)
        p = 2.0 if self.normalize == "l2" else 1.0
        return [_normalize_grad(x, p, w) for w in self.weights]

    def member_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each member's logits (with the gradient normalisation in the graph)."""
        return [m(xi) for m, xi in zip(self.members, self._inputs(x), strict=True)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The weighted mean of the members' logits."""
        logits = self.member_logits(x)
        # normalised members already carry their weight in their gradient
        return _weighted_sum(logits, self.weights, detach_weights=self._normalising(x))

    def _normalising(self, x: torch.Tensor) -> bool:
        """Whether this call puts the gradient normalisation in the graph."""
        return self.normalize != "none" and torch.is_grad_enabled() and x.requires_grad

    def loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None,
        loss: str | Loss = "ce",
    ) -> torch.Tensor:
        """Per-sample objective: members' mean loss (``combine="loss"``) or the loss of the mean logits."""
        return self.evaluate(x, y, targets, loss)[0]

    def evaluate(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None,
        loss: str | Loss = "ce",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-sample objective (see :meth:`loss`) and the mean logits, from one pass."""
        fn = get_loss(loss)
        if self.combine == "logits":
            logits = self(x)
            return fn(logits, y, targets), logits
        per_member = self.member_logits(x)
        normalising = self._normalising(x)
        losses = [fn(z, y, targets) for z in per_member]
        return (
            _weighted_sum(losses, self.weights, detach_weights=normalising),
            _weighted_sum(per_member, self.weights, detach_weights=normalising),
        )


def _weighted_sum(
    values: Sequence[torch.Tensor], weights: Sequence[float], detach_weights: bool = False
) -> torch.Tensor:
    """Σ w_i v_i; with ``detach_weights`` the weights act on the value only, not the gradient.

    The normalised members already carry their weight in their gradient, so the combination
    must not scale it again: the value is Σ w_i v_i and the gradient of each v_i passes with
    factor one.
    """
    total = sum(w * v for w, v in zip(weights, values, strict=True))
    assert isinstance(total, torch.Tensor)
    if not detach_weights:
        return total
    plain = sum(values)
    assert isinstance(plain, torch.Tensor)
    return total.detach() + plain - plain.detach()

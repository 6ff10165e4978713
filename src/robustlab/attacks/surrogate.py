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
  logits). Attacks of the FGSM family do this through :class:`SurrogateAttack` (or
  :func:`on_surrogate`), which asks an ensemble for its averaged loss; other attacks see
  averaged logits.

Gradient transforms apply to ensembles as to any model: ``skip_gradient(ensemble, 0.2)``
scales the residual branches of every member that has some (and refuses only when none
has), or apply a transform to chosen members: ``skip_gradient(ensemble.members[0], 0.2)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import RobustlabError
from .base import Attack
from .iterative import IterativeAttack, input_diversity
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
        return [_NormalizeGrad.apply(x, p, w) for w in self.weights]

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
        fn = get_loss(loss)
        if self.combine == "logits":
            return fn(self(x), y, targets)
        per_member = [fn(z, y, targets) for z in self.member_logits(x)]
        return _weighted_sum(per_member, self.weights, detach_weights=self._normalising(x))


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


@dataclass(frozen=True)
class SurrogateAttack(IterativeAttack):
    """The FGSM-family engine, asking an :class:`Ensemble` surrogate for its combined loss.

    On any other model it is exactly :class:`~robustlab.attacks.iterative.IterativeAttack`.
    """

    name: ClassVar[str] = "surrogate-iterative"

    def gradient(
        self,
        model: nn.Module,
        x_adv: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """The loss gradient at ``x_adv``; an ensemble combines its members' normalised gradients."""
        if not isinstance(model, Ensemble):
            return super().gradient(model, x_adv, y, targets, generator)
        x_adv = x_adv.detach().requires_grad_(True)
        x_in = input_diversity(x_adv, self.diversity_prob, self.resize_rate, generator)
        losses = model.loss(x_in, y, targets, self.loss)
        return torch.autograd.grad(losses.sum(), x_adv)[0]


def on_surrogate(attack: Attack) -> SurrogateAttack:
    """The same FGSM-family configuration (engine or preset) as a :class:`SurrogateAttack`."""
    engine = getattr(attack, "engine", attack)
    if not isinstance(engine, IterativeAttack):
        raise RobustlabError(
            f"only attacks of the FGSM family engine run on ensemble surrogates, got {attack!r}"
        )
    return SurrogateAttack(**{f.name: getattr(engine, f.name) for f in fields(engine)})

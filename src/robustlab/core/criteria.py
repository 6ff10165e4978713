"""Success criteria: when an attack has reached its goal on a sample, and which of two points
is the stronger one.

An attack's goal is one of

- untargeted: the sample is misclassified (:func:`success` without targets);
- targeted: the sample is classified as its target (:func:`success` with targets);
- efficiency (DeepSloth): the input runs to the final exit of a multi-exit network
  (:func:`slowest`).

A :class:`Standing` says, per sample, whether a point succeeded and how strong it is
otherwise: successes beat failures, then the keys decide, compared in order (larger is
better). The constructors below fix the order of each kind of attack, so every attack keeps
its per-sample best point with one comparison, :meth:`Standing.beats`
(see :mod:`robustlab.attacks.restarts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def success(logits: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """Per sample: misclassified (untargeted) or classified as its target (targeted)."""
    pred = logits.argmax(1)
    return pred != y if targets is None else pred == targets


@dataclass(frozen=True)
class Standing:
    """Per sample: did the point succeed (``hit``), and its keys (larger is better, in order)."""

    hit: torch.Tensor
    keys: tuple[torch.Tensor, ...]

    def beats(self, other: Standing) -> torch.Tensor:
        """Per sample: strictly stronger than ``other`` (success first, then the keys in order)."""
        better = self.hit & ~other.hit
        tie = self.hit == other.hit
        for mine, theirs in zip(self.keys, other.keys, strict=True):
            better = better | (tie & (mine > theirs))
            tie = tie & (mine == theirs)
        return better

    def __getitem__(self, rows: torch.Tensor) -> Standing:
        """The standing of the samples at ``rows`` (an index or a mask)."""
        return Standing(self.hit[rows], tuple(k[rows] for k in self.keys))

    def put(self, rows: torch.Tensor, new: Standing, picked: torch.Tensor) -> None:
        """In place: the samples at ``rows`` take the standing of ``new``'s ``picked`` samples."""
        self.hit[rows] = new.hit[picked]
        for mine, theirs in zip(self.keys, new.keys, strict=True):
            mine[rows] = theirs[picked]


def strongest(hit: torch.Tensor, loss: torch.Tensor) -> Standing:
    """Successes win and the first one is final; among failures a larger ``loss`` is stronger.

    The order of loss-driven attacks (PGD, APGD, Square with a negated loss). A success's
    key is +inf, so no later point replaces it.
    """
    return Standing(hit, (torch.where(hit, float("inf"), loss),))


def unbroken(hit: torch.Tensor, dtype: torch.dtype = torch.float32) -> Standing:
    """Success alone: successful where ``hit``, else weakest (clean inputs before an attack,
    or points an ensemble judges by success only)."""
    return strongest(hit, torch.full(hit.shape, float("-inf"), dtype=dtype, device=hit.device))


def smallest(adversarial: torch.Tensor, norm: torch.Tensor, eps: float) -> Standing:
    """Minimum-norm attacks (CW, FAB): only adversarial points count, the smaller norm the better;
    success means adversarial within ``eps``."""
    key = torch.where(adversarial, -norm, float("-inf"))
    return Standing(adversarial & (norm <= eps), (key,))


def slowest(exits: torch.Tensor, final: int, objective: torch.Tensor) -> Standing:
    """DeepSloth's efficiency goal: success is running to exit ``final``; a later exit is
    stronger, then a lower sloth ``objective`` (also among successes, which keep improving)."""
    return Standing(exits == final, (exits, -objective))

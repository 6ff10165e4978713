"""Projected gradient descent (Madry et al. 2018): a preset of the one gradient engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .iterative import IterativeAttack, Preset
from .losses import Loss
from .registry import register


@register("pgd")
@dataclass(frozen=True)
class PGD(Preset):
    """PGD with any loss: random start, restarts keeping the per-sample best point.

    ``alpha`` defaults to 2.5 * eps / steps (Madry et al.). Per sample, the first iterate the
    model misclassifies (targeted: assigns to its target) is returned, else the one of
    highest loss over all restarts; each restart attacks only the samples still unbroken
    (:class:`~robustlab.attacks.iterative.IterativeAttack` with ``returns="best"``).
    """

    norm: str = "linf"
    eps: float = 0.3
    steps: int = 40
    alpha: float | None = None
    restarts: int = 1
    random_start: bool = True
    loss: str | Loss = "ce"
    seed: int = 0

    name: ClassVar[str] = "pgd"

    @property
    def step_size(self) -> float:
        """The step size actually used."""
        return self.alpha if self.alpha is not None else 2.5 * self.eps / self.steps

    @property
    def engine(self) -> IterativeAttack:
        """The engine with PGD's step size, random start and best-keeping restarts."""
        # a step that is 0 (eps 0, or a tiny eps that underflows; steps 0 is refused by the
        # engine) leaves the engine's default, eps / steps, which is then 0 too
        default = self.steps >= 1 and 2.5 * self.eps / self.steps > 0
        return IterativeAttack(
            self.norm,
            self.eps,
            self.steps,
            alpha=self.alpha if self.alpha is not None or not default else self.step_size,
            random_start=self.random_start,
            loss=self.loss,
            seed=self.seed,
            restarts=self.restarts,
            returns="best",
        )

"""Optimisers of attacks: step rules, and projected ascent with them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from ..core.threat import ThreatModel

# -- fixed-size steepest steps and momentum ----------------------------------------------
#
# A step rule turns a gradient into the displacement of one step; it is a frozen config
# whose running state (momentum) is passed in and handed back, so one rule serves any
# number of runs and restarts. :func:`ascend` is the one loop of projected steps with
# them: the FGSM / PGD family engine, adversarial training's inner maximisation, SDN's
# exit training, DeepSloth's "pgd" optimiser and ExitPGD all step through it.

#: What an objective returns: per-sample values, or (values, aux) where ``aux`` is what an
#: observer needs from the same forward pass (logits for a success check, exits, ...).
Evaluated = torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]
Objective = Callable[[torch.Tensor], Evaluated]
#: Called with every iterate (detached), its values and its aux (None when not given).
Observer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], None]
GradientTransform = Callable[[torch.Tensor], torch.Tensor]


class StepRule(Protocol):
    """Turns a gradient into one step's displacement: ``rule(grad, threat, state)``."""

    def __call__(
        self, grad: torch.Tensor, threat: ThreatModel, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The displacement ``x_adv + displacement`` (ascent) and the state for the next step."""
        ...


@dataclass(frozen=True)
class SteepestStep:
    """A steepest-ascent step of fixed size: ``size * threat.steepest_step(grad)``.

    linf: ``size * sign(grad)``; l2: ``size * grad / ||grad||_2``; l1: ``size`` spread over
    the top coordinates (see :meth:`ThreatModel.steepest_step`). No state.
    """

    size: float

    def __call__(
        self, grad: torch.Tensor, threat: ThreatModel, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, None]:
        """The step for ``grad``."""
        return self.size * threat.steepest_step(grad), None


@dataclass(frozen=True)
class MomentumStep:
    """MI (Dong et al. 2018): ``m = decay * m + grad / ||grad||_1``, then a steepest step along m.

    The state is the momentum ``m`` (zeros before the first step); the l1 norm is per
    sample (clamped at 1e-12, so a zero gradient adds nothing).
    """

    size: float
    decay: float = 1.0

    def __call__(
        self, grad: torch.Tensor, threat: ThreatModel, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step along the updated momentum, and the momentum."""
        momentum = torch.zeros_like(grad) if state is None else state
        l1 = grad.abs().flatten(1).sum(1).clamp_min(1e-12)
        momentum = self.decay * momentum + grad / l1.view(-1, *[1] * (grad.dim() - 1))
        return self.size * threat.steepest_step(momentum), momentum


def _split(out: Evaluated) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An objective's values and aux (None when it returned values only)."""
    return out if isinstance(out, tuple) else (out, None)


def ascend(
    objective: Objective,
    x: torch.Tensor,
    start: torch.Tensor,
    threat: ThreatModel,
    step_rule: StepRule,
    steps: int,
    *,
    transform: GradientTransform | None = None,
    observe: Observer | None = None,
    minimize: bool = False,
) -> torch.Tensor:
    """Projected steps from ``start`` in the threat model around ``x``; returns the last iterate.

    Each of ``steps`` steps: ``values = objective(x_adv)``, ``g`` = the gradient of
    ``values.sum()`` (per-sample values; a 0-d total works the same), ``g = transform(g)``
    if given, then ``x_adv = threat.project(x, x_adv + d)`` with ``d`` the step rule's
    displacement (``x_adv - d`` when ``minimize``: descent on the objective). With
    ``observe``, every iterate is shown to it before its step, and the last one (evaluated
    once more, without gradient) after the last step: steps + 1 calls. Without it there
    is no extra forward pass. The model's mode and parameters are the caller's business.
    """
    x_adv, state = start, None
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        values, aux = _split(objective(x_adv))
        grad = torch.autograd.grad(values.sum(), x_adv)[0]
        with torch.no_grad():
            if observe is not None:
                observe(x_adv.detach(), values.detach(), None if aux is None else aux.detach())
            if transform is not None:
                grad = transform(grad)
            displacement, state = step_rule(grad, threat, state)
            moved = x_adv.detach() - displacement if minimize else x_adv.detach() + displacement
            x_adv = threat.project(x, moved)
    x_adv = x_adv.detach()
    if observe is not None:
        with torch.no_grad():
            values, aux = _split(objective(x_adv))
            observe(x_adv, values, aux)
    return x_adv

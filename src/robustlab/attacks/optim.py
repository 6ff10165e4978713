"""Optimisers of attacks: step rules, and projected ascent with them."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from ..core.threat import ThreatModel

# -- fixed-size steepest steps and momentum ----------------------------------------------
#
# A step rule turns a gradient into the displacement of one step; it is a frozen config
# whose running state (momentum) is passed in and handed back, so one rule serves any
# number of runs and restarts. :func:`ascend` (the last iterate) and :func:`iterates`
# (every iterate, for best-keeping) are the one loop of projected steps with them: the
# FGSM / PGD family engine, adversarial training's inner maximisation, SDN's exit
# training, DeepSloth's "pgd" optimiser and ExitPGD all step through it.

#: What an objective returns: per-sample values, or (values, aux) where ``aux`` is what a
#: best-keeping caller needs from the same forward pass (logits for a success check, exits).
Evaluated = torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]
Objective = Callable[[torch.Tensor], Evaluated]
#: An iterate (detached), its values and its aux (None when the objective gave none).
Iterate = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
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


def _climb(
    objective: Objective,
    x: torch.Tensor,
    start: torch.Tensor,
    threat: ThreatModel,
    step_rule: StepRule,
    steps: int,
    transform: GradientTransform | None,
    minimize: bool,
) -> Generator[Iterate, None, torch.Tensor]:
    """The steps: yields each iterate before its step; returns the last iterate (unevaluated)."""
    x_adv, state = start, None
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        values, aux = _split(objective(x_adv))
        grad = torch.autograd.grad(values.sum(), x_adv)[0]
        yield x_adv.detach(), values.detach(), None if aux is None else aux.detach()
        with torch.no_grad():
            if transform is not None:
                grad = transform(grad)
            displacement, state = step_rule(grad, threat, state)
            moved = x_adv.detach() - displacement if minimize else x_adv.detach() + displacement
            x_adv = threat.project(x, moved)
    return x_adv.detach()


def ascend(
    objective: Objective,
    x: torch.Tensor,
    start: torch.Tensor,
    threat: ThreatModel,
    step_rule: StepRule,
    steps: int,
    *,
    transform: GradientTransform | None = None,
    minimize: bool = False,
) -> torch.Tensor:
    """Projected steps from ``start`` in the threat model around ``x``; returns the last iterate.

    Each of ``steps`` steps: ``values = objective(x_adv)`` (per-sample values, or
    ``(values, aux)``; a 0-d total works the same), ``g`` = the gradient of
    ``values.sum()``, ``g = transform(g)`` if given, then
    ``x_adv = threat.project(x, x_adv + d)`` with ``d`` the step rule's displacement
    (``x_adv - d`` when ``minimize``: descent on the objective). The last iterate is not
    evaluated: ``steps`` forward and backward passes in all. The model's mode and
    parameters are the caller's business.
    """
    climb = _climb(objective, x, start, threat, step_rule, steps, transform, minimize)
    while True:
        try:
            next(climb)
        except StopIteration as stop:
            last: torch.Tensor = stop.value
            return last


def iterates(
    objective: Objective,
    x: torch.Tensor,
    start: torch.Tensor,
    threat: ThreatModel,
    step_rule: StepRule,
    steps: int,
    *,
    transform: GradientTransform | None = None,
    minimize: bool = False,
) -> Iterator[Iterate]:
    """The steps of :func:`ascend`, yielding every iterate with its values and aux (detached).

    ``steps + 1`` iterates: each before its step, then the last one, evaluated once more
    without gradient. Best-keeping attacks look at them as they come (aux carries what
    they judge by, such as logits or exits); nothing is kept here.
    """
    last = yield from _climb(objective, x, start, threat, step_rule, steps, transform, minimize)
    with torch.no_grad():
        values, aux = _split(objective(last))
    yield last, values, aux

"""Optimisers of attacks: APGD's step-size control and Adam; fixed-size steps and momentum.

Each optimiser holds per-sample state, so one run serves a batch whose samples move
independently; ``keep`` drops samples that need no more steps (early stop).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field, fields
from itertools import pairwise
from typing import Protocol

import torch

from ..core.threat import ThreatModel, column

# -- APGD step-size control and Adam ------------------------------------------------------

P1, DECAY, MIN_GAP = 22, 3, 6  # p_1 = 0.22, the 0.03 decrease and the 0.06 floor, in hundredths


def checkpoints(steps: int) -> list[int]:
    """The iterations ``w_1 < w_2 < ... <= steps`` at which APGD may halve its step size."""
    marks: list[int] = []
    prev, cur = 0, P1
    while cur <= 100:
        w = -(-cur * steps // 100)  # ceil(p_j * steps) in integers
        if w >= 1 and (not marks or w > marks[-1]):
            marks.append(w)
        prev, cur = cur, cur + max(cur - prev - DECAY, MIN_GAP)
    return marks


def first_step(norm: str, eps: float) -> float:
    """APGD's initial step size: 2 * eps (linf, l2), eps for l1-APGD."""
    return (1.0 if norm == "l1" else 2.0) * eps


@dataclass
class APGDControl:
    """APGD's step-size control (Croce & Hein 2020), per sample, ascending a per-sample loss.

    A step moves to ``z = P(cur + eta * direction)`` and, with ``momentum`` ``a`` after the
    first step, on to ``P(cur + a (z - cur) + (1 - a) (cur - prev))``. :meth:`record` takes
    the loss and gradient there. At each checkpoint ``w_j`` (:func:`checkpoints`) the step
    size is halved, and the next step starts from the best point with its gradient, where

    1. fewer than ``rho * (w_j - w_{j-1})`` of the steps since the last checkpoint increased
       the loss, or
    2. the step size was not halved at ``w_{j-1}`` (``w_0 = 0`` counts as not halved) and
       the best loss did not increase since ``w_{j-1}``.

    To descend an objective, record its negation (and the negated gradient). ``momentum``
    None: plain projected steps (l1-APGD, whose own checkpoints use :meth:`resume_best`);
    an empty ``marks`` never halves.
    """

    rho: float
    momentum: float | None
    gaps: dict[int, int]  # checkpoint -> iterations since the previous one
    cur: torch.Tensor  # the point the next step starts from
    prev: torch.Tensor  # the point before it (momentum)
    grad: torch.Tensor  # the gradient at ``cur``
    loss: torch.Tensor  # the loss at ``cur``
    eta: torch.Tensor  # step size
    best_x: torch.Tensor
    best_loss: torch.Tensor
    best_grad: torch.Tensor
    ups: torch.Tensor  # loss increases since the last checkpoint
    check_best: torch.Tensor  # best loss at the last checkpoint
    halved: torch.Tensor  # step size halved at the last checkpoint
    steps_done: int = field(default=0)

    @classmethod
    def start(
        cls,
        x0: torch.Tensor,
        loss0: torch.Tensor,
        grad0: torch.Tensor,
        eta: float,
        marks: Sequence[int],
        rho: float = 0.75,
        momentum: float | None = 0.75,
    ) -> APGDControl:
        """The control at the start point ``x0`` (its loss and gradient), step size ``eta``."""
        n = len(x0)
        return cls(
            rho=rho,
            momentum=momentum,
            gaps={w: w - v for v, w in pairwise([0, *marks])},
            cur=x0,
            prev=x0,
            grad=grad0,
            loss=loss0,
            eta=torch.full((n,), eta, dtype=x0.dtype, device=x0.device),
            best_x=x0,
            best_loss=loss0,
            best_grad=grad0,
            ups=torch.zeros(n, dtype=torch.long, device=x0.device),
            check_best=loss0,
            halved=torch.zeros(n, dtype=torch.bool, device=x0.device),
        )

    def step(self, threat: ThreatModel, x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """Move from ``cur`` along ``direction`` (a unit steepest step) inside ``threat`` around
        ``x``; returns the new current point."""
        z = threat.project(x, self.cur + column(self.eta, x) * direction)
        if self.momentum is not None and self.steps_done > 0:
            a = self.momentum
            z = threat.project(x, self.cur + a * (z - self.cur) + (1 - a) * (self.cur - self.prev))
        self.prev, self.cur = self.cur, z
        self.steps_done += 1
        return z

    def record(self, loss: torch.Tensor, grad: torch.Tensor) -> None:
        """The loss and gradient at the new current point: count an increase, keep the best."""
        self.ups = self.ups + (loss > self.loss).long()
        better = loss > self.best_loss
        self.best_x = torch.where(column(better, self.cur), self.cur, self.best_x)
        self.best_grad = torch.where(column(better, grad), grad, self.best_grad)
        self.best_loss = torch.where(better, loss, self.best_loss)
        self.grad, self.loss = grad, loss

    def checkpoint(self) -> None:
        """At a checkpoint (after step ``w_j``): halve the step size and go back to the best
        point where progress stalled (conditions 1 and 2); elsewhere nothing happens."""
        gap = self.gaps.get(self.steps_done)
        if gap is None:
            return
        stalled = self.ups < self.rho * gap  # condition 1
        stuck = ~self.halved & (self.best_loss <= self.check_best)  # condition 2
        halve = stalled | stuck
        self.eta = torch.where(halve, self.eta / 2, self.eta)
        self.resume_best(halve)
        self.halved, self.check_best = halve, self.best_loss
        self.ups = torch.zeros_like(self.ups)

    def resume_best(self, mask: torch.Tensor) -> None:
        """Where ``mask`` holds, the next step starts from the best point, with its gradient."""
        self.cur = torch.where(column(mask, self.cur), self.best_x, self.cur)
        self.grad = torch.where(column(mask, self.grad), self.best_grad, self.grad)
        self.loss = torch.where(mask, self.best_loss, self.loss)

    def keep(self, mask: torch.Tensor) -> None:
        """Keep only the samples where ``mask`` holds."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                setattr(self, f.name, value[mask])


@dataclass
class Adam:
    """Adam (Kingma & Ba 2015) on one tensor, descending; elementwise, so per sample.

    ``m`` and ``v`` start at zero; step t (from 1) moves by
    ``lr * m_hat / (sqrt(v_hat) + eps)`` with the bias-corrected moments.
    """

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    m: torch.Tensor | None = None
    v: torch.Tensor | None = None
    t: int = 0

    def step(self, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``param`` after one step against ``grad`` (a new, detached tensor)."""
        if self.m is None or self.v is None:
            self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)
        self.t += 1
        with torch.no_grad():
            self.m.mul_(self.beta1).add_(grad, alpha=1 - self.beta1)
            self.v.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            m_hat = self.m / (1 - self.beta1**self.t)
            v_hat = self.v / (1 - self.beta2**self.t)
            return param.detach() - self.lr * m_hat / (v_hat.sqrt() + self.eps)


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
        momentum = self.decay * momentum + grad / column(l1, grad)
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

"""Optimisers of attacks: APGD's step-size control and Adam; fixed-size steps and momentum.

Each optimiser holds per-sample state, so one run serves a batch whose samples move
independently; ``keep`` drops samples that need no more steps (early stop).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from itertools import pairwise

import torch

from ..core.threat import ThreatModel

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


def column(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample vector shaped to broadcast against a batch like ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


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

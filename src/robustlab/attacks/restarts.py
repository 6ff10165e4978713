"""The one restart / best-keeping wrapper: run only on the samples not yet successful, and keep
per sample the strongest point found (a success wins, else the criterion's order).

Every attack keeps its answer in a :class:`Best`: the clean inputs to start with, then each
candidate point is offered with its :class:`~robustlab.core.criteria.Standing` and replaces
the kept one only where it is strictly stronger. :func:`run_restarts` repeats an attempt
(one run of an attack) on the samples :meth:`Best.todo` still lists. Minimum-norm attacks
cut their answer to the threat model with :func:`within_threat`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..core.criteria import Standing, success
from ..core.threat import ThreatModel, column
from ..models.engine import infer

Candidates = Iterable[tuple[torch.Tensor, Standing]]
"""Points an attempt proposes (rows = the samples it ran on) with their standings."""

Attempt = Callable[[torch.Tensor, int], Candidates]
"""One run of an attack on the samples ``todo`` (indices into the batch), restart ``r``."""


class Best:
    """Per sample, the strongest point offered so far and its standing."""

    def __init__(self, x: torch.Tensor, standing: Standing) -> None:
        """Start from the points ``x`` (copied; usually the clean inputs) standing as given."""
        self.x = x.clone()
        self.standing = standing

    @property
    def done(self) -> torch.Tensor:
        """Per sample: the kept point is a success."""
        return self.standing.hit

    def todo(self) -> torch.Tensor:
        """Indices of the samples whose kept point is not a success yet."""
        return (~self.standing.hit).nonzero().flatten()

    def offer(
        self, x: torch.Tensor, standing: Standing, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Keep ``x`` where it beats the kept point; returns that mask (over ``x``'s rows).

        ``rows``: the batch indices ``x`` belongs to (default: the whole batch, in order).
        """
        kept = self.standing if rows is None else self.standing[rows]
        better = standing.beats(kept)
        idx = better.nonzero().flatten() if rows is None else rows[better]
        self.x[idx] = x[better]
        self.standing.put(idx, standing, better)
        return better


def run_restarts(best: Best, rounds: int, attempt: Attempt, *, first_on_all: bool = False) -> Best:
    """Run ``attempt`` up to ``rounds`` times, each on the samples not yet successful, and
    offer every point it proposes to ``best``; stops early once every sample succeeded.

    ``first_on_all``: the first round runs on every sample, successful or not (for goals whose
    successes keep improving, such as DeepSloth's lower objective at the final exit)."""
    for r in range(rounds):
        todo = (
            torch.arange(len(best.x), device=best.x.device)
            if first_on_all and r == 0
            else best.todo()
        )
        if len(todo) == 0:
            break
        for x, standing in attempt(todo, r):
            best.offer(x, standing, todo)
    return best


def within_threat(
    model: nn.Module,
    threat: ThreatModel,
    x: torch.Tensor,
    y: torch.Tensor,
    targets: torch.Tensor | None,
    found: torch.Tensor,
) -> torch.Tensor:
    """Minimum-norm answers (CW, FAB) cut to the threat model: per sample ``found`` where it
    lies inside, else its projection where that still succeeds, else the input ``x``."""
    with torch.no_grad():
        inside = threat.norms(found - x) <= threat.eps
        out = torch.where(column(inside, x), found, x)
        outside = (~inside).nonzero().flatten()
        if len(outside):
            ts = None if targets is None else targets[outside]
            shrunk = threat.project(x[outside], found[outside])
            hit = success(infer(model, shrunk), y[outside], ts)
            out[outside[hit]] = shrunk[hit]
    return out

"""AutoAttack (Croce & Hein, ICML 2020): a fixed ensemble, per-sample worst case.

Each sub-attack runs only on the points still robust after the ones before it, and a point
is robust only if every sub-attack failed. Versions ``standard``, ``plus`` and ``rand`` follow
the reference implementation's settings; a custom list runs the named sub-attacks in order.

Budgets (100 iterations for APGD and FAB, 5,000 queries for Square everywhere):

- linf, l2 standard: APGD-CE 1 restart, APGD-T 9 targets, FAB-T 9 targets, Square 1 run.
- l1 standard (l1-AutoAttack, Croce & Hein 2021): APGD-CE 5 restarts and APGD-T 5 targets,
  both l1-APGD with the 3/2/1 x eps schedule (``large_eps``), FAB-T 9 targets, Square.
- plus: APGD-CE and APGD-DLR 5 restarts, FAB 5 restarts, Square, APGD-T 9 targets, FAB-T 9
  targets; for l1 the APGD members also use the large-eps schedule (the reference leaves
  it off in 'plus' and warns that l1 'plus' is unchecked; with it, 'plus' contains every
  member of l1 'standard' at an equal or larger budget).
- rand: APGD-CE and APGD-DLR with EOT over 20 passes (l1: 5 restarts, large-eps schedule).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.criteria import success, unbroken
from ..core.guard import frozen_eval
from ..core.threat import ThreatModel
from ..errors import RobustlabError
from ..models.engine import infer
from .apgd import APGD, APGDT
from .base import Attack
from .fab import FAB
from .registry import register
from .restarts import Best
from .square import Square

VERSIONS = ("standard", "plus", "rand", "custom")
SUB_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
BLACK_BOX = ("square",)


@dataclass
class EnsembleResult:
    """Per-sample outcome of an ensemble run on one batch."""

    x_adv: torch.Tensor
    broken_by: list[str | None]  # the sub-attack that broke each point (None: robust / wrong)
    seconds: dict[str, float] = field(default_factory=dict)
    robust_after: dict[str, int] = field(default_factory=dict)


@register("autoattack")
@dataclass(frozen=True)
class AutoAttack(Attack):
    """The AutoAttack ensemble as one attack; ``attacks`` overrides the version's list."""

    norm: str = "linf"
    eps: float = 0.3
    version: str = "standard"
    attacks: tuple[str, ...] = ()
    seed: int = 0

    name: ClassVar[str] = "autoattack"

    def __post_init__(self) -> None:
        ThreatModel(self.norm, self.eps)
        if self.version not in VERSIONS:
            raise RobustlabError(
                f"unknown AutoAttack version '{self.version}'; use one of {', '.join(VERSIONS)}"
            )
        unknown = [a for a in self.attacks if a not in SUB_ATTACKS]
        if unknown:
            raise RobustlabError(
                f"unknown AutoAttack sub-attack {', '.join(unknown)}; "
                f"use any of {', '.join(SUB_ATTACKS)}"
            )
        if self.version == "custom" and not self.attacks:
            raise RobustlabError("a custom AutoAttack needs a list of sub-attacks")
        self.components()  # refuses unsupported norm / sub-attack pairs early

    def names(self) -> tuple[str, ...]:
        """The sub-attacks that run, in order."""
        if self.attacks:
            return self.attacks
        if self.version == "plus":
            return ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
        if self.version == "rand":
            return ("apgd-ce", "apgd-dlr")
        return ("apgd-ce", "apgd-t", "fab-t", "square")

    def components(self) -> list[tuple[str, Attack]]:
        """The configured sub-attacks, with the reference implementation's budgets."""
        n, e, s = self.norm, self.eps, self.seed
        plus = self.version == "plus"
        eot = 20 if self.version == "rand" else 1
        l1 = n == "l1"
        restarts = 5 if (plus or l1) else 1
        targets = 5 if (l1 and not plus) else 9
        made: list[tuple[str, Attack]] = []
        for name in self.names():
            if name in ("apgd-ce", "apgd-dlr"):
                loss = name.removeprefix("apgd-")
                apgd = APGD(
                    norm=n, eps=e, loss=loss, restarts=restarts, eot_iter=eot, seed=s, large_eps=l1
                )
                made.append((name, apgd))
            elif name == "apgd-t":
                apgdt = APGDT(norm=n, eps=e, n_target_classes=targets, seed=s, large_eps=l1)
                made.append((name, apgdt))
            elif name == "fab":
                made.append(
                    (name, FAB(norm=n, eps=e, restarts=5 if plus else 1, targeted=False, seed=s))
                )
            elif name == "fab-t":
                made.append((name, FAB(norm=n, eps=e, targeted=True, n_target_classes=9, seed=s)))
            elif name == "square":
                made.append(
                    (name, Square(norm=n, eps=e, queries=5000, seed=s, rescale_schedule=False))
                )
        return made

    def config(self) -> dict[str, Any]:
        """The ensemble and the full configuration of every sub-attack."""
        return {
            **super().config(),
            "attacks": list(self.names()),
            "components": {name: a.config() for name, a in self.components()},
        }

    def run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The per-sample worst case over the ensemble."""
        if targets is not None:
            raise RobustlabError(
                "AutoAttack is untargeted; its targeted parts pick their own targets"
            )
        return self.run_detailed(model, x, y).x_adv

    def run_detailed(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> EnsembleResult:
        """Run the ensemble and say which sub-attack broke each point and what each cost."""
        with frozen_eval(model):  # a no-op when called from __call__ or evaluate
            return self._run_detailed(model, x, y)

    def _run_detailed(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> EnsembleResult:
        with torch.no_grad():
            best = Best(x, unbroken(success(infer(model, x), y, None)))
        result = EnsembleResult(best.x, [None] * len(x))

        def judge(candidate: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            """Whether each candidate fools the model (judged on the candidates alone)."""
            with torch.no_grad():
                return success(infer(model, candidate), y[idx], None)

        for name, attack in self.components():
            run_member(name, attack, model, x, y, best, judge, result.broken_by, result.seconds)
            result.robust_after[name] = int((~best.done).sum())
        return result


Judge = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""Whether candidates for the points ``idx`` succeed: ``judge(candidate, idx) -> bool``."""


def run_member(
    name: str,
    attack: Attack,
    attacked: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    best: Best,
    judge: Judge,
    broken_by: list[str | None],
    seconds: dict[str, float],
) -> None:
    """One member of an ensemble: attack ``attacked`` on the points ``best`` still holds
    robust, keep each candidate ``judge`` accepts, name its breaker and add up its time."""
    t0 = time.perf_counter()
    idx = best.todo()
    if len(idx):
        candidate = attack.run(attacked, x[idx], y[idx])
        won = idx[best.offer(candidate, unbroken(judge(candidate, idx)), idx)]
        for i in won.tolist():
            broken_by[i] = name
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0

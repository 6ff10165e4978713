"""Projected gradient descent (Madry et al. 2018) with random start and per-sample best restarts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.criteria import success
from ..core.threat import ThreatModel
from ..errors import RobustlabError
from .base import Attack
from .losses import Loss, get_loss


@dataclass(frozen=True)
class PGD(Attack):
    """PGD with any loss; ``alpha`` defaults to 2.5 * eps / steps (Madry et al.)."""

    norm: str = "linf"
    eps: float = 0.3
    steps: int = 40
    alpha: float | None = None
    restarts: int = 1
    random_start: bool = True
    loss: str | Loss = "ce"
    seed: int = 0

    name: ClassVar[str] = "pgd"

    def __post_init__(self) -> None:
        ThreatModel(self.norm, self.eps)
        if self.steps < 1 or self.restarts < 1:
            raise RobustlabError("pgd needs steps >= 1 and restarts >= 1")
        if self.alpha is not None and not self.alpha > 0:
            raise RobustlabError(f"pgd step size alpha must be > 0, got {self.alpha}")
        get_loss(self.loss)

    @property
    def step_size(self) -> float:
        """The step size actually used."""
        return self.alpha if self.alpha is not None else 2.5 * self.eps / self.steps

    def config(self) -> dict[str, Any]:
        """The full configuration, for result records."""
        loss = self.loss if isinstance(self.loss, str) else getattr(self.loss, "__name__", "custom")
        return {**super().config(), "alpha": self.step_size, "loss": loss}

    def run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """PGD on a model already in the state to attack (eval mode, frozen parameters)."""
        threat, loss_fn = self.threat, get_loss(self.loss)
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        best = x.clone()
        with torch.no_grad():
            done_all = success(model(x), y, targets)
        best_loss = torch.full((len(x),), -float("inf"), device=x.device)
        for _ in range(self.restarts):
            todo = (~done_all).nonzero().flatten()
            if len(todo) == 0:
                break
            xs, ys = x[todo], y[todo]
            ts = None if targets is None else targets[todo]
            x_adv = threat.random_start(xs, generator) if self.random_start else xs.clone()
            done = torch.zeros(len(todo), dtype=torch.bool, device=x.device)
            for _step in range(self.steps):
                x_adv.requires_grad_(True)
                logits = model(x_adv)
                losses = loss_fn(logits, ys, ts)
                grad = torch.autograd.grad(losses.sum(), x_adv)[0]
                with torch.no_grad():
                    hit = success(logits, ys, ts)
                    _keep(best, best_loss, done, todo, x_adv.detach(), losses.detach(), hit)
                    step = self.step_size * threat.steepest_step(grad)
                    x_adv = threat.project(xs, x_adv.detach() + step)
            with torch.no_grad():
                logits = model(x_adv)
                hit = success(logits, ys, ts)
                _keep(best, best_loss, done, todo, x_adv, loss_fn(logits, ys, ts), hit)
            done_all[todo] |= done
        return best


def _keep(
    best: torch.Tensor,
    best_loss: torch.Tensor,
    done: torch.Tensor,
    todo: torch.Tensor,
    x_adv: torch.Tensor,
    losses: torch.Tensor,
    hit: torch.Tensor,
) -> None:
    """Per sample: keep the first successful point, else the highest-loss one."""
    better = ~done & (hit | (losses > best_loss[todo]))
    idx = todo[better]
    best[idx] = x_adv[better]
    best_loss[idx] = torch.where(hit[better], float("inf"), losses[better])
    done |= hit

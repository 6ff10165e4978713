"""Projected gradient descent (Madry et al. 2018) with random start and per-sample best restarts."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RobustlabError
from .guard import frozen_eval
from .threat import ThreatModel


@dataclass(frozen=True)
class PGD:
    """Configuration of PGD; ``alpha`` defaults to 2.5 * eps / steps."""

    norm: str = "linf"
    eps: float = 0.3
    steps: int = 40
    alpha: float | None = None
    restarts: int = 1
    random_start: bool = True
    seed: int = 0

    name = "pgd"

    def __post_init__(self) -> None:
        ThreatModel(self.norm, self.eps)
        if self.steps < 1 or self.restarts < 1:
            raise RobustlabError("pgd needs steps >= 1 and restarts >= 1")
        if self.alpha is not None and self.alpha <= 0:
            raise RobustlabError(f"pgd step size alpha must be > 0, got {self.alpha}")

    @property
    def threat(self) -> ThreatModel:
        """The threat model this attack stays inside."""
        return ThreatModel(self.norm, self.eps)

    @property
    def step_size(self) -> float:
        """The step size actually used."""
        return self.alpha if self.alpha is not None else 2.5 * self.eps / self.steps

    def config(self) -> dict[str, object]:
        """The full configuration, for result records."""
        return {"name": self.name, **asdict(self), "alpha": self.step_size}

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial examples for ``(x, y)``: misclassified ones where found, per sample."""
        with frozen_eval(model):
            return self.run(model, x, y)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """PGD on a model already in the state to attack (eval mode, frozen parameters)."""
        threat = self.threat
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        best = x.clone()
        with torch.no_grad():
            fooled = model(x).argmax(1) != y
        best_loss = torch.full((len(x),), -float("inf"), device=x.device)
        for _ in range(self.restarts):
            todo = (~fooled).nonzero().flatten()
            if len(todo) == 0:
                break
            xs, ys = x[todo], y[todo]
            x_adv = threat.random_start(xs, generator) if self.random_start else xs.clone()
            done = torch.zeros(len(todo), dtype=torch.bool, device=x.device)
            for _step in range(self.steps):
                x_adv.requires_grad_(True)
                logits = model(x_adv)
                losses = F.cross_entropy(logits, ys, reduction="none")
                grad = torch.autograd.grad(losses.sum(), x_adv)[0]
                with torch.no_grad():
                    self._keep(best, best_loss, done, todo, x_adv.detach(), logits, losses, ys)
                    x_adv = threat.project(
                        xs, x_adv.detach() + self.step_size * threat.steepest_step(grad)
                    )
            with torch.no_grad():
                logits = model(x_adv)
                losses = F.cross_entropy(logits, ys, reduction="none")
                self._keep(best, best_loss, done, todo, x_adv, logits, losses, ys)
            fooled[todo] |= done
        return best

    @staticmethod
    def _keep(
        best: torch.Tensor,
        best_loss: torch.Tensor,
        done: torch.Tensor,
        todo: torch.Tensor,
        x_adv: torch.Tensor,
        logits: torch.Tensor,
        losses: torch.Tensor,
        y: torch.Tensor,
    ) -> None:
        """Per sample: keep the first misclassified point, else the highest-loss one."""
        wrong = logits.argmax(1) != y
        better = ~done & (wrong | (losses > best_loss[todo]))
        idx = todo[better]
        best[idx] = x_adv[better]
        best_loss[idx] = torch.where(
            wrong[better], torch.full_like(losses[better], float("inf")), losses[better]
        )
        done |= wrong

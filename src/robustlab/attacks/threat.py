"""Threat models: an (norm, eps) ball around each input, intersected with the [0,1] box."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import RobustlabError

NORMS = ("linf", "l2")


@dataclass(frozen=True)
class ThreatModel:
    """Perturbations with ``||delta||_norm <= eps`` whose examples stay in [0,1]."""

    norm: str
    eps: float

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise RobustlabError(f"unknown norm '{self.norm}'; use one of {', '.join(NORMS)}")
        if not math.isfinite(self.eps) or self.eps < 0:
            raise RobustlabError(f"eps must be a finite number >= 0, got {self.eps}")

    def norms(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-sample norm of a batch of perturbations."""
        flat = delta.flatten(1)
        if self.norm == "linf":
            return flat.abs().amax(dim=1)
        return flat.norm(p=2, dim=1)

    def project(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """The nearest-in-norm-ball point to ``x_adv``, clipped to [0,1] (exact for linf)."""
        delta = x_adv - x
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            n = self.norms(delta).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
            delta = delta * torch.clamp(self.eps / n, max=1.0)
        return (x + delta).clamp(0.0, 1.0)

    def random_start(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A uniformly random point of the ball around ``x`` (inside the box)."""
        if self.norm == "linf":
            u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            delta = (2 * u - 1) * self.eps
        else:
            g = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
            d = x[0].numel()
            r = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
            delta = g * (self.eps * r ** (1.0 / d)).view(-1, *([1] * (x.dim() - 1)))
        return self.project(x, x + delta)

    def steepest_step(self, grad: torch.Tensor) -> torch.Tensor:
        """The unit-norm ascent direction for this norm (sign for linf, normalised for l2)."""
        if self.norm == "linf":
            return grad.sign()
        n = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
        return grad / n

    def contains(self, x: torch.Tensor, x_adv: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
        """Per-sample check that ``x_adv`` lies in the threat model around ``x``."""
        in_box = ((x_adv >= -tol) & (x_adv <= 1 + tol)).flatten(1).all(dim=1)
        return in_box & (self.norms(x_adv - x) <= self.eps * (1 + tol) + tol)

    def as_dict(self) -> dict[str, object]:
        """JSON-able form."""
        return {"norm": self.norm, "eps": self.eps}

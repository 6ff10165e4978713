"""Training methods as small strategies: each turns a batch into the loss to minimise."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..core.threat import ThreatModel
from ..errors import RobustlabError


class Method(Protocol):
    """A training method: the loss of one batch at a point of training (progress in [0,1))."""

    @property
    def name(self) -> str: ...

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        progress: float,
        gen: torch.Generator,
    ) -> torch.Tensor: ...

    def config(self) -> dict[str, object]: ...


@dataclass(frozen=True)
class Standard:
    """Plain empirical risk minimisation with cross-entropy."""

    name: str = "standard"

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        progress: float,
        gen: torch.Generator,
    ) -> torch.Tensor:
        """Cross-entropy on the clean batch."""
        return F.cross_entropy(model(x), y)

    def config(self) -> dict[str, object]:
        """JSON-able description."""
        return {"name": self.name}


@dataclass(frozen=True)
class _Adversarial:
    """Shared settings of adversarial training: threat model, inner steps, eps warm-up."""

    eps: float
    norm: str = "linf"
    steps: int = 10
    alpha_ratio: float = 2.5
    eps_warmup: float = 0.0

    def __post_init__(self) -> None:
        ThreatModel(self.norm, self.eps)
        if self.eps == 0:
            raise RobustlabError("adversarial training needs eps > 0 (use --method standard)")
        if self.steps < 1:
            raise RobustlabError("adversarial training needs at least one inner step")
        if not 0 <= self.eps_warmup < 1:
            raise RobustlabError(
                f"eps warm-up must be a fraction of training in [0, 1), got {self.eps_warmup}"
            )

    def config(self) -> dict[str, object]:
        """JSON-able description, with the step size actually used."""
        return {**asdict(self), "alpha": self.alpha_ratio * self.eps / self.steps}

    def threat_at(self, progress: float) -> ThreatModel:
        """The threat model trained against now: eps grows linearly over the warm-up fraction."""
        if self.eps_warmup <= 0:
            return ThreatModel(self.norm, self.eps)
        return ThreatModel(self.norm, self.eps * min(1.0, progress / self.eps_warmup))

    def inner(
        self,
        model: nn.Module,
        x: torch.Tensor,
        start: torch.Tensor,
        threat: ThreatModel,
        objective: nn.Module | None,
        y: torch.Tensor,
    ) -> torch.Tensor:
        """Maximise the inner objective by projected steepest ascent, with BN in eval mode."""
        alpha = self.alpha_ratio * threat.eps / self.steps
        was_training = model.training
        model.eval()
        x_adv = start
        try:
            for _ in range(self.steps):
                x_adv = x_adv.detach().requires_grad_(True)
                out = model(x_adv)
                obj = (
                    F.cross_entropy(out, y, reduction="sum")
                    if objective is None
                    else objective(out)
                )
                grad = torch.autograd.grad(obj, x_adv)[0]
                x_adv = threat.project(x, x_adv.detach() + alpha * threat.steepest_step(grad))
        finally:
            model.train(was_training)
        return x_adv.detach()


@dataclass(frozen=True)
class PGDAT(_Adversarial):
    """Madry et al. (2018): cross-entropy on PGD examples from a random start."""

    name: str = "pgd-at"

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        progress: float,
        gen: torch.Generator,
    ) -> torch.Tensor:
        """Cross-entropy on the PGD examples of the batch."""
        threat = self.threat_at(progress)
        x_adv = self.inner(model, x, threat.random_start(x, gen), threat, None, y)
        return F.cross_entropy(model(x_adv), y)


class _KLToClean(nn.Module):
    """Summed KL(p_clean || p_adv): the TRADES inner objective."""

    def __init__(self, p_clean: torch.Tensor) -> None:
        super().__init__()
        self.p_clean = p_clean

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(logits, dim=1), self.p_clean, reduction="sum")


@dataclass(frozen=True)
class TRADES(_Adversarial):
    """Zhang et al. (2019): clean cross-entropy + beta * KL(clean || adversarial)."""

    beta: float = 6.0
    name: str = "trades"

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        progress: float,
        gen: torch.Generator,
    ) -> torch.Tensor:
        """The TRADES objective on the batch."""
        threat = self.threat_at(progress)
        with torch.no_grad():
            was_training = model.training
            model.eval()
            p_clean = F.softmax(model(x), dim=1)
            model.train(was_training)
        noise = 0.001 * torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
        x_adv = self.inner(model, x, threat.project(x, x + noise), threat, _KLToClean(p_clean), y)
        clean, adv = model(x), model(x_adv)
        robust = F.kl_div(F.log_softmax(adv, 1), F.softmax(clean, 1), reduction="batchmean")
        return F.cross_entropy(clean, y) + self.beta * robust


METHODS = ("standard", "pgd-at", "trades")


def make_method(name: str, eps: float | None = None, **options: object) -> Method:
    """Build a training method by name; adversarial ones need eps."""
    if name == "standard":
        return Standard()
    if name not in METHODS:
        raise RobustlabError(f"unknown training method '{name}'; use one of {', '.join(METHODS)}")
    if eps is None:
        raise RobustlabError(f"method '{name}' needs --eps")
    cls = PGDAT if name == "pgd-at" else TRADES
    try:
        method: Method = cls(eps=eps, **options)  # type: ignore[arg-type]
        return method
    except TypeError as exc:
        raise RobustlabError(f"bad option for method '{name}': {exc}") from None

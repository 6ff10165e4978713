"""What every attack shares: a threat model, a JSON-able config, and a guarded call."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, is_dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import RobustlabError
from .guard import frozen_eval
from .threat import ThreatModel


class Attack(ABC):
    """An attack: a frozen dataclass with ``norm`` and ``eps`` fields and a ``run`` method.

    ``attack(model, x, y)`` (untargeted) or ``attack(model, x, y, targets)`` (targeted: each
    example should be classified as its target) returns examples inside the threat model;
    per sample, a successful example where one was found. The caller's model is left exactly
    as it was (mode, parameters, requires_grad), also when the attack raises.
    """

    name: ClassVar[str] = "attack"
    norm: str
    eps: float

    @property
    def threat(self) -> ThreatModel:
        """The threat model this attack stays inside."""
        return ThreatModel(self.norm, self.eps)

    def config(self) -> dict[str, Any]:
        """The full configuration, for result records."""
        fields: dict[str, Any] = asdict(self) if is_dataclass(self) else {}  # type: ignore[arg-type]
        return {"name": self.name, **fields}

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Adversarial examples for ``(x, y)``, run with the model in eval mode, then restored."""
        check_batch(x, y, targets)
        with frozen_eval(model):
            return self.run(model, x, y, targets)

    @abstractmethod
    def run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attack proper, on a model already in eval mode with frozen parameters."""


def check_batch(x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None) -> None:
    """Refuse batches an attack cannot treat honestly, with one clear sentence."""
    if x.dim() < 2 or len(x) != len(y):
        raise RobustlabError(
            f"inputs and labels disagree: {tuple(x.shape)} inputs for {tuple(y.shape)} labels"
        )
    if targets is not None and targets.shape != y.shape:
        raise RobustlabError(f"targets need one label per input, got {tuple(targets.shape)}")
    if targets is not None and bool((targets == y).any()):
        raise RobustlabError("a target label equals the true label; targets must differ from y")
    if not bool(torch.isfinite(x).all()):
        raise RobustlabError("inputs contain NaN or Inf values")
    if len(x) and (float(x.min()) < 0 or float(x.max()) > 1):
        raise RobustlabError(
            "inputs must lie in [0,1] (normalisation belongs inside the model); "
            f"got [{float(x.min()):.3g}, {float(x.max()):.3g}]"
        )


def success(logits: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """Per sample: misclassified (untargeted) or classified as its target (targeted)."""
    pred = logits.argmax(1)
    return pred != y if targets is None else pred == targets

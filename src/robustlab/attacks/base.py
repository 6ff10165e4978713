"""What every attack shares: a threat model, a JSON-able config, and a guarded call."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, is_dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.checks import check_batch
from ..core.guard import frozen_eval
from ..core.threat import ThreatModel


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

"""What every attack shares: a threat model, a JSON-able config, and a guarded call."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, is_dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from ..core.checks import check_batch
from ..core.guard import frozen_eval
from ..core.threat import ThreatModel

A = TypeVar("A", bound="Attack")


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

    def recorded_as(self: A, name: str, alias_of: str | None = None) -> A:
        """This attack, recorded under the name a user typed (``alias_of``: what it stands for).

        The registry calls it; the name is not a field, so equality and options are as before.
        """
        object.__setattr__(self, "_recorded_as", (name, alias_of))
        return self

    @property
    def record_name(self) -> str:
        """The name records give this attack: as typed when made by name, else the class's."""
        return self.naming()["name"]

    @property
    def threat(self) -> ThreatModel:
        """The threat model this attack stays inside."""
        return ThreatModel(self.norm, self.eps)

    def naming(self) -> dict[str, str]:
        """The record's ``name``, and ``alias_of`` when the attack was made by an alias."""
        recorded: tuple[str, str | None] | None = self.__dict__.get("_recorded_as")
        if recorded is None:
            return {"name": self.name}
        name, alias_of = recorded
        return {"name": name} if alias_of is None else {"name": name, "alias_of": alias_of}

    def config(self) -> dict[str, Any]:
        """The full configuration, for result records."""
        fields: dict[str, Any] = asdict(self) if is_dataclass(self) else {}
        return {**self.naming(), **fields}

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

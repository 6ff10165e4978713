"""Robust accuracy of a model under one attack, as a typed, JSON-able record."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from .. import __version__
from ..attacks.guard import frozen_eval
from ..attacks.threat import ThreatModel
from ..data import Dataset
from ..errors import RobustlabError


class Attack(Protocol):
    """What evaluation needs of an attack: its threat model, its config, and a run method."""

    @property
    def threat(self) -> ThreatModel: ...

    def config(self) -> dict[str, object]: ...

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


@dataclass
class EvalRecord:
    """The result of evaluating one model under one attack on ``n`` test points."""

    clean_accuracy: float
    robust_accuracy: float
    n: int
    threat_model: dict[str, object]
    attack: dict[str, object]
    model: dict[str, object]
    data: str
    elapsed_s: float
    seed: int
    created: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")
    )
    robustlab_version: str = __version__
    kind: str = "eval"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def check_inputs(x: torch.Tensor) -> None:
    """Refuse inputs an attack cannot treat honestly: NaN/Inf, or values outside [0,1]."""
    if not torch.isfinite(x).all():
        raise RobustlabError("inputs contain NaN or Inf values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise RobustlabError(
            f"inputs must lie in [0,1] (normalisation belongs inside the model); got [{lo:.3g}, {hi:.3g}]"
        )


def evaluate(
    model: nn.Module,
    data: Dataset,
    attack: Attack,
    *,
    n: int | None = None,
    batch_size: int = 250,
    device: str = "cpu",
    model_info: dict[str, object] | None = None,
    seed: int = 0,
    progress: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
) -> EvalRecord:
    """Clean and robust accuracy of ``model`` on the first ``n`` points of ``data``.

    A point counts as robust only if it is classified correctly both clean and under attack;
    every adversarial example is checked to lie inside the attack's threat model.
    """
    total = len(data) if n is None else n
    if total < 1:
        raise RobustlabError(f"n must be >= 1, got {total}")
    if total > len(data):
        raise RobustlabError(f"asked for n={total} points but the test split has only {len(data)}")
    if batch_size < 1:
        raise RobustlabError(f"batch size must be >= 1, got {batch_size}")
    check_inputs(data.x[:total])
    threat = attack.threat
    t0 = time.perf_counter()
    clean_ok = robust_ok = 0
    torch.manual_seed(seed)
    with (
        frozen_eval(model),
        tqdm(
            total=total,
            desc=f"eval {attack.config().get('name')}",
            disable=not progress,
            file=sys.stderr,
            unit="pt",
            leave=False,
        ) as bar,
    ):
        for start in range(0, total, batch_size):
            x = data.x[start : min(total, start + batch_size)].to(device)
            y = data.y[start : min(total, start + batch_size)].to(device)
            with torch.no_grad():
                correct = model(x).argmax(1) == y
            x_adv = x.clone()
            if correct.any():
                x_adv[correct] = attack.run(model, x[correct], y[correct])
            inside = threat.contains(x, x_adv)
            if not bool(inside.all()):
                raise RuntimeError(f"attack {attack.config()} left its threat model: this is a bug")
            with torch.no_grad():
                robust = correct & (model(x_adv).argmax(1) == y)
            clean_ok += int(correct.sum())
            robust_ok += int(robust.sum())
            bar.update(len(x))
            if on_batch is not None:
                on_batch(start + len(x), total)
    return EvalRecord(
        clean_accuracy=clean_ok / total,
        robust_accuracy=robust_ok / total,
        n=total,
        threat_model=threat.as_dict(),
        attack=attack.config(),
        model=dict(model_info or {}),
        data=data.name,
        elapsed_s=round(time.perf_counter() - t0, 3),
        seed=seed,
    )

"""Robust accuracy of a model under one attack, as a typed, JSON-able record."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .. import __version__
from ..attacks.base import Attack
from ..attacks.guard import frozen_eval
from ..data import Dataset
from ..errors import RobustlabError


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
) -> EvalRecord:
    """Clean and robust accuracy of ``model`` on the first ``n`` points of ``data``.

    A point counts as robust only if it is classified correctly both clean and under attack;
    every adversarial example is checked to lie inside the attack's threat model.
    """
    return evaluate_curve(
        model,
        data,
        [attack],
        n=n,
        batch_size=batch_size,
        device=device,
        model_info=model_info,
        seed=seed,
        progress=progress,
    )[0]


def evaluate_curve(
    model: nn.Module,
    data: Dataset,
    attacks: Sequence[Attack],
    *,
    n: int | None = None,
    batch_size: int = 250,
    device: str = "cpu",
    model_info: dict[str, object] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[EvalRecord]:
    """One record per attack, for attacks of one norm at growing eps (a robustness curve).

    Per-sample worst case along the curve: an example that breaks a point at a smaller eps
    also lies in every larger ball, so that point stays broken and is not attacked again.
    Robust accuracy therefore never rises with eps, and the curve costs less than separate runs.
    """
    if not attacks:
        raise RobustlabError("no attack to evaluate")
    norms = {a.threat.norm for a in attacks}
    if len(norms) > 1:
        raise RobustlabError(f"a robustness curve needs one norm, got {', '.join(sorted(norms))}")
    order = sorted(range(len(attacks)), key=lambda i: attacks[i].threat.eps)
    total = len(data) if n is None else n
    if total < 1:
        raise RobustlabError(f"n must be >= 1, got {total}")
    if total > len(data):
        raise RobustlabError(f"asked for n={total} points but the test split has only {len(data)}")
    if batch_size < 1:
        raise RobustlabError(f"batch size must be >= 1, got {batch_size}")
    check_inputs(data.x[:total])
    clean_ok = 0
    robust_ok = [0] * len(attacks)
    seconds = [0.0] * len(attacks)
    torch.manual_seed(seed)
    name = attacks[0].config().get("name")
    with (
        frozen_eval(model),
        tqdm(
            total=total * len(attacks),
            desc=f"eval {name}",
            disable=not progress,
            file=sys.stderr,
            unit="pt",
            leave=False,
        ) as bar,
    ):
        for start in range(0, total, batch_size):
            t0 = time.perf_counter()
            x = data.x[start : min(total, start + batch_size)].to(device)
            y = data.y[start : min(total, start + batch_size)].to(device)
            with torch.no_grad():
                alive = model(x).argmax(1) == y
            clean_ok += int(alive.sum())
            x_adv = x.clone()
            share = (time.perf_counter() - t0) / len(attacks)
            for i in order:
                t1 = time.perf_counter()
                attack = attacks[i]
                if alive.any():
                    x_adv[alive] = attack.run(model, x[alive], y[alive])
                if not bool(attack.threat.contains(x, x_adv).all()):
                    raise RuntimeError(f"attack {attack.config()} left its threat model: a bug")
                with torch.no_grad():
                    alive &= model(x_adv).argmax(1) == y
                robust_ok[i] += int(alive.sum())
                seconds[i] += time.perf_counter() - t1 + share
                bar.update(len(x))
    return [
        EvalRecord(
            clean_accuracy=clean_ok / total,
            robust_accuracy=robust_ok[i] / total,
            n=total,
            threat_model=attack.threat.as_dict(),
            attack=attack.config(),
            model=dict(model_info or {}),
            data=data.name,
            elapsed_s=round(seconds[i], 3),
            seed=seed,
        )
        for i, attack in enumerate(attacks)
    ]

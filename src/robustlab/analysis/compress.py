"""The compressibility audit of one model on one batch: weight metrics, representation
metrics, the robustness bound and the measured gap, as one record (what ``robustlab
compress`` writes), with the time each part took.

Default budgets (ours), from the data's shape: l-inf ``0.3`` for one-channel images and
``8/255`` for colour; l2 ``2.0 * sqrt(d / 784)`` for one channel (2.0 on 28x28 MNIST, 0.57 on
8x8 digits) and ``0.5 * sqrt(d / 3072)`` for colour (0.5 on 32x32 CIFAR), ``d`` the input size.

**Cost.** The batch goes through the model once clean (every representation and the logits
of the gap's clean loss, from one pass) and once perturbed (every threat model's adversarial
batch stacked into one pass: their representations and the gap's adversarial losses). The
alignment term needs the logits' whole Jacobian, one backward pass per class: about ``2 *
classes + 1`` forward passes of the points it is measured on. By default (ours, from
``benchmarks/compress_speed.py``, see ``benchmarks/results_alignment.md``) those are the
first ``ALIGNMENT_POINTS`` (64) points of the batch: the alignment is a max over points, so
a subsample gives a lower estimate of it. On six mnist5k models (a resnet20 and five MLPs)
64 points gave the same alignment as 128, 0.83-1.00 of the value on all 500, at half the
cost (1.7x a forward pass of the 500-point batch on the resnet20, against 3.1x; all 500:
12.5x); with 32 points four of them fell to 0.75-0.85 (64: 0.89-1.00). 0 skips it. The attack (APGD-CE, 100 steps by
default, ``steps``) costs what an attack costs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn

from ..core.checks import check_batch
from ..errors import RobustlabError
from .bound import NORMS, local_gains, robustness_bounds, with_alignment
from .compressibility import DEFAULT_KAPPAS, check_kappas, layer_metrics, network_summary
from .gap import attack_for_gap, gap_from_logits
from .representations import representation_rows, representations_and_logits

#: Points of the batch the alignment term is measured on by default (module docstring).
ALIGNMENT_POINTS = 64


def default_eps(shape: Sequence[int]) -> dict[str, float]:
    """The default l-inf and l2 budgets for inputs of shape (C, H, W) (module docstring)."""
    channels, d = int(shape[0]), math.prod(int(s) for s in shape)
    if channels == 1:
        return {"linf": 0.3, "l2": round(2.0 * math.sqrt(d / 784), 4)}
    return {"linf": round(8 / 255, 6), "l2": round(0.5 * math.sqrt(d / 3072), 4)}


def check_eps(eps: Mapping[str, float]) -> dict[str, float]:
    """Budgets keyed by linf / l2, each a finite number > 0."""
    out = {}
    for norm, value in eps.items():
        if norm not in NORMS:
            raise RobustlabError(f"compress measures linf and l2 budgets, not {norm}")
        if not (math.isfinite(value) and value > 0):
            raise RobustlabError(f"the {norm} budget must be a finite number > 0, got {value}")
        out[norm] = float(value)
    return out


def check_alignment_points(points: int | None, n: int) -> int:
    """How many points the alignment term is measured on: ``points`` capped at ``n`` (None:
    all; 0: none), refused if negative."""
    if points is None:
        return n
    if isinstance(points, bool) or not isinstance(points, int) or points < 0:
        raise RobustlabError(f"the alignment points must be a whole number >= 0, got {points!r}")
    return min(points, n)


def _timed(seconds: dict[str, float], key: str, started: float) -> float:
    """Add the time since ``started`` to ``seconds[key]``; returns now."""
    now = time.perf_counter()
    seconds[key] = seconds.get(key, 0.0) + now - started
    return now


def compress_record(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: Mapping[str, float] | None = None,
    kappas: Sequence[float] = DEFAULT_KAPPAS,
    steps: int = 100,
    seed: int = 0,
    alignment_points: int | None = ALIGNMENT_POINTS,
) -> dict[str, Any]:
    """Everything ``robustlab compress`` reports for ``model`` on the batch ``(x, y)``.

    Keys: ``layers``, ``network``, ``bound`` and ``gap`` (keyed by threat model; ``bound``
    holds ``{"refused": sentence}`` for a model the bound does not cover), ``bound_holds``,
    ``representations``, ``kappas``, ``n``, ``alignment_points`` and ``seconds`` (the clean
    forward pass, SVDs and weight metrics, bound, alignment, attack, representations with
    the adversarial pass, total). The alignment term is measured on the first
    ``alignment_points`` points (None: all; 0: skipped, ``alignment`` then null).
    """
    check_batch(x, y, None)
    kappas = check_kappas(kappas)
    budgets = check_eps(eps if eps is not None else default_eps(tuple(x.shape[1:])))
    points = check_alignment_points(alignment_points, len(y))
    seconds: dict[str, float] = {}
    start = t = time.perf_counter()
    clean_reps, clean_logits = representations_and_logits(model, x)
    t = _timed(seconds, "forward", t)
    layers = layer_metrics(model, kappas)
    t = _timed(seconds, "svd", t)
    bound: dict[str, Any] = {}
    try:
        found = robustness_bounds(model, layers, tuple(x.shape[1:]), budgets, kappas[0])
    except RobustlabError as exc:
        found = {}
        bound = {norm: {"norm": norm, "eps": e, "refused": str(exc)} for norm, e in budgets.items()}
    t = _timed(seconds, "bound", t)
    gains = local_gains(model, x[:points], tuple(found)) if found and points else {}
    for norm, b in found.items():
        bound[norm] = (with_alignment(b, gains) if gains else b).to_dict()
    t = _timed(seconds, "alignment", t)
    x_adv = {
        norm: attack_for_gap(model, x, y, norm, e, steps=steps, seed=seed)
        for norm, e in budgets.items()
    }
    t = _timed(seconds, "attack", t)
    # one pass over every adversarial batch: their representations and the gap's losses
    adv_reps, adv_logits = representations_and_logits(model, torch.cat(list(x_adv.values())))
    n = len(y)
    gaps, shifted = {}, {}
    for i, (norm, xa) in enumerate(x_adv.items()):
        part = slice(i * n, (i + 1) * n)
        gaps[norm] = gap_from_logits(
            norm, budgets[norm], steps, y, clean_logits, adv_logits[part], xa
        )
        shifted[norm] = {name: z[part] for name, z in adv_reps.items()}
    reps = representation_rows(clean_reps, shifted)
    _timed(seconds, "representations", t)
    seconds["total"] = time.perf_counter() - start
    holds = {
        n: bool(bound[n]["bound"] >= gaps[n].gap_max) for n in gaps if "bound" in bound.get(n, {})
    }
    return {
        "kind": "compress",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n": int(len(y)),
        "kappas": list(kappas),
        "q": 2,
        "threat_models": budgets,
        "layers": [m.to_dict() for m in layers],
        "network": network_summary(layers),
        "bound": bound,
        "gap": {n: g.to_dict() for n, g in gaps.items()},
        "bound_holds": holds,
        "alignment_points": points,
        "representations": reps,
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
    }

"""Early-exit efficiency: threshold calibration, exit distribution, average FLOPs, efficacy
and measured latency.

Thresholds are calibrated on a held-out calibration split (:func:`calibrate`), never on test:
per allowed relative accuracy drop, the cheapest threshold that keeps the early-exit accuracy.

Efficacy (DeepSloth, Hong et al. 2021) is the area under the curve "fraction of inputs that
have exited" against "cost paid, as a fraction of the cost of the full multi-exit network".
With the exact (step) curve, an input leaving at normalised cost c contributes (1 - c), so

    efficacy = sum_k fraction_k * (1 - cost_k / cost_final) = 1 - average cost / cost_final,

in [0, 1]: 0 when every input runs to the final exit, 1 - c_1 when all leave at the first IC.
The reference code joins the points (0, 0), (c_k, cumulative fraction_k) with straight lines
(trapezoids) instead; that value is reported as ``efficacy_trapezoid`` for comparison with
published numbers (it is 0.5 * (1 - c_{K-1}) rather than 0 when no input exits early).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..core.guard import evaluating
from ..data import Dataset
from ..errors import RobustlabError
from ..models.engine import EngineChoice, inference_engine
from ..models.multiexit import (
    MultiExitNetwork,
    check_rule,
    check_threshold,
    exit_predictions,
    first_exit,
    head_flops,
    unit_flops,
)


def exit_fractions(exits: torch.Tensor, num_exits: int) -> list[float]:
    """Fraction of inputs leaving at each exit (ICs in order, the final exit last)."""
    if len(exits) == 0:
        raise RobustlabError("no inputs to compute an exit distribution from")
    counts = torch.bincount(exits.flatten().cpu(), minlength=num_exits)[:num_exits]
    return [float(c) / len(exits) for c in counts]


def _check_curve(fractions: Sequence[float], costs: Sequence[float]) -> None:
    """Refuse an exit distribution and cost list that do not describe one network."""
    if len(fractions) != len(costs) or not fractions:
        raise RobustlabError(
            f"need one fraction per exit cost, got {len(fractions)} fractions and {len(costs)} costs"
        )
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise RobustlabError(f"exit fractions must be >= 0 and sum to 1, got {list(fractions)}")
    if any(c <= 0 for c in costs) or any(b < a for a, b in zip(costs, costs[1:], strict=False)):
        raise RobustlabError(f"exit costs must be positive and non-decreasing, got {list(costs)}")


def efficacy(fractions: Sequence[float], costs: Sequence[float], method: str = "step") -> float:
    """Area under fraction-exited vs normalised-cost, in [0, 1] (see the module docstring).

    ``costs`` are the cumulative costs of the exits (any unit; the last is the full network);
    ``method`` is ``step`` (exact, = 1 - mean normalised cost) or ``trapezoid`` (reference code).
    """
    _check_curve(fractions, costs)
    c = [x / costs[-1] for x in costs]
    if method == "step":
        return float(sum(f * (1 - ck) for f, ck in zip(fractions, c, strict=True)))
    if method == "trapezoid":
        xs, ys, running = [0.0], [0.0], 0.0
        for f, ck in zip(fractions, c, strict=True):
            running += f
            xs.append(ck)
            ys.append(running)
        ys[-1] = 1.0
        return float(sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1)))
    raise RobustlabError(f"unknown efficacy method '{method}'; use step or trapezoid")


def efficacy_curve(
    fractions: Sequence[float], costs: Sequence[float]
) -> tuple[list[float], list[float]]:
    """The step curve's corners: normalised cost (x) and cumulative fraction exited (y)."""
    _check_curve(fractions, costs)
    xs, ys, running = [0.0], [0.0], 0.0
    for f, cost in zip(fractions, costs, strict=True):
        xs += [cost / costs[-1], cost / costs[-1]]
        ys += [running, running + f]
        running += f
    return xs, ys


LATENCY_ENGINE = "torch: the model as deployed, early exit in eager PyTorch"


@dataclass
class EfficiencyRecord:
    """How a multi-exit network spends its computation on a set of inputs."""

    n: int
    rule: str
    threshold: float
    exit_names: list[str]
    exit_counts: list[int]
    exit_fractions: list[float]
    exit_flops: list[int]
    avg_flops: float
    backbone_flops: int
    flops_saving: float
    efficacy: float
    efficacy_trapezoid: float
    accuracy_final: float
    accuracy_early_exit: float
    latency_ms: float
    latency_full_ms: float
    latency_saving: float
    latency_samples: int
    latency_batch_size: int
    extra: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] | None = None  # what ran the exits' predictions, and why
    latency_engine: str = LATENCY_ENGINE

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def early_exit_all(
    model: MultiExitNetwork,
    x: torch.Tensor,
    threshold: float | None = None,
    rule: str | None = None,
    batch_size: int = 250,
    engine: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, EngineChoice]:
    """Early-exit predictions, exits taken and final-exit predictions for ``x``, in batches,
    and the engine that ran them.

    Every exit's logits come from one pass (``output="all"``, through ``engine``: ONNX
    Runtime where it exports and is faithful, :mod:`robustlab.models.engine`); each input
    then takes the first exit whose confidence reaches the threshold, as
    :meth:`MultiExitNetwork.early_exit` decides (a confidence within float rounding of the
    threshold may decide otherwise there). The FLOPs and latency of early exit are measured
    on the model itself, not here.
    """
    q = model.threshold if threshold is None else check_threshold(threshold)
    rule = model.rule if rule is None else check_rule(rule)
    device = next(model.parameters()).device
    with model.outputs("all"), inference_engine(model, x[:batch_size].to(device), engine) as choice:
        scores, preds = exit_predictions(model, x, rule, batch_size)
    taken = first_exit(scores, q)
    early = preds[torch.arange(len(preds)), taken]
    return early, taken, preds[:, -1], choice


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op CPU threads (None: leave as is), restored afterwards."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def measure_latency(
    model: MultiExitNetwork,
    x: torch.Tensor,
    threshold: float | None = None,
    rule: str | None = None,
    batch_size: int = 1,
    full: bool = False,
    *,
    warmup: int = 5,
    repeats: int = 3,
    threads: int | None = 1,
) -> float:
    """Wall-clock milliseconds per input of early-exit inference (or of the backbone alone).

    The median over ``repeats`` passes over ``x``. By default on one CPU thread: batch-1
    inference of small networks is fastest there, and stable on a shared machine (several
    threads spin-wait for each other when the cores are busy).
    """
    if len(x) == 0:
        raise RobustlabError("no inputs to time")
    device = next(model.parameters()).device
    batches = [x[i : i + batch_size].to(device) for i in range(0, len(x), batch_size)]

    def run(xb: torch.Tensor) -> None:
        if full:
            model.final(xb)
        else:
            model.early_exit(xb, threshold, rule)

    times = []
    with _threads(threads if device.type == "cpu" else None):
        for xb in batches[:warmup]:
            run(xb)
        for _ in range(max(1, repeats)):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for xb in batches:
                run(xb)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(1000 * (time.perf_counter() - t0) / len(x))
    return float(statistics.median(times))


@dataclass(frozen=True)
class Latency:
    """Wall-clock milliseconds per input of early exit and of the backbone alone, as timed."""

    ms: float = 0.0
    full_ms: float = 0.0
    samples: int = 0  # inputs timed (0: not timed)
    batch_size: int = 1


def time_exits(
    model: MultiExitNetwork,
    x: torch.Tensor,
    threshold: float | None = None,
    rule: str | None = None,
    *,
    samples: int = 200,
    batch_size: int = 1,
) -> Latency:
    """The latency of early exit and of the backbone alone on the first ``samples`` inputs of
    ``x`` (0: nothing is timed), the model in eval mode and restored afterwards."""
    timed = x[: max(0, samples)]
    if not len(timed):
        return Latency(batch_size=batch_size)
    with evaluating(model):
        ms = measure_latency(model, timed, threshold, rule, batch_size)
        full = measure_latency(model, timed, threshold, rule, batch_size, full=True)
    return Latency(ms, full, len(timed), batch_size)


def efficiency_record(
    model: MultiExitNetwork,
    early: torch.Tensor,
    exits: torch.Tensor,
    finals: torch.Tensor,
    y: torch.Tensor,
    threshold: float,
    rule: str,
    latency: Latency,
    engine: EngineChoice | None = None,
) -> EfficiencyRecord:
    """The efficiency record of per-input outcomes: each input's early-exit prediction, the
    exit it takes and its final exit's prediction (:func:`early_exit_all`), and its label."""
    if len(exits) == 0 or not len(early) == len(exits) == len(finals) == len(y):
        raise RobustlabError(f"need one outcome per label, got {len(exits)} and {len(y)}")
    costs = model.exit_costs()
    backbone = sum(unit_flops(model)) + head_flops(model)
    exits = exits.cpu()
    fractions = exit_fractions(exits, model.num_exits)
    counts = [int(c) for c in torch.bincount(exits, minlength=model.num_exits)]
    avg = float(sum(f * c for f, c in zip(fractions, costs, strict=True)))
    y = y.cpu()
    full = latency.full_ms
    return EfficiencyRecord(
        n=len(exits),
        rule=rule,
        threshold=threshold,
        exit_names=model.exit_names(),
        exit_counts=counts,
        exit_fractions=fractions,
        exit_flops=costs,
        avg_flops=avg,
        backbone_flops=backbone,
        flops_saving=1 - avg / backbone,
        efficacy=efficacy(fractions, costs),
        efficacy_trapezoid=efficacy(fractions, costs, "trapezoid"),
        accuracy_final=float((finals.cpu() == y).float().mean()),
        accuracy_early_exit=float((early.cpu() == y).float().mean()),
        latency_ms=latency.ms,
        latency_full_ms=full,
        latency_saving=1 - latency.ms / full if full > 0 else 0.0,
        latency_samples=latency.samples,
        latency_batch_size=latency.batch_size,
        engine=None if engine is None else engine.as_dict(),
    )


def measure_efficiency(
    model: MultiExitNetwork,
    x: torch.Tensor,
    y: torch.Tensor,
    threshold: float | None = None,
    rule: str | None = None,
    *,
    batch_size: int = 250,
    latency_samples: int = 200,
    latency_batch_size: int = 1,
    engine: str = "auto",
) -> EfficiencyRecord:
    """Exit distribution, FLOPs, efficacy, accuracies and latency of early exit on ``(x, y)``.

    The model's modes are restored afterwards. ``latency_samples`` = 0 skips the timing.
    Predictions and exits come through ``engine`` (:func:`early_exit_all`); latency is
    always that of the model as deployed: batched early exit in eager PyTorch.
    """
    if len(x) == 0 or len(x) != len(y):
        raise RobustlabError(f"need inputs with one label each, got {len(x)} and {len(y)}")
    q = model.threshold if threshold is None else check_threshold(threshold)
    rule = model.rule if rule is None else check_rule(rule)
    with evaluating(model):
        preds, exits, finals, choice = early_exit_all(model, x, q, rule, batch_size, engine)
    latency = time_exits(model, x, q, rule, samples=latency_samples, batch_size=latency_batch_size)
    return efficiency_record(model, preds, exits, finals, y, q, rule, latency, choice)


# -- threshold calibration -----------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """Thresholds chosen on a calibration split, one per allowed relative accuracy drop."""

    rule: str
    thresholds: dict[str, float]
    final_accuracy: float
    early_accuracy: dict[str, float]
    avg_cost_fraction: dict[str, float]
    samples: int
    split: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def check_drops(drops: Sequence[float]) -> None:
    """Refuse a relative accuracy drop outside [0, 1) with one sentence."""
    for d in drops:
        if not 0 <= d < 1:
            raise RobustlabError(f"a relative accuracy drop must lie in [0, 1), got {d}")


def drop_key(drop: float) -> str:
    """The key of a relative accuracy drop, e.g. 0.05 -> '5%'."""
    return f"{100 * drop:g}%"


def simulate(
    scores: torch.Tensor, preds: torch.Tensor, y: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exit taken and whether it is right, per input, for a threshold (same rule as early_exit)."""
    exits = first_exit(scores, threshold)
    taken = preds.gather(1, exits[:, None])[:, 0]
    return exits, taken == y


def calibrate(
    model: MultiExitNetwork,
    data: Dataset | None,
    drops: Sequence[float] = (0.05, 0.15),
    rule: str | None = None,
    batch_size: int = 500,
) -> Calibration:
    """Per allowed relative accuracy drop, the cheapest threshold whose early-exit accuracy on
    the calibration split stays >= (1 - drop) x the final exit's accuracy there."""
    if data is None or len(data) == 0:
        raise RobustlabError(
            "threshold calibration needs a non-empty calibration split (never the test set)"
        )
    check_drops(drops)
    rule = check_rule(rule or model.rule)
    scores, preds = exit_predictions(model, data.x, rule, batch_size)
    y = data.y.cpu()
    final_acc = float((preds[:, -1] == y).float().mean())
    costs = torch.tensor(model.exit_costs(), dtype=torch.float64)
    costs = costs / costs[-1]
    values = torch.unique(scores.flatten())
    if len(values) > 4000:
        values = torch.quantile(values.double(), torch.linspace(0, 1, 4000).double()).float()
    candidates = sorted({*values[values > 0].tolist(), 1.0})
    table = []
    for q in candidates:
        exits, right = simulate(scores, preds, y, q)
        table.append((q, float(right.float().mean()), float(costs[exits].mean())))
    thresholds, accs, cost_fraction = {}, {}, {}
    for d in drops:
        ok = [row for row in table if row[1] >= (1 - d) * final_acc - 1e-12]
        q, acc, cost = min(ok, key=lambda r: (r[2], -r[1], -r[0])) if ok else table[-1]
        key = drop_key(d)
        thresholds[key], accs[key], cost_fraction[key] = q, acc, cost
    return Calibration(rule, thresholds, final_acc, accs, cost_fraction, len(data), data.name)

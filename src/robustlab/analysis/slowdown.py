"""Slowdown runs: where a multi-exit network's inputs leave it, clean and perturbed (DeepSloth
and its baselines), in batches shared among the processes of a torchrun run.

A run measures, on the first ``total`` points of a data set, the exit each clean input takes
and the exit each *variant*'s perturbed input takes (per-sample DeepSloth, the PGD
baselines, a universal perturbation, a black-box transfer; :data:`Perturb`). The points go
in batches of ``batch_size``, and each batch is perturbed and measured on its own: the global
generator is seeded with ``seed + start`` before it (as
:func:`~robustlab.evaluate.sharded.attack_batches` does) and an attack variant runs with its
own seed plus the batch's start (:func:`attack_variant`), so no random draw is carried from
one batch to the next. Under torchrun, process ``r`` of ``W`` takes the whole batches whose
number ``b`` has ``b % W == r`` (:mod:`robustlab.evaluate.sharded`): the merged per-sample
exits and predictions, and every efficiency number made from them, equal one process's run
with the same seed and batch size, sample for sample (one thread per process, the same
engine, which rank 0 chooses for all). Latency is wall-clock time: rank 0 alone times the
first inputs of each variant after the merge, as one process does, and hands the numbers to
the others.

Universal and class-universal perturbations are optimised over a whole crafting set and do
not split into batches: a universal perturbation is crafted by rank 0 alone
(:func:`shared_universal`), class-universal ones class by class, the classes shared round
robin (:func:`shared_class_universal`: each class's is crafted on that class alone, so
exactly as one process crafts it). Only applying and measuring them on the test points is
shared by batch. A slowdown run keeps no progress file: a killed run starts over.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..attacks.base import Attack
from ..core.distributed import Processes, all_gather, together
from ..data import Dataset
from ..errors import RobustlabError
from ..evaluate.progress import run_key
from ..evaluate.robust import checked_points
from ..evaluate.sharded import (
    Batch,
    attack_batches,
    merged,
    on_rank_zero,
    open_shard,
    shard_bar,
    shared_engine,
)
from ..models.engine import EngineChoice
from ..models.multiexit import MultiExitNetwork
from .efficiency import (
    EfficiencyRecord,
    Latency,
    early_exit_all,
    efficiency_record,
    time_exits,
)

CLEAN = "clean"
"""The label of the unperturbed inputs, measured first."""

Perturb = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""A variant: the inputs it measures for one batch ``(x, y)`` whose first point is number
``start`` (which seeds the batch's random draws)."""


@dataclass
class Slowdown:
    """A slowdown run: per variant (clean first) its efficiency record, its per-sample
    outcomes and the seconds its perturbing took (summed over batches and processes)."""

    records: dict[str, EfficiencyRecord]
    exits: dict[str, list[int]]  # the exit each input takes
    early: dict[str, list[int]]  # its early-exit prediction
    final: dict[str, list[int]]  # its final exit's prediction
    seconds: dict[str, float]
    engine: EngineChoice
    world_size: int

    def per_sample(self) -> dict[str, dict[str, list[int]]]:
        """The per-sample outcomes, JSON-able: by outcome, then variant."""
        return {"exit": self.exits, "early_pred": self.early, "final_pred": self.final}


def attack_variant(attack: Attack, on: nn.Module) -> Perturb:
    """A variant whose inputs are ``attack``'s examples crafted on ``on`` (the measured model,
    or a surrogate), each batch's with the attack's seed plus the batch's start."""
    if not hasattr(attack, "seed"):
        raise TypeError(f"{type(attack).__name__} has no seed to give each batch its own")
    frozen: Any = attack  # a frozen dataclass with a seed field

    def perturb(x: torch.Tensor, y: torch.Tensor, start: int) -> torch.Tensor:
        """The examples of one batch."""
        x_adv: torch.Tensor = replace(frozen, seed=frozen.seed + start)(on, x, y)
        if not bool(attack.threat.contains(x, x_adv).all()):
            raise RuntimeError(f"{type(attack).__name__} left its threat model: a bug")
        return x_adv

    return perturb


def shared_universal(
    processes: Processes, craft: Callable[[], torch.Tensor], device: torch.device | str
) -> torch.Tensor:
    """A universal perturbation (``craft()``), crafted by rank 0 alone, on every process
    (on ``device``)."""
    found: torch.Tensor = on_rank_zero(processes, lambda: craft().cpu())
    return found.to(device)


def shared_class_universal(
    processes: Processes, craft: Callable[[list[int]], torch.Tensor], num_classes: int
) -> torch.Tensor:
    """Class-universal perturbations on every process, each process crafting its round-robin
    share of the classes (``craft(classes)``: the perturbations of those classes, zero for the
    others)."""
    with together(processes):
        mine = craft([c for c in range(num_classes) if processes.owns(c)])
    parts = all_gather(processes, mine.cpu())
    deltas = mine.clone()
    for c in range(num_classes):
        deltas[c] = parts[c % processes.world_size][c].to(mine.device)
    return deltas


def measure_slowdown(
    model: MultiExitNetwork,
    data: Dataset,
    total: int,
    variants: dict[str, Perturb],
    *,
    batch_size: int,
    seed: int = 0,
    config: object = None,
    others: Sequence[nn.Module] = (),
    latency_samples: int = 200,
    engine: str = "auto",
    progress: bool = False,
    processes: Processes | None = None,
) -> Slowdown:
    """Early exit on the first ``total`` points of ``data``, clean and under each variant,
    in batches of ``batch_size`` shared among torchrun's ``processes`` (see the module).

    ``config`` (JSON-able) and ``others`` (models the variants craft on, e.g. a surrogate)
    make, with ``model`` and the points, the run key every process must share. The first
    ``latency_samples`` inputs of each variant are timed by rank 0. Every process returns
    the same result.
    """
    processes = processes or Processes()
    with together(processes):
        total = checked_points(data, total, batch_size)
        if CLEAN in variants:
            raise RobustlabError(f"a variant may not be called '{CLEAN}'")
    labels = [CLEAN, *variants]
    device = next(model.parameters()).device
    q, rule = model.threshold, model.rule

    def key() -> str:
        """The run key: the model, the models the variants craft on, points, configuration."""
        models = nn.ModuleList([model, *others])
        return run_key([], models, data, total, batch_size, seed, [labels, q, rule, config])

    shard = open_shard(processes, data, total, batch_size, len(labels), key, None)

    def one_batch(start: int, end: int) -> Batch:
        """Each variant's inputs of one batch, where they exit, and the first to be timed."""
        x, y = data.x[start:end].to(device), data.y[start:end].to(device)
        entry: Batch = {"start": start, "outcomes": {}, "seconds": {}, "timed": {}}
        for label in labels:
            t0 = time.perf_counter()
            inputs = x if label == CLEAN else variants[label](x, y, start)
            entry["seconds"][label] = time.perf_counter() - t0
            early, exits, finals, _ = early_exit_all(model, inputs, q, rule, batch_size, engine)
            entry["outcomes"][label] = (early.tolist(), exits.tolist(), finals.tolist())
            entry["timed"][label] = inputs[: max(0, latency_samples - start)].cpu()
        return entry

    with ExitStack() as stack:
        probe = data.x[: min(total, batch_size)].to(device)
        with model.outputs("all"):  # the engine runs every exit's logits (early_exit_all)
            choice = stack.enter_context(shared_engine(processes, model, probe, engine))
        bar = stack.enter_context(shard_bar(shard, "sloth", progress))
        attack_batches(shard, seed, one_batch, bar.update)
    done, _ = merged(shard)
    batches = [done[start] for start in sorted(done)]
    outcomes = {
        label: [[v for b in batches for v in b["outcomes"][label][k]] for k in range(3)]
        for label in labels
    }  # per variant: early-exit predictions, exits, final predictions

    def latencies() -> dict[str, Latency]:
        """Each variant's latency on its first inputs, timed here."""
        found = {}
        for label in labels:
            timed = torch.cat([b["timed"][label] for b in batches]).to(device)
            found[label] = time_exits(model, timed, q, rule, samples=latency_samples)
        return found

    latency: dict[str, Latency] = on_rank_zero(processes, latencies)
    y = data.y[:total]
    records = {}
    for label in labels:
        early, exits, finals = (torch.tensor(o) for o in outcomes[label])
        records[label] = efficiency_record(
            model, early, exits, finals, y, q, rule, latency[label], choice
        )
    return Slowdown(
        records=records,
        exits={label: outcomes[label][1] for label in labels},
        early={label: outcomes[label][0] for label in labels},
        final={label: outcomes[label][2] for label in labels},
        seconds={label: sum(b["seconds"][label] for b in batches) for label in labels},
        engine=choice,
        world_size=processes.world_size,
    )

"""An evaluation's batches shared among the processes of a torchrun run, and merged again.

An evaluation attacks its points in batches of ``batch_size``. Each batch is independent of
the others: the global generator is seeded with ``seed + start`` before it, and the attacks
draw from generators of their own, seeded per call. Under torchrun, process ``r`` of ``W``
therefore attacks the whole batches whose number ``b`` has ``b % W == r`` (round robin) and
gets, for each, exactly what one process gets for it; the merged result equals a single
process's run with the same seed and batch size, sample for sample, when every process runs
with the same engine, device kind and thread count.

What must be the same on every process is decided once: rank 0 chooses the inference engine
(``auto`` decides by a timing probe, which could differ between processes) and computes the
gradient-masking warnings, then hands both to the others; the run key (model, points,
configuration) is compared across processes, so processes that were given different
checkpoints or data stop with one sentence. Each process keeps its finished batches in a
progress file of its own (``progress.open_progress``); a killed run resumes from them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..core.distributed import Processes, all_gather, broadcast, check_share, together
from ..data import Dataset
from ..errors import RobustlabError
from ..models.engine import EngineChoice, inference_engine
from .progress import append, open_progress

Batch = dict[str, Any]
"""One finished batch as its progress-file line: ``start``, per-eps rows and timings."""
#: What a batch is called when there are too few to share (``check_share``): one, several.
BATCH_NAMES = ("evaluation batch", "evaluation batches")


@dataclass
class Shard:
    """This process's share of an evaluation's batches, and those it has finished."""

    processes: Processes
    total: int  # points of the whole evaluation
    batch_size: int
    path: Path | None = None  # this process's progress file (None: no resume)
    done: dict[int, Batch] = field(default_factory=dict)  # by start; this process's own
    resumed: int = 0  # of them, how many an earlier run had finished

    def batches(self) -> Iterator[tuple[int, int]]:
        """(start, end) of each batch this process attacks, in order."""
        for number, start in enumerate(range(0, self.total, self.batch_size)):
            if self.processes.owns(number):
                yield start, min(self.total, start + self.batch_size)

    def points(self) -> int:
        """How many points this process's batches hold."""
        return sum(end - start for start, end in self.batches())


def shard_bar(shard: Shard, name: str, progress: bool, task: str = "eval") -> tqdm[Any]:
    """The progress bar of this process's share of an evaluation (``task``: what the bar says
    it is): shown by rank 0 alone (``progress``: shown at all), in points."""
    processes = shard.processes
    desc = f"{task} {name}"
    return tqdm(
        total=shard.points(),
        desc=desc if not processes.distributed else f"{desc} (rank 0's share)",
        disable=not progress or not processes.main,
        file=sys.stderr,
        unit="pt",
        leave=False,
    )


def open_shard(
    processes: Processes,
    data: Dataset,
    total: int,
    batch_size: int,
    entries: int,
    key: Callable[[], str],
    resume: Path | None,
    check: Callable[[Path, dict[int, Batch]], None] | None = None,
) -> Shard:
    """This process's shard of an evaluation of ``total`` points in batches of ``batch_size``
    (``entries``: eps per batch), with the batches an earlier run left in its progress file
    (``resume``: the run's progress path). Every process must get at least one batch, and
    every process must evaluate the same run (``key()``: model, points, configuration);
    ``check`` refuses stored batches its caller finds damaged. Any failure stops every
    process, said once."""
    batches = -(-total // batch_size)
    with together(processes):
        check_share(
            processes,
            batches,
            BATCH_NAMES,
            "use a smaller batch size",
        )
        mine = key() if resume is not None or processes.distributed else ""
    keys = all_gather(processes, mine)
    shard = Shard(processes, total, batch_size)
    with together(processes):
        differ = [rank for rank, k in enumerate(keys) if k != keys[0]]
        if differ:
            raise RobustlabError(
                f"process {differ[0]} of the run evaluates another model, other points or "
                "another configuration than process 0: every process must be given the same "
                "checkpoint, data and options"
            )
        if resume is not None:
            shard.path, shard.done = open_progress(
                resume, mine, data, total, batch_size, entries, processes
            )
            if check is not None:
                check(shard.path, shard.done)
            shard.resumed = len(shard.done)
    return shard


@contextmanager
def shared_engine(
    processes: Processes, model: nn.Module, probe: torch.Tensor, engine: str
) -> Iterator[EngineChoice]:
    """The inference engine of every process's forward-only passes, chosen by rank 0 (as
    ``models.engine.inference_engine`` chooses) and followed by the others."""
    with ExitStack() as stack:
        chosen = None
        with together(processes):
            if processes.main:
                chosen = stack.enter_context(inference_engine(model, probe, engine))
        choice = broadcast(processes, chosen)
        assert choice is not None  # rank 0 chose, or stopped the run
        with together(processes):
            if not processes.main:
                stack.enter_context(inference_engine(model, probe, choice.engine, announce=False))
        yield choice


def on_rank_zero(processes: Processes, compute: Callable[[], Any]) -> Any:
    """``compute()`` on rank 0, its value on every process (the others do not compute it); a
    failure stops every process, said once."""
    value = None
    with together(processes):
        if processes.main:
            value = compute()
    return broadcast(processes, value)


def attack_batches(
    shard: Shard, seed: int, attack: Callable[[int, int], Batch], done: Callable[[int], None]
) -> None:
    """Attack each of this process's batches not yet finished, seeded by its start
    (``attack(start, end)``), and record it in the progress file; ``done(points)`` after
    each batch (a progress bar)."""
    for start, end in shard.batches():
        if start not in shard.done:
            torch.manual_seed(seed + start)
            shard.done[start] = attack(start, end)
            if shard.path is not None:
                append(shard.path, shard.done[start])
        done(end - start)


def merged(shard: Shard) -> tuple[dict[int, Batch], int]:
    """Every process's finished batches, on every process, and how many of them were
    resumed from progress files."""
    parts = all_gather(shard.processes, (shard.done, shard.resumed))
    batches: dict[int, Batch] = {}
    for done, _ in parts:
        batches.update(done)
    expected = set(range(0, shard.total, shard.batch_size))
    if set(batches) != expected:
        raise RuntimeError(f"merged batches {sorted(batches)} are not {sorted(expected)}: a bug")
    return batches, sum(resumed for _, resumed in parts)

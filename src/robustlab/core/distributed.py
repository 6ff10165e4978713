"""torchrun: which process this is, its process group (gloo on CPU, NCCL on CUDA), and which
share of a run's work is its own.

``torchrun --nproc_per_node N -m robustlab CMD ...`` starts N copies of a command with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their
environment; :func:`start` reads them and joins the group. Without them (a plain
``robustlab CMD``) the run is one process: rank 0 of a world of 1, no process group.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

from ..errors import RobustlabError, RunStopped, StatedByRankZero

#: The environment variables torchrun sets for every process it starts.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes of one run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: one process, no process group

    @property
    def distributed(self) -> bool:
        """Whether other processes share this run (a process group was joined)."""
        return self.backend is not None

    @property
    def main(self) -> bool:
        """Whether this process writes the run's shared outputs (rank 0)."""
        return self.rank == 0

    def owns(self, item: int) -> bool:
        """Whether item number ``item`` (a batch, a shard) is this process's: round robin."""
        return item % self.world_size == self.rank

    def as_dict(self) -> dict[str, object]:
        """What records state about the processes that produced them."""
        return {"world_size": self.world_size, "backend": self.backend}


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (its variables are in the environment)."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def _int_variable(name: str) -> int:
    """One of torchrun's integer variables, or one sentence saying it is malformed."""
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise RobustlabError(f"environment variable {name}={value!r} is not an integer") from None


def process_device(device: str, local_rank: int) -> str:
    """The device of one process: CUDA processes of a node take one GPU each by local rank."""
    if device == "cuda" and torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return device


def start(device: str, timeout_s: float = 1800.0) -> tuple[Processes, str]:
    """Join the run's process group if torchrun started this process; this process's place
    and device. The backend is NCCL on CUDA devices and gloo otherwise."""
    if not launched_by_torchrun():
        return Processes(), device
    rank, world = _int_variable("RANK"), _int_variable("WORLD_SIZE")
    local = _int_variable("LOCAL_RANK")
    if world < 1 or not 0 <= rank < world:
        raise RobustlabError(f"torchrun gave rank {rank} of a world of {world} processes")
    if world == 1:
        return Processes(), device
    device = process_device(device, local)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return Processes(rank, world, local, backend), device


def stop(processes: Processes) -> None:
    """Leave the process group this run joined (nothing for one process)."""
    if processes.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def processes_of_run(device: str, timeout_s: float = 1800.0) -> Iterator[tuple[Processes, str]]:
    """``start`` on entry and ``stop`` on exit, also when the run fails."""
    processes, device = start(device, timeout_s)
    try:
        yield processes, device
    finally:
        stop(processes)


# -- what the processes of a run exchange, say together, and keep apart -----------------------


@contextmanager
def _exchange() -> Iterator[None]:
    """An exchange between processes: one that breaks means another process is gone (it
    failed, or the run is being stopped), which ends this one as a stop does."""
    try:
        yield
    except RuntimeError as exc:  # torch's DistBackendError and gloo's lost connections
        raise RunStopped(str(exc)) from exc


def broadcast(processes: Processes, obj: T) -> T:
    """Rank 0's ``obj``, on every process (itself for one process)."""
    if not processes.distributed:
        return obj
    box: list[Any] = [obj]
    with _exchange():
        dist.broadcast_object_list(box, src=0)
    return cast(T, box[0])


def all_gather(processes: Processes, obj: T) -> list[T]:
    """Every process's ``obj``, in rank order, on every process."""
    if not processes.distributed:
        return [obj]
    found: list[Any] = [None] * processes.world_size
    with _exchange():
        dist.all_gather_object(found, obj)
    return found


@contextmanager
def together(processes: Processes) -> Iterator[None]:
    """A block every process of the run runs: when it fails on any of them, it fails on all,
    and one sentence says why (rank 0 prints it, naming the process where it failed; the
    others exit silently). The block must not itself exchange anything between processes."""
    if not processes.distributed:
        yield
        return
    failure: Exception | None = None
    try:
        yield
    except Exception as exc:  # every process must reach the exchange below
        failure = exc
    said = None
    if failure is not None:
        said = str(failure) if isinstance(failure, RobustlabError) else repr(failure)
    failed = [(rank, text) for rank, text in enumerate(all_gather(processes, said)) if text]
    if not failed:
        return
    if failure is not None and not isinstance(failure, RobustlabError):
        raise failure  # a bug: its traceback, from the process it happened on
    rank, text = failed[0]
    if processes.main and failure is not None:
        raise failure
    if processes.main:
        raise RobustlabError(f"process {rank} of {processes.world_size}: {text}")
    raise StatedByRankZero(text) from failure


@contextmanager
def stop_on_sigterm(processes: Processes) -> Iterator[None]:
    """Within the block, SIGTERM (torchrun stopping the run's processes because one failed)
    raises :class:`RunStopped`, so the run ends as after an interrupt (finished work kept,
    one message) instead of vanishing; one process is left as it is."""
    if not processes.distributed:
        yield
        return

    def stopped(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop; its message is being said
        raise RunStopped

    before = signal.signal(signal.SIGTERM, stopped)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def check_share(processes: Processes, items: int, names: tuple[str, str], advice: str) -> None:
    """Every process must own at least one of ``items`` (round robin); one sentence if not.
    ``names``: what an item is called, one and several; ``advice``: how else to get more."""
    if processes.world_size > items:
        some = f"{items} {names[0] if items == 1 else names[1]}"
        raise RobustlabError(
            f"torchrun started {processes.world_size} processes but there is only {some} to "
            f"share among them: start at most {items}, or {advice}"
        )


def shard_path(path: Path, processes: Processes) -> Path:
    """The file in which this process keeps its shard of a run's file ``path``: ``path``
    itself for one process, ``NAME.rank<r>-of-<world size>.SUFFIX`` beside it otherwise."""
    if not processes.distributed:
        return path
    tag = f"rank{processes.rank}-of-{processes.world_size}"
    return path.with_name(f"{path.stem}.{tag}{path.suffix}")


def shard_files(path: Path) -> dict[Path, int]:
    """The files beside ``path`` that hold shards of it, each with the number of processes
    that wrote it (1: ``path`` itself)."""
    found = {path: 1} if path.exists() or path.is_symlink() else {}
    pattern = re.compile(re.escape(path.stem) + r"\.rank\d+-of-(\d+)" + re.escape(path.suffix))
    if path.parent.is_dir():
        for other in sorted(path.parent.iterdir()):
            match = pattern.fullmatch(other.name)
            if match:
                found[other] = int(match.group(1))
    return found

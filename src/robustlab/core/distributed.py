"""torchrun: which process this is, its process group (gloo on CPU, NCCL on CUDA), and which
share of a run's work is its own.

``torchrun --nproc_per_node N -m robustlab CMD ...`` starts N copies of a command with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their
environment; :func:`start` reads them and joins the group. Without them (a plain
``robustlab CMD``) the run is one process: rank 0 of a world of 1, no process group.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import RobustlabError

#: The environment variables torchrun sets for every process it starts.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


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
def processes_of_run(device: str) -> Iterator[tuple[Processes, str]]:
    """``start`` on entry and ``stop`` on exit, also when the run fails."""
    processes, device = start(device)
    try:
        yield processes, device
    finally:
        stop(processes)

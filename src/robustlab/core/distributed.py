"""torchrun: which process this is, its process group (gloo on CPU, NCCL on CUDA), and which
share of a run's work is its own.

``torchrun --nproc_per_node N -m robustlab CMD ...`` starts N copies of a command with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their
environment; :func:`start` reads them and joins the group. Without them (a plain
``robustlab CMD``) the run is one process: rank 0 of a world of 1, no process group.
"""

from __future__ import annotations

import hashlib
import os
import signal
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType
from typing import TypeVar

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


def sample_seed(seed: int, *keys: int) -> int:
    """The seed of one sample's random draws, from a run's seed and keys such as (step, sample
    index in the data set): the same whichever process, batch or position the sample is in."""
    packed = struct.pack(f"<{1 + len(keys)}q", seed, *keys)
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little")


def per_sample(
    x: torch.Tensor,
    seeds: Sequence[int],
    draw: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
) -> torch.Tensor:
    """``draw(x_i, generator)`` for each sample ``x_i`` (a batch of one) with a CPU generator
    seeded by its own seed, stacked on ``x``'s device: the same numbers on any device, in any
    batch and in any process."""
    if len(seeds) != len(x):
        raise ValueError(f"{len(seeds)} seeds for a batch of {len(x)} samples")
    cpu = x.detach().cpu()
    rows = [draw(cpu[i : i + 1], torch.Generator().manual_seed(s)) for i, s in enumerate(seeds)]
    return torch.cat(rows).to(x.device) if rows else torch.empty_like(x)


T = TypeVar("T")


def from_main(processes: Processes, obj: T) -> T:
    """Rank 0's ``obj`` on every process (pickled through the process group; one process: ``obj``).
    For what only rank 0 may read, such as a resume state on a disk the others do not share."""
    if not processes.distributed:
        return obj
    box: list[object] = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]  # rank 0 sent a T


def everyone(processes: Processes, flag: bool) -> bool:
    """Whether ``flag`` holds on every process, the same answer on all of them."""
    if not processes.distributed:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _collective_device() -> torch.device:
    """Where tensors of a collective must live: this process's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Stopped(RobustlabError):
    """This process was asked to stop (SIGTERM): torchrun sends it to every process of a run when
    one of them fails, and job schedulers when they cancel or preempt a job."""

    def __init__(self) -> None:
        super().__init__(
            "stopped by SIGTERM (torchrun sends it to every process when one of them fails; job "
            "schedulers when they cancel a job)"
        )


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    """SIGTERM handler: stop with :class:`Stopped` where the process is, unwinding cleanly."""
    raise Stopped()


#: What a process says when a collective failed because another process of the run went away.
PEER_FAILED = "another process of this torchrun run failed, so this one stopped too"


def peer_failed(exc: BaseException) -> bool:
    """Whether an error came from a collective whose other side went away (another process of
    the run died or was stopped): gloo's and NCCL's errors, as torch raises them."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        word in text for word in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset")
    )


def quiet_rank() -> bool:
    """Whether this process is one of torchrun's processes other than rank 0."""
    return launched_by_torchrun() and os.environ.get("RANK", "0").strip() != "0"


@contextmanager
def one_voice() -> Iterator[None]:
    """For a command's block: SIGTERM raises :class:`Stopped` (so a torn-down run unwinds, keeps
    its resume state and says why), and under torchrun only rank 0 speaks: on the other ranks a
    robustlab error or an interruption ends the process with the same exit code but silently,
    since every rank meets the same checks and rank 0 says them once. A collective that failed
    because another process went away becomes one sentence (``PEER_FAILED``). A torchrun
    process leaving the block with an error ignores further SIGTERMs (torchrun sends them to
    every process when one fails), so its one message gets out before it exits."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        yield
    except BaseException as exc:
        torchrun = launched_by_torchrun()
        if previous is not None and torchrun:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            previous = None
        peer = torchrun and peer_failed(exc)
        if quiet_rank() and (peer or isinstance(exc, (RobustlabError, KeyboardInterrupt))):
            raise SystemExit(130 if isinstance(exc, KeyboardInterrupt) else 2) from None
        if peer:
            raise RobustlabError(PEER_FAILED) from None
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

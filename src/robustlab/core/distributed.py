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
import re
import signal
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import FrameType
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


def everyone(processes: Processes, flag: bool) -> bool:
    """Whether ``flag`` holds on every process, the same answer on all of them."""
    return all(all_gather(processes, flag))


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

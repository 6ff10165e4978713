"""torchrun: which process this is, its process group (gloo on CPU, NCCL on CUDA), which
share of a run's work is its own, and how a run of several processes ends early.

``torchrun --nproc_per_node N -m robustlab CMD ...`` starts N copies of a command with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their
environment; :func:`start` reads them and joins the group. Without them (a plain
``robustlab CMD``) the run is one process: rank 0 of a world of 1, no process group.

How a run ends early: one design for every command, applied by ``cli.main`` (so commands do
not wrap themselves), the same for one process as for many.

- **An error** (:class:`~robustlab.errors.RobustlabError`) ends the command with exit status
  2 and one sentence. Under torchrun rank 0 alone says it: every process runs the same checks
  on the same input, so the others would repeat it; on them an error is the quiet signal,
  ending the process with status 2 and no word. A check that one process alone can fail (its
  own files, its own shard) runs in a :func:`together` block, which makes its failure every
  process's: each raises the run's error, rank 0's naming the process it happened on.
- **A stop** (:class:`~robustlab.errors.RunStopped`, one type, a ``KeyboardInterrupt`` so
  that ``except Exception`` blocks let it through) is a run ended from outside before its
  end. ``cli.main`` turns SIGTERM into it for every command (torchrun sends SIGTERM to the
  other processes when one fails; schedulers when they cancel a job), and an exchange broken
  because another process of the run went away (:func:`peer_failed`: gloo's and NCCL's
  errors) is one too: :func:`broadcast` and :func:`all_gather` raise it at once, training
  turns DDP's broken gradient exchange into it, and ``cli.main`` translates such an error
  wherever else it surfaces. A command that resumes raises it again with what it kept
  (``RunStopped(kept)``: training its last epoch's state, evaluation its progress files);
  ``cli.main`` says ``robustlab: stopped: WHY; KEPT; run the same command again to resume``
  (``robustlab: stopped: WHY`` when nothing was kept) and exits with 130, as after an
  interrupt (Ctrl-C). WHY is that the process received SIGTERM; under torchrun it is one
  sentence whether this process saw SIGTERM or a broken exchange (which comes first is a
  race): another process failed or the run was stopped, and torchrun's report names which.
- **Who speaks** for a stop or an interrupt: the process that claims the run's voice first
  (:func:`claim_voice`, a counter in torchrun's store, which lives in the launcher). Rank 0
  claims at once, the others after :data:`VOICE_GRACE_S`, so a stop is said once, by rank 0,
  or by a surviving process when rank 0 died without a word. Rank 0 claims the voice before
  it says an error too, so the processes stopped after it add nothing.
- One process (no torchrun) always speaks, and joins no store.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

from ..errors import RobustlabError, RunStopped

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
    """An exchange between processes: one that breaks because another process went away (it
    failed, or the run is being stopped) stops this one too."""
    try:
        yield
    except RuntimeError as exc:  # torch's DistBackendError and gloo's lost connections
        if peer_failed(exc):
            raise RunStopped from exc
        raise


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
    """A block every process of the run runs: when it fails on any of them, it fails on all
    with the same error (rank 0's names the process where it failed; on the others it is
    quiet, see the module's design). The block must not itself exchange anything between
    processes."""
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
    if failure is not None:
        raise failure  # a bug: its traceback, from the process it happened on
    rank, text = failed[0]
    raise RobustlabError(f"process {rank} of {processes.world_size}: {text}")


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


def peer_failed(exc: BaseException) -> bool:
    """Whether an error came from a collective whose other side went away (another process of
    the run died or was stopped): gloo's and NCCL's errors, as torch raises them."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        word in text for word in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset")
    )


#: Seconds a process other than rank 0 leaves rank 0 to say why the run ended, before it
#: claims the run's voice itself (torchrun waits 30 s before it kills stopped processes).
VOICE_GRACE_S = 2.0


def claim_voice(rank: int) -> bool:
    """Whether this process says why the run ended: the first process to claim the run's voice
    in torchrun's store does. Rank 0 claims at once, the others after ``VOICE_GRACE_S``, so
    they speak only when rank 0 died without a word. A store that cannot be reached went with
    the process that held it (rank 0, or the first node's launcher): then this process speaks.
    One process (no torchrun) always speaks."""
    if not launched_by_torchrun():
        return True
    if rank != 0:
        time.sleep(VOICE_GRACE_S)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # a restarted run speaks again
    try:
        # a client of the store torchrun's processes joined (torch re-exports TCPStore
        # without declaring it)
        store = dist.TCPStore(  # type: ignore[attr-defined]
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=5),
            wait_for_workers=False,
        )
        return int(store.add(f"robustlab/voice/{attempt}", 1)) == 1
    except (RuntimeError, ValueError, OSError):  # torch's DistStoreError is a RuntimeError
        return True

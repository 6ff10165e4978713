"""Real torchrun runs of robustlab for the tests: the command, its environment (this
checkout's code, one thread per process), a free rendezvous port, and launchers run to
their end with a timeout so a hung run fails its test instead of the suite."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
TIMEOUT_S = 240  # a torchrun run here takes 10-40 s on a loaded 2-core machine


def environment() -> dict[str, str]:
    """The workers' environment: this checkout's robustlab, one thread per process."""
    return {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now, for a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_command(launcher: Sequence[str], args: Sequence[str]) -> list[str]:
    """``torchrun LAUNCHER -m robustlab ARGS`` with this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "robustlab", *args]


def run_launcher(launcher: Sequence[str], args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """One torchrun launcher of ``robustlab ARGS``, run to its end (or to the timeout)."""
    return subprocess.run(
        torchrun_command(launcher, args),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def torchrun(args: Sequence[str], processes: int = 2) -> subprocess.CompletedProcess[str]:
    """A one-machine torchrun run of ``robustlab ARGS`` (``--standalone``: a free port)."""
    return run_launcher(["--standalone", "--nproc_per_node", str(processes)], args)

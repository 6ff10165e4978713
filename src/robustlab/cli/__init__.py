"""The robustlab command line: one module per command, each a few lines over the library.

Every command module has ``register(sub)`` (its options and one-line description) and
``run(args)``; ``common`` holds the helpers they share. Heavy modules (torch and everything
built on it) are imported inside the ``run`` functions, never at module level, so that
``robustlab --help`` and argument errors answer without loading torch: the one place in
robustlab where imports are deferred, and only for start-up time.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

from ..errors import RobustlabError, RunStopped
from ..version import __version__
from . import (
    attack,
    card,
    compare,
    compress,
    demo,
    detect,
    eval,
    exits,
    hpm,
    models,
    monitor,
    poison,
    prune,
    quantize,
    report,
    runs,
    scan,
    sloth,
    train,
    transfer,
    uap,
)
from .common import HelpFormatter, check_seeds

#: The commands in the order ``robustlab --help`` lists them.
COMMANDS = (
    demo, models, train, eval, attack, transfer, exits, hpm, sloth, compress, prune, quantize,
    uap, detect, monitor, poison, scan, report, card, runs, compare,
)  # fmt: skip


#: The commands that share their work among the processes torchrun starts; the others refuse
#: to run as several processes (each would do the whole work and write the same files).
TORCHRUN_COMMANDS = ("eval", "train", "transfer", "sloth")


def _torchrun_process() -> tuple[int, int]:
    """(rank, world size) of this process as torchrun set them; (0, 1) without torchrun."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:  # said by core.distributed.start, which reads them for real
        return 0, 1


def _check_torchrun(command: str) -> None:
    """A command torchrun started as several processes must be one that shares its work."""
    world = _torchrun_process()[1]
    if world > 1 and command not in TORCHRUN_COMMANDS:
        raise RobustlabError(
            f"robustlab {command} does not share its work among processes, and torchrun "
            f"started {world} of them: run it as one process (without torchrun); under "
            f"torchrun run {', '.join(TORCHRUN_COMMANDS[:-1])} or {TORCHRUN_COMMANDS[-1]}"
        )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="robustlab",
        description="Attack, defend and audit the adversarial robustness of image classifiers.",
        epilog="Run robustlab COMMAND --help for the options of a command.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"robustlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


#: Why a torchrun run stopped, whichever this process saw first (SIGTERM or an exchange broken
#: because another process went away): the same sentence from every command.
STOPPED_UNDER_TORCHRUN = (
    "another process of this torchrun run failed or the run was stopped (torchrun's report "
    "names the process)"
)
#: Why one process stopped.
STOPPED_BY_SIGTERM = "the process received SIGTERM (a job scheduler cancelled it, or kill)"


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`~robustlab.errors.RunStopped` where the process
    is, so a command unwinds as after an interrupt (finished work kept, one message) instead of
    vanishing; later SIGTERMs are ignored while that message gets out. Signals reach the main
    thread only: in another thread the block is left as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stopped(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise RunStopped

    before = signal.signal(signal.SIGTERM, stopped)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run a command; a user error, a stop or an interrupt is one message, said
    once (see ``core.distributed``'s design), and a non-zero exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # the command line as typed, which every record carries (common.finished_record)
    args.command_line = list(sys.argv[1:] if argv is None else argv)
    rank, world = _torchrun_process()
    with stop_on_sigterm():
        try:
            with warnings.catch_warnings():
                # the other processes of a torchrun run would repeat rank 0's warnings
                warnings.simplefilter("ignore" if rank else "default")
                _check_torchrun(args.command)
                check_seeds(args)  # before any command starts: a seed every generator takes
                return int(args.func(args))
        except BaseException as exc:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # this process's end is said
            ending = ended(exc, world)
            if ending is None:
                raise  # a bug: its traceback
            status, message = ending
            if _speaks(exc, rank, world):
                print(message, file=sys.stderr)
            return status


def ended(exc: BaseException, world: int) -> tuple[int, str] | None:
    """How a command that raised ``exc`` ends in a run of ``world`` processes: its exit status
    and its one message (None: a bug, whose traceback is shown)."""
    if isinstance(exc, RobustlabError):
        return 2, f"robustlab: error: {exc}"
    if not isinstance(exc, KeyboardInterrupt) and world > 1:
        from ..core.distributed import peer_failed  # torch is loaded: a process group ran

        if peer_failed(exc):
            exc = RunStopped()
    if isinstance(exc, RunStopped):
        why = STOPPED_UNDER_TORCHRUN if world > 1 else STOPPED_BY_SIGTERM
        kept = f"; {exc.kept}; run the same command again to resume" if exc.kept else ""
        return 130, f"robustlab: stopped: {why}{kept}"
    if isinstance(exc, KeyboardInterrupt):
        return 130, "robustlab: interrupted (finished epochs/batches are kept; run again to resume)"
    return None


def _speaks(exc: BaseException, rank: int, world: int) -> bool:
    """Whether this process says how the run ended: always alone; under torchrun an error by
    rank 0 alone (the others met the same one), a stop or an interrupt by the process that
    claims the run's voice first (rank 0, unless it died)."""
    if world == 1:
        return True
    if isinstance(exc, RobustlabError) and rank != 0:
        return False
    from ..core.distributed import claim_voice

    return claim_voice(rank)


if __name__ == "__main__":
    sys.exit(main())

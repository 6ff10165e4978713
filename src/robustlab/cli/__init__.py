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
import sys
import warnings
from collections.abc import Sequence

from ..errors import RobustlabError, RunStopped, StatedByRankZero
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
    prune,
    quantize,
    report,
    runs,
    sloth,
    train,
    transfer,
    uap,
)
from .common import HelpFormatter, check_seeds

#: The commands in the order ``robustlab --help`` lists them.
COMMANDS = (
    demo, models, train, eval, attack, transfer, exits, hpm, sloth, compress, prune, quantize,
    uap, detect, report, card, runs, compare,
)  # fmt: skip


#: The commands that share their work among the processes torchrun starts; the others refuse
#: to run as several processes (each would do the whole work and write the same files).
TORCHRUN_COMMANDS = ("eval", "train")


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
            f"torchrun run {' or '.join(TORCHRUN_COMMANDS)}"
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run a command; user errors print one sentence and exit non-zero."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # the command line as typed, which every record carries (common.finished_record)
    args.command_line = list(sys.argv[1:] if argv is None else argv)
    rank, world = _torchrun_process()
    started = False
    try:
        with warnings.catch_warnings():
            # the other processes of a torchrun run would repeat rank 0's warnings
            warnings.simplefilter("ignore" if rank else "default")
            _check_torchrun(args.command)
            check_seeds(args)  # before any command starts: a seed every generator takes
            started = True
            return int(args.func(args))
    except StatedByRankZero:
        return 2  # rank 0 says why the run failed
    except RobustlabError as exc:
        if rank and not started:
            return 2  # the same on every process of a torchrun run: rank 0 says it
        where = f" (process {rank} of {world})" if rank else ""
        print(f"robustlab: error{where}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        if rank == 0:  # the other processes of a torchrun run got the same signal
            print(_interrupted(exc), file=sys.stderr)
        return 130


def _interrupted(exc: KeyboardInterrupt) -> str:
    """What an interrupted run says: what was kept, and how to go on."""
    if isinstance(exc, RunStopped):
        return (
            "robustlab: stopped: another process of this torchrun run failed or the run was "
            "stopped (torchrun names it); what was finished is kept: run the same command "
            "again to resume"
        )
    return "robustlab: interrupted (finished epochs/batches are kept; run again to resume)"


if __name__ == "__main__":
    sys.exit(main())

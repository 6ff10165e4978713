"""The robustlab command line: one module per command, each a few lines over the library.

Every command module has ``register(sub)`` (its options and one-line description) and
``run(args)``; ``common`` holds the helpers they share. Heavy modules (torch and everything
built on it) are imported inside the ``run`` functions, never at module level, so that
``robustlab --help`` and argument errors answer without loading torch: the one place in
robustlab where imports are deferred, and only for start-up time.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from ..errors import RobustlabError
from ..version import __version__
from . import (
    attack,
    compress,
    demo,
    eval,
    exits,
    hpm,
    models,
    prune,
    quantize,
    report,
    sloth,
    train,
    transfer,
    uap,
)
from .common import HelpFormatter, check_seeds

#: The commands in the order ``robustlab --help`` lists them.
COMMANDS = (
    demo, models, train, eval, attack, transfer, exits, hpm, sloth, uap, compress, prune,
    quantize, report,
)  # fmt: skip


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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            check_seeds(args)  # before any command starts: a seed every generator takes
            return int(args.func(args))
    except RobustlabError as exc:
        print(f"robustlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "robustlab: interrupted (finished epochs/batches are kept; run again to resume)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())

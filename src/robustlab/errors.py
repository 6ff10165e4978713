"""The one error type a user can cause: its message is a single clear sentence.

Two companions serve runs of several processes (torchrun): an error another process states
for the whole run, and a run stopped from outside (SIGTERM, as torchrun stops the other
processes when one of them fails).
"""

from __future__ import annotations


class RobustlabError(Exception):
    """A problem with what the user handed in (path, shape, range, name, value)."""


class StatedByRankZero(RobustlabError):
    """The run failed and its rank-0 process states why: this process exits without a word."""


class RunStopped(KeyboardInterrupt):
    """The process was told to stop (SIGTERM): another process of its run failed, or the
    run was stopped; like an interrupt, what was finished is kept."""

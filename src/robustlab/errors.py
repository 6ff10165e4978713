"""How a command ends early, in two types: an error the user can cause, whose message is a
single clear sentence, and a run stopped before its end, which keeps what it finished.

Both are said once (``cli.main``, the rule in :mod:`robustlab.core.distributed`): under
torchrun an error is said by rank 0 alone, since every process meets the same checks (on the
other processes it ends the process quietly, with the same exit status), and a stop by rank 0,
or by a surviving process when rank 0 died.
"""

from __future__ import annotations


class RobustlabError(Exception):
    """A problem with what the user handed in (path, shape, range, name, value)."""


class RunStopped(KeyboardInterrupt):
    """The run was stopped before its end: SIGTERM (torchrun stopping the other processes when
    one failed, a scheduler cancelling a job), or another process of its torchrun run went
    away. Like an interrupt (an ``except Exception`` lets it through), what was finished is
    kept; ``kept`` says what and where, for a command that resumes (None: it says nothing)."""

    def __init__(self, kept: str | None = None) -> None:
        super().__init__(*([kept] if kept else []))
        self.kept = kept

"""The one error type a user can cause: its message is a single clear sentence."""

from __future__ import annotations


class RobustlabError(Exception):
    """A problem with what the user handed in (path, shape, range, name, value)."""

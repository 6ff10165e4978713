"""Input checks shared by every attack and evaluation: one clear sentence per bad batch."""

from __future__ import annotations

import torch

from ..errors import RobustlabError


def check_batch(x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None) -> None:
    """Refuse batches an attack cannot treat honestly, with one clear sentence."""
    if x.dim() < 2 or len(x) != len(y):
        raise RobustlabError(
            f"inputs and labels disagree: {tuple(x.shape)} inputs for {tuple(y.shape)} labels"
        )
    if targets is not None and targets.shape != y.shape:
        raise RobustlabError(f"targets need one label per input, got {tuple(targets.shape)}")
    if targets is not None and bool((targets == y).any()):
        raise RobustlabError("a target label equals the true label; targets must differ from y")
    if not bool(torch.isfinite(x).all()):
        raise RobustlabError("inputs contain NaN or Inf values")
    if len(x) and (float(x.min()) < 0 or float(x.max()) > 1):
        raise RobustlabError(
            "inputs must lie in [0,1] (normalisation belongs inside the model); "
            f"got [{float(x.min()):.3g}, {float(x.max()):.3g}]"
        )


def check_batch_size(size: int | None) -> int:
    """A batch size of at least one point, or one clear sentence."""
    if size is None or isinstance(size, bool) or size < 1:
        raise RobustlabError(f"batch size must be >= 1, got {size}")
    return size


def check_whole(value: object, what: str, least: int = 1) -> int:
    """A whole number of at least ``least`` (bools refused), or one clear sentence naming
    ``what`` it is."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise RobustlabError(f"{what} must be a whole number >= {least}, got {value!r}")
    return value

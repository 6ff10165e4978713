"""Success criteria: when an attack has reached its goal on a sample."""

from __future__ import annotations

import torch


def success(logits: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """Per sample: misclassified (untargeted) or classified as its target (targeted)."""
    pred = logits.argmax(1)
    return pred != y if targets is None else pred == targets

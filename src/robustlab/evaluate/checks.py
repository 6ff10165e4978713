"""Gradient-masking checks: signs that a robust accuracy may be too optimistic."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def masking_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    """Warnings about outputs and gradients that mislead gradient attacks (model in eval mode)."""
    warnings: list[str] = []
    with torch.no_grad():
        a, b = model(x), model(x)
    if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
        warnings.append(
            "non-deterministic outputs: two forward passes on the same inputs differ; use a "
            "randomised-defence evaluation (AutoAttack version 'rand', EOT)"
        )
    sums = a.sum(dim=1)
    if bool(((a >= 0) & (a <= 1)).all()) and torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
        warnings.append(
            "the model outputs probabilities (rows in [0,1] summing to 1), not logits; "
            "cross-entropy on them saturates and weakens gradient attacks: return logits"
        )
    xg = x.detach().clone().requires_grad_(True)
    grad = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)[0]
    zero = int((grad.flatten(1).abs().amax(dim=1) == 0).sum())
    if zero:
        warnings.append(
            f"{zero} of {len(x)} checked points have an all-zero input gradient "
            "(gradient masking or saturation): gradient attacks cannot move them"
        )
    return warnings


def black_box_warning(broken_by_black_box: int, total: int) -> str | None:
    """A warning when a black-box attack broke points that every white-box attack missed."""
    if broken_by_black_box == 0:
        return None
    return (
        f"a black-box attack (square) broke {broken_by_black_box} of {total} points that the "
        "gradient attacks missed: a sign of gradient masking"
    )

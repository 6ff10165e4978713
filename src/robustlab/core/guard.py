"""Attacks never change the caller's model: evaluate in eval mode and restore everything after."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def frozen_eval(model: nn.Module, warn_train_mode: bool = True) -> Iterator[nn.Module]:
    """Put the model in eval mode without parameter gradients; restore both on exit."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    if warn_train_mode and model.training:
        warnings.warn(
            "model was in train mode; attacking it in eval mode (its mode is restored afterwards)",
            stacklevel=3,
        )
    try:
        model.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)

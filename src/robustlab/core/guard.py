"""The model guard: whatever a function does to a model's modes and ``requires_grad`` flags is
undone when it returns or raises. Every place that switches a model's mode goes through here."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase


@contextmanager
def preserved(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every module's train/eval mode and every parameter's ``requires_grad`` on exit."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode (parameters untouched); every module's mode restored on exit."""
    with preserved(model):
        model.eval()
        yield model


@contextmanager
def frozen_eval(model: nn.Module, warn_train_mode: bool = True) -> Iterator[nn.Module]:
    """Put the model in eval mode without parameter gradients; restore both on exit."""
    if warn_train_mode and model.training:
        warnings.warn(
            "model was in train mode; attacking it in eval mode (its mode is restored afterwards)",
            stacklevel=3,
        )
    with preserved(model):
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        yield model


@contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Forward passes in train mode that normalise with their batch's statistics but leave every
    norm layer's running statistics (and its batch count) as they were."""
    norms = [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats]
    saved = [(m, m.momentum, _count(m)) for m in norms]
    try:
        for m in norms:
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
        yield model
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)  # type: ignore[union-attr]


def _count(norm: _NormBase) -> torch.Tensor | None:
    """A copy of a norm layer's count of batches seen (None when it keeps none)."""
    count = norm.num_batches_tracked
    return None if count is None else count.clone()

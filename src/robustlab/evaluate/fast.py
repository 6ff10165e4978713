"""A private, faster copy of a model for evaluation: BatchNorm folded, channels_last on CPU.

An evaluation runs the model in eval mode only, where ``BatchNorm(conv(x))`` is one affine
map of ``conv(x)`` and folds into the convolution's weights: the same function (to float
rounding), one layer fewer per pass, forward and backward. The caller's model is never
changed; the copy is what the attacks see.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ..core.guard import evaluating

_FOLDABLE: tuple[tuple[type[nn.Module], type[nn.Module]], ...] = (
    (nn.Conv1d, nn.BatchNorm1d),
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Conv3d, nn.BatchNorm3d),
    (nn.Linear, nn.BatchNorm1d),
)


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    """True when ``bn`` directly after ``layer`` is a fixed affine map in eval mode."""
    pair = any(isinstance(layer, a) and type(bn) is b for a, b in _FOLDABLE)
    return (
        pair
        and not layer.training
        and not bn.training
        and isinstance(bn, nn.modules.batchnorm._BatchNorm)
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.running_var is not None
        and not layer._forward_hooks
        and not layer._forward_pre_hooks
        and not bn._forward_hooks
        and not bn._forward_pre_hooks
    )


def fold_batchnorm(model: nn.Module) -> int:
    """Fold, in place, every eval-mode BatchNorm that directly follows a conv/linear layer in
    a ``nn.Sequential`` into that layer; returns how many were folded.

    Modules in train mode are left alone (there BatchNorm uses batch statistics). Only adjacency inside ``nn.Sequential`` is used: there the output of the layer feeds the
    BatchNorm and nothing else, so folding cannot change what any other module sees.
    """
    folded = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:], strict=False):
            layer, bn = seq._modules[a], seq._modules[b]
            if layer is None or bn is None or not _foldable(layer, bn):
                continue
            requires_grad = bool(layer.get_parameter("weight").requires_grad)
            assert isinstance(bn, nn.modules.batchnorm._BatchNorm)  # _foldable checked it
            fused: nn.Module
            if isinstance(layer, nn.Linear):
                fused = fuse_linear_bn_eval(layer, bn)
            else:
                assert isinstance(layer, nn.modules.conv._ConvNd)
                fused = fuse_conv_bn_eval(layer, bn)
            for p in fused.parameters():
                p.requires_grad_(requires_grad)
            seq._modules[a] = fused
            seq._modules[b] = nn.Identity().train(bn.training)  # the mode the BN had
            folded += 1
    return folded


def fast_copy(
    model: nn.Module,
    *,
    channels_last: bool,
    fold: bool = True,
) -> nn.Module:
    """A private copy to evaluate with: BatchNorm folded (``fold``), channels_last weights."""
    if not channels_last and not fold:
        return model
    fast = copy.deepcopy(model)
    if fold:  # evaluation runs in eval mode: fold as such, then keep the copy's flags (the
        # evaluation's guard warns about a model handed over in train mode)
        with evaluating(fast), torch.no_grad():
            fold_batchnorm(fast)
    if channels_last:
        # Module.to works in place; torch accepts memory_format there but its overloads omit it
        fast.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return fast

"""The private evaluation copy: BatchNorm folding keeps the function, the caller's model stays."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from robustlab.attacks import PGD
from robustlab.data import DataSplits
from robustlab.evaluate import evaluate
from robustlab.evaluate.fast import fast_copy, fold_batchnorm
from robustlab.models import build_model


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            assert m.running_mean is not None and m.running_var is not None
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))


def _conv_then_bn(model: nn.Module) -> int:
    """BatchNorm2d layers that directly follow a Conv2d inside an nn.Sequential."""
    return sum(
        isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d)
        for seq in model.modules()
        if isinstance(seq, nn.Sequential)
        for a, b in zip(seq, list(seq)[1:], strict=False)
    )


def _input_grad(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    (g,) = torch.autograd.grad(out.logsumexp(1).sum() + out[:, 0].sum(), x)
    return out.detach(), g


@pytest.mark.parametrize("arch", ["resnet8", "preact_resnet8", "densenet", "vgg11"])
def test_folded_copy_is_the_same_function_with_fewer_batchnorms(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 1, 10, 28).eval()
    _randomise_bn(model)
    before = copy.deepcopy(model.state_dict())
    fast = fast_copy(model, channels_last=True)
    x = torch.rand(6, 1, 28, 28)
    out, g = _input_grad(model, x)
    out_f, g_f = _input_grad(fast, x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_f, out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g_f, g, rtol=1e-3, atol=1e-5)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    n_bn_fast = sum(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    # exactly the BNs right after a conv fold (resnet8, vgg11: all of them); pre-activation
    # BNs (BN -> ReLU -> conv: preact_resnet8, densenet) do not follow a conv and stay
    foldable = _conv_then_bn(model)
    assert foldable > 0 and n_bn_fast == n_bn - foldable
    if arch in ("resnet8", "vgg11"):
        assert n_bn_fast == 0
    # the caller's model: same weights, same modules, same mode
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_bn
    assert not model.training


def test_train_mode_and_batch_statistics_are_not_folded() -> None:
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    assert fold_batchnorm(seq) == 0  # train mode: BN normalises by the batch
    seq.eval()
    stateless = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    stateless.eval()
    assert fold_batchnorm(stateless) == 0  # no running statistics: still batch statistics
    assert isinstance(stateless[1], nn.BatchNorm2d)
    assert fold_batchnorm(seq) == 1
    assert isinstance(seq[1], nn.Identity)


def test_linear_batchnorm1d_folds_and_keeps_requires_grad() -> None:
    torch.manual_seed(1)
    seq = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3)).eval()
    _randomise_bn(seq)
    seq[0].weight.requires_grad_(False)
    seq[0].bias.requires_grad_(False)
    x = torch.randn(9, 5)
    ref = seq(x)
    assert fold_batchnorm(seq) == 1
    torch.testing.assert_close(seq(x), ref, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in seq[0].parameters())


def test_hooked_layers_are_not_folded() -> None:
    seq = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).eval()
    seen: list[torch.Tensor] = []
    seq[1].register_forward_hook(lambda m, i, o: seen.append(o))
    assert fold_batchnorm(seq) == 0  # a hook on the BN must keep seeing the BN's output


def test_evaluation_gives_the_same_numbers_folded_or_not(digits: DataSplits) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = digits.train.x, digits.train.y
    for _ in range(60):
        opt.zero_grad()
        torch.autograd.backward(nn.functional.cross_entropy(model(x), y))
        opt.step()
    model.eval()
    attack = PGD(norm="linf", eps=0.05, steps=10, restarts=1)
    folded = evaluate(model, digits.test, attack, n=200, progress=False)
    plain = evaluate(model, digits.test, attack, n=200, progress=False, fold_batchnorm=False)
    assert folded.clean_accuracy == plain.clean_accuracy
    assert abs(folded.robust_accuracy - plain.robust_accuracy) <= 0.01
    assert 0.0 < plain.robust_accuracy < plain.clean_accuracy

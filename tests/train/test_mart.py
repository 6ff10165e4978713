"""MART: its loss against a computation written out per sample, its misclassification
weighting, training end to end on digits, and bad beta; TRADES and MART keep BatchNorm's
running statistics from the adversarial batch alone."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from robustlab.core.guard import frozen_running_stats
from robustlab.data import DataSplits
from robustlab.errors import RobustlabError
from robustlab.train import TrainConfig, train
from robustlab.train.methods import MART, Step, make_method, mart_loss


def _by_hand(clean: list[list[float]], adv: list[list[float]], y: list[int], beta: float) -> float:
    """MART's loss, one sample at a time, in plain Python (the official formula)."""

    def softmax(z: list[float]) -> list[float]:
        m = max(z)
        e = [math.exp(v - m) for v in z]
        return [v / sum(e) for v in e]

    n, total_ce, total_boost, total_kl = len(y), 0.0, 0.0, 0.0
    for zc, za, t in zip(clean, adv, y, strict=True):
        pc, pa = softmax(zc), softmax(za)
        total_ce += -math.log(pa[t])
        ranked = sorted(range(len(pa)), key=lambda k: -pa[k])
        wrong = ranked[1] if ranked[0] == t else ranked[0]
        total_boost += -math.log(1.0001 - pa[wrong] + 1e-12)
        kl = sum(p * (math.log(p) - math.log(q + 1e-12)) for p, q in zip(pc, pa, strict=True))
        total_kl += kl * (1.0000001 - pc[t])
    return total_ce / n + total_boost / n + beta * total_kl / n


def test_mart_loss_is_the_official_formula() -> None:
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(6, 4, generator=g, dtype=torch.float64) * 2
    adv = clean + torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    adv[0] = torch.tensor([5.0, 0.0, 1.0, -1.0])  # adversarial top-1 is the true class
    adv[1] = torch.tensor([3.0, 0.0, 1.0, -1.0])  # adversarial top-1 is a wrong class
    got = float(mart_loss(clean, adv, y, 6.0))
    want = _by_hand(clean.tolist(), adv.tolist(), y.tolist(), 6.0)
    assert got == pytest.approx(want, rel=1e-9)


def test_misclassified_points_weigh_more_in_the_kl_term() -> None:
    """Same clean-to-adversarial shift; a point the clean model gets wrong adds more."""
    adv = torch.tensor([[0.0, 0.0, 3.0]])
    right = mart_loss(torch.tensor([[4.0, 0.0, 0.0]]), adv, torch.tensor([0]), 1.0)
    wrong = mart_loss(torch.tensor([[4.0, 0.0, 0.0]]), adv, torch.tensor([1]), 1.0)
    no_kl_right = mart_loss(torch.tensor([[4.0, 0.0, 0.0]]), adv, torch.tensor([0]), 0.0)
    no_kl_wrong = mart_loss(torch.tensor([[4.0, 0.0, 0.0]]), adv, torch.tensor([1]), 0.0)
    assert float(wrong - no_kl_wrong) > 10 * float(right - no_kl_right) > 0


def test_mart_trains_on_digits_and_records_its_beta(tmp_path: Path, digits: DataSplits) -> None:
    cfg = TrainConfig(
        arch="mlp", data="digits", method="mart", eps=0.1, epochs=2, steps=2, beta=5.0
    )
    result = train(cfg, tmp_path, splits=digits, progress=False)
    assert result.manifest["training"]["method"] == "mart"
    assert result.manifest["training"]["method_config"]["beta"] == 5.0
    assert result.manifest["metrics"]["clean_accuracy"] > 0.3
    assert isinstance(cfg.make_method(), MART)


@pytest.mark.parametrize("beta", [-1.0, math.nan])
def test_a_bad_beta_is_refused_in_one_sentence(beta: float) -> None:
    with pytest.raises(
        RobustlabError,
        match=r"mart needs beta >= 0, got -1.0|beta must be a finite number, got nan",
    ):
        make_method("mart", eps=0.1, beta=beta)


def _stats(norm: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A norm layer's running mean, running variance and count of batches seen."""
    mean, var, count = norm.running_mean, norm.running_var, norm.num_batches_tracked
    assert mean is not None and var is not None and count is not None
    return mean, var, int(count)


@pytest.mark.parametrize("name", ["trades", "mart"])
def test_running_norm_statistics_come_from_the_adversarial_batch_alone(name: str) -> None:
    """One loss evaluation in train mode moves BatchNorm's running mean once, towards the
    adversarial batch's mean; a clean pass that also updated it would move it twice."""
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(1, momentum=0.1)
    model = nn.Sequential(norm, nn.Flatten(), nn.Linear(16, 3)).train()
    x = torch.rand(8, 1, 4, 4) * 0.5
    y = torch.randint(0, 3, (8,))
    method = make_method(name, eps=0.3, steps=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = Step(model, opt, x, y, torch.arange(8), 0, 0, 1, torch.Generator().manual_seed(0))
    method.before_forward(step)  # crafts in eval mode: the statistics do not move
    assert float(_stats(norm)[0]) == 0.0 and _stats(norm)[2] == 0
    method.loss(model, step)
    adv_mean = float(step.adversarial.mean())
    assert abs(adv_mean - float(x.mean())) > 0.01  # the two batches' means differ
    assert float(_stats(norm)[0]) == pytest.approx(0.1 * adv_mean, rel=1e-5)
    assert _stats(norm)[2] == 1


@pytest.mark.parametrize("momentum", [0.1, None])
def test_frozen_running_stats_leaves_the_statistics_and_restores_on_error(
    momentum: float | None,
) -> None:
    norm = nn.BatchNorm1d(3, momentum=momentum).train()
    norm(torch.randn(5, 3))
    mean, var = (t.clone() for t in _stats(norm)[:2])
    with pytest.raises(ValueError), frozen_running_stats(norm):
        out = norm(torch.randn(5, 3) + 4)
        # still normalised with the batch's own statistics
        assert float(out.detach().mean().abs()) < 1e-5
        raise ValueError
    assert torch.equal(_stats(norm)[0], mean) and torch.equal(_stats(norm)[1], var)
    assert _stats(norm)[2] == 1 and norm.momentum == momentum
    norm(torch.randn(5, 3) + 4)  # afterwards the statistics move again
    assert not torch.equal(_stats(norm)[0], mean)

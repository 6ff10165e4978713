"""MART: its loss against a computation written out per sample, its misclassification
weighting, training end to end on digits, and bad beta."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from robustlab.data import DataSplits
from robustlab.errors import RobustlabError
from robustlab.train import TrainConfig, train
from robustlab.train.methods import MART, make_method, mart_loss


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

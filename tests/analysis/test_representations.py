"""Representation metrics: closed forms, numpy, eval mode, where the representations are taken."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from robustlab.analysis.representations import (
    batch_stable_rank,
    pq_index,
    relative_shift,
    representation_metrics,
    representations,
)


@pytest.mark.parametrize("shape", [(20, 50), (50, 20)])
def test_batch_stable_rank_agrees_with_numpy(shape: tuple[int, int]) -> None:
    z = torch.randn(*shape)
    s = np.linalg.svd(z.double().numpy(), compute_uv=False)
    assert batch_stable_rank(z) == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-4)
    assert batch_stable_rank(torch.outer(torch.randn(7), torch.randn(9))) == pytest.approx(1.0)


def test_pq_index_closed_forms() -> None:
    d = 16
    one_hot = torch.zeros(1, d)
    one_hot[0, 3] = 2.5
    assert pq_index(one_hot) == pytest.approx(1 - 1 / math.sqrt(d))
    assert pq_index(torch.full((1, d), -0.7)) == pytest.approx(0.0, abs=1e-12)
    assert pq_index(torch.zeros(2, d)) == 0.0
    assert pq_index(torch.cat([one_hot, torch.ones(1, d)])) == pytest.approx((1 - 0.25) / 2)


def test_relative_shift() -> None:
    z = torch.randn(5, 8)
    assert relative_shift(z, 3 * z) == pytest.approx(2.0)
    z[0] = 0.0  # a zero representation is left out
    assert relative_shift(z, z + z.norm(dim=1, keepdim=True)) == pytest.approx(math.sqrt(8))


def test_units_of_a_zoo_model_in_eval_mode(digits_net: nn.Module) -> None:
    model = copy.deepcopy(digits_net).train()
    x = torch.rand(16, 1, 8, 8)
    rows = representation_metrics(model, x, {"linf": (x + 0.1).clamp(0, 1)})
    assert model.training  # its mode is restored
    assert [r["name"] for r in rows] == ["stem", "blocks.0", "blocks.1", "blocks.2"]
    assert all(0 < r["zero_fraction"] < 1 and r["shift"]["linf"] > 0 for r in rows)
    reps = representations(model.eval(), x)  # the same numbers as in eval mode
    assert rows[-1]["stable_rank"] == pytest.approx(batch_stable_rank(reps["blocks.2"]))


def test_a_model_without_units_uses_its_weight_layers() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))
    reps = representations(model, torch.rand(4, 1, 3, 4))
    assert list(reps) == ["1", "3"] and reps["1"].shape == (4, 6)

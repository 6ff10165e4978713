"""Gradient-masking checks flag what makes robust accuracy too optimistic."""

from __future__ import annotations

import torch
from torch import nn

from robustlab.attacks import PGD
from robustlab.data import Dataset
from robustlab.evaluate import evaluate, masking_checks


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.rand(40, 1, 4, 4), torch.randint(0, 3, (40,))


def test_a_plain_logit_model_raises_no_flag() -> None:
    x, y = _data()
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    assert masking_checks(model, x, y) == []


def test_probability_outputs_are_flagged() -> None:
    x, y = _data()
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3), nn.Softmax(dim=1)).eval()
    assert any("outputs probabilities" in w for w in masking_checks(model, x, y))


class Noisy(nn.Module):
    """A randomised defence: fresh noise on every forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x + 0.1 * torch.randn_like(x))
        return out


def test_randomness_is_flagged() -> None:
    x, y = _data()
    assert any("non-deterministic" in w for w in masking_checks(Noisy().eval(), x, y))


class Quantised(nn.Module):
    """Input quantisation: a classic shattered-gradient defence with zero input gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(torch.round(x * 4) / 4)
        return out


def test_zero_gradients_are_flagged_and_reach_the_record() -> None:
    x, y = _data()
    model = Quantised().eval()
    with torch.no_grad():
        y = model(x).argmax(1)
    warnings = masking_checks(model, x, y)
    assert any("40 of 40 checked points have an all-zero input gradient" in w for w in warnings)
    rec = evaluate(model, Dataset(x, y, 3, "toy"), PGD(eps=0.1, steps=3), progress=False)
    assert any("all-zero input gradient" in w for w in rec.warnings)

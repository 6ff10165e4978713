"""Optimisers: APGD's step-size control (steps, best point, checkpoints) and Adam."""

from __future__ import annotations

import pytest
import torch

from robustlab.attacks.optim import Adam, APGDControl, checkpoints
from robustlab.core.threat import ThreatModel


def _control(n: int, marks: list[int], momentum: float | None = 0.75) -> APGDControl:
    x0 = torch.full((n, 2), 0.5)
    return APGDControl.start(x0, torch.zeros(n), torch.ones(n, 2), 0.1, marks, momentum=momentum)


def test_the_first_step_has_no_momentum_and_later_ones_mix_in_the_previous_step() -> None:
    threat, x = ThreatModel("linf", 0.3), torch.full((1, 2), 0.5)
    ctl = _control(1, [])
    first = ctl.step(threat, x, torch.tensor([[1.0, -1.0]]))
    assert first[0].tolist() == pytest.approx([0.6, 0.4])
    second = ctl.step(threat, x, torch.tensor([[1.0, 1.0]]))
    # z = (0.7, 0.5); x2 = x1 + 0.75 (z - x1) + 0.25 (x1 - x0)
    assert second[0].tolist() == pytest.approx([0.7, 0.45])
    assert torch.equal(ctl.prev, first) and ctl.steps_done == 2
    plain = _control(1, [], momentum=None)
    plain.step(threat, x, torch.tensor([[1.0, -1.0]]))
    assert plain.step(threat, x, torch.tensor([[1.0, 1.0]]))[0].tolist() == pytest.approx(
        [0.7, 0.5]
    )


def test_record_counts_increases_and_keeps_the_best_point_with_its_gradient() -> None:
    ctl = _control(3, [])
    ctl.step(ThreatModel("linf", 0.3), torch.full((3, 2), 0.5), torch.ones(3, 2))
    ctl.record(torch.tensor([1.0, 0.0, -1.0]), torch.full((3, 2), 7.0))
    assert ctl.ups.tolist() == [1, 0, 0]  # strictly larger than the loss where the step began
    assert ctl.best_loss.tolist() == [1.0, 0.0, 0.0]
    assert ctl.best_x[:, 0].tolist() == pytest.approx([0.6, 0.5, 0.5])
    assert ctl.best_grad[:, 0].tolist() == [7.0, 1.0, 1.0]
    assert ctl.loss.tolist() == [1.0, 0.0, -1.0]


def test_the_first_checkpoint_halves_by_condition_2_since_w0_counts_as_not_halved() -> None:
    # sample 0: 3 of 4 steps increased the loss (condition 1 fails), but the best loss is
    # where it was at w_0: condition 2 halves at w_1 (a control starting "halved" would not);
    # sample 1: the best loss increased, no condition holds
    ctl = _control(2, [4, 8])
    threat, x = ThreatModel("linf", 0.3), torch.full((2, 2), 0.5)
    losses = [torch.tensor([a, b]) for a, b in ((-3.0, 1.0), (-2.0, 2.0), (-1.0, 3.0), (-0.5, 4.0))]
    for loss in losses:
        ctl.step(threat, x, torch.ones(2, 2))
        ctl.record(loss, torch.ones(2, 2))
        ctl.checkpoint()
        if ctl.steps_done == 3:
            assert ctl.ups.tolist() == [2, 3]
    assert ctl.ups.tolist() == [0, 0] and ctl.halved.tolist() == [True, False]
    assert ctl.eta.tolist() == pytest.approx([0.05, 0.1])
    assert ctl.loss.tolist() == [0.0, 4.0]  # sample 0 goes back to its best point, x0
    assert ctl.cur[0].tolist() == [0.5, 0.5]


def test_checkpoints_are_ignored_between_marks_and_keep_drops_samples() -> None:
    ctl = _control(3, checkpoints(10))
    ctl.step(ThreatModel("linf", 0.3), torch.full((3, 2), 0.5), torch.ones(3, 2))
    ctl.record(torch.zeros(3), torch.ones(3, 2))
    ctl.checkpoint()  # step 1 is no checkpoint of a 10-step run (3 is the first)
    assert ctl.eta.tolist() == pytest.approx([0.1] * 3) and ctl.ups.tolist() == [0, 0, 0]
    ctl.keep(torch.tensor([True, False, True]))
    assert len(ctl.cur) == len(ctl.eta) == len(ctl.halved) == 2 and ctl.gaps[3] == 3


def test_adam_follows_the_published_update() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, generator=gen)
    grads = [torch.randn(4, 3, generator=gen) for _ in range(5)]
    ours, ref = Adam(0.01), w.clone().requires_grad_(True)
    reference = torch.optim.Adam([ref], lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    mine = w.clone()
    for g in grads:
        mine = ours.step(mine, g)
        ref.grad = g.clone()
        reference.step()
    assert ours.t == 5
    assert torch.allclose(mine, ref.detach(), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(mine, w, atol=1e-3)

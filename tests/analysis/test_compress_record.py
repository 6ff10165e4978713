"""The compress record's shared passes: one clean and one adversarial forward pass give the same
numbers as the separate measurements, and the alignment term on a subsample or not at all."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustlab.analysis.bound import local_gains, robustness_bounds, with_alignment
from robustlab.analysis.compress import check_alignment_points, compress_record
from robustlab.analysis.compressibility import layer_metrics
from robustlab.analysis.gap import measure_gap
from robustlab.analysis.representations import (
    representation_metrics,
    representations,
    representations_and_logits,
)
from robustlab.data import DataSplits
from robustlab.errors import RobustlabError

EPS = {"linf": 0.1, "l2": 0.5}


def test_one_pass_gives_every_representation_and_the_logits(digits_net: nn.Module) -> None:
    x = torch.rand(6, 1, 8, 8)
    reps, logits = representations_and_logits(digits_net, x)
    with torch.no_grad():
        torch.testing.assert_close(logits, digits_net(x), rtol=1e-5, atol=1e-6)
    alone = representations(digits_net, x)
    assert list(reps) == list(alone) == ["stem", "blocks.0", "blocks.1", "blocks.2"]
    for name, z in reps.items():
        assert torch.equal(z, alone[name])
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    reps, logits = representations_and_logits(plain, x)
    assert list(reps) == ["1", "3"] and torch.equal(reps["3"], logits)


def test_the_record_equals_the_separate_measurements(
    digits_net: nn.Module, digits: DataSplits
) -> None:
    x, y = digits.test.x[:24], digits.test.y[:24]
    record = compress_record(digits_net, x, y, eps=EPS, steps=5, alignment_points=None)
    adversarial = {}
    for norm, eps in EPS.items():
        gap = measure_gap(digits_net, x, y, norm, eps, steps=5, seed=0)
        adversarial[norm] = gap.x_adv
        got = record["gap"][norm]
        for key, value in gap.to_dict().items():
            if isinstance(value, str):
                assert got[key] == value
            else:
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (norm, key)
    rows = representation_metrics(digits_net, x, adversarial)
    assert len(rows) == len(record["representations"])
    for want, got in zip(rows, record["representations"], strict=True):
        assert got["name"] == want["name"]
        for norm in EPS:  # each threat model's slice of the stacked adversarial pass
            assert got["shift"][norm] == pytest.approx(want["shift"][norm], rel=1e-5)
        assert got["stable_rank"] == pytest.approx(want["stable_rank"], rel=1e-6)
    assert record["alignment_points"] == 24


def test_alignment_on_the_first_points_or_skipped(
    digits_net: nn.Module, digits: DataSplits
) -> None:
    x, y = digits.test.x[:40], digits.test.y[:40]
    bounds = robustness_bounds(digits_net, layer_metrics(digits_net), (1, 8, 8), EPS, 0.1)
    few = compress_record(digits_net, x, y, eps=EPS, steps=2, kappas=(0.1,), alignment_points=7)
    gains = local_gains(digits_net, x[:7])
    for norm, b in bounds.items():
        want = with_alignment(b, gains)
        assert few["bound"][norm]["alignment"] == pytest.approx(want.alignment, rel=1e-9)
        assert few["bound"][norm]["bound"] == pytest.approx(b.bound, rel=1e-12)
    everything = compress_record(digits_net, x, y, eps=EPS, steps=2, alignment_points=10_000)
    assert everything["alignment_points"] == 40
    assert all(
        everything["bound"][n]["alignment"] >= few["bound"][n]["alignment"] for n in EPS
    )  # a max over more points
    none = compress_record(digits_net, x, y, eps=EPS, steps=2, alignment_points=0)
    assert none["alignment_points"] == 0
    for norm in EPS:
        assert none["bound"][norm]["alignment"] is None
        assert none["bound"][norm]["aligned_estimate"] is None
        assert none["bound"][norm]["bound"] == pytest.approx(few["bound"][norm]["bound"])
    assert none["bound_holds"] == few["bound_holds"]


def test_bad_alignment_points_get_a_sentence() -> None:
    assert check_alignment_points(None, 30) == 30 and check_alignment_points(50, 30) == 30
    for bad in (-1, 2.5, True):
        with pytest.raises(RobustlabError, match="alignment points must be a whole number >= 0"):
            check_alignment_points(bad, 30)  # type: ignore[arg-type]

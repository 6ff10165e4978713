"""The shifts that make drifting streams, and the stream's batches, on real data (digits)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustlab.data import DataSplits
from robustlab.errors import RobustlabError
from robustlab.monitor.shifts import check_stream, gaussian_blur, parse_shift, stream_batches


def test_one_pass_gives_every_point_once_in_batches_of_the_size(digits: DataSplits) -> None:
    data = digits.test
    batches = list(stream_batches(data, 30))
    assert len(batches) == len(data) // 30
    points = torch.cat([b.points for b in batches])
    assert len(points) == len(set(points.tolist())) == 30 * len(batches)
    assert all(torch.equal(b.x, data.x[b.points]) for b in batches)


def test_more_batches_than_a_pass_reshuffle_but_never_repeat_a_point_in_a_batch(
    digits: DataSplits,
) -> None:
    batches = list(stream_batches(digits.test, 100, batches=10))
    assert len(batches) == 10
    assert all(len(set(b.points.tolist())) == 100 for b in batches)


def test_shift_applies_from_its_start_batch_only(digits: DataSplits) -> None:
    batches = list(stream_batches(digits.test, 40, shift=parse_shift("brightness:0.2"), start=3))
    assert [b.shifted for b in batches] == [i >= 3 for i in range(len(batches))]
    assert torch.equal(batches[0].x, digits.test.x[batches[0].points])
    assert batches[3].x.mean() > digits.test.x[batches[3].points].mean() + 0.1


def test_noise_stays_in_the_unit_interval_and_has_about_its_deviation(digits: DataSplits) -> None:
    batch = next(stream_batches(digits.test, 100, shift=parse_shift("noise:0.05")))
    clean = digits.test.x[batch.points]
    assert float(batch.x.min()) >= 0.0 and float(batch.x.max()) <= 1.0
    inside = (clean > 0.2) & (clean < 0.8)  # where clipping does not bite
    assert float((batch.x - clean)[inside].std()) == pytest.approx(0.05, rel=0.15)


def test_blur_keeps_a_constant_image_and_smooths_an_impulse() -> None:
    flat = torch.full((1, 1, 9, 9), 0.4)
    assert torch.allclose(gaussian_blur(flat, 1.0), flat)
    impulse = torch.zeros(1, 1, 9, 9)
    impulse[0, 0, 4, 4] = 1.0
    out = gaussian_blur(impulse, 1.0)
    assert out[0, 0, 4, 4] < 0.2 and float(out.sum()) == pytest.approx(1.0, abs=1e-5)


def test_prior_shift_draws_its_share_of_the_class(digits: DataSplits) -> None:
    shift = parse_shift("prior:0.5,class=3", 10)
    batch = next(stream_batches(digits.test, 40, shift=shift))
    assert int((batch.y == 3).sum()) >= 20
    assert len(set(batch.points.tolist())) == 40


def test_adversarial_batches_stay_in_the_budget_and_fool_the_model(
    digits: DataSplits, digits_net: nn.Module
) -> None:
    shift = parse_shift("adversarial:0.2,steps=10", 10)
    batch = next(stream_batches(digits.test, 50, shift=shift, model=digits_net))
    clean = digits.test.x[batch.points]
    assert float((batch.x - clean).abs().max()) <= 0.2 + 1e-6
    with torch.no_grad():
        acc = (digits_net(batch.x).argmax(1) == batch.y).float().mean()
    assert acc < 0.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("fog:0.3", "is not one of noise:S"),
        ("noise", "is not one of noise:S"),
        ("noise:-1", "needs a value > 0"),
        ("brightness:2", "needs -1 <= D <= 1"),
        ("prior:1.5", "needs a share 0 < P <= 1"),
        ("prior:0.5,class=12", "class must be one of the classes 0..9"),
        ("noise:0.1,steps=3", "has no option steps"),
        ("noise:0.1,steps", "must look like KEY=VALUE"),
    ],
)
def test_bad_shifts_are_refused_in_one_sentence(text: str, message: str) -> None:
    with pytest.raises(RobustlabError, match=message):
        parse_shift(text, 10)


def test_a_batch_larger_than_the_stream_is_refused() -> None:
    with pytest.raises(RobustlabError, match="batch size 500 is larger than the stream"):
        check_stream(360, 500, None, None)


def test_a_shift_starting_after_the_last_batch_is_refused() -> None:
    with pytest.raises(
        RobustlabError, match="starts at batch 12, but the stream's batches are 0..8"
    ):
        check_stream(360, 40, None, 12)

"""Drift monitoring on real data: an MLP trained on mnist5k with 500 training points held out
as the reference window, and its test split as the stream."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from robustlab.errors import RobustlabError
from robustlab.monitor import (
    BUILTIN,
    DriftConfig,
    DriftMonitor,
    drift_summary,
    held_out_windows,
    parse_shift,
    stream_batches,
)
from robustlab.monitor.drift_data import Windows
from robustlab.train import TrainConfig, train
from robustlab.train.loop import training_splits


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, dict[str, Any]]:
    """An MLP (one hidden layer of 32) trained 3 epochs on mnist5k, 500 points held out
    (~2 s; about 92 % test accuracy), and its manifest."""
    cfg = TrainConfig(arch="mlp", data="mnist5k", epochs=3, arch_options={"width": 32, "depth": 1})
    out = tmp_path_factory.mktemp("drift-mlp")
    result = train(cfg, out, splits=training_splits(cfg, calibration=500), progress=False)
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    return result.model.eval(), manifest


@pytest.fixture(scope="module")
def windows(trained: tuple[nn.Module, dict[str, Any]]) -> Windows:
    """The reference window (the held-out 500) and the stream (the test split)."""
    return held_out_windows("mnist5k", "mnist5k", trained[1])


def _monitor(
    trained: tuple[nn.Module, dict[str, Any]], windows: Windows, **kw: Any
) -> DriftMonitor:
    """A monitor of the trained model on the reference window."""
    return DriftMonitor(trained[0], windows.reference.x, DriftConfig(**kw), num_classes=10)


def test_reference_window_is_the_held_out_calibration_split_and_stream_the_test_split(
    windows: Windows,
) -> None:
    assert (windows.reference_split, len(windows.reference)) == ("calibration", 500)
    assert (windows.stream_split, len(windows.stream)) == ("test", 1000)


SHIFTS = ("noise:0.3", "blur:1", "brightness:0.3", "prior:0.6", "adversarial:0.1")


@pytest.mark.parametrize("spec", SHIFTS)
def test_each_made_shift_raises_the_alarm_on_most_shifted_batches(
    trained: tuple[nn.Module, dict[str, Any]], windows: Windows, spec: str
) -> None:
    monitor = _monitor(trained, windows, alpha=0.05, permutations=200)
    shift = parse_shift(spec, 10)
    checks = [
        monitor.check(b.x, b.index)
        for b in stream_batches(windows.stream, 40, batches=8, shift=shift, model=trained[0])
    ]
    assert sum(c.alarm for c in checks) >= 7  # of 8 shifted batches


def _binomial_upper(n: int, p: float, tail: float) -> int:
    """The smallest c with P(Binomial(n, p) > c) <= tail."""
    cdf = 0.0
    for c in range(n + 1):
        cdf += math.comb(n, c) * p**c * (1 - p) ** (n - c)
        if 1.0 - cdf <= tail:
            return c
    return n


def test_no_shift_alarms_at_no_more_than_the_stated_rate(
    trained: tuple[nn.Module, dict[str, Any]], windows: Windows
) -> None:
    alpha, n = 0.2, 200
    limit = _binomial_upper(n, alpha, 0.001)
    # the margin is narrow enough that a monitor alarming at twice the rate would fail:
    twice = sum(
        math.comb(n, c) * (2 * alpha) ** c * (1 - 2 * alpha) ** (n - c) for c in range(limit + 1)
    )
    assert twice < 0.01
    monitor = _monitor(trained, windows, alpha=alpha, permutations=100)
    alarms = sum(
        monitor.check(b.x, b.index).alarm for b in stream_batches(windows.stream, 40, batches=n)
    )
    assert alarms <= limit


def test_a_plugged_in_per_input_score_is_one_more_statistic_in_the_correction(
    trained: tuple[nn.Module, dict[str, Any]], windows: Windows
) -> None:
    model = trained[0]

    def margin(x: torch.Tensor) -> torch.Tensor:
        """The logit margin (top minus runner-up), a detector's kind of per-input score."""
        with torch.no_grad():
            logits: torch.Tensor = model(x)
        top2 = logits.topk(2, dim=1).values
        return top2[:, 0] - top2[:, 1]

    monitor = DriftMonitor(
        model,
        windows.reference.x,
        DriftConfig(permutations=200),
        num_classes=10,
        scores={"margin": margin},
    )
    batch = next(stream_batches(windows.stream, 40, shift=parse_shift("noise:0.3"), model=model))
    line = monitor.check(batch.x).to_dict()
    assert list(line["statistics"]) == [*BUILTIN, "score:margin"]
    assert line["statistics"]["score:margin"]["alarm"]


def test_batch_line_names_each_statistic_with_value_p_values_and_alarm(
    trained: tuple[nn.Module, dict[str, Any]], windows: Windows
) -> None:
    monitor = _monitor(trained, windows, permutations=100)
    batch = next(stream_batches(windows.stream, 40))
    line = json.loads(json.dumps(monitor.check(batch.x, 0, batch.y).to_dict()))
    assert set(line["statistics"]) == set(BUILTIN)
    for s in line["statistics"].values():
        assert set(s) == {"test", "value", "p_value", "adjusted_p", "alarm"}
        assert 0 < s["p_value"] <= s["adjusted_p"] <= 1
        assert s["alarm"] == (s["adjusted_p"] <= 0.05)
    assert line["alarm"] == bool(line["alarms"])


def test_summary_counts_alarms_before_and_after_the_onset() -> None:
    def line(i: int, shifted: bool, alarm: bool) -> dict[str, Any]:
        stat = {"alarm": alarm, "adjusted_p": 0.01 if alarm else 0.5}
        return {"batch": i, "shifted": shifted, "alarm": alarm, "statistics": {"s": stat}}

    flags = [
        (False, False),
        (False, True),
        (False, False),
        (True, False),
        (True, True),
        (True, True),
    ]
    summary = drift_summary([line(i, s, a) for i, (s, a) in enumerate(flags)], ["s"], 0.05)
    assert summary["false_alarm_rate"] == pytest.approx(1 / 3)
    assert summary["detection_rate"] == pytest.approx(2 / 3)
    assert (summary["onset_batch"], summary["delay_batches"]) == (3, 1)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5])
def test_alpha_outside_zero_one_is_refused(alpha: float) -> None:
    with pytest.raises(RobustlabError, match=r"alpha .* must be in \(0, 1\)"):
        DriftConfig(alpha=alpha)


def test_too_few_permutations_for_alpha_are_refused() -> None:
    with pytest.raises(RobustlabError, match="permutations cannot give a p-value <= alpha"):
        DriftConfig(alpha=0.01, permutations=50)


def test_a_batch_of_another_input_shape_is_refused_in_one_sentence(
    trained: tuple[nn.Module, dict[str, Any]], windows: Windows
) -> None:
    monitor = _monitor(trained, windows, permutations=100)
    with pytest.raises(
        RobustlabError, match="has 1x8x8 inputs but the reference window has 1x28x28"
    ):
        monitor.check(torch.rand(10, 1, 8, 8))


def test_a_stream_of_another_input_shape_is_refused_before_any_work(
    trained: tuple[nn.Module, dict[str, Any]],
) -> None:
    with pytest.raises(RobustlabError, match="stream digits has 1x8x8 inputs but the reference"):
        held_out_windows("mnist5k", "digits", trained[1])


def test_a_larger_reference_window_is_cut_to_max_reference_inputs(
    trained: tuple[nn.Module, dict[str, Any]], windows: Windows
) -> None:
    monitor = _monitor(trained, windows, permutations=100, max_reference=120)
    assert len(monitor.reference) == 120
    batch = next(stream_batches(windows.stream, 40))
    assert monitor.check(batch.x).size == 40

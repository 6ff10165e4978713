"""Efficacy on constructed exit distributions, and measured efficiency of a real model."""

from __future__ import annotations

import pytest
import torch

from robustlab.analysis.efficiency import (
    early_exit_all,
    efficacy,
    efficacy_curve,
    exit_fractions,
    measure_efficiency,
    measure_latency,
)
from robustlab.data import DataSplits
from robustlab.errors import RobustlabError
from robustlab.models import build_model
from robustlab.models.multiexit import attach_exits

COSTS = [15.0, 30.0, 45.0, 60.0, 75.0, 90.0, 100.0]


def test_all_exit_first_is_near_one_and_all_final_is_zero() -> None:
    first = [1.0] + [0.0] * 6
    final = [0.0] * 6 + [1.0]
    assert efficacy(first, COSTS) == pytest.approx(0.85)
    assert efficacy(final, COSTS) == pytest.approx(0.0)
    # the reference code's trapezoids: 1 - c1/2, and half the last step when nothing exits early
    assert efficacy(first, COSTS, "trapezoid") == pytest.approx(1 - 0.15 / 2)
    assert efficacy(final, COSTS, "trapezoid") == pytest.approx(0.5 * (1 - 0.9))


def test_known_mixtures() -> None:
    uniform = [1 / 7] * 7
    # 1 - mean normalised cost
    assert efficacy(uniform, COSTS) == pytest.approx(1 - sum(COSTS) / 7 / 100)
    half = [0.5, 0, 0, 0, 0, 0, 0.5]
    assert efficacy(half, COSTS) == pytest.approx(0.5 * 0.85)
    # costs in any unit
    assert efficacy(half, [c * 1e6 for c in COSTS]) == pytest.approx(0.5 * 0.85)
    # the area under the step curve is the efficacy
    xs, ys = efficacy_curve(half, COSTS)
    area = sum((xs[i + 1] - xs[i]) * ys[i] for i in range(len(xs) - 1)) + (1 - xs[-1]) * ys[-1]
    assert area == pytest.approx(efficacy(half, COSTS))


def test_efficacy_refuses_bad_curves() -> None:
    with pytest.raises(RobustlabError, match="one fraction per exit cost"):
        efficacy([1.0], COSTS)
    with pytest.raises(RobustlabError, match="sum to 1"):
        efficacy([0.5] * 7, COSTS)
    with pytest.raises(RobustlabError, match="non-decreasing"):
        efficacy([0.5, 0.5], [2.0, 1.0])
    with pytest.raises(RobustlabError, match="unknown efficacy method"):
        efficacy([0.5, 0.5], [1.0, 2.0], "simpson")


def test_exit_fractions() -> None:
    assert exit_fractions(torch.tensor([0, 0, 2, 1]), 4) == [0.5, 0.25, 0.25, 0.0]
    with pytest.raises(RobustlabError, match="no inputs"):
        exit_fractions(torch.tensor([], dtype=torch.long), 3)


def test_measure_efficiency_is_consistent(digits: DataSplits) -> None:
    torch.manual_seed(0)
    model = attach_exits(build_model("resnet8", 1, 10, 8), (1, 8, 8), 10, [1, 2]).eval()
    x, y = digits.test.x[:80], digits.test.y[:80]
    for q, everything_final in ((1.0, True), (1e-6, False)):
        rec = measure_efficiency(model, x, y, q, latency_samples=10)
        assert sum(rec.exit_fractions) == pytest.approx(1.0)
        assert sum(rec.exit_counts) == 80
        assert rec.exit_flops[0] <= rec.avg_flops <= rec.exit_flops[-1]
        assert rec.efficacy == pytest.approx(1 - rec.avg_flops / rec.exit_flops[-1])
        assert rec.latency_ms > 0 and rec.latency_full_ms > 0
        if everything_final:
            assert rec.exit_fractions[-1] == 1.0 and rec.efficacy == 0.0
            assert rec.accuracy_early_exit == rec.accuracy_final
            assert rec.flops_saving < 0  # the ICs cost extra when nobody leaves early
        else:
            assert rec.exit_fractions[0] == 1.0 and rec.flops_saving > 0.5
    assert not model.training


def test_latency_refuses_no_inputs() -> None:
    model = attach_exits(build_model("resnet8", 1, 10, 8), (1, 8, 8), 10, [1])
    with pytest.raises(RobustlabError, match="no inputs"):
        measure_latency(model, torch.zeros(0, 1, 8, 8))


@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_exits_through_either_engine_match_batched_early_exit(engine: str) -> None:
    """early_exit_all decides from all exits' logits at once; the model's own early_exit
    decides exit by exit on a shrinking batch: same exits and predictions (32x32, where the
    exits export to ONNX)."""
    torch.manual_seed(0)
    net = attach_exits(build_model("resnet8", width=8, image_size=32), (1, 32, 32), 10).eval()
    x = torch.rand(40, 1, 32, 32)
    # a threshold at the median first-IC confidence: some leave early, some do not
    with torch.no_grad(), net.outputs("all"):
        first = torch.softmax(net(x)[0], 1).amax(1)
    q = float(first.median())
    preds, exits, finals, choice = early_exit_all(net, x, q, "max_softmax", 16, engine)
    assert choice.engine == engine
    with torch.no_grad():
        own = net.early_exit(x, q, "max_softmax")
        final = net.final(x).argmax(1)
    assert 0 < int((exits == 0).sum()) < len(x)
    assert torch.equal(exits, own.exits) and torch.equal(preds, own.logits.argmax(1))
    assert torch.equal(finals, final)
    rec = measure_efficiency(net, x, finals, q, latency_samples=0, engine=engine)
    assert rec.engine is not None and rec.engine["engine"] == engine
    assert rec.latency_engine.startswith("torch")

"""Multi-exit networks: every zoo backbone, batched early exit, calibration, checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import robustlab
from robustlab.analysis.efficiency import calibrate, simulate
from robustlab.attacks import PGD
from robustlab.data import Dataset, DataSplits
from robustlab.errors import RobustlabError
from robustlab.models import build_model
from robustlab.models.checkpoint import model_config, save_checkpoint
from robustlab.models.multiexit import (
    MultiExitNetwork,
    attach_exits,
    confidence,
    exit_predictions,
)

SHAPE = (1, 8, 8)


def _model(
    arch: str = "resnet8", positions: list[int] | None = None, **opts: Any
) -> MultiExitNetwork:
    torch.manual_seed(0)
    backbone = build_model(arch, 1, 10, 8, **opts)
    return attach_exits(backbone, SHAPE, 10, positions).eval()


@pytest.mark.parametrize(
    "arch", ["resnet8", "resnet20", "preact_resnet", "vgg", "vgg11", "densenet", "vit", "mlp"]
)
def test_every_backbone_takes_exits(arch: str) -> None:
    model = _model(arch)
    x = torch.rand(3, *SHAPE)
    outs = model.all_exits(x)
    assert len(outs) == model.num_exits == len(model.positions) + 1 >= 2
    assert all(o.shape == (3, 10) for o in outs)
    assert torch.equal(outs[-1], model.backbone(x))  # the final exit is the backbone
    assert torch.equal(model(x), model.backbone(x))  # default output: plain final logits
    costs = model.exit_costs()
    assert all(b > a for a, b in zip(costs, costs[1:], strict=False))


def test_default_positions_follow_the_flops() -> None:
    model = _model("resnet20")
    assert len(model.positions) == 6
    costs = model.exit_costs()
    fractions = [c / costs[-1] for c in costs[:-1]]
    for got, want in zip(fractions, (0.15, 0.30, 0.45, 0.60, 0.75, 0.90), strict=True):
        assert abs(got - want) < 0.1


def test_output_modes() -> None:
    model = _model()
    x = torch.rand(4, *SHAPE)
    with model.outputs("all"):
        outs = model(x)
        assert isinstance(outs, list) and len(outs) == model.num_exits
    assert model.output == "final"
    model.threshold = 0.5
    with model.outputs("early"):
        assert torch.equal(model(x), model.early_exit(x).logits)
    with pytest.raises(RobustlabError, match="output mode"), model.outputs("nope"):
        pass


def _mixed_threshold(model: MultiExitNetwork, x: torch.Tensor) -> float:
    """A threshold at which some inputs leave at each IC and some go to the end."""
    scores, _ = exit_predictions(model, x, "max_softmax")
    return float(scores.amax(1).median())


@pytest.mark.parametrize("rule", ["max_softmax", "entropy"])
def test_batched_early_exit_equals_one_by_one(rule: str) -> None:
    model = _model("resnet14").double()
    x = torch.rand(40, *SHAPE, dtype=torch.float64)
    scores, _ = exit_predictions(model, x, rule)
    q = float(scores.amax(1).median())  # about half the inputs exit early
    with torch.no_grad():
        batched = model.early_exit(x, q, rule)
        single = [model.early_exit(x[i : i + 1], q, rule) for i in range(len(x))]
    exits = torch.cat([s.exits for s in single])
    logits = torch.cat([s.logits for s in single])
    assert torch.equal(batched.exits, exits)
    assert torch.equal(batched.logits.argmax(1), logits.argmax(1))
    assert torch.allclose(batched.logits, logits, atol=1e-10)
    assert 0 < int((exits < len(model.positions)).sum()) < len(x)  # a real mixture
    # the exits agree with the all-exits simulation used for calibration
    _, preds = exit_predictions(model, x, rule)
    sim_exits, _ = simulate(scores, preds, preds[:, -1], q)
    assert torch.equal(sim_exits, batched.exits)


def test_early_exit_really_skips_work() -> None:
    model = _model("resnet14")
    x = torch.rand(50, *SHAPE)
    q = _mixed_threshold(model, x)
    seen: dict[int, int] = {}
    units = [model.get_submodule(u[-1][1]) for u in model.plan.units]
    handles = [
        m.register_forward_pre_hook(
            lambda mod, inp, i=i: seen.__setitem__(i, seen.get(i, 0) + len(inp[0]))
        )
        for i, m in enumerate(units)
    ]
    try:
        with torch.no_grad():
            out = model.early_exit(x, q)
        for u in range(len(units)):
            before = sum(1 for p in model.positions if p < u)  # ICs an input passed before unit u
            expected = int((out.exits >= before).sum())
            assert seen.get(u, 0) == expected
        assert seen[len(units) - 1] < len(x)
        seen.clear()
        with torch.no_grad():
            model.early_exit(x, 1e-6)  # every input leaves at the first IC
        assert seen.get(len(units) - 1, 0) == 0
    finally:
        for h in handles:
            h.remove()


def test_bad_positions_and_thresholds_are_refused() -> None:
    backbone = build_model("resnet8", 1, 10, 8)
    with pytest.raises(RobustlabError, match="do not fit this backbone"):
        attach_exits(backbone, SHAPE, 10, [7])
    with pytest.raises(RobustlabError, match="do not fit this backbone"):
        attach_exits(backbone, SHAPE, 10, [1, 1])
    with pytest.raises(RobustlabError, match="at least one internal exit"):
        attach_exits(backbone, SHAPE, 10, [])
    model = attach_exits(backbone, SHAPE, 10, [1])
    for q in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(RobustlabError, match=r"threshold must lie in \(0, 1\]"):
            model.early_exit(torch.rand(2, *SHAPE), q)
    with pytest.raises(RobustlabError, match="unknown exit rule"):
        model.early_exit(torch.rand(2, *SHAPE), 0.5, "margin")
    with pytest.raises(RobustlabError, match="zoo model"):
        attach_exits(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), SHAPE, 10)


def test_calibration_refuses_an_empty_split() -> None:
    model = _model()
    empty = Dataset(torch.zeros(0, *SHAPE), torch.zeros(0, dtype=torch.long), 10, "x")
    for data in (None, empty):
        with pytest.raises(RobustlabError, match="non-empty calibration split"):
            calibrate(model, data)


def test_calibration_picks_the_cheapest_threshold_on_the_calibration_split(
    digits: DataSplits,
) -> None:
    model = _model()
    calib = digits.train.head(300)
    result = calibrate(model, calib, (0.05, 0.15))
    scores, preds = exit_predictions(model, calib.x, "max_softmax")
    final = float((preds[:, -1] == calib.y).float().mean())
    costs = torch.tensor(model.exit_costs(), dtype=torch.float64)
    costs = costs / costs[-1]
    assert result.final_accuracy == pytest.approx(final)
    assert result.samples == 300
    for key, drop in (("5%", 0.05), ("15%", 0.15)):
        q = result.thresholds[key]
        exits, right = simulate(scores, preds, calib.y, q)
        assert float(right.float().mean()) >= (1 - drop) * final - 1e-9
        cost = float(costs[exits].mean())
        # no threshold on a fine grid is cheaper while meeting the accuracy bar
        for q2 in torch.linspace(0.01, 1, 200).tolist():
            e2, r2 = simulate(scores, preds, calib.y, q2)
            if float(r2.float().mean()) >= (1 - drop) * final - 1e-9:
                assert float(costs[e2].mean()) >= cost - 1e-9
    # only the calibration data matters: the same split gives the same thresholds
    assert calibrate(model, calib, (0.05, 0.15)).thresholds == result.thresholds


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = _model("resnet8", [1, 2])
    model.threshold = 0.7
    with torch.no_grad():
        for head in model.exit_heads:
            head.alpha_logit.fill_(0.3)
    config = model_config("resnet8", 1, 10, 8, [0.0], [1.0])
    save_checkpoint(model, tmp_path / "me", {"model": {**config, "multi_exit": model.config()}})
    loaded = robustlab.load(tmp_path / "me")
    assert isinstance(loaded, MultiExitNetwork)
    assert loaded.positions == [1, 2] and loaded.threshold == 0.7 and not loaded.training
    x = torch.rand(6, *SHAPE)
    for a, b in zip(model.all_exits(x), loaded.all_exits(x), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(model.early_exit(x).exits, loaded.early_exit(x).exits)


def test_attacks_accept_a_multi_exit_model() -> None:
    model = _model()
    x, y = torch.rand(4, *SHAPE), torch.randint(0, 10, (4,))
    x_adv = PGD(eps=0.1, steps=2)(model, x, y)
    assert bool(PGD(eps=0.1).threat.contains(x, x_adv).all())
    assert model.output == "final" and not model.training


def test_confidence_rules() -> None:
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert confidence(logits, "max_softmax")[1] == pytest.approx(1 / 3)
    assert confidence(logits, "entropy")[1] == pytest.approx(0.0, abs=1e-6)
    assert float(confidence(logits, "entropy")[0]) > 0.99

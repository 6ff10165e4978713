"""DeepSloth: examples stay in the threat model, slow a trained multi-exit network down."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from robustlab.analysis.efficiency import calibrate, measure_efficiency
from robustlab.attacks.deepsloth import (
    DeepSloth,
    ExitPGD,
    apply,
    class_universal_perturbations,
    project_ball,
    universal_perturbation,
)
from robustlab.core.threat import ThreatModel
from robustlab.data import DataSplits
from robustlab.errors import RobustlabError
from robustlab.models import build_model
from robustlab.models.multiexit import MultiExitNetwork, attach_exits
from robustlab.train import TrainConfig, train
from robustlab.train.sdn import SDNConfig, train_exits

EPS = {"linf": 0.1, "l2": 0.5, "l1": 4.0}


@pytest.fixture(scope="module")
def trained(digits: DataSplits, tmp_path_factory: pytest.TempPathFactory) -> MultiExitNetwork:
    """A resnet8 on digits with three trained ICs and a threshold for a 15 % drop."""
    cfg = TrainConfig(arch="resnet8", data="digits", epochs=4, arch_options={"width": 8})
    result = train(cfg, Path(tmp_path_factory.mktemp("ds")), splits=digits, progress=False)
    torch.manual_seed(0)
    model = attach_exits(result.model, (1, 8, 8), 10, [0, 1, 2])
    fit, held = digits.train.subset(slice(200, None)), digits.train.head(200)
    train_exits(model, fit, SDNConfig(epochs=4), progress=False)
    model.threshold = calibrate(model, held, (0.15,)).thresholds["15%"]
    return model


@pytest.fixture(scope="module")
def batch(digits: DataSplits) -> tuple[torch.Tensor, torch.Tensor]:
    return digits.test.x[:60], digits.test.y[:60]


def _state(model: MultiExitNetwork) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("optimizer", ["pgd", "apgd"])
def test_examples_stay_in_the_threat_model_and_the_model_is_untouched(
    trained: MultiExitNetwork,
    batch: tuple[torch.Tensor, torch.Tensor],
    norm: str,
    optimizer: str,
) -> None:
    x, y = batch
    before = _state(trained)
    attack = DeepSloth(norm=norm, eps=EPS[norm], steps=5, optimizer=optimizer, restarts=2)
    x_adv = attack(trained, x, y)
    assert bool(ThreatModel(norm, EPS[norm]).contains(x, x_adv).all())
    assert not trained.training and trained.output == "final"
    assert all(torch.equal(v, before[k]) for k, v in trained.state_dict().items())
    assert all(p.requires_grad for p in trained.parameters())


def test_deepsloth_lowers_efficacy(
    trained: MultiExitNetwork, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = batch
    clean = measure_efficiency(trained, x, y, latency_samples=0)
    assert clean.efficacy > 0.2
    ours = DeepSloth(eps=0.1, steps=30)
    paper = DeepSloth(eps=0.1, steps=30, objective="uniform", optimizer="pgd")
    ours_eff = measure_efficiency(trained, ours(trained, x, y), y, latency_samples=0).efficacy
    paper_eff = measure_efficiency(trained, paper(trained, x, y), y, latency_samples=0).efficacy
    assert paper_eff < 0.85 * clean.efficacy
    assert ours_eff < 0.85 * clean.efficacy
    assert ours_eff <= paper_eff + 0.02
    cost = DeepSloth(eps=0.1, steps=30, objective="cost")
    x_adv = cost(trained, x, y)
    assert bool(cost.threat.contains(x, x_adv).all())
    assert measure_efficiency(trained, x_adv, y, latency_samples=0).efficacy < 0.85 * clean.efficacy


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_universal_perturbations_stay_in_the_ball(
    trained: MultiExitNetwork, digits: DataSplits, norm: str
) -> None:
    x, y = digits.train.x[:200], digits.train.y[:200]
    delta = universal_perturbation(trained, x, norm=norm, eps=EPS[norm], epochs=2)
    assert delta.shape == (1, 1, 8, 8)
    threat = ThreatModel(norm, EPS[norm])
    assert float(threat.norms(delta)[0]) <= EPS[norm] * (1 + 1e-5)
    assert bool(threat.contains(x, apply(x, delta)).all())
    deltas = class_universal_perturbations(trained, x, y, 10, norm=norm, eps=EPS[norm], epochs=1)
    assert deltas.shape == (10, 1, 8, 8)
    assert bool(threat.contains(x, apply(x, deltas[y])).all())


def test_universal_perturbation_slows_down_unseen_inputs(
    trained: MultiExitNetwork, digits: DataSplits, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = batch
    delta = universal_perturbation(trained, digits.train.x[:400], eps=0.2, epochs=5)
    clean = measure_efficiency(trained, x, y, latency_samples=0).efficacy
    attacked = measure_efficiency(trained, apply(x, delta), y, latency_samples=0).efficacy
    assert attacked < clean


@pytest.mark.parametrize("target", ["final", "avg", "max"])
def test_pgd_baselines(
    trained: MultiExitNetwork, batch: tuple[torch.Tensor, torch.Tensor], target: str
) -> None:
    x, y = batch
    x_adv = ExitPGD(eps=0.1, steps=5, target=target)(trained, x, y)
    assert bool(ThreatModel("linf", 0.1).contains(x, x_adv).all())


def test_black_box_transfer_from_a_surrogate(
    trained: MultiExitNetwork, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = batch
    torch.manual_seed(1)
    surrogate = attach_exits(build_model("resnet8", 1, 10, 8, width=8), (1, 8, 8), 10, [1, 2])
    surrogate.threshold = 0.5
    x_adv = DeepSloth(eps=0.1, steps=5)(surrogate.eval(), x, y)
    assert bool(ThreatModel("linf", 0.1).contains(x, x_adv).all())
    measure_efficiency(trained, x_adv, y, latency_samples=0)


def test_l1_ball_projection() -> None:
    torch.manual_seed(0)
    d = torch.randn(5, 1, 4, 4)
    p = project_ball(d, "l1", 2.0)
    assert torch.allclose(p.flatten(1).abs().sum(1), torch.full((5,), 2.0), atol=1e-5)
    small = d * 0.01
    assert torch.equal(project_ball(small, "l1", 100.0), small)
    assert float(project_ball(d, "l2", 1.0).flatten(1).norm(dim=1).max()) <= 1 + 1e-6


def test_bad_input_is_refused(
    trained: MultiExitNetwork, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = batch
    with pytest.raises(RobustlabError, match="multi-exit network"):
        DeepSloth(eps=0.1)(build_model("resnet8", 1, 10, 8).eval(), x, y)
    with pytest.raises(RobustlabError, match="objective"):
        DeepSloth(objective="flat")
    with pytest.raises(RobustlabError, match="optimizer"):
        DeepSloth(optimizer="adam")
    with pytest.raises(RobustlabError, match="eps must be"):
        DeepSloth(eps=-0.1)
    with pytest.raises(RobustlabError, match=r"threshold must lie in \(0, 1\]"):
        DeepSloth(threshold=1.5)
    with pytest.raises(RobustlabError, match="target"):
        ExitPGD(target="mean")

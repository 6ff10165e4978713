"""Training exits: IC-only keeps the backbone, end-to-end trains it, adversarial variants run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from robustlab.data import DataSplits
from robustlab.errors import RobustlabError
from robustlab.models import build_model
from robustlab.models.multiexit import MultiExitNetwork, attach_exits
from robustlab.train import TrainConfig, train
from robustlab.train.sdn import (
    SDNConfig,
    exit_accuracies,
    head_features,
    ic_weights,
    train_exits,
)


@pytest.fixture(scope="module")
def backbone_state(
    digits: DataSplits, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, torch.Tensor]:
    cfg = TrainConfig(arch="resnet8", data="digits", epochs=4, arch_options={"width": 8})
    out = tmp_path_factory.mktemp("sdn") / "bb"
    result = train(cfg, Path(out), splits=digits, progress=False)
    return {k: v.clone() for k, v in result.model.state_dict().items()}


def _fresh(state: dict[str, torch.Tensor]) -> MultiExitNetwork:
    torch.manual_seed(0)
    backbone = build_model("resnet8", 1, 10, 8, width=8)
    backbone.load_state_dict(state)
    return attach_exits(backbone, (1, 8, 8), 10, [0, 1, 2])


def test_ic_only_trains_heads_and_keeps_the_backbone(
    digits: DataSplits, backbone_state: dict[str, torch.Tensor]
) -> None:
    model = _fresh(backbone_state)
    before = exit_accuracies(model, digits.test)
    record = train_exits(model, digits.train, SDNConfig(epochs=4), progress=False)
    for k, v in model.backbone.state_dict().items():  # weights and BN statistics untouched
        assert torch.equal(v, backbone_state[k]), k
    after = exit_accuracies(model, digits.test)
    assert after[-1] == before[-1]
    assert after[2] > 0.5 and after[2] > before[2] + 0.2  # the last IC learnt
    assert len(record["loss_per_epoch"]) == 4
    assert record["loss_per_epoch"][-1] < record["loss_per_epoch"][0]
    assert not model.training and all(p.requires_grad for p in model.parameters())


def test_end_to_end_trains_everything(
    digits: DataSplits, backbone_state: dict[str, torch.Tensor]
) -> None:
    model = _fresh(backbone_state)
    train_exits(
        model, digits.train.head(256), SDNConfig(mode="end-to-end", epochs=1), progress=False
    )
    changed = [
        k
        for k, v in model.backbone.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, backbone_state[k])
    ]
    assert changed


def test_sdn_weight_schedule(backbone_state: dict[str, torch.Tensor]) -> None:
    model = _fresh(backbone_state)
    costs = model.exit_costs()
    caps = [c / costs[-1] for c in costs[:-1]]
    assert ic_weights(model, 0.0) == pytest.approx([0.01] * 3)
    assert ic_weights(model, 1.0) == pytest.approx(caps)
    mid = ic_weights(model, 0.5)
    assert all(0.01 < w <= cap for w, cap in zip(mid, caps, strict=True))


@pytest.mark.parametrize("adversary", ["pgd", "deepsloth"])
def test_adversarial_exit_training_runs(
    digits: DataSplits, backbone_state: dict[str, torch.Tensor], adversary: str
) -> None:
    model = _fresh(backbone_state)
    cfg = SDNConfig(epochs=1, adversary=adversary, adv_eps=0.1, adv_steps=2, batch_size=64)
    record = train_exits(model, digits.train.head(128), cfg, progress=False)
    assert record["config"]["adversary"] == adversary
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, backbone_state[k]), k


def test_bad_configs_are_refused() -> None:
    with pytest.raises(RobustlabError, match="training mode"):
        SDNConfig(mode="heads")
    with pytest.raises(RobustlabError, match="adversary"):
        SDNConfig(adversary="fgsm")
    with pytest.raises(RobustlabError, match="eps > 0"):
        SDNConfig(adversary="pgd", adv_eps=0.0)
    with pytest.raises(RobustlabError, match="epochs >= 1"):
        SDNConfig(epochs=0)
    with pytest.raises(RobustlabError, match="lr must be a finite number, got inf"):
        SDNConfig(lr=math.inf)
    with pytest.raises(RobustlabError, match="weight_decay must be a finite number"):
        SDNConfig(weight_decay=math.nan)
    with pytest.raises(RobustlabError, match="adv_eps must be a finite number"):
        SDNConfig(adversary="pgd", adv_eps=math.nan)


def test_diverging_exit_training_stops_with_an_error(
    digits: DataSplits, backbone_state: dict[str, torch.Tensor]
) -> None:
    model = _fresh(backbone_state)
    cfg = SDNConfig(mode="end-to-end", epochs=2, lr=1e30)
    with pytest.raises(RobustlabError, match="diverged in epoch 1"):
        train_exits(model, digits.train.head(256), cfg, progress=False)
    assert not model.training and all(p.requires_grad for p in model.parameters())


def test_cached_features_give_the_heads_logits(
    digits: DataSplits, backbone_state: dict[str, torch.Tensor]
) -> None:
    model = _fresh(backbone_state).eval()
    x = digits.test.x[:30]
    cached = head_features(model, x, batch_size=7)
    outs = model.all_exits(x)
    for head, parts, out in zip(model.exit_heads, cached, outs, strict=False):
        assert torch.allclose(head.classify(parts), out, atol=1e-6)

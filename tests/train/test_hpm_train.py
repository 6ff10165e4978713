"""HPM fine-tuning on digits: it trains what it says, moves the prototypes by the EMA formula,
and gives an HPM head as accurate as the FC head it keeps."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from robustlab.data import DataSplits
from robustlab.errors import RobustlabError
from robustlab.models.hpm import HPMClassifier, HPMConfig, init_prototypes
from robustlab.models.structure import declare_features
from robustlab.train.hpm import HPMTrainConfig, clean_accuracies, finetune_hpm, tuned_parameters

QUICK = HPMTrainConfig(eps=0.1, steps=2, epochs=2, batch_size=64)


def hpm_of(net: nn.Module, **options: Any) -> HPMClassifier:
    """An HPM head on a private copy of a network (the shared fixture stays untouched)."""
    return HPMClassifier(copy.deepcopy(net), HPMConfig(**options))


def test_fine_tuning_trains_an_untrained_head_into_an_accurate_hpm(
    digits_net: nn.Module, digits: DataSplits
) -> None:
    model = hpm_of(digits_net)
    fc = model.base.get_submodule("net.fc")
    assert isinstance(fc, nn.Linear)
    torch.manual_seed(3)
    fc.reset_parameters()  # the FC head (which makes the assignments) starts untrained
    test = digits.test
    init_prototypes(model, digits.train.x, digits.train.y)
    before = clean_accuracies(model, test, 128)
    record = finetune_hpm(model, digits.train, QUICK, progress=False)
    after = clean_accuracies(model, test, 128)
    assert before["fc"] < 0.5 and before["hpm_mix"] < after["hpm_mix"] - 0.05
    # FC accuracy after these 2 quick epochs ranges 0.84-0.92 over seeds 0-8 (its random starts)
    assert after["fc"] > 0.83
    assert after["hpm_mix"] >= after["fc"] - 0.03 and after["hpm_ema"] >= after["fc"] - 0.05
    assert (
        len(record["loss_per_epoch"]) == 2 and record["tuned_parameters"] == fc.weight.numel() + 10
    )
    assert not model.training


def test_head_tuning_changes_only_the_head_and_restores_requires_grad(
    digits_net: nn.Module, digits: DataSplits
) -> None:
    model = hpm_of(digits_net)
    fc = model.base.get_submodule("net.fc")
    model.base.get_submodule("net.stem.0").weight.requires_grad_(
        False
    )  # a flag of the caller's, kept
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    finetune_hpm(model, digits.train.head(128), QUICK, progress=False)
    head = {f"base.net.fc.{k}" for k, _ in fc.named_parameters()}
    for name, value in model.state_dict().items():
        changed = not torch.equal(value, before[name])
        assert changed == (name in head or name in ("prototypes", "distance_unit")), name
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_last_block_tuning_also_trains_the_last_unit_of_the_plan(digits_net: nn.Module) -> None:
    model = hpm_of(digits_net)
    names = {id(p): n for n, p in model.named_parameters()}
    head = {names[id(p)] for p in tuned_parameters(model, "head")}
    last = {names[id(p)] for p in tuned_parameters(model, "last-block")}
    assert head == {"base.net.fc.weight", "base.net.fc.bias"}
    assert last - head and all(n.startswith("base.net.blocks.2.") for n in last - head)


def test_each_step_moves_the_prototypes_by_the_ema_formula(
    digits_net: nn.Module, digits: DataSplits
) -> None:
    model = hpm_of(digits_net, momentum=0.7)
    keep = digits.train.y < 3  # classes 3..9 are absent from the training batch
    data = digits.train.subset(keep.nonzero().flatten()).head(40)
    torch.manual_seed(5)
    start = torch.randn_like(model.prototypes)
    with torch.no_grad():
        model.prototypes.copy_(start)
        f, _ = model.eval().features_and_logits(data.x)  # the features tuning the head keeps
    cfg = HPMTrainConfig(eps=0.1, steps=1, epochs=1, batch_size=40)
    finetune_hpm(model, data, cfg, progress=False, init=False)  # one batch: one EMA step
    for c in range(3):
        expected = 0.7 * start[c] + 0.3 * f[data.y == c].mean(0)
        torch.testing.assert_close(model.prototypes[c], expected)
    assert torch.equal(model.prototypes[3:], start[3:])


@pytest.mark.parametrize(
    ("options", "sentence"),
    [
        ({"tune": "all"}, "unknown --tune 'all'; use head or last-block"),
        ({"batch_size": 0}, "batch size >= 1"),
        ({"epochs": 0}, "epochs >= 1"),
        ({"lr": 0.0}, "learning rate must be > 0"),
        ({"eps": 0.0}, "needs eps > 0"),
        ({"fc_weight": -1.0}, "FC loss weight must be >= 0"),
        ({"norm": "l3"}, "l3"),
    ],
)
def test_bad_fine_tuning_settings_are_refused(options: dict[str, Any], sentence: str) -> None:
    with pytest.raises(RobustlabError, match=sentence):
        HPMTrainConfig(**options)


def test_last_block_tuning_of_a_foreign_model_says_why_not() -> None:
    class Foreign(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.fc(x)
            return out

    undo = declare_features(Foreign, "fc")
    try:
        with pytest.raises(RobustlabError, match="Normalize followed by a registered network"):
            tuned_parameters(HPMClassifier(Foreign()), "last-block")
    finally:
        undo()

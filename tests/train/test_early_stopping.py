"""The held-out robustness check: robust early stopping keeps (and names) the best epoch's
weights, the catastrophic-overfitting check catches a collapse and rolls the model and the
optimiser back, both survive a resume, the held-out points are not trained on, and options
that do not apply to a method are refused in one sentence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from robustlab.core.threat import ThreatModel
from robustlab.data import DataSplits, load_data
from robustlab.errors import RobustlabError
from robustlab.models import build_model
from robustlab.models.checkpoint import load_checkpoint
from robustlab.train import (
    DEFAULT_HOLDOUT,
    EpochEnd,
    EpochSampler,
    HeldOutCheck,
    Hook,
    Step,
    TrainConfig,
    accuracy,
    fit,
    make_method,
    robust_accuracy,
    train,
    training_splits,
)

MLP: dict[str, Any] = {"arch": "mlp", "data": "digits", "channels_last": False}


@pytest.fixture(scope="module")
def held() -> DataSplits:
    """digits with 200 training samples held out."""
    return load_data("digits", calibration=200, seed=0)


class _Weights(Hook):
    """Keeps a copy of the model's (and optimiser's) state after every epoch."""

    def __init__(self) -> None:
        self.model: dict[int, dict[str, torch.Tensor]] = {}
        self.optimizer: dict[int, dict[Any, Any]] = {}

    def end_epoch(self, end: EpochEnd) -> None:
        self.model[end.epoch] = {k: v.clone() for k, v in end.model.state_dict().items()}
        opt = end.optimizer.state_dict()
        self.optimizer[end.epoch] = {
            i: {k: v.clone() for k, v in s.items()} for i, s in opt["state"].items()
        }


class _Wreck(Hook):
    """At the end of one epoch (before the check runs), zeroes every weight: the model then
    predicts one class for every input, so its robust accuracy collapses."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def end_epoch(self, end: EpochEnd) -> None:
        if end.epoch == self.epoch:
            with torch.no_grad():
                for p in end.model.parameters():
                    p.zero_()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _saved(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).model.state_dict()


def test_early_stopping_keeps_and_names_the_best_epoch(tmp_path: Path, held: DataSplits) -> None:
    cfg = TrainConfig(**MLP, method="pgd-at", eps=0.1, steps=1, epochs=3, early_stop=True)
    weights = _Weights()
    result = train(cfg, tmp_path, splits=held, progress=False, hooks=[weights, _Wreck(3)])
    training = result.manifest["training"]
    accs = training["held_out_check"]["robust_accuracy"]
    assert len(accs) == 3 and accs[2] < max(accs[:2])  # the wrecked last epoch is not the best
    best = training["best_epoch"]
    assert best == 1 + accs.index(max(accs)) and best != 3
    assert _same(_saved(tmp_path), weights.model[best])
    assert "overfitting" not in training and "stopped_after_epoch" not in training
    check = training["held_out_check"]
    assert (check["attack"], check["steps"], check["eps"], check["points"]) == ("pgd", 10, 0.1, 200)


def test_without_early_stopping_the_last_epoch_is_kept(tmp_path: Path, held: DataSplits) -> None:
    cfg = TrainConfig(**MLP, method="pgd-at", eps=0.1, steps=1, epochs=2, overfit_drop=0.9)
    weights = _Weights()
    result = train(cfg, tmp_path, splits=held, progress=False, hooks=[weights])
    assert _same(_saved(tmp_path), weights.model[2])
    assert "best_epoch" not in result.manifest["training"]
    assert len(result.manifest["training"]["held_out_check"]["robust_accuracy"]) == 2


def test_a_collapse_is_detected_and_rolled_back(
    tmp_path: Path, held: DataSplits, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = TrainConfig(**MLP, method="fast-at", eps=0.1, epochs=5)  # the recipe's drop: 0.2
    weights = _Weights()
    result = train(cfg, tmp_path, splits=held, progress=False, hooks=[weights, _Wreck(3)])
    training = result.manifest["training"]
    assert training["overfit_drop"] == 0.2
    assert training["overfitting"] == {"detected_epoch": 3, "kept_epoch": 2}
    assert training["stopped_after_epoch"] == 3
    assert len(training["held_out_check"]["robust_accuracy"]) == 3
    assert _same(_saved(tmp_path), weights.model[2])
    assert not (tmp_path / "resume.pt").exists()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "catastrophic overfitting" in line]
    assert len(lines) == 1
    assert "after epoch 3" in lines[0] and "rolled back to epoch 2 and stopped" in lines[0]


def test_the_rollback_restores_the_model_and_the_optimiser(held: DataSplits) -> None:
    torch.manual_seed(0)
    model = build_model("mlp", 1, 10, 8, mean=held.mean, std=held.std)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    method = make_method("fast-at", eps=0.1, eps_warmup=0.3)
    check = HeldOutCheck(held.calibration, ThreatModel("linf", 0.1), drop=0.2)  # type: ignore[arg-type]
    weights = _Weights()
    history = fit(
        model,
        method,
        opt,
        held.train.x,
        held.train.y,
        EpochSampler(len(held.train), torch.Generator().manual_seed(0)),
        batch_size=64,
        epochs=4,
        lr=0.05,
        gen=torch.Generator().manual_seed(1),
        hooks=[weights, _Wreck(3), check],
    )
    assert check.accuracies[1] > 0.4  # the model had learnt something before the wreck
    assert len(history) == 3 and check.collapsed_at == 3
    assert _same(model.state_dict(), weights.model[2])
    state = opt.state_dict()["state"]
    assert state.keys() == weights.optimizer[2].keys()
    for i, s in state.items():
        assert _same(s, weights.optimizer[2][i])
    assert not _same(state[0], weights.optimizer[3][0])  # epoch 3 had moved it on


def test_no_collapse_no_rollback(tmp_path: Path, held: DataSplits) -> None:
    cfg = TrainConfig(**MLP, method="fast-at", eps=0.1, epochs=2)
    result = train(cfg, tmp_path, splits=held, progress=False)
    assert "overfitting" not in result.manifest["training"]
    assert "stopped_after_epoch" not in result.manifest["training"]


def test_early_stopping_resumes_to_the_same_best_epoch(tmp_path: Path, held: DataSplits) -> None:
    cfg = TrainConfig(**MLP, method="pgd-at", eps=0.1, steps=1, epochs=3, early_stop=True)
    whole = train(cfg, tmp_path / "whole", splits=held, progress=False, hooks=[_Wreck(3)])
    part = tmp_path / "part"
    train(cfg, part, splits=held, progress=False, hooks=[_Wreck(3)], stop_after_epochs=2)
    resumed = train(cfg, part, splits=held, progress=False, hooks=[_Wreck(3)])
    assert _same(_saved(tmp_path / "whole"), _saved(part))
    for key in ("best_epoch", "held_out_check"):
        assert resumed.manifest["training"][key] == whole.manifest["training"][key]


def test_robust_accuracy_at_eps_zero_is_clean_accuracy(held: DataSplits) -> None:
    torch.manual_seed(0)
    model: nn.Module = build_model("mlp", 1, 10, 8, width=16)
    data = held.test
    assert robust_accuracy(model, data, ThreatModel("linf", 0.0)) == accuracy(model, data)
    assert robust_accuracy(model, data, ThreatModel("linf", 0.3)) < accuracy(model, data)


def test_the_held_out_points_are_not_trained_on(held: DataSplits) -> None:
    cfg = TrainConfig(**MLP, method="pgd-at", eps=0.1, early_stop=True)
    splits = training_splits(cfg)
    assert splits.calibration is not None and len(splits.calibration) == DEFAULT_HOLDOUT
    full = training_splits(TrainConfig(**MLP))
    assert full.calibration is None
    assert len(splits.train) + DEFAULT_HOLDOUT == len(full.train)
    # the loop only ever sees the training split's indices
    seen: set[int] = set()

    class _Indices(Hook):
        def before_forward(self, step: Step) -> None:
            seen.update(step.index.tolist())

    torch.manual_seed(0)
    model = build_model("mlp", 1, 10, 8, width=8)
    fit(
        model,
        make_method("standard"),
        torch.optim.SGD(model.parameters(), lr=0.01),
        splits.train.x,
        splits.train.y,
        EpochSampler(len(splits.train), torch.Generator().manual_seed(0)),
        batch_size=256,
        epochs=1,
        lr=0.01,
        gen=torch.Generator(),
        hooks=[_Indices()],
    )
    assert seen == set(range(len(splits.train)))


def test_a_check_without_held_out_data_is_refused(tmp_path: Path, digits: DataSplits) -> None:
    cfg = TrainConfig(**MLP, method="pgd-at", eps=0.1, early_stop=True)
    with pytest.raises(RobustlabError, match=r"hold some out \(--calibration N"):
        train(cfg, tmp_path / "out", splits=digits, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"eps": 0.1}, "--eps does not apply to method 'standard' (it takes no options)"),
        ({"norm": "l2"}, "--norm does not apply to method 'standard'"),
        ({"early_stop": True}, "--early-stop does not apply to method 'standard'"),
        ({"overfit_drop": 0.2}, "--overfit-drop does not apply to method 'standard'"),
        ({"method": "pgd-at", "eps": 0.1, "beta": 6.0}, "--beta does not apply to method 'pgd-at'"),
        ({"method": "pgd-at", "eps": 0.1, "replays": 4}, "--replays does not apply to method"),
        ({"method": "mart", "eps": 0.1, "replays": 4}, "--replays does not apply to method 'mart'"),
        ({"method": "fast-at", "eps": 0.1, "steps": 3}, "--steps does not apply to method"),
        ({"method": "free-at", "eps": 0.1, "alpha_ratio": 1.0}, "--alpha-ratio does not apply"),
        ({"method": "free-at", "eps": 0.1, "beta": 1.0}, "--beta does not apply to method"),
        ({"method": "pgd-at", "eps": 0.1, "overfit_drop": 1.5}, "drop must be a fraction in"),
    ],
)
def test_options_that_do_not_apply_are_refused_in_one_sentence(
    tmp_path: Path, held: DataSplits, options: dict[str, Any], message: str
) -> None:
    cfg = TrainConfig(**{**MLP, **options})
    with pytest.raises(RobustlabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(cfg, tmp_path / "out", splits=held, progress=False)
    assert not (tmp_path / "out").exists()
    if "drop" not in message:
        with pytest.raises(RobustlabError, match="does not apply"):
            cfg.make_method()

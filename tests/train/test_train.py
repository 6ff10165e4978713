"""The training loop: determinism, resumption, manifests, methods, and bad input."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from robustlab.attacks import PGD
from robustlab.data import DataSplits
from robustlab.errors import RobustlabError
from robustlab.evaluate import evaluate
from robustlab.models.checkpoint import load_checkpoint
from robustlab.train import (
    METHODS,
    PGDAT,
    RECIPES,
    TRADES,
    Hook,
    Step,
    TrainConfig,
    lr_at,
    make_method,
    train,
)
from robustlab.train.cache import config_key

FAST: dict[str, Any] = {
    "arch": "resnet8",
    "data": "digits",
    "epochs": 2,
    "arch_options": {"width": 8},
}


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_is_deterministic_for_a_seed(tmp_path: Path, digits: DataSplits) -> None:
    cfg = TrainConfig(**FAST)
    a = train(cfg, tmp_path / "a", splits=digits, progress=False)
    b = train(cfg, tmp_path / "b", splits=digits, progress=False)
    c = train(TrainConfig(**{**FAST, "seed": 1}), tmp_path / "c", splits=digits, progress=False)
    assert _same(_weights(a.model), _weights(b.model))
    assert not _same(_weights(a.model), _weights(c.model))


@pytest.mark.parametrize("method", ["standard", "pgd-at"])
def test_interrupted_run_resumes_to_the_same_weights(
    tmp_path: Path, digits: DataSplits, method: str
) -> None:
    adversarial: dict[str, Any] = {"eps": 0.1, "steps": 2} if method != "standard" else {}
    cfg = TrainConfig(**FAST, method=method, **adversarial)
    whole = train(cfg, tmp_path / "whole", splits=digits, progress=False)
    part = train(cfg, tmp_path / "part", splits=digits, progress=False, stop_after_epochs=1)
    assert part.manifest.get("unfinished")
    assert (tmp_path / "part" / "resume.pt").exists()
    resumed = train(cfg, tmp_path / "part", splits=digits, progress=False)
    assert not (tmp_path / "part" / "resume.pt").exists()
    assert _same(_weights(whole.model), _weights(resumed.model))
    assert resumed.manifest["metrics"] == whole.manifest["metrics"]


def test_resume_with_another_configuration_is_refused(tmp_path: Path, digits: DataSplits) -> None:
    train(TrainConfig(**FAST), tmp_path, splits=digits, progress=False, stop_after_epochs=1)
    other = TrainConfig(**{**FAST, "lr": 0.01})
    with pytest.raises(RobustlabError, match="unfinished run with a different configuration"):
        train(other, tmp_path, splits=digits, progress=False)


def test_manifest_describes_the_run_and_reloads(tmp_path: Path, digits: DataSplits) -> None:
    result = train(TrainConfig(**FAST), tmp_path, splits=digits, progress=False)
    m = result.manifest
    assert m["model"]["arch"] == "resnet8" and m["model"]["options"] == {"width": 8}
    assert m["dataset"]["name"] == "digits"
    assert m["training"]["method"] == "standard" and m["training"]["epochs"] == 2
    assert m["training"]["lr"] == RECIPES["standard"]["lr"]  # filled from the recipe
    assert 0.5 < m["metrics"]["clean_accuracy"] <= 1.0
    assert m["train_time_s"] > 0 and len(m["weights"]["sha256"]) == 64
    loaded = load_checkpoint(tmp_path)
    x = digits.test.x[:16]
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), result.model.eval()(x), atol=1e-5)


def test_adversarial_training_buys_robustness(tmp_path: Path, digits: DataSplits) -> None:
    base: dict[str, Any] = {
        "arch": "mlp",
        "data": "digits",
        "epochs": 6,
        "arch_options": {"width": 64},
    }
    std = train(TrainConfig(**base), tmp_path / "std", splits=digits, progress=False)
    adv = train(
        TrainConfig(**base, method="pgd-at", eps=0.1, steps=5),
        tmp_path / "adv",
        splits=digits,
        progress=False,
    )
    attack = PGD(eps=0.1, steps=10)
    r_std = evaluate(std.model, digits.test, attack, progress=False).robust_accuracy
    r_adv = evaluate(adv.model, digits.test, attack, progress=False).robust_accuracy
    assert r_adv > r_std + 0.15


def test_trades_trains(tmp_path: Path, digits: DataSplits) -> None:
    cfg = TrainConfig(arch="mlp", data="digits", method="trades", eps=0.1, epochs=2, steps=2)
    result = train(cfg, tmp_path, splits=digits, progress=False)
    assert result.manifest["training"]["method_config"]["beta"] == 6.0
    assert result.manifest["metrics"]["clean_accuracy"] > 0.3


def test_one_cycle_schedule() -> None:
    lrs = [lr_at(s, 100, 0.1) for s in range(100)]
    assert max(lrs) == pytest.approx(0.1)
    assert lrs[0] < lrs[10] and lrs[-1] < 0.001
    assert all(a >= b for a, b in zip(lrs[15:], lrs[16:], strict=False))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "sgd"}, "unknown training method 'sgd'"),
        ({"method": "pgd-at"}, "needs --eps"),
        ({"method": "pgd-at", "eps": -0.1}, "eps must be a finite number >= 0"),
        ({"method": "pgd-at", "eps": 0.0}, "needs eps > 0"),
        ({"method": "pgd-at", "eps": 0.1, "norm": "l7"}, "unknown norm 'l7'"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"lr": -1.0}, "learning rate must be > 0"),
        ({"batch_size": 0}, "batch size must be >= 1"),
        ({"arch": "resnet9000"}, "unknown architecture 'resnet9000'"),
    ],
)
def test_bad_training_input(
    tmp_path: Path, digits: DataSplits, kwargs: dict[str, object], message: str
) -> None:
    cfg = TrainConfig(**{**FAST, **kwargs})
    with pytest.raises(RobustlabError, match=message):
        train(cfg, tmp_path, splits=digits, progress=False)


def test_make_method_rejects_unknown_options() -> None:
    with pytest.raises(RobustlabError, match="bad option for method 'pgd-at'"):
        make_method("pgd-at", eps=0.1, gamma=3)


def test_methods_are_registered_and_own_their_options() -> None:
    assert {"standard", "pgd-at", "trades"} <= set(METHODS)
    trades = TrainConfig(method="trades", eps=0.1, beta=2.0).make_method()
    assert isinstance(trades, TRADES) and trades.beta == 2.0
    pgd = TrainConfig(method="pgd-at", eps=0.1).make_method()
    assert isinstance(pgd, PGDAT) and "beta" not in pgd.config()
    with pytest.raises(RobustlabError, match="--beta does not apply to method 'pgd-at'"):
        TrainConfig(method="pgd-at", eps=0.1, beta=2.0).make_method()  # beta is TRADES' own
    with pytest.raises(RobustlabError, match="bad option for method 'pgd-at'"):
        make_method("pgd-at", eps=0.1, beta=2.0)
    with pytest.raises(RobustlabError, match="beta must be a finite number, got nan"):
        make_method("trades", eps=0.1, beta=math.nan)
    with pytest.raises(RobustlabError, match="trades needs beta >= 0"):
        make_method("trades", eps=0.1, beta=-1.0)


# Recorded from 0be4c77, before the loop took hooks and a sampler: the demo's model cache key
# hashes the resolved config, and the manifest's training section is what users' records hold.
# A change here would retrain every cached model and change every record.
# Changed once since, on purpose (issue 15): a method option the config leaves unset is
# recorded as None instead of a default some methods ignored (beta 6.0 for pgd-at, norm linf
# for standard); what the method used is in method_config. Options added since (alpha_ratio,
# replays, early_stop, overfit_drop) are recorded only when set, so these stay as they are.
_KEYS = {
    "9e63424f67ca09d9": TrainConfig(arch="resnet8", method="standard"),
    "2fdf2d6c7daae98c": TrainConfig(
        arch="resnet8", method="pgd-at", eps=0.3, epochs=10, steps=5, eps_warmup=0.3
    ),
    "ddd71e233753041f": TrainConfig(arch="resnet8", method="trades", eps=0.3, beta=3.0),
}
_COMMON = {
    "arch": "mlp",
    "arch_options": {},
    "batch_size": 64,
    "channels_last": True,
    "data": "digits",
    "epochs": 1,
    "lr": 0.05,
    "momentum": 0.9,
    "seed": 0,
    "weight_decay": 0.0005,
}
_ADV = {"alpha": 0.25, "alpha_ratio": 2.5, "eps": 0.1, "eps_warmup": 0.3, "steps": 1}
_TRAINING = [
    (
        {},
        {
            **_COMMON,
            "beta": None,
            "eps": None,
            "eps_warmup": None,
            "method": "standard",
            "method_config": {"name": "standard"},
            "norm": None,
            "steps": None,
        },
    ),
    (
        {"method": "pgd-at", "eps": 0.1, "steps": 1},
        {
            **_COMMON,
            "beta": None,
            "eps": 0.1,
            "eps_warmup": 0.3,
            "method": "pgd-at",
            "method_config": {**_ADV, "name": "pgd-at", "norm": "linf"},
            "norm": None,
            "steps": 1,
        },
    ),
    (
        {"method": "trades", "eps": 0.1, "steps": 1, "beta": 2.0, "norm": "l2"},
        {
            **_COMMON,
            "beta": 2.0,
            "eps": 0.1,
            "eps_warmup": 0.3,
            "method": "trades",
            "method_config": {**_ADV, "beta": 2.0, "name": "trades", "norm": "l2"},
            "norm": "l2",
            "steps": 1,
        },
    ),
]


def test_cache_key_config_is_unchanged_for_existing_methods() -> None:
    for key, cfg in _KEYS.items():
        assert config_key(cfg) == key, cfg.method


@pytest.mark.parametrize(("options", "expected"), _TRAINING)
def test_manifest_training_section_is_unchanged_for_existing_methods(
    tmp_path: Path, digits: DataSplits, options: dict[str, Any], expected: dict[str, object]
) -> None:
    cfg = TrainConfig(arch="mlp", data="digits", epochs=1, **options)
    result = train(cfg, tmp_path, splits=digits, progress=False)
    assert result.manifest["training"] == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": math.inf}, "lr must be a finite number, got inf"),
        ({"lr": math.nan}, "lr must be a finite number, got nan"),
        ({"momentum": math.nan}, "momentum must be a finite number"),
        ({"weight_decay": math.inf}, "weight_decay must be a finite number"),
        ({"method": "trades", "eps": 0.1, "beta": math.nan}, "beta must be a finite number"),
        ({"method": "mart", "eps": 0.1, "beta": math.inf}, "beta must be a finite number"),
        ({"method": "pgd-at", "eps": math.nan}, "eps must be a finite number"),
        ({"method": "pgd-at", "eps": 0.1, "eps_warmup": math.nan}, "eps_warmup must be a finite"),
        ({"momentum": 1.5}, "momentum must be in \\[0, 1\\)"),
        ({"weight_decay": -1e-4}, "weight decay must be >= 0"),
    ],
)
def test_non_finite_or_impossible_hyper_parameters_are_refused_before_any_work(
    tmp_path: Path, digits: DataSplits, kwargs: dict[str, Any], message: str
) -> None:
    cfg = TrainConfig(**{**FAST, **kwargs})
    with pytest.raises(RobustlabError, match=message):
        train(cfg, tmp_path / "out", splits=digits, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_diverging_run_stops_and_writes_no_checkpoint(tmp_path: Path, digits: DataSplits) -> None:
    cfg = TrainConfig(**{**FAST, "lr": 1e30})
    with pytest.raises(RobustlabError, match="training diverged in epoch 1.*no checkpoint"):
        train(cfg, tmp_path, splits=digits, progress=False)
    assert list(tmp_path.iterdir()) == []


class _PoisonInEpoch(Hook):
    """Makes a weight infinite after the first step of one epoch, so the next losses are NaN."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def after_step(self, step: Step) -> None:
        if step.epoch == self.epoch:
            with torch.no_grad():
                next(step.model.parameters()).fill_(math.inf)


def test_divergence_keeps_the_resume_state_of_the_last_good_epoch(
    tmp_path: Path, digits: DataSplits
) -> None:
    cfg = TrainConfig(**FAST)
    with pytest.raises(RobustlabError, match="diverged in epoch 2.*state after epoch 1 stays"):
        train(cfg, tmp_path / "run", splits=digits, progress=False, hooks=[_PoisonInEpoch(1)])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["resume.pt"]
    state = torch.load(tmp_path / "run" / "resume.pt", weights_only=True)
    assert state["epoch"] == 1
    good = train(cfg, tmp_path / "good", splits=digits, progress=False, stop_after_epochs=1)
    assert _same(state["model"], _weights(good.model))
    resumed = train(cfg, tmp_path / "run", splits=digits, progress=False)
    whole = train(cfg, tmp_path / "whole", splits=digits, progress=False)
    assert _same(_weights(resumed.model), _weights(whole.model))

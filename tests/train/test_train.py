"""The training loop: determinism, resumption, manifests, methods, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from robustlab.attacks import PGD
from robustlab.data import DataSplits
from robustlab.errors import RobustlabError
from robustlab.evaluate import evaluate
from robustlab.models.checkpoint import load_checkpoint
from robustlab.train import RECIPES, TrainConfig, lr_at, make_method, train

FAST = {"arch": "resnet8", "data": "digits", "epochs": 2, "arch_options": {"width": 8}}


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
    cfg = TrainConfig(**FAST, method=method, eps=0.1 if method != "standard" else None, steps=2)
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
    base = {"arch": "mlp", "data": "digits", "epochs": 6, "arch_options": {"width": 64}}
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
    cfg = TrainConfig(**{**FAST, **kwargs})  # type: ignore[arg-type]
    with pytest.raises(RobustlabError, match=message):
        train(cfg, tmp_path, splits=digits, progress=False)


def test_make_method_rejects_unknown_options() -> None:
    with pytest.raises(RobustlabError, match="bad option for method 'pgd-at'"):
        make_method("pgd-at", eps=0.1, gamma=3)

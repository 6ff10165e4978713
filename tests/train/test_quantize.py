"""Post-training int8 quantization: it agrees with the float model, its checkpoint reloads to
identical outputs without pickle, attacks get the float gradient and int8 predictions, and a
backend the machine lacks is one sentence."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustlab.data import DataSplits
from robustlab.errors import RobustlabError
from robustlab.models import build_model
from robustlab.models.checkpoint import load_checkpoint, model_config
from robustlab.models.quantized import OBSERVERS, QuantizedModel, check_backend, quantize
from robustlab.models.structure import surrogates_for
from robustlab.train import TrainConfig, accuracy, train
from robustlab.train.prune import PruneSpec, prune_checkpoint
from robustlab.train.quantize import agreement, calibration_indices, quantize_checkpoint


@pytest.fixture
def net(digits_net: nn.Module) -> nn.Module:
    """A private copy of the session's trained resnet8."""
    return copy.deepcopy(digits_net)


def test_the_int8_resnet_agrees_with_the_float_one(net: nn.Module, digits: DataSplits) -> None:
    int8 = quantize(net, digits.train.x[:256])
    assert isinstance(int8, QuantizedModel)
    assert agreement(int8, net, digits.test) >= 0.95
    assert abs(accuracy(int8, digits.test) - accuracy(net, digits.test)) <= 0.03
    out = int8(digits.test.x[:4])
    assert out.dtype == torch.float32 and out.shape == (4, 10)
    assert not torch.equal(out, net(digits.test.x[:4]))  # it is not the float model


def test_the_int8_mlp_agrees_with_the_float_one(digits: DataSplits, tmp_path: Path) -> None:
    cfg = TrainConfig(arch="mlp", data="digits", epochs=3, arch_options={"width": 64})
    mlp = train(cfg, tmp_path, splits=digits, progress=False).model
    assert agreement(quantize(mlp, digits.train.x[:256]), mlp, digits.test) >= 0.95


def test_a_quantized_checkpoint_reloads_to_identical_outputs(
    net: nn.Module, digits: DataSplits, tmp_path: Path
) -> None:
    config = model_config("resnet8", 1, 10, 8, list(digits.mean), list(digits.std), {"width": 8})
    base = {"path": "base", "sha256": "cd" * 32}
    int8, manifest = quantize_checkpoint(
        net, {"model": config}, digits, tmp_path / "q", samples=100, seed=3, base=base
    )
    section = manifest["quantization"]
    assert section["backend"] == "x86" and section["base"] == base
    assert section["calibration"]["indices"] == calibration_indices(len(digits.train), 100, 3)
    assert "judged on the int8" in section["robustness"]
    assert manifest["metrics"]["agreement_with_float"] >= 0.95
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == [
        "manifest.json",
        "model.safetensors",
        OBSERVERS,
    ]
    loaded = load_checkpoint(tmp_path / "q").model
    assert isinstance(loaded, QuantizedModel)
    x = digits.test.x
    assert torch.equal(loaded(x), int8(x))
    assert json.loads((tmp_path / "q" / "manifest.json").read_text()) == manifest
    with pytest.raises(RobustlabError, match="already int8"):
        quantize_checkpoint(loaded, manifest, digits, tmp_path / "qq")
    with pytest.raises(RobustlabError, match="cannot prune an int8 checkpoint"):
        prune_checkpoint(loaded, manifest, digits, PruneSpec(sparsity=0.5), tmp_path / "p")


def test_a_replaced_observers_file_is_refused(
    net: nn.Module, digits: DataSplits, tmp_path: Path
) -> None:
    config = model_config("resnet8", 1, 10, 8, list(digits.mean), list(digits.std), {"width": 8})
    quantize_checkpoint(net, {"model": config}, digits, tmp_path / "q", samples=32)
    other = tmp_path / "r"
    quantize_checkpoint(copy.deepcopy(net), {"model": config}, digits, other, samples=64, seed=1)
    (tmp_path / "q" / OBSERVERS).write_bytes((other / OBSERVERS).read_bytes())
    with pytest.raises(RobustlabError, match="do not match the hash in its manifest"):
        load_checkpoint(tmp_path / "q")


def test_attacks_get_the_float_gradient_and_the_int8_logits(
    net: nn.Module, digits: DataSplits
) -> None:
    int8 = quantize(net, digits.train.x[:128])
    x = digits.test.x[:6].clone().requires_grad_(True)
    y = digits.test.y[:6]
    out = int8(x)
    assert torch.equal(out.detach(), int8(x.detach()))
    (grad,) = torch.autograd.grad(F.cross_entropy(out, y), x)
    x_float = x.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(F.cross_entropy(net(x_float), y), x_float)
    # the loss is taken at the int8 logits, differentiated through the float model
    probs = F.softmax(out.detach(), 1) - F.one_hot(y, 10)
    x_chain = x.detach().clone().requires_grad_(True)
    (chain,) = torch.autograd.grad((net(x_chain) * probs / 6).sum(), x_chain)
    torch.testing.assert_close(grad, chain)
    assert float(grad.abs().sum()) > 0 and grad.shape == want.shape
    assert surrogates_for(int8) == [("float", int8.float_model)]


def test_calibration_indices_are_seeded_sorted_and_checked() -> None:
    a = calibration_indices(1000, 50, 7)
    assert a == calibration_indices(1000, 50, 7) and a == sorted(a) and len(set(a)) == 50
    assert a != calibration_indices(1000, 50, 8)
    assert len(calibration_indices(10, 50, 0)) == 10
    with pytest.raises(RobustlabError, match="at least one calibration sample"):
        calibration_indices(1000, 0, 0)


def test_a_backend_the_machine_lacks_gets_a_sentence() -> None:
    with pytest.raises(RobustlabError, match="backend 'arm' is not available on this machine"):
        check_backend("arm")
    with pytest.raises(RobustlabError, match="backend 'none' is not available"):
        quantize(build_model("mlp", 1, 10, 8), torch.rand(4, 1, 8, 8), backend="none")

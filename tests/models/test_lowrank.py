"""Low-rank factorised layers: the rank they claim, the layers they leave alone, the single
layer they equal, checkpoints that rebuild them, and one sentence for a rank too large."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustlab.data import DataSplits
from robustlab.errors import RobustlabError
from robustlab.models import ARCHITECTURES, build_model, classifier_head, count_parameters
from robustlab.models.checkpoint import load_checkpoint, model_config, save_checkpoint
from robustlab.models.lowrank import LowRank, factorize
from robustlab.models.structure import declare_features
from robustlab.train import TrainConfig, train


def _low_ranks(model: nn.Module) -> list[LowRank]:
    """Every factorised layer of a model."""
    return [m for m in model.modules() if isinstance(m, LowRank)]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_zoo_model_takes_a_rank_and_its_layers_have_it(arch: str) -> None:
    model = build_model(arch, 1, 10, 16, rank=3)
    layers = _low_ranks(model)
    assert layers, arch
    for layer in layers:
        w = layer.composed_weight().detach()
        assert layer.rank == 3
        assert int(torch.linalg.matrix_rank(w)) <= 3
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 10)


def test_the_first_layer_and_the_head_stay_full_rank() -> None:
    model = build_model("resnet8", 1, 10, 8, width=8, rank=2)
    stem = model.get_submodule("net.stem.0")
    assert type(stem) is nn.Conv2d
    assert type(classifier_head(model)) is nn.Linear
    assert len(_low_ranks(model)) == 8  # every other conv (6 in branches, 2 shortcuts)
    assert count_parameters(model) < count_parameters(build_model("resnet8", 1, 10, 8, width=8))


def test_a_low_rank_conv_equals_one_conv_with_the_composed_weight() -> None:
    model = build_model("resnet8", 1, 10, 8, width=8, rank=2)
    layer = model.get_submodule("net.blocks.1.branch.0")
    assert isinstance(layer, LowRank)
    down = layer.down
    assert isinstance(down, nn.Conv2d)
    x = torch.randn(3, 8, 8, 8)
    w = layer.composed_weight().reshape(16, 8, 3, 3)
    want = F.conv2d(x, w, stride=down.stride, padding=down.padding)
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-5)


def test_the_composed_weight_starts_at_the_scale_of_the_layer_it_replaces() -> None:
    torch.manual_seed(0)
    full = build_model("mlp", 1, 10, 8, width=256)
    low = build_model("mlp", 1, 10, 8, width=256, rank=16)
    w_full = full.get_submodule("net.features.3").weight
    layer = low.get_submodule("net.features.3")
    assert isinstance(layer, LowRank) and isinstance(w_full, torch.Tensor)
    ratio = float(layer.composed_weight().detach().std() / w_full.detach().std())
    assert 0.8 < ratio < 1.25


def test_a_low_rank_checkpoint_rebuilds_with_identical_outputs(tmp_path: Path) -> None:
    model = build_model("resnet8", 1, 10, 8, width=8, rank=2).eval()
    config = model_config("resnet8", 1, 10, 8, [0.0], [1.0], {"width": 8, "rank": 2})
    save_checkpoint(model, tmp_path / "ckpt", {"model": config})
    loaded = load_checkpoint(tmp_path / "ckpt").model
    x = torch.rand(4, 1, 8, 8)
    assert len(_low_ranks(loaded)) == 8
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_training_with_a_rank_records_it_and_learns(digits: DataSplits, tmp_path: Path) -> None:
    cfg = TrainConfig(arch="mlp", data="digits", epochs=3, arch_options={"width": 64, "rank": 4})
    result = train(cfg, tmp_path, splits=digits, progress=False)
    assert result.manifest["model"]["options"] == {"width": 64, "rank": 4}
    assert result.manifest["metrics"]["clean_accuracy"] > 0.5
    assert len(_low_ranks(load_checkpoint(tmp_path).model)) == 1


@pytest.mark.parametrize(
    ("rank", "sentence"),
    [
        (9, "rank 9 is larger than layer blocks.0.branch.0 allows: its weight matrix is "),
        (0, "rank must be a whole number >= 1, got 0"),
        (True, "rank must be a whole number >= 1, got True"),
        (2.5, "rank must be a whole number >= 1, got 2.5"),
    ],
)
def test_a_rank_the_layers_do_not_allow_gets_a_sentence(rank: object, sentence: str) -> None:
    with pytest.raises(RobustlabError, match=sentence):
        build_model("resnet8", 1, 10, 8, width=8, rank=rank)


def test_a_model_without_conv_or_linear_layers_gets_a_sentence() -> None:
    with pytest.raises(RobustlabError, match="has no conv or linear layer to factorise"):
        factorize(nn.Sequential(nn.Flatten(), nn.ReLU()), 2)


def test_transposed_convolutions_are_left_as_they_are() -> None:
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ConvTranspose2d(4, 4, 3),
        nn.Conv2d(4, 4, 3),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 10),
    )
    declare_features(net, "4")
    factorize(net, 2)
    assert type(net[1]) is nn.ConvTranspose2d and isinstance(net[2], LowRank)
    assert net(torch.rand(2, 1, 8, 8)).shape == (2, 10)

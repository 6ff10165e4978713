"""An ``nn.MultiheadAttention``'s packed input projection is a weight layer: ``weight_layers``
lists it under the attention's path with its real parameter name, compressibility measures it,
pruning zeroes it (masks kept through fine-tuning and in the reloaded checkpoint), AWP perturbs
it, the l1 penalty counts it, the representations read the attention's output, and low rank
leaves it alone. No torchvision needed: the model is built here."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from torch import nn

from robustlab.analysis.compressibility import layer_metrics
from robustlab.analysis.representations import representations
from robustlab.data import DataSplits
from robustlab.models import ARCHITECTURES, build_model, weight_layers
from robustlab.models.checkpoint import load_checkpoint, model_config
from robustlab.models.lowrank import LowRank
from robustlab.models.registry import Architecture
from robustlab.models.structure import declare_features
from robustlab.models.weights import bias_name, layer_weight, weight_name
from robustlab.train import EpochSampler, Hook, Step, fit, make_method
from robustlab.train.awp import AWP
from robustlab.train.compression import penalty
from robustlab.train.prune import FinetuneConfig, PruneSpec, prune, prune_checkpoint, sparsity_of

ARCH = "attention-test-net"
DIM = 16


class AttentionNet(nn.Module):
    """A 2x2 patch conv, self-attention over the patches with a residual and a LayerNorm, a
    linear layer, mean over the tokens, a linear head."""

    def __init__(
        self, in_channels: int, num_classes: int, image_size: int, batch_first: bool = True
    ) -> None:
        super().__init__()
        self.embed = nn.Conv2d(in_channels, DIM, 2, stride=2)
        self.attn = nn.MultiheadAttention(DIM, 2, batch_first=batch_first)
        self.norm = nn.LayerNorm(DIM)
        self.mid = nn.Linear(DIM, DIM)
        self.fc = nn.Linear(DIM, num_classes)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The patch embeddings, (batch, patches, DIM)."""
        t: torch.Tensor = self.embed(x).flatten(2).transpose(1, 2)
        return t

    def attention(self, t: torch.Tensor) -> torch.Tensor:
        """The attention's output for batch-first tokens, batch first."""
        s = t if self.attn.batch_first else t.transpose(0, 1)
        a: torch.Tensor = self.attn(s, s, s, need_weights=False)[0]
        return a if self.attn.batch_first else a.transpose(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        h = torch.relu(self.mid(self.norm(t + self.attention(t)))).mean(1)
        out: torch.Tensor = self.fc(h)
        return out


declare_features(AttentionNet, "fc")


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> str:
    """The test network as a registered architecture (so its checkpoints rebuild), for one test."""
    monkeypatch.setitem(ARCHITECTURES, ARCH, Architecture(ARCH, AttentionNet))
    return ARCH


@pytest.fixture
def model(registered: str, digits: DataSplits) -> nn.Sequential:
    """The network for digits' 8x8 images (16 tokens), as build_model makes it."""
    torch.manual_seed(0)
    return build_model(registered, 1, 10, 8, list(digits.mean), list(digits.std))


def _attn(model: nn.Module) -> nn.MultiheadAttention:
    attn = model.get_submodule("net.attn")
    assert isinstance(attn, nn.MultiheadAttention)
    return attn


def test_the_packed_input_projection_is_a_weight_layer_with_its_real_name(
    model: nn.Sequential,
) -> None:
    layers = weight_layers(model)
    names = ["net.embed", "net.attn", "net.attn.out_proj", "net.mid", "net.fc"]
    assert [n for n, _ in layers] == names
    attn = _attn(model)
    assert layer_weight(attn) is attn.in_proj_weight and attn.in_proj_weight.shape == (48, DIM)
    assert weight_name("net.attn", attn) == "net.attn.in_proj_weight"
    assert bias_name("net.attn", attn) == "net.attn.in_proj_bias"
    assert weight_name("net.mid", model.get_submodule("net.mid")) == "net.mid.weight"
    params = dict(model.named_parameters())
    for name, layer in layers:  # every weight layer's weight is the parameter of that name
        assert params[weight_name(name, layer)] is layer_weight(layer)
    # separate query/key/value weights (kdim, vdim != embed_dim): only its out_proj is listed
    separate = nn.MultiheadAttention(DIM, 2, kdim=8, vdim=8)
    assert [n for n, _ in weight_layers(separate)] == ["out_proj"]


def test_compressibility_measures_the_in_proj_as_computed_from_the_tensor(
    model: nn.Sequential,
) -> None:
    metrics = {m.name: m for m in layer_metrics(model, (0.1, 0.5))}
    m = metrics["net.attn"]
    assert m.kind == "attention" and metrics["net.attn.out_proj"].kind == "linear"
    assert m.shape == m.matrix_shape == [3 * DIM, DIM]
    w = _attn(model).in_proj_weight.detach().double().numpy()
    sv = np.linalg.svd(w, compute_uv=False)
    rows = np.linalg.norm(w, axis=1)

    def best_k(v: npt.NDArray[np.float64], kappa: float) -> float:
        """Relative l2 error of keeping the ceil(kappa * len) largest entries, by hand."""
        tail = np.sort(np.abs(v))[::-1][math.ceil(kappa * len(v)) :]
        return float(np.linalg.norm(tail) / np.linalg.norm(v))

    assert m.frobenius_norm == pytest.approx(np.linalg.norm(w), rel=1e-12)
    assert m.spectral_norm == pytest.approx(sv[0], rel=1e-12)
    assert m.stable_rank == pytest.approx((sv**2).sum() / sv[0] ** 2, rel=1e-12)
    assert m.linf_operator_norm == pytest.approx(np.abs(w).sum(axis=1).max(), rel=1e-12)
    for kappa in (0.1, 0.5):
        assert m.neuron_compressibility[f"{kappa:g}"] == pytest.approx(best_k(rows, kappa))
        assert m.spectral_compressibility[f"{kappa:g}"] == pytest.approx(best_k(sv, kappa))


def test_pruning_zeroes_the_share_asked_of_the_in_proj_through_finetuning_and_reload(
    model: nn.Sequential, registered: str, digits: DataSplits, tmp_path: Path
) -> None:
    attn = _attn(model)
    before = attn.in_proj_weight.detach().clone()
    config = model_config(registered, 1, 10, 8, list(digits.mean), list(digits.std), {})
    manifest = prune_checkpoint(
        model,
        {"model": config},
        digits,
        PruneSpec(sparsity=0.6, scope="layer"),
        tmp_path / "p",
        finetuning=FinetuneConfig(make_method("standard"), epochs=1),
        device="cpu",
    )
    layers = {e["name"]: e for e in manifest["pruning"]["layers"]}
    assert list(layers) == ["net.attn", "net.attn.out_proj", "net.mid"]
    asked = round(0.6 * before.numel())
    assert layers["net.attn"]["shape"] == [48, DIM] and layers["net.attn"]["zero_weights"] == asked
    # the smallest weights went, and stayed at zero through the fine-tuning that moved the rest
    smallest = torch.sort(before.abs().flatten(), stable=True).indices[:asked]
    after = attn.in_proj_weight.detach()
    zero = after == 0
    assert int(zero.sum()) == asked and bool(zero.flatten()[smallest].all())
    assert not torch.equal(after[~zero], before[~zero])
    assert manifest["pruning"]["sparsity_after_finetune"] == pytest.approx(0.6, abs=1e-3)
    loaded = load_checkpoint(tmp_path / "p").model
    assert torch.equal(_attn(loaded).in_proj_weight, after)
    assert sparsity_of(loaded, ["net.attn"]) == pytest.approx(asked / before.numel())


def test_structured_pruning_removes_in_proj_rows_with_their_bias(model: nn.Sequential) -> None:
    with torch.no_grad():  # a bias with no zero of its own
        _attn(model).in_proj_bias.copy_(torch.linspace(1, 2, 3 * DIM))
    pruned = prune(model, PruneSpec(sparsity=0.5, scope="layer", structured=True))
    attn = _attn(model)
    gone = (attn.in_proj_weight == 0).all(dim=1)
    assert int(gone.sum()) == 24 and pruned.layers[0]["filters_pruned"] == 24
    assert bool((attn.in_proj_bias[gone] == 0).all()) and bool(
        (attn.in_proj_bias[~gone] != 0).all()
    )
    assert "net.attn.in_proj_bias" in pruned.masks


class _Seen(Hook):
    """The input projection the loss's forward pass sees (installed after AWP)."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def before_forward(self, step: Step) -> None:
        """Copy the attention's packed weight."""
        self.weights.append(_attn(step.model).in_proj_weight.detach().clone())


def test_awp_perturbs_the_in_proj(model: nn.Sequential, digits: DataSplits) -> None:
    w0 = _attn(model).in_proj_weight.detach().clone()
    method, gamma = make_method("pgd-at", eps=0.1, steps=1), 0.01
    seen = _Seen()
    fit(
        model,
        method,
        torch.optim.SGD(model.parameters(), lr=0.1),
        digits.train.x[:32],
        digits.train.y[:32],
        EpochSampler(32, torch.Generator().manual_seed(1)),
        batch_size=32,
        epochs=1,
        lr=0.1,
        gen=torch.Generator().manual_seed(0),
        hooks=[AWP(method, gamma), seen],
    )
    moved = float(torch.linalg.vector_norm(seen.weights[0] - w0))
    assert moved == pytest.approx(gamma * float(torch.linalg.vector_norm(w0)), rel=1e-4)


def test_the_l1_penalty_counts_the_in_proj(model: nn.Sequential) -> None:
    weights = ("embed.weight", "in_proj_weight", "out_proj.weight", "mid.weight", "fc.weight")
    by_hand = sum(
        float(p.detach().abs().sum()) for n, p in model.named_parameters() if n.endswith(weights)
    )
    assert float(penalty(model, {"l1": 1.0}).detach()) == pytest.approx(by_hand)


@pytest.mark.parametrize("batch_first", [True, False])
def test_representations_read_the_attentions_output_one_row_per_sample(
    registered: str, digits: DataSplits, batch_first: bool
) -> None:
    torch.manual_seed(0)
    model = build_model(registered, 1, 10, 8, batch_first=batch_first).eval()
    x = digits.test.x[:6]
    reps = representations(model, x)
    assert list(reps) == ["net.embed", "net.attn", "net.mid", "net.fc"]  # out_proj: no call
    net = model.get_submodule("net")
    assert isinstance(net, AttentionNet)
    with torch.no_grad():
        want = net.attention(net.tokens(x)).flatten(1)
    assert reps["net.attn"].shape == (6, 16 * DIM)
    torch.testing.assert_close(reps["net.attn"], want)


def test_low_rank_leaves_the_attentions_projections(registered: str) -> None:
    model = build_model(registered, 1, 10, 8, rank=2)
    assert isinstance(model.get_submodule("net.mid"), LowRank)
    attn = _attn(model)
    assert isinstance(attn.in_proj_weight, nn.Parameter)
    assert isinstance(model.get_submodule("net.attn.out_proj"), nn.Linear)
    assert type(model.get_submodule("net.embed")) is nn.Conv2d
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)

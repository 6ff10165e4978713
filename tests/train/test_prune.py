"""Pruning: the exact sparsity asked (global, per layer, by filter), the largest weights kept,
the target error met per layer with the fewest weights, masks that survive fine-tuning, a
checkpoint that records it all and reloads, and one sentence per bad input."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from robustlab.data import DataSplits
from robustlab.errors import RobustlabError
from robustlab.models import build_model, classifier_head, weight_layers
from robustlab.models.checkpoint import load_checkpoint, model_config
from robustlab.models.weights import as_matrix, best_k_error, k_for_error, layer_weight
from robustlab.train import make_method
from robustlab.train.prune import (
    FinetuneConfig,
    PruneSpec,
    finetune,
    prunable_layers,
    prune,
    prune_checkpoint,
    sparsity_of,
)


@pytest.fixture
def net(digits_net: nn.Module) -> nn.Module:
    """A private copy of the session's trained resnet8 (tests must not change the original)."""
    return copy.deepcopy(digits_net)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every conv and linear weight but the first layer's and the head's, by layer name."""
    return {n: layer_weight(m).detach().clone() for n, m in prunable_layers(model)}


def test_pruning_leaves_the_first_layer_and_the_head_alone(net: nn.Module) -> None:
    layers = weight_layers(net)
    names = [n for n, _ in prunable_layers(net)]
    assert names == [n for n, _ in layers[1:-1]] and layers[-1][0] == "net.fc"
    first, head = (layer_weight(layers[0][1]).clone(), layer_weight(layers[-1][1]).clone())
    prune(net, PruneSpec(sparsity=0.9, scope="layer"))
    torch.testing.assert_close(layer_weight(layers[0][1]), first, rtol=0, atol=0)
    torch.testing.assert_close(layer_weight(layers[-1][1]), head, rtol=0, atol=0)
    assert sparsity_of(net, names) == pytest.approx(0.9, abs=1e-3)
    assert sparsity_of(net) < sparsity_of(net, names)


@pytest.mark.parametrize("sparsity", [0.3, 0.9])
def test_global_pruning_zeroes_exactly_the_smallest_weights(
    net: nn.Module, sparsity: float
) -> None:
    before = _weights(net)
    total = sum(w.numel() for w in before.values())
    assert sparsity_of(net, before) == 0.0
    pruned = prune(net, PruneSpec(sparsity=sparsity))
    after = _weights(net)
    zeros = sum(int((w == 0).sum()) for w in after.values())
    assert zeros == round(sparsity * total)
    assert pruned.sparsity == pytest.approx(zeros / total)
    kept = torch.cat([before[n][after[n] != 0].abs() for n in before])
    gone = torch.cat([before[n][after[n] == 0].abs() for n in before])
    assert float(kept.min()) >= float(gone.max())
    for n in before:  # what is kept is unchanged
        torch.testing.assert_close(after[n][after[n] != 0], before[n][after[n] != 0])


def test_per_layer_pruning_gives_each_layer_the_sparsity(net: nn.Module) -> None:
    pruned = prune(net, PruneSpec(sparsity=0.6, scope="layer"))
    layers = prunable_layers(net)
    for (name, m), entry in zip(layers, pruned.layers, strict=True):
        w = layer_weight(m)
        assert entry["name"] == name
        assert int((w == 0).sum()) == round(0.6 * w.numel()) == entry["zero_weights"]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_structured_pruning_zeroes_whole_filters_but_not_the_first_or_the_head(
    net: nn.Module, scope: str
) -> None:
    layers = weight_layers(net)
    first, head = layers[0][1], classifier_head(net)
    before = {id(m): layer_weight(m).detach().clone() for m in (first, head)}
    pruned = prune(net, PruneSpec(sparsity=0.5, scope=scope, structured=True))
    torch.testing.assert_close(layer_weight(first), before[id(first)], rtol=0, atol=0)
    torch.testing.assert_close(layer_weight(head), before[id(head)], rtol=0, atol=0)
    removed = filters = 0
    for _, m in layers[1:]:
        if m is head:
            continue
        rows = as_matrix(layer_weight(m).detach())
        zero_rows = (rows == 0).all(dim=1)
        assert int(((rows == 0) & ~zero_rows[:, None]).sum()) == 0  # no partial filter
        assert not bool(zero_rows.all())  # a layer keeps at least one filter
        if scope == "layer":
            assert int(zero_rows.sum()) == round(0.5 * rows.shape[0])
        removed += int(zero_rows.sum())
        filters += rows.shape[0]
    assert removed == round(0.5 * filters)
    assert sum(e["filters_pruned"] for e in pruned.layers) == removed
    assert pruned.record()["filter_sparsity"] == removed / filters


def test_a_pruned_filter_followed_by_batchnorm_outputs_zero(net: nn.Module) -> None:
    prune(net, PruneSpec(sparsity=0.5, scope="layer", structured=True))
    conv = net.get_submodule("net.blocks.1.branch.0")
    bn = net.get_submodule("net.blocks.1.branch.1")
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
    gone = (conv.weight == 0).flatten(1).all(dim=1)
    assert int(gone.sum()) == round(0.5 * conv.out_channels)
    with torch.no_grad():
        out = bn.eval()(conv(torch.randn(2, 8, 4, 4)))
    assert float(out[:, gone].abs().max()) == 0.0 and float(out[:, ~gone].abs().max()) > 0


def test_structured_pruning_also_zeroes_the_bias_of_a_pruned_row() -> None:
    model = build_model("mlp", 1, 10, 8, depth=3, width=16)
    prune(model, PruneSpec(sparsity=0.5, scope="layer", structured=True))
    hidden = model.get_submodule("net.features.3")
    assert isinstance(hidden, nn.Linear)
    gone = (hidden.weight == 0).all(dim=1)
    assert int(gone.sum()) == 8
    assert bool((hidden.bias[gone] == 0).all()) and bool((hidden.bias[~gone] != 0).all())


@pytest.mark.parametrize("structured", [False, True])
def test_target_error_pruning_meets_the_error_per_layer_with_the_fewest_weights(
    net: nn.Module, structured: bool
) -> None:
    before = _weights(net)
    eps = 0.3
    pruned = prune(net, PruneSpec(target_error=eps, structured=structured))
    assert pruned.sparsity > 0.05
    for entry in pruned.layers:
        original = before[entry["name"]]
        after = layer_weight(net.get_submodule(entry["name"])).detach()
        if structured:
            values = as_matrix(original).norm(dim=1) / math.sqrt(as_matrix(original).shape[1])
            kept = int((~(as_matrix(after) == 0).all(dim=1)).sum())
        else:
            values, kept = original.flatten(), int((after != 0).sum())
        assert best_k_error(values, kept) <= eps + 1e-12
        assert entry["error"] == pytest.approx(best_k_error(values, kept))
        if kept > 1:  # one fewer would miss the target
            assert best_k_error(values, kept - 1) > eps
    assert len({round(e["sparsity"], 3) for e in pruned.layers}) > 1  # not one fixed ratio


def test_kept_for_error_on_a_known_vector() -> None:
    v = torch.tensor([3.0, 4.0, 0.0, 1.0])  # ||v||^2 = 26
    assert k_for_error(v, 0.7) == 1  # dropping 3, 1, 0: sqrt(10/26) = 0.62 <= 0.7
    assert k_for_error(v, 0.5) == 2  # 0.62 > 0.5: keep 4 and 3 (error sqrt(1/26))
    assert k_for_error(v, 0.2) == 2  # sqrt(1/26) = 0.196
    assert k_for_error(v, 0.1) == 3  # only the zero goes
    assert best_k_error(v, 2) == pytest.approx(math.sqrt(1 / 26))


@pytest.mark.parametrize("method", ["standard", "pgd-at"])
def test_masks_survive_finetuning(net: nn.Module, digits: DataSplits, method: str) -> None:
    pruned = prune(net, PruneSpec(sparsity=0.7))
    zero_before = {n: w == 0 for n, w in _weights(net).items()}
    kept_before = _weights(net)
    options = {"eps": 0.1, "steps": 1} if method == "pgd-at" else {}
    config = FinetuneConfig(make_method(method, **options), epochs=1, lr=0.01)
    history = finetune(net, pruned.masks, digits.train.head(256), config, device="cpu")
    assert len(history) == 1 and math.isfinite(history[0])
    after = _weights(net)
    moved = 0
    for n, w in after.items():
        assert bool((w[zero_before[n]] == 0).all()), n
        moved += int((w[~zero_before[n]] != kept_before[n][~zero_before[n]]).sum())
    assert moved > 0  # fine-tuning did change the kept weights
    assert sparsity_of(net, after) == pytest.approx(pruned.sparsity)


def test_a_pruned_checkpoint_records_what_was_pruned_and_reloads(
    net: nn.Module, digits: DataSplits, tmp_path: Path
) -> None:
    config = model_config("resnet8", 1, 10, 8, list(digits.mean), list(digits.std), {"width": 8})
    base = {"path": "base", "sha256": "ab" * 32}
    manifest = prune_checkpoint(
        net,
        {"model": config, "training": {"method": "standard"}},
        digits,
        PruneSpec(sparsity=0.5, scope="layer"),
        tmp_path / "p",
        finetuning=FinetuneConfig(make_method("standard"), epochs=1),
        base=base,
        device="cpu",
    )
    record = manifest["pruning"]
    assert record["scope"] == "layer" and record["structured"] is False
    assert record["base"] == base and record["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert record["sparsity_asked"] == 0.5 and "filter_sparsity" not in record
    assert record["finetune"]["epochs"] == 1 and record["finetune"]["method"]["name"] == "standard"
    assert [e["name"] for e in record["layers"]] == [n for n, _ in prunable_layers(net)]
    metrics = manifest["metrics"]
    assert metrics["clean_accuracy_before_pruning"] > 0.8
    assert 0 <= metrics["clean_accuracy_after_pruning"] <= 1
    assert manifest["training"] == {"method": "standard"}
    loaded = load_checkpoint(tmp_path / "p").model
    assert sparsity_of(loaded) == pytest.approx(record["model_sparsity"])
    names = [e["name"] for e in record["layers"]]
    assert sparsity_of(loaded, names) == pytest.approx(record["sparsity_after_finetune"])
    x = digits.test.x[:8]
    torch.testing.assert_close(loaded(x), net.eval()(x))


@pytest.mark.parametrize(
    ("spec", "sentence"),
    [
        ({"sparsity": 0.0}, r"sparsity must be a fraction in \(0, 1\), got 0.0"),
        ({"sparsity": 1.0}, r"sparsity must be a fraction in \(0, 1\), got 1.0"),
        ({"sparsity": float("nan")}, r"sparsity must be a fraction in \(0, 1\), got nan"),
        ({"target_error": 1.5}, r"target error must be a fraction in \(0, 1\), got 1.5"),
        ({}, "give either a sparsity or a target error"),
        ({"sparsity": 0.5, "target_error": 0.1}, "give either a sparsity or a target error"),
        ({"sparsity": 0.5, "scope": "model"}, "pruning scope must be global or layer"),
    ],
)
def test_bad_pruning_specs_get_a_sentence(spec: dict[str, object], sentence: str) -> None:
    with pytest.raises(RobustlabError, match=sentence):
        PruneSpec(**spec)  # type: ignore[arg-type]


def test_a_model_with_nothing_to_prune_gets_a_sentence() -> None:
    with pytest.raises(RobustlabError, match="no conv or linear layer besides its first layer"):
        prune(nn.Sequential(nn.Flatten(), nn.ReLU()), PruneSpec(sparsity=0.5))


def test_bad_finetuning_gets_a_sentence() -> None:
    with pytest.raises(RobustlabError, match="at least one epoch"):
        FinetuneConfig(make_method("standard"), epochs=0)

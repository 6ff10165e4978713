"""Compression regularisers: their gradients are those of their formulas on the layers they
name, they make training measurably sparser, the manifest records them, bad strengths fail."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from robustlab.data import DataSplits
from robustlab.errors import RobustlabError
from robustlab.models import build_model, classifier_head, weight_layers
from robustlab.models.weights import layer_weight
from robustlab.train import TrainConfig, train
from robustlab.train.compression import (
    PENALTIES,
    Regularize,
    check_regularizers,
    parse_regularizers,
    regularizer_hooks,
    regularizers_of,
)


def _tiny() -> nn.Module:
    """A width-4 resnet8 on 8x8 inputs: convs of several shapes, a first conv and a head."""
    torch.manual_seed(0)
    return build_model("resnet8", 1, 10, 8, width=4)


def _expected(name: str, w: torch.Tensor) -> torch.Tensor:
    """The penalty's gradient on one weight matrix, written out by hand (not via autograd)."""
    grad: torch.Tensor
    norms = w.norm(dim=1, keepdim=True)
    if name == "l1":
        grad = w.sign()
    elif name == "group-lasso":
        grad = w / norms
    elif name == "group-lasso-si":
        fro = w.norm()
        grad = w / (norms * fro) - norms.sum() * w / fro**3
    elif name == "filter-spread":
        n, mean = len(norms), norms.mean()
        excess = (norms - mean).clamp_min(0)
        d_rows = (2 * excess - 2 * excess.sum() / n) / mean**2 - 2 * (excess**2).sum() / (
            n * mean**3
        )
        grad = d_rows * w / norms
    else:
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        grad = u @ vh
    return grad


@pytest.mark.parametrize("name", list(PENALTIES))
def test_each_penalty_adds_the_gradient_of_its_formula_on_the_layers_it_names(name: str) -> None:
    model = _tiny().double()
    strength = 0.3
    Regularize({name: strength}).add_gradient(model)
    layers = weight_layers(model)
    head = classifier_head(model)
    assert len(layers) > 3
    for i, (path, layer) in enumerate(layers):
        weight = layer_weight(layer)
        grad = weight.grad
        excluded = PENALTIES[name].all_layers is False and (i == 0 or layer is head)
        if excluded:
            assert grad is None or float(grad.abs().max()) == 0.0, path
            continue
        assert grad is not None, path
        w = weight.detach().reshape(weight.shape[0], -1)
        want = strength * _expected(name, w)
        torch.testing.assert_close(grad.reshape_as(want), want, rtol=1e-8, atol=1e-10)


def test_the_penalty_gradient_adds_to_the_method_gradient() -> None:
    model = _tiny()
    for _, layer in weight_layers(model):
        layer_weight(layer).grad = torch.ones_like(layer_weight(layer))
    Regularize({"l1": 0.5}).add_gradient(model)
    _, first = weight_layers(model)[0]
    weight = layer_weight(first)
    torch.testing.assert_close(weight.grad, 1 + 0.5 * weight.detach().sign())


def test_the_scale_invariant_group_lasso_ignores_the_layer_scale() -> None:
    model = _tiny()
    _, layer = weight_layers(model)[2]
    w = layer_weight(layer).detach().reshape(layer_weight(layer).shape[0], -1)
    f = PENALTIES["group-lasso-si"].formula
    torch.testing.assert_close(f(w), f(7.0 * w))
    assert float(PENALTIES["group-lasso"].formula(7.0 * w)) == pytest.approx(
        7.0 * float(PENALTIES["group-lasso"].formula(w)), rel=1e-5
    )


def test_filter_spread_is_zero_for_equal_rows_ignores_scale_and_matches_a_hand_value() -> None:
    f = PENALTIES["filter-spread"].formula
    equal = torch.tensor(
        [[3.0, 4.0], [0.0, 5.0], [5.0, 0.0]], dtype=torch.float64, requires_grad=True
    )
    assert float(f(equal).detach()) == 0.0
    (grad,) = torch.autograd.grad(f(equal), equal)
    assert float(grad.abs().max()) == 0.0
    # row norms 1, 1, 4: mean 2, only the last row stands out, by 2: (2^2) / 2^2 = 1
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 4.0]], dtype=torch.float64)
    assert float(f(w)) == pytest.approx(1.0)
    assert float(f(7.0 * w)) == pytest.approx(1.0)
    assert float(f(torch.zeros(3, 2))) == 0.0
    assert PENALTIES["filter-spread"].all_layers is False


def test_filter_spread_gradient_matches_finite_differences() -> None:
    torch.manual_seed(1)
    w = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(PENALTIES["filter-spread"].formula, (w,))


def test_strong_filter_spread_evens_out_the_row_norms(digits: DataSplits, tmp_path: Path) -> None:
    f = PENALTIES["filter-spread"].formula
    plain, _ = _trained(digits, tmp_path / "plain", {})
    even, manifest = _trained(digits, tmp_path / "even", {"filter-spread": 0.05})
    assert regularizers_of(manifest) == {"filter-spread": 0.05}
    assert float(f(_hidden(even))) < 0.5 * float(f(_hidden(plain)))


def _trained(
    digits: DataSplits, tmp: Path, regularizers: dict[str, float]
) -> tuple[nn.Module, dict[str, object]]:
    """An mlp (one hidden layer pair) trained 4 epochs on digits with these regularisers."""
    cfg = TrainConfig(arch="mlp", data="digits", epochs=4, arch_options={"width": 64})
    hooks = regularizer_hooks(regularizers)
    result = train(cfg, tmp, splits=digits, progress=False, hooks=hooks)
    return result.model, result.manifest


def _hidden(model: nn.Module) -> torch.Tensor:
    """The weight of the mlp's second hidden layer (penalised by every regulariser)."""
    return layer_weight(weight_layers(model)[1][1]).detach()


def test_strong_l1_makes_the_weights_measurably_sparser(digits: DataSplits, tmp_path: Path) -> None:
    plain, manifest = _trained(digits, tmp_path / "plain", {})
    sparse, manifest_l1 = _trained(digits, tmp_path / "l1", {"l1": 1e-3})

    def near_zero(model: nn.Module) -> float:
        """Fraction of all conv/linear weights below 1e-3 in magnitude."""
        w = torch.cat([layer_weight(m).detach().flatten() for _, m in weight_layers(model)])
        return float((w.abs() < 1e-3).float().mean())

    assert near_zero(sparse) > max(5 * near_zero(plain), 0.05)
    assert "add_ons" not in manifest["training"]  # type: ignore[operator]
    assert manifest_l1["training"]["add_ons"] == [  # type: ignore[index]
        {"name": "regularizers", "strengths": {"l1": 1e-3}}
    ]
    assert regularizers_of(manifest_l1) == {"l1": 1e-3} and regularizers_of(manifest) == {}
    assert manifest_l1["metrics"]["clean_accuracy"] > 0.5  # type: ignore[index]


def test_strong_group_lasso_concentrates_the_row_norms(digits: DataSplits, tmp_path: Path) -> None:
    plain, _ = _trained(digits, tmp_path / "plain", {})
    grouped, _ = _trained(digits, tmp_path / "gl", {"group-lasso": 3e-2})

    def top_share(model: nn.Module) -> float:
        """Share of the hidden layer's squared row norms held by its 10 largest rows."""
        norms = _hidden(model).norm(dim=1) ** 2
        return float(norms.sort(descending=True).values[:10].sum() / norms.sum())

    assert top_share(grouped) > top_share(plain) + 0.2


def test_strong_nuclear_norm_lowers_the_stable_rank(digits: DataSplits, tmp_path: Path) -> None:
    plain, _ = _trained(digits, tmp_path / "plain", {})
    low, _ = _trained(digits, tmp_path / "nuc", {"nuclear": 3e-2})

    def stable_rank(model: nn.Module) -> float:
        """||W||_F^2 / ||W||_2^2 of the hidden layer."""
        s = torch.linalg.svdvals(_hidden(model))
        return float((s**2).sum() / s[0] ** 2)

    assert stable_rank(low) < 0.7 * stable_rank(plain)


@pytest.mark.parametrize(
    ("given", "sentence"),
    [
        ({"l2": 1.0}, "unknown regularizer 'l2'"),
        ({"l1": -1.0}, "finite strength >= 0"),
        ({"nuclear": float("nan")}, "finite strength >= 0"),
        ({"group-lasso": float("inf")}, "finite strength >= 0"),
        ({"l1": "a"}, "needs a number"),
    ],
)
def test_bad_strengths_get_a_sentence(given: dict[str, object], sentence: str) -> None:
    with pytest.raises(RobustlabError, match=sentence):
        check_regularizers(given)


def test_the_hook_checks_its_strengths() -> None:
    with pytest.raises(RobustlabError, match="finite strength"):
        Regularize({"l1": -0.1})


def test_a_run_resumes_only_with_the_same_regularizers(digits: DataSplits, tmp_path: Path) -> None:
    cfg = TrainConfig(arch="mlp", data="digits", epochs=2, arch_options={"width": 16})
    hooks = regularizer_hooks({"l1": 1e-4})
    train(cfg, tmp_path, splits=digits, progress=False, hooks=hooks, stop_after_epochs=1)
    with pytest.raises(RobustlabError, match="unfinished run with other add-ons"):
        train(cfg, tmp_path, splits=digits, progress=False)
    done = train(cfg, tmp_path, splits=digits, progress=False, hooks=hooks)
    assert regularizers_of(done.manifest) == {"l1": 1e-4}


def test_command_line_strengths_parse_and_bad_ones_get_a_sentence() -> None:
    assert parse_regularizers(["l1=1e-4", "nuclear=0.01"]) == {"l1": 1e-4, "nuclear": 0.01}
    with pytest.raises(RobustlabError, match="must look like NAME=STRENGTH"):
        parse_regularizers(["l1"])
    with pytest.raises(RobustlabError, match="needs a number as strength, got 'x'"):
        parse_regularizers(["l1=x"])
    assert regularizer_hooks({"l1": 0.0}) == []


@pytest.mark.parametrize("method", ["pgd-at", "trades"])
def test_regularizers_compose_with_adversarial_training(
    digits: DataSplits, tmp_path: Path, method: str
) -> None:
    def run(regularizers: dict[str, float], name: str) -> nn.Module:
        """One epoch of adversarial training of a small mlp on digits."""
        cfg = TrainConfig(
            arch="mlp",
            data="digits",
            method=method,
            eps=0.1,
            steps=1,
            epochs=1,
            arch_options={"width": 32},
        )
        hooks = regularizer_hooks(regularizers)
        result = train(cfg, tmp_path / name, splits=digits, progress=False, hooks=hooks)
        assert regularizers_of(result.manifest) == regularizers
        return result.model

    plain = run({}, "plain")
    both = run({"group-lasso-si": 0.1, "nuclear": 0.01}, "both")
    w_plain, w_both = _hidden(plain), _hidden(both)
    assert not torch.equal(w_plain, w_both)
    si = PENALTIES["group-lasso-si"].formula
    assert float(si(w_both)) < float(si(w_plain))  # the penalty it minimises went down

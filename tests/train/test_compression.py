"""Compression regularisers: their gradients are those of their formulas on the layers they
name, they make training measurably sparser, the manifest records them, bad strengths fail.
The alignment penalty: its value against an independent Jacobian, its gradient lowers it, it
composes with PGD-AT and the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from robustlab.cli import main
from robustlab.data import DataSplits
from robustlab.errors import RobustlabError
from robustlab.models import build_model, classifier_head, weight_layers
from robustlab.models.weights import layer_weight
from robustlab.train import TrainConfig, train
from robustlab.train.compression import (
    ALIGNMENT_POINTS,
    BATCH_PENALTIES,
    PENALTIES,
    Regularize,
    check_regularizers,
    parse_regularizers,
    penalty,
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
        ({"alignment": -0.5}, "regularizer alignment needs a finite strength >= 0, got -0.5"),
        ({"alignment-l2": float("nan")}, "finite strength >= 0"),
        ({"alignment": True}, "needs a number"),
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


def _adversarial_run(
    digits: DataSplits, folder: Path, method: str, regularizers: dict[str, float]
) -> tuple[nn.Module, dict[str, Any]]:
    """One epoch of adversarial training of a small mlp on digits, with the regularizers;
    the model and its manifest (which must record them)."""
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
    result = train(cfg, folder, splits=digits, progress=False, hooks=hooks)
    assert regularizers_of(result.manifest) == regularizers
    return result.model, result.manifest


@pytest.mark.parametrize("method", ["pgd-at", "trades"])
def test_regularizers_compose_with_adversarial_training(
    digits: DataSplits, tmp_path: Path, method: str
) -> None:
    plain, _ = _adversarial_run(digits, tmp_path / "plain", method, {})
    both, _ = _adversarial_run(
        digits, tmp_path / "both", method, {"group-lasso-si": 0.1, "nuclear": 0.01}
    )
    w_plain, w_both = _hidden(plain), _hidden(both)
    assert not torch.equal(w_plain, w_both)
    si = PENALTIES["group-lasso-si"].formula
    assert float(si(w_both)) < float(si(w_plain))  # the penalty it minimises went down


def _gain_by_hand(model: nn.Module, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Mean over the points of the operator norm of the logits' Jacobian, one point at a time
    with torch.autograd.functional (independent of ``models.gains``)."""
    values = []
    for point in x:
        jac = torch.autograd.functional.jacobian(  # type: ignore[no-untyped-call]
            lambda v: model(v.unsqueeze(0))[0], point
        )
        jac = jac.reshape(jac.shape[0], -1).double()
        if norm == "linf":
            values.append(jac.abs().sum(dim=1).max())
        else:
            values.append(torch.linalg.matrix_norm(jac, ord=2))
    return torch.stack(values).mean()


@pytest.mark.parametrize(("name", "norm"), [("alignment", "linf"), ("alignment-l2", "l2")])
def test_alignment_penalty_is_the_mean_local_gain_of_the_batch(name: str, norm: str) -> None:
    torch.manual_seed(2)
    model = build_model("mlp", 1, 10, 8, width=16).double().eval()
    x = torch.rand(ALIGNMENT_POINTS + 3, 1, 8, 8, dtype=torch.float64)
    value = penalty(model, {name: 0.7}, x)
    want = 0.7 * _gain_by_hand(model, x[:ALIGNMENT_POINTS], norm)  # the first points only
    torch.testing.assert_close(value.detach(), want.detach(), rtol=1e-9, atol=0.0)
    assert name not in PENALTIES and BATCH_PENALTIES[name].name == name
    with pytest.raises(RobustlabError, match=f"the {name} penalty needs a batch of inputs"):
        penalty(model, {name: 0.7})


@pytest.mark.parametrize("name", ["alignment", "alignment-l2"])
def test_a_step_of_sgd_on_the_alignment_penalty_alone_lowers_it(name: str) -> None:
    torch.manual_seed(3)
    model = build_model("mlp", 1, 10, 8, width=16).double()
    x = torch.rand(16, 1, 8, 8, dtype=torch.float64)
    before = float(penalty(model, {name: 1.0}, x).detach())
    Regularize({name: 1.0}).add_gradient(model, x)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for n, g in grads.items() if n.endswith("weight"))
    # the gradient added is the penalty's: a directional derivative by finite differences
    direction = [torch.randn_like(p) for p in model.parameters()]
    slope = sum(
        float((p.grad * d).sum()) for p, d in zip(model.parameters(), direction, strict=True)
        if p.grad is not None
    )  # fmt: skip
    h = 1e-6
    with torch.no_grad():
        for p, d in zip(model.parameters(), direction, strict=True):
            p.add_(h * d)
    moved = float(penalty(model, {name: 1.0}, x).detach())
    with torch.no_grad():
        for p, d in zip(model.parameters(), direction, strict=True):
            p.sub_(h * d)
    assert (moved - before) / h == pytest.approx(slope, rel=1e-4)
    torch.optim.SGD(model.parameters(), lr=0.05).step()
    after = float(penalty(model, {name: 1.0}, x).detach())
    assert after < 0.95 * before


def test_alignment_penalty_sees_the_eval_mode_network_and_leaves_it_in_train_mode() -> None:
    model = _tiny().train()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.running_mean is not None
    running = bn.running_mean.clone()
    x = torch.rand(4, 1, 8, 8)
    Regularize({"alignment": 1.0}).add_gradient(model, x)
    assert model.training and torch.equal(bn.running_mean, running)  # no statistics update
    assert bn.weight.grad is not None and float(bn.weight.grad.abs().sum()) > 0
    per_point = penalty(model, {"alignment": 1.0}, x[:1]).detach()
    model.eval()
    assert float(per_point) == pytest.approx(float(_gain_by_hand(model, x[:1], "linf")), rel=1e-4)


def test_alignment_penalty_composes_with_pgd_at_and_is_recorded(
    digits: DataSplits, tmp_path: Path
) -> None:
    plain, manifest_plain = _adversarial_run(digits, tmp_path / "plain", "pgd-at", {})
    aligned, manifest = _adversarial_run(digits, tmp_path / "aligned", "pgd-at", {"alignment": 0.1})
    assert manifest["training"]["add_ons"] == [
        {"name": "regularizers", "strengths": {"alignment": 0.1}}
    ]
    assert regularizers_of(manifest) == {"alignment": 0.1}
    assert manifest["training"]["method"] == manifest_plain["training"]["method"]
    x = digits.test.x[:200]
    gain_plain = float(penalty(plain, {"alignment": 1.0}, x).detach())
    gain_aligned = float(penalty(aligned, {"alignment": 1.0}, x).detach())
    assert gain_aligned < 0.8 * gain_plain  # held-out points: the realised gain went down


def test_the_command_line_trains_with_alignment_and_refuses_a_bad_strength(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["train", "--arch", "mlp", "--data", "digits", "--epochs", "1", "--no-progress"]
    assert main([*base, "--regularizer", "alignment=-1", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "regularizer alignment needs a finite strength >= 0, got -1.0" in err
    assert err.count("\n") == 1 and not (tmp_path / "bad").exists()
    out, js = tmp_path / "ok", tmp_path / "m.json"
    argv = [*base, "--method", "pgd-at", "--eps", "0.1", "--steps", "1"]
    assert (
        main([*argv, "--regularizer", "alignment=0.01", "--out", str(out), "--json", str(js)]) == 0
    )
    manifest = json.loads(js.read_text())
    assert regularizers_of(manifest) == {"alignment": 0.01}

"""The robustness bound: per-module bounds against the modules themselves, the whole-network
constant against what the network does, and bound >= measured gap on trained models."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from robustlab.analysis.bound import (
    CE_LIPSCHITZ,
    layer_bounds,
    local_gains,
    module_bound,
    patches_per_pixel,
    robustness_bounds,
    with_alignment,
)
from robustlab.analysis.compress import compress_record
from robustlab.analysis.compressibility import layer_metrics, matrix_metrics, weight_matrix
from robustlab.analysis.gap import bound_gap_correlation, rank_correlation
from robustlab.data import DataSplits
from robustlab.errors import RobustlabError
from robustlab.models import build_model
from robustlab.models.blocks import Normalize, ResidualBlock
from robustlab.train.loop import EpochSampler, fit
from robustlab.train.methods import Hook, Step, make_method

EPS = {"linf": 0.3, "l2": 0.57}


def _conv_l2_norm(conv: nn.Conv2d, shape: tuple[int, ...], iters: int = 200) -> float:
    """The l2 operator norm of the conv on a feature map (power iteration on the conv itself)."""
    w = conv.weight.detach().double()

    def apply(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)

    return _power_iteration(apply, shape, iters)


def _conv_l2_norm_of(model: nn.Module, shape: tuple[int, ...], iters: int = 200) -> float:
    """The l2 operator norm of an affine model's linear part (power iteration on it)."""
    model = model.double()
    zero = torch.zeros(1, *shape, dtype=torch.float64)
    with torch.no_grad():
        offset = model(zero)
    return _power_iteration(lambda x: model(x) - offset, shape, iters)


def _power_iteration(
    apply: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...], iters: int
) -> float:
    """The top singular value of a linear map of feature maps, by power iteration on A^T A."""
    x = torch.randn(1, *shape, dtype=torch.float64)
    for _ in range(iters):
        x = (x / x.norm()).requires_grad_(True)
        (x,) = torch.autograd.grad(0.5 * (apply(x) ** 2).sum(), x)  # A^T A x
    x = x / x.norm()
    with torch.no_grad():
        return float(apply(x).norm())


def _bounds(conv: nn.Conv2d) -> dict[str, dict[str, float]]:
    """The layer bounds of one conv (exact and compressibility forms)."""
    m = matrix_metrics("c", "conv", tuple(conv.weight.shape), weight_matrix(conv), (0.1, 0.5))
    return layer_bounds(m, conv, 0.1)


@pytest.mark.parametrize(
    ("kernel", "stride", "dilation", "padding", "groups"),
    [
        (3, 1, 1, 1, 1),
        (3, 2, 1, 1, 1),
        (1, 2, 1, 0, 1),
        (5, 2, 1, 2, 1),
        (3, 1, 2, 2, 1),
        (3, 1, 1, 1, 2),
        (2, 2, 1, 0, 1),
    ],
)
def test_l2_conv_bound_is_at_least_the_operator_norm_of_the_conv(
    kernel: int, stride: int, dilation: int, padding: int, groups: int
) -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, kernel, stride, padding, dilation, groups, bias=False)
    true = _conv_l2_norm(conv, (4, 12, 12))
    bound = _bounds(conv)["l2"]
    assert bound["exact"] >= true * (1 - 1e-6)
    assert bound["compressibility"] >= bound["exact"] * (1 - 1e-12)


def test_linf_conv_bound_is_reached_at_an_inner_pixel() -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
    w = conv.weight.detach()
    c = int(w.abs().flatten(1).sum(1).argmax())
    x = torch.zeros(1, 3, 7, 7)
    x[0, :, 2:5, 2:5] = w[c].sign()  # the worst patch around pixel (3, 3), ||x||_inf = 1
    with torch.no_grad():
        reached = float(conv(x)[0, c, 3, 3])
    assert _bounds(conv)["linf"]["exact"] == pytest.approx(reached, rel=1e-5)


def test_patches_per_pixel_closed_forms() -> None:
    assert patches_per_pixel(3, 1) == 9
    assert patches_per_pixel(3, 2) == 4
    assert patches_per_pixel(2, 2) == 1 and patches_per_pixel(1, 2) == 1
    assert patches_per_pixel(3, 1, 2) == 9  # dilated taps still meet a pixel once each
    assert patches_per_pixel(3, 4, 2) == 4  # span 5, stride 4: two windows per dimension
    assert patches_per_pixel((3, 1), (1, 1)) == 3


def test_global_average_pooling_has_l2_norm_one_over_root_of_its_size() -> None:
    pool = nn.AdaptiveAvgPool2d(1)
    like = torch.zeros(())
    assert module_bound("p", pool, "l2", [1, 4, 6, 6], like) == pytest.approx(1 / 6)
    assert module_bound("p", pool, "linf", [1, 4, 6, 6], like) == pytest.approx(1.0)
    assert module_bound("p", nn.AvgPool2d(2), "l2", [1, 4, 6, 6], like) == pytest.approx(0.5)


def test_residual_block_and_normalize_chain_by_hand() -> None:
    torch.manual_seed(5)
    w1, w2 = nn.Linear(6, 6, bias=False), nn.Linear(6, 3)
    block = ResidualBlock(nn.Sequential(w1, nn.ReLU()))  # identity shortcut
    model = nn.Sequential(Normalize([0.5], [0.25]), nn.Flatten(), block, w2).eval()
    bounds = robustness_bounds(model, layer_metrics(model), (1, 2, 3), EPS, 0.1)
    for norm, p in (("linf", math.inf), ("l2", 2)):
        n1 = float(torch.linalg.matrix_norm(w1.weight.detach().double(), ord=p))
        n2 = float(torch.linalg.matrix_norm(w2.weight.detach().double(), ord=p))
        assert bounds[norm].lipschitz["exact"] == pytest.approx(4 * (1 + n1) * n2, rel=1e-9)
        want = CE_LIPSCHITZ[norm] * 4 * (1 + n1) * n2 * EPS[norm]
        assert bounds[norm].bound == pytest.approx(want, rel=1e-9)


def test_batchnorm_after_a_conv_is_folded_into_it() -> None:
    torch.manual_seed(7)
    conv, bn = nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
    var = torch.tensor([0.25, 4.0, 1.0])
    bn.running_var = var.clone()
    bn.weight.data.copy_(torch.tensor([1.0, -2.0, 0.5]))
    model = nn.Sequential(conv, bn).eval()
    bounds = robustness_bounds(model, layer_metrics(model), (2, 6, 6), EPS, 0.1)
    s = (bn.weight.detach().double().abs() / (var.double() + bn.eps).sqrt())[:, None]
    w = conv.weight.detach().double().flatten(1)
    linf = float((s * w.abs()).sum(1).max())
    l2 = 3 * float(torch.linalg.matrix_norm(s * w, ord=2))  # 9 patches per pixel
    assert bounds["linf"].lipschitz["exact"] == pytest.approx(linf, rel=1e-9)
    assert bounds["l2"].lipschitz["exact"] == pytest.approx(l2, rel=1e-9)
    unfolded = 3 * float(torch.linalg.matrix_norm(w, ord=2)) * float(s.max())
    assert l2 <= unfolded and bounds["l2"].lipschitz["compressibility"] >= unfolded * (1 - 1e-9)
    assert _conv_l2_norm_of(model, (2, 6, 6)) <= l2 * (1 + 1e-6)


def test_cross_entropy_lipschitz_constants_hold() -> None:
    torch.manual_seed(3)
    z = torch.randn(2000, 10, dtype=torch.float64) * 5
    y = torch.randint(0, 10, (2000,))
    d = torch.randn(2000, 10, dtype=torch.float64) * 3
    rise = (
        F.cross_entropy(z + d, y, reduction="none") - F.cross_entropy(z, y, reduction="none")
    ).abs()
    assert bool((rise <= CE_LIPSCHITZ["linf"] * d.abs().max(1).values).all())
    assert bool((rise <= CE_LIPSCHITZ["l2"] * d.norm(dim=1)).all())


@pytest.mark.parametrize("arch", ["resnet8", "preact_resnet8", "vgg11", "mlp", "densenet"])
def test_network_constant_bounds_what_the_network_does(arch: str) -> None:
    torch.manual_seed(4)
    model = build_model(arch, 1, 10, 16).eval()
    metrics = layer_metrics(model)
    bounds = robustness_bounds(model, metrics, (1, 16, 16), EPS, 0.1)
    x = torch.rand(6, 1, 16, 16)
    for norm, b in bounds.items():
        lip = b.lipschitz["exact"]
        assert b.lipschitz["compressibility"] >= lip * (1 - 1e-9)
        assert b.encoder_lipschitz["exact"] is not None and b.head_norm["exact"] is not None
        assert lip == pytest.approx(b.encoder_lipschitz["exact"] * b.head_norm["exact"])
        gain = local_gains(model, x)[norm]
        assert bool((gain <= lip * (1 + 1e-6)).all())
        aligned = with_alignment(b, {norm: gain})
        assert aligned.alignment is not None and 0 < aligned.alignment <= 1 + 1e-6
        delta = torch.randn_like(x)
        ord_ = math.inf if norm == "linf" else 2
        with torch.no_grad():
            moved = (model(x + delta) - model(x)).flatten(1)
        size = torch.linalg.vector_norm(delta.flatten(1), ord=ord_, dim=1)
        assert bool((torch.linalg.vector_norm(moved, ord=ord_, dim=1) <= lip * size).all())


def test_alignment_of_a_linear_model_is_one() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).eval()
    bounds = robustness_bounds(model, layer_metrics(model), (1, 3, 4), EPS, 0.1)
    gains = local_gains(model, torch.rand(3, 1, 3, 4))
    for b in bounds.values():
        assert with_alignment(b, gains).alignment == pytest.approx(1.0, rel=1e-9)


def test_local_gains_can_be_differentiated_in_the_weights() -> None:
    torch.manual_seed(8)
    model = build_model("mlp", 1, 10, 8).eval()
    gains = local_gains(model, torch.rand(4, 1, 8, 8), create_graph=True)
    (gains["l2"].max() + gains["linf"].max()).backward()
    head = model.get_submodule("net.fc")
    assert isinstance(head, nn.Linear) and head.weight.grad is not None
    assert float(head.weight.grad.abs().sum()) > 0
    assert not local_gains(model, torch.rand(2, 1, 8, 8))["l2"].requires_grad


def test_a_vit_is_refused_naming_its_module() -> None:
    model = build_model("vit", 1, 10, 16).eval()
    with pytest.raises(RobustlabError, match=r"cannot bound LayerNorm \('net\.layers\.0"):
        robustness_bounds(model, layer_metrics(model), (1, 16, 16), EPS, 0.1)


def test_a_vit_record_says_why_it_has_no_bound() -> None:
    model = build_model("vit", 1, 10, 8).eval()
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    record = compress_record(model, x, y, eps=EPS, steps=2)
    assert "cannot bound LayerNorm" in record["bound"]["linf"]["refused"]
    assert record["bound_holds"] == {}


def _l1(w: torch.Tensor) -> torch.Tensor:
    """Subgradient of sum |w|."""
    return w.sign()


def _group_rows(w: torch.Tensor) -> torch.Tensor:
    """Gradient of the group lasso over rows (output units / filters): sum_i ||w_i||_2."""
    rows = w.flatten(1)
    grad: torch.Tensor = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return grad.view_as(w)


def _nuclear(w: torch.Tensor) -> torch.Tensor:
    """Subgradient of the nuclear norm of the weight matrix: U V^T."""
    u, _, vh = torch.linalg.svd(w.flatten(1), full_matrices=False)
    grad: torch.Tensor = u @ vh
    return grad.view_as(w)


REGULARISERS = {"l1": _l1, "group": _group_rows, "nuclear": _nuclear}


@dataclass
class Penalty(Hook):
    """A regulariser on every weight, added to the gradient after backward (made by hand: the
    training options that induce compressibility come with issue 13's part 3)."""

    grad: Callable[[torch.Tensor], torch.Tensor]
    strength: float

    def after_backward(self, step: Step) -> None:
        """Add ``strength * d penalty / d w`` to each weight's gradient."""
        for name, p in step.model.named_parameters():
            if name.endswith("weight") and p.grad is not None and p.dim() > 1:
                p.grad.add_(self.strength * self.grad(p.detach()))


def _train_mlp(digits: DataSplits, regulariser: str, method: str) -> nn.Module:
    """An MLP trained 3 epochs on digits with a regulariser, through the training loop."""
    torch.manual_seed(0)
    model = build_model("mlp", 1, 10, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    x, y = digits.train.x, digits.train.y
    options = {"eps": 0.1, "steps": 3} if method == "pgd-at" else {}
    fit(
        model,
        make_method(method, **options),
        opt,
        x,
        y,
        EpochSampler(len(y), gen),
        batch_size=64,
        epochs=3,
        lr=0.05,
        gen=gen,
        hooks=[Penalty(REGULARISERS[regulariser], 1e-3)],
    )
    return model.eval()


def _check_holds(model: nn.Module, digits: DataSplits) -> dict[str, float]:
    """The bound >= the per-sample max of the measured gap, both threat models."""
    x, y = digits.test.x[:100], digits.test.y[:100]
    record = compress_record(model, x, y, eps=EPS, steps=20)
    for norm in ("linf", "l2"):
        b, gap = record["bound"][norm], record["gap"][norm]
        assert gap["max"] > 0  # the attack raised some loss
        assert b["bound"] >= gap["max"] and b["bound_compressibility"] >= b["bound"]
        assert record["bound_holds"][norm] is True
    return {n: record["gap"][n]["robust_accuracy"] for n in ("linf", "l2")}


def test_bound_is_at_least_the_measured_gap_on_a_trained_resnet(
    digits_net: nn.Module, digits: DataSplits
) -> None:
    _check_holds(digits_net, digits)


@pytest.mark.parametrize(
    ("regulariser", "method"),
    [("l1", "standard"), ("group", "standard"), ("nuclear", "standard"), ("l1", "pgd-at")],
)
def test_bound_is_at_least_the_measured_gap_on_regularised_mlps(
    digits: DataSplits, regulariser: str, method: str
) -> None:
    model = _train_mlp(digits, regulariser, method)
    with torch.no_grad():
        acc = float((model(digits.test.x[:200]).argmax(1) == digits.test.y[:200]).double().mean())
    assert acc > 0.6  # it learnt something
    _check_holds(model, digits)


def test_rank_correlation_against_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    a = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    b = [2.0, 7.0, 1.0, 8.0, 2.0, 8.0, 1.0, 8.0]
    assert rank_correlation(a, b) == pytest.approx(float(stats.spearmanr(a, b)[0]), rel=1e-12)
    assert rank_correlation([1, 2, 3], [10, 20, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_bound_gap_correlation_reads_compress_records() -> None:
    records: list[dict[str, Any]] = [
        {"bound": {"l2": {"bound": b}}, "gap": {"l2": {"mean": g}}}
        for b, g in ((1.0, 0.1), (2.0, 0.3), (3.0, 0.2), (4.0, 0.5))
    ]
    records.append({"bound": {"l2": {"refused": "no"}}, "gap": {"l2": {"mean": 9.0}}})
    assert bound_gap_correlation(records, "l2") == pytest.approx(0.8)

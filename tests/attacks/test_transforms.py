"""SGM (skip_gradient) and LinBP: hand-derived gradients, unchanged forward, nothing left behind."""

from __future__ import annotations

import copy
import math
import sys
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustlab.attacks.iterative import IterativeAttack
from robustlab.attacks.transforms import (
    declare_residual,
    find_residual_sites,
    linbp,
    skip_gradient,
)
from robustlab.errors import RobustlabError
from robustlab.models import ARCHITECTURES, build_model
from robustlab.models.blocks import ResidualBlock

_RESIDUAL = ("resnet", "resnet8", "resnet14", "resnet20", "preact_resnet", "preact_resnet8")
RESIDUAL_ZOO = tuple(a for a in (*_RESIDUAL, "densenet", "vit") if a in ARCHITECTURES)
PLAIN_ZOO = tuple(a for a in ("mlp", "vgg", "vgg11") if a in ARCHITECTURES)

# ---- helpers ------------------------------------------------------------------------------


def _mlp_branch(w1: torch.Tensor, w2: torch.Tensor, inplace: bool) -> nn.Sequential:
    """Linear(w1) - ReLU - Linear(w2), no biases."""
    a = nn.Linear(w1.shape[1], w1.shape[0], bias=False, dtype=w1.dtype)
    b = nn.Linear(w2.shape[1], w2.shape[0], bias=False, dtype=w2.dtype)
    with torch.no_grad():
        a.weight.copy_(w1)
        b.weight.copy_(w2)
    return nn.Sequential(a, nn.ReLU(inplace=inplace), b)


class Toy(nn.Module):
    """Two residual blocks z + W2 relu(W1 z) (optionally a ReLU after the sum), a linear head."""

    def __init__(self, ws: list[torch.Tensor], head: torch.Tensor, inplace: bool, post: bool):
        super().__init__()
        self.blocks = nn.Sequential(
            *[
                ResidualBlock(
                    _mlp_branch(ws[2 * i], ws[2 * i + 1], inplace),
                    post=nn.ReLU(inplace=inplace) if post else None,
                )
                for i in range(2)
            ]
        )
        self.head = nn.Linear(head.shape[1], head.shape[0], bias=False, dtype=head.dtype)
        with torch.no_grad():
            self.head.weight.copy_(head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.blocks(x))
        return logits


def _toy_weights(d: int = 6, h: int = 8, k: int = 3) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ws = []
    for _ in range(2):
        ws.append(torch.randn(h, d, generator=g, dtype=torch.float64))
        ws.append(torch.randn(d, h, generator=g, dtype=torch.float64) * 0.5)
    return ws, torch.randn(k, d, generator=g, dtype=torch.float64)


def _hand_gradient(
    ws: list[torch.Tensor],
    head: torch.Tensor,
    x: torch.Tensor,
    c: torch.Tensor,
    gamma: float,
    post: bool,
) -> torch.Tensor:
    """d(sum c * logits)/dx with the branch gradient scaled by gamma, written out by hand."""
    zs, pre_sums = [x], []
    for i in range(2):
        z = zs[-1]
        s = z + torch.relu(z @ ws[2 * i].T) @ ws[2 * i + 1].T
        pre_sums.append(s)
        zs.append(torch.relu(s) if post else s)
    g = c @ head  # gradient at z_2
    for i in (1, 0):
        if post:
            g = g * (pre_sums[i] > 0)
        z = zs[i]
        mask = (z @ ws[2 * i].T > 0).to(g.dtype)
        branch = ((g @ ws[2 * i + 1]) * mask) @ ws[2 * i]
        g = g + gamma * branch
    return g


def _grad(model: nn.Module, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and gradient of sum(c * model(x)) with respect to x."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    return out.detach(), torch.autograd.grad((out * c).sum(), x)[0]


def _ce_grad(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the cross-entropy input gradient."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    return out.detach(), torch.autograd.grad(F.cross_entropy(out, y), x)[0]


def _snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a transform could leave behind: hooks, parameters, buffers, modes, flags."""
    hooks = []
    for m in model.modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_forward_hooks_with_kwargs",
            "_forward_pre_hooks_with_kwargs",
            "_forward_hooks_always_called",
        ):
            hooks.append(len(getattr(m, attr, {})))
    return {
        "hooks": hooks,
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "grads": [p.requires_grad for p in model.parameters()],
        "types": [type(m) for m in model.modules()],
    }


def _assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["hooks"] == before["hooks"]
    assert all(h == 0 for h in after["hooks"])
    assert after["modes"] == before["modes"]
    assert after["grads"] == before["grads"]
    assert after["types"] == before["types"]
    assert before["state"].keys() == after["state"].keys()
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])


class _Scale(nn.Module):
    """Reference for tests: identity forward, gradient times s (independent of transforms.py)."""

    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach() + self.s * (x - x.detach())


def _zoo(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(arch, image_size=8)
    # a few train-mode passes give batch norm non-trivial statistics
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(16, 1, 8, 8))
    return model.eval()


def _batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


# ---- SGM on the toy network -----------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("post", [False, True])
def test_two_block_gradient_equals_the_hand_derived_one(
    gamma: float, inplace: bool, post: bool
) -> None:
    ws, head = _toy_weights()
    model = Toy(ws, head, inplace, post).double().eval()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64)
    c = torch.randn(5, 3, generator=g, dtype=torch.float64)
    plain_out, plain = _grad(model, x, c)
    with skip_gradient(model, gamma) as sites:
        assert len(sites) == 2
        out, grad = _grad(model, x, c)
    assert torch.equal(out, plain_out)  # forward bit-for-bit unchanged
    expected = _hand_gradient(ws, head, x, c, gamma, post)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    if gamma == 1.0:
        assert torch.equal(grad, plain)  # exactly the plain gradient
    else:
        assert not torch.allclose(grad, plain)


def test_inplace_relu_gives_the_same_gradient_as_out_of_place() -> None:
    ws, head = _toy_weights()
    x = torch.randn(4, 6, dtype=torch.float64)
    c = torch.randn(4, 3, dtype=torch.float64)
    grads = []
    for inplace in (False, True):
        model = Toy(ws, head, inplace, post=True).double().eval()
        with skip_gradient(model, 0.3):
            grads.append(_grad(model, x, c)[1])
    assert torch.equal(grads[0], grads[1])


def test_nested_contexts_multiply_and_unwind() -> None:
    ws, head = _toy_weights()
    model = Toy(ws, head, False, False).double().eval()
    x, c = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    with skip_gradient(model, 0.5), skip_gradient(model, 0.4):
        grad = _grad(model, x, c)[1]
    torch.testing.assert_close(grad, _hand_gradient(ws, head, x, c, 0.2, False))
    assert all(not m._forward_hooks for m in model.modules())


# ---- the zoo --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", RESIDUAL_ZOO)
def test_zoo_forward_unchanged_gradient_changed_model_restored(arch: str) -> None:
    model = _zoo(arch)
    x, y = _batch()
    before = _snapshot(model)
    plain_out, plain = _ce_grad(model, x, y)
    with skip_gradient(model, 0.5):
        out, grad = _ce_grad(model, x, y)
        with torch.no_grad():
            assert torch.equal(model(x), plain_out)
    assert torch.equal(out, plain_out)
    assert not torch.allclose(grad, plain, rtol=1e-3, atol=1e-6)
    with skip_gradient(model, 1.0):
        assert torch.equal(_ce_grad(model, x, y)[1], plain)
    _assert_same(before, _snapshot(model))
    assert torch.equal(_ce_grad(model, x, y)[1], plain)


@pytest.mark.parametrize("arch", PLAIN_ZOO)
def test_models_without_residual_blocks_get_a_clear_error(arch: str) -> None:
    model = _zoo(arch)
    before = _snapshot(model)
    with pytest.raises(RobustlabError, match="needs residual blocks.*declare_residual"):  # noqa: SIM117
        with skip_gradient(model, 0.5):
            pass
    with pytest.raises(RobustlabError, match="needs residual blocks"), linbp(model):
        pass
    _assert_same(before, _snapshot(model))


@pytest.mark.parametrize("gamma", [0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.5"])
def test_gamma_outside_zero_one_is_refused(gamma: Any) -> None:
    model = _zoo("resnet8")
    with pytest.raises(RobustlabError, match="gamma"), skip_gradient(model, gamma):
        pass
    assert all(not m._forward_hooks for m in model.modules())


def test_hooks_are_removed_after_an_exception() -> None:
    model = _zoo("resnet8")
    before = _snapshot(model)
    x, y = _batch()
    with pytest.raises(ValueError, match="boom"), skip_gradient(model, 0.2), linbp(model, 1):
        _ce_grad(model, x, y)
        raise ValueError("boom")
    _assert_same(before, _snapshot(model))


def _wrap_branches(model: nn.Module, factor: Callable[[ResidualBlock], float]) -> nn.Module:
    """A copy whose residual branches end in an explicit gradient scale (the reference)."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, ResidualBlock):
            m.branch = nn.Sequential(m.branch, _Scale(factor(m)))
    return ref


def _wrap_dense_relus(model: nn.Module, s: float) -> nn.Module:
    """A copy with every ReLU inside a dense layer's branch followed by a gradient scale s."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, ResidualBlock):
            branch = m.branch
            assert isinstance(branch, nn.Sequential)
            for i, layer in enumerate(branch):
                if isinstance(layer, nn.ReLU):
                    branch[i] = nn.Sequential(nn.ReLU(), _Scale(s))
    return ref


def test_resnet_blocks_scale_by_gamma_and_only_the_branch() -> None:
    model = _zoo("resnet8")
    x, y = _batch()
    ref = _wrap_branches(model, lambda b: 0.3)
    with skip_gradient(model, 0.3):
        grad = _ce_grad(model, x, y)[1]
    torch.testing.assert_close(grad, _ce_grad(ref, x, y)[1], rtol=1e-5, atol=1e-7)


def test_dense_layers_follow_the_sqrt_gamma_per_relu_convention() -> None:
    model = _zoo("densenet")
    x, y = _batch()
    gamma = 0.5
    ref = _wrap_dense_relus(model, math.sqrt(gamma))
    with skip_gradient(model, gamma):
        grad = _ce_grad(model, x, y)[1]
    torch.testing.assert_close(grad, _ce_grad(ref, x, y)[1], rtol=1e-4, atol=1e-7)


def test_vit_sub_blocks_scale_by_sqrt_gamma() -> None:
    model = _zoo("vit")
    sites = find_residual_sites(model)
    assert len(sites) == 8 and all(s.power == 0.5 for s in sites)
    x, y = _batch()
    ref = _wrap_branches(model, lambda b: math.sqrt(0.6))
    with skip_gradient(model, 0.6):
        grad = _ce_grad(model, x, y)[1]
    torch.testing.assert_close(grad, _ce_grad(ref, x, y)[1], rtol=1e-4, atol=1e-7)


def test_attacks_compose_with_skip_gradient() -> None:
    model = _zoo("resnet8")
    x, y = _batch()
    before = _snapshot(model)
    attack = IterativeAttack(eps=0.1, steps=3, decay=1.0, diversity_prob=0.5)
    plain = attack(model, x, y)
    with skip_gradient(model, 0.2):
        sgm = attack(model, x, y)
    assert attack.threat.contains(x, sgm).all()
    assert not torch.equal(plain, sgm)
    _assert_same(before, _snapshot(model))


# ---- foreign models ---------------------------------------------------------------------------


class ForeignBlock(nn.Module):
    """Written like torchvision's BasicBlock: one shared in-place ReLU, ``out += identity``."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        result: torch.Tensor = self.relu(out)
        return result


class ForeignNet(nn.Module):
    """A small foreign ResNet: a stem, two ForeignBlocks, pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, 1, 1, bias=False), nn.ReLU(inplace=True))
        self.layer = nn.Sequential(ForeignBlock(4, 4, 1), ForeignBlock(4, 8, 2))
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.fc(self.layer(self.stem(x)).mean((2, 3)))
        return logits


def _as_robustlab(net: ForeignNet) -> nn.Module:
    """The same network (sharing weights) written with robustlab ResidualBlocks."""
    blocks = []
    for b in net.layer:
        assert isinstance(b, ForeignBlock)
        branch = nn.Sequential(b.conv1, b.bn1, nn.ReLU(), b.conv2, b.bn2)
        blocks.append(ResidualBlock(branch, b.down, nn.ReLU()))

    class Same(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.blocks, self.fc = net.stem, nn.Sequential(*blocks), net.fc

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits: torch.Tensor = self.fc(self.blocks(self.stem(x)).mean((2, 3)))
            return logits

    return Same().eval()


def _foreign() -> ForeignNet:
    torch.manual_seed(1)
    net = ForeignNet()
    net.train()
    with torch.no_grad():
        net(torch.rand(16, 1, 8, 8))
    return net.eval()


def test_foreign_model_without_declaration_is_an_error() -> None:
    with pytest.raises(RobustlabError, match="ForeignNet has none"), skip_gradient(_foreign(), 0.5):
        pass


def test_declared_foreign_blocks_match_the_robustlab_equivalent() -> None:
    net = _foreign()
    same = _as_robustlab(net)
    x, y = _batch()
    torch.testing.assert_close(_ce_grad(net, x, y)[1], _ce_grad(same, x, y)[1])
    undo = declare_residual(ForeignBlock, "bn2")
    try:
        before = _snapshot(net)
        with skip_gradient(net, 0.25) as sites:
            assert [s.block for s in sites] == list(net.layer)
            out, grad = _ce_grad(net, x, y)
        with skip_gradient(same, 0.25):
            ref_out, ref = _ce_grad(same, x, y)
        assert torch.equal(out, _ce_grad(net, x, y)[0])
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-7)
        _assert_same(before, _snapshot(net))
    finally:
        undo()
    with pytest.raises(RobustlabError, match="has none"), skip_gradient(net, 0.5):
        pass


@pytest.mark.parametrize("renormalize", [False, True])
def test_linbp_on_a_declared_chain_matches_the_robustlab_equivalent(renormalize: bool) -> None:
    # ForeignBlock calls its one ReLU on the branch and again after the addition: only the
    # first call may be linearised, and the branch is re-run from conv1's input
    net = _foreign()
    same = _as_robustlab(net)
    x, y = _batch()
    chain = ["conv1", "bn1", "relu", "conv2", "bn2"]
    undo = declare_residual(ForeignBlock, "bn2", chain=chain)
    try:
        before = _snapshot(net)
        plain_out, plain = _ce_grad(net, x, y)
        for start in (0, -1):
            with linbp(net, start, renormalize=renormalize) as sites:
                assert [s.chain[2] for s in sites] == [b.relu for b in net.layer][start:]
                out, grad = _ce_grad(net, x, y)
            with linbp(same, start, renormalize=renormalize):
                ref = _ce_grad(same, x, y)[1]
            assert torch.equal(out, plain_out)
            assert not torch.allclose(grad, plain)
            torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-7)
        with skip_gradient(net, 0.5), linbp(net, 0, renormalize=renormalize):
            both = _ce_grad(net, x, y)[1]
        with skip_gradient(same, 0.5), linbp(same, 0, renormalize=renormalize):
            torch.testing.assert_close(both, _ce_grad(same, x, y)[1], rtol=1e-5, atol=1e-7)
        _assert_same(before, _snapshot(net))
    finally:
        undo()


def test_a_bad_chain_declaration_is_named() -> None:
    net = _foreign()
    undo = declare_residual(ForeignBlock, "bn2", chain=["conv1", "nope"])
    try:
        with pytest.raises(RobustlabError, match="chain step 'nope'"), linbp(net):
            pass
    finally:
        undo()
    with pytest.raises(RobustlabError, match="chain must be attribute paths"):
        declare_residual(ForeignBlock, "bn2", chain=[])


def test_declaring_one_instance_and_bad_declarations() -> None:
    net = _foreign()
    undo = declare_residual(net.layer[1], lambda b: b.get_submodule("bn2"))
    try:
        with skip_gradient(net, 0.5) as sites:
            assert [s.block for s in sites] == [net.layer[1]]
    finally:
        undo()
    undo = declare_residual(ForeignBlock, "nope")
    try:
        with pytest.raises(RobustlabError, match="no such submodule"), skip_gradient(net, 0.5):
            pass
    finally:
        undo()
    with pytest.raises(RobustlabError, match="power"):
        declare_residual(ForeignBlock, "bn2", power=0)
    with pytest.raises(RobustlabError, match="nn.Module"):
        declare_residual(int, "bn2")  # type: ignore[arg-type]  # bad arguments on purpose


class _DenseLayerLike(nn.Module):
    """Written like torchvision's ``_DenseLayer``: takes the list of earlier features."""

    def __init__(self, c_in: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(c_in)
        self.relu1: nn.Module = nn.ReLU(inplace=True)  # a test swaps it for a scaled ReLU
        self.conv1 = nn.Conv2d(c_in, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.relu2: nn.Module = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        out: torch.Tensor = self.conv2(
            self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x)))))
        )
        return out


class _DenseNetLike(nn.Module):
    """A stem, one dense block of three ``_DenseLayerLike`` (features appended), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, 1, 1, bias=False)
        self.layers = nn.ModuleList(_DenseLayerLike(4 + 3 * i, 3) for i in range(3))
        self.fc = nn.Linear(13, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(features))
        logits: torch.Tensor = self.fc(torch.cat(features, 1).mean((2, 3)))
        return logits


class _VitBlockLike(nn.Module):
    """Written like timm's ViT ``Block``: x + drop_path1(ls1(attn(norm1(x)))), then the MLP."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), nn.Linear(dim, dim)
        self.ls1: nn.Module = nn.Identity()  # a test swaps in a layer scale
        self.drop_path1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ls2: nn.Module = nn.Identity()
        self.drop_path2 = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        out: torch.Tensor = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return out


def _fake_module(monkeypatch: pytest.MonkeyPatch, name: str, **classes: type[nn.Module]) -> None:
    """Stand in for an installed third-party module (the adapters look in sys.modules)."""
    module = types.ModuleType(name)
    for cls_name, cls in classes.items():
        setattr(module, cls_name, type(cls_name, (cls,), {}))
    monkeypatch.setitem(sys.modules, name, module)


def test_torchvision_style_resnet_blocks_are_found_by_the_adapter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fake_module(monkeypatch, "torchvision.models.resnet", BasicBlock=ForeignBlock)
    basic = sys.modules["torchvision.models.resnet"].BasicBlock
    net = _foreign()
    for i, block in enumerate(net.layer):
        block.__class__ = basic
        assert isinstance(net.layer[i], ForeignBlock)
    same = _as_robustlab(net)
    x, y = _batch()
    with skip_gradient(net, 0.3) as sites:
        assert len(sites) == 2 and all(s.ends == (s.block.bn2,) for s in sites)
        grad = _ce_grad(net, x, y)[1]
    with skip_gradient(same, 0.3):
        ref = _ce_grad(same, x, y)[1]
    torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-7)
    monkeypatch.delitem(sys.modules, "torchvision.models.resnet")
    with pytest.raises(RobustlabError, match="has none"), skip_gradient(net, 0.3):
        pass


def test_torchvision_style_dense_layers_follow_the_sqrt_gamma_convention(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fake_module(monkeypatch, "torchvision.models.densenet", _DenseLayer=_DenseLayerLike)
    layer_cls = sys.modules["torchvision.models.densenet"]._DenseLayer
    torch.manual_seed(2)
    net = _DenseNetLike()
    net.train()
    with torch.no_grad():
        net(torch.rand(16, 1, 8, 8))
    net.eval()
    ref = copy.deepcopy(net)
    for layer in net.layers:
        layer.__class__ = layer_cls
    for layer in ref.layers:  # the paper's way: sqrt(gamma) after each of the two ReLUs
        assert isinstance(layer, _DenseLayerLike)
        layer.relu1 = nn.Sequential(nn.ReLU(), _Scale(math.sqrt(0.5)))
        layer.relu2 = nn.Sequential(nn.ReLU(), _Scale(math.sqrt(0.5)))
    x, y = _batch()
    with skip_gradient(net, 0.5) as sites:
        assert len(sites) == 3
        grad = _ce_grad(net, x, y)[1]
    torch.testing.assert_close(grad, _ce_grad(ref, x, y)[1], rtol=1e-5, atol=1e-7)


def test_timm_style_vit_blocks_scale_each_sub_block_by_sqrt_gamma(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fake_module(monkeypatch, "timm.models.vision_transformer", Block=_VitBlockLike)
    block_cls = sys.modules["timm.models.vision_transformer"].Block
    torch.manual_seed(3)
    net = nn.Sequential(_VitBlockLike(6), _VitBlockLike(6), nn.Flatten(), nn.Linear(24, 10))
    ref = copy.deepcopy(net)
    for block in list(net)[:2]:
        block.__class__ = block_cls
    for block in list(ref)[:2]:
        assert isinstance(block, _VitBlockLike)
        block.ls1 = _Scale(math.sqrt(0.6))
        block.ls2 = _Scale(math.sqrt(0.6))
    x = torch.rand(5, 4, 6)
    y = torch.randint(0, 10, (5,))
    with skip_gradient(net, 0.6) as sites:
        assert len(sites) == 2 and all(s.power == 0.5 and len(s.ends) == 2 for s in sites)
        grad = _ce_grad(net, x, y)[1]
    torch.testing.assert_close(grad, _ce_grad(ref, x, y)[1], rtol=1e-5, atol=1e-7)


def test_torchvision_resnet_is_recognised_when_installed() -> None:
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18(num_classes=10).eval()
    x = torch.rand(2, 3, 32, 32)
    y = torch.tensor([1, 2])
    plain_out, plain = _ce_grad(model, x, y)
    with skip_gradient(model, 0.5) as sites:
        assert len(sites) == 8
        out, grad = _ce_grad(model, x, y)
    assert torch.equal(out, plain_out) and not torch.allclose(grad, plain)


# ---- LinBP --------------------------------------------------------------------------------------


class OneBlock(nn.Module):
    """x + W2 relu(W1 x), then a linear head."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, head: torch.Tensor, inplace: bool):
        super().__init__()
        self.block = ResidualBlock(_mlp_branch(w1, w2, inplace))
        self.head = nn.Linear(head.shape[1], head.shape[0], bias=False, dtype=head.dtype)
        with torch.no_grad():
            self.head.weight.copy_(head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.block(x))
        return logits


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("gamma", [None, 0.3])
@pytest.mark.parametrize("sgm_outside", [False, True])
def test_linbp_gradient_equals_the_hand_derived_one(
    inplace: bool, renormalize: bool, gamma: float | None, sgm_outside: bool
) -> None:
    ws, head = _toy_weights()
    w1, w2 = ws[0], ws[1]
    model = OneBlock(w1, w2, head, inplace).double().eval()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64)
    c = torch.randn(5, 3, generator=g, dtype=torch.float64)
    plain_out = _grad(model, x, c)[0]
    if gamma is None:
        with linbp(model, 0, renormalize=renormalize):
            out, grad = _grad(model, x, c)
    elif sgm_outside:
        with skip_gradient(model, gamma), linbp(model, 0, renormalize=renormalize):
            out, grad = _grad(model, x, c)
    else:
        with linbp(model, 0, renormalize=renormalize), skip_gradient(model, gamma):
            out, grad = _grad(model, x, c)
    assert torch.equal(out, plain_out)
    up = c @ head
    linear = up @ w2 @ w1
    mask = (x @ w1.T > 0).to(x.dtype)
    true = ((up @ w2) * mask) @ w1
    branch = linear
    if renormalize:
        branch = linear * (true.norm(dim=1) / linear.norm(dim=1))[:, None]
    expected = up + (gamma or 1.0) * branch
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_linbp_on_the_zoo_keeps_forward_and_restores_the_model() -> None:
    for arch in ("resnet8", "preact_resnet8", "densenet", "vit"):  # one of each kind
        model = _zoo(arch)
        x, y = _batch()
        before = _snapshot(model)
        plain_out, plain = _ce_grad(model, x, y)
        with linbp(model, -1) as sites:
            assert len(sites) == 1
            out, grad = _ce_grad(model, x, y)
        assert torch.equal(out, plain_out), arch
        assert not torch.allclose(grad, plain), arch
        _assert_same(before, _snapshot(model))


def test_linbp_bad_input() -> None:
    model = _zoo("resnet8")
    with pytest.raises(RobustlabError, match="out of range.*3 residual blocks"), linbp(model, 3):
        pass
    with pytest.raises(RobustlabError, match="integer"), linbp(model, 1.5):  # type: ignore[arg-type]  # bad arguments on purpose
        pass
    net = _foreign()
    undo = declare_residual(ForeignBlock, "bn2")
    try:
        with pytest.raises(RobustlabError, match="whole_branch=True.*chain="), linbp(net):
            pass
    finally:
        undo()
    linear_only = nn.Sequential(ResidualBlock(nn.Linear(4, 4)), nn.Linear(4, 2))
    with pytest.raises(RobustlabError, match="no ReLU or GELU"), linbp(linear_only):
        pass

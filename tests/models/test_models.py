"""Tests of the model zoo: every registered architecture, its residual structure, every error."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from robustlab.errors import RobustlabError
from robustlab.models import (
    ARCHITECTURES,
    DenseLayer,
    Normalize,
    ResidualBlock,
    build_model,
    count_parameters,
    get_architecture,
    residual_blocks,
)

# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Expect:
    """What one architecture looks like when built with its default options."""

    adds: int  # ResidualBlocks merging by addition
    concats: int  # DenseLayers merging by concatenation


EXPECTED: dict[str, Expect] = {
    "resnet8": Expect(adds=3, concats=0),
    "resnet14": Expect(adds=6, concats=0),
    "resnet20": Expect(adds=9, concats=0),
    "resnet": Expect(adds=9, concats=0),
    "preact_resnet": Expect(adds=9, concats=0),
    "preact_resnet8": Expect(adds=3, concats=0),
    "vgg": Expect(adds=0, concats=0),
    "vgg11": Expect(adds=0, concats=0),
    "densenet": Expect(adds=0, concats=12),
    "vit": Expect(adds=8, concats=0),  # 4 layers, each an attention and an MLP block
    "mlp": Expect(adds=0, concats=0),
}

ARCHS = sorted(ARCHITECTURES)
SHAPES = [(1, 10, 28), (3, 10, 32), (1, 10, 8)]  # (in_channels, num_classes, image_size)
SHAPE_IDS = [f"c{c}k{k}s{s}" for c, k, s in SHAPES]

# (arch, shape) pairs an architecture cannot build; none of the registered ones today.
UNSUPPORTED: set[tuple[str, tuple[int, int, int]]] = set()

_CACHE: dict[tuple[str, int, int, int], nn.Sequential] = {}


def model_for(
    arch: str, in_channels: int = 1, num_classes: int = 10, size: int = 28
) -> nn.Sequential:
    """A seeded model in eval mode, built once per session and shape (tests must not train it)."""
    key = (arch, in_channels, num_classes, size)
    if key not in _CACHE:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            _CACHE[key] = build_model(
                arch, in_channels=in_channels, num_classes=num_classes, image_size=size
            )
    return _CACHE[key].eval()


def images(batch: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, size, size, generator=gen)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These models are tiny: threads only add overhead (and stall on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_table_covers_every_registered_architecture() -> None:
    assert set(EXPECTED) == set(ARCHITECTURES)


# ---------------------------------------------------------------- building and forward


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_builds_forward_and_input_gradient(arch: str, shape: tuple[int, int, int]) -> None:
    c, k, s = shape
    if (arch, shape) in UNSUPPORTED:
        with pytest.raises(RobustlabError, match=arch):
            build_model(arch, in_channels=c, num_classes=k, image_size=s)
        return
    model = model_for(arch, c, k, s)
    x = images(2, c, s).requires_grad_(True)
    out = model(x)
    assert out.shape == (2, k)
    assert torch.isfinite(out).all()
    loss = nn.functional.cross_entropy(out, torch.tensor([0, 1]))
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.shape == x.shape
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    # every image gets its own gradient
    assert (grad.flatten(1).abs().sum(1) > 0).all()


def test_shape_an_architecture_cannot_build_is_a_clear_error() -> None:
    with pytest.raises(RobustlabError, match=r"cannot build 'vit'.*patch size 4 must divide.*10"):
        build_model("vit", image_size=10)
    with pytest.raises(RobustlabError, match="patch size 5 must divide the image size 28"):
        build_model("vit", image_size=28, patch=5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("in_channels", {"in_channels": 0}),
        ("image_size", {"image_size": 0}),
        ("image_size", {"image_size": -4}),
        ("num_classes", {"num_classes": 0}),
        ("in_channels", {"in_channels": 1.5}),
        ("image_size", {"image_size": True}),
    ],
)
def test_impossible_shapes_are_robustlab_errors(
    arch: str, field: str, kwargs: dict[str, object]
) -> None:
    with pytest.raises(RobustlabError, match=f"{field} must be a positive integer"):
        build_model(arch, **kwargs)  # type: ignore[arg-type]  # bad arguments on purpose


@pytest.mark.parametrize(
    ("arch", "options", "match"),
    [
        ("vit", {"patch": 0}, "patch"),
        ("vit", {"heads": 0}, "heads"),
        ("vit", {"dim": 0}, "dim"),
        ("vit", {"heads": 3}, "divisible by heads 3"),
        ("resnet", {"width": 0}, "width"),
        ("preact_resnet", {"width": -1}, "width"),
        ("vgg", {"width": 0}, "width"),
        ("densenet", {"growth": 0}, "growth"),
        ("mlp", {"width": 0}, "width"),
        ("resnet", {"depth": "20"}, "depth .*must be an integer"),
        ("vit", {"depth": 2.0}, "depth .*must be an integer"),
        ("mlp", {"depth": True}, "depth .*must be an integer"),
    ],
)
def test_impossible_options_are_robustlab_errors(
    arch: str, options: dict[str, object], match: str
) -> None:
    with pytest.raises(RobustlabError, match=match):
        build_model(arch, **options)  # type: ignore[arg-type]  # bad arguments on purpose


# ---------------------------------------------------------------- normalisation


@pytest.mark.parametrize("arch", ARCHS)
def test_first_module_is_normalize_and_model_takes_unit_range_pixels(arch: str) -> None:
    mean, std = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model(arch, in_channels=3, image_size=8, mean=mean, std=std).eval()
    first = next(iter(model.children()))
    assert isinstance(first, Normalize)
    assert model[0] is first
    x = images(3, 3, 8)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(first(x), expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model[1](expected), rtol=1e-5, atol=1e-5)


def test_normalize_math_and_buffers() -> None:
    norm = Normalize([0.5, 0.25], [2.0, 0.5])
    x = torch.tensor([[[[0.0]], [[1.0]]]])
    assert torch.equal(norm(x), torch.tensor([[[[-0.25]], [[1.5]]]]))
    assert {name for name, _ in norm.named_buffers()} == {"mean", "std"}
    assert "mean=[0.5, 0.25]" in repr(norm)
    with pytest.raises(ValueError):
        Normalize([0.5], [1.0, 1.0])


def test_default_normalisation_is_identity() -> None:
    model = model_for("mlp")
    x = images(2, 1, 28)
    assert torch.equal(model[0](x), x)


# ---------------------------------------------------------------- residual structure


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_block_counts(arch: str) -> None:
    blocks = residual_blocks(model_for(arch))
    adds = [b for b in blocks if not isinstance(b, DenseLayer)]
    concats = [b for b in blocks if isinstance(b, DenseLayer)]
    assert (len(adds), len(concats)) == (EXPECTED[arch].adds, EXPECTED[arch].concats)
    for b in adds:
        assert b.merge == "add"
    for b in concats:
        assert b.merge == "concat"


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_blocks_are_post_of_shortcut_plus_branch(arch: str) -> None:
    model = model_for(arch, 3, 10, 8)
    blocks = residual_blocks(model)
    inputs: dict[int, torch.Tensor] = {}

    def grab(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        inputs[id(module)] = args[0].detach().clone()

    handles = [b.register_forward_pre_hook(grab) for b in blocks]
    try:
        with torch.no_grad():
            model(images(2, 3, 8))
    finally:
        for h in handles:
            h.remove()
    assert len(inputs) == len(blocks)
    with torch.no_grad():
        for block in blocks:
            children = dict(block.named_children())
            assert isinstance(children.get("branch"), nn.Module)
            assert isinstance(children.get("shortcut"), nn.Module)
            x = inputs[id(block)]
            out = block(x.clone())
            if isinstance(block, DenseLayer):
                assert isinstance(block.shortcut, nn.Identity)
                expected = torch.cat([x, block.branch(x.clone())], dim=1)
            else:
                expected = block.post(block.shortcut(x.clone()) + block.branch(x.clone()))
            assert torch.equal(out, expected)
            assert torch.equal(inputs[id(block)], x)  # the block did not modify its input


def test_residual_blocks_finds_blocks_in_module_order() -> None:
    inner = ResidualBlock(nn.Linear(2, 2))
    outer = nn.Sequential(nn.Linear(2, 2), inner, DenseLayer(nn.Linear(2, 3)))
    found = residual_blocks(outer)
    assert found[0] is inner and isinstance(found[1], DenseLayer) and len(found) == 2
    x = torch.randn(4, 2)
    assert torch.equal(inner(x), x + inner.branch(x))
    assert outer[2](x).shape == (4, 5)


# ---------------------------------------------------------------- registry and its errors


@pytest.mark.parametrize("arch", ARCHS)
def test_count_parameters(arch: str) -> None:
    model = model_for(arch)
    n = count_parameters(model)
    assert n > 0
    assert n == sum(p.numel() for p in model.parameters())  # Normalize's buffers don't count


def test_count_parameters_skips_frozen() -> None:
    model = build_model("mlp", image_size=8)
    total = count_parameters(model)
    fc = model[1].fc
    assert isinstance(fc, nn.Linear)
    fc.weight.requires_grad_(False)
    assert count_parameters(model) == total - fc.weight.numel()


def test_unknown_architecture_lists_known_names() -> None:
    with pytest.raises(RobustlabError, match="unknown architecture 'resnet9000'") as info:
        build_model("resnet9000")
    for name in ARCHITECTURES:
        assert name in str(info.value)
    with pytest.raises(RobustlabError, match="unknown architecture"):
        get_architecture("")


def test_unknown_option_is_named() -> None:
    with pytest.raises(RobustlabError, match=r"'resnet' has no option dropout.*depth, width"):
        build_model("resnet", dropout=0.5)
    with pytest.raises(RobustlabError, match="no option image_size"):
        get_architecture("vit").arguments(image_size=32)


@pytest.mark.parametrize(
    ("arch", "depth"),
    [("resnet", 9), ("resnet", 2), ("resnet", -4), ("preact_resnet", 10), ("vgg", 9)],
)
def test_bad_depth(arch: str, depth: int) -> None:
    with pytest.raises(RobustlabError, match=rf"cannot build '{arch}'.*depth.*{depth}"):
        build_model(arch, depth=depth)


def test_options_reach_the_network() -> None:
    assert len(residual_blocks(build_model("resnet", depth=14))) == 6
    assert len(residual_blocks(build_model("vit", image_size=8, depth=1))) == 2
    args = get_architecture("resnet8").arguments()
    assert args == {"depth": 8, "width": 16}


@pytest.mark.parametrize(
    ("mean", "std", "match"),
    [
        ([0.5, 0.5], [0.5], "one mean and std per channel"),
        ([0.5], [0.5, 0.5, 0.5], "one mean and std per channel"),
        ([], [], "one mean and std per channel"),
        ([0.5], [0.0], "std must be positive"),
        ([0.5], [-1.0], "std must be positive"),
        ([0.5], [math.nan], "std must be positive"),
        ([0.5], [math.inf], "std must be positive"),
        ([math.nan], [1.0], "mean must be finite"),
        (["a"], [1.0], "must be sequences of numbers"),
    ],
)
def test_bad_normalisation(mean: list[float], std: list[float], match: str) -> None:
    with pytest.raises(RobustlabError, match=match):
        build_model("mlp", image_size=8, mean=mean, std=std)


# ---------------------------------------------------------------- determinism, batch independence


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_weights(arch: str) -> None:
    def build(seed: int) -> dict[str, torch.Tensor]:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return build_model(arch, image_size=8).state_dict()

    a, b, c = build(3), build(3), build(4)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_outputs_do_not_depend_on_the_batch(arch: str) -> None:
    model = model_for(arch, 3, 10, 8)
    x = images(4, 3, 8, seed=1)
    with torch.no_grad():
        full = model(x)
        for i in range(len(x)):
            torch.testing.assert_close(full[i : i + 1], model(x[i : i + 1]), rtol=0, atol=1e-5)

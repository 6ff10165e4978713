"""The FGSM family (FGSM, I-FGSM, MI, DI, TI): closed forms on linear models, invariants.

The model guard, eps 0, seeds and bad inputs are checked for every attack in
test_all_attacks.py; the linear cases come from _linear_cases.py.
"""

from __future__ import annotations

from collections.abc import Callable

import hypothesis.strategies as st
import pytest
import torch
from _linear_cases import three_class_case, two_class_case
from hypothesis import given, settings
from torch import nn

from robustlab.attacks.base import Attack
from robustlab.attacks.iterative import (
    BIM,
    DIFGSM,
    FGSM,
    IFGSM,
    MIFGSM,
    TIFGSM,
    IterativeAttack,
    gaussian_kernel,
    input_diversity,
    smooth_gradient,
)
from robustlab.attacks.optim import Objective
from robustlab.core.threat import NORMS, ThreatModel
from robustlab.errors import RobustlabError


def _mlp(shape: tuple[int, ...], classes: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(int(torch.tensor(shape).prod()), 16),
        nn.Tanh(),
        nn.Linear(16, classes),
    ).eval()


def _convnet() -> nn.Module:
    """A small nonlinear image model, so that DI and TI actually change gradients."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)
    ).eval()


def _gradient(objective: Objective, x: torch.Tensor) -> torch.Tensor:
    """The input gradient of an engine objective's summed per-sample values."""
    x = x.clone().requires_grad_(True)
    out = objective(x)
    values = out[0] if isinstance(out, tuple) else out
    grad: torch.Tensor = torch.autograd.grad(values.sum(), x)[0]
    return grad


def _robust(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        pred: torch.Tensor = model(x_adv).argmax(1)
        return pred == y


@settings(max_examples=30, deadline=None)
@given(
    norm=st.sampled_from(NORMS),
    eps=st.floats(0.0, 2.0),
    batch=st.integers(1, 4),
    channels=st.sampled_from([1, 3]),
    height=st.integers(2, 9),
    width=st.integers(2, 9),
    steps=st.integers(1, 3),
    decay=st.sampled_from([0.0, 1.0]),
    diversity_prob=st.sampled_from([0.0, 0.5, 1.0]),
    resize_rate=st.sampled_from([0.3, 0.9, 1.0]),
    ti_kernel=st.sampled_from([0, 1, 3, 7]),
    random_start=st.booleans(),
    targeted=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_every_example_lies_inside_its_threat_model(
    norm: str,
    eps: float,
    batch: int,
    channels: int,
    height: int,
    width: int,
    steps: int,
    decay: float,
    diversity_prob: float,
    resize_rate: float,
    ti_kernel: int,
    random_start: bool,
    targeted: bool,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    model = _mlp((channels, height, width))
    x = torch.rand(batch, channels, height, width)
    y = torch.randint(0, 4, (batch,))
    targets = (y + 1) % 4 if targeted else None
    attack = IterativeAttack(
        norm,
        eps,
        steps,
        alpha=eps / 2 + 1e-3,  # large steps, so the projection has work to do
        decay=decay,
        diversity_prob=diversity_prob,
        resize_rate=resize_rate,
        ti_kernel=ti_kernel,
        random_start=random_start,
        seed=seed,
    )
    x_adv = attack(model, x, y, targets)
    assert x_adv.shape == x.shape
    assert bool(ThreatModel(norm, eps).contains(x, x_adv).all())


@pytest.mark.parametrize("eps", [0.02, 0.1, 0.3])
def test_fgsm_attains_the_linf_optimum_of_a_linear_model_in_one_step(eps: float) -> None:
    model, x, y, exact = two_class_case("linf", eps)
    # the optimum pushes every pixel eps against the true class: x -+ eps * sign(w); with the
    # margin loss FGSM lands on it exactly (CE's gradient underflows to 0 at margins > ~16)
    push = (1 - 2 * y).float().view(-1, 1, 1, 1) * model.w.detach().sign()
    assert torch.allclose(FGSM(eps=eps, loss="cw")(model, x, y), x + eps * push, atol=1e-6)
    assert torch.equal(_robust(model, FGSM(eps=eps)(model, x, y), y), exact)
    assert 0 < int(exact.sum()) < len(exact)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("eps", [0.1, 0.3])
@pytest.mark.parametrize("preset", [IFGSM, MIFGSM])
def test_iterative_attacks_find_the_exact_robust_accuracy_of_a_linear_model(
    norm: str, eps: float, preset: type[IFGSM] | type[MIFGSM]
) -> None:
    model, x, y, exact = two_class_case(norm, eps)
    x_adv = preset(norm=norm, eps=eps, steps=10)(model, x, y)
    assert torch.equal(_robust(model, x_adv, y), exact)
    assert 0 < int(exact.sum()) < len(exact)


def test_input_diversity_keeps_the_shape_and_pads_with_zeros() -> None:
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 1, 28, 28), (2, 3, 32, 32), (3, 3, 7, 11), (2, 1, 2, 2), (1, 3, 224, 224)]:
        x = torch.rand(shape) + 0.5  # strictly positive, so the padding shows as zeros
        for _ in range(5):
            out = input_diversity(x, 1.0, 0.5, g)
            assert out.shape == x.shape
            assert bool((out >= 0).all())
        assert input_diversity(x, 0.0, 0.5, g) is x  # off: the very same tensor
        assert torch.equal(input_diversity(x, 1.0, 1.0, g), x)  # resize to itself, no pad
    x = torch.rand(1, 1, 30, 30) + 0.5
    shrunk = [int((input_diversity(x, 1.0, 0.5, g) == 0).sum()) for _ in range(40)]
    assert max(shrunk) > 0 and min(shrunk) < max(shrunk)  # sizes and offsets do vary


def test_input_diversity_is_differentiable() -> None:
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    out = input_diversity(x, 1.0, 0.5, torch.Generator().manual_seed(3))
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.shape == x.shape and float(grad.abs().sum()) > 0


def test_di_off_is_ifgsm_bit_for_bit() -> None:
    model, x = _convnet(), torch.rand(6, 3, 8, 8)
    y = torch.randint(0, 5, (6,))
    di, plain = DIFGSM(eps=0.1, diversity_prob=0.0).engine, IFGSM(eps=0.1).engine
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(
        _gradient(di.objective(model, y, None, g1), x),
        _gradient(plain.objective(model, y, None, g2), x),
    )
    assert torch.equal(
        DIFGSM(eps=0.1, diversity_prob=0.0)(model, x, y), IFGSM(eps=0.1)(model, x, y)
    )
    assert not torch.equal(
        DIFGSM(eps=0.1, diversity_prob=1.0)(model, x, y), IFGSM(eps=0.1)(model, x, y)
    )


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_ti_with_kernel_size_one_and_mi_with_decay_zero_are_ifgsm(norm: str) -> None:
    model, x = _convnet(), torch.rand(6, 3, 8, 8)
    y = torch.randint(0, 5, (6,))
    eps = 0.1 if norm == "linf" else 1.0
    plain = IFGSM(norm=norm, eps=eps)(model, x, y)
    assert torch.equal(TIFGSM(norm=norm, eps=eps, kernel_size=1)(model, x, y), plain)
    assert torch.equal(MIFGSM(norm=norm, eps=eps, decay=0.0)(model, x, y), plain)
    assert not torch.equal(TIFGSM(norm=norm, eps=eps, kernel_size=3)(model, x, y), plain)
    assert not torch.equal(MIFGSM(norm=norm, eps=eps)(model, x, y), plain)


def test_gaussian_kernel_and_depthwise_smoothing() -> None:
    k = gaussian_kernel(7)  # default sigma = (7 - 1) / 6 = 1 pixel
    assert k.shape == (7, 7) and float(k.sum()) == pytest.approx(1.0)
    assert torch.equal(k, k.T) and torch.equal(k, k.flip(0))
    assert float(k[3, 4] / k[3, 3]) == pytest.approx(torch.exp(torch.tensor(-0.5)).item())
    assert torch.equal(gaussian_kernel(1), torch.ones(1, 1, dtype=torch.float64))
    grad = torch.zeros(1, 2, 9, 9)
    grad[0, 0, 4, 4] = 1.0  # an impulse in channel 0 only
    out = smooth_gradient(grad, k)
    assert out.shape == grad.shape
    assert torch.allclose(out[0, 0, 1:8, 1:8], k.float()) and float(out[0, 1].abs().sum()) == 0


def test_mi_fgsm_follows_its_definition_and_returns_the_last_iterate() -> None:
    """A literal MI-FGSM loop (Dong et al. 2018, linf): the attack must match it exactly."""
    model, x = _convnet(), torch.rand(6, 3, 8, 8)
    y = torch.randint(0, 5, (6,))
    eps, steps, mu = 0.1, 5, 1.0
    x_adv, g = x.clone(), torch.zeros_like(x)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = nn.functional.cross_entropy(model(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            g = mu * g + grad / grad.abs().flatten(1).sum(1).view(-1, 1, 1, 1)
            x_adv = (x + (x_adv + eps / steps * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    assert torch.equal(MIFGSM(eps=eps, steps=steps, decay=mu)(model, x, y), x_adv)


def test_randomness_comes_from_the_seed() -> None:
    model, x = _convnet(), torch.rand(6, 3, 8, 8)
    y = torch.randint(0, 5, (6,))

    def attack(seed: int) -> Attack:
        return IterativeAttack(
            "linf", 0.1, 5, decay=1.0, diversity_prob=0.7, ti_kernel=3, random_start=True, seed=seed
        )

    torch.manual_seed(1)
    a = attack(3)(model, x, y)
    torch.manual_seed(2)  # the global generator plays no part
    assert torch.equal(attack(3)(model, x, y), a)
    assert not torch.equal(attack(4)(model, x, y), a)


def test_targeted_attacks_reach_their_targets_on_a_three_class_linear_model() -> None:
    model, x, y = three_class_case(n=200)
    g = torch.Generator().manual_seed(5)
    targets = (y + torch.randint(1, 3, (200,), generator=g)) % 3
    for attack in [
        FGSM(eps=0.3),
        IFGSM(eps=0.3),
        MIFGSM(norm="l2", eps=2.0),
        IterativeAttack("linf", 0.3, 10, decay=1.0, diversity_prob=0.5, ti_kernel=3),
    ]:
        x_adv = attack(model, x, y, targets)
        with torch.no_grad():
            pred = model(x_adv).argmax(1)
        assert torch.equal(pred, targets), attack.config()["name"]


def test_presets_record_their_full_configuration() -> None:
    assert BIM is IFGSM
    cfg = MIFGSM(eps=0.1, steps=4).config()
    assert cfg["name"] == "mifgsm" and cfg["decay"] == 1.0 and cfg["alpha"] == pytest.approx(0.025)
    assert FGSM(eps=0.2).config()["alpha"] == 0.2 and FGSM(eps=0.2).config()["steps"] == 1
    tifgsm = TIFGSM().config()
    assert tifgsm["ti_kernel"] == 7 and tifgsm["loss"] == "ce"
    difgsm = DIFGSM().config()
    assert difgsm["diversity_prob"] == 0.5 and difgsm["resize_rate"] == 0.9


def test_di_and_ti_need_image_batches() -> None:
    model = nn.Sequential(nn.Linear(5, 3)).eval()
    x, y = torch.rand(4, 5), torch.zeros(4, dtype=torch.long)
    assert IFGSM(eps=0.1)(model, x, y).shape == x.shape  # flat inputs are fine without DI/TI
    with pytest.raises(RobustlabError, match=r"\(N, C, H, W\) images"):
        DIFGSM(eps=0.1)(model, x, y)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: IFGSM(steps=0), "steps >= 1"),
        (lambda: BIM(alpha=0.0), "alpha must be > 0"),
        (lambda: MIFGSM(decay=-1.0), "decay must be >= 0"),
        (lambda: DIFGSM(diversity_prob=1.5), r"diversity_prob must lie in \[0, 1\]"),
        (lambda: DIFGSM(diversity_prob=-0.1), r"diversity_prob must lie in \[0, 1\]"),
        (lambda: DIFGSM(resize_rate=0.0), r"resize_rate must lie in \(0, 1\]"),
        (lambda: DIFGSM(resize_rate=1.1), r"resize_rate must lie in \(0, 1\]"),
        (lambda: TIFGSM(kernel_size=4), "kernel size must be odd"),
        (lambda: TIFGSM(sigma=-1.0), "sigma must be >= 0"),
        (lambda: IterativeAttack(ti_kernel=-3), "kernel size must be odd"),
        (lambda: IterativeAttack(loss="nope"), "unknown loss 'nope'"),
    ],
)
def test_bad_attack_configuration(make: Callable[[], object], message: str) -> None:
    with pytest.raises(RobustlabError, match=message):
        make()

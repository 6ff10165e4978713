"""DeepFool: the closed-form minimal perturbation of linear models, candidates, convergence.

The model guard, eps 0, seeds, bad inputs and success on the trained digits net are checked
for every attack in test_all_attacks.py; the linear cases come from _linear_cases.py.
"""

from __future__ import annotations

import pytest
import torch
from _linear_cases import Linear2, three_class_case, two_class_case

from robustlab.attacks import make_attack
from robustlab.attacks.deepfool import DeepFool
from robustlab.core.threat import ThreatModel
from robustlab.errors import RobustlabError

OVERSHOOT = 0.02


def _exact_step(model: Linear2, x: torch.Tensor, norm: str) -> torch.Tensor:
    """The minimal perturbation onto the hyperplane w.x + b = 0 of a two-class linear model:
    -s w / ||w||_2^2 (l2) or -s sign(w) / ||w||_1 (linf), s = w.x + b."""
    w = model.w.detach().flatten()
    with torch.no_grad():
        s = model(x)[:, 1]
    step: torch.Tensor
    if norm == "l2":
        step = -s[:, None] * w / w.pow(2).sum()
    else:
        step = -s[:, None] * w.sign() / w.abs().sum()
    return step.view_as(x)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_deepfool_finds_the_minimal_perturbation_of_a_binary_linear_model(norm: str) -> None:
    model, x, y, _ = two_class_case(norm, 0.05)
    out = DeepFool(norm=norm, eps=1.0).minimal(model, x, y)
    expected = (1 + OVERSHOOT) * _exact_step(model, x, norm)
    assert bool(out.converged.all()) and bool((out.iterations == 1).all())
    torch.testing.assert_close(out.x_adv - x, expected, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        assert bool((model(out.x_adv).argmax(1) != y).all())


def _pair_distances(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str
) -> torch.Tensor:
    """Per point and class l, the distance |f_l - f_y| / ||w_l - w_y||_* to the boundary
    between y and l (inf for l = y), from the weights of the model's linear layer."""
    w = next(m for m in model.modules() if isinstance(m, torch.nn.Linear)).weight.detach()
    with torch.no_grad():
        f = model(x)
    df = (f - f.gather(1, y[:, None])).abs()
    dw = w[None, :, :] - w[y][:, None, :]
    dual = dw.abs().sum(2) if norm == "linf" else dw.norm(dim=2)
    dist: torch.Tensor = df / dual
    return dist.scatter(1, y[:, None], float("inf"))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_deepfool_finds_the_minimal_perturbation_of_a_multiclass_linear_model(norm: str) -> None:
    model, x, y = three_class_case()
    out = DeepFool(norm=norm, eps=1.0).minimal(model, x, y)
    exact = _pair_distances(model, x, y, norm).amin(1)
    assert float(out.x_adv.min()) > 0 and float(out.x_adv.max()) < 1  # the box never binds
    assert bool(out.converged.all()) and bool((out.iterations == 1).all())
    found = ThreatModel(norm, 1.0).norms(out.x_adv - x)
    torch.testing.assert_close(found, (1 + OVERSHOOT) * exact, rtol=1e-4, atol=1e-6)


def test_deepfool_considers_only_the_top_candidate_classes() -> None:
    model, x, y = three_class_case()
    dist = _pair_distances(model, x, y, "l2")
    with torch.no_grad():
        runner_up = model(x).scatter(1, y[:, None], float("-inf")).argmax(1)
    # the points where the class with the second-largest logit is not the nearest boundary
    differs = dist.argmin(1) != runner_up
    assert int(differs.sum()) >= 5
    out = DeepFool(norm="l2", eps=1.0, candidates=2).minimal(model, x, y)
    found = (out.x_adv - x).flatten(1).norm(dim=1)
    to_runner_up = dist.gather(1, runner_up[:, None])[:, 0]
    torch.testing.assert_close(found, (1 + OVERSHOOT) * to_runner_up, rtol=1e-4, atol=1e-6)
    assert bool((found[differs] > (1 + OVERSHOOT) * dist.amin(1)[differs] * 1.001).all())


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_deepfool_as_an_attack_keeps_the_minimal_example_inside_eps(norm: str) -> None:
    model, x, y, _ = two_class_case(norm, 0.05)
    eps = 0.05
    minimal = DeepFool(norm=norm, eps=eps).minimal(model, x, y).x_adv
    x_adv = make_attack("deepfool", norm, eps)(model, x, y)
    threat = ThreatModel(norm, eps)
    assert bool(threat.contains(x, x_adv).all())
    inside = threat.norms(minimal - x) <= eps
    assert 10 <= int(inside.sum()) < len(x) - 10  # both kinds of points are present
    assert torch.equal(x_adv[inside], minimal[inside])
    with torch.no_grad():
        fooled = model(x_adv).argmax(1) != y
    assert bool(fooled[inside].all())
    # further than eps * (1 + overshoot): no point of the ball crosses, the input comes back
    far = threat.norms(minimal - x) > eps * (1 + OVERSHOOT) * 1.001
    assert torch.equal(x_adv[far], x[far])


def test_deepfool_reports_points_it_could_not_move_across_as_not_converged() -> None:
    w = torch.ones(1, 6, 6)
    model = Linear2(w, -100.0).eval()  # w.x + b < 0 on the whole box: class 0 everywhere
    x = torch.rand(5, 1, 6, 6)
    y = torch.zeros(5, dtype=torch.long)
    out = DeepFool(norm="l2", eps=1.0, steps=7).minimal(model, x, y)
    assert not bool(out.converged.any()) and bool((out.iterations == 7).all())
    assert float(out.x_adv.min()) >= 0 and float(out.x_adv.max()) <= 1
    assert torch.equal(DeepFool(norm="l2", eps=1.0, steps=7)(model, x, y), x)


def test_deepfool_counts_misclassified_inputs_as_converged_at_iteration_zero() -> None:
    model, x, y, _ = two_class_case("l2", 0.05)
    out = DeepFool().minimal(model, x, 1 - y)
    assert bool(out.converged.all()) and bool((out.iterations == 0).all())
    assert torch.equal(out.x_adv, x)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"norm": "l1"}, "deepfool supports the norms linf and l2"),
        ({"steps": 0}, "steps >= 1"),
        ({"overshoot": -0.1}, "overshoot >= 0"),
        ({"candidates": 1}, "candidates >= 2"),
    ],
)
def test_deepfool_refuses_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(RobustlabError, match=message):
        DeepFool(**options)  # type: ignore[arg-type]


def test_deepfool_refuses_targets() -> None:
    model, x, y, _ = two_class_case("l2", 0.05)
    with pytest.raises(RobustlabError, match="untargeted"):
        DeepFool()(model, x, y, 1 - y)

"""Universal adversarial perturbations: the ball, a linear model with a universal direction,
a trained net against random noise, disjoint points, seeds, batching, per-class, bad options."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from _linear_cases import Linear2
from torch import nn

from robustlab.attacks.universal import (
    UAPConfig,
    craft_uap,
    perturb,
    pick_points,
    random_like,
    score_uap,
    universal_perturbation,
)
from robustlab.core.threat import ThreatModel
from robustlab.data import DataSplits
from robustlab.errors import RobustlabError

CASES = [("deepfool", "linf"), ("deepfool", "l2"), ("sgd", "linf"), ("sgd", "l2")]
XI = {"linf": 0.05, "l2": 0.5}


def _one_sided_case(norm: str, n: int = 200) -> tuple[Linear2, torch.Tensor, torch.Tensor]:
    """A two-class linear model and points all of class 1, each within 0.3 - 0.9 xi (in
    the norm) of the boundary: v = -xi w / ||w|| (l2) or -xi sign(w) (linf) fools every one,
    and no box binds (points near 0.5)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(1, 6, 6, generator=g).sign() * (0.5 + torch.rand(1, 6, 6, generator=g))
    dual = float(w.abs().sum() if norm == "linf" else w.norm())
    x = 0.5 + 0.05 * (2 * torch.rand(n, 1, 6, 6, generator=g) - 1)
    margin = XI[norm] * dual * (0.3 + 0.6 * torch.rand(n, generator=g))
    model = Linear2(w, 0.0).eval()
    s = x.flatten(1) @ w.flatten()  # each point moved along w to its margin
    x = x + ((margin - s) / w.pow(2).sum())[:, None, None, None] * w
    assert float(x.min()) > 0.1 and float(x.max()) < 0.9
    y = torch.ones(n, dtype=torch.long)
    with torch.no_grad():
        assert bool((model(x).argmax(1) == 1).all())
    return model, x, y


@pytest.mark.parametrize(("method", "norm"), CASES)
def test_a_universal_direction_of_a_linear_model_is_found(method: str, norm: str) -> None:
    model, x, y = _one_sided_case(norm)
    cfg = UAPConfig(method=method, norm=norm, xi=XI[norm], max_passes=3, delta=0.05)
    result = universal_perturbation(model, (x, y), None, cfg, n_craft=100, n_eval=100)
    assert result.scores.fooling_rate >= 0.95
    assert result.scores.perturbed_accuracy <= 0.05 and result.scores.clean_accuracy == 1.0
    assert result.random.fooling_rate <= 0.2


@pytest.mark.parametrize(("method", "norm"), CASES)
def test_the_perturbation_lies_in_the_ball_and_the_images_in_the_box(
    method: str, norm: str, digits_net: nn.Module, digits: DataSplits
) -> None:
    xi = {"linf": 0.2, "l2": 2.0}[norm]
    x = digits.train.x[:60]
    uap = craft_uap(digits_net, x, UAPConfig(method=method, norm=norm, xi=xi, max_passes=2))
    threat = ThreatModel(norm, xi)
    assert uap.v.shape == x.shape[1:]
    assert float(threat.norms(uap.v[None])[0]) <= xi * (1 + 1e-6)
    assert float(threat.norms(uap.v[None])[0]) >= 0.5 * xi  # it did move
    x_adv = perturb(x, uap.v)
    assert bool(threat.contains(x, x_adv, tol=0.0).all())
    assert uap.passes == len(uap.fooling_history) <= 2 and uap.updates > 0


# Fooling rates on digits_net (200 crafting training digits, 200 held-out test digits, 3
# passes, seed 0), UAP vs random noise of the same norm, measured: deepfool l2 0.495 vs 0.23,
# sgd linf 0.52 vs 0.17, sgd l2 0.81 vs 0.23; on another CPU, whose rounding trains a
# slightly different digits_net, deepfool l2 0.385 vs 0.21 (2026-12-07). The margin asked,
# 0.15, is five standard errors of a rate on 200 points: random directions do not reach it.
# DeepFool-linf is no better than random here (0.155 vs 0.17 at xi 0.2): see README.
@pytest.mark.parametrize(
    ("method", "norm", "xi"), [("deepfool", "l2", 2.0), ("sgd", "linf", 0.2), ("sgd", "l2", 2.0)]
)
def test_a_uap_beats_random_noise_of_the_same_norm_on_held_out_digits(
    method: str, norm: str, xi: float, digits_net: nn.Module, digits: DataSplits
) -> None:
    cfg = UAPConfig(method=method, norm=norm, xi=xi, max_passes=3)
    train, test = (digits.train.x, digits.train.y), (digits.test.x, digits.test.y)
    result = universal_perturbation(digits_net, train, test, cfg, n_craft=200, n_eval=200)
    threat = ThreatModel(norm, xi)
    rand = random_like(result.v, norm)
    assert torch.allclose(threat.norms(rand[None]), threat.norms(result.v[None]))
    held = test[0][result.eval_index], test[1][result.eval_index]
    assert result.random == score_uap(digits_net, rand, *held)
    assert result.scores.fooling_rate >= result.random.fooling_rate + 0.15
    assert result.scores.perturbed_accuracy <= result.scores.clean_accuracy - 0.2


def test_crafting_and_measuring_points_are_disjoint_and_recorded() -> None:
    model, x, y = _one_sided_case("l2")
    cfg = UAPConfig(method="sgd", norm="l2", xi=0.5, max_passes=2)
    result = universal_perturbation(model, (x, y), None, cfg, n_craft=80, n_eval=70)
    craft, held = set(result.craft_index.tolist()), set(result.eval_index.tolist())
    assert len(craft) == 80 and len(held) == 70 and not craft & held
    # the recorded crafting points alone give the perturbation
    assert torch.equal(craft_uap(model, x[result.craft_index], cfg).v, result.v)
    assert result.scores == score_uap(model, result.v, x[result.eval_index], y[result.eval_index])
    record = result.to_dict()
    assert record["craft_index"] == sorted(craft) and record["eval_index"] == sorted(held)


def test_points_from_two_sets_are_picked_in_range_and_seeded() -> None:
    craft, held = pick_points(50, 40, 20, 30, seed=1)
    assert len(set(craft.tolist())) == 20 and int(craft.max()) < 50
    assert len(set(held.tolist())) == 30 and int(held.max()) < 40
    again = pick_points(50, 40, 20, 30, seed=1)
    assert torch.equal(again[0], craft) and torch.equal(again[1], held)
    with pytest.raises(RobustlabError, match="--n-craft must be between 1 and 50"):
        pick_points(50, 40, 51, 30, seed=1)
    with pytest.raises(RobustlabError, match="cannot give 30 crafting and 30 evaluation"):
        pick_points(50, 50, 30, 30, seed=1, same_data=True)


@pytest.mark.parametrize("method", ["deepfool", "sgd"])
def test_seeded_runs_are_identical(method: str, digits_net: nn.Module, digits: DataSplits) -> None:
    x = digits.train.x[:50]
    cfg = UAPConfig(method=method, norm="l2", xi=1.0, max_passes=2, seed=4)
    first = craft_uap(digits_net, x, cfg)
    torch.manual_seed(99)  # the global generator plays no part
    assert torch.equal(craft_uap(digits_net, x, cfg).v, first.v)
    other = craft_uap(digits_net, x, UAPConfig(method=method, norm="l2", xi=1.0, max_passes=2))
    assert not torch.equal(other.v, first.v)  # the seed orders the points


def test_batched_checks_give_the_sequential_algorithm(
    digits_net: nn.Module, digits: DataSplits
) -> None:
    x = digits.train.x[:60]
    one = UAPConfig(norm="l2", xi=1.5, max_passes=2, batch_size=1)  # one point at a time
    batched = craft_uap(digits_net, x, UAPConfig(norm="l2", xi=1.5, max_passes=2, batch_size=25))
    sequential = craft_uap(digits_net, x, one)
    assert batched.updates == sequential.updates > 0
    torch.testing.assert_close(batched.v, sequential.v)
    assert batched.fooling_history == sequential.fooling_history


def test_keep_best_returns_the_v_of_the_pass_that_fooled_most_crafting_points(
    digits_net: nn.Module, digits: DataSplits
) -> None:
    x = digits.train.x[:100]
    cfg = UAPConfig(method="sgd", norm="linf", xi=0.2, max_passes=5, batch_size=16)
    last = craft_uap(digits_net, x, cfg)
    best = craft_uap(digits_net, x, replace(cfg, keep="best"))
    assert best.fooling_history == last.fooling_history and last.kept_pass == 5
    k = best.kept_pass
    assert best.fooling_history[k - 1] == max(best.fooling_history)
    assert all(h < max(best.fooling_history) for h in best.fooling_history[: k - 1])
    # the same seed visits the points in the same order: k passes end where pass k ended
    assert torch.equal(craft_uap(digits_net, x, replace(cfg, max_passes=k)).v, best.v)


def test_per_class_gives_one_perturbation_per_class(
    digits_net: nn.Module, digits: DataSplits
) -> None:
    cfg = UAPConfig(method="sgd", norm="linf", xi=0.2, max_passes=2)
    train, test = (digits.train.x, digits.train.y), (digits.test.x, digits.test.y)
    result = universal_perturbation(
        digits_net, train, test, cfg, n_craft=200, n_eval=200, per_class=True, num_classes=10
    )
    assert result.v.shape == (10, *digits.train.x.shape[1:])
    assert all(n <= 0.2 * (1 + 1e-6) for n in result.norms())
    assert len({tuple(v.flatten().tolist()) for v in result.v}) == 10  # ten different ones
    yc, ye = train[1][result.craft_index], test[1][result.eval_index]
    for c, crafted in enumerate(result.crafted):
        assert crafted is not None and crafted.n_craft == int((yc == c).sum())
        assert result.class_scores[c].n == int((ye == c).sum())
        xs, ys = test[0][result.eval_index][ye == c], ye[ye == c]
        assert result.class_scores[c] == score_uap(digits_net, result.v[c], xs, ys)
    assert sum(s.n for s in result.class_scores) == result.scores.n == 200
    record = result.to_dict()
    assert record["per_class"] and len(record["classes"]) == 10 and len(record["norm_of_v"]) == 10


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"xi": 0.0}, "eps must be a finite number > 0"),
        ({"xi": -0.1}, "eps must be a finite number > 0"),
        ({"delta": 0.0}, r"delta must lie in \(0, 1\)"),
        ({"delta": 1.0}, r"delta must lie in \(0, 1\)"),
        ({"method": "fgsm"}, "unknown UAP method 'fgsm'; use deepfool or sgd"),
        ({"norm": "l1"}, "support the norms linf and l2"),
        ({"max_passes": 0}, "max_passes must be >= 1"),
        ({"step": -1.0}, "SGD step must be a finite number > 0"),
        ({"clip": 0.0}, "loss clip must be a finite number > 0"),
        ({"keep": "first"}, "keep must be last or best, got 'first'"),
    ],
)
def test_bad_uap_options_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(RobustlabError, match=message):
        UAPConfig(**options)  # type: ignore[arg-type]

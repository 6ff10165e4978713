"""FAB and FAB-T: exact minimal perturbations on linear models, the projection, invariants.

The model guard, eps 0, seeds and bad inputs are checked for every attack in
test_all_attacks.py; the l1 knapsack case comes from _linear_cases.py.
"""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from _linear_cases import correct, l1_box_distance, tiny_mlp, two_class_case
from hypothesis import given, settings
from scipy.optimize import linprog
from torch import nn

from robustlab.attacks import PGD, ThreatModel
from robustlab.attacks.fab import FAB, project_hyperplane_box
from robustlab.data import DataSplits
from robustlab.errors import RobustlabError

NORMS = ["linf", "l2", "l1"]


class LinearK(nn.Module):
    """K-class linear classifier, logits W x + b: its minimal adversarial norms are known."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = nn.Parameter(b.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w.T + self.b


def _dual(v: torch.Tensor, norm: str) -> torch.Tensor:
    """The dual norm along the last axis: l1 for linf, l2 for l2."""
    return v.abs().sum(-1) if norm == "linf" else v.norm(dim=-1)


def _l1_distance(model: LinearK, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The exact minimal l1 distance to misclassification, box included (the knapsack)."""
    w, b = model.w.detach(), model.b.detach()
    logits = x.flatten(1) @ w.T + b
    best = torch.full((len(x),), torch.inf, dtype=x.dtype)
    for other in range(w.shape[0]):
        v = w[other][None] - w[y]  # raise f_other - f_y by its current deficit
        need = (logits.gather(1, y[:, None])[:, 0] - logits[:, other]).clamp_min(0)
        dist = torch.where(y == other, torch.inf, l1_box_distance(v, x, need))
        best = torch.minimum(best, dist)
    return best


def _norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    return ThreatModel(norm, 0.0).norms(delta)


def _linear_case(
    classes: int, norm: str, n: int = 300, seed: int = 1
) -> tuple[LinearK, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Points near 0.5 and their exact minimal adversarial norms.

    Misclassified means some f_l > f_y, a union of half-spaces, so the minimal norm is
    min over l != y of (f_y - f_l) / ||w_y - w_l||_* when the box does not bind (linf, l2);
    for l1 it does bind on some points, and the minimum over l is the knapsack distance.
    """
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64  # exact enough to compare norms to 1e-3 also for tiny margins
    w = torch.randn(classes, 36, generator=g, dtype=f64).sign()
    w = w * (0.5 + torch.rand(classes, 36, generator=g, dtype=f64))
    b = -0.5 * w.sum(1)  # every logit is 0 at the centre of the box
    x = 0.5 + 0.06 * (2 * torch.rand(n, 1, 6, 6, generator=g, dtype=f64) - 1)
    model = LinearK(w, b).eval()
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    if norm == "l1":  # the box binds for l1 here: the knapsack
        return model, x, y, _l1_distance(model, x, y)
    dist = (logits.gather(1, y[:, None]) - logits) / _dual(w[y][:, None] - w[None], norm).clamp_min(
        1e-12
    )
    dist = dist.scatter(1, y[:, None], float("inf")).amin(1)
    return model, x, y, dist


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("classes", [2, 3])
def test_fab_finds_the_minimal_perturbation_of_a_linear_model(norm: str, classes: int) -> None:
    model, x, y, dist = _linear_case(classes, norm, n=150)
    x_adv = FAB(norm=norm, eps=100.0, eta=1.001, steps=30, early_stop=False)(model, x, y)
    if norm != "l1":  # (the l1 distances are the knapsack's, box included)
        assert float(x_adv.min()) > 0 and float(x_adv.max()) < 1  # the box does not bind
    with torch.no_grad():
        assert bool((model(x_adv).argmax(1) != y).all())
    ratio = _norms(x_adv - x, norm) / dist
    assert float(ratio.min()) >= 1 - 1e-4
    assert float(ratio.max()) <= 1 + 1e-3
    # AutoAttack's overshoot eta = 1.05 settles ~0.5 % above the boundary of a linear model
    x_adv = FAB(norm=norm, eps=100.0, steps=30, early_stop=False)(model, x, y)
    ratio = _norms(x_adv - x, norm) / dist
    assert float(ratio.min()) >= 1 - 1e-4 and float(ratio.max()) <= 1.01


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("targeted", [False, True])
def test_robust_accuracy_of_a_linear_model_matches_the_closed_form(
    norm: str, targeted: bool
) -> None:
    model, x, y, dist = _linear_case(3, norm, n=200, seed=2)
    eps = float(dist.median())
    keep = (dist / eps - 1).abs() > 0.01  # drop near-ties, within FAB's 1.05 overshoot
    x, y, dist = x[keep], y[keep], dist[keep]
    attack = FAB(norm=norm, eps=eps, targeted=targeted, steps=50)
    x_adv = attack(model, x, y)
    assert bool(attack.threat.contains(x, x_adv).all())
    with torch.no_grad():
        robust = model(x_adv).argmax(1) == y
    assert torch.equal(robust, dist > eps)
    assert 0 < int(robust.sum()) < len(robust)


def test_fab_t_with_explicit_targets_reaches_them() -> None:
    model, x, y, _ = _linear_case(3, "linf", n=60, seed=3)
    targets = (y + 1 + torch.randint(0, 2, y.shape)) % 3
    x_adv = FAB(norm="linf", eps=100.0, targeted=True, eta=1.001, early_stop=False)(
        model, x, y, targets
    )
    with torch.no_grad():
        assert torch.equal(model(x_adv).argmax(1), targets)
    # the smallest linf step into the target's polyhedron, by linear programming
    w, b = model.w.detach().double().numpy(), model.b.detach().double().numpy()
    got, ratios = _norms(x_adv - x, "linf"), []
    for i in range(len(x)):
        xi, t = x[i].flatten().double().numpy(), int(targets[i])
        others = [j for j in range(3) if j != t]
        a = np.stack([w[j] - w[t] for j in others])  # (w_j - w_t) . (x + d) + b_j - b_t <= 0
        n = len(xi)
        a_ub = np.block(
            [
                [a, np.zeros((len(others), 1))],
                [np.eye(n), -np.ones((n, 1))],
                [-np.eye(n), -np.ones((n, 1))],
            ]
        )
        b_ub = np.r_[[b[t] - b[j] - a[k] @ xi for k, j in enumerate(others)], np.zeros(2 * n)]
        bounds = [(-v, 1 - v) for v in xi] + [(0, None)]
        res = linprog(np.r_[np.zeros(n), 1.0], A_ub=a_ub, b_ub=b_ub, bounds=bounds)
        assert res.status == 0
        ratios.append(float(got[i]) / res.fun)
    # exact where one boundary binds; where the target's region has a vertex in the way,
    # FAB (one linearised boundary at a time) can stop up to ~1/3 above the minimum
    assert min(ratios) >= 1 - 1e-6
    assert float(np.median(ratios)) <= 1 + 1e-3
    assert max(ratios) <= 1.5


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("targeted", [False, True])
def test_l1_fab_finds_the_exact_robust_set_of_the_box_knapsack(eps: float, targeted: bool) -> None:
    case = two_class_case("l1", eps, n=150)
    assert 0 < int(case.robust.sum()) < len(case.robust)
    attack = FAB(norm="l1", eps=eps, targeted=targeted)
    x_adv = attack(case.model, case.x, case.y)
    assert bool(attack.threat.contains(case.x, x_adv).all())
    assert torch.equal(correct(case.model, x_adv, case.y), case.robust)


def test_the_l1_projection_is_the_minimal_l1_step_by_linear_programming() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.rand(120, 12, generator=g, dtype=torch.float64)
    w = torch.randn(120, 12, generator=g, dtype=torch.float64)
    w[:10, :3] = 0.0
    w[10:20, :4] = 1.0  # ties in |w|
    need = 3 * torch.randn(120, generator=g, dtype=torch.float64)
    d = project_hyperplane_box(t, w, need, "l1")
    assert bool(((t + d) >= -1e-12).all() and ((t + d) <= 1 + 1e-12).all())
    assert bool((d[w == 0] == 0).all())
    solved = 0
    for i in range(len(t)):
        ti, wi = t[i].numpy(), w[i].numpy()
        # d = p - q with p, q >= 0: min sum(p + q), w . (p - q) = need, the box on p and q
        bounds = [(0.0, 1.0 - v) for v in ti] + [(0.0, v) for v in ti]
        res = linprog(np.ones(24), A_eq=np.r_[wi, -wi][None], b_eq=[float(need[i])], bounds=bounds)
        if res.status != 0:  # the box cannot reach the hyperplane: the nearest box corner
            corner = torch.where(w[i] * need[i] > 0, 1 - t[i], t[i])
            assert bool((d[i].abs() == torch.where(w[i] == 0, 0.0, corner)).all())
            continue
        solved += 1
        assert float((w[i] * d[i]).sum()) == pytest.approx(float(need[i]), abs=1e-9)
        assert float(d[i].abs().sum()) == pytest.approx(res.fun, abs=1e-9)
    assert 60 < solved < 120


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_the_projection_is_the_exact_minimal_step_onto_hyperplane_and_box(norm: str) -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.rand(400, 20, generator=g, dtype=torch.float64)
    w = torch.randn(400, 20, generator=g, dtype=torch.float64)
    w[:20, :5] = 0.0  # some coordinates the hyperplane ignores
    need = 6 * torch.randn(400, generator=g, dtype=torch.float64)
    d = project_hyperplane_box(t, w, need, norm)
    reach_hi = torch.where(w > 0, w * (1 - t), -w * t).sum(1)
    reach_lo = torch.where(w > 0, -w * t, w * (1 - t)).sum(1)
    ok = (need <= reach_hi) & (need >= reach_lo)
    assert 100 < int(ok.sum()) < 390  # most rows feasible, some not
    d, t, w, need = d[ok], t[ok], w[ok], need[ok]
    assert torch.allclose((w * d).sum(1), need, atol=1e-9)
    assert bool(((t + d) >= -1e-12).all() and ((t + d) <= 1 + 1e-12).all())
    assert bool((d[w == 0] == 0).all())
    # optimality by the conditions of each problem: linf saturates everything below the
    # norm in the direction of sign(w); l2 is d = clip(mu * w) for one mu >= 0 per row
    sgn = (w * need[:, None]).sign()
    room = torch.where(sgn > 0, 1 - t, t)
    if norm == "linf":
        lam = d.abs().amax(1, keepdim=True)
        expected = sgn * torch.minimum(lam, room)
    else:
        free = (d.abs() < room - 1e-9) & (w != 0)
        mu = torch.where(free, d / w, torch.nan).nanmean(1, keepdim=True)
        expected = torch.maximum(torch.minimum(mu * w, 1 - t), -t)
    assert torch.allclose(d, torch.where(w == 0, 0.0, expected), atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(
    norm=st.sampled_from(NORMS),
    eps=st.floats(0.0, 2.0),
    batch=st.integers(1, 6),
    channels=st.sampled_from([1, 3]),
    size=st.integers(2, 6),
    classes=st.integers(2, 5),
    seed=st.integers(0, 10_000),
    restarts=st.integers(1, 2),
    targeted=st.booleans(),
)
def test_every_example_lies_inside_its_threat_model(
    norm: str,
    eps: float,
    batch: int,
    channels: int,
    size: int,
    classes: int,
    seed: int,
    restarts: int,
    targeted: bool,
) -> None:
    model = tiny_mlp(channels * size * size, classes, seed)
    x = torch.rand(batch, channels, size, size)
    y = torch.randint(0, classes, (batch,))
    attack = FAB(norm=norm, eps=eps, steps=4, restarts=restarts, targeted=targeted, seed=seed)
    x_adv = attack(model, x, y)
    assert x_adv.shape == x.shape
    assert bool(attack.threat.contains(x, x_adv).all())
    with torch.no_grad():
        fooled = model(x_adv).argmax(1) != y
    changed = (x_adv != x).flatten(1).any(1)
    assert bool((fooled | ~changed).all())  # a changed example is a successful one


@pytest.fixture(scope="module")
def digits_mlp(digits: DataSplits) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = digits.train.x, digits.train.y
    for _ in range(8):
        for idx in torch.split(torch.randperm(len(x)), 128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def test_fab_t_is_about_as_strong_as_pgd_on_a_digits_mlp(
    digits: DataSplits, digits_mlp: nn.Module
) -> None:
    x, y = digits.test.x[:100], digits.test.y[:100]
    eps = 0.08
    with torch.no_grad():
        clean = (digits_mlp(x).argmax(1) == y).float().mean().item()
    attack = FAB(norm="linf", eps=eps, targeted=True)
    x_fab = attack(digits_mlp, x, y)
    x_pgd = PGD(norm="linf", eps=eps, steps=100, alpha=eps / 10)(digits_mlp, x, y)
    assert bool(attack.threat.contains(x, x_fab).all())
    with torch.no_grad():
        rob_fab = (digits_mlp(x_fab).argmax(1) == y).float().mean().item()
        rob_pgd = (digits_mlp(x_pgd).argmax(1) == y).float().mean().item()
    assert clean > 0.85
    assert rob_fab <= clean
    assert rob_fab < clean - 0.2  # the attack does something at this eps
    assert rob_fab <= rob_pgd + 0.10


def test_names_and_config() -> None:
    assert FAB().name == "fab" and FAB(targeted=True).name == "fab-t"
    cfg = FAB(targeted=True, norm="l2", eps=0.5).config()
    assert cfg["name"] == "fab-t" and cfg["norm"] == "l2" and cfg["steps"] == 100
    assert (cfg["alpha_max"], cfg["eta"], cfg["beta"], cfg["n_target_classes"]) == (
        0.1,
        1.05,
        0.9,
        9,
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps >= 1"),
        ({"restarts": 0}, "restarts >= 1"),
        ({"eta": 0.99}, "eta >= 1"),
        ({"eta": float("nan")}, "eta >= 1"),
        ({"beta": 0.0}, r"beta in \(0, 1\]"),
        ({"beta": 1.5}, r"beta in \(0, 1\]"),
        ({"alpha_max": -0.1}, r"alpha_max in \[0, 1\]"),
        ({"n_target_classes": 0}, "n_target_classes >= 1"),
    ],
)
def test_bad_fab_configuration(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(RobustlabError, match=message):
        FAB(**kwargs)  # type: ignore[arg-type]  # bad arguments on purpose


@pytest.mark.parametrize("norm", NORMS)
def test_early_stop_changes_cost_not_the_robust_set(norm: str) -> None:
    model, x, y, dist = _linear_case(3, norm, n=120, seed=5)
    eps = float(dist.median())
    outs = {}
    for early in (True, False):
        attack = FAB(norm=norm, eps=eps, steps=30, restarts=2, early_stop=early)
        with torch.no_grad():
            outs[early] = model(attack(model, x, y)).argmax(1) == y
    assert torch.equal(outs[True], outs[False])

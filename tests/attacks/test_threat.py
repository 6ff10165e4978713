"""Threat models: exact l1 / l2 projections onto ball-and-box, random starts, steepest steps."""

from __future__ import annotations

import math
from collections.abc import Callable

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from _linear_cases import Linear2, tiny_mlp
from hypothesis import given, settings
from scipy.optimize import minimize

from robustlab.attacks import PGD, ThreatModel
from robustlab.core.threat import L1_TOP_FRACTION

# --- independent references (numpy float64) ------------------------------------------------


def _bisect(norm_at: Callable[[np.ndarray], np.ndarray], hi: np.ndarray, eps: float) -> np.ndarray:
    """Per row, the root of a nonincreasing norm_at(s) = eps on [0, hi], by 200 halvings."""
    lo_s, hi_s = np.zeros_like(hi), hi.copy()
    for _ in range(200):
        mid = 0.5 * (lo_s + hi_s)
        too_big = norm_at(mid) > eps
        lo_s, hi_s = np.where(too_big, mid, lo_s), np.where(too_big, hi_s, mid)
    root: np.ndarray = 0.5 * (lo_s + hi_s)
    return root


def ref_l1(x: np.ndarray, v: np.ndarray, eps: float) -> np.ndarray:
    """Rows of (N, D): l1-ball & box projection by bisection on the l1 multiplier lam."""
    d = v - x
    room = np.where(d >= 0, 1 - x, x)

    def at(lam: np.ndarray) -> np.ndarray:
        amount: np.ndarray = np.clip(np.abs(d) - lam[:, None], 0.0, room)
        return amount

    lam = _bisect(lambda s: at(s).sum(1), np.abs(d).max(1), eps)
    lam = np.where(at(np.zeros(len(d))).sum(1) <= eps, 0.0, lam)
    z: np.ndarray = x + np.sign(d) * at(lam)
    return z


def ref_l2(x: np.ndarray, v: np.ndarray, eps: float) -> np.ndarray:
    """Rows of (N, D): l2-ball & box projection by bisection on mu in clip(x + d / (1 + mu))."""
    d = v - x

    def at(mu: np.ndarray) -> np.ndarray:
        delta: np.ndarray = np.clip(x + d / (1 + mu[:, None]), 0.0, 1.0) - x
        return delta

    mu = _bisect(lambda s: np.linalg.norm(at(s), axis=1), np.full(len(d), 1e12), eps)
    mu = np.where(np.linalg.norm(at(np.zeros(len(d))), axis=1) <= eps, 0.0, mu)
    z: np.ndarray = x + at(mu)
    return z


def slsqp(norm: str, x: np.ndarray, v: np.ndarray, eps: float) -> np.ndarray:
    """The same problem by a generic solver: min ||z - v||^2 over the threat model."""
    n = len(x)
    options = {"ftol": 1e-15, "maxiter": 1000}
    if norm == "l1":  # z = x + p - m with p, m >= 0: the l1 constraint becomes linear

        def obj(pm: np.ndarray) -> float:
            return float(np.sum((x + pm[:n] - pm[n:] - v) ** 2))

        def jac(pm: np.ndarray) -> np.ndarray:
            r = 2 * (x + pm[:n] - pm[n:] - v)
            return np.concatenate([r, -r])

        cons = {"type": "ineq", "fun": lambda pm: eps - pm.sum(), "jac": lambda pm: -np.ones(2 * n)}
        bounds = [(0.0, 1 - xi) for xi in x] + [(0.0, xi) for xi in x]
        res = minimize(
            obj,
            np.zeros(2 * n),
            jac=jac,
            bounds=bounds,
            constraints=[cons],
            method="SLSQP",
            options=options,
        )
        z: np.ndarray = x + res.x[:n] - res.x[n:]
        return z
    cons = {
        "type": "ineq",
        "fun": lambda z: eps**2 - np.sum((z - x) ** 2),
        "jac": lambda z: -2 * (z - x),
    }
    res = minimize(
        lambda z: float(np.sum((z - v) ** 2)),
        x.copy(),
        jac=lambda z: 2 * (z - v),
        bounds=[(0.0, 1.0)] * n,
        constraints=[cons],
        method="SLSQP",
        options=options,
    )
    return np.asarray(res.x)


def _edgy_x(g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Inputs in [0,1] with many coordinates on or next to the box edges."""
    u = torch.rand(shape, generator=g, dtype=torch.float64)
    kind = torch.randint(0, 5, shape, generator=g)
    x = torch.where(kind == 0, 0.0, torch.where(kind == 1, 1.0, u))
    x = torch.where(kind == 2, 1e-3 * u, x)
    return torch.where(kind == 3, 1 - 1e-3 * u, x)


# --- exactness of the projections ---------------------------------------------------------


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_projection_matches_an_independent_bisection(norm: str) -> None:
    g = torch.Generator().manual_seed(3)
    x = _edgy_x(g, (300, 12))
    scale = torch.tensor([0.05, 0.3, 1.0, 3.0], dtype=torch.float64).repeat(75)[:, None]
    v = x + scale * torch.randn(300, 12, generator=g, dtype=torch.float64)
    ref = ref_l1 if norm == "l1" else ref_l2
    for eps in (0.1, 0.5, 2.0):
        p = ThreatModel(norm, eps).project(x, v).numpy()
        expected = ref(x.numpy(), v.numpy(), eps)
        assert np.abs(p - expected).max() < 1e-9


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_projection_matches_a_generic_qp_solver(norm: str) -> None:
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(1, 9))
        x = rng.choice([0.0, 1.0, 0.02, 0.98, 0.5], size=n) if trial % 2 else rng.random(n)
        v = x + rng.normal(size=n) * rng.choice([0.2, 1.0, 3.0])
        eps = float(rng.choice([0.05, 0.3, 1.0]))
        p = ThreatModel(norm, eps).project(torch.tensor(x)[None], torch.tensor(v)[None])[0]
        z = slsqp(norm, x, v, eps)
        assert np.abs(p.numpy() - z).max() < 1e-5, (x, v, eps)


def test_l1_projection_is_not_ball_then_clip() -> None:
    """Clipping after the l1-ball projection is feasible but not nearest when the box binds."""
    x = torch.tensor([[0.9, 0.5]], dtype=torch.float64)
    v = torch.tensor([[3.0, 0.8]], dtype=torch.float64)  # the first coordinate hits the box
    p = ThreatModel("l1", 0.4).project(x, v)
    # ball then clip: delta = (0.4, 0) on the ball, clipped to (0.1, 0): norm 0.1 only
    assert torch.allclose(p, torch.tensor([[1.0, 0.8]], dtype=torch.float64))
    assert float((p - x).abs().sum()) == pytest.approx(0.4)


def test_l2_projection_is_exact_when_the_box_binds() -> None:
    x = torch.tensor([[0.95, 0.5]], dtype=torch.float64)
    v = torch.tensor([[2.0, 1.5]], dtype=torch.float64)  # d = (1.05, 1.0): both constraints bind
    p = ThreatModel("l2", 0.5).project(x, v)
    # scale then clip: (0.95 + 0.362, 0.5 + 0.345) -> (1.0, 0.845), farther from v than
    # the exact answer, which uses the whole budget: 0.05^2 + 0.4975^2 = 0.5^2
    scale_clip = (x + (v - x) * 0.5 / float((v - x).norm())).clamp(0, 1)
    assert float((p - v).norm()) < float((scale_clip - v).norm()) - 0.05
    assert torch.allclose(p, torch.tensor([[1.0, 0.5 + math.sqrt(0.25 - 0.05**2)]], dtype=p.dtype))


@settings(max_examples=60, deadline=None)
@given(
    norm=st.sampled_from(["linf", "l2", "l1"]),
    eps=st.floats(0.0, 5.0),
    batch=st.integers(1, 4),
    channels=st.sampled_from([1, 3]),
    size=st.integers(1, 7),
    far=st.floats(0.0, 50.0),
    seed=st.integers(0, 10_000),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_projection_invariants(
    norm: str,
    eps: float,
    batch: int,
    channels: int,
    size: int,
    far: float,
    seed: int,
    dtype: torch.dtype,
) -> None:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, channels, size, size)
    x = _edgy_x(g, shape).to(dtype)
    v = x + far * torch.randn(shape, generator=g, dtype=dtype)
    tm = ThreatModel(norm, eps)
    p = tm.project(x, v)
    assert p.shape == x.shape and p.dtype == dtype
    assert bool(tm.contains(x, p).all())
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert torch.allclose(tm.project(x, p), p, atol=tol, rtol=0)  # idempotent
    inside = tm.random_start(x, g)
    assert bool(tm.contains(x, inside).all())
    assert torch.allclose(tm.project(x, inside), inside, atol=tol, rtol=0)  # unchanged
    if eps == 0:
        assert torch.equal(p, x)


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_points_inside_are_unchanged(norm: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = _edgy_x(g, (50, 3, 4, 4))
    v = (x + 0.3 * torch.randn(x.shape, generator=g, dtype=x.dtype)).clamp(0, 1)
    tm = ThreatModel(norm, float(ThreatModel(norm, 0).norms(v - x).max()) + 1e-9)
    assert torch.allclose(tm.project(x, v), v, atol=1e-12, rtol=0)


# --- random starts and steps --------------------------------------------------------------


def test_random_start_is_uniform_in_the_l1_ball() -> None:
    x = torch.full((4000, 1, 2, 2), 0.5)
    d = ThreatModel("l1", 0.3).random_start(x, torch.Generator().manual_seed(0)) - x
    r = d.flatten(1).abs().sum(1) / 0.3
    assert float(r.max()) <= 1 + 1e-6
    assert float(r.mean()) == pytest.approx(4 / 5, abs=0.01)  # P(r <= s) = s^4 in 4 dims
    assert abs(float(d.mean())) < 0.005
    assert float((d > 0).float().mean()) == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("shape", [(5, 3, 8, 8), (4, 36), (3, 1, 2, 2), (2, 3, 32, 32)])
def test_l1_steepest_step_is_sparse_and_unit_norm(shape: tuple[int, ...]) -> None:
    grad = torch.randn(shape)
    step = ThreatModel("l1", 1.0).steepest_step(grad)
    numel = math.prod(shape[1:])
    k = max(1, math.ceil(L1_TOP_FRACTION * numel))
    flat, gflat = step.flatten(1), grad.flatten(1)
    assert step.shape == grad.shape
    assert torch.allclose(flat.abs().sum(1), torch.ones(shape[0]))
    assert bool(((flat != 0).sum(1) == k).all())
    top = gflat.abs().topk(k, dim=1).indices
    assert torch.equal(flat.gather(1, top), gflat.gather(1, top).sign() / k)
    zero = ThreatModel("l1", 1.0).steepest_step(torch.zeros(shape))
    assert torch.equal(zero, torch.zeros(shape))


# --- PGD with the l1 threat model ---------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(
    eps=st.floats(0.0, 5.0),
    batch=st.integers(1, 6),
    channels=st.sampled_from([1, 3]),
    size=st.integers(2, 9),
    seed=st.integers(0, 10_000),
)
def test_pgd_l1_examples_lie_inside_the_threat_model(
    eps: float, batch: int, channels: int, size: int, seed: int
) -> None:
    model = tiny_mlp(channels * size * size, 4, seed)
    x = torch.rand(batch, channels, size, size)
    y = torch.randint(0, 4, (batch,))
    x_adv = PGD(norm="l1", eps=eps, steps=5, restarts=2, seed=seed)(model, x, y)
    assert x_adv.shape == x.shape
    assert bool(ThreatModel("l1", eps).contains(x, x_adv).all())


@pytest.mark.parametrize("eps", [0.05, 0.15, 0.3])
def test_pgd_l1_finds_the_exact_robust_accuracy_of_a_linear_model(eps: float) -> None:
    """The best l1 attack moves the one coordinate with the largest |w_i| by eps: a point is
    robust iff |margin| > eps * max|w_i| (x stays within 0.35 of 0.5, so the box never binds)."""
    g = torch.Generator().manual_seed(1)
    n = 400
    w = torch.randn(1, 6, 6, generator=g).sign() * (0.5 + torch.rand(1, 6, 6, generator=g))
    dual = float(w.abs().max())
    assert int((w.abs() == dual).sum()) == 1  # a single best coordinate
    c = 3 * eps * dual / float(w.abs().sum()) * (2 * torch.rand(n, 1, 1, 1, generator=g) - 1)
    x = 0.5 + c * w.sign() + 0.02 * (2 * torch.rand(n, 1, 6, 6, generator=g) - 1)
    assert float((x - 0.5).abs().max()) + eps < 0.5
    model = Linear2(w, eps * dual - 0.5 * float(w.sum())).eval()
    with torch.no_grad():
        margin = model(x)[:, 1]
    y = (margin > 0).long()
    keep = (margin.abs() - eps * dual).abs() > 1e-3 * dual  # drop ties at the boundary
    x, y, exact = x[keep], y[keep], (margin.abs() > eps * dual)[keep]
    assert 0.2 * len(exact) < int(exact.sum()) < 0.8 * len(exact)  # not trivial either way
    x_adv = PGD(norm="l1", eps=eps, steps=100, alpha=eps / 4)(model, x, y)
    with torch.no_grad():
        robust = model(x_adv).argmax(1) == y
    assert bool(ThreatModel("l1", eps).contains(x, x_adv).all())
    assert torch.equal(robust, exact)

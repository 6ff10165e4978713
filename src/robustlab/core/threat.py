"""Threat models: an (norm, eps) ball around each input, intersected with the [0,1] box.

For every norm, :meth:`ThreatModel.project` is the exact Euclidean projection onto
``{z : ||z - x||_norm <= eps, 0 <= z <= 1}``:

- ``linf``: the set is a box, so clipping coordinate-wise is exact.
- ``l2``: "scale onto the ball, then clip to the box" is exact only when the box does not
  bind (then the scaled point is already in the box). When the box binds it returns a
  feasible point that is not the nearest one (its norm is then often well below eps). The
  exact projection follows from the KKT conditions: ``delta = clip(t * d, -x, 1 - x)`` with
  ``t = 1 / (1 + mu)``, where the multiplier ``mu >= 0`` of the ball makes the norm equal
  eps. The norm is piecewise of the form ``sqrt(C + t^2 R)`` in ``t`` with breakpoints
  ``u_i / |d_i|``, so ``t`` is found exactly by a sort over the breakpoints. It equals
  scale-then-clip whenever the box does not bind.
- ``l1``: "project on the ball, then clip" is wrong here (the clip can undo the sparsity
  the ball produced, and the result can be far from nearest). As in APGD-L1 (Croce & Hein,
  ICML 2021), KKT gives ``delta = sign(d) * min(max(|d| - lam, 0), u)`` with ``u`` the box
  room on the side of ``sign(d)``; the l1 norm is piecewise linear in ``lam`` with
  breakpoints ``|d_i|`` and ``|d_i| - u_i``, so ``lam`` is found exactly by a sort.

The sort-based solvers work on all samples at once, in float64 where the device has it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import RobustlabError

NORMS = ("linf", "l2", "l1")

# Fraction of the coordinates the l1 steepest step moves: top-k by |grad| with
# k = max(1, ceil(L1_TOP_FRACTION * numel)). 0.01 is the 99th-percentile default of the
# SLIDE attack (Tramer & Boneh 2019; cleverhans' SparseL1Descent, grad_sparsity=99). k = 1
# is the exact l1 steepest direction; a larger k spreads the step, which helps on networks
# but makes PGD split the budget over the top-k coordinates of a linear model.
L1_TOP_FRACTION = 0.01


def column(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample vector shaped to broadcast against a batch like ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for the projection solvers, unless the device cannot do float64 (mps)."""
    return t.dtype if t.device.type == "mps" else torch.float64


def _first_true(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the first True (0 where a row has none)."""
    return mask.to(torch.uint8).argmax(dim=1)


def _l1_box_delta(d: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Exact projection of ``d`` (N, D) onto ``{||delta||_1 <= eps, 0 <= x + delta <= 1}``."""
    a = d.abs()
    u = torch.where(d >= 0, 1 - x, x).clamp_min(0)  # room in the box on the side of sign(d)
    clipped = torch.minimum(a, u)
    inside = clipped.sum(dim=1) <= eps
    # ||delta(lam)||_1 = sum_i clamp(a_i - lam, 0, u_i) = sum_j w_j max(c_j - lam, 0) with
    # c = [a, a - u], w = [+1, -1]. With c sorted descending, at lam = c_(k) this is
    # S_k - W_k c_(k) (S, W prefix sums of w c and w): nondecreasing in k.
    c = torch.cat([a, a - u], dim=1)
    w = torch.cat([torch.ones_like(a), -torch.ones_like(a)], dim=1)
    c, order = c.sort(dim=1, descending=True)
    w = w.gather(1, order)
    big_w = w.cumsum(dim=1)
    big_s = (w * c).cumsum(dim=1)
    f = big_s - big_w * c
    # lam lies between the last breakpoint with f <= eps (m) and the next one, where the
    # norm is the line S_m - W_m lam; f(c_(1)) = 0 <= eps, so m >= 0.
    nxt = _first_true(f > eps).clamp_min(1)
    m = (nxt - 1)[:, None]
    lam = (big_s.gather(1, m) - eps) / big_w.gather(1, m).clamp_min(1)
    lo = c.gather(1, nxt[:, None]).clamp_min(0)
    lam = torch.minimum(torch.maximum(lam, lo), c.gather(1, m))  # guard against rounding
    shrunk = d.sign() * torch.minimum((a - lam).clamp_min(0), u)
    return torch.where(inside[:, None], d.sign() * clipped, shrunk)


def _l2_box_delta(d: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Exact projection of ``d`` (N, D) onto ``{||delta||_2 <= eps, 0 <= x + delta <= 1}``."""
    a = d.abs()
    u = torch.where(d >= 0, 1 - x, x).clamp_min(0)
    clipped = torch.minimum(a, u)
    inside = clipped.norm(dim=1) <= eps
    # |delta_i(t)| = min(t a_i, u_i): capped from t >= u_i / a_i on (never when a_i = 0).
    # With the breakpoints sorted ascending, at t = t_(k) the squared norm is
    # C_k + t_(k)^2 R_k (C: capped u^2 so far, R: a^2 of the rest): nondecreasing in k.
    pos = a > 0
    t_break = torch.where(pos, u / torch.where(pos, a, torch.ones_like(a)), math.inf)
    t_break, order = t_break.sort(dim=1)
    cap2 = torch.where(pos, u, torch.zeros_like(u)).pow(2).gather(1, order)
    free2 = a.pow(2).gather(1, order)
    zero = torch.zeros_like(a[:, :1])
    big_c = torch.cat([zero, cap2.cumsum(dim=1)], dim=1)  # big_c[:, k]: first k items capped
    big_r = free2.sum(dim=1, keepdim=True) - torch.cat([zero, free2.cumsum(dim=1)], dim=1)
    g2 = big_c[:, 1:] + torch.where(big_r[:, 1:] > 0, t_break.pow(2) * big_r[:, 1:], 0.0)
    k = _first_true(g2 > eps**2)[:, None]  # t lies before breakpoint k: first k items capped
    tiny = torch.finfo(d.dtype).tiny
    t = ((eps**2 - big_c.gather(1, k)).clamp_min(0) / big_r.gather(1, k).clamp_min(tiny)).sqrt()
    t = t.clamp(0.0, 1.0)
    scaled = d.sign() * torch.minimum(t * a, u)
    return torch.where(inside[:, None], d.sign() * clipped, scaled)


@dataclass(frozen=True)
class ThreatModel:
    """Perturbations with ``||delta||_norm <= eps`` whose examples stay in [0,1]."""

    norm: str
    eps: float

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise RobustlabError(f"unknown norm '{self.norm}'; use one of {', '.join(NORMS)}")
        if not math.isfinite(self.eps) or self.eps < 0:
            raise RobustlabError(f"eps must be a finite number >= 0, got {self.eps}")

    def norms(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-sample norm of a batch of perturbations."""
        flat = delta.flatten(1)
        if self.norm == "linf":
            return flat.abs().amax(dim=1)
        if self.norm == "l1":
            return flat.abs().sum(dim=1)
        l2: torch.Tensor = flat.norm(p=2, dim=1)
        return l2

    def project(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """The nearest point to ``x_adv`` (Euclidean) in the threat model around ``x``.

        Exact for every norm (see the module docstring); ``x`` must lie in [0,1].
        """
        if self.norm == "linf":
            return (x + (x_adv - x).clamp(-self.eps, self.eps)).clamp(0.0, 1.0)
        solve = _l1_box_delta if self.norm == "l1" else _l2_box_delta
        work = _work_dtype(x)
        xf = x.flatten(1).to(work)
        delta = solve(x_adv.flatten(1).to(work) - xf, xf, self.eps)
        return (xf + delta).clamp(0.0, 1.0).to(x_adv.dtype).view(x_adv.shape)

    def random_start(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A uniformly random point of the ball around ``x``, moved into the box."""
        if self.norm == "linf":
            u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            delta = (2 * u - 1) * self.eps
        else:
            if self.norm == "l2":
                g = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            else:  # Laplace: normalised, it is uniform on the l1 sphere
                e = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                s = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                g = -torch.log1p(-e) * torch.where(s < 0.5, -1.0, 1.0)
            g = g / column(self.norms(g).clamp_min(1e-12), x)
            d = max(1, math.prod(x.shape[1:]))
            r = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
            delta = g * column(self.eps * r ** (1.0 / d), x)
        return self.project(x, x + delta)

    def steepest_step(self, grad: torch.Tensor) -> torch.Tensor:
        """The unit-norm ascent direction for this norm.

        linf: sign(grad). l2: grad / ||grad||_2. l1: sign(grad) on the top-k coordinates by
        |grad| (k = max(1, ceil(L1_TOP_FRACTION * numel)) per sample), zero elsewhere,
        divided by the count of its nonzeros so each sample has unit l1 norm (all zero where
        the gradient is zero).
        """
        if self.norm == "linf":
            return grad.sign()
        if self.norm == "l1":
            flat = grad.flatten(1)
            k = max(1, math.ceil(L1_TOP_FRACTION * flat.shape[1])) if flat.shape[1] else 0
            top = flat.abs().topk(k, dim=1).indices
            step = torch.zeros_like(flat).scatter(1, top, flat.gather(1, top).sign())
            count = step.abs().sum(dim=1, keepdim=True).clamp_min(1)
            return (step / count).view(grad.shape)
        n: torch.Tensor = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        n = column(n, grad)
        return grad / n

    def contains(self, x: torch.Tensor, x_adv: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
        """Per-sample check that ``x_adv`` lies in the threat model around ``x``."""
        in_box = ((x_adv >= -tol) & (x_adv <= 1 + tol)).flatten(1).all(dim=1)
        return in_box & (self.norms(x_adv - x) <= self.eps * (1 + tol) + tol)

    def as_dict(self) -> dict[str, object]:
        """JSON-able form."""
        return {"norm": self.norm, "eps": self.eps}

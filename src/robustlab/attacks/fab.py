"""Fast Adaptive Boundary attack, FAB and FAB-T (Croce & Hein, ICML 2020), for linf, l2 and l1.

FAB is a minimum-norm attack. At the current iterate it linearises the decision boundary
(the closest class boundary for FAB, the boundary to one target class for FAB-T), projects
both the iterate and the clean input onto that hyperplane intersected with the [0,1] box,
and moves to a biased mix of the two projections with a small overshoot ``eta``. Each time
the iterate is adversarial it is recorded (if its norm is the smallest so far) and pulled
back toward the clean input by ``beta``. With AutoAttack's defaults: 100 iterations, one
restart, ``alpha_max`` 0.1, ``eta`` 1.05, ``beta`` 0.9; FAB-T attacks the top-9 non-true
classes at the clean point in turn, each only on points not yet broken.

A point counts as broken only if its smallest adversarial perturbation has norm <= eps; the
returned tensor always lies inside the threat model.

For l1 (as in the reference implementation) the closest boundary is measured with the dual
norm linf of the gradient difference, the projection onto hyperplane ∩ box is the exact
minimal-l1 step (:func:`project_hyperplane_box`), and a restart starts at l1 distance
``min(best found, eps) / 2`` along a normalised Gaussian direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.criteria import smallest, success
from ..core.threat import ThreatModel
from ..errors import RobustlabError
from ..models.engine import infer
from .base import Attack
from .registry import register
from .restarts import Best, Candidates, run_restarts, within_threat

_FAB_NORMS = ("linf", "l2", "l1")


@register("fab", targeted=False)
@register("fab-t", targeted=True)
@dataclass(frozen=True)
class FAB(Attack):
    """FAB (untargeted) or FAB-T (``targeted=True``); explicit ``targets`` are attacked as given.

    ``restarts`` > 1 adds random starts at norm ``min(best found, eps) / 2`` around the input
    (the published scaling); restarts and target classes run only on points not yet broken.
    """

    norm: str = "linf"
    eps: float = 0.3
    steps: int = 100
    restarts: int = 1
    targeted: bool = False
    n_target_classes: int = 9
    alpha_max: float = 0.1
    eta: float = 1.05
    beta: float = 0.9
    seed: int = 0
    early_stop: bool = True  # stop a point once it has an example inside eps (False: keep
    # shrinking it, as minimum-norm FAB does; robust accuracy is the same either way)

    def __post_init__(self) -> None:
        ThreatModel(self.norm, self.eps)
        if self.norm not in _FAB_NORMS:  # pragma: no cover - ThreatModel already refuses
            raise RobustlabError(f"fab supports {', '.join(_FAB_NORMS)}, got '{self.norm}'")
        if self.steps < 1 or self.restarts < 1:
            raise RobustlabError(
                f"fab needs steps >= 1 and restarts >= 1, got steps={self.steps}, "
                f"restarts={self.restarts}"
            )
        if self.n_target_classes < 1:
            raise RobustlabError(f"fab needs n_target_classes >= 1, got {self.n_target_classes}")
        if not (math.isfinite(self.alpha_max) and 0 <= self.alpha_max <= 1):
            raise RobustlabError(f"fab needs alpha_max in [0, 1], got {self.alpha_max}")
        if not (math.isfinite(self.eta) and self.eta >= 1):
            raise RobustlabError(f"fab needs the overshoot eta >= 1, got {self.eta}")
        if not (math.isfinite(self.beta) and 0 < self.beta <= 1):
            raise RobustlabError(f"fab needs the backward step beta in (0, 1], got {self.beta}")

    @property
    def name(self) -> str:  # type: ignore[override]  # fab-t or fab: per instance
        """'fab' or 'fab-t' (targeted)."""
        return "fab-t" if self.targeted else "fab"

    def config(self) -> dict[str, Any]:
        """The full configuration, for result records; ``name`` says fab or fab-t."""
        return {**super().config(), "name": self.name}

    def run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """FAB on a model already in the state to attack (eval mode, frozen parameters)."""
        if self.eps == 0:  # the threat model is the inputs themselves
            return x.clone()
        threat = self.threat
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        with torch.no_grad():
            logits = infer(model, x)
        n_classes = logits.shape[1]
        if n_classes < 2:
            raise RobustlabError("fab needs a model with at least 2 classes")
        hit0 = success(logits, y, targets)
        best = Best(
            x, smallest(hit0, torch.zeros(len(x), dtype=x.dtype, device=x.device), self.eps)
        )

        # the linearised boundaries to attack, one pass each: None = the closest class
        passes: list[torch.Tensor | None]
        if targets is not None:
            passes = [targets]
        elif self.targeted:
            k = min(self.n_target_classes, n_classes - 1)
            others = logits.scatter(1, y[:, None], -math.inf)
            passes = list(others.argsort(dim=1, descending=True)[:, :k].T)
        else:
            passes = [None]

        for aim in passes:

            def attempt(
                todo: torch.Tensor, restart: int, aim: torch.Tensor | None = aim
            ) -> Candidates:
                """One FAB run on the samples ``todo``; restarts start around the input at
                half the smallest norm found so far (at most eps)."""
                run = self._single_run(
                    model,
                    x[todo],
                    y[todo],
                    None if aim is None else aim[todo],
                    None if targets is None else targets[todo],
                    -best.standing.keys[0][todo] if restart > 0 else None,
                    generator,
                )
                return [(run.x, run.standing)]

            run_restarts(best, self.restarts, attempt)

        # found, but too large: its projection into the threat model if that still works
        return within_threat(model, threat, x, y, targets, best.x)

    def _single_run(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        y: torch.Tensor,
        aim: torch.Tensor | None,
        targets: torch.Tensor | None,
        start_norm: torch.Tensor | None,
        generator: torch.Generator,
    ) -> Best:
        """One FAB run: per sample the smallest adversarial found (the input if none)."""
        threat = self.threat
        shape = (-1,) + (1,) * (x0.dim() - 1)
        x1 = x0.clone()
        if start_norm is not None:  # random start at norm min(best, eps) / 2
            radius = 0.5 * start_norm.clamp(max=self.eps).view(shape)
            if self.norm == "linf":
                u = 2 * torch.rand(x0.shape, generator=generator, device=x0.device) - 1
                u = u / u.flatten(1).abs().amax(dim=1).clamp_min(1e-12).view(shape)
            else:
                u = torch.randn(x0.shape, generator=generator, device=x0.device)
                u = u / threat.norms(u).clamp_min(1e-12).view(shape)
            x1 = (x0 + radius * u.to(x0.dtype)).clamp(0.0, 1.0)
        nowhere = torch.zeros(len(x0), dtype=torch.bool, device=x0.device)
        run = Best(
            x0, smallest(nowhere, torch.full_like(nowhere, math.inf, dtype=x0.dtype), self.eps)
        )
        active = torch.arange(len(x0), device=x0.device)
        for _ in range(self.steps):
            if self.early_stop:  # a point with an example inside eps needs no more steps
                active = active[~run.done[active]]
                if len(active) == 0:
                    break
            xa, xo = x1[active], x0[active]
            df, dg = _boundary(
                model,
                xa,
                y[active],
                None if aim is None else aim[active],
                None if targets is None else targets[active],
                self.norm,
            )
            w = dg.flatten(1)
            flat1, flat0 = xa.flatten(1), xo.flatten(1)
            # the hyperplane w . (z - x1) + df = 0, as the change of w . z it asks for
            need1 = -df
            need0 = -df + (w * (flat1 - flat0)).sum(1)
            d = project_hyperplane_box(
                torch.cat((flat1, flat0)), torch.cat((w, w)), torch.cat((need1, need0)), self.norm
            )
            d1, d0 = d[: len(xa)].view_as(xa), d[len(xa) :].view_as(xa)
            n = threat.norms(d).clamp_min(1e-8)
            n1, n0 = n[: len(xa)], n[len(xa) :]
            alpha = (n1 / (n1 + n0)).clamp(0.0, self.alpha_max).view(shape)
            xa = ((1 - alpha) * (xa + self.eta * d1) + alpha * (xo + self.eta * d0)).clamp(0, 1)
            with torch.no_grad():
                hit = success(
                    infer(model, xa), y[active], None if targets is None else targets[active]
                )
            if bool(hit.any()):
                run.offer(xa, smallest(hit, threat.norms(xa - xo), self.eps), active)
                xa[hit] = xo[hit] + self.beta * (xa[hit] - xo[hit])
            x1[active] = xa
        return run


def _boundary(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    aim: torch.Tensor | None,
    targets: torch.Tensor | None,
    norm: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The linearised boundary to attack at ``x``: logit difference ``df`` and its gradient.

    ``aim`` None: the class boundary f_l - f_y closest in the linear approximation (dual
    norm distance), over every l != y. Otherwise the boundary f_aim - f_src, where src is
    y, or, with explicit targets, the strongest class other than the target.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        rows = torch.arange(len(x), device=x.device)
        if aim is not None:
            if targets is None:
                src = y
            else:
                src = logits.detach().scatter(1, aim[:, None], -math.inf).argmax(1)
            diff = logits[rows, aim] - logits[rows, src]
            (grad,) = torch.autograd.grad(diff.sum(), x)
            return diff.detach(), grad
        jac = _jacobian(logits, x)  # (batch, classes, *x.shape[1:])
    f = logits.detach()
    df = f - f[rows, y][:, None]
    dg = (jac - jac[rows, y][:, None]).flatten(2)
    if norm == "linf":
        dual = dg.abs().sum(2)
    else:
        dual = dg.norm(dim=2) if norm == "l2" else dg.abs().amax(2)
    dist = df.abs() / (dual + 1e-12)
    dist[rows, y] = math.inf
    pick = dist.argmin(1)
    return df[rows, pick], dg[rows, pick].view_as(x)


def _jacobian(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d logits / d x for every class, as (batch, classes, *x.shape[1:]): one backward per class.

    (Batched backward via vmap was several times slower on small models, and replicating the
    batch per class multiplies the forward cost of convolutional ones.)
    """
    grads = [
        torch.autograd.grad(logits[:, k].sum(), x, retain_graph=k < logits.shape[1] - 1)[0]
        for k in range(logits.shape[1])
    ]
    return torch.stack(grads, dim=1)


def project_hyperplane_box(
    t: torch.Tensor, w: torch.Tensor, need: torch.Tensor, norm: str
) -> torch.Tensor:
    """Batched minimal-norm step onto a hyperplane within the [0,1] box.

    Per row: the ``d`` of smallest ``norm`` (linf, l2 or l1) with ``w . d = need`` and
    ``0 <= t + d <= 1``. The linf and l2 problems have solutions ``d_i = sign(w_i) s_i
    min(lam, b_i)`` for one scalar ``lam >= 0``: linf with ``s_i = 1`` and ``b_i`` the room to
    the box in the direction of ``sign(w_i)``; l2 (by its KKT conditions, ``d = clip(mu w)``)
    with ``s_i = |w_i|`` and ``b_i = room_i / |w_i|``. Then ``w . d = g(lam) = sum_i o_i
    min(lam, b_i)`` with ``o_i = |w_i|`` (linf) or ``w_i^2`` (l2), concave piecewise linear
    and nondecreasing, so ``lam`` is the root of ``g(lam) = need``: sort the breakpoints
    ``b``, evaluate ``g`` at all of them with cumulative sums, find the segment holding
    ``need`` (a count, no bisection loop), and solve the linear piece. l1 is a fractional
    knapsack: a unit of l1 norm on coordinate i buys ``|w_i|`` of ``w . d``, so the
    coordinates move in the order of decreasing ``|w_i|``, each as far as the box allows
    (its room) until ``need`` is met (one sort and a cumulative sum). When the box cannot
    reach the hyperplane, linf returns the box-free projection (to be clipped by the caller),
    l2 and l1 the box corner nearest the hyperplane, as in the reference implementation.
    """
    flip = torch.where(need < 0, -1.0, 1.0).to(w.dtype)
    scale = w.abs().amax(dim=1).clamp_min(1e-30)  # the problem is invariant to scaling (w, need)
    w = w * (flip / scale)[:, None]
    need = need.abs() / scale
    aw = w.abs()
    active = aw > 1e-12
    room = torch.where(w > 0, 1 - t, t).clamp_min(0.0)
    if norm == "l1":
        return _knapsack_l1(w, aw, active, room, need)
    if norm == "linf":
        brk, weight, s = room, aw, torch.ones_like(aw)
    elif norm == "l2":
        brk, weight, s = room / torch.where(active, aw, 1.0), aw * aw, aw
    else:
        raise RobustlabError(f"no hyperplane projection for norm '{norm}'")
    brk = torch.where(active, brk, 0.0)
    weight = torch.where(active, weight, 0.0)

    brk_sorted, order = brk.sort(dim=1)
    weight_sorted = weight.gather(1, order)
    total = weight_sorted.sum(dim=1, keepdim=True)
    saturated = torch.cumsum(weight_sorted * brk_sorted, dim=1)  # sum_{j<=k} o_j b_j
    tail_after = (total - torch.cumsum(weight_sorted, dim=1)).clamp_min(0.0)  # sum_{j>k} o_j
    g_at = saturated + brk_sorted * tail_after  # g(b_k)
    k = (g_at < need[:, None]).sum(dim=1)  # first breakpoint where g reaches need
    n = brk.shape[1]
    feasible = k < n
    kc = k.clamp(max=n - 1)[:, None]
    # on the segment [b_{k-1}, b_k]: g(lam) = sum_{j<k} o_j b_j + lam sum_{j>=k} o_j
    w_k, b_k = weight_sorted.gather(1, kc)[:, 0], brk_sorted.gather(1, kc)[:, 0]
    saturated_before = saturated.gather(1, kc)[:, 0] - w_k * b_k
    tail_from = tail_after.gather(1, kc)[:, 0] + w_k
    lo = torch.where(k > 0, brk_sorted.gather(1, (kc - 1).clamp(min=0))[:, 0], 0.0)
    lam = ((need - saturated_before) / tail_from.clamp_min(1e-30)).clamp(min=0.0)
    lam = torch.minimum(torch.maximum(lam, lo), b_k)
    fallback = need / total[:, 0].clamp_min(1e-30) if norm == "linf" else brk_sorted[:, -1]
    lam = torch.where(feasible, lam, fallback)
    d = w.sign() * s * torch.minimum(lam[:, None], brk)
    if norm == "linf":  # the box-free fallback is not capped by the room to the box
        d = torch.where(feasible[:, None], d, w.sign() * lam[:, None])
    return torch.where(active, d, 0.0)


def _knapsack_l1(
    w: torch.Tensor, aw: torch.Tensor, active: torch.Tensor, room: torch.Tensor, need: torch.Tensor
) -> torch.Tensor:
    """The minimal-l1 ``d`` with ``w . d = need >= 0`` in the box: largest ``|w_i|`` first."""
    room = torch.where(active, room, 0.0)
    aw_sorted, order = aw.sort(dim=1, descending=True, stable=True)
    room_sorted = room.gather(1, order)
    gain = aw_sorted * room_sorted  # the most each coordinate can add to w . d
    before = gain.cumsum(dim=1) - gain  # what the coordinates with larger |w_i| add
    left = (need[:, None] - before).clamp_min(0.0)
    move = torch.minimum(left / aw_sorted.clamp_min(1e-30), room_sorted)
    amount = torch.zeros_like(move).scatter(1, order, move)
    return torch.where(active, w.sign() * amount, 0.0)

"""Linear models whose robustness is known in closed form, shared by the attack tests.

Imported by name from the test files next to it (pytest's default prepend import mode puts
this folder on ``sys.path``); the leading underscore keeps pytest from collecting it.

- :func:`two_class_case`: logits ``[0, w.x + b]``. linf and l2: points near 0.5 where the box
  never binds, robust iff ``|w.x + b| > eps ||w||_*``. l1: points whose strongest
  coordinates sit close to the box, so the optimum is the greedy knapsack of
  :func:`l1_box_reach` (fill the largest ``|w_i|`` up to the box until eps is spent).
- :func:`three_class_case`: a random 3-class linear model, for targeted attacks.

In the cases above one FGSM step already reaches the optimum. Two cases where it cannot, so
they tell a multi-step attack from a one-step one:

- :func:`l2_box_case`: the two-class linear model under l2 with the box binding on a few
  strong coordinates. The optimum is the water-filling ``clip(t v, -x, 1 - x)`` of
  :func:`l2_box_reach` (the whole budget spent); one step ``clip(eps v / ||v||)`` wastes
  the part the box cuts off.
- :func:`max_of_two_case`: logits ``[0, max(a.z, b.z)]`` (a one-ReLU net, ``b.z +
  relu((a - b).z)``) on 2-D inputs, the piece ``a`` active at each point but ``b`` at the
  optimum, so the first gradient points the wrong way.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Linear2(nn.Module):
    """Two-class linear classifier with logits [0, w.x + b]: its robustness is known exactly."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = nn.Parameter(torch.tensor(b, dtype=w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1) @ self.w.flatten() + self.b
        return torch.stack([torch.zeros_like(s), s], dim=1)


class Case(NamedTuple):
    """A model, points, labels, and per point whether it is robust (the exact answer)."""

    model: Linear2
    x: torch.Tensor
    y: torch.Tensor
    robust: torch.Tensor


def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per sample: the model still predicts the label (robust, for adversarial inputs)."""
    with torch.no_grad():
        pred: torch.Tensor = model(x).argmax(1)
    return pred == y


def l1_box_reach(v: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per row, max of ``v . delta`` over ``||delta||_1 <= eps`` and ``0 <= x + delta <= 1``.

    A fractional knapsack: a unit of l1 norm on coordinate i buys ``|v_i|``, at most up to the
    box in the direction of ``sign(v_i)``; so the largest ``|v_i|`` are filled first.
    ``v`` is (d,) or (n, d), ``x`` is (n, ...).
    """
    flat = x.flatten(1)
    v = v.flatten().expand_as(flat) if v.dim() == 1 or v.shape[0] == 1 else v.flatten(1)
    room = torch.where(v > 0, 1 - flat, flat)
    gain, order = v.abs().sort(dim=1, descending=True)
    room = room.gather(1, order)
    spent_before = room.cumsum(1) - room
    amount = torch.minimum(room, (eps - spent_before).clamp_min(0))
    return (gain * amount).sum(1)


def l2_box_reach(v: torch.Tensor, x: torch.Tensor, eps: float, iters: int = 100) -> torch.Tensor:
    """Per row, max of ``v . delta`` over ``||delta||_2 <= eps`` and ``0 <= x + delta <= 1``.

    KKT water-filling: ``delta(t) = clip(t v, -x, 1 - x)`` with the smallest ``t`` where the
    norm reaches eps (or the whole box when it never does); the norm grows with ``t``, so
    ``t`` is found by bisection (in float64; independent of ``ThreatModel.project``).
    ``v`` is (n, d), ``x`` is (n, ...).
    """
    v, flat = v.double(), x.flatten(1).double()

    def delta(t: torch.Tensor) -> torch.Tensor:
        """The step t v per row, clipped to the box."""
        return torch.minimum(torch.maximum(t[:, None] * v, -flat), 1 - flat)

    lo = torch.zeros(len(v), dtype=torch.float64)
    hi = (1 / v.abs().amax(1).clamp_min(1e-30)).double()  # every coordinate at the box
    whole = delta(hi).norm(dim=1) <= eps
    for _ in range(iters):
        mid = (lo + hi) / 2
        over = delta(mid).norm(dim=1) > eps
        lo, hi = torch.where(over, lo, mid), torch.where(over, mid, hi)
    return (v * delta(torch.where(whole, hi, lo))).sum(1).float()


def l2_box_case(eps: float = 1.0, n: int = 300, seed: int = 1, tie: float = 1e-3) -> Case:
    """l2 with the box binding: 4 strong coordinates (|w_i| = 3) lie 0.05 to 0.2 from the box
    in the attack's direction, the other 32 (|w_i| = 1) near the middle; margins spread over
    (0.7 .. 1.3) x the exact reach, so one FGSM step (which reaches 0.73 - 0.82 of it at
    eps 1) leaves points robust that are not. Points within ``tie`` (relative) are dropped."""
    g = torch.Generator().manual_seed(seed)
    d, strong = 36, torch.tensor([3, 14, 22, 33])
    w = torch.ones(d)
    w[strong] = 3.0
    w = w * torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0)
    label = torch.randint(0, 2, (n,), generator=g)
    push = torch.where(label[:, None] == 1, -w.sign(), w.sign())  # the attack's direction
    v = push * w.abs()  # what a step along the attack's direction buys per coordinate
    room = 0.05 + 0.15 * torch.rand(n, len(strong), generator=g)
    x = torch.full((n, d), 0.5)
    x[:, strong] = 0.5 + push[:, strong] * (0.5 - room)
    target = l2_box_reach(v, x, eps) * (0.7 + 0.6 * torch.rand(n, generator=g))
    weak = torch.ones(d, dtype=torch.bool)
    weak[strong] = False
    now = -(v * (x - 0.5)).sum(1)  # the margin (sign-adjusted) so far
    x[:, weak] -= push[:, weak] * ((target - now) / int(weak.sum()))[:, None]
    assert bool(((x >= 0) & (x <= 1)).all())
    reach = l2_box_reach(v, x, eps)  # the weak coordinates moved: recompute
    model = Linear2(w.view(1, 6, 6), -0.5 * float(w.sum())).eval()
    x = x.view(n, 1, 6, 6)
    with torch.no_grad():
        margin = model(x)[:, 1]
    y = (margin > 0).long()
    assert torch.equal(y, label)
    robust = margin.abs() > reach
    keep = (margin.abs() - reach).abs() > tie * reach
    return Case(model, x[keep], y[keep], robust[keep])


class MaxOfTwo(nn.Module):
    """Two-class logits ``[0, max(a.(z - 1/2), b.(z - 1/2))]`` on 2-D inputs (a ReLU net)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(a.clone()), nn.Parameter(b.clone())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The two logits, f = b.c + relu((a - b).c) with c = z - 1/2."""
        c = z.flatten(1) - 0.5
        f = c @ self.b + torch.relu(c @ (self.a - self.b))
        return torch.stack([torch.zeros_like(f), f], dim=1)


def max_of_two_case(
    norm: str, eps: float = 0.1, n: int = 300, seed: int = 2, tie: float = 1e-3
) -> tuple[MaxOfTwo, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(model, x, y, least f over the ball) for :class:`MaxOfTwo` with a = (4, -1),
    b = (1, 1), every point of class 1 (f > 0), under linf or l2 (the box never binds).

    At each point ``p`` piece a is active, ``f_a(p) - f_b(p) = gap`` in (0.05 .. 0.65) eps.
    ``q = p - eps u`` with ``u`` the dual direction of b (linf: (1, 1); l2: (1, 1) / sqrt 2)
    minimises ``f_b`` over the ball, and a is below b there (it falls by 3 eps resp.
    2.12 eps, b by 2 eps resp. 1.41 eps), so ``min f = f_b(q) = f_b(p) - eps ||b||_*``
    exactly, as ``f >= f_b``. One step along -a (FGSM) lowers ``f_b`` by 0 (linf) or 0.73
    eps (l2) only. ``f_b(p)`` spreads over (0.6 .. 1.4) x eps ||b||_*; points within ``tie``
    (relative) of the threshold are dropped.
    """
    g = torch.Generator().manual_seed(seed)
    a, b = torch.tensor([4.0, -1.0]), torch.tensor([1.0, 1.0])
    dual = float(b.abs().sum() if norm == "linf" else b.norm())
    fb = eps * dual * (0.6 + 0.8 * torch.rand(n, generator=g))
    gap = eps * (0.05 + 0.6 * torch.rand(n, generator=g))
    c = torch.linalg.solve(torch.stack([a, b]), torch.stack([fb + gap, fb]))  # p - 1/2
    x = 0.5 + c.T
    assert bool(((x - 2 * eps >= 0) & (x + 2 * eps <= 1)).all())  # the box never binds
    least = fb - eps * dual
    keep = least.abs() > tie * eps * dual
    model = MaxOfTwo(a, b).eval()
    y = torch.ones(n, dtype=torch.long)
    return model, x[keep], y[keep], least[keep]


def two_class_case(norm: str, eps: float, n: int = 300, seed: int = 1, tie: float = 1e-3) -> Case:
    """Points on both sides of the decision boundary, with margins on both sides of the
    largest change an eps-perturbation can make; points within ``tie`` (relative) of it are
    dropped. ``norm`` linf / l2: the box never binds; l1: it does (see the module doc)."""
    if norm == "l1":
        return _l1_two_class(eps, n, seed, tie)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(1, 6, 6, generator=g).sign() * (0.5 + torch.rand(1, 6, 6, generator=g))
    dual = float(w.abs().sum() if norm == "linf" else w.norm())  # dual norm of w
    c = 0.15 * (2 * torch.rand(n, 1, 1, 1, generator=g) - 1)
    x = 0.5 + c * w.sign() + 0.02 * (2 * torch.rand(n, 1, 6, 6, generator=g) - 1)
    model = Linear2(w, eps * dual - 0.5 * float(w.sum())).eval()
    with torch.no_grad():
        margin = model(x)[:, 1]
    y = (margin > 0).long()
    robust = margin.abs() > eps * dual  # robust iff the margin exceeds eps * ||w||_*
    keep = (margin.abs() - eps * dual).abs() > tie * dual  # drop ties at the boundary
    return Case(model, x[keep], y[keep], robust[keep])


def _l1_two_class(eps: float, n: int, seed: int, tie: float) -> Case:
    """l1 with the box binding: 4 strong coordinates (|w_i| = 2) lie 0.05 to 0.2 from the box
    in the direction that attacks the point, the other 32 (|w_i| = 1) near the middle. The
    optimum fills the strong ones to the box and spends the rest of eps on weak ones."""
    g = torch.Generator().manual_seed(seed)
    d, strong = 36, torch.tensor([3, 14, 22, 33])
    w = torch.ones(d)
    w[strong] = 2.0
    w = w * torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0)
    label = torch.randint(0, 2, (n,), generator=g)
    push = torch.where(label[:, None] == 1, -w.sign(), w.sign())  # the attack's direction
    room = 0.05 + 0.15 * torch.rand(n, len(strong), generator=g)
    x = torch.full((n, d), 0.5)
    x[:, strong] = 0.5 + push[:, strong] * (0.5 - room)
    reach = l1_box_reach(push * w.abs(), x, eps)
    # the weak coordinates move the margin to (0.5 .. 1.5) x reach, on the label's side
    target = reach * (0.5 + torch.rand(n, generator=g))
    weak = torch.ones(d, dtype=torch.bool)
    weak[strong] = False
    now = -(push * w.abs() * (x - 0.5)).sum(1)  # the margin (sign-adjusted) so far
    x[:, weak] -= push[:, weak] * ((target - now) / int(weak.sum()))[:, None]
    assert bool(((x >= 0) & (x <= 1)).all())
    reach = l1_box_reach(push * w.abs(), x, eps)  # the weak coordinates moved: recompute
    model = Linear2(w.view(1, 6, 6), -0.5 * float(w.sum())).eval()
    x = x.view(n, 1, 6, 6)
    with torch.no_grad():
        margin = model(x)[:, 1]
    y = (margin > 0).long()
    assert torch.equal(y, label)
    robust = margin.abs() > reach
    keep = (margin.abs() - reach).abs() > tie * reach
    return Case(model, x[keep], y[keep], robust[keep])


def three_class_case(n: int = 200, seed: int = 5) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A random 3-class linear model with logits near 0 around x = 0.5, points and labels."""
    g = torch.Generator().manual_seed(seed)
    w = 2 * torch.randn(3, 36, generator=g)
    linear = nn.Linear(36, 3)
    model = nn.Sequential(nn.Flatten(), linear).eval()
    with torch.no_grad():
        linear.weight.copy_(w)
        linear.bias.copy_(-0.5 * w.sum(1))
    x = 0.5 + 0.1 * (2 * torch.rand(n, 1, 6, 6, generator=g) - 1)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def l1_box_distance(v: torch.Tensor, x: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest ``||delta||_1`` with ``v . delta >= need`` inside the box (inf
    where the box cannot get there): the largest ``|v_i|`` first, each up to the box."""
    flat = x.flatten(1)
    room = torch.where(v > 0, 1 - flat, flat)
    gain, order = v.abs().sort(dim=1, descending=True)
    room = room.gather(1, order)
    cap = gain * room
    before = cap.cumsum(1) - cap
    use = torch.minimum(room, (need[:, None] - before).clamp_min(0) / gain.clamp_min(1e-30))
    return torch.where(cap.sum(1) >= need, use.sum(1), torch.inf)


def k_class_l1_case(
    eps: float, classes: int = 4, n: int = 60, seed: int = 6, tie: float = 0.02
) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A K-class linear model under l1 with the box binding: (model, x, y, robust).

    Misclassification is a union of half-spaces f_j > f_y, so a point is robust iff for
    every j != y the knapsack :func:`l1_box_reach` of ``w_j - w_y`` stays below the margin
    ``f_y - f_j``. Six coordinates per point sit within 0.05 of the box. Points within
    ``tie`` (relative) of a threshold are dropped.
    """
    g = torch.Generator().manual_seed(seed)
    w = torch.where(torch.rand(classes, 36, generator=g) < 0.5, -1.0, 1.0)
    w = w * (0.5 + torch.rand(classes, 36, generator=g))
    linear = nn.Linear(36, classes)
    model = nn.Sequential(nn.Flatten(), linear).eval()
    with torch.no_grad():
        linear.weight.copy_(w)
        linear.bias.copy_(-0.5 * w.sum(1))
    x = 0.5 + 0.1 * (2 * torch.rand(n, 36, generator=g) - 1)
    edge = torch.rand(n, 36, generator=g).argsort(1)[:, :6]
    near = 0.05 * torch.rand(n, 6, generator=g)
    x.scatter_(1, edge, torch.where(torch.rand(n, 6, generator=g) < 0.5, near, 1 - near))
    x = x.view(n, 1, 6, 6)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    robust = torch.ones(n, dtype=torch.bool)
    keep = torch.ones(n, dtype=torch.bool)
    for j in range(classes):
        margin = logits.gather(1, y[:, None])[:, 0] - logits[:, j]
        reach = l1_box_reach(w[j][None] - w[y], x, eps)
        other = y != j
        robust &= ~other | (margin > reach)
        keep &= ~other | ((margin - reach).abs() > tie * reach)
    return model, x[keep], y[keep], robust[keep]


def tiny_mlp(inputs: int, classes: int, seed: int) -> nn.Module:
    """A small random ReLU net (eval mode) for invariants; seeds the global generator first,
    so the inputs a test draws next are reproducible too."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(inputs, 16), nn.ReLU(), nn.Linear(16, classes)
    ).eval()

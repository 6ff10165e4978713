"""Square Attack (Andriushchenko et al., ECCV 2020): score-based random search, no gradients.

Each iteration changes one random square window of the current best perturbation and keeps
the proposal per sample only if it lowers that sample's loss (or already fools the model).
The window side follows a piecewise-constant schedule for p, the fraction of pixels changed:
p_init is halved after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of a
10,000-query run; for another budget the iteration index is rescaled to ``it / queries *
10000`` first (the authors' default), unless ``rescale_schedule`` is off: AutoAttack runs
its 5,000 queries on the 10,000-query bounds as they are, and so does ours. The side is round(sqrt(p * h * w)).

* linf: start from vertical stripes of +-eps (one sign per column and channel); a proposal
  sets a window (side >= 1) of every channel to x +- eps, one random sign per channel.
  As in the authors' code, signs are redrawn until the proposal differs from the current
  point, so no query is spent on an unchanged input.
* l2: start from a grid of signed "two-windows" bumps of side max(min(h, w) // 5, 1)
  (5 x 5 bumps on 32 x 32 images), scaled to norm eps; a proposal
  (side >= 3 and odd) moves the perturbation mass of a second random window into the first
  window as a new signed bump, then rescales the whole perturbation to norm eps.

* l1 (the reference implementation's l1 version, as in l1-AutoAttack, Croce & Hein 2021):
  the l2 scheme with l1 bumps (nested rectangles weighted 1 / (k+1)^4 instead of 1 / (k+1)^2,
  unit l1 norm per half) and l1 bookkeeping: the start is the grid of bumps projected onto
  the l1-ball ∩ box; a proposal fills window 1, per channel, with the new bump plus the
  window's old content (normalised), scaled to l1 mass ``c * (unused budget / c + mass of
  both windows in that channel)`` (the reference's factor ``c``: more than the windows held
  when c > 1, so the projection moves mass into the new window), empties window 2, and
  projects onto the l1-ball ∩ box. Projections use radius ``eps * (1 - 1e-6)``.

linf and l2 are followed by clipping to [0,1] (and, for l2, ``ThreatModel.project`` as a
safety net); l1 uses the exact projection of :class:`ThreatModel`. Windows, signs and bump orientations are drawn per sample from a seeded
``torch.Generator``; window positions are uniform over all positions where the window fits.
Samples stop being queried as soon as they are misclassified (or hit their target), and each
restart only attacks samples no earlier restart broke; a sample never broken gets the
lowest-loss point of all restarts (AutoAttack returns the clean input there). The budget ``queries`` counts every
model evaluation of a perturbed input, the initial point included, per sample and restart;
the single forward pass on the clean inputs is not counted.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.checks import check_batch
from ..core.criteria import strongest, success, unbroken
from ..core.guard import frozen_eval
from ..core.threat import ThreatModel
from ..errors import RobustlabError
from ..models.engine import infer
from .base import Attack
from .losses import cross_entropy, cw_margin
from .registry import register
from .restarts import Best, Candidates, run_restarts

SQUARE_NORMS = ("linf", "l2", "l1")
SQUARE_LOSSES = ("margin", "ce")
# iterations (of a 10,000-query run) after which p is halved
P_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_MAX_REDRAWS = 64  # linf: redraws of the signs of a proposal that would not change anything


def p_selection(p_init: float, it: int, queries: int, rescale: bool = True) -> float:
    """The fraction of pixels changed at iteration ``it`` (0-based) of a ``queries`` budget.

    ``rescale`` maps the iteration onto the 10,000-query schedule; without it (AutoAttack's
    setting) the schedule's iteration bounds are used as they are."""
    scaled = int(it / queries * 10000) if rescale else it
    halvings = sum(scaled > bound for bound in P_SCHEDULE)
    return p_init / 2.0**halvings


@register("square")
@dataclass(frozen=True)
class Square(Attack):
    """Square Attack for linf, l2 and l1; ``loss`` is "margin" or "ce" (both minimised).

    Untargeted: margin z_y - max_{i != y} z_i, or -CE(y). Targeted: margin
    max_{i != t} z_i - z_t, or CE(t) (the authors' and AutoAttack's choice for targeted runs).
    """

    norm: str = "linf"
    eps: float = 0.3
    queries: int = 5000
    p_init: float = 0.8
    restarts: int = 1
    seed: int = 0
    loss: str = "margin"
    rescale_schedule: bool = True  # False in AutoAttack, as in the reference implementation

    name: ClassVar[str] = "square"

    def __post_init__(self) -> None:
        if self.norm not in SQUARE_NORMS:
            raise RobustlabError(f"Square supports linf, l2 and l1 only, got norm '{self.norm}'")
        ThreatModel(self.norm, self.eps)
        if self.queries < 1 or self.restarts < 1:
            raise RobustlabError("square needs queries >= 1 and restarts >= 1")
        if not 0 < self.p_init <= 1:
            raise RobustlabError(f"square needs p_init in (0, 1], got {self.p_init}")
        if self.loss not in SQUARE_LOSSES:
            raise RobustlabError(
                f"unknown square loss '{self.loss}'; use one of {', '.join(SQUARE_LOSSES)}"
            )

    def run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Square Attack on a model already in eval mode with frozen parameters."""
        return self._attack(model, x, y, targets)[0]

    def run_with_stats(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like calling the attack, plus the number of queries spent on each sample (int64)."""
        check_batch(x, y, targets)
        with frozen_eval(model):
            return self._attack(model, x, y, targets)

    def _loss(
        self, logits: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None
    ) -> torch.Tensor:
        """Per-sample loss the search raises (the negation of the objective it minimises):
        the cw margin or cross-entropy of :mod:`robustlab.attacks.losses`."""
        return (
            cw_margin(logits, y, targets)
            if self.loss == "margin"
            else cross_entropy(logits, y, targets)
        )

    def _attack(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 4:
            raise RobustlabError(
                f"square needs image batches (N, C, H, W), got shape {tuple(x.shape)}"
            )
        with torch.no_grad():
            n = len(x)
            best = x.clone()
            queries = torch.zeros(n, dtype=torch.long, device=x.device)
            if n == 0:
                return best, queries
            if self.eps == 0:  # nothing to search: the inputs are the only admissible points
                return best, queries
            kept = Best(x, unbroken(success(infer(model, x), y, targets), x.dtype))
            generator = torch.Generator(device=x.device).manual_seed(self.seed)

            def attempt(todo: torch.Tensor, _: int) -> Candidates:
                """One run from a fresh start on the samples ``todo``; counts its queries."""
                ts = None if targets is None else targets[todo]
                run, used = self._single_run(model, x[todo], y[todo], ts, generator)
                queries[todo] += used
                return [(run.x, run.standing)]

            return run_restarts(kept, self.restarts, attempt).x, queries

    def _single_run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None,
        gen: torch.Generator,
    ) -> tuple[Best, torch.Tensor]:
        """One run from a fresh start: per sample the accepted point (successful, else of the
        lowest objective, i.e. the highest loss) and the queries spent."""
        if self.norm == "linf":
            x_init = self._init_linf(x, gen)
        else:
            x_init = self._init_l2(x, gen) if self.norm == "l2" else self._init_l1(x, gen)
        logits = infer(model, x_init)
        run = Best(x_init, strongest(success(logits, y, targets), self._loss(logits, y, targets)))
        used = torch.ones(len(x), dtype=torch.long, device=x.device)
        for it in range(self.queries - 1):
            act = run.todo()
            if len(act) == 0:
                break
            xa, xb = x[act], run.x[act]
            p = p_selection(self.p_init, it, self.queries, self.rescale_schedule)
            if self.norm == "linf":
                x_new = self._propose_linf(xa, xb, p, gen)
            else:
                x_new = self._propose_bump(xa, xb, p, gen)
            ta = None if targets is None else targets[act]
            logits = infer(model, x_new)
            loss = self._loss(logits, y[act], ta)
            run.offer(x_new, strongest(success(logits, y[act], ta), loss), act)
            used[act] += 1
        return run, used

    # -- linf -----------------------------------------------------------------------------

    def _init_linf(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, c, _, w = x.shape
        stripes = _signs((n, c, 1, w), gen, x)
        return (x + self.eps * stripes).clamp(0.0, 1.0)

    def _propose_linf(
        self, x: torch.Tensor, x_best: torch.Tensor, p: float, gen: torch.Generator
    ) -> torch.Tensor:
        m, c, h, w = x.shape
        side = min(max(round(math.sqrt(p * h * w)), 1), h, w)
        window = _window_mask(*_positions(m, side, h, w, gen, x.device), side, h, w)
        signs = _signs((m, c, 1, 1), gen, x)
        x_new = torch.where(window, (x + self.eps * signs).clamp(0.0, 1.0), x_best)
        for _ in range(_MAX_REDRAWS):  # redraw signs where the proposal changes nothing
            same = (x_new == x_best).flatten(1).all(dim=1).nonzero().flatten()
            if len(same) == 0:
                break
            signs = _signs((len(same), c, 1, 1), gen, x)
            cand = (x[same] + self.eps * signs).clamp(0.0, 1.0)
            x_new[same] = torch.where(window[same], cand, x_best[same])
        return x_new

    # -- l2 -------------------------------------------------------------------------------

    def _init_l2(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The l2 start: the grid of bumps scaled to norm eps."""
        return self._to_ball(x, _bump_grid(x, gen, "l2"))

    def _propose_bump(
        self, x: torch.Tensor, x_best: torch.Tensor, p: float, gen: torch.Generator
    ) -> torch.Tensor:
        """l2 and l1: window 1 takes a fresh bump plus its normalised old content, with the
        mass of both windows and the unused budget; window 2 is emptied."""
        l1 = self.norm == "l1"

        def mass(t: torch.Tensor, dim: tuple[int, ...]) -> torch.Tensor:
            """Per sample (and channel) l1 or l2 mass over ``dim``."""
            if l1:
                return t.abs().sum(dim=dim, keepdim=True)
            return t.square().sum(dim=dim, keepdim=True).sqrt()

        m, c, h, w = x.shape
        side = max(round(math.sqrt(p * h * w)), 3)
        side = min(side + 1 if side % 2 == 0 else side, h, w)
        vh, vw = _positions(m, side, h, w, gen, x.device)
        vh2, vw2 = _positions(m, side, h, w, gen, x.device)
        win1 = _window_mask(vh, vw, side, h, w)
        win2 = _window_mask(vh2, vw2, side, h, w)
        delta = x_best - x
        norm_win1 = mass(delta * win1, (2, 3))
        norm_img = mass(delta, (1, 2, 3))
        norm_wins = mass(delta * (win1 | win2), (2, 3))
        # a fresh bump per sample (random orientation and per-channel sign) ...
        bump = _eta(side, x, self.norm)
        flip = (torch.rand(m, generator=gen, device=x.device) > 0.5).view(m, 1, 1, 1)
        new = torch.where(flip, bump.T, bump) * _signs((m, c, 1, 1), gen, x)
        # ... added to the normalised old content of window 1, which takes the mass of both
        # windows plus the unused budget; window 2 is emptied
        new = new + _patch(delta, vh, vw, side) / (1e-12 + norm_win1)
        if l1:  # the reference's factor c (see the module docstring)
            budget = c * (torch.clamp(self.eps - norm_img, min=0.0) / c + norm_wins)
        else:
            budget = (torch.clamp(self.eps**2 - norm_img**2, min=0.0) / c + norm_wins**2).sqrt()
        new = new / (1e-12 + mass(new, (2, 3))) * budget
        delta = delta * ~win2
        _put_patch(delta, vh, vw, new)
        return self._to_l1(x, delta) if l1 else self._to_ball(x, delta)

    def _to_ball(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """x + delta rescaled to l2 norm eps, clipped to the box, projected as a safety net."""
        norm: torch.Tensor = delta.flatten(1).norm(dim=1)
        norm = norm.view(-1, 1, 1, 1)
        x_new = (x + delta / (norm + 1e-12) * self.eps).clamp(0.0, 1.0)
        threat = self.threat
        over = threat.norms(x_new - x) > self.eps  # only float rounding can get here
        if bool(over.any()):
            x_new[over] = threat.project(x[over], x_new[over])
        return x_new

    # -- l1 -------------------------------------------------------------------------------

    def _init_l1(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The l1 start: the grid of l1 bumps projected onto the l1-ball ∩ box."""
        return self._to_l1(x, _bump_grid(x, gen, "l1"))

    def _to_l1(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The exact projection of x + delta onto the l1-ball (radius eps (1 - 1e-6)) ∩ box."""
        return ThreatModel("l1", self.eps * (1 - 1e-6)).project(x, x + delta)


def _bump_grid(x: torch.Tensor, gen: torch.Generator, norm: str) -> torch.Tensor:
    """The l2/l1 start: a grid of signed bumps of side max(min(h, w) // 5, 1), centred."""
    n, c, h, w = x.shape
    side = max(min(h, w) // 5, 1)
    start_h, start_w = max((h - 5 * side) // 2, 0), max((w - 5 * side) // 2, 0)
    delta = torch.zeros_like(x)
    bump = _eta(side, x, norm)
    for i in range(h // side):
        vh = start_h + i * side
        for j in range(w // side):
            vw = start_w + j * side
            if vh + side > h or vw + side > w:
                continue
            flip = bool(torch.rand(1, generator=gen, device=x.device) > 0.5)
            b = bump.T if flip else bump
            delta[:, :, vh : vh + side, vw : vw + side] += b * _signs((n, c, 1, 1), gen, x)
    return delta


def _signs(shape: tuple[int, ...], gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Uniform random +-1 values."""
    bits = torch.randint(0, 2, shape, generator=gen, device=like.device)
    return (2 * bits - 1).to(like.dtype)


def _positions(
    m: int, side: int, h: int, w: int, gen: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left corners of ``m`` windows, uniform over every position where they fit."""
    vh = torch.randint(0, h - side + 1, (m,), generator=gen, device=device)
    vw = torch.randint(0, w - side + 1, (m,), generator=gen, device=device)
    return vh, vw


def _window_mask(vh: torch.Tensor, vw: torch.Tensor, side: int, h: int, w: int) -> torch.Tensor:
    """Boolean (m, 1, h, w) masks of the windows."""
    rows = torch.arange(h, device=vh.device)[None, :]
    cols = torch.arange(w, device=vw.device)[None, :]
    in_rows = (rows >= vh[:, None]) & (rows < vh[:, None] + side)
    in_cols = (cols >= vw[:, None]) & (cols < vw[:, None] + side)
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


def _patch_index(
    vh: torch.Tensor, vw: torch.Tensor, side: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    offsets = torch.arange(side, device=vh.device)
    rows = (vh[:, None] + offsets)[:, :, None]
    cols = (vw[:, None] + offsets)[:, None, :]
    return torch.arange(len(vh), device=vh.device)[:, None, None], rows, cols


def _patch(t: torch.Tensor, vh: torch.Tensor, vw: torch.Tensor, side: int) -> torch.Tensor:
    """The (m, c, side, side) windows of ``t`` at per-sample positions."""
    return t.permute(0, 2, 3, 1)[_patch_index(vh, vw, side)].permute(0, 3, 1, 2)


def _put_patch(t: torch.Tensor, vh: torch.Tensor, vw: torch.Tensor, value: torch.Tensor) -> None:
    """Write (m, c, side, side) windows into ``t`` in place."""
    t.permute(0, 2, 3, 1)[_patch_index(vh, vw, value.shape[-1])] = value.permute(0, 2, 3, 1)


def _rectangles(rows: int, cols: int, norm: str = "l2") -> torch.Tensor:
    """Nested centred rectangles, a pseudo-Gaussian of unit norm.

    l2: weights 1/(k+1)^2, unit l2 norm; l1: weights 1/(k+1)^4, unit l1 norm.
    """
    bump = torch.zeros(rows, cols, dtype=torch.float64)
    if bump.numel() == 0:
        return bump
    power = 4 if norm == "l1" else 2
    r0, c0 = rows // 2, cols // 2
    for k in range(max(rows // 2, cols // 2) + 1):
        bump[max(r0 - k, 0) : min(r0 + k + 1, rows), max(c0 - k, 0) : min(c0 + k + 1, cols)] += (
            1.0 / (k + 1) ** power
        )
    return bump / (bump.abs().sum() if norm == "l1" else bump.norm())


def _eta(side: int, like: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """The update shape: a positive bump on the top half, a negative one below, unit norm."""
    return _eta_cached(side, norm).to(dtype=like.dtype, device=like.device)


@functools.lru_cache(maxsize=128)
def _eta_cached(side: int, norm: str = "l2") -> torch.Tensor:
    """Never modified in place: callers only read it."""
    top = side // 2
    bump = torch.cat([_rectangles(top, side, norm), -_rectangles(side - top, side, norm)])
    return bump / (bump.abs().sum() if norm == "l1" else bump.norm())

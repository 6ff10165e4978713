"""Auto-PGD (Croce & Hein, ICML 2020): APGD with any loss, and APGD-T on the targeted DLR loss.

**linf and l2.** One run of APGD from a random start ``x0`` with ``N = steps`` iterations::

    x1      = P(x0 + eta * s(g0))                       # g: gradient, s: steepest_step
    z       = P(xk + eta * s(gk))                       # k >= 1
    x_{k+1} = P(xk + a * (z - xk) + (1 - a) * (xk - x_{k-1}))    # a = momentum = 0.75

with ``P`` the exact projection of the threat model and ``eta`` starting at ``2 * eps``.
Checkpoints ``w_j = ceil(p_j * N)`` with ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j +
max(p_j - p_{j-1} - 0.03, 0.06)`` (exact hundredths; for N = 100: 22, 41, 57, 70, 80, 87,
93, 99). Once ``x_{w_j}`` is evaluated, per sample, the step size is halved and the next
step starts from the highest-loss point ``x_max`` (with its gradient; the momentum term
then is ``x_max - x_{w_j - 1}``) when

1. fewer than ``rho * (w_j - w_{j-1})`` of the steps since the last checkpoint increased the
   loss (``f(x_{i+1}) > f(x_i)`` for ``w_{j-1} <= i < w_j``, ``x_i`` being the point the step
   started from), or
2. the step size was not halved at ``w_{j-1}`` (``w_0 = 0`` counts as not halved) and the
   best loss ``f_max`` did not increase since ``w_{j-1}``.

**l1** is l1-APGD (Croce & Hein, "Mind the box", ICML 2021), as in the authors' code:

- the start is the projection of ``x + N(0, I)`` onto the l1-ball ∩ box (sparse: the exact
  projection soft-thresholds the noise);
- the step ``x_{k+1} = P(xk + eta * u)`` moves the ``m`` coordinates with the largest
  ``|g_i|`` by ``sign(g_i)``, ``u`` scaled to unit l1 norm (no momentum term);
- adaptive sparsity: ``m`` starts at ``ceil(0.2 * d)`` (``d`` = input size) and is set, at
  every checkpoint, to ``ceil(||x_max - x||_0 / 1.5)`` (at least 1), so the step becomes as
  sparse as the best point found;
- step size: ``eta`` starts at ``eps``; checkpoints come every ``max(floor(0.04 * N), 1)``
  iterations. If the best point's sparsity ``||x_max - x||_0`` fell below 95 % of its value
  at the previous checkpoint (``d`` before the first), ``eta`` goes back to ``eps`` and the
  run continues from ``x_max`` (with its gradient); otherwise ``eta`` is divided by 1.5.
  ``eta`` stays within ``[eps / 10, eps]``;
- ``large_eps=True`` (AutoAttack's l1 setting) splits the ``N`` iterations into three runs
  of ``ceil(0.3 N)``, ``ceil(0.3 N)`` and the rest at radii ``3 eps``, ``2 eps``, ``eps``.
  The first starts from ``x + N(0, I)`` projected at ``3 eps``; each later one from the
  highest-loss point of the one before, projected at its own radius. A run with a start
  point begins with ``m = ceil(||x0 - x||_0 / 1.5)`` and compares the sparsity at its first
  checkpoint with ``||x0 - x||_0``. A success counts only inside the eps-ball (in the
  earlier runs too, where the reference implementation ignores it).

Two deliberate l1 differences to the reference code: the shares are exact (30/30/40 of
100; the reference's float ``ceil(0.3 * 100)`` gives 31/31/38), and successes inside eps
found by the 3 eps / 2 eps runs are kept. Ties with the m-th largest ``|g_i|`` move too, as
there. On a linear model a single run can stall: the sign step adds the same amount to every
coordinate of its step set and the projection takes the same amount off, so an even split
between coordinates of different ``|w_i|`` persists (the reference does the same);
restarts and the large-eps schedule, AutoAttack's setting, undo most of it.

Every bookkeeping value (step size, counters, sparsity, best point, best loss) is per
sample. A sample stops being iterated once it is successful (misclassified, or at its
target); a run returns per sample the successful point if one was found, else its
highest-loss point. Restarts run only on samples not yet successful. With ``eot_iter = m``
the gradient and the loss are the means over ``m`` forward/backward passes (randomised
defences), and a point counts as successful only if all ``m`` passes say so.

Differences to the reference code (fra31/auto-attack), linf and l2, all following the paper:
condition 1 is strict (``<``), compares with ``f(x0)`` at the first checkpoint and with
``f(x_max)`` after a restart; condition 2 may fire at the first checkpoint; the random start
is uniform in the ball (:meth:`ThreatModel.random_start`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.criteria import Standing, strongest, success, unbroken
from ..core.threat import ThreatModel
from ..errors import RobustlabError
from .base import Attack
from .losses import Loss, dlr, get_loss, loss_name
from .optim import APGDControl, checkpoints, first_step
from .registry import register
from .restarts import Best, Candidates, run_restarts

# l1-APGD (the authors' constants): initial fraction of coordinates a step moves, the
# divisor from the best point's sparsity to the step's, the sparsity decrease that resets
# the step size, the step size divisor and range, and the checkpoint spacing
L1_START_FRACTION = 0.2
L1_SPARSITY_DIVISOR = 1.5
L1_SPARSER = 0.95
L1_STEP_DIVISOR = 1.5
L1_MIN_STEP = 0.1  # times eps
L1_CHECK_PCT = 4  # percent of the iterations of the run
# AutoAttack's l1 schedule: radii (times eps) and percent of the iterations
LARGE_EPS = ((3.0, 30), (2.0, 30), (1.0, 40))


def large_eps_stages(eps: float, steps: int) -> list[tuple[float, int]]:
    """(radius, iterations) of the l1 schedule: 3, 2, 1 x eps over ceil(30 %), ceil(30 %), rest.

    The last radius (eps itself) always gets at least one iteration, so the run ends inside
    the threat model.
    """
    counts: list[int] = []
    for _, pct in LARGE_EPS[:-1]:  # exact ceil in integers, leaving >= 1 for the last radius
        counts.append(min(-(-pct * steps // 100), steps - 1 - sum(counts)))
    counts.append(steps - sum(counts))
    return [(k * eps, n) for (k, _), n in zip(LARGE_EPS, counts, strict=True) if n > 0]


def l1_check_every(steps: int) -> int:
    """Iterations between two l1-APGD checkpoints in a run of ``steps``: floor(4 %), >= 1."""
    return max(L1_CHECK_PCT * steps // 100, 1)


def _whole(name: str, value: object, low: int, attack: str) -> None:
    """Refuse a count that is not a whole number >= low."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RobustlabError(f"{attack} needs {name} >= {low} (a whole number), got {value!r}")


def _fraction(name: str, value: float, attack: str, closed_top: bool = False) -> None:
    """Refuse a fraction outside (0, 1) or (0, 1]."""
    ok = 0 < value <= 1 if closed_top else 0 < value < 1
    if not ok:
        where = "in (0, 1]" if closed_top else "strictly between 0 and 1"
        raise RobustlabError(f"{attack} needs {name} {where}, got {value!r}")


def _check_large_eps(norm: str, large_eps: bool, attack: str) -> None:
    """The large-eps schedule is an l1 device; refuse it elsewhere."""
    if large_eps and norm != "l1":
        raise RobustlabError(f"{attack}: large_eps is the l1 schedule; norm '{norm}' has none")


def _check_settings(attack: APGD | APGDT, name: str) -> None:
    """Refuse settings of APGD or APGD-T that the algorithm cannot run, one sentence each."""
    ThreatModel(attack.norm, attack.eps)
    _whole("steps", attack.steps, 1, name)
    _whole("restarts", attack.restarts, 1, name)
    _whole("eot_iter", attack.eot_iter, 1, name)
    _fraction("rho", attack.rho, name)
    _fraction("momentum", attack.momentum, name, closed_top=True)
    _check_large_eps(attack.norm, attack.large_eps, name)


@register("apgd-ce", loss="ce")
@register("apgd-dlr", loss="dlr")
@dataclass(frozen=True)
class APGD(Attack):
    """Auto-PGD (Croce & Hein 2020) with the published defaults: 100 steps, rho = momentum = 0.75.

    ``loss`` is ce, dlr, cw or a callable ``(logits, y, targets) -> per-sample loss``;
    ``momentum`` is the weight of the new step (``1 - momentum`` goes to the previous one;
    linf and l2 only, l1-APGD has none); ``eot_iter > 1`` averages that many gradients per
    step (AutoAttack's 'rand' version); ``large_eps`` (l1 only) runs the 3/2/1 x eps
    schedule of AutoAttack's l1 version. With ``targets`` the loss is the targeted one and
    success means reaching the target.
    """

    norm: str = "linf"
    eps: float = 0.3
    steps: int = 100
    restarts: int = 1
    loss: str | Loss = "ce"
    rho: float = 0.75
    momentum: float = 0.75
    eot_iter: int = 1
    seed: int = 0
    large_eps: bool = False

    name: ClassVar[str] = "apgd"

    def __post_init__(self) -> None:
        _check_settings(self, "apgd")
        get_loss(self.loss)

    def config(self) -> dict[str, Any]:
        """The full configuration, for result records."""
        return {**super().config(), "loss": loss_name(self.loss)}

    def run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """APGD on a model already in the state to attack (eval mode, frozen parameters)."""
        engine = _engine(self, x)
        loss_fn = get_loss(self.loss)
        with torch.no_grad():
            hit = success(model(x), y, targets) if len(x) else y.new_zeros(0, dtype=torch.bool)
        best = Best(x, unbroken(hit))

        def attempt(todo: torch.Tensor, _: int) -> Candidates:
            """One APGD run on the samples ``todo``."""
            ts = None if targets is None else targets[todo]
            return [engine.candidate(model, x[todo], y[todo], ts, ts, loss_fn)]

        return run_restarts(best, self.restarts, attempt).x


@register("apgd-t")
@dataclass(frozen=True)
class APGDT(Attack):
    """APGD-T: APGD on the targeted DLR loss, target by target (published defaults).

    Untargeted use (``targets=None``): for k = 1 .. n_target_classes (at most the number of
    other classes), target the k-th largest non-true logit at the clean input, on the
    samples not yet misclassified; success means misclassified. With explicit ``targets``,
    exactly those are attacked and success means classified as the target. ``large_eps``
    (l1 only) as in :class:`APGD`.
    """

    norm: str = "linf"
    eps: float = 0.3
    steps: int = 100
    restarts: int = 1
    n_target_classes: int = 9
    rho: float = 0.75
    momentum: float = 0.75
    eot_iter: int = 1
    seed: int = 0
    large_eps: bool = False

    name: ClassVar[str] = "apgd-t"

    def __post_init__(self) -> None:
        _check_settings(self, "apgd-t")
        _whole("n_target_classes", self.n_target_classes, 1, "apgd-t")

    def config(self) -> dict[str, Any]:
        """The full configuration, for result records."""
        return {**super().config(), "loss": "dlr-targeted"}

    def run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """APGD-T on a model already in the state to attack (eval mode, frozen parameters)."""
        engine = _engine(self, x)
        if len(x) == 0:
            return x.clone()
        with torch.no_grad():
            logits = model(x)
        best = Best(x, unbroken(success(logits, y, targets)))
        classes = logits.shape[1]
        if classes < 4:
            raise RobustlabError(
                f"apgd-t uses the targeted DLR loss, which needs at least 4 classes; "
                f"the model has {classes}"
            )
        if targets is None:
            # non-true classes by clean logit, largest first
            masked = logits.scatter(1, y[:, None], float("-inf"))
            ranked = masked.sort(dim=1, descending=True, stable=True).indices
            rounds = min(self.n_target_classes, classes - 1)
        else:
            ranked, rounds = targets[:, None], 1
        for k in range(rounds):

            def attempt(todo: torch.Tensor, _: int, k: int = k) -> Candidates:
                """One APGD run on the samples ``todo`` toward their k-th target."""
                goal = ranked[todo, k]
                hit_goal = None if targets is None else goal
                return [engine.candidate(model, x[todo], y[todo], goal, hit_goal, dlr)]

            run_restarts(best, self.restarts, attempt)
        return best.x


def _engine(attack: APGD | APGDT, like: torch.Tensor) -> _Engine:
    """The run engine of an APGD or APGD-T configuration."""
    return _Engine(
        attack.threat,
        attack.steps,
        attack.rho,
        attack.momentum,
        attack.eot_iter,
        attack.seed,
        like,
        attack.large_eps,
    )


def _l0(delta: torch.Tensor) -> torch.Tensor:
    """Per sample, the number of nonzero coordinates."""
    return delta.flatten(1).ne(0).sum(dim=1)


def _sparse_step(grad: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """sign(g) on each sample's ``count`` largest |g_i| (ties at the threshold included), unit l1.

    Coordinates with a zero gradient never move; a sample with a zero gradient gets a zero step.
    """
    flat = grad.flatten(1)
    mag = flat.abs()
    top = mag.topk(int(count.max()), dim=1).values
    threshold = top.gather(1, (count - 1)[:, None])
    step = torch.where((mag >= threshold) & (mag > 0), flat.sign(), 0.0)
    return (step / step.abs().sum(dim=1, keepdim=True).clamp_min(1)).view_as(grad)


@dataclass
class _State:
    """Per-sample state of the samples still iterated; ``keep`` drops the others."""

    pos: torch.Tensor  # position in the run's batch
    x: torch.Tensor
    y: torch.Tensor
    goal: torch.Tensor | None  # targets of the loss
    hit_goal: torch.Tensor | None  # targets of the success test (None: misclassified)
    ctl: APGDControl  # points, gradients, losses, step sizes
    count: torch.Tensor | None = None  # l1: coordinates the step moves
    sparsity: torch.Tensor | None = None  # l1: ||x_max - x||_0 at the last checkpoint

    def keep(self, mask: torch.Tensor) -> None:
        """Keep only the samples where ``mask`` holds."""
        self.ctl.keep(mask)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                setattr(self, f.name, value[mask])


class _Engine:
    """One APGD run at a time; the random starts of successive runs come from one generator."""

    def __init__(
        self,
        threat: ThreatModel,
        steps: int,
        rho: float,
        momentum: float,
        eot_iter: int,
        seed: int,
        like: torch.Tensor,
        large_eps: bool = False,
    ) -> None:
        self.threat, self.steps, self.rho = threat, steps, rho
        self.momentum, self.eot_iter = momentum, eot_iter
        self.generator = torch.Generator(device=like.device).manual_seed(seed)
        self.l1 = threat.norm == "l1"
        self.marks = [] if self.l1 else checkpoints(steps)  # l1-APGD checks every l1_check_every
        self.stages = large_eps_stages(threat.eps, steps) if large_eps else [(threat.eps, steps)]

    def candidate(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        goal: torch.Tensor | None,
        hit_goal: torch.Tensor | None,
        loss_fn: Loss,
    ) -> tuple[torch.Tensor, Standing]:
        """One run's answer per sample (successful or highest-loss point) and its standing."""
        found = self.run(model, x, y, goal, hit_goal, loss_fn)
        return found.x, found.standing

    def run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        goal: torch.Tensor | None,
        hit_goal: torch.Tensor | None,
        loss_fn: Loss,
    ) -> Best:
        """Per sample: the successful point, else the highest-loss one (with its standing).

        l1 stages: each later stage runs on the samples not yet successful, from the earlier
        stage's point, and its answer replaces that one (a point of a wider stage may lie
        outside the threat model, so it is not kept for its loss).
        """
        if not self.l1:
            x0 = self.threat.random_start(x, self.generator)
            return self._run(model, self.threat, self.steps, x, y, goal, hit_goal, loss_fn, x0)
        noise = torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        start, staged = x + noise, len(self.stages) > 1
        out = Best(x, unbroken(torch.zeros(len(x), dtype=torch.bool, device=x.device)))
        for radius, steps in self.stages:
            todo = out.todo()
            if len(todo) == 0:
                break
            threat = ThreatModel("l1", radius)
            found = self._run(
                model,
                threat,
                steps,
                x[todo],
                y[todo],
                None if goal is None else goal[todo],
                None if hit_goal is None else hit_goal[todo],
                loss_fn,
                threat.project(x[todo], start[todo]),
                staged,
            )
            out.x[todo] = found.x
            out.standing.put(todo, found.standing, torch.ones_like(todo, dtype=torch.bool))
            start = out.x
        return out

    def _run(
        self,
        model: nn.Module,
        threat: ThreatModel,
        steps: int,
        x: torch.Tensor,
        y: torch.Tensor,
        goal: torch.Tensor | None,
        hit_goal: torch.Tensor | None,
        loss_fn: Loss,
        x0: torch.Tensor,
        from_start: bool = False,
    ) -> Best:
        """One run of ``steps`` iterations from ``x0`` inside ``threat``.

        Per sample: the first successful point, else the highest-loss one. Success needs
        the point inside this attack's own threat model (an l1 stage may use a larger
        radius). ``from_start``: l1 sparsity bookkeeping starts from ``x0``'s sparsity.
        """
        wider = threat.eps > self.threat.eps
        loss0, grad0, hit0 = self._evaluate(model, x0, x, y, goal, hit_goal, loss_fn, True, wider)
        out = Best(x0, strongest(hit0, loss0))
        n, eps = len(x), threat.eps
        s = _State(
            pos=torch.arange(n, device=x.device),
            x=x,
            y=y,
            goal=goal,
            hit_goal=hit_goal,
            ctl=APGDControl.start(
                x0,
                loss0,
                grad0,
                first_step(threat.norm, eps),
                self.marks,
                self.rho,
                None if self.l1 else self.momentum,
            ),
        )
        every = l1_check_every(steps)
        if self.l1:
            d = x[0].numel() if n else 1
            if from_start:
                s.sparsity = _l0(x0 - x)
                s.count = torch.ceil(s.sparsity / L1_SPARSITY_DIVISOR).long().clamp(1, d)
            else:
                s.sparsity = torch.full((n,), d, dtype=torch.long, device=x.device)
                s.count = torch.full_like(s.sparsity, max(math.ceil(L1_START_FRACTION * d), 1))
        s.keep(~hit0)
        ctl = s.ctl
        for i in range(steps):
            if len(s.pos) == 0:
                break
            with torch.no_grad():
                if self.l1:
                    assert s.count is not None
                    ctl.step(threat, s.x, _sparse_step(ctl.grad, s.count))
                else:
                    ctl.step(threat, s.x, threat.steepest_step(ctl.grad))
            last = i + 1 == steps
            loss, grad, hit = self._evaluate(
                model, ctl.cur, s.x, s.y, s.goal, s.hit_goal, loss_fn, not last, wider
            )
            with torch.no_grad():
                ctl.record(loss, grad)
                any_hit = bool(hit.any())
                if any_hit:  # a successful point is final
                    won = s.pos[hit]
                    out.offer(ctl.cur[hit], strongest(hit[hit], loss[hit]), won)
                if not last:
                    if self.l1 and (i + 1) % every == 0:
                        self._l1_checkpoint(s, eps)
                    elif not self.l1:
                        ctl.checkpoint()
                if any_hit:  # early stop
                    s.keep(~hit)
        out.offer(
            ctl.best_x, strongest(torch.zeros_like(s.pos, dtype=torch.bool), ctl.best_loss), s.pos
        )
        return out

    def _l1_checkpoint(self, s: _State, eps: float) -> None:
        """l1-APGD: step sparsity from the best point; reset or shrink the step size."""
        assert s.sparsity is not None
        ctl, d = s.ctl, s.x[0].numel()
        sparsity = _l0(ctl.best_x - s.x)
        sparser = sparsity < L1_SPARSER * s.sparsity
        s.count = torch.ceil(sparsity / L1_SPARSITY_DIVISOR).long().clamp(1, d)
        ctl.eta = torch.where(sparser, eps, ctl.eta / L1_STEP_DIVISOR).clamp(L1_MIN_STEP * eps, eps)
        s.sparsity = sparsity
        ctl.resume_best(sparser)

    def _evaluate(
        self,
        model: nn.Module,
        x_adv: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        goal: torch.Tensor | None,
        hit_goal: torch.Tensor | None,
        loss_fn: Loss,
        need_grad: bool,
        wider: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean loss and gradient over ``eot_iter`` passes, and success on every pass.

        ``wider``: the point may lie outside this attack's threat model, where it does not
        count as a success.
        """
        total = torch.zeros(len(x_adv), device=x_adv.device)
        grad = torch.zeros_like(x_adv)
        hit = torch.ones(len(x_adv), dtype=torch.bool, device=x_adv.device)
        for _ in range(self.eot_iter):
            with torch.set_grad_enabled(need_grad):
                xg = x_adv.detach().requires_grad_(need_grad)
                logits = model(xg)
                losses = loss_fn(logits, y, goal)
                if need_grad and losses.requires_grad:
                    g = torch.autograd.grad(losses.sum(), xg, allow_unused=True)[0]
                    if g is not None:
                        grad += g
            total += losses.detach().float()
            hit &= success(logits.detach(), y, hit_goal)
        if wider:
            hit &= self.threat.contains(x, x_adv, tol=0.0)
        grad = torch.nan_to_num(grad / self.eot_iter, nan=0.0, posinf=0.0, neginf=0.0)
        return total / self.eot_iter, grad, hit

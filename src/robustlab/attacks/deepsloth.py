"""DeepSloth (Hong et al., ICLR 2021): slowdown attacks on multi-exit networks, and baselines.

An input leaves a multi-exit network at the first internal classifier (IC) whose confidence
reaches the threshold q. DeepSloth perturbs inputs (inside a linf, l2 or l1 ball) so that no
IC is confident and every input runs to the final exit, wiping out the saved computation.

Objectives (per sample; the attack *minimises* them, the final exit is never part of them):

- ``uniform`` (the paper's): sum over ICs of CE(uniform, p_k) = -mean_c log p_k,c, which
  pushes every IC toward the uniform distribution. Defeats max-softmax and entropy rules.
- ``threshold`` (ours): aware of the exit rule and threshold q, a hinge on each
  IC's confidence above q: sum_k relu(log conf_k - log q + margin) with conf the max softmax
  (or 1 - normalised entropy for the entropy rule), plus 1e-3 x the uniform objective as a tie
  breaker. Effort goes to the ICs that would still let the input leave; those already below
  the threshold (by the margin) are left alone instead of being flattened further.
- ``cost`` (ours, the default): the expected fraction of the cost saved under soft exit
  decisions (each IC's exit probability a sigmoid of log conf - log q), plus 0.1 x the
  ``threshold`` objective. It weighs each IC by what its exit saves and by the chance the
  input is still there. On a 9-IC resnet20 on mnist5k (linf 0.1, 50 steps, 100 points):
  efficacy drop 37.8 % vs 35.9 % (``threshold``) and 18.1 % (the paper's ``uniform``/pgd).

Optimisers: ``pgd`` (steepest-descent steps of fixed size, the paper's; linf 30 signed steps)
or ``apgd`` (APGD's step-size control, Croce & Hein 2020, the one of :class:`APGD`:
momentum 0.75, the step size halved per sample at checkpoints when progress stalls, the
next step from the best point with its gradient; for l1 with steepest l1 steps, not
l1-APGD's sparse ones). Every iterate is offered to :class:`~robustlab.attacks.restarts.Best`
under the efficiency criterion (:func:`~robustlab.core.criteria.slowest`): per sample, the
example that reaches the latest exit (then the lowest objective) is kept. The first descent
runs on every input; restarts only on those not yet running to the final exit.

Variants: per-sample (:class:`DeepSloth`), universal (one perturbation for all inputs,
:func:`universal_perturbation`) and class-universal (one per class). Baselines
(:class:`ExitPGD`): PGD on the final exit's CE, on the CE averaged over every exit, and on
the per-sample maximum CE over exits (PGD-max). Black-box: craft on a surrogate multi-exit
network, apply to the victim (any example stays in the threat model).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.checks import check_batch
from ..core.criteria import slowest
from ..core.guard import frozen_eval
from ..core.threat import ThreatModel, column
from ..errors import RobustlabError
from ..models.multiexit import MultiExitNetwork, check_threshold, confidence, first_exit
from .base import Attack
from .optim import APGDControl, SteepestStep, ascend, checkpoints, first_step, iterates
from .registry import register
from .restarts import Best, Candidates, run_restarts

OBJECTIVES = ("uniform", "threshold", "cost")
OPTIMIZERS = ("pgd", "apgd")
BASELINES = ("final", "avg", "max")


def _multi_exit(model: nn.Module) -> MultiExitNetwork:
    """The model as a multi-exit network, or one clear sentence why not."""
    if not isinstance(model, MultiExitNetwork):
        raise RobustlabError(
            "slowdown attacks need a multi-exit network (see robustlab exits), "
            f"got a {type(model).__name__}"
        )
    return model


def _untargeted(name: str, targets: torch.Tensor | None) -> None:
    """Slowdown attacks and their baselines have no target classes: refuse targets, never ignore."""
    if targets is not None:
        raise RobustlabError(f"{name} takes no target labels: it attacks the exits, not a class")


def uniform_objective(ic_logits: list[torch.Tensor]) -> torch.Tensor:
    """Per sample, sum over ICs of CE(uniform, softmax): the paper's objective (to minimise)."""
    return torch.stack([-F.log_softmax(z, dim=1).mean(dim=1) for z in ic_logits]).sum(0)


def threshold_objective(
    ic_logits: list[torch.Tensor], threshold: float, rule: str, margin: float
) -> torch.Tensor:
    """Per sample, sum over ICs of relu(log confidence - log q + margin) (+ a small uniform term)."""
    log_q = math.log(threshold)
    parts = []
    for z in ic_logits:
        if rule == "max_softmax":
            log_conf = F.log_softmax(z, dim=1).amax(dim=1)
        else:
            log_conf = confidence(z, rule).clamp_min(1e-12).log()
        parts.append(F.relu(log_conf - log_q + margin))
    return torch.stack(parts).sum(0) + 1e-3 * uniform_objective(ic_logits)


def cost_objective(
    ic_logits: list[torch.Tensor],
    threshold: float,
    rule: str,
    savings: list[float],
    temperature: float = 0.1,
) -> torch.Tensor:
    """Per sample, the expected fraction of the cost saved under soft exit decisions.

    IC k lets an input leave with probability s_k = sigmoid((log conf_k - log q) / T); the
    input leaves at k with probability s_k * prod_{j<k} (1 - s_j) and then saves
    ``savings[k]`` (1 - normalised cost of exit k). Minimising it works on the ICs that decide
    where the input leaves, in proportion to what each saves.
    """
    log_q = math.log(threshold)
    stay = torch.ones(len(ic_logits[0]), device=ic_logits[0].device)
    total = torch.zeros_like(stay)
    for z, saving in zip(ic_logits, savings, strict=True):
        if rule == "max_softmax":
            log_conf = F.log_softmax(z, dim=1).amax(dim=1)
        else:
            log_conf = confidence(z, rule).clamp_min(1e-12).log()
        leave = torch.sigmoid((log_conf - log_q) / temperature)
        total = total + stay * leave * saving
        stay = stay * (1 - leave)
    return total


def sloth_objective(
    model: MultiExitNetwork,
    x: torch.Tensor,
    objective: str,
    threshold: float,
    rule: str,
    margin: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample objective (to minimise) and the exit each input now takes."""
    outs = model.all_exits(x)
    ics = outs[:-1]
    if objective == "uniform":
        loss = uniform_objective(ics)
    elif objective == "cost":
        costs = model.exit_costs()
        savings = [1 - c / costs[-1] for c in costs[:-1]]
        loss = cost_objective(ics, threshold, rule, savings) + 0.1 * threshold_objective(
            ics, threshold, rule, margin
        )
    else:
        loss = threshold_objective(ics, threshold, rule, margin)
    with torch.no_grad():
        scores = torch.stack([confidence(z.detach(), rule) for z in ics], dim=1)
        exits = first_exit(scores, threshold)
    return loss, exits


@register("deepsloth", kind="multi-exit")
@dataclass(frozen=True)
class DeepSloth(Attack):
    """Per-sample DeepSloth; ``threshold``/``rule`` default to the model's calibrated ones."""

    norm: str = "linf"
    eps: float = 0.1
    steps: int = 100
    alpha: float | None = None
    objective: str = "cost"
    optimizer: str = "apgd"
    restarts: int = 1
    margin: float = 0.1
    threshold: float | None = None
    rule: str | None = None
    random_start: bool = False
    seed: int = 0

    name: ClassVar[str] = "deepsloth"

    def __post_init__(self) -> None:
        ThreatModel(self.norm, self.eps)
        if self.objective not in OBJECTIVES:
            raise RobustlabError(
                f"unknown DeepSloth objective '{self.objective}'; use {' or '.join(OBJECTIVES)}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise RobustlabError(
                f"unknown DeepSloth optimizer '{self.optimizer}'; use {' or '.join(OPTIMIZERS)}"
            )
        if self.steps < 1 or self.restarts < 1:
            raise RobustlabError("DeepSloth needs steps >= 1 and restarts >= 1")
        if self.alpha is not None and not self.alpha > 0:
            raise RobustlabError(f"DeepSloth step size alpha must be > 0, got {self.alpha}")
        if self.threshold is not None:
            check_threshold(self.threshold)
        if not self.margin >= 0:
            raise RobustlabError(f"DeepSloth margin must be >= 0, got {self.margin}")

    @property
    def variant(self) -> str:
        """A short name of this configuration, e.g. deepsloth-threshold-apgd."""
        return f"deepsloth-{self.objective}-{self.optimizer}"

    def config(self) -> dict[str, Any]:
        """The full configuration, for result records."""
        return {**super().config(), "variant": self.variant, "step_size": self._alpha()}

    def _alpha(self) -> float:
        if self.alpha is not None:
            return self.alpha
        if self.optimizer == "apgd":
            return first_step(self.norm, self.eps)
        return 2.5 * self.eps / self.steps

    def run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attack proper, on a model already in eval mode with frozen parameters."""
        _untargeted("DeepSloth", targets)
        net = _multi_exit(model)
        q = net.threshold if self.threshold is None else self.threshold
        rule = self.rule or net.rule
        threat, final = self.threat, net.num_exits - 1
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        with torch.no_grad():
            loss0, exit0 = sloth_objective(net, x, self.objective, q, rule, self.margin)
        best = Best(x, slowest(exit0, final, loss0))
        descend = self._pgd if self.optimizer == "pgd" else self._apgd

        def attempt(todo: torch.Tensor, r: int) -> Candidates:
            """One descent on the samples ``todo``, offering every iterate."""
            xs = x[todo]
            start = threat.random_start(xs, gen) if (self.random_start or r > 0) else xs.clone()
            for x_adv, loss, exits in descend(net, xs, start, threat, q, rule):
                yield x_adv, slowest(exits, final, loss)

        # the first descent runs on every input, also those already at the final exit: a
        # lower objective still helps (transfer to other models, exit training on them)
        return run_restarts(best, self.restarts, attempt, first_on_all=True).x

    def _pgd(
        self,
        net: MultiExitNetwork,
        x: torch.Tensor,
        start: torch.Tensor,
        threat: ThreatModel,
        q: float,
        rule: str,
    ) -> Any:
        """Fixed-size steepest-descent steps; yields every iterate with its objective and exit."""
        return iterates(
            lambda z: sloth_objective(net, z, self.objective, q, rule, self.margin),
            x,
            start,
            threat,
            SteepestStep(self._alpha()),
            self.steps,
            minimize=True,
        )

    def _apgd(
        self,
        net: MultiExitNetwork,
        x: torch.Tensor,
        start: torch.Tensor,
        threat: ThreatModel,
        q: float,
        rule: str,
    ) -> Any:
        """APGD's step-size control (:class:`~robustlab.attacks.optim.APGDControl`) descending
        the objective; yields every iterate with its objective and exit."""

        def evaluate(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            z = z.detach().requires_grad_(True)
            loss, exits = sloth_objective(net, z, self.objective, q, rule, self.margin)
            grad = torch.autograd.grad(loss.sum(), z)[0]
            return loss.detach(), exits, grad

        x_cur = start.detach()
        loss, exits, grad = evaluate(x_cur)
        yield x_cur, loss, exits
        ctl = APGDControl.start(x_cur, -loss, -grad, self._alpha(), checkpoints(self.steps))
        for _ in range(self.steps):
            with torch.no_grad():
                x_next = ctl.step(threat, x, threat.steepest_step(ctl.grad))
            loss, exits, grad = evaluate(x_next)
            yield x_next, loss, exits
            with torch.no_grad():
                ctl.record(-loss, -grad)
                ctl.checkpoint()


@register("pgd-final", kind="multi-exit", target="final")
@register("pgd-avg", kind="multi-exit", target="avg")
@register("pgd-max", kind="multi-exit", target="max")
@dataclass(frozen=True)
class ExitPGD(Attack):
    """PGD maximising cross-entropy on the final exit, averaged over exits, or the max over exits."""

    norm: str = "linf"
    eps: float = 0.1
    steps: int = 30
    alpha: float | None = None
    target: str = "avg"
    seed: int = 0

    name: ClassVar[str] = "exit-pgd"

    def __post_init__(self) -> None:
        ThreatModel(self.norm, self.eps)
        if self.target not in BASELINES:
            raise RobustlabError(
                f"unknown exit PGD target '{self.target}'; use one of {', '.join(BASELINES)}"
            )
        if self.steps < 1:
            raise RobustlabError("exit PGD needs steps >= 1")

    @property
    def variant(self) -> str:
        """pgd-final, pgd-avg or pgd-max."""
        return f"pgd-{self.target}"

    def run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """PGD from a random start on the chosen exit objective."""
        _untargeted(f"exit PGD ({self.variant})", targets)
        net = _multi_exit(model)
        threat = self.threat
        alpha = self.alpha if self.alpha is not None else 2.5 * self.eps / self.steps
        gen = torch.Generator(device=x.device).manual_seed(self.seed)

        def objective(z: torch.Tensor) -> torch.Tensor:
            """Per-sample cross-entropy of the chosen exits: the final one, their mean or max."""
            outs = net.all_exits(z)
            ce = torch.stack([F.cross_entropy(o, y, reduction="none") for o in outs], 1)
            if self.target == "final":
                return ce[:, -1]
            return ce.mean(1) if self.target == "avg" else ce.amax(1)

        start = threat.random_start(x, gen)
        return ascend(objective, x, start, threat, SteepestStep(alpha), self.steps)


def universal_perturbation(
    model: nn.Module,
    x: torch.Tensor,
    *,
    norm: str = "linf",
    eps: float = 0.1,
    epochs: int = 10,
    batch_size: int = 128,
    alpha: float | None = None,
    objective: str = "threshold",
    margin: float = 0.1,
    threshold: float | None = None,
    rule: str | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """One perturbation (1, C, H, W) for every input, crafted on ``x``: apply with :func:`apply`.

    Minibatch steepest descent on the mean objective over ``x``, projected onto the eps ball;
    the step size decays linearly. ``apply`` clips x + delta into [0,1], which never leaves
    the ball.
    """
    net = _multi_exit(model)
    check_batch(x, torch.zeros(len(x), dtype=torch.long, device=x.device), None)
    threat = ThreatModel(norm, eps)
    if objective not in OBJECTIVES:
        raise RobustlabError(f"unknown DeepSloth objective '{objective}'")
    if epochs < 1 or batch_size < 1:
        raise RobustlabError("a universal perturbation needs epochs >= 1 and batch size >= 1")
    q = check_threshold(net.threshold if threshold is None else threshold)
    rule = rule or net.rule
    step = alpha if alpha is not None else eps / 4
    gen = torch.Generator(device="cpu").manual_seed(seed)
    delta = torch.zeros(1, *x.shape[1:], device=x.device, dtype=x.dtype)
    total = epochs * math.ceil(len(x) / batch_size)
    k = 0
    with frozen_eval(net, warn_train_mode=False):
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=gen).to(x.device)
            for b in range(0, len(x), batch_size):
                xb = x[perm[b : b + batch_size]]
                d = delta.detach().requires_grad_(True)
                loss, _ = sloth_objective(net, apply(xb, d), objective, q, rule, margin)
                grad = torch.autograd.grad(loss.mean(), d)[0]
                lr = step * (1 - k / total) + 1e-3 * step
                delta = project_ball(d.detach() - lr * threat.steepest_step(grad), norm, eps)
                k += 1
    return delta


def project_ball(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Euclidean projection of each perturbation onto the eps ball of the norm (no box)."""
    flat = delta.flatten(1)
    if norm == "linf":
        return delta.clamp(-eps, eps)
    if norm == "l2":
        norms: torch.Tensor = flat.norm(dim=1)
        scale = (eps / norms.clamp_min(1e-12)).clamp(max=1.0)
        return delta * column(scale, delta)
    # l1 (Duchi et al. 2008): soft-threshold |delta| by the theta that puts it on the sphere
    a = flat.abs()
    inside = a.sum(dim=1) <= eps
    u = a.sort(dim=1, descending=True).values
    css = u.cumsum(dim=1)
    j = torch.arange(1, u.shape[1] + 1, device=u.device, dtype=u.dtype)
    rho = ((u - (css - eps) / j) > 0).sum(dim=1).clamp_min(1)
    theta = (css.gather(1, (rho - 1)[:, None]) - eps) / rho[:, None].to(u.dtype)
    out = flat.sign() * (a - theta).clamp_min(0)
    return torch.where(inside[:, None], flat, out).view(delta.shape)


def apply(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Inputs plus a (universal) perturbation, clipped into [0,1]."""
    return (x + delta).clamp(0.0, 1.0)


def class_universal_perturbations(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    classes: Iterable[int] | None = None,
    **options: Any,
) -> torch.Tensor:
    """One universal perturbation per class (num_classes, C, H, W), each crafted on its class
    alone (so each is the same whichever others are crafted). ``classes``: craft only these
    (default: every class); the others stay zero."""
    deltas = torch.zeros(num_classes, *x.shape[1:], device=x.device, dtype=x.dtype)
    for c in range(num_classes) if classes is None else classes:
        mine = y == c
        if bool(mine.any()):
            deltas[c] = universal_perturbation(model, x[mine], **options)[0]
    return deltas

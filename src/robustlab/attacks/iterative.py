"""The one gradient engine of the FGSM / PGD family, and PGD's cousins FGSM / BIM / MI / DI / TI.

:class:`IterativeAttack` is the engine; FGSM, BIM (I-FGSM), MI-FGSM, DI-FGSM, TI-FGSM and
PGD (:mod:`robustlab.attacks.pgd`) are presets of it. Each step is::

    g    = grad_x loss(model(DI(x_adv)))          # DI: random resize-and-pad (Xie et al. 2019)
    g    = gaussian * g                            # TI: depthwise smoothing (Dong et al. 2019)
    m    = decay * m + g / ||g||_1                 # MI: momentum (Dong et al. 2018), if decay > 0
    x_adv = project(x_adv + alpha * steepest(m))   # sign for linf, g / ||g||_2 for l2

Any combination is one configuration (``decay=1, diversity_prob=0.5, ti_kernel=7`` is
TI-DIM). The gradient is taken through the model by autograd, so gradient transforms
installed on a surrogate (SGM backward scaling, LinBP) compose with all of these. The
steps go through :func:`~robustlab.attacks.optim.ascend` with the step rules of
:mod:`robustlab.attacks.optim`. By default the LAST iterate is returned (transfer attacks do
not pick the best point on the surrogate); ``returns="best"`` (PGD) keeps, per sample, the
first successful iterate, else the highest-loss one, over restarts. Either is inside the
threat model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.criteria import strongest, success, unbroken
from ..core.threat import ThreatModel
from ..errors import RobustlabError
from .base import Attack
from .losses import Loss, get_loss, loss_name
from .optim import Iterate, MomentumStep, Objective, SteepestStep, StepRule, ascend, iterates
from .registry import register
from .restarts import Best, Candidates, run_restarts
from .surrogate import Ensemble

#: What the engine returns: the last iterate, or per sample the best point over restarts.
RETURNS = ("last", "best")


def input_diversity(
    x: torch.Tensor, prob: float, resize_rate: float, generator: torch.Generator
) -> torch.Tensor:
    """DI (Xie et al. 2019): with probability ``prob``, shrink the batch and zero-pad it back.

    The (N, C, H, W) batch is resized (bilinear, differentiable) to a random h x w with
    h uniform in [max(1, floor(resize_rate * H)), H] and w = round(h * W / H) (aspect kept),
    then zero-padded at a random offset back to H x W, so the shape never changes and any
    model accepts the result. One transform per call for the whole batch, as in the
    reference code. ``prob == 0`` returns ``x`` itself and draws no random numbers.
    """
    if prob <= 0:
        return x
    if float(torch.rand((), generator=generator, device=generator.device)) >= prob:
        return x
    height, width = x.shape[-2:]
    low = max(1, int(resize_rate * height))
    h = int(torch.randint(low, height + 1, (), generator=generator, device=generator.device))
    w = min(width, max(1, round(h * width / height)))
    top = int(torch.randint(0, height - h + 1, (), generator=generator, device=generator.device))
    left = int(torch.randint(0, width - w + 1, (), generator=generator, device=generator.device))
    small = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return F.pad(small, (left, width - w - left, top, height - h - top), value=0.0)


def gaussian_kernel(size: int, sigma: float | None = None) -> torch.Tensor:
    """A normalised ``size x size`` Gaussian; ``sigma`` defaults to (size - 1) / 6.

    The default makes the kernel span +-3 sigma, as the TI reference code (``nsig = 3``).
    """
    sigma = (size - 1) / 6 if sigma is None else sigma
    if size == 1 or sigma == 0:
        kernel = torch.zeros(size, size, dtype=torch.float64)
        kernel[size // 2, size // 2] = 1.0
        return kernel
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = torch.outer(g, g)
    return kernel / kernel.sum()


def smooth_gradient(grad: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """TI (Dong et al. 2019): convolve each channel of an (N, C, H, W) gradient with ``kernel``.

    Zero padding keeps the spatial size ('same' convolution), as the reference code.
    """
    channels, size = grad.shape[1], kernel.shape[-1]
    weight = kernel.to(grad).expand(channels, 1, size, size)
    return F.conv2d(grad, weight, padding=size // 2, groups=channels)


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    targets: torch.Tensor | None,
    loss: str | Loss,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss and logits at ``x``: an ensemble's own objective, else loss(model(x))."""
    if isinstance(model, Ensemble):
        return model.evaluate(x, y, targets, loss)
    logits = model(x)
    return get_loss(loss)(logits, y, targets), logits


@register("iterative", kind="surrogate", aliases=("surrogate-iterative",))
@dataclass(frozen=True)
class IterativeAttack(Attack):
    """The one gradient engine of the FGSM / PGD family: every preset is a configuration of it.

    ``alpha`` defaults to eps / steps. ``decay`` > 0 turns on momentum over l1-normalised
    gradients; ``diversity_prob`` > 0 turns on DI with ``resize_rate`` in (0, 1];
    ``ti_kernel`` >= 1 (odd) turns on TI with a Gaussian of std ``ti_sigma`` (default
    (ti_kernel - 1) / 6); 0 turns it off. All randomness (random start, DI) comes from a
    generator seeded by ``seed``.

    ``returns`` says which point comes back:

    - ``"last"`` (transfer attacks): the last iterate of one run from the start point,
      for every sample; ``restarts`` must be 1.
    - ``"best"`` (PGD): per sample, the first iterate the model misclassifies (or assigns
      to its target), else the one of highest loss, over ``restarts`` runs; each restart
      (from a new random start when ``random_start``) attacks only the samples not yet
      broken, and samples the model already gets wrong are returned unchanged. With DI on,
      success and loss are judged on the untransformed iterate (one more forward pass).

    On an :class:`~robustlab.attacks.surrogate.Ensemble` the objective is the ensemble's own
    (:meth:`Ensemble.evaluate`): with ``combine="loss"`` the members' mean loss.
    """

    norm: str = "linf"
    eps: float = 8 / 255
    steps: int = 10
    alpha: float | None = None
    decay: float = 0.0
    diversity_prob: float = 0.0
    resize_rate: float = 0.9
    ti_kernel: int = 0
    ti_sigma: float | None = None
    random_start: bool = False
    loss: str | Loss = "ce"
    seed: int = 0
    restarts: int = 1
    returns: str = "last"

    name: ClassVar[str] = "iterative"

    def __post_init__(self) -> None:
        ThreatModel(self.norm, self.eps)
        if self.steps < 1:
            raise RobustlabError(f"the attack needs steps >= 1, got {self.steps}")
        if self.restarts < 1:
            raise RobustlabError(f"the attack needs restarts >= 1, got {self.restarts}")
        if self.returns not in RETURNS:
            raise RobustlabError(
                f"returns must be one of {', '.join(RETURNS)}, got '{self.returns}'"
            )
        if self.restarts > 1 and self.returns != "best":
            raise RobustlabError("restarts > 1 need returns='best' (which restart's last point?)")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise RobustlabError(f"step size alpha must be > 0, got {self.alpha}")
        if not (math.isfinite(self.decay) and self.decay >= 0):
            raise RobustlabError(f"momentum decay must be >= 0, got {self.decay}")
        if not 0 <= self.diversity_prob <= 1:
            raise RobustlabError(f"diversity_prob must lie in [0, 1], got {self.diversity_prob}")
        if not 0 < self.resize_rate <= 1:
            raise RobustlabError(
                f"resize_rate must lie in (0, 1] (DI shrinks, then pads back), "
                f"got {self.resize_rate}"
            )
        if self.ti_kernel < 0 or (self.ti_kernel > 0 and self.ti_kernel % 2 == 0):
            raise RobustlabError(
                f"TI kernel size must be odd (or 0 for no smoothing), got {self.ti_kernel}"
            )
        if self.ti_sigma is not None and not (math.isfinite(self.ti_sigma) and self.ti_sigma >= 0):
            raise RobustlabError(f"TI sigma must be >= 0, got {self.ti_sigma}")
        get_loss(self.loss)

    @property
    def step_size(self) -> float:
        """The step size actually used."""
        return self.alpha if self.alpha is not None else self.eps / self.steps

    @property
    def step_rule(self) -> StepRule:
        """Momentum steps when ``decay`` > 0, else plain steepest steps of ``step_size``."""
        if self.decay > 0:
            return MomentumStep(self.step_size, self.decay)
        return SteepestStep(self.step_size)

    def config(self) -> dict[str, Any]:
        """The full configuration, for result records."""
        return {**super().config(), "alpha": self.step_size, "loss": loss_name(self.loss)}

    def objective(
        self,
        model: nn.Module,
        y: torch.Tensor,
        targets: torch.Tensor | None,
        generator: torch.Generator,
    ) -> Objective:
        """Per-sample loss at an iterate (through DI when on) and the logits of that iterate.

        The logits are None when DI transformed the input (they are not the iterate's own).
        """

        def objective(x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            """The loss and logits of one forward pass."""
            x_in = input_diversity(x_adv, self.diversity_prob, self.resize_rate, generator)
            losses, logits = evaluate(model, x_in, y, targets, self.loss)
            return losses, (logits if x_in is x_adv else None)

        return objective

    def run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attack on a model already in eval mode with frozen parameters."""
        if (self.diversity_prob > 0 or self.ti_kernel > 0) and x.dim() != 4:
            raise RobustlabError(
                f"{self.name}: input diversity and TI need (N, C, H, W) images, "
                f"got shape {tuple(x.shape)}"
            )
        threat = self.threat
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        kernel = gaussian_kernel(self.ti_kernel, self.ti_sigma) if self.ti_kernel else None
        transform = None if kernel is None else partial(smooth_gradient, kernel=kernel)

        def start(xs: torch.Tensor) -> torch.Tensor:
            """Where a run starts: a random point of the threat model, or the inputs."""
            return threat.random_start(xs, generator) if self.random_start else xs.clone()

        def climb(xs: torch.Tensor, ys: torch.Tensor, ts: torch.Tensor | None) -> Iterator[Iterate]:
            """One run of the engine on some samples, from its start: every iterate."""
            objective = self.objective(model, ys, ts, generator)
            rule, steps = self.step_rule, self.steps
            return iterates(objective, xs, start(xs), threat, rule, steps, transform=transform)

        if self.returns == "last":
            objective = self.objective(model, y, targets, generator)
            rule, steps = self.step_rule, self.steps
            return ascend(objective, x, start(x), threat, rule, steps, transform=transform)
        return self._best(model, x, y, targets, climb)

    def _best(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None,
        climb: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], Iterator[Iterate]],
    ) -> torch.Tensor:
        """Per sample, the first successful iterate, else the highest-loss one, over restarts."""
        with torch.no_grad():
            best = Best(x, unbroken(success(model(x), y, targets)))

        def attempt(todo: torch.Tensor, restart: int) -> Candidates:
            """One run on the samples ``todo``: every iterate, judged untransformed."""
            ys = y[todo]
            ts = None if targets is None else targets[todo]
            for x_adv, losses, logits in climb(x[todo], ys, ts):
                if logits is None:  # DI moved the engine's own pass: judge the iterate itself
                    with torch.no_grad():
                        losses, logits = evaluate(model, x_adv, ys, ts, self.loss)
                yield x_adv, strongest(success(logits, ys, ts), losses)

        return run_restarts(best, self.restarts, attempt).x


class Preset(Attack):
    """A named configuration of :class:`IterativeAttack`: validated, run and recorded by it."""

    @property
    def engine(self) -> IterativeAttack:
        """The engine configuration this preset stands for."""
        raise NotImplementedError

    def __post_init__(self) -> None:
        _ = self.engine  # building the engine validates the fields

    def config(self) -> dict[str, Any]:
        """The engine's full configuration under this preset's (recorded) name."""
        return {**self.engine.config(), **self.naming()}

    def run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Delegate to the engine."""
        return self.engine.run(model, x, y, targets)


@register("fgsm")
@dataclass(frozen=True)
class FGSM(Preset):
    """FGSM (Goodfellow et al. 2015): one steepest step of size eps, no random start."""

    norm: str = "linf"
    eps: float = 8 / 255
    loss: str | Loss = "ce"

    name: ClassVar[str] = "fgsm"

    @property
    def engine(self) -> IterativeAttack:
        """One step of size eps."""
        return IterativeAttack(self.norm, self.eps, steps=1, alpha=self.eps, loss=self.loss)


@register("bim", aliases=("ifgsm", "i-fgsm"))
@dataclass(frozen=True)
class IFGSM(Preset):
    """I-FGSM / BIM (Kurakin et al. 2017): ``steps`` steps of ``alpha`` (default eps / steps)."""

    norm: str = "linf"
    eps: float = 8 / 255
    steps: int = 10
    alpha: float | None = None
    loss: str | Loss = "ce"
    seed: int = 0

    name: ClassVar[str] = "ifgsm"

    @property
    def engine(self) -> IterativeAttack:
        """Plain iterative FGSM."""
        return IterativeAttack(
            self.norm, self.eps, self.steps, self.alpha, loss=self.loss, seed=self.seed
        )


BIM = IFGSM


@register("mifgsm")
@dataclass(frozen=True)
class MIFGSM(Preset):
    """MI-FGSM (Dong et al. 2018): momentum ``decay`` over l1-normalised gradients."""

    norm: str = "linf"
    eps: float = 8 / 255
    steps: int = 10
    alpha: float | None = None
    decay: float = 1.0
    loss: str | Loss = "ce"
    seed: int = 0

    name: ClassVar[str] = "mifgsm"

    @property
    def engine(self) -> IterativeAttack:
        """I-FGSM with momentum."""
        return IterativeAttack(
            self.norm, self.eps, self.steps, self.alpha, self.decay, loss=self.loss, seed=self.seed
        )


@register("difgsm")
@dataclass(frozen=True)
class DIFGSM(Preset):
    """DI2-FGSM (Xie et al. 2019); with ``decay=1.0`` it is M-DI2-FGSM."""

    norm: str = "linf"
    eps: float = 8 / 255
    steps: int = 10
    alpha: float | None = None
    decay: float = 0.0
    diversity_prob: float = 0.5
    resize_rate: float = 0.9
    loss: str | Loss = "ce"
    seed: int = 0

    name: ClassVar[str] = "difgsm"

    @property
    def engine(self) -> IterativeAttack:
        """I-FGSM through random resize-and-pad."""
        return IterativeAttack(
            self.norm,
            self.eps,
            self.steps,
            self.alpha,
            self.decay,
            self.diversity_prob,
            self.resize_rate,
            loss=self.loss,
            seed=self.seed,
        )


@register("tifgsm")
@dataclass(frozen=True)
class TIFGSM(Preset):
    """TI-FGSM (Dong et al. 2019): the gradient smoothed by a Gaussian before the sign.

    The paper used a 15 x 15 kernel on 299 x 299 ImageNet inputs; the default here,
    7 x 7 with sigma = 1 pixel ((kernel_size - 1) / 6), suits 28 x 28 and 32 x 32 inputs.
    Set ``decay=1.0`` for TI-MI-FGSM; TI-DIM is :class:`IterativeAttack` with all three on.
    """

    norm: str = "linf"
    eps: float = 8 / 255
    steps: int = 10
    alpha: float | None = None
    decay: float = 0.0
    kernel_size: int = 7
    sigma: float | None = None
    loss: str | Loss = "ce"
    seed: int = 0

    name: ClassVar[str] = "tifgsm"

    @property
    def engine(self) -> IterativeAttack:
        """I-FGSM with Gaussian-smoothed gradients."""
        return IterativeAttack(
            self.norm,
            self.eps,
            self.steps,
            self.alpha,
            self.decay,
            ti_kernel=self.kernel_size,
            ti_sigma=self.sigma,
            loss=self.loss,
            seed=self.seed,
        )

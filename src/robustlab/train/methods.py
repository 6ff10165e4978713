"""Training methods as strategies, and the hooks around the optimisation step they plug into.

The loop (``loop.fit``) runs, for every batch: the learning rate is set; ``before_forward``
(the method first, where it crafts what its loss needs, e.g. adversarial examples; then any
add-on); the method's ``loss`` and its backward; ``after_backward``; the optimiser step;
``after_step`` (add-ons in reverse order, so a perturbation made before the forward is undone
after the step, as AWP does); and once per epoch ``end_epoch``. Each method registers itself
by name beside its definition and owns its options (TRADES' beta belongs to TRADES).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.optim import SteepestStep, ascend
from ..core.distributed import per_sample, sample_seed
from ..core.guard import evaluating, frozen_running_stats
from ..core.threat import ThreatModel
from ..errors import RobustlabError


def require_finite(**values: object) -> None:
    """Refuse a NaN or infinite hyper-parameter with one sentence naming it."""
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise RobustlabError(f"{name} must be a finite number, got {value}")


@dataclass
class Step:
    """One optimisation step as methods and hooks see it (``number`` counts steps from 0).

    ``x``, ``y`` are this process's part of the step's batch and ``index`` their positions in
    the training set; ``gen`` is seeded with the run's seed (its ``initial_seed``).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    epoch: int
    number: int
    total: int
    gen: torch.Generator
    x_adv: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    draws: int = field(default=0, init=False, repr=False)

    @property
    def progress(self) -> float:
        """How far training is once this step is taken, in (0, 1]."""
        return (self.number + 1) / self.total

    def sample_seeds(self) -> list[int]:
        """A seed per sample for the step's next random draw, from the run's seed, the step's
        number, how many draws the step made before and the sample's index in the training set:
        a sample draws the same numbers whichever process and batch position it has."""
        self.draws += 1
        seed = self.gen.initial_seed()
        return [sample_seed(seed, self.number, self.draws, i) for i in self.index.tolist()]

    def random_start(self, threat: ThreatModel) -> torch.Tensor:
        """A random point of the threat model around the batch: where a method's attack starts.
        Every random draw of a method goes through ``Step``, seeded per sample (``sample_seeds``)."""
        return per_sample(self.x, self.sample_seeds(), threat.random_start)

    def noise(self) -> torch.Tensor:
        """Standard normal noise of the batch's shape, seeded per sample (``sample_seeds``)."""

        def normal(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            """One sample's noise."""
            return torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)

        return per_sample(self.x, self.sample_seeds(), normal)

    @property
    def adversarial(self) -> torch.Tensor:
        """The adversarial batch the method crafted in ``before_forward``."""
        if self.x_adv is None:
            raise RuntimeError("no adversarial batch: the method's before_forward crafted none")
        return self.x_adv


@dataclass
class EpochEnd:
    """What end-of-epoch hooks see: the epoch just finished (from 1) and its mean batch loss.

    ``started`` is the ``time.perf_counter()`` at the epoch's start; the loss and every weight
    were checked finite before any hook sees this. A hook sets ``stop`` to end training after
    this epoch (say, a catastrophic-overfitting check); the hooks after it still run.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int
    loss: float
    started: float
    stop: bool = False


class Hook:
    """Code run around each optimisation step; every point is a no-op until overridden."""

    def start(self, model: nn.Module) -> None:
        """Once before the first step of a (possibly resumed) run, the model in train mode."""

    def before_forward(self, step: Step) -> None:
        """Before the loss's forward and backward (the method's own hook runs first)."""

    def after_backward(self, step: Step) -> None:
        """Gradients are in ``.grad`` and ``step.loss`` is set; the optimiser has not stepped."""

    def after_step(self, step: Step) -> None:
        """After the optimiser step (add-ons in reverse order of installation)."""

    def end_epoch(self, end: EpochEnd) -> None:
        """After an epoch whose loss and weights were found finite."""

    def config(self) -> dict[str, object] | None:
        """What an add-on changes in training, JSON-able, for the manifest and resume (None:
        nothing to record)."""
        return None


class Method(Hook, ABC):
    """A training strategy: hooks around the step plus the loss of one batch to minimise."""

    name: ClassVar[str] = ""

    @abstractmethod
    def loss(self, model: nn.Module, step: Step) -> torch.Tensor:
        """The batch's objective under ``model`` (add-ons such as AWP call it on a proxy)."""

    def config(self) -> dict[str, object]:
        """JSON-able description: the method's options and its name."""
        options: dict[str, object] = asdict(self) if is_dataclass(self) else {}
        return {**options, "name": self.name}


METHODS: dict[str, type[Method]] = {}
M = TypeVar("M", bound=type[Method])


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: make a method selectable by ``name`` (``--method``)."""

    def add(cls: M) -> M:
        cls.name = name
        METHODS[name] = cls
        return cls

    return add


def make_method(name: str, **options: object) -> Method:
    """Build a registered training method by name from its own options."""
    if name not in METHODS:
        raise RobustlabError(f"unknown training method '{name}'; use one of {', '.join(METHODS)}")
    cls = METHODS[name]
    required = [
        f.name
        for f in fields(cls)  # type: ignore[arg-type]  # methods are dataclasses, their ABC is not
        if f.init and f.default is MISSING and f.default_factory is MISSING
    ]
    for option in required:
        if options.get(option) is None:
            raise RobustlabError(f"method '{name}' needs --{option.replace('_', '-')}")
    try:
        return cls(**options)
    except TypeError as exc:
        raise RobustlabError(f"bad option for method '{name}': {exc}") from None


@register_method("standard")
@dataclass(frozen=True)
class Standard(Method):
    """Plain empirical risk minimisation with cross-entropy."""

    def loss(self, model: nn.Module, step: Step) -> torch.Tensor:
        """Cross-entropy on the clean batch."""
        return F.cross_entropy(model(step.x), step.y)


@dataclass(frozen=True)
class _Adversarial(Method):
    """Shared settings of adversarial training: threat model, inner steps, eps warm-up."""

    eps: float
    norm: str = "linf"
    steps: int = 10
    alpha_ratio: float = 2.5
    eps_warmup: float = 0.0

    def __post_init__(self) -> None:
        ThreatModel(self.norm, self.eps)
        require_finite(alpha_ratio=self.alpha_ratio, eps_warmup=self.eps_warmup)
        if self.eps == 0:
            raise RobustlabError("adversarial training needs eps > 0 (use --method standard)")
        if self.steps < 1:
            raise RobustlabError("adversarial training needs at least one inner step")
        if not self.alpha_ratio > 0:
            raise RobustlabError(f"the step-size ratio must be > 0, got {self.alpha_ratio}")
        if not 0 <= self.eps_warmup < 1:
            raise RobustlabError(
                f"eps warm-up must be a fraction of training in [0, 1), got {self.eps_warmup}"
            )

    def config(self) -> dict[str, object]:
        """JSON-able description, with the step size actually used."""
        return {**super().config(), "alpha": self.alpha_ratio * self.eps / self.steps}

    def threat_at(self, progress: float) -> ThreatModel:
        """The threat model trained against now: eps grows linearly over the warm-up fraction."""
        if self.eps_warmup <= 0:
            return ThreatModel(self.norm, self.eps)
        return ThreatModel(self.norm, self.eps * min(1.0, progress / self.eps_warmup))

    def inner(
        self,
        model: nn.Module,
        x: torch.Tensor,
        start: torch.Tensor,
        threat: ThreatModel,
        objective: nn.Module | None,
        y: torch.Tensor,
    ) -> torch.Tensor:
        """Maximise the inner objective by projected steepest ascent, with BN in eval mode."""
        step = SteepestStep(self.alpha_ratio * threat.eps / self.steps)

        def value(z: torch.Tensor) -> torch.Tensor:
            """Per-sample cross-entropy, or the method's own (summed) objective."""
            out = model(z)
            return (
                F.cross_entropy(out, y, reduction="none") if objective is None else objective(out)
            )

        with evaluating(model):
            return ascend(value, x, start, threat, step, self.steps)


@register_method("pgd-at")
@dataclass(frozen=True)
class PGDAT(_Adversarial):
    """Madry et al. (2018): cross-entropy on PGD examples from a random start."""

    def before_forward(self, step: Step) -> None:
        """Craft the batch's PGD examples."""
        threat = self.threat_at(step.progress)
        start = step.random_start(threat)
        step.x_adv = self.inner(step.model, step.x, start, threat, None, step.y)

    def loss(self, model: nn.Module, step: Step) -> torch.Tensor:
        """Cross-entropy on the PGD examples of the batch."""
        return F.cross_entropy(model(step.adversarial), step.y)


def check_beta(method: str, beta: float) -> None:
    """The weight of a method's robustness term: finite and >= 0."""
    require_finite(beta=beta)
    if beta < 0:
        raise RobustlabError(f"{method} needs beta >= 0, got {beta}")


@register_method("mart")
@dataclass(frozen=True)
class MART(PGDAT):
    """Wang et al. (ICLR 2020), as in their official code: on PGD examples (cross-entropy,
    random start, eval mode, as PGD-AT), the boosted cross-entropy CE(adv) - log(1 - p_adv of
    the most likely wrong class), plus beta x the mean over the batch of KL(p_clean || p_adv)
    weighted by 1 - p_clean(true class): misclassified points count more.

    Ours, unlike the official code: the clean forward pass (train mode, batch statistics) does
    not update BatchNorm's running statistics, which come from the PGD examples alone. Mixing
    clean batches into them left the eval-mode model non-robust on mnist5k at eps 0.3
    (benchmarks/RESULTS.md, "MART").
    """

    beta: float = 6.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_beta(self.name, self.beta)

    def loss(self, model: nn.Module, step: Step) -> torch.Tensor:
        """The MART objective on the batch (running norm statistics from the PGD examples only)."""
        with frozen_running_stats(model):
            clean = model(step.x)
        return mart_loss(clean, model(step.adversarial), step.y, self.beta)


def mart_loss(clean: torch.Tensor, adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """MART's loss from clean and adversarial logits (the official code's constants: 1.0001
    and 1e-12 keep the logarithms finite, 1.0000001 keeps a weight positive)."""
    p_adv, p_clean = F.softmax(adv, dim=1), F.softmax(clean, dim=1)
    top2 = p_adv.topk(2, dim=1).indices
    wrong = torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])  # most likely wrong class
    boosted = F.cross_entropy(adv, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), wrong)
    kl = (torch.xlogy(p_clean, p_clean) - p_clean * torch.log(p_adv + 1e-12)).sum(dim=1)
    weight = 1.0000001 - p_clean.gather(1, y[:, None]).squeeze(1)
    return boosted + beta * (kl * weight).mean()


class _KLToClean(nn.Module):
    """Summed KL(p_clean || p_adv): the TRADES inner objective."""

    def __init__(self, p_clean: torch.Tensor) -> None:
        super().__init__()
        self.p_clean = p_clean

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """The objective for the current adversarial logits."""
        return F.kl_div(F.log_softmax(logits, dim=1), self.p_clean, reduction="sum")


@register_method("trades")
@dataclass(frozen=True)
class TRADES(_Adversarial):
    """Zhang et al. (2019): clean cross-entropy + beta * KL(clean || adversarial).

    Ours, unlike the official code: BatchNorm's running statistics come from the adversarial
    batches alone (the clean pass normalises with its own batch statistics and leaves them),
    as in MART above.
    """

    beta: float = 6.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_beta(self.name, self.beta)

    def before_forward(self, step: Step) -> None:
        """Craft the examples that maximise the KL to the clean prediction (eval mode)."""
        threat = self.threat_at(step.progress)
        x = step.x
        with torch.no_grad(), evaluating(step.model):
            p_clean = F.softmax(step.model(x), dim=1)
        start = threat.project(x, x + 0.001 * step.noise())
        step.x_adv = self.inner(step.model, x, start, threat, _KLToClean(p_clean), step.y)

    def loss(self, model: nn.Module, step: Step) -> torch.Tensor:
        """The TRADES objective on the batch (running norm statistics from the adversarial
        examples only)."""
        with frozen_running_stats(model):
            clean = model(step.x)
        adv = model(step.adversarial)
        robust = F.kl_div(F.log_softmax(adv, 1), F.softmax(clean, 1), reduction="batchmean")
        return F.cross_entropy(clean, step.y) + self.beta * robust

"""Training methods as strategies, and the hooks around the optimisation step they plug into.

The loop (``loop.fit``) runs, for every batch: the learning rate is set; ``before_forward``
(the method first, where it crafts what its loss needs, e.g. adversarial examples; then any
add-on); the method's ``loss`` and its backward; ``after_backward``; the optimiser step;
``after_step`` (add-ons in reverse order, so a perturbation made before the forward is undone
after the step, as AWP does); and once per epoch ``end_epoch``. A method whose ``replays`` is
m > 1 (free AT) gets each batch m times in a row, each time a full step. Each method registers
itself by name beside its definition and owns its options and their defaults (TRADES' beta
belongs to TRADES). Hooks with state that must survive a resume (free AT's carried
perturbation, the held-out check's best weights) hand it over through ``state``/``load_state``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.optim import SteepestStep, ascend
from ..core.distributed import Processes, all_gather, per_sample, sample_seed
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
    """One optimisation step as methods and hooks see it (``number`` counts steps from 0, over
    the whole run; ``replay`` says which replay of its batch this step is, from 0).

    ``x``, ``y`` are this process's part of the step's batch and ``index`` their positions in
    the training set; ``gen`` is seeded with the run's seed (its ``initial_seed``). Under
    torchrun, ``part`` is where this process's samples sit in the global batch and
    ``processes`` the run's processes (one process: the whole batch).
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
    replay: int = 0
    part: slice | None = None
    processes: Processes = field(default_factory=Processes, repr=False)
    draws: int = field(default=0, init=False, repr=False)

    @property
    def progress(self) -> float:
        """How far training is once this step is taken, in (0, 1]."""
        return (self.number + 1) / self.total

    @property
    def rows(self) -> slice:
        """Where this process's samples sit in the step's (global) batch."""
        return self.part if self.part is not None else slice(0, len(self.x))

    def whole_batch(self, mine: torch.Tensor) -> torch.Tensor:
        """A per-sample tensor of this process's samples completed with every other process's
        rows: the whole global batch's, in order (``mine`` itself with one process)."""
        if not self.processes.distributed:
            return mine
        parts = all_gather(self.processes, mine.detach().cpu())
        return torch.cat(parts).to(mine.device)

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

    def state(self) -> dict[str, Any] | None:
        """What this hook carries from epoch to epoch, for the resume state (None: nothing)."""
        return None

    def load_state(self, state: dict[str, Any]) -> None:
        """Take back what ``state`` returned when the run was interrupted."""


class Method(Hook, ABC):
    """A training strategy: hooks around the step plus the loss of one batch to minimise."""

    name: ClassVar[str] = ""

    @property
    def replays(self) -> int:
        """How many steps in a row the loop makes on each batch (free AT: m; others: 1)."""
        return 1

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
class AdversarialMethod(Method):
    """A method that trains against a threat model: eps, norm, and eps's warm-up."""

    eps: float
    norm: str = "linf"
    eps_warmup: float = 0.0

    def __post_init__(self) -> None:
        ThreatModel(self.norm, self.eps)
        require_finite(eps_warmup=self.eps_warmup)
        if self.eps == 0:
            raise RobustlabError("adversarial training needs eps > 0 (use --method standard)")
        if not 0 <= self.eps_warmup < 1:
            raise RobustlabError(
                f"eps warm-up must be a fraction of training in [0, 1), got {self.eps_warmup}"
            )

    @property
    def threat(self) -> ThreatModel:
        """The threat model trained against once eps has warmed up."""
        return ThreatModel(self.norm, self.eps)

    def threat_at(self, progress: float) -> ThreatModel:
        """The threat model trained against now: eps grows linearly over the warm-up fraction."""
        if self.eps_warmup <= 0:
            return self.threat
        return ThreatModel(self.norm, self.eps * min(1.0, progress / self.eps_warmup))


def check_alpha_ratio(alpha_ratio: float) -> None:
    """A step-size ratio: finite and > 0."""
    require_finite(alpha_ratio=alpha_ratio)
    if not alpha_ratio > 0:
        raise RobustlabError(f"the step-size ratio must be > 0, got {alpha_ratio}")


def craft(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    start: torch.Tensor,
    threat: ThreatModel,
    size: float,
    steps: int,
    objective: nn.Module | None = None,
    *,
    batch_statistics: bool = False,
) -> torch.Tensor:
    """Adversarial training's inner maximisation: ``steps`` projected steepest-ascent steps of
    ``size`` from ``start`` on the per-sample cross-entropy (or the summed ``objective`` of the
    logits), with the model in eval mode, or with ``batch_statistics`` in train mode where
    BatchNorm normalises with the batch's statistics; its running statistics stay untouched."""

    def value(z: torch.Tensor) -> torch.Tensor:
        """Per-sample cross-entropy, or the method's own (summed) objective."""
        out = model(z)
        return F.cross_entropy(out, y, reduction="none") if objective is None else objective(out)

    mode = frozen_running_stats(model) if batch_statistics else evaluating(model)
    with mode:
        return ascend(value, x, start, threat, SteepestStep(size), steps)


@dataclass(frozen=True)
class _Adversarial(AdversarialMethod):
    """Adversarial training with a multi-step inner attack: its steps and step-size ratio."""

    steps: int = 10
    alpha_ratio: float = 2.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_alpha_ratio(self.alpha_ratio)
        if self.steps < 1:
            raise RobustlabError("adversarial training needs at least one inner step")

    def config(self) -> dict[str, object]:
        """JSON-able description, with the step size actually used."""
        return {**super().config(), "alpha": self.alpha_ratio * self.eps / self.steps}

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
        size = self.alpha_ratio * threat.eps / self.steps
        return craft(model, x, y, start, threat, size, self.steps, objective)


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


@register_method("fast-at")
@dataclass(frozen=True)
class FastAT(AdversarialMethod):
    """Wong et al. (ICLR 2020), "fast is better than free": cross-entropy on one FGSM step of
    ``alpha_ratio`` x eps (the paper's 1.25 eps) from a uniformly random start in the threat
    model, the result projected into it (the eps ball and [0, 1]).

    As the official code, the step is crafted in train mode: BatchNorm normalises with the
    batch's statistics (PGD-AT here crafts in eval mode; for the single step of fast AT that
    left resnet8 on mnist5k at 65 % PGD-40 robust accuracy instead of 89 %, see
    benchmarks/RESULTS.md). Ours, unlike the official code: the crafting pass leaves the
    running statistics alone (they come from the training pass on the FGSM examples).
    Catastrophic overfitting is caught by the loop's held-out check (the recipe turns it on:
    ``heldout.HeldOutCheck``), not by the method.
    """

    alpha_ratio: float = 1.25

    def __post_init__(self) -> None:
        super().__post_init__()
        check_alpha_ratio(self.alpha_ratio)

    def config(self) -> dict[str, object]:
        """JSON-able description, with the step size actually used."""
        return {**super().config(), "alpha": self.alpha_ratio * self.eps}

    def before_forward(self, step: Step) -> None:
        """Craft the batch's FGSM examples from a random start."""
        threat = self.threat_at(step.progress)
        start = step.random_start(threat)
        size = self.alpha_ratio * threat.eps
        model = step.model
        step.x_adv = craft(model, step.x, step.y, start, threat, size, 1, batch_statistics=True)

    def loss(self, model: nn.Module, step: Step) -> torch.Tensor:
        """Cross-entropy on the FGSM examples of the batch."""
        return F.cross_entropy(model(step.adversarial), step.y)


@dataclass
class _Carried:
    """Free AT's perturbation, carried from step to step (None before the first step)."""

    delta: torch.Tensor | None = None


@register_method("free-at")
@dataclass(frozen=True)
class FreeAT(AdversarialMethod):
    """Shafahi et al. (NeurIPS 2019), "adversarial training for free": each batch is replayed
    ``replays`` times (the loop makes a full step each time); one backward pass per replay gives
    both the weights' gradient and the perturbation's, which then takes a signed step of eps
    and is projected. The perturbation is carried over to the next replay and to the next batch
    (by position in the batch, as the official code's buffer of batch size), never reset; under
    torchrun every process keeps the whole global batch's (exchanged after each backward
    pass), so a sample gets what one process would give it.

    Ours, unlike the official code: the perturbation is also projected into [0, 1] around the
    batch it is applied to before the forward pass, so every example lies in the threat model.
    """

    replays: int = 8
    carried: _Carried = field(default_factory=_Carried, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.replays, bool) or not isinstance(self.replays, int):
            raise RobustlabError(f"free-at needs a whole number of replays, got {self.replays!r}")
        if self.replays < 1:
            raise RobustlabError(f"free-at needs replays >= 1, got {self.replays}")

    def config(self) -> dict[str, object]:
        """JSON-able description (the carried perturbation is state, not configuration)."""
        options = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        return {**options, "alpha": self.eps, "name": self.name}

    def _carried(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """The carried perturbation of at least ``rows`` batch positions, for inputs like
        ``x`` (zeros where there is none yet)."""
        delta = self.carried.delta
        if delta is None or delta.shape[1:] != x.shape[1:] or delta.device != x.device:
            delta = torch.zeros_like(x[:0])
        if len(delta) < rows:
            delta = torch.cat([delta, delta.new_zeros((rows - len(delta), *x.shape[1:]))])
        self.carried.delta = delta
        return delta

    def before_forward(self, step: Step) -> None:
        """The batch plus the carried perturbation of its positions in the (global) batch, in
        the threat model, as a leaf whose gradient the loss's backward fills."""
        threat = self.threat_at(step.progress)
        delta = self._carried(step.x, step.rows.stop)[step.rows]
        x_adv = threat.project(step.x, step.x + delta)
        step.x_adv = x_adv.detach().requires_grad_(True)

    def loss(self, model: nn.Module, step: Step) -> torch.Tensor:
        """Cross-entropy on the perturbed batch (train mode: the only pass of the step)."""
        return F.cross_entropy(model(step.adversarial), step.y)

    def after_backward(self, step: Step) -> None:
        """The perturbation's signed step of eps, from the gradient the backward just gave."""
        x_adv = step.adversarial
        if x_adv.grad is None:
            raise RuntimeError("free-at: the backward pass gave no gradient for the examples")
        threat = self.threat_at(step.progress)
        with torch.no_grad():
            moved = x_adv + threat.eps * threat.steepest_step(x_adv.grad)
            new = step.whole_batch(threat.project(step.x, moved) - step.x)
        self._carried(step.x, len(new))[: len(new)] = new

    def state(self) -> dict[str, Any]:
        """The carried perturbation."""
        return {"delta": self.carried.delta}

    def load_state(self, state: dict[str, Any]) -> None:
        """Carry on with the perturbation of the interrupted run."""
        self.carried.delta = state["delta"]

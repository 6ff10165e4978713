"""Transfer matrices: craft adversarial examples on each source once, evaluate them on every target.

A matrix of S sources, T targets and A attacks costs S x A attack generations (one per
source and attack, over all samples) and T x (1 + S x A) forward passes of the targets
(a clean pass, then one per crafted set), never S x T x A generations; each source also
classifies its own examples once per attack (``source_success_rate``, the surrogate's own
success). The result records both costs.

Success-rate conventions (both are recorded in every cell):

- ``success_rate``: over the samples the *target* classifies correctly when clean, the
  fraction it misclassifies (untargeted) or assigns to the target label (targeted) on the
  adversarial example. This is the convention of the SGM paper; ``n`` counts those samples.
- ``success_rate_all``: the same fraction over all ``n_all`` samples (for untargeted
  attacks: one minus the target's accuracy under attack).

A cell is marked ``white_box`` when the target is the source model itself (or one of the
members of a source ensemble): the attacker had its gradients. Each cell keeps its per-sample
outcome (``hits``).

The points are crafted and judged in batches of ``batch_size``, each seeded on its own: the
global generator with ``seed + start`` and each attack's own generator with its seed +
``start`` (so the batches of one matrix draw different DI transformations). A batch thus
gives the same examples whichever process crafts it, and under torchrun process ``r`` of
``W`` takes the whole batches whose number ``b`` has ``b % W == r``
(:mod:`robustlab.evaluate.sharded`); the merged matrix equals one process's, sample for
sample, with the same seed, batch size, engine and thread count.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn

from ..attacks.base import Attack
from ..attacks.iterative import Preset
from ..attacks.losses import cross_entropy
from ..attacks.registry import lookup, make_attack, register
from ..attacks.transforms import check_gamma, find_residual_sites, linbp, skip_gradient
from ..core.checks import check_batch_size
from ..core.distributed import Processes, together
from ..core.guard import evaluating, frozen_eval
from ..core.threat import ThreatModel
from ..data import Dataset
from ..errors import RobustlabError
from ..evaluate.progress import run_key
from ..evaluate.sharded import Batch, attack_batches, merged, open_shard, shard_bar, shared_engine
from ..models.blocks import DenseLayer, ResidualBlock, residual_blocks
from ..models.engine import check_engine, infer

#: Base attacks (registry names of the gradient engine's presets) and the modifiers that can
#: be joined to them with "+". A base is resolved through the attack registry (so "bim" is
#: the registry's bim), then run with the protocol's options (see :func:`parse_attack`).
BASES = ("pgd", "ifgsm", "bim", "fgsm", "i-fgsm")
MODIFIERS = ("mi", "di", "ti", "sgm", "linbp")
#: Modifier spellings: "mifgsm" here means momentum on the protocol's base, not the preset.
ALIASES = {"mifgsm": "mi", "difgsm": "di", "tifgsm": "ti"}
DEFAULT_BASE = "pgd"
DEFAULT_STEPS = 10
#: The protocol's step size: ALPHA_RATIO * eps / steps for iterative bases.
ALPHA_RATIO = 2.5
DEFAULT_LINBP_BLOCK = -2


def default_gamma(model: nn.Module, one_step: bool = False) -> float:
    """SGM's published default for a source, from its structure.

    Iterative attacks: 0.2 for ResNets, 0.5 for DenseNets (dense layers), 0.6 for
    transformers (sub-blocks scaled by sqrt(gamma) each); 0.2 for anything else with
    residual blocks. One-step (FGSM) attacks: 0.5 for ResNets, 0.7 for DenseNets, 0.6 for
    transformers.
    """
    sites = find_residual_sites(model)
    if any(s.merge == "concat" for s in sites):
        return 0.7 if one_step else 0.5
    if sites and all(s.power == 0.5 for s in sites):
        return 0.6
    return 0.5 if one_step else 0.2


@register("transfer", kind="transfer")
@dataclass(frozen=True)
class TransferAttack:
    """One attack of a transfer matrix: an engine configuration plus gradient transforms.

    ``sgm`` turns on SGM with ``gamma`` (None: each source's default, see
    :func:`default_gamma`); ``linbp_block`` turns on LinBP from that residual block on.
    ``base`` is the registry name typed for the gradient step and ``options`` the protocol's
    options it was run with (both recorded); built by :func:`parse_attack`.
    """

    label: str
    attack: Attack
    sgm: bool = False
    gamma: float | None = None
    linbp_block: int | None = None
    base: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.gamma is not None:
            check_gamma(self.gamma)

    def gamma_for(self, model: nn.Module) -> float | None:
        """The SGM gamma used on a source (None when SGM is off)."""
        if not self.sgm:
            return None
        if self.gamma is not None:
            return self.gamma
        return default_gamma(model, one_step=getattr(self.attack, "steps", 0) == 1)

    @contextmanager
    def transforms(self, model: nn.Module) -> Iterator[None]:
        """The gradient transforms of this attack, installed on a source."""
        with ExitStack() as stack:
            gamma = self.gamma_for(model)
            if gamma is not None:
                stack.enter_context(skip_gradient(model, gamma))
            if self.linbp_block is not None:
                stack.enter_context(linbp(model, self.linbp_block))
            yield

    def for_batch(self, start: int) -> TransferAttack:
        """This attack for the batch of points beginning at ``start``: its generator seeded by
        its seed + ``start`` (an attack without a ``seed`` field is itself)."""
        seed = getattr(self.attack, "seed", None)
        if not dataclasses.is_dataclass(self.attack) or not isinstance(seed, int):
            return self
        if "seed" not in {f.name for f in dataclasses.fields(self.attack)}:
            return self
        return replace(self, attack=replace(self.attack, seed=seed + start))

    def craft(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None
    ) -> torch.Tensor:
        """Adversarial examples on a source, under this attack's transforms."""
        with self.transforms(model):
            return self.attack(model, x, y, targets)

    def config(self) -> dict[str, Any]:
        """JSON-able description: label, base and protocol options, the engine, the transforms."""
        base = {} if self.base is None else {"base": self.base}
        alias_of = lookup(self.base).name if self.base is not None else None
        if alias_of is not None and alias_of != self.base:
            base["base_alias_of"] = alias_of
        return {
            "label": self.label,
            **base,
            "options": dict(self.options),
            "engine": self.attack.config(),
            "sgm": self.sgm,
            "gamma": self.gamma,
            "linbp_block": self.linbp_block,
        }


def parse_attack(
    name: str,
    norm: str,
    eps: float,
    *,
    steps: int = DEFAULT_STEPS,
    alpha: float | None = None,
    gamma: float | None = None,
    linbp_block: int = DEFAULT_LINBP_BLOCK,
    loss: str = "ce",
    seed: int = 0,
) -> TransferAttack:
    """A transfer attack from a name such as ``pgd``, ``mi``, ``sgm+mi+di`` or ``fgsm+sgm``.

    Parts joined with ``+``: at most one base step, a registry name (``pgd``, the default;
    ``bim`` / ``ifgsm``; ``fgsm``: one step of eps) and any of ``mi`` (momentum 1.0), ``di``
    (input diversity, p = 0.5), ``ti`` (7x7 Gaussian gradient smoothing), ``sgm`` and
    ``linbp``. The protocol runs every iterative base with the same options, passed to the
    registry's attack explicitly and recorded (``options``): ``steps``, step size ``alpha``
    (default 2.5 * eps / steps), no random start, the last iterate, ``seed``; so cells
    differ only by the techniques named. ``fgsm`` keeps its own single step of eps.
    """
    ThreatModel(norm, eps)
    parts = [ALIASES.get(p.strip().lower(), p.strip().lower()) for p in name.split("+")]
    known = ", ".join(BASES + MODIFIERS)
    for part in parts:
        if part not in BASES and part not in MODIFIERS:
            raise RobustlabError(
                f"unknown transfer attack '{part or name}' in '{name}'; "
                f"join these with '+': {known}"
            )
    bases = [p for p in parts if p in BASES]
    if len(bases) > 1:
        raise RobustlabError(f"'{name}' names more than one base attack ({', '.join(bases)})")
    if len(set(parts)) != len(parts):
        raise RobustlabError(f"'{name}' names a technique twice")
    if steps < 1:
        raise RobustlabError(f"transfer attacks need steps >= 1, got {steps}")
    base = bases[0] if bases else DEFAULT_BASE
    preset = make_attack(
        base, norm, eps, **_protocol(base, eps, steps, alpha), loss=loss, seed=seed
    )
    if not isinstance(preset, Preset):  # pragma: no cover - BASES are all engine presets
        raise RobustlabError(f"'{base}' is not an attack of the gradient engine")
    # the protocol, explicit: one run from the clean input, its last iterate
    engine = replace(
        preset.engine,
        random_start=False,
        restarts=1,
        returns="last",
        decay=1.0 if "mi" in parts else preset.engine.decay,
        diversity_prob=0.5 if "di" in parts else preset.engine.diversity_prob,
        ti_kernel=7 if "ti" in parts else preset.engine.ti_kernel,
        seed=seed,
    )
    options = {
        "steps": engine.steps,
        "alpha": engine.step_size,
        "random_start": False,
        "returns": "last",
        "seed": seed,
    }
    return TransferAttack(
        label=name,
        attack=engine,
        sgm="sgm" in parts,
        gamma=gamma if "sgm" in parts else None,
        linbp_block=linbp_block if "linbp" in parts else None,
        base=base,
        options=options,
    )


def _protocol(base: str, eps: float, steps: int, alpha: float | None) -> dict[str, Any]:
    """The step options the protocol passes a base: steps and alpha (2.5 * eps / steps).

    A one-step base (fgsm) keeps its own single step of eps. A step size of 0 (eps 0) is
    left to the attack's default, which is then 0 as well.
    """
    fields = {f.name for f in dataclasses.fields(lookup(base).cls)}
    if "steps" not in fields:
        return {}
    step = alpha if alpha is not None else ALPHA_RATIO * eps / steps
    return {"steps": steps, "alpha": step if step > 0 else None}


def gamma_sweep(attack: TransferAttack, gammas: Sequence[float]) -> list[TransferAttack]:
    """One copy of an SGM attack per gamma (the attack must use SGM)."""
    if not attack.sgm:
        raise RobustlabError(
            f"a gamma sweep needs an SGM attack; '{attack.label}' does not use sgm"
        )
    if not gammas:
        raise RobustlabError("a gamma sweep needs at least one gamma")
    return [replace(attack, gamma=check_gamma(g)) for g in gammas]


@dataclass(frozen=True)
class TransferCell:
    """One (source, target, attack) result of a transfer matrix."""

    source: str
    target: str
    attack: str
    gamma: float | None
    success_rate: float
    n: int
    success_rate_all: float
    n_all: int
    target_clean_accuracy: float
    target_adversarial_accuracy: float
    source_success_rate: float
    white_box: bool
    convention: str = "over samples the target classifies correctly when clean"
    hits: str = ""  # per point, in order: "1" the attack succeeded on the target, else "0"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


@dataclass(frozen=True)
class TransferMatrix:
    """A whole transfer matrix: its cells, what was run, and what it cost."""

    cells: list[TransferCell]
    sources: list[str]
    targets: list[str]
    attacks: list[dict[str, Any]]
    threat_model: dict[str, Any]
    n: int
    targeted: bool
    seed: int
    data: str
    generations: int
    target_forwards: int
    craft_seconds: dict[str, float]
    elapsed_s: float
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)  # per model: what ran
    world_size: int = 1  # processes that shared the batches (torchrun)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record (``kind`` = "transfer"; ``cells`` is one record per cell)."""
        record = asdict(self)
        record["kind"] = "transfer"
        record["cells"] = [c.to_dict() for c in self.cells]
        return record

    def cell(
        self, source: str, target: str, attack: str, gamma: float | None = None
    ) -> TransferCell:
        """The cell of one (source, target, attack[, gamma])."""
        for c in self.cells:
            if (c.source, c.target, c.attack) == (source, target, attack) and (
                gamma is None or c.gamma == gamma
            ):
                return c
        raise KeyError((source, target, attack, gamma))

    def table(self) -> str:
        """A plain-text table: one row per source and attack, one column per target (%, * white-box)."""
        rows: dict[tuple[str, str, float | None], dict[str, TransferCell]] = {}
        for cell in self.cells:
            rows.setdefault((cell.source, cell.attack, cell.gamma), {})[cell.target] = cell
        head = ["source", "attack"] + self.targets
        lines = [head]
        for (source, attack, gamma), by_target in rows.items():
            label = attack if gamma is None else f"{attack} (gamma {gamma:g})"
            line = [source, label]
            for t in self.targets:
                c = by_target.get(t)
                line.append(
                    "-" if c is None else f"{100 * c.success_rate:.1f}{'*' if c.white_box else ''}"
                )
            lines.append(line)
        widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
        text = [
            "  ".join(
                v.ljust(w) if i < 2 else v.rjust(w)
                for i, (v, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in lines
        ]
        return "\n".join(text)


def random_targets(y: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """A random target label per sample, different from its true label (seeded)."""
    if num_classes < 2:
        raise RobustlabError("targeted attacks need at least two classes")
    g = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, num_classes, y.shape, generator=g)
    return (y.cpu() + shift) % num_classes


def _probe(name: str, role: str, model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    """Check that a model takes the data's inputs and predicts enough classes."""
    try:
        with torch.inference_mode():
            out = model(x[:1])
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or ["shape mismatch"])[0][:160]
        raise RobustlabError(
            f"{role} '{name}' does not accept inputs of shape {tuple(x.shape[1:])} "
            f"(those of the data and the other models): {first}"
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < num_classes:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RobustlabError(
            f"{role} '{name}' must return (N, classes) logits for {num_classes} classes, got {got}"
        )


def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Predicted labels of a model, in batches, in eval mode (its mode restored)."""
    with evaluating(model), torch.inference_mode():
        preds = [
            infer(model, x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)
        ]
    return torch.cat(preds)


def _hits(pred: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """Per sample: misclassified (untargeted) or classified as its target (targeted)."""
    return pred != y if targets is None else pred == targets


def _rate(hits: torch.Tensor, over: torch.Tensor) -> float:
    """Fraction of ``hits`` among the samples selected by ``over`` (NaN when there are none)."""
    count = int(over.sum())
    return float((hits & over).sum()) / count if count else math.nan


def check_sources(attacks: Sequence[TransferAttack], sources: Mapping[str, nn.Module]) -> None:
    """Every source has what its attacks' gradient transforms need (SGM and LinBP: residual
    blocks); an untrained model of the same architecture answers as well as a trained one."""
    for a in attacks:
        if not a.sgm and a.linbp_block is None:
            continue
        for name, model in sources.items():
            try:
                with a.transforms(model):
                    pass
            except RobustlabError as exc:
                raise RobustlabError(f"attack '{a.label}' on source '{name}': {exc}") from None


def _contains(source: nn.Module, target: nn.Module) -> bool:
    """Whether the target is the source or one of its submodules (an ensemble member)."""
    return any(m is target for m in source.modules())


def transfer_matrix(
    sources: Mapping[str, nn.Module],
    targets: Mapping[str, nn.Module],
    attacks: Sequence[TransferAttack],
    data: Dataset,
    *,
    n: int | None = None,
    batch_size: int = 250,
    targeted: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
    white_box: Callable[[str, str], bool] | None = None,
    on_cell: Callable[[TransferCell], None] | None = None,
    engine: str = "auto",
    processes: Processes | None = None,
) -> TransferMatrix:
    """Craft each source's examples once per attack and evaluate them on every target.

    Models must already be on ``device``; the data is moved there. The first ``n`` samples
    of ``data`` (default all) are used, in batches of ``batch_size``, each seeded on its own
    (see the module's docstring). ``white_box(source, target)`` overrides which cells
    are white-box (default: the target is the source model or one of its members).
    ``on_cell`` is called with each cell once the matrix is known. ``engine`` runs the
    forward-only passes of every model (targets' predictions above all), as for
    :func:`~robustlab.evaluate.evaluate`; the record names the engine per model.
    ``processes`` (from :func:`robustlab.core.distributed.start`; default one process):
    the batches shared among torchrun's processes, each process getting the whole matrix.
    """
    processes = processes or Processes()
    start = time.perf_counter()
    with together(processes):  # bad input stops every process, said once
        check_engine(engine)
        if not sources or not targets or not attacks:
            raise RobustlabError("a transfer matrix needs at least one source, target and attack")
        check_batch_size(batch_size)
        total = len(data)
        count = total if n is None else n
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= total:
            raise RobustlabError(f"n must be a whole number between 1 and {total}, got {n!r}")
        norms = {(a.attack.norm, a.attack.eps) for a in attacks}
        if len(norms) != 1:
            raise RobustlabError(
                "all attacks of one matrix must share the threat model (norm, eps)"
            )
        norm, eps = norms.pop()
        x = data.x[:count].to(device)
        y = data.y[:count].to(device)
        goal = random_targets(y, data.num_classes, seed).to(device) if targeted else None
        for role, models in (("source", sources), ("target", targets)):
            for name, model in models.items():
                _probe(name, role, model, x, data.num_classes)
        check_sources(attacks, sources)

    def key() -> str:
        """What every process must share: every model, the points and the configuration."""
        everything = nn.ModuleList([*sources.values(), *targets.values()])
        config = {
            "sources": list(sources),
            "targets": list(targets),
            "attacks": [a.config() for a in attacks],
            "targeted": targeted,
        }
        return run_key([], everything, data, count, batch_size, seed, config)

    shard = open_shard(processes, data, count, batch_size, 1, key, None)
    jobs = [(s, a) for s in sources for a in attacks]
    with ExitStack() as stack:
        engines = {
            name: stack.enter_context(
                shared_engine(processes, model, x[:batch_size], engine)
            ).as_dict()
            for name, model in {**sources, **targets}.items()
        }
        bar = stack.enter_context(shard_bar(shard, "matrix", progress, task="transfer"))

        def batch(first: int, end: int) -> Batch:
            """This batch's per-sample outcomes on every source and target."""
            part = None if goal is None else goal[first:end]
            return _batch(sources, targets, jobs, x[first:end], y[first:end], part, first)

        attack_batches(shard, seed, batch, bar.update)
    done, _ = merged(shard)
    parts = [done[first] for first in sorted(done)]
    cells, craft_seconds = _cells(sources, targets, jobs, parts, white_box)
    if on_cell is not None:
        for cell in cells:
            on_cell(cell)
    return TransferMatrix(
        cells=cells,
        sources=list(sources),
        targets=list(targets),
        attacks=[a.config() for a in attacks],
        threat_model={"norm": norm, "eps": eps},
        n=count,
        targeted=targeted,
        seed=seed,
        data=data.name,
        generations=len(jobs),
        target_forwards=len(targets) * (1 + len(jobs)),
        craft_seconds=craft_seconds,
        elapsed_s=round(time.perf_counter() - start, 3),
        engines=engines,
        world_size=processes.world_size,
    )


Job = tuple[str, TransferAttack]
"""One generation: a source and an attack, crafted over every point."""


def _batch(
    sources: Mapping[str, nn.Module],
    targets: Mapping[str, nn.Module],
    jobs: Sequence[Job],
    x: torch.Tensor,
    y: torch.Tensor,
    goal: torch.Tensor | None,
    start: int,
) -> Batch:
    """Craft one batch (the points from ``start``) with each job, judge it on its source and
    every target: the per-sample outcomes (on the CPU) and each job's crafting seconds."""
    size = max(1, len(x))
    clean = {name: _predict(model, x, size) == y for name, model in targets.items()}
    own: dict[str, torch.Tensor] = {}
    for name, model in sources.items():
        same = name in targets and targets[name] is model
        own[name] = clean[name] if same else _predict(model, x, size) == y
    crafted = []
    for source_name, spec in jobs:
        model = sources[source_name]
        t0 = time.perf_counter()
        x_adv = spec.for_batch(start).craft(model, x, y, goal)
        seconds = time.perf_counter() - t0
        preds = {name: _predict(target, x_adv, size) for name, target in targets.items()}
        crafted.append(
            {
                "seconds": seconds,
                "source_hits": _hits(_predict(model, x_adv, size), y, goal).cpu(),
                "hits": {name: _hits(p, y, goal).cpu() for name, p in preds.items()},
                "correct": {name: (p == y).cpu() for name, p in preds.items()},
            }
        )
    return {
        "start": start,
        "clean": {name: c.cpu() for name, c in clean.items()},
        "own": {name: c.cpu() for name, c in own.items()},
        "jobs": crafted,
    }


def _joined(parts: Sequence[Batch], *path: str | int) -> torch.Tensor:
    """One per-sample outcome over every batch (in point order): ``part[path[0]][path[1]]...``."""
    pieces = []
    for part in parts:
        found: Any = part
        for step in path:
            found = found[step]
        pieces.append(found)
    return torch.cat(pieces)


def _cells(
    sources: Mapping[str, nn.Module],
    targets: Mapping[str, nn.Module],
    jobs: Sequence[Job],
    parts: Sequence[Batch],
    white_box: Callable[[str, str], bool] | None,
) -> tuple[list[TransferCell], dict[str, float]]:
    """The cells of a matrix from its batches' outcomes (in point order), and the seconds
    each job's crafting took over every batch (of every process)."""
    clean = {name: _joined(parts, "clean", name) for name in targets}
    count = len(next(iter(clean.values())))
    everyone = torch.ones(count, dtype=torch.bool)
    cells: list[TransferCell] = []
    craft_seconds: dict[str, float] = {}
    for k, (source_name, spec) in enumerate(jobs):
        model = sources[source_name]
        gamma = spec.gamma_for(model)
        key = f"{source_name} | {spec.label}" + ("" if gamma is None else f" | gamma {gamma:g}")
        craft_seconds[key] = round(sum(part["jobs"][k]["seconds"] for part in parts), 3)
        own = _joined(parts, "own", source_name)
        source_hits = _joined(parts, "jobs", k, "source_hits")
        for target_name, target in targets.items():
            hits = _joined(parts, "jobs", k, "hits", target_name)
            still = _joined(parts, "jobs", k, "correct", target_name)
            correct = clean[target_name]
            is_white = (
                white_box(source_name, target_name)
                if white_box is not None
                else _contains(model, target)
            )
            cells.append(
                TransferCell(
                    source=source_name,
                    target=target_name,
                    attack=spec.label,
                    gamma=gamma,
                    success_rate=_rate(hits, correct),
                    n=int(correct.sum()),
                    success_rate_all=_rate(hits, everyone),
                    n_all=count,
                    target_clean_accuracy=float(correct.float().mean()),
                    target_adversarial_accuracy=float(still.float().mean()),
                    source_success_rate=_rate(source_hits, own),
                    white_box=is_white,
                    hits="".join("1" if h else "0" for h in hits.tolist()),
                )
            )
    return cells, craft_seconds


# ---- diagnostics: why a transform helps transfer, or not ----------------------------------


def input_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    gamma: float | None = None,
    batch_size: int = 250,
) -> torch.Tensor:
    """Per-sample input gradients of the cross-entropy, in eval mode; under SGM with ``gamma``."""
    grads = []
    with frozen_eval(model, warn_train_mode=False), ExitStack() as stack:
        if gamma is not None:
            stack.enter_context(skip_gradient(model, gamma))
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].detach().clone().requires_grad_(True)
            loss = cross_entropy(model(xb), y[i : i + batch_size], None).sum()
            grads.append(torch.autograd.grad(loss, xb)[0])
    return torch.cat(grads)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of two batches of tensors."""
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-30)


def _sign_gain(source_grad: torch.Tensor, target_grad: torch.Tensor) -> torch.Tensor:
    """Per sample: <g_T, sign(g_S)> / ||g_T||_1, the share of the target's best Linf step gained."""
    t = target_grad.flatten(1)
    gain = (t * source_grad.flatten(1).sign()).sum(1)
    return gain / t.abs().sum(1).clamp_min(1e-30)


def gradient_alignment(
    source: nn.Module,
    targets: Mapping[str, nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    gammas: Sequence[float],
    *,
    batch_size: int = 250,
) -> list[dict[str, Any]]:
    """How well the source's (SGM) input gradient points along each target's, per gamma.

    One row per gamma and target, means over the samples: ``cosine`` (cos(g_S^gamma, g_T)),
    ``sign_gain`` (<g_T, sign(g_S^gamma)> / ||g_T||_1: the share of the target's own best
    one-step Linf first-order loss increase that the source's sign step gets; 1 is perfect,
    0 is a random direction), ``norm_ratio`` (||g_S^gamma|| / ||g_S||) and ``cos_plain``
    (cos(g_S^gamma, g_S)). Gamma 1 is the plain gradient. SGM's claim is that gamma < 1
    raises the alignment with other models.
    """
    plain = input_gradients(source, x, y, batch_size=batch_size)
    wanted = {name: input_gradients(m, x, y, batch_size=batch_size) for name, m in targets.items()}
    rows = []
    for g in gammas:
        gs = plain if g == 1 else input_gradients(source, x, y, gamma=g, batch_size=batch_size)
        norm_ratio = gs.flatten(1).norm(dim=1) / plain.flatten(1).norm(dim=1).clamp_min(1e-30)
        for name, gt in wanted.items():
            rows.append(
                {
                    "gamma": float(g),
                    "target": name,
                    "cosine": float(_cos(gs, gt).mean()),
                    "sign_gain": float(_sign_gain(gs, gt).mean()),
                    "norm_ratio": float(norm_ratio.mean()),
                    "cos_plain": float(_cos(gs, plain).mean()),
                    "n": len(x),
                }
            )
    return rows


def skip_branch_split(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 250
) -> list[dict[str, Any]]:
    """Per residual block, how the true input gradient of the block splits into skip and branch.

    At each block's input the gradient of the cross-entropy is g_skip + g_branch (through
    the shortcut, through the residual branch). One row per block (module order) with the
    medians over samples of ``skip_share`` = ||g_skip|| / (||g_skip|| + ||g_branch||), the
    mean ``cosine`` between the two parts and ``branch_over_skip`` = ||g_branch|| /
    ||g_skip||. Only robustlab's own residual blocks (zoo models) are measured.
    """
    blocks = residual_blocks(model)
    if not blocks:
        raise RobustlabError("skip_branch_split needs a model with robustlab residual blocks")
    skip_n: list[list[torch.Tensor]] = [[] for _ in blocks]
    branch_n: list[list[torch.Tensor]] = [[] for _ in blocks]
    cosines: list[list[torch.Tensor]] = [[] for _ in blocks]
    with frozen_eval(model, warn_train_mode=False):
        for i in range(0, len(x), batch_size):
            inputs: dict[int, torch.Tensor] = {}
            outputs: dict[int, torch.Tensor] = {}
            handles = [
                b.register_forward_hook(_recorder(k, inputs, outputs)) for k, b in enumerate(blocks)
            ]
            try:
                xb = x[i : i + batch_size].detach().clone().requires_grad_(True)
                loss = cross_entropy(model(xb), y[i : i + batch_size], None).sum()
            finally:
                for h in handles:
                    h.remove()
            if len(outputs) != len(blocks):
                raise RobustlabError("skip_branch_split needs every residual block on the path")
            upstream = torch.autograd.grad(loss, [outputs[k] for k in range(len(blocks))])
            for k, block in enumerate(blocks):
                g_skip, g_branch = _split(block, inputs[k], upstream[k])
                skip_n[k].append(g_skip.flatten(1).norm(dim=1))
                branch_n[k].append(g_branch.flatten(1).norm(dim=1))
                cosines[k].append(_cos(g_skip, g_branch))
    rows = []
    for k, block in enumerate(blocks):
        s, b = torch.cat(skip_n[k]), torch.cat(branch_n[k])
        rows.append(
            {
                "block": k,
                "type": type(block).__name__,
                "skip_share": float((s / (s + b).clamp_min(1e-30)).median()),
                "branch_over_skip": float((b / s.clamp_min(1e-30)).median()),
                "cosine": float(torch.cat(cosines[k]).mean()),
            }
        )
    return rows


def _recorder(
    k: int, inputs: dict[int, torch.Tensor], outputs: dict[int, torch.Tensor]
) -> Callable[[nn.Module, Any, Any], None]:
    """A forward hook keeping block ``k``'s (detached) input and its output, changing nothing."""

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        inputs[k] = args[0].detach()
        outputs[k] = output

    return hook


def _split(
    block: nn.Module, x_in: torch.Tensor, g_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient at a block's input through its shortcut and through its branch."""
    assert isinstance(block, ResidualBlock)
    with torch.enable_grad():
        x = x_in.detach().requires_grad_(True)
        skip = block.shortcut(x.clone())  # clones: a new graph node each, safe in place
        branch = block.branch(x.clone())
        merged = (
            torch.cat([skip, branch], dim=1) if isinstance(block, DenseLayer) else skip + branch
        )
        out = block.post(merged.clone())
        d_skip, d_branch = torch.autograd.grad(out, [skip, branch], g_out, retain_graph=True)
        (g_skip,) = torch.autograd.grad(skip, x, d_skip, retain_graph=True)
        (g_branch,) = torch.autograd.grad(branch, x, d_branch)
    return g_skip, g_branch

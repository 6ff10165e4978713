"""The Mixed Surrogate Attack (MSA): robust accuracy of a defended model whose own gradients
mislead attacks (gradient obfuscation, forward discontinuities, batch dependence).

The paper that names MSA (arXiv 2606.01746) publishes only its abstract: it attacks several
differentiable surrogates of the defence with AutoAttack and counts a point robust only if
the real defended forward classifies every surrogate's example correctly. The protocol
below is ours:

1. **Plain stage.** The whole AutoAttack (the version asked, Square included) runs on the
   defended forward itself. Its robust accuracy is reported as "plain AutoAttack": what the
   defence would claim without surrogates.
2. **One stage per surrogate, in order.** On the points still robust, AutoAttack's APGD
   members (standard: APGD-CE, APGD-T) run on the surrogate; ``surrogate_attacks`` adds
   FAB-T or others. Ours, for cost: with FAB-T too, five surrogates cost 3.3x one AutoAttack
   on the base (FAB-T is 58 % of a surrogate stage), without it 1.8x (benchmarks/RESULTS.md).
   An ensemble with no APGD member runs its FAB members on the surrogates. Square, a
   query-only attack, gains nothing from a surrogate's gradients and runs only in the plain
   stage, on the real forward.
3. **The real forward judges every candidate**, member by member; a point is robust only if
   it survives every stage (per-sample AND), and only still-robust points go on to the next
   member and the next stage.

**Batch dependence.** A defended forward may depend on the other inputs of its batch (HPM's
mixing mode). Every judgement runs the real forward on the whole *evaluation batch*: every
point of the batch (clean-misclassified and already-broken ones included) carrying its
current example, the new candidate for a point attacked by this member, else its kept
example (the example that broke it, or its clean input). Never on whatever sub-batch
survived, so a result depends on the batch size and the data order, not on which points the
attacks happened to break. The record states the evaluation batch size; batch size 1 (each
point judged alone) is supported. The attacks themselves compute their own gradients on the
points they attack, as an attacker would. After the last stage, one more pass judges the
batch with every point at its final example; points whose outcome there differs from their
verdict (possible only for a batch-dependent forward) are counted and warned about.

**Cost.** The clean pass is shared by all stages, each member attacks only the points still
robust, and Square runs once: with a strong defence most points survive, so each surrogate
stage costs about its members' work on the robust points. Measured
(``benchmarks/msa_cost.py``, PGD-AT resnet8 on mnist5k, 32 points, five surrogates as costly
as the base, CPU time): 1.8x one AutoAttack on the base with the default APGD-CE and APGD-T
on every surrogate, 3.3x with FAB-T added (FAB-T is 58 % of the surrogate stages).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import nn

from ..attacks.autoattack import BLACK_BOX, AutoAttack, run_member
from ..attacks.base import Attack
from ..attacks.restarts import Best
from ..core.criteria import success, unbroken
from ..core.distributed import Processes, together
from ..core.guard import frozen_eval
from ..data import Dataset
from ..data.convert import UserData, as_dataset
from ..errors import RobustlabError
from ..models.engine import check_engine, infer
from ..models.structure import surrogates_for
from .checks import black_box_warning, masking_checks
from .progress import run_key
from .robust import (
    ONE_CLASS_WARNING,
    AttackStep,
    EvalRecord,
    _batch_of,
    _fast_copy,
    checked_points,
    sample_rows,
)
from .sharded import (
    Batch,
    attack_batches,
    merged,
    on_rank_zero,
    open_shard,
    shard_bar,
    shared_engine,
)

PLAIN = "plain"
"""The name of the first stage: AutoAttack on the defended forward itself."""

Stage = tuple[str, nn.Module, list[tuple[str, Attack]]]
"""One stage: its name, the model its attacks follow, and its attacks (name, attack)."""


class StageStep(TypedDict):
    """One stage of MSA in a record: robust accuracy after it, what it broke, its time."""

    stage: str
    robust_accuracy_after: float
    broken: int
    seconds: float


@dataclass
class MSARecord(EvalRecord):
    """An MSA evaluation: the combined robust accuracy, plain AutoAttack's and every stage's.

    ``robust_accuracy`` is MSA's (a point survives every stage); ``per_attack`` lists every
    member as ``stage/member``; ``samples``' ``broken_by`` names the stage and member that
    broke each point. ``final_batch_disagreements``: points whose outcome in the last pass
    over their batch (every point at its final example) differs from their verdict.
    """

    plain_robust_accuracy: float = 0.0
    stages: list[StageStep] = field(default_factory=list)
    final_batch_disagreements: int = 0
    kind: str = "msa"


@dataclass
class MSABatch:
    """The outcome of MSA on one evaluation batch."""

    x_adv: torch.Tensor  # per point: the example that broke it, else its clean input
    clean_pred: torch.Tensor
    final_pred: torch.Tensor  # the defended forward's answer when the point was last judged
    broken_by: list[str | None]  # "stage/member", None: robust or misclassified clean
    seconds: dict[str, float] = field(default_factory=dict)  # per "stage/member"
    disagreements: int = 0


def surrogate_members(ensemble: AutoAttack, names: Sequence[str] = ()) -> list[tuple[str, Attack]]:
    """The attacks run on each surrogate: the ``names`` given, at the ensemble's budgets,
    else the ensemble's APGD members (its gradient members, FAB too, if it has no APGD one)."""
    black = [a for a in names if a in BLACK_BOX]
    if black:
        raise RobustlabError(
            f"{', '.join(black)} only queries the defended forward and runs in the plain stage; "
            "surrogate attacks follow gradients (apgd-ce, apgd-dlr, apgd-t, fab, fab-t)"
        )
    chosen = replace(ensemble, attacks=tuple(names)) if names else ensemble
    members = [(name, a) for name, a in chosen.components() if name not in BLACK_BOX]
    if not names and any(name.startswith("apgd") for name, _ in members):
        members = [(name, a) for name, a in members if name.startswith("apgd")]
    if not members:
        raise RobustlabError(
            "this AutoAttack has no gradient member to run on the surrogates; add one "
            "(apgd-ce, apgd-dlr, apgd-t, fab, fab-t) or name them in surrogate_attacks"
        )
    return members


def msa_stages(
    model: nn.Module,
    surrogates: Sequence[tuple[str, nn.Module]],
    ensemble: AutoAttack,
    members: list[tuple[str, Attack]] | None = None,
) -> list[Stage]:
    """The plain stage (the whole ensemble on ``model``), then one stage per surrogate with
    ``members`` (default: :func:`surrogate_members` of the ensemble)."""
    gradient = surrogate_members(ensemble) if members is None else members
    plain: Stage = (PLAIN, model, ensemble.components())
    return [plain, *((name, s, gradient) for name, s in surrogates)]


def msa_batch(
    model: nn.Module, stages: Sequence[Stage], x: torch.Tensor, y: torch.Tensor
) -> MSABatch:
    """Run the stages on one evaluation batch, judging every candidate with ``model`` on the
    whole batch (models in eval mode with frozen parameters, as in :meth:`Attack.run`)."""
    with torch.no_grad():
        clean_pred = infer(model, x).argmax(1)
    best = Best(x, unbroken(clean_pred != y))
    pred = clean_pred.clone()
    out = MSABatch(best.x, clean_pred, pred, [None] * len(x))

    def judge(candidate: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Whether each candidate fools ``model`` judged on the whole batch (the other points
        carrying their kept examples); remembers the answers."""
        trial = best.x.clone()
        trial[idx] = candidate
        with torch.no_grad():
            logits = infer(model, trial)[idx]
        pred[idx] = logits.argmax(1)
        return success(logits, y[idx], None)

    for stage, attacked, members in stages:
        for member, attack in members:
            name = f"{stage}/{member}"
            run_member(name, attack, attacked, x, y, best, judge, out.broken_by, out.seconds)
    with torch.no_grad():
        final = infer(model, best.x).argmax(1)
    out.disagreements = int(((final == y) == best.done).sum())
    return out


def _named(
    model: nn.Module, surrogates: Sequence[tuple[str, nn.Module]] | None
) -> list[tuple[str, nn.Module]]:
    """The surrogates given, else the model's declared ones; checked names and modules."""
    named = surrogates_for(model) if surrogates is None else list(surrogates)
    if not named:
        raise RobustlabError("MSA needs at least one surrogate")
    names = [name for name, _ in named]
    if len(set(names)) != len(names) or PLAIN in names or not all(names):
        raise RobustlabError(
            f"surrogate names must be distinct, non-empty and not '{PLAIN}', got {names}"
        )
    for name, s in named:
        if not isinstance(s, nn.Module):
            raise RobustlabError(f"surrogate '{name}' is not a torch module")
    return named


def evaluate_msa(
    model: nn.Module,
    data: UserData,
    surrogates: Sequence[tuple[str, nn.Module]] | None = None,
    *,
    norm: str = "linf",
    eps: float,
    version: str = "standard",
    attacks: tuple[str, ...] = (),
    surrogate_attacks: tuple[str, ...] = (),
    n: int | None = None,
    batch_size: int = 250,
    device: str = "cpu",
    model_info: dict[str, object] | None = None,
    seed: int = 0,
    progress: bool = True,
    fold_batchnorm: bool = True,
    resume: str | Path | None = None,
    keep_resume: bool = False,
    engine: str = "auto",
    processes: Processes | None = None,
) -> MSARecord:
    """MSA robust accuracy of the defended ``model`` on the first ``n`` points of ``data``.

    ``surrogates``: ``[(name, module), ...]`` taking the same inputs as ``model`` (default:
    the ones it declares, :func:`~robustlab.models.structure.declare_surrogates`).
    ``version`` / ``attacks`` choose the AutoAttack ensemble as for :class:`AutoAttack`;
    ``surrogate_attacks`` the members run on each surrogate (default: the ensemble's
    gradient members), at the version's budgets.
    ``batch_size`` is the evaluation batch: the points attacked and judged together.
    ``resume`` / ``keep_resume``: a progress file per finished batch, as for
    :func:`~robustlab.evaluate.robust.evaluate_curve` (its key covers the surrogates too).
    ``engine``: what runs the defended model's forward-only passes (judging, Square), as
    for :func:`~robustlab.evaluate.robust.evaluate`; surrogates always run in PyTorch.
    ``processes``: the batches shared among torchrun's processes, as for
    :func:`~robustlab.evaluate.robust.evaluate_curve`.
    """
    processes = processes or Processes()
    with together(processes):
        check_engine(engine)
        data = as_dataset(data)
        ensemble = AutoAttack(norm=norm, eps=eps, version=version, attacks=attacks, seed=seed)
        members = surrogate_members(ensemble, surrogate_attacks)
        total = checked_points(data, n, batch_size)
        named = _named(model, surrogates)
    warnings: list[str] = [ONE_CLASS_WARNING] if data.num_classes < 2 else []
    # one private copy of the model and its surrogates together, so the parts they share
    # stay shared (BatchNorm folded, channels_last on CPU, as evaluate's)
    bundle = _fast_copy(
        nn.ModuleList([model, *(s for _, s in named)]), data, device, None, fold_batchnorm
    )
    assert isinstance(bundle, nn.ModuleList)  # a deep copy of one, or the one itself
    judge = bundle[0]
    stages = msa_stages(
        judge,
        [(name, bundle[1 + k]) for k, (name, _) in enumerate(named)],
        ensemble,
        members,
    )

    def key() -> str:
        """The run key: the surrogates' weights and names are part of it."""
        everything = nn.ModuleList([model, *(s for _, s in named)])
        config = {"msa": [name for name, _ in named], "on_surrogates": [m for m, _ in members]}
        return run_key([ensemble], everything, data, total, batch_size, seed, config)

    def check(path: Path, done: dict[int, Batch]) -> None:
        """Stored MSA batches also count the points whose outcome changed in the last pass."""
        for batch in done.values():
            found = batch.get("disagreements")
            if not isinstance(found, int) or isinstance(found, bool) or found < 0:
                raise RobustlabError(
                    f"progress file {path} is damaged or was edited; delete it to start the "
                    "evaluation over"
                )

    resume_path = Path(resume) if resume is not None else None
    shard = open_shard(processes, data, total, batch_size, 1, key, resume_path, check)
    with ExitStack() as stack:
        stack.enter_context(frozen_eval(judge))
        first = slice(0, min(total, batch_size))
        probe = _batch_of(judge, data.x[first], device)
        choice = stack.enter_context(shared_engine(processes, judge, probe, engine))
        for k in range(len(named)):
            stack.enter_context(frozen_eval(bundle[1 + k], warn_train_mode=False))
        bar = stack.enter_context(shard_bar(shard, "msa", progress))
        x0, y0 = data.x[first].to(device), data.y[first].to(device)
        warnings += on_rank_zero(processes, lambda: masking_checks(judge, x0, y0))
        attack_batches(
            shard,
            seed,
            lambda start, end: _attack_batch(judge, stages, ensemble, data, start, end, device),
            bar.update,
        )
    done, resumed = merged(shard)
    entries = [done[s]["per_eps"]["0"] for s in sorted(done)]
    seconds: dict[str, float] = {}
    for entry in entries:
        for k, v in entry["seconds"].items():
            seconds[k] = seconds.get(k, 0.0) + v
    disagreements = sum(int(done[s]["disagreements"]) for s in done)
    record = _record(
        [r for entry in entries for r in entry["rows"]],
        seconds,
        stages,
        ensemble,
        total=total,
        data=data,
        model_info=model_info,
        seed=seed,
        batch_size=batch_size,
        elapsed=sum(entry["total_s"] for entry in entries),
        warnings=warnings,
        disagreements=disagreements,
    )
    record.resumed_batches = resumed
    record.engine = choice.as_dict()
    record.world_size = processes.world_size
    if shard.path is not None and not keep_resume:
        shard.path.unlink(missing_ok=True)
    return record


def _attack_batch(
    judge: nn.Module,
    stages: Sequence[Stage],
    ensemble: AutoAttack,
    data: Dataset,
    start: int,
    end: int,
    device: str,
) -> dict[str, Any]:
    """MSA on one evaluation batch, as a progress-file entry: per-sample rows, seconds per
    member, and how many points changed outcome in the last pass over the batch."""
    t0 = time.perf_counter()
    x = _batch_of(judge, data.x[start:end], device)
    y = data.y[start:end].to(device)
    batch = msa_batch(judge, stages, x, y)
    if not bool(ensemble.threat.contains(x, batch.x_adv).all()):
        raise RuntimeError(f"MSA left its threat model {ensemble.threat}: a bug")
    norms = ensemble.threat.norms(batch.x_adv - x)
    unbroken_by = torch.tensor([b is None for b in batch.broken_by], device=y.device)
    robust = (batch.clean_pred == y) & unbroken_by
    rows = sample_rows(start, y, batch.clean_pred, batch.final_pred, robust, batch.broken_by, norms)
    entry = {
        "rows": rows,
        "seconds": {k: round(v, 4) for k, v in batch.seconds.items()},
        "total_s": round(time.perf_counter() - t0, 4),
    }
    return {"start": start, "per_eps": {"0": entry}, "disagreements": batch.disagreements}


def _record(
    rows: list[dict[str, object]],
    seconds: dict[str, float],
    stages: Sequence[Stage],
    ensemble: AutoAttack,
    *,
    total: int,
    data: Dataset,
    model_info: dict[str, object] | None,
    seed: int,
    batch_size: int,
    elapsed: float,
    warnings: list[str],
    disagreements: int,
) -> MSARecord:
    """The record of an MSA run from its per-sample rows and per-member seconds."""
    broken: dict[str, int] = {}
    for r in rows:
        if r["broken_by"] is not None:
            broken[str(r["broken_by"])] = broken.get(str(r["broken_by"]), 0) + 1
    left = sum(r["clean_pred"] == r["label"] for r in rows)
    per_attack: list[AttackStep] = []
    steps: list[StageStep] = []
    for stage, _, members in stages:
        stage_broken, stage_seconds = 0, 0.0
        for member, _ in members:
            key = f"{stage}/{member}"
            left -= broken.get(key, 0)
            stage_broken += broken.get(key, 0)
            stage_seconds += seconds.get(key, 0.0)
            per_attack.append(
                {
                    "attack": key,
                    "robust_accuracy_after": left / total,
                    "broken": broken.get(key, 0),
                    "seconds": round(seconds.get(key, 0.0), 3),
                }
            )
        steps.append(
            {
                "stage": stage,
                "robust_accuracy_after": left / total,
                "broken": stage_broken,
                "seconds": round(stage_seconds, 3),
            }
        )
    notes = list(warnings)
    square = sum(v for k, v in broken.items() if k.removeprefix(f"{PLAIN}/") in BLACK_BOX)
    bb = black_box_warning(square, total)
    if bb:
        notes.append(bb)
    plain = steps[0]["robust_accuracy_after"]
    robust = sum(bool(r["robust"]) for r in rows) / total
    if robust < plain:
        notes.append(
            f"the surrogates broke {round((plain - robust) * total)} of {total} points that "
            f"plain AutoAttack missed: plain AutoAttack overstates this defence's robust "
            f"accuracy ({100 * plain:.2f} % against MSA's {100 * robust:.2f} %)"
        )
    if disagreements:
        notes.append(
            f"{disagreements} points changed outcome in the last pass over their batch (every "
            "point at its final example): the defended forward depends on its batch"
        )
    config: dict[str, object] = {
        "name": "msa",
        "surrogates": [stage for stage, _, _ in stages[1:]],
        "surrogate_attacks": [member for member, _ in stages[1][2]],
        "autoattack": ensemble.config(),
    }
    return MSARecord(
        clean_accuracy=sum(r["clean_pred"] == r["label"] for r in rows) / total,
        robust_accuracy=robust,
        n=total,
        threat_model=ensemble.threat.as_dict(),
        attack=config,
        model=dict(model_info or {}),
        data=data.name,
        elapsed_s=round(elapsed, 3),
        seed=seed,
        per_attack=per_attack,
        warnings=notes,
        batch_size=batch_size,
        plain_robust_accuracy=plain,
        stages=steps,
        final_batch_disagreements=disagreements,
        samples=rows,
    )

"""Robust accuracy of a model under an attack or ensemble, as typed, JSON-able records.

One run can cover several eps of one norm (a robustness curve, per-sample worst case along
it), keeps a per-sample table, and can checkpoint per batch so that a killed evaluation
resumes without redoing finished batches.
"""

from __future__ import annotations

import csv
import io
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import nn

from ..attacks.base import Attack
from ..core.checks import check_batch, check_batch_size
from ..core.distributed import Processes, together
from ..core.guard import frozen_eval
from ..data import Dataset
from ..data.convert import UserData, as_dataset
from ..errors import RobustlabError
from ..io import starts_with
from ..models.engine import check_engine, infer
from ..version import __version__
from .checks import black_box_warning, masking_checks
from .fast import fast_copy
from .progress import run_key
from .sharded import attack_batches, merged, on_rank_zero, open_shard, shard_bar, shared_engine


class AttackStep(TypedDict):
    """One attack of an ensemble in a record: robust accuracy after it, what it broke, its time."""

    attack: str
    robust_accuracy_after: float
    broken: int
    seconds: float


@dataclass
class EvalRecord:
    """The result of evaluating one model under one attack on ``n`` test points."""

    clean_accuracy: float
    robust_accuracy: float
    n: int
    threat_model: dict[str, object]
    attack: dict[str, object]
    model: dict[str, object]
    data: str
    elapsed_s: float
    seed: int
    per_attack: list[AttackStep] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    resumed_batches: int = 0
    batch_size: int | None = None  # the evaluation batch: points attacked (and judged) together
    engine: dict[str, object] | None = None  # what ran the forward-only passes, and why
    world_size: int = 1  # processes that shared the batches (torchrun); elapsed_s sums them
    created: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")
    )
    robustlab_version: str = __version__
    kind: str = "eval"
    # the run this record belongs to: the records of one robustness curve share it
    run: str = field(default_factory=lambda: uuid.uuid4().hex)
    samples: list[dict[str, object]] = field(default_factory=list, repr=False)

    def to_dict(self, *, samples: bool = False) -> dict[str, Any]:
        """JSON-able form; without the per-sample table (written beside it) unless ``samples``
        (what the results store takes: ``ResultStore.add`` stores it in its own table)."""
        d = asdict(self)
        if not samples:
            d.pop("samples")
        return d


SAMPLE_COLUMNS = (
    "eps",
    "index",
    "label",
    "clean_pred",
    "final_pred",
    "robust",
    "broken_by",
    "perturbation_norm",
)
SAMPLES_HEADER = ",".join(SAMPLE_COLUMNS).encode() + b"\r\n"
is_samples_csv = starts_with(SAMPLES_HEADER)  # recognises the per-sample CSV robustlab wrote
ONE_CLASS_WARNING = (
    "the data has a single class, so accuracy on it is meaningless (always answering that "
    "class scores 100 %)"
)


def samples_csv(records: Sequence[EvalRecord]) -> str:
    """The per-sample table of evaluation records as CSV text (one row per point and eps)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SAMPLE_COLUMNS)
    writer.writeheader()
    for rec in records:
        for row in rec.samples:
            writer.writerow({"eps": rec.threat_model["eps"], **row})
    return buf.getvalue()


def checked_points(data: Dataset, n: int | None, batch_size: int) -> int:
    """How many points an evaluation covers (the first ``n``, default all), after checking
    them and the batch size; one clear sentence for a bad value."""
    total = len(data) if n is None else n
    if total < 1:
        raise RobustlabError(f"n must be >= 1, got {total}")
    if total > len(data):
        raise RobustlabError(f"asked for n={total} points but the test split has only {len(data)}")
    check_batch_size(batch_size)
    check_batch(data.x[:total], data.y[:total], None)
    return total


def evaluate(
    model: nn.Module,
    data: UserData,
    attack: Attack,
    *,
    n: int | None = None,
    batch_size: int = 250,
    device: str = "cpu",
    model_info: dict[str, object] | None = None,
    seed: int = 0,
    progress: bool = True,
    resume: str | Path | None = None,
    fold_batchnorm: bool = True,
    keep_resume: bool = False,
    engine: str = "auto",
    processes: Processes | None = None,
) -> EvalRecord:
    """Clean and robust accuracy of ``model`` on the first ``n`` points of ``data``.

    ``data``: a robustlab Dataset, an ``(x, y)`` pair, a ``TensorDataset`` or a ``DataLoader``.
    A point counts as robust only if it is classified correctly both clean and under attack;
    every adversarial example is checked to lie inside the attack's threat model.
    ``engine`` runs the forward-only passes (``auto``, ``torch``, ``onnxruntime``;
    :mod:`robustlab.models.engine`); the record names the one that ran. ``processes``:
    the batches shared among torchrun's processes, as for :func:`evaluate_curve`.
    """
    return evaluate_curve(
        model,
        data,
        [attack],
        n=n,
        batch_size=batch_size,
        device=device,
        model_info=model_info,
        seed=seed,
        progress=progress,
        resume=resume,
        fold_batchnorm=fold_batchnorm,
        keep_resume=keep_resume,
        engine=engine,
        processes=processes,
    )[0]


def _run(
    attack: Attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, list[str | None], dict[str, float]]:
    """Adversarial examples, the sub-attack that broke each point, and seconds per sub-attack."""
    t0 = time.perf_counter()
    detailed = getattr(attack, "run_detailed", None)
    if detailed is not None:
        res = detailed(model, x, y)
        return res.x_adv, res.broken_by, res.seconds
    x_adv = attack.run(model, x, y)
    with torch.no_grad():
        hit = infer(model, x_adv).argmax(1) != y
    names: list[str | None] = [attack.name if h else None for h in hit.tolist()]
    return x_adv, names, {attack.name: time.perf_counter() - t0}


def evaluate_curve(
    model: nn.Module,
    data: UserData,
    attacks: Sequence[Attack],
    *,
    n: int | None = None,
    batch_size: int = 250,
    device: str = "cpu",
    model_info: dict[str, object] | None = None,
    seed: int = 0,
    progress: bool = True,
    resume: str | Path | None = None,
    channels_last: bool | None = None,
    fold_batchnorm: bool = True,
    keep_resume: bool = False,
    engine: str = "auto",
    processes: Processes | None = None,
) -> list[EvalRecord]:
    """One record per attack, for attacks of one norm at growing eps (a robustness curve).

    Per-sample worst case along the curve: an example that breaks a point at a smaller eps
    also lies in every larger ball, so that point stays broken and is not attacked again.
    Robust accuracy therefore never rises with eps, and the curve costs less than separate runs.
    With ``resume`` (a file path), each finished batch is recorded there; a run started again
    with the same model, points and settings (however the model's file was named) skips
    those batches and gives the same result. The file is removed at the end unless
    ``keep_resume`` (the CLI removes it, through ``io.resume_state``, only after every output
    was written). The attacks run
    on a private copy with BatchNorm folded into the layer before it (``fold_batchnorm``)
    and, on CPU, channels_last weights (``channels_last``; None decides): the same function
    to float rounding, fewer and faster passes. Forward-only passes (clean, checking,
    Square's queries) run through ``engine``: ONNX Runtime where it is installed, agrees with
    PyTorch on the first batch and is faster (``auto``), PyTorch otherwise.

    Under torchrun (``processes``, from :func:`robustlab.core.distributed.start`), each
    process attacks its round-robin share of whole batches and keeps them in a progress file
    of its own beside ``resume`` (:mod:`robustlab.evaluate.sharded`); every process returns
    the merged records, equal sample for sample to one process's (same seed, batch size,
    engine and thread count), stating the ``world_size``.
    """
    processes = processes or Processes()
    with together(processes):
        if not attacks:
            raise RobustlabError("no attack to evaluate")
        check_engine(engine)
        data = as_dataset(data)
        norms = {a.threat.norm for a in attacks}
        if len(norms) > 1:
            raise RobustlabError(
                f"a robustness curve needs one norm, got {', '.join(sorted(norms))}"
            )
        total = checked_points(data, n, batch_size)
    order = sorted(range(len(attacks)), key=lambda i: attacks[i].threat.eps)
    shard = open_shard(
        processes,
        data,
        total,
        batch_size,
        len(attacks),
        lambda: run_key(attacks, model, data, total, batch_size, seed),
        Path(resume) if resume is not None else None,
    )
    warnings: list[str] = [ONE_CLASS_WARNING] if data.num_classes < 2 else []
    name = attacks[0].config().get("name")
    model = _fast_copy(model, data, device, channels_last, fold_batchnorm)
    first = slice(0, min(total, batch_size))
    probe = _batch_of(model, data.x[first], device)
    with (
        frozen_eval(model),
        shared_engine(processes, model, probe, engine) as choice,
        shard_bar(shard, str(name), progress) as bar,
    ):
        x0, y0 = data.x[first].to(device), data.y[first].to(device)
        warnings += on_rank_zero(processes, lambda: masking_checks(model, x0, y0))
        attack_batches(
            shard,
            seed,
            lambda start, end: _attack_batch(model, data, attacks, order, start, end, device),
            bar.update,
        )
    done, resumed = merged(shard)
    records = _records(attacks, done, total, data, model_info, seed, warnings)
    for rec in records:
        rec.resumed_batches = resumed
        rec.batch_size = batch_size
        rec.engine = choice.as_dict()
        rec.world_size = processes.world_size
    if shard.path is not None and not keep_resume:
        shard.path.unlink(missing_ok=True)
    return records


def _is_channels_last(model: nn.Module) -> bool:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv is not None and conv.weight.is_contiguous(memory_format=torch.channels_last)


def _fast_copy(
    model: nn.Module, data: Dataset, device: str, channels_last: bool | None, fold: bool
) -> nn.Module:
    """The private copy the attacks see: BatchNorm folded, channels_last for convolutional
    models on CPU (the caller's model is never changed). ``None`` decides by device."""
    if channels_last is None:
        has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
        channels_last = device == "cpu" and has_conv and data.x.dim() == 4
    return fast_copy(model, channels_last=channels_last, fold=fold)


def _batch_of(model: nn.Module, x: torch.Tensor, device: str) -> torch.Tensor:
    """Inputs on the device, in the memory format of the model's weights."""
    x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if _is_channels_last(model) else x


def _attack_batch(
    model: nn.Module,
    data: Dataset,
    attacks: Sequence[Attack],
    order: list[int],
    start: int,
    end: int,
    device: str,
) -> dict[str, Any]:
    """Attack one batch at every eps (smallest first); per-sample rows and timings per eps."""
    t0 = time.perf_counter()
    x = _batch_of(model, data.x[start:end], device)
    y = data.y[start:end].to(device)
    with torch.no_grad():
        clean_pred = infer(model, x).argmax(1)
    alive = clean_pred == y
    x_adv = x.clone()
    broken: list[str | None] = [None] * len(x)
    share = (time.perf_counter() - t0) / len(attacks)
    out: dict[str, Any] = {"start": start, "per_eps": {}}
    for i in order:
        attack = attacks[i]
        t1 = time.perf_counter()
        seconds: dict[str, float] = {}
        idx = alive.nonzero().flatten()
        if len(idx) and attack.threat.eps > 0:  # an eps-0 ball holds the input alone
            adv, names, seconds = _run(attack, model, x[idx], y[idx])
            for k, (j, who) in enumerate(zip(idx.tolist(), names, strict=True)):
                if who is not None:
                    x_adv[j] = adv[k]
                    broken[j] = f"{who}@{attack.threat.eps:g}" if len(attacks) > 1 else who
        if not bool(attack.threat.contains(x, x_adv).all()):
            raise RuntimeError(f"attack {attack.config()} left its threat model: a bug")
        with torch.no_grad():
            final_pred = infer(model, x_adv).argmax(1)
        alive &= final_pred == y
        norms = attack.threat.norms(x_adv - x)
        rows = sample_rows(start, y, clean_pred, final_pred, alive, broken, norms)
        out["per_eps"][str(i)] = {
            "rows": rows,
            "seconds": {k: round(v, 4) for k, v in seconds.items()},
            "total_s": round(time.perf_counter() - t1 + share, 4),
        }
    return out


def sample_rows(
    start: int,
    y: torch.Tensor,
    clean_pred: torch.Tensor,
    final_pred: torch.Tensor,
    robust: torch.Tensor,
    broken_by: Sequence[str | None],
    norms: torch.Tensor,
) -> list[dict[str, Any]]:
    """The per-sample rows of one batch starting at point ``start`` (SAMPLE_COLUMNS but eps)."""
    return [
        {
            "index": start + j,
            "label": int(y[j]),
            "clean_pred": int(clean_pred[j]),
            "final_pred": int(final_pred[j]),
            "robust": bool(robust[j]),
            "broken_by": broken_by[j],
            # the size of the example that broke it (0: misclassified clean); none for a
            # point no attack broke (no example to measure)
            "perturbation_norm": None if bool(robust[j]) else round(float(norms[j]), 6),
        }
        for j in range(len(y))
    ]


def _records(
    attacks: Sequence[Attack],
    done: dict[int, dict[str, Any]],
    total: int,
    data: Dataset,
    model_info: dict[str, object] | None,
    seed: int,
    warnings: list[str],
) -> list[EvalRecord]:
    records = []
    run = uuid.uuid4().hex  # one key for the records of this curve
    for i, attack in enumerate(attacks):
        rows = [r for s in sorted(done) for r in done[s]["per_eps"][str(i)]["rows"]]
        clean = sum(r["clean_pred"] == r["label"] for r in rows)
        robust = sum(bool(r["robust"]) for r in rows)
        elapsed = sum(done[s]["per_eps"][str(i)]["total_s"] for s in done)
        seconds: dict[str, float] = {}
        for s in done:
            for k, v in done[s]["per_eps"][str(i)]["seconds"].items():
                seconds[k] = seconds.get(k, 0.0) + v
        eps = attack.threat.eps
        here = (
            [
                r
                for r in rows
                if r["broken_by"] is not None and str(r["broken_by"]).endswith(f"@{eps:g}")
            ]
            if len(attacks) > 1
            else rows
        )
        broken_here: dict[str, int] = {}
        for r in here:
            if r["broken_by"] is not None:
                sub = str(r["broken_by"]).split("@")[0]
                broken_here[sub] = broken_here.get(sub, 0) + 1
        before = robust + sum(broken_here.values())
        per_attack: list[AttackStep] = []
        for sub in seconds:
            before -= broken_here.get(sub, 0)
            per_attack.append(
                {
                    "attack": sub,
                    "robust_accuracy_after": before / total,
                    "broken": broken_here.get(sub, 0),
                    "seconds": round(seconds[sub], 3),
                }
            )
        notes = list(warnings)
        bb = black_box_warning(sum(broken_here.get(b, 0) for b in ("square",)), total)
        if bb and len(seconds) > 1:
            notes.append(bb)
        records.append(
            EvalRecord(
                clean_accuracy=clean / total,
                robust_accuracy=robust / total,
                n=total,
                threat_model=attack.threat.as_dict(),
                attack=attack.config(),
                model=dict(model_info or {}),
                data=data.name,
                elapsed_s=round(elapsed, 3),
                seed=seed,
                per_attack=per_attack,
                warnings=notes,
                run=run,
                samples=rows,
            )
        )
    return records

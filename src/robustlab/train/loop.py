"""The one training loop: batches from a sampler (each replayed as often as the method asks),
a method and add-on hooks around each step, a divergence check per epoch; ``train`` runs it
seeded and resumable per epoch, with the held-out robustness check when asked for."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, Sampler
from tqdm import tqdm

from ..core.checks import check_batch_size
from ..core.device import resolve_device
from ..core.distributed import Processes, all_gather, broadcast, everyone, peer_failed
from ..core.guard import evaluating
from ..data import Dataset, DataSplits, load_data
from ..errors import RobustlabError, RunStopped
from ..io import atomic_write
from ..models import build_model
from ..models.checkpoint import MANIFEST, model_config, read_torch_file, save_checkpoint
from .distributed import (
    Replicas,
    check_shares,
    effective_sync_bn,
    processes_record,
    replicate,
)
from .heldout import DEFAULT_HOLDOUT, HeldOutCheck
from .methods import (
    METHODS,
    AdversarialMethod,
    EpochEnd,
    Hook,
    Method,
    Step,
    make_method,
    require_finite,
)
from .recipes import recipe_for

RESUME = "resume.pt"


#: Fields of ``TrainConfig`` that are a method's own options (None: the method's default).
METHOD_OPTIONS = ("eps", "norm", "steps", "alpha_ratio", "eps_warmup", "beta", "replays")
#: Fields of ``TrainConfig`` for the held-out check, which needs an adversarial method.
CHECK_OPTIONS = ("early_stop", "overfit_drop")
_RECORDED_WHEN_SET = ("alpha_ratio", "replays", *CHECK_OPTIONS)


def _flag(option: str) -> str:
    """A config field as its command-line option."""
    return "--" + option.replace("_", "-")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; unset fields take the method's recipe defaults.

    Method options (``METHOD_OPTIONS``) are handed to the method, which validates them; one it
    does not take is refused, and one left None takes the method's own default (the manifest's
    ``method_config`` says what was used). The others are the loop's. ``early_stop`` keeps the
    epoch of best held-out robust accuracy; ``overfit_drop`` > 0 stops training and rolls back
    when it falls that much below its best (see ``heldout``); both need an adversarial method
    and held-out training data (``DataSplits.calibration``).
    """

    arch: str = "resnet8"
    data: str = "mnist5k"
    method: str = "standard"
    eps: float | None = None
    norm: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    steps: int | None = None
    eps_warmup: float | None = None
    beta: float | None = None
    seed: int = 0
    channels_last: bool = True
    arch_options: dict[str, Any] = field(default_factory=dict)
    alpha_ratio: float | None = None
    replays: int | None = None
    early_stop: bool = False
    overfit_drop: float | None = None

    def _refuse_inapplicable(self) -> None:
        """Refuse, in one sentence, an option set here that the method does not take."""
        cls = METHODS.get(self.method)
        if cls is None:
            return  # recipe_for names the unknown method
        # every registered method is a dataclass; the Method ABC they share is not one
        takes = {f.name for f in fields(cls) if f.init}  # type: ignore[arg-type]
        adversarial = issubclass(cls, AdversarialMethod)
        for option in METHOD_OPTIONS + CHECK_OPTIONS:
            value = getattr(self, option)
            if value is None or value is False:
                continue
            if option in CHECK_OPTIONS and adversarial:
                continue
            if option in METHOD_OPTIONS and option in takes:
                continue
            own = [_flag(o) for o in METHOD_OPTIONS if o in takes]
            if adversarial:
                own += [_flag(o) for o in CHECK_OPTIONS]
            raise RobustlabError(
                f"{_flag(option)} does not apply to method '{self.method}' "
                f"({'its options: ' + ', '.join(own) if own else 'it takes no options'})"
            )

    def record(self) -> dict[str, Any]:
        """The config as manifests, resume states and the model cache record it: fields added
        for fast and free AT and the held-out check only when set, so the records of runs that
        do not use them look as before."""
        out = asdict(self)
        for option in _RECORDED_WHEN_SET:
            if out[option] is None or out[option] is False:
                del out[option]
        return out

    @property
    def checked(self) -> bool:
        """Whether the run measures held-out robust accuracy each epoch (early stopping or the
        catastrophic-overfitting check)."""
        return self.early_stop or (self.overfit_drop or 0) > 0

    def resolved(self) -> TrainConfig:
        """This config with every unset field filled from the recipe of its method, checked."""
        recipe = recipe_for(self.method)
        self._refuse_inapplicable()
        filled = {k: recipe[k] for k in recipe if getattr(self, k, None) is None}
        cfg = replace(self, **filled)
        require_finite(**{f.name: getattr(cfg, f.name) for f in fields(cfg)})
        if cfg.overfit_drop is not None and not 0 <= cfg.overfit_drop <= 1:
            raise RobustlabError(
                f"the overfitting check's drop must be a fraction in [0, 1], got {cfg.overfit_drop}"
            )
        if cfg.epochs is None or cfg.epochs < 1:
            raise RobustlabError(f"epochs must be >= 1, got {cfg.epochs}")
        check_batch_size(cfg.batch_size)
        if cfg.lr is None or not cfg.lr > 0:
            raise RobustlabError(f"learning rate must be > 0, got {cfg.lr}")
        if not 0 <= cfg.momentum < 1:
            raise RobustlabError(f"momentum must be in [0, 1), got {cfg.momentum}")
        if cfg.weight_decay is not None and cfg.weight_decay < 0:
            raise RobustlabError(f"weight decay must be >= 0, got {cfg.weight_decay}")
        return cfg

    def make_method(self) -> Method:
        """The training strategy this config names, given the options it takes from here."""
        self._refuse_inapplicable()
        cls = METHODS.get(self.method)
        # every registered method is a dataclass; the Method ABC they share is not one
        takes = [f.name for f in fields(cls) if f.init and f.name in METHOD_OPTIONS] if cls else []  # type: ignore[arg-type]
        options = {k: getattr(self, k) for k in takes if getattr(self, k) is not None}
        return make_method(self.method, **options)


@dataclass
class TrainResult:
    """A trained model, where its checkpoint lies, and its manifest."""

    model: nn.Module
    path: Path
    manifest: dict[str, Any]


class Diverged(RobustlabError):
    """Training stopped because the loss or the weights became NaN or infinite."""

    def __init__(self, epoch: int, loss: float) -> None:
        super().__init__(
            f"training diverged in epoch {epoch}: the loss or a weight became NaN or infinite "
            f"(mean loss of the epoch {loss:.4g})"
        )
        self.epoch = epoch


class Replayed:
    """Each batch of ``batches`` ``times`` times in a row (free AT's minibatch replays)."""

    def __init__(self, batches: BatchSampler, times: int) -> None:
        self.batches, self.times = batches, times

    def __len__(self) -> int:
        """Steps per epoch: batches times replays."""
        return len(self.batches) * self.times

    def __iter__(self) -> Iterator[list[int]]:
        """Every batch, repeated."""
        for indices in self.batches:
            for _ in range(self.times):
                yield indices


class EpochSampler(Sampler[int]):
    """A new random order of the ``n`` training samples each epoch, drawn from ``generator``.

    Its state lives in the generator (which resume restores), so ``set_epoch`` has nothing to
    do; it is there so torch's ``DistributedSampler`` (which derives each epoch's order from a
    seed and the epoch) can take this sampler's place in the loop.
    """

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n = n
        self.generator = generator

    def __len__(self) -> int:
        """Samples per epoch."""
        return self.n

    def __iter__(self) -> Iterator[int]:
        """This epoch's order: one permutation drawn from the generator."""
        yield from torch.randperm(self.n, generator=self.generator).tolist()

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do: the order comes from the generator's state."""


def lr_at(step: int, total: int, lr: float, warmup: float = 0.15) -> float:
    """One-cycle schedule: linear warm-up over the first 15 % of steps, then cosine to zero."""
    w = max(1, int(total * warmup))
    if step < w:
        return lr * (step + 1) / w
    return 0.5 * lr * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


def _all_finite(model: nn.Module) -> bool:
    """Whether every floating-point weight and buffer of the model is finite."""
    return all(
        bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point()
    )


def fit(
    model: nn.Module,
    method: Method,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    sampler: Sampler[int],
    *,
    batch_size: int,
    epochs: int,
    lr: float,
    gen: torch.Generator,
    hooks: Sequence[Hook] = (),
    start_epoch: int = 0,
    end_epoch: int | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
    progress: bool = False,
    desc: str = "train",
    replicas: Replicas | None = None,
) -> list[float]:
    """Train epochs ``start_epoch`` to ``end_epoch`` (default ``epochs``) of an ``epochs`` run.

    ``x``, ``y`` are the training set (where batches are gathered, e.g. on the device) and
    ``sampler`` orders it; each batch is replayed ``method.replays`` times, each replay a full
    step, so an epoch makes batches x replays steps; the learning rate follows ``lr_at`` over
    all steps of the run; ``gen`` is the method's generator (its initial seed seeds the random
    starts per sample). ``method`` and then ``hooks`` are called around every step (see
    ``methods``). After each epoch the loss and every weight must be finite, else ``Diverged``
    is raised before any ``end_epoch`` hook (so no state of that epoch is saved).
    Returns the mean batch loss of each epoch run (fewer if a hook stopped training).

    ``replicas`` (``distributed.replicate``) trains under torchrun: the batches are global,
    each process takes its part of each and runs its loss through DDP; the epoch's loss is the
    global batches' and the processes agree on divergence and must hold the same weights.
    """
    rep = replicas if replicas is not None else Replicas.single(model)
    replays = method.replays
    batches = Replayed(BatchSampler(sampler, batch_size, drop_last=False), replays)
    per_epoch = len(batches)  # steps per epoch
    if per_epoch == 0:
        raise RobustlabError("cannot train on an empty training set")
    total = epochs * per_epoch
    end = epochs if end_epoch is None else end_epoch
    around = [method, *hooks]
    unwind = around[::-1]
    history: list[float] = []
    bar = tqdm(
        total=(end - start_epoch) * per_epoch,
        desc=desc,
        disable=not progress,
        file=sys.stderr,
        unit="batch",
        leave=False,
    )
    model.train()
    for hook in around:
        hook.start(model)
    try:
        for epoch in range(start_epoch, end):
            started = time.perf_counter()
            set_epoch = getattr(sampler, "set_epoch", None)
            if set_epoch is not None:
                set_epoch(epoch)
            losses: list[torch.Tensor] = []
            for b, indices in enumerate(batches):
                number = epoch * per_epoch + b
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(number, total, lr)
                index, share = rep.share(torch.tensor(indices, device=x.device))
                xb = x[index].contiguous(memory_format=memory_format)
                step = Step(
                    model,
                    optimizer,
                    xb,
                    y[index],
                    index,
                    epoch,
                    number,
                    total,
                    gen,
                    replay=b % replays,
                    part=rep.rows(len(indices)),
                    processes=rep.processes,
                )
                for hook in around:
                    hook.before_forward(step)
                loss = step.loss = method.loss(rep.forward, step)
                optimizer.zero_grad(set_to_none=True)
                (loss * share).backward()
                for hook in around:
                    hook.after_backward(step)
                optimizer.step()
                for hook in unwind:
                    hook.after_step(step)
                losses.append(loss.detach() * share)
                bar.update(1)
            mean = 0.0
            for value in rep.batch_losses(torch.stack(losses)).tolist():
                mean += value
            mean /= len(losses)
            if not everyone(rep.processes, math.isfinite(mean) and _all_finite(model)):
                raise Diverged(epoch + 1, mean)
            rep.check_identical(epoch + 1)
            history.append(mean)
            bar.set_postfix(epoch=epoch + 1, loss=f"{mean:.3f}")
            end_state = EpochEnd(model, optimizer, epoch + 1, mean, started)
            for hook in around:
                hook.end_epoch(end_state)
            if end_state.stop:
                break
    finally:
        bar.close()
    return history


def accuracy(model: nn.Module, data: Dataset, batch_size: int = 500, device: str = "cpu") -> float:
    """Top-1 accuracy of a model on a dataset, in eval mode (the model's modes are restored)."""
    correct = 0
    with torch.inference_mode(), evaluating(model):
        for i in range(0, len(data), batch_size):
            x = data.x[i : i + batch_size].to(device)
            correct += int((model(x).argmax(1).cpu() == data.y[i : i + batch_size]).sum())
    return correct / len(data)


def _config_key(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config as resume states and manifests record it."""
    return cfg.record()


def _split_key(splits: DataSplits | None) -> str:
    """Which training split a run uses: the calibration hold-out's size and seed (none: 0)."""
    if splits is None or splits.calibration is None:
        return "calibration=0"
    return f"calibration={len(splits.calibration)},seed={splits.seed}"


class _ResumeWriter(Hook):
    """Writes the resume state after every finished epoch (rank 0 only, when ``write``) and
    counts the training time; ``saved`` is the epoch whose state is in the file (0: none).

    The state of every hook in ``stateful`` (``Hook.state``) is saved too, each process's own
    (free AT's perturbation differs between processes). An epoch after which a hook stopped
    training (say, a rollback) is not saved: a run killed before its checkpoint is written
    resumes from the epoch before and stops the same way.
    """

    def __init__(
        self,
        path: Path,
        header: dict[str, Any],
        gens: tuple[torch.Generator, torch.Generator],
        elapsed: float,
        saved: int,
        write: bool = True,
        stateful: Sequence[Hook] = (),
        processes: Processes | None = None,
    ) -> None:
        self.path, self.header, self.gens, self.elapsed = path, header, gens, elapsed
        self.saved, self.write = saved, write
        self.stateful, self.processes = stateful, processes or Processes()

    def kept(self) -> str:
        """What an interrupted or failed run leaves behind, for its error message."""
        if self.saved == 0:
            return "no epoch finished, so nothing was saved"
        return f"the state after epoch {self.saved} stays in {self.path}"

    def _hook_states(self) -> list[list[Any]] | None:
        """Every process's hook states, in rank order (None: no hook has any)."""
        mine = [h.state() for h in self.stateful]
        if all(s is None for s in mine):  # the same hooks on every process, so the same answer
            return None
        return all_gather(self.processes, mine)

    def end_epoch(self, end: EpochEnd) -> None:
        """Save everything a resumed run needs to continue bit for bit."""
        if end.stop:
            self.elapsed += time.perf_counter() - end.started
            return
        hooks = self._hook_states()
        if not self.write:
            self.elapsed += time.perf_counter() - end.started
            self.saved = end.epoch
            return
        state = {
            **self.header,
            "epoch": end.epoch,
            "elapsed": self.elapsed + time.perf_counter() - end.started,
            "model": end.model.state_dict(),
            "optimizer": end.optimizer.state_dict(),
            "gen": self.gens[0].get_state(),
            "attack_gen": self.gens[1].get_state(),
        }
        if hooks is not None:
            state["hooks"] = hooks
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))
        self.elapsed += time.perf_counter() - end.started  # saving is part of training's cost
        self.saved = end.epoch


def _processes_key(processes: Processes, sync_bn: bool) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one about its processes."""
    return {"world_size": processes.world_size, "sync_bn": effective_sync_bn(sync_bn, processes)}


def _check_resumed_processes(out_dir: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse, in one sentence, to resume a run with another number of processes or another
    BatchNorm synchronisation than it was started with (a state of before torchrun: 1 process)."""
    world, was = now["world_size"], saved.get("world_size", 1)
    if was != world:
        raise RobustlabError(
            f"{out_dir} holds an unfinished run of {was} process(es) (torchrun's world size) and "
            f"this run has {world}; resume it with {was} process(es) in all, or choose another "
            "--out or delete its resume.pt"
        )
    if saved.get("sync_bn") != now["sync_bn"]:
        flag = "--sync-bn" if saved.get("sync_bn") else "--no-sync-bn"
        raise RobustlabError(
            f"{out_dir} holds an unfinished run trained with {flag}; resume it with {flag}, or "
            "choose another --out or delete its resume.pt"
        )


def training_splits(cfg: TrainConfig, calibration: int | None = None, seed: int = 0) -> DataSplits:
    """The data of a run: ``calibration`` training samples held out (None: ``DEFAULT_HOLDOUT``
    when the run checks held-out robust accuracy, else none), split with ``seed`` (which only
    counts when some are held out)."""
    if calibration is None:
        calibration = DEFAULT_HOLDOUT if cfg.checked else 0
    return load_data(cfg.data, calibration=calibration, seed=seed if calibration else 0)


def _held_out_check(
    cfg: TrainConfig, method: Method, splits: DataSplits, device: str, processes: Processes
) -> HeldOutCheck | None:
    """The held-out robustness check the config asks for (None: none)."""
    if not cfg.checked:
        return None
    assert isinstance(method, AdversarialMethod)  # the config refuses the check otherwise
    if splits.calibration is None:
        raise RobustlabError(
            "early stopping and the overfitting check measure robust accuracy on held-out "
            "training data: hold some out (--calibration N, N >= 1)"
        )
    return HeldOutCheck(
        splits.calibration,
        method.threat,
        keep_best=cfg.early_stop,
        drop=cfg.overfit_drop or 0.0,
        seed=cfg.seed,
        device=device,
        processes=processes,
    )


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    splits: DataSplits | None = None,
    device: str = "auto",
    progress: bool = True,
    stop_after_epochs: int | None = None,
    hooks: Sequence[Hook] = (),
    processes: Processes | None = None,
    sync_bn: bool = True,
) -> TrainResult:
    """Train a model and write its checkpoint to ``out``; resumes an interrupted run there.

    ``hooks`` are add-ons called around every step after the method's own (see ``methods``);
    those whose ``config()`` is not None are recorded in the manifest (``training.add_ons``)
    and a resumed run must have the same.
    ``stop_after_epochs`` ends the run early as if interrupted (for tests of resumption).
    If training diverges, the resume state of the last finished epoch stays and nothing else
    is written. If a hook stops training early, the checkpoint is written and its manifest says
    after which epoch (``training.stopped_after_epoch``).

    ``processes`` (from ``core.distributed.start``; default one process) trains under torchrun
    with DDP: ``batch_size`` stays the global batch, each process takes its part of it (see
    ``distributed``), and only rank 0 reads and writes the resume state and the checkpoint.
    ``sync_bn`` normalises BatchNorm layers with the whole global batch's statistics, as one
    process does (else each process's part). The manifest's ``processes`` section says both.

    With early stopping or the overfitting check (``TrainConfig.checked``), held-out robust
    accuracy is measured on ``splits.calibration`` after every epoch (``heldout``); without
    ``splits``, ``training_splits`` holds ``DEFAULT_HOLDOUT`` samples out for it. The manifest
    then has ``training.held_out_check`` (with the per-epoch robust accuracies),
    ``training.best_epoch`` (early stopping: the epoch whose weights are kept) and, after a
    collapse, ``training.overfitting`` (the epoch it was detected in and the epoch kept).
    """
    cfg = config.resolved()
    method = cfg.make_method()
    procs = processes if processes is not None else Processes()
    dev = resolve_device(device)
    splits = splits if splits is not None else training_splits(cfg)
    check = _held_out_check(cfg, method, splits, dev, procs)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    resume_path = out_dir / RESUME
    assert cfg.lr is not None and cfg.epochs is not None and cfg.batch_size is not None
    check_shares(len(splits.train), cfg.batch_size, procs)
    torch.manual_seed(cfg.seed)
    model = build_model(  # after seeding: the initial weights depend only on the seed
        cfg.arch,
        in_channels=splits.in_channels,
        num_classes=splits.num_classes,
        image_size=splits.image_size,
        mean=splits.mean,
        std=splits.std,
        **cfg.arch_options,
    ).to(dev)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    # Module.to works in place; torch's overloads of it omit memory_format (accepted at runtime)
    model.to(memory_format=memory_format)  # type: ignore[call-overload]
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay or 0.0,
        nesterov=cfg.momentum > 0,
    )
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    attack_gen = torch.Generator(device=dev).manual_seed(cfg.seed + 1)
    start_epoch, elapsed = 0, 0.0
    add_ons = [c for c in (h.config() for h in hooks) if c is not None]
    checks = [] if check is None else [check]
    stateful = [method, *hooks, *checks]
    processes_key = _processes_key(procs, sync_bn)
    state = None
    if procs.main and resume_path.exists():  # rank 0's disk; the others get it from rank 0
        state = read_torch_file(resume_path, "a training resume state", map_location="cpu")
        if not isinstance(state, dict):
            raise RobustlabError(f"{resume_path} is not a robustlab training resume state")
    state = broadcast(procs, state)
    if state is not None:
        if state.get("config") != _config_key(cfg):
            raise RobustlabError(
                f"{out_dir} holds an unfinished run with a different configuration; "
                "choose another --out or delete its resume.pt"
            )
        if state.get("split", _split_key(None)) != _split_key(splits):
            raise RobustlabError(
                f"{out_dir} holds an unfinished run on another training split (calibration "
                "hold-out size or seed differ); choose another --out or delete its resume.pt"
            )
        if state.get("add_ons", []) != add_ons:
            raise RobustlabError(
                f"{out_dir} holds an unfinished run with other add-ons (such as regularizers); "
                "choose another --out or delete its resume.pt"
            )
        _check_resumed_processes(out_dir, state.get("processes", {}), processes_key)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["gen"])
        attack_gen.set_state(state["attack_gen"])
        saved_hooks = state.get("hooks")  # per process, in rank order
        mine = saved_hooks[procs.rank] if saved_hooks else []
        for hook, saved in zip(stateful, mine, strict=False):
            if saved is not None:
                hook.load_state(saved)
        start_epoch, elapsed = int(state["epoch"]), float(state["elapsed"])
    header: dict[str, Any] = {
        "config": _config_key(cfg),
        "split": _split_key(splits),
        "processes": processes_key,
    }
    if add_ons:
        header["add_ons"] = add_ons
    writer = _ResumeWriter(
        resume_path,
        header,
        (gen, attack_gen),
        elapsed,
        start_epoch,
        write=procs.main,
        stateful=stateful,
        processes=procs,
    )
    end_epoch = cfg.epochs if stop_after_epochs is None else min(cfg.epochs, stop_after_epochs)
    try:
        with replicate(model, procs, sync_bn=sync_bn) as replicas:
            history = fit(
                model,
                method,
                optimizer,
                splits.train.x.to(dev),
                splits.train.y.to(dev),
                EpochSampler(len(splits.train), gen),
                batch_size=cfg.batch_size,
                epochs=cfg.epochs,
                lr=cfg.lr,
                gen=attack_gen,
                hooks=[*hooks, *checks, writer],
                start_epoch=start_epoch,
                end_epoch=end_epoch,
                memory_format=memory_format,
                progress=progress and procs.main,
                desc=f"train {cfg.arch} {method.name}",
                replicas=replicas,
            )
    except Diverged as exc:
        raise RobustlabError(
            f"{exc}; no checkpoint was written and {writer.kept()}; try a lower learning rate"
        ) from None
    except (RunStopped, RuntimeError) as exc:  # stopped, or another process went away
        if isinstance(exc, RuntimeError) and not (procs.distributed and peer_failed(exc)):
            raise
        raise RunStopped(writer.kept()) from None
    model.eval()
    ran = start_epoch + len(history)
    if ran == end_epoch < cfg.epochs:
        return TrainResult(model, out_dir, {"unfinished": True, "epoch": end_epoch})
    if check is not None:
        check.restore(model)
    clean = accuracy(model, splits.test, device=dev)
    training: dict[str, Any] = {**_config_key(cfg), "method_config": method.config()}
    if add_ons:  # hooks that change training (regularizers) say how
        training["add_ons"] = add_ons
    if ran < cfg.epochs:  # a hook stopped training early
        training["stopped_after_epoch"] = ran
    if check is not None:
        training.update(check.record(ran))
    manifest = {
        "model": model_config(
            cfg.arch,
            splits.in_channels,
            splits.num_classes,
            splits.image_size,
            splits.mean,
            splits.std,
            cfg.arch_options,
        ),
        "dataset": splits.info(),
        "training": training,
        "metrics": {"clean_accuracy": clean, "test_samples": len(splits.test)},
        "train_time_s": round(writer.elapsed, 2),
        "processes": processes_record(procs, cfg.batch_size, cfg.lr, sync_bn),
    }
    model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]  # as above
    if procs.main:
        save_checkpoint(model, out_dir, manifest)
        resume_path.unlink(missing_ok=True)
        manifest = json.loads((out_dir / MANIFEST).read_text())
    if procs.distributed:  # no process returns before the checkpoint is written
        dist.barrier()
    return TrainResult(model, out_dir, manifest)

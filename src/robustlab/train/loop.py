"""The one training loop: seeded, resumable per epoch, methods plugged in as strategies."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..core.device import resolve_device
from ..data import Dataset, DataSplits, load_data
from ..errors import RobustlabError
from ..io import atomic_write
from ..models import build_model
from ..models.checkpoint import MANIFEST, model_config, save_checkpoint
from ..version import __version__
from .methods import Method, make_method
from .recipes import recipe_for

RESUME = "resume.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; unset fields take the method's recipe defaults."""

    arch: str = "resnet8"
    data: str = "mnist5k"
    method: str = "standard"
    eps: float | None = None
    norm: str = "linf"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    steps: int | None = None
    eps_warmup: float | None = None
    beta: float = 6.0
    seed: int = 0
    channels_last: bool = True
    arch_options: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        """This config with every unset field filled from the recipe of its method."""
        recipe = recipe_for(self.method)
        filled = {k: recipe[k] for k in recipe if getattr(self, k, None) is None}
        cfg = replace(self, **filled)
        if cfg.epochs is None or cfg.epochs < 1:
            raise RobustlabError(f"epochs must be >= 1, got {cfg.epochs}")
        if cfg.batch_size is None or cfg.batch_size < 1:
            raise RobustlabError(f"batch size must be >= 1, got {cfg.batch_size}")
        if cfg.lr is None or not cfg.lr > 0:
            raise RobustlabError(f"learning rate must be > 0, got {cfg.lr}")
        return cfg

    def make_method(self) -> Method:
        """The training strategy this config names."""
        if self.method == "standard":
            return make_method("standard")
        return make_method(
            self.method,
            eps=self.eps,
            norm=self.norm,
            steps=self.steps or 10,
            eps_warmup=self.eps_warmup or 0.0,
            **({"beta": self.beta} if self.method == "trades" else {}),
        )


@dataclass
class TrainResult:
    """A trained model, where its checkpoint lies, and its manifest."""

    model: nn.Module
    path: Path
    manifest: dict[str, Any]


def lr_at(step: int, total: int, lr: float, warmup: float = 0.15) -> float:
    """One-cycle schedule: linear warm-up over the first 15 % of steps, then cosine to zero."""
    w = max(1, int(total * warmup))
    if step < w:
        return lr * (step + 1) / w
    return 0.5 * lr * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


def accuracy(model: nn.Module, data: Dataset, batch_size: int = 500, device: str = "cpu") -> float:
    """Top-1 accuracy of a model on a dataset, in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(data), batch_size):
            x = data.x[i : i + batch_size].to(device)
            correct += int((model(x).argmax(1).cpu() == data.y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / len(data)


def _save_resume(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _config_key(cfg: TrainConfig) -> dict[str, Any]:
    return asdict(cfg)


def _split_key(splits: DataSplits | None) -> str:
    """Which training split a run uses: the calibration hold-out's size and seed (none: 0)."""
    if splits is None or splits.calibration is None:
        return "calibration=0"
    return f"calibration={len(splits.calibration)},seed={splits.seed}"


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    splits: DataSplits | None = None,
    device: str = "auto",
    progress: bool = True,
    stop_after_epochs: int | None = None,
) -> TrainResult:
    """Train a model and write its checkpoint to ``out``; resumes an interrupted run there.

    ``stop_after_epochs`` ends the run early as if interrupted (for tests of resumption).
    """
    cfg = config.resolved()
    method = cfg.make_method()
    dev = resolve_device(device)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    resume_path = out_dir / RESUME
    splits = splits if splits is not None else load_data(cfg.data, seed=0)
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
    model = model.to(memory_format=memory_format)  # type: ignore[call-overload]
    assert cfg.lr is not None and cfg.epochs is not None and cfg.batch_size is not None
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
    if resume_path.exists():
        try:
            state = torch.load(resume_path, map_location=dev, weights_only=True)
        except Exception as exc:  # a torn or foreign file: say so rather than train over it
            raise RobustlabError(f"cannot read the resume state {resume_path}: {exc}") from None
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
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["gen"])
        attack_gen.set_state(state["attack_gen"])
        start_epoch, elapsed = int(state["epoch"]), float(state["elapsed"])
    x_train, y_train = splits.train.x.to(dev), splits.train.y.to(dev)
    n = len(x_train)
    batches = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * batches
    end_epoch = cfg.epochs if stop_after_epochs is None else min(cfg.epochs, stop_after_epochs)
    bar = tqdm(
        total=(end_epoch - start_epoch) * batches,
        desc=f"train {cfg.arch} {method.name}",
        disable=not progress,
        file=sys.stderr,
        unit="batch",
        leave=False,
    )
    model.train()
    for epoch in range(start_epoch, end_epoch):
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen).to(dev)
        running = torch.zeros((), device=dev)
        for b in range(batches):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch * batches + b, total, cfg.lr)
            idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            x = x_train[idx].contiguous(memory_format=memory_format)
            step = epoch * batches + b
            loss = method.loss(model, x, y_train[idx], (step + 1) / total, attack_gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.detach()
            bar.update(1)
        bar.set_postfix(epoch=epoch + 1, loss=f"{float(running) / batches:.3f}")
        _save_resume(
            resume_path,
            {
                "config": _config_key(cfg),
                "split": _split_key(splits),
                "epoch": epoch + 1,
                "elapsed": elapsed + time.perf_counter() - t0,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "gen": gen.get_state(),
                "attack_gen": attack_gen.get_state(),
            },
        )
        elapsed += time.perf_counter() - t0  # the resume state is part of the cost of training
    bar.close()
    model.eval()
    if end_epoch < cfg.epochs:
        return TrainResult(model, out_dir, {"unfinished": True, "epoch": end_epoch})
    clean = accuracy(model, splits.test, device=dev)
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
        "training": {**_config_key(cfg), "method_config": method.config()},
        "metrics": {"clean_accuracy": clean, "test_samples": len(splits.test)},
        "train_time_s": round(elapsed, 2),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "robustlab_version": __version__,
    }
    model = model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    save_checkpoint(model, out_dir, manifest)
    resume_path.unlink(missing_ok=True)
    manifest = __import__("json").loads((out_dir / MANIFEST).read_text())
    return TrainResult(model, out_dir, manifest)

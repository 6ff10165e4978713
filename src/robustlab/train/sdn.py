"""Training the exits of a multi-exit network (Shallow-Deep Networks, Kaya et al. 2019).

- ``ic-only``: the backbone is frozen (weights and batch-norm statistics); the sum of the
  ICs' cross-entropies trains the heads (Adam).
- ``end-to-end``: everything trains (SGD, one-cycle); the loss is the final exit's
  cross-entropy plus, for each IC k, w_k(t) * CE_k with w_k rising linearly from 0.01 to
  C_k over training, C_k the IC's cumulative cost fraction (about 0.15 ... 0.9), as in SDN.
- adversarial training of the exits (the defence against slowdown attacks): each batch is
  also attacked, with PGD on the average cross-entropy over every exit (``pgd``, the
  "PGD-avg" of DeepSloth) or with DeepSloth examples (``deepsloth``); the loss averages the
  clean and the adversarial batch.

All three are one strategy, ``ExitTraining``, run by the one training loop (``loop.fit``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.deepsloth import DeepSloth
from ..attacks.optim import SteepestStep, ascend
from ..core.guard import evaluating, frozen_eval
from ..core.threat import ThreatModel
from ..data import Dataset
from ..errors import RobustlabError
from ..models.multiexit import MultiExitNetwork, exit_predictions
from .loop import Diverged, EpochSampler, fit
from .methods import Method, Step, require_finite

MODES = ("ic-only", "end-to-end")
ADVERSARIES = ("none", "pgd", "deepsloth")


@dataclass(frozen=True)
class SDNConfig:
    """How to train the exits; ``lr`` defaults to 1e-3 (Adam, ic-only) or 0.05 (SGD, end-to-end)."""

    mode: str = "ic-only"
    epochs: int = 10
    batch_size: int = 128
    lr: float | None = None
    weight_decay: float = 0.0
    adversary: str = "none"
    adv_norm: str = "linf"
    adv_eps: float = 0.0
    adv_steps: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        require_finite(lr=self.lr, weight_decay=self.weight_decay, adv_eps=self.adv_eps)
        if self.mode not in MODES:
            raise RobustlabError(
                f"unknown exit training mode '{self.mode}'; use {' or '.join(MODES)}"
            )
        if self.adversary not in ADVERSARIES:
            raise RobustlabError(
                f"unknown exit adversary '{self.adversary}'; use one of {', '.join(ADVERSARIES)}"
            )
        if self.epochs < 1 or self.batch_size < 1:
            raise RobustlabError(
                f"exit training needs epochs >= 1 and batch size >= 1, got {self.epochs} and "
                f"{self.batch_size}"
            )
        if self.lr is not None and not self.lr > 0:
            raise RobustlabError(f"learning rate must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise RobustlabError(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.adversary != "none":
            ThreatModel(self.adv_norm, self.adv_eps)
            if self.adv_eps <= 0 or self.adv_steps < 1:
                raise RobustlabError(
                    "adversarial training of the exits needs eps > 0 and at least one step"
                )

    @property
    def learning_rate(self) -> float:
        """The learning rate actually used."""
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.mode == "ic-only" else 0.05

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form, with the learning rate used."""
        return {**asdict(self), "lr": self.learning_rate}


def ic_weights(model: MultiExitNetwork, progress: float) -> list[float]:
    """SDN's IC loss weights at a point of training: 0.01 rising linearly to C_k, capped at C_k."""
    costs = model.exit_costs()
    caps = [c / costs[-1] for c in costs[:-1]]
    return [min(cap, 0.01 + progress * cap) for cap in caps]


def exit_losses(outs: list[torch.Tensor], y: torch.Tensor) -> list[torch.Tensor]:
    """Mean cross-entropy of every exit."""
    return [F.cross_entropy(o, y) for o in outs]


def _pgd_avg(
    model: MultiExitNetwork, x: torch.Tensor, y: torch.Tensor, cfg: SDNConfig, gen: torch.Generator
) -> torch.Tensor:
    """PGD maximising the cross-entropy averaged over every exit, from a random start."""
    threat = ThreatModel(cfg.adv_norm, cfg.adv_eps)

    def every_exit(z: torch.Tensor) -> torch.Tensor:
        """Per sample, the sum of every exit's cross-entropy."""
        outs = model.all_exits(z)
        return torch.stack([F.cross_entropy(o, y, reduction="none") for o in outs]).sum(0)

    step = SteepestStep(2.5 * cfg.adv_eps / cfg.adv_steps)
    return ascend(every_exit, x, threat.random_start(x, gen), threat, step, cfg.adv_steps)


def adversarial_batch(
    model: MultiExitNetwork, x: torch.Tensor, y: torch.Tensor, cfg: SDNConfig, gen: torch.Generator
) -> torch.Tensor:
    """The batch's adversarial examples for exit training, crafted with the model in eval mode."""
    with frozen_eval(model, warn_train_mode=False):
        if cfg.adversary == "pgd":
            return _pgd_avg(model, x, y, cfg, gen)
        attack = DeepSloth(
            norm=cfg.adv_norm,
            eps=cfg.adv_eps,
            steps=cfg.adv_steps,
            objective="uniform",
            optimizer="pgd",
            seed=int(torch.randint(0, 2**31 - 1, (1,), generator=gen)),
        )
        return attack.run(model, x, y)


class ExitTraining(Method):
    """Exit training as a strategy of the loop: IC-only (backbone frozen; heads on cached
    features when the inputs are clean) or end-to-end with SDN's IC weights, and optionally
    on adversarial examples too (the loss averages the clean and the adversarial batch)."""

    name = "sdn-exits"

    def __init__(
        self, cfg: SDNConfig, cached: list[tuple[torch.Tensor, ...]] | None = None
    ) -> None:
        self.cfg = cfg
        self.cached = cached

    def start(self, model: nn.Module) -> None:
        """IC-only: the frozen backbone stays in eval mode (its batch-norm statistics as trained)."""
        if self.cfg.mode == "ic-only":
            assert isinstance(model, MultiExitNetwork)
            model.backbone.eval()

    def before_forward(self, step: Step) -> None:
        """Craft the batch's adversarial examples, if exits are trained against an adversary."""
        if self.cfg.adversary != "none":
            assert isinstance(step.model, MultiExitNetwork)
            step.x_adv = adversarial_batch(step.model, step.x, step.y, self.cfg, step.gen)

    def loss(self, model: nn.Module, step: Step) -> torch.Tensor:
        """IC-only: the sum of the ICs' losses; end-to-end: final loss + weighted IC losses."""
        assert isinstance(model, MultiExitNetwork)
        ic_only = self.cfg.mode == "ic-only"
        inputs = [step.x] if step.x_adv is None else [step.x, step.x_adv]
        device = step.x.device
        loss = torch.zeros((), device=device)
        for xb in inputs:
            if self.cached is not None:  # frozen backbone, clean inputs: heads only
                outs = [
                    head.classify(tuple(t[step.index] for t in parts))
                    for head, parts in zip(model.exit_heads, self.cached, strict=True)
                ]
                outs.append(outs[-1])  # the final exit does not enter the IC-only loss
            else:
                outs = model.all_exits(xb)
            losses = exit_losses(outs, step.y)
            if ic_only:
                part = sum(losses[:-1], torch.zeros((), device=device))
            else:
                w = ic_weights(model, step.progress)
                part = losses[-1] + sum(
                    (wk * lk for wk, lk in zip(w, losses[:-1], strict=True)),
                    torch.zeros((), device=device),
                )
            loss = loss + part / len(inputs)
        return loss

    def config(self) -> dict[str, object]:
        """JSON-able description: the exit training configuration."""
        return self.cfg.as_dict()


def train_exits(
    model: MultiExitNetwork,
    data: Dataset,
    config: SDNConfig | None = None,
    *,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Train the exits (and, end-to-end, the backbone) on ``data``; returns a training record.

    The model is trained in place and left in eval mode with all parameters trainable.
    """
    cfg = config or SDNConfig()
    if len(data) == 0:
        raise RobustlabError("cannot train exits on an empty dataset")
    torch.manual_seed(cfg.seed)
    model.to(device)
    ic_only = cfg.mode == "ic-only"
    for p in model.backbone.parameters():
        p.requires_grad_(not ic_only)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer
    if ic_only:
        optimizer = torch.optim.Adam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            params,
            lr=cfg.learning_rate,
            momentum=0.9,
            nesterov=True,
            weight_decay=cfg.weight_decay or 5e-4,
        )
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    attack_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    x_all, y_all = data.x.to(device), data.y.to(device)
    n = len(x_all)
    t0 = time.perf_counter()
    cached = head_features(model, x_all) if ic_only and cfg.adversary == "none" else None
    try:
        history = fit(
            model,
            ExitTraining(cfg, cached),
            optimizer,
            x_all,
            y_all,
            EpochSampler(n, gen),
            batch_size=cfg.batch_size,
            epochs=cfg.epochs,
            lr=cfg.learning_rate,
            gen=attack_gen,
            progress=progress,
            desc=f"train exits ({cfg.mode})",
        )
    except Diverged as exc:
        raise RobustlabError(f"{exc}; try a lower learning rate") from None
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
    return {
        "config": cfg.as_dict(),
        "loss_per_epoch": [round(v, 5) for v in history],
        "train_time_s": round(time.perf_counter() - t0, 2),
        "train_samples": n,
    }


@torch.no_grad()
def head_features(
    model: MultiExitNetwork, x: torch.Tensor, batch_size: int = 500
) -> list[tuple[torch.Tensor, ...]]:
    """Each IC's parameter-free input features for ``x`` under the frozen backbone (eval mode).

    With the backbone frozen and clean inputs these never change, so IC-only training computes
    them once instead of running the backbone every epoch.
    """
    chunks: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in model.heads]
    with evaluating(model):
        for i in range(0, len(x), batch_size):
            h = x[i : i + batch_size]
            k = 0
            for u, unit in enumerate(model.plan.units):
                if k == len(model.positions):
                    break
                h = model.run_steps(unit, h)
                if model.positions[k] == u:
                    chunks[k].append(model.exit_heads[k].features(h))
                    k += 1
    return [tuple(torch.cat(parts) for parts in zip(*per, strict=True)) for per in chunks]


@torch.no_grad()
def exit_accuracies(model: MultiExitNetwork, data: Dataset, batch_size: int = 500) -> list[float]:
    """Accuracy of every exit on ``data`` (ICs in order, the final exit last), eval mode."""
    _, preds = exit_predictions(model, data.x, model.rule, batch_size)
    return [float(v) for v in (preds == data.y[:, None].cpu()).float().mean(0)]

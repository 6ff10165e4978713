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
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..core.threat import ThreatModel
from ..data import Dataset
from ..errors import RobustlabError
from ..models.multiexit import MultiExitNetwork
from .loop import lr_at

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
    alpha = 2.5 * cfg.adv_eps / cfg.adv_steps
    x_adv = threat.random_start(x, gen)
    for _ in range(cfg.adv_steps):
        x_adv = x_adv.detach().requires_grad_(True)
        outs = model.all_exits(x_adv)
        obj = torch.stack([F.cross_entropy(o, y, reduction="sum") for o in outs]).sum()
        grad = torch.autograd.grad(obj, x_adv)[0]
        x_adv = threat.project(x, x_adv.detach() + alpha * threat.steepest_step(grad))
    return x_adv.detach()


def adversarial_batch(
    model: MultiExitNetwork, x: torch.Tensor, y: torch.Tensor, cfg: SDNConfig, gen: torch.Generator
) -> torch.Tensor:
    """The batch's adversarial examples for exit training, crafted with the model in eval mode."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        if cfg.adversary == "pgd":
            return _pgd_avg(model, x, y, cfg, gen)
        from ..attacks.deepsloth import DeepSloth

        attack = DeepSloth(
            norm=cfg.adv_norm,
            eps=cfg.adv_eps,
            steps=cfg.adv_steps,
            objective="uniform",
            optimizer="pgd",
            seed=int(torch.randint(0, 2**31 - 1, (1,), generator=gen)),
        )
        return attack.run(model, x, y)
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)


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
    batches = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * batches
    history: list[float] = []
    t0 = time.perf_counter()
    cached = head_features(model, x_all) if ic_only and cfg.adversary == "none" else None
    bar = tqdm(
        total=total,
        desc=f"train exits ({cfg.mode})",
        disable=not progress,
        file=sys.stderr,
        unit="batch",
        leave=False,
    )
    try:
        for epoch in range(cfg.epochs):
            perm = torch.randperm(n, generator=gen).to(device)
            running = 0.0
            for b in range(batches):
                step = epoch * batches + b
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total, cfg.learning_rate)
                idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                x, y = x_all[idx], y_all[idx]
                inputs = [x]
                if cfg.adversary != "none":
                    inputs.append(adversarial_batch(model, x, y, cfg, attack_gen))
                model.train()
                if ic_only:
                    model.backbone.eval()  # frozen: batch-norm statistics stay as trained
                loss = torch.zeros((), device=device)
                for xb in inputs:
                    if cached is not None:  # frozen backbone, clean inputs: heads only
                        outs = [
                            head.classify(tuple(t[idx] for t in parts))
                            for head, parts in zip(model.exit_heads, cached, strict=True)
                        ]
                        outs.append(outs[-1])  # the final exit does not enter the IC-only loss
                    else:
                        outs = model.all_exits(xb)
                    losses = exit_losses(outs, y)
                    if ic_only:
                        part = sum(losses[:-1], torch.zeros((), device=device))
                    else:
                        w = ic_weights(model, (step + 1) / total)
                        part = losses[-1] + sum(
                            (wk * lk for wk, lk in zip(w, losses[:-1], strict=True)),
                            torch.zeros((), device=device),
                        )
                    loss = loss + part / len(inputs)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                running += float(loss.detach())
                bar.update(1)
            history.append(running / batches)
            bar.set_postfix(epoch=epoch + 1, loss=f"{history[-1]:.3f}")
    finally:
        bar.close()
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
    modes = [(m, m.training) for m in model.modules()]
    chunks: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in model.heads]
    try:
        model.eval()
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
    finally:
        for m, training in modes:
            m.training = training
    return [tuple(torch.cat(parts) for parts in zip(*per, strict=True)) for per in chunks]


@torch.no_grad()
def exit_accuracies(model: MultiExitNetwork, data: Dataset, batch_size: int = 500) -> list[float]:
    """Accuracy of every exit on ``data`` (ICs in order, the final exit last), eval mode."""
    from ..models.multiexit import exit_predictions

    _, preds = exit_predictions(model, data.x, model.rule, batch_size)
    return [float(v) for v in (preds == data.y[:, None].cpu()).float().mean(0)]

"""Adversarial Weight Perturbation (AWP, Wu et al., NeurIPS 2020) as an add-on hook of the
training loop: each step also trains against a worst-case perturbation of the weights.

At every step, once the method has crafted its adversarial examples (its ``before_forward``
runs before any add-on's), the hook takes one ascent step on the method's own loss
(``method.loss``: PGD-AT's cross-entropy on the PGD examples, the TRADES or the MART objective)
and rescales it layer by layer to ``gamma`` times the layer's weight norm::

    v_l = gamma * ||w_l|| * g_l / ||g_l||,    g_l = d loss / d w_l at the current weights

It adds ``v`` to the weights before the loss's forward and backward and subtracts it after the
optimiser step (``after_step``; add-ons unwind in reverse order), so the update computed at
``w + v`` is applied to ``w``: with plain SGD the weights become ``w - lr * grad loss(w + v)``.
Between steps, in every resume state and in the checkpoint, the weights carry no perturbation.

As the official code (csdongxian/AWP) does, read to understand, not copied:

- it perturbs the weights of the convolution and linear layers and the packed input
  projection of an ``nn.MultiheadAttention`` (``in_proj_weight``) only (the reference keeps
  every ``weight`` of more than one dimension), never biases or normalisation layers; layers
  are found by structure (``models.structure.weight_layers``), weights that do not train are
  left;
- the ascent step is one plain SGD step of a proxy copy of the model on ``-loss``, in train
  mode; its size does not matter after the layer-wise rescaling, so ``v`` above is that step.
  Ours computes the gradient on the model itself, in train mode (BatchNorm normalises with the
  batch's statistics, as the proxy does) with the running statistics left as they were (the
  reference's proxy keeps the model's statistics out of it too), and without a copy; a layer
  whose gradient is zero is not perturbed (the reference divides by ``||g|| + 1e-20``);
- weight decay and momentum act as the optimiser does at ``w + v`` (the reference's too);
- gamma: the AT script's default is 0.01 (no warm-up), the TRADES script's 0.005 with AWP
  starting at its 10th of 200 epochs ("for accelerating", its help says); the paper states
  5e-3. The loss the loop reports (and the epoch mean) is the one at ``w + v``.

AWP applies to the methods that train on adversarial examples they craft with PGD: ``pgd-at``,
``trades`` and ``mart`` (the paper's AT-, TRADES- and MART-AWP); others are refused. It costs
one extra forward and backward pass of the method's loss per step. The manifest records it in
``training.add_ons`` (``{"name": "awp", "gamma": ..., "warmup_epochs": ...}``) and a resumed run
must have the same.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ..core.guard import frozen_running_stats
from ..errors import RobustlabError
from ..models.structure import weight_layers
from ..models.weights import layer_weight
from .loop import TrainConfig
from .methods import Hook, Method, Step

#: The name under which the manifest records AWP (``training.add_ons``).
ADD_ON = "awp"
#: The training methods AWP applies to (they train on the adversarial examples they craft).
APPLIES_TO = ("pgd-at", "trades", "mart")


def check_awp(method: str, gamma: float, warmup: int) -> None:
    """AWP's settings: a method it applies to, a finite gamma > 0, warm-up epochs >= 0."""
    if method not in APPLIES_TO:
        raise RobustlabError(
            f"AWP applies to {', '.join(APPLIES_TO)} (methods that train on adversarial "
            f"examples), not to '{method}'"
        )
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise RobustlabError(f"AWP needs a number as gamma, got {gamma!r}")
    if not math.isfinite(gamma) or gamma <= 0:
        raise RobustlabError(f"AWP needs a finite gamma > 0, got {gamma}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise RobustlabError(f"AWP's warm-up is a number of epochs >= 0, got {warmup!r}")


def perturbed_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights AWP perturbs: each trainable weight layer's weight (convolution, linear,
    attention's packed input projection), once."""
    found: dict[int, torch.Tensor] = {}
    for _, layer in weight_layers(model):
        weight = layer_weight(layer)
        if weight.requires_grad:
            found.setdefault(id(weight), weight)
    return list(found.values())


def weight_perturbation(
    method: Method, step: Step, gamma: float
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each perturbed weight with its ``v = gamma * ||w|| * g / ||g||``, ``g`` the gradient of
    ``method.loss`` at the current weights (BatchNorm's running statistics untouched)."""
    model = step.model
    weights = perturbed_weights(model)
    if not weights:
        return []
    with torch.enable_grad(), frozen_running_stats(model):
        loss = method.loss(model, step)
        grads: tuple[torch.Tensor | None, ...] = torch.autograd.grad(
            loss, weights, allow_unused=True
        )
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        grads = _whole_batch(grads, len(step.x))
    pairs = []
    for weight, grad in zip(weights, grads, strict=True):
        if grad is None:
            continue
        w_norm = torch.linalg.vector_norm(weight.detach())
        g_norm = torch.linalg.vector_norm(grad)
        scale = torch.where(g_norm > 0, gamma * w_norm / g_norm, torch.zeros_like(g_norm))
        pairs.append((weight, scale * grad))
    return pairs


def _whole_batch(
    grads: tuple[torch.Tensor | None, ...], part: int
) -> tuple[torch.Tensor | None, ...]:
    """Under torchrun: the gradient of the whole global batch's mean loss from every process's
    gradient of its part's mean loss (weighted by the parts' sizes), the same on every
    process, so every replica adds the same perturbation one process would."""
    device = next((g.device for g in grads if g is not None), torch.device("cpu"))
    weight = torch.tensor([float(part)], device=device)
    dist.all_reduce(weight)
    out: list[torch.Tensor | None] = []
    for grad in grads:
        if grad is None:
            out.append(None)
            continue
        summed = grad * part
        dist.all_reduce(summed)
        out.append(summed / weight)
    return tuple(out)


class AWP(Hook):
    """Adds the adversarial weight perturbation before the forward pass and removes it after
    the optimiser step, from epoch ``warmup`` (counted from 0) on."""

    def __init__(self, method: Method, gamma: float, warmup: int = 0) -> None:
        check_awp(method.name, gamma, warmup)
        self.method, self.gamma, self.warmup = method, float(gamma), warmup
        self._added: list[tuple[torch.Tensor, torch.Tensor]] = []

    def before_forward(self, step: Step) -> None:
        """Perturb the weights, after the method crafted its adversarial examples."""
        if self._added:
            raise RuntimeError("AWP: the previous step's weight perturbation was not removed")
        if step.epoch < self.warmup:
            return
        added = weight_perturbation(self.method, step, self.gamma)
        with torch.no_grad():
            for weight, v in added:
                weight.add_(v)
        self._added = added

    def after_step(self, step: Step) -> None:
        """Remove the perturbation: the update computed at ``w + v`` stays, applied to ``w``."""
        with torch.no_grad():
            for weight, v in self._added:
                weight.sub_(v)
        self._added = []

    def config(self) -> dict[str, object]:
        """The manifest's record of this add-on: its name, gamma and warm-up epochs."""
        return {"name": ADD_ON, "gamma": self.gamma, "warmup_epochs": self.warmup}


def awp_hooks(config: TrainConfig, gamma: float | None, warmup: int = 0) -> list[Hook]:
    """The hooks a training run with this config installs for AWP (none when gamma is None);
    the warm-up must leave at least one epoch with AWP."""
    if gamma is None:
        if warmup:
            raise RobustlabError("an AWP warm-up needs AWP (--awp GAMMA)")
        return []
    cfg = config.resolved()
    check_awp(cfg.method, gamma, warmup)
    assert cfg.epochs is not None  # resolved
    if warmup >= cfg.epochs:
        raise RobustlabError(
            f"AWP's warm-up of {warmup} epochs leaves none of the {cfg.epochs} epochs to "
            "perturb the weights in"
        )
    return [AWP(cfg.make_method(), gamma, warmup)]

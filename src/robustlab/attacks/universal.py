"""Universal adversarial perturbations: one perturbation ``v`` for every input.

Two ways to craft ``v`` inside the ``xi``-ball (``||v||_norm <= xi``, linf or l2), and the
perturbed input is always ``clip(x + v, 0, 1)`` (:func:`perturb`):

- ``deepfool`` (Moosavi-Dezfooli et al., CVPR 2017): while the fooling rate on the crafting
  points is below ``1 - delta`` and fewer than ``max_passes`` passes have run, visit the
  points in a seeded random order; for each point whose prediction on ``clip(x + v)`` still
  equals its clean prediction, run DeepFool (overshoot 0.02, ``df_steps`` = 10 iterations
  as in the reference) on ``clip(x + v)`` and, only if it converged, add its step to ``v``
  and project ``v`` onto the ball (linf: clip; l2: rescale).
  Batched without changing the result: the clean predictions and each pass's fooling rate
  are computed in batches, and the "still fooled?" checks are made for ``batch_size``
  points at once; after each change of ``v`` the checks of the points not yet visited are
  made again, so every point is checked against the ``v`` of the moment it is visited.
  DeepFool itself runs on one point at a time, as ``v`` may change after every point.
- ``sgd`` (Shafahi et al., AAAI 2020): minibatch ascent of the cross-entropy clipped at
  ``clip`` (so points already fooled stop pulling ``v``) of the prediction on
  ``clip(x + v)`` against the clean prediction; ``v`` steps by ``step`` along the sign
  (linf) or the normalised direction (l2) of the batch-mean gradient, then is projected
  onto the ball; ``max_passes`` passes over the crafting points in seeded random order.
  Defaults as a third-party reimplementation (kenny-co/sgd-uap-torch): clip 12, step
  0.8 xi (the paper's own defaults were not obtainable). Ours: the labels are the model's
  clean predictions (no labels needed, as for the DeepFool algorithm), and no early stop.

Which ``v`` is returned (``keep``): ``last``, the ``v`` after the last pass, as both
references do; or ``best`` (ours), the ``v`` at the end of the pass with the highest
fooling rate on the crafting points (never on the evaluation points). With the SGD
defaults the step (0.8 xi) is large, so ``v`` jumps between corners of the ball and the last
minibatch can undo a pass: on mnist5k (standard resnet8, linf 0.2) the crafting fooling
rate was 0.90 after 9 of 10 passes and 0.62 after the last.

Measured (:func:`score_uap`) on points not used to craft ``v``:

- fooling rate: the fraction of points whose prediction on ``clip(x + v)`` differs from the
  prediction on ``x`` (the model's own clean prediction, not the label);
- clean and perturbed accuracy: predictions on ``x`` and on ``clip(x + v)`` against labels.

Class-universal (``per_class``): one perturbation per class, crafted on the crafting points
of that label and measured on the held-out points of that label.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.guard import frozen_eval
from ..core.threat import ThreatModel
from ..errors import RobustlabError
from ..models.engine import infer
from .deepfool import DeepFool

METHODS = ("deepfool", "sgd")
UAP_NORMS = ("linf", "l2")
KEEP = ("last", "best")


@dataclass(frozen=True)
class UAPConfig:
    """How to craft a universal perturbation (see the module docstring for each option)."""

    method: str = "deepfool"
    norm: str = "linf"
    xi: float = 0.1
    delta: float = 0.2  # deepfool: stop once the crafting fooling rate reaches 1 - delta
    max_passes: int = 10
    overshoot: float = 0.02  # deepfool
    df_steps: int = 10  # deepfool: DeepFool's iterations per point
    candidates: int = 10  # deepfool: DeepFool's candidate classes (0 = all)
    clip: float = 12.0  # sgd: the cross-entropy is clipped at this value
    step: float | None = None  # sgd: the step size (None: 0.8 * xi)
    batch_size: int = 32  # sgd: the minibatch; deepfool: points checked at once
    keep: str = "last"  # the v after the last pass, or the one of the pass that fooled most
    seed: int = 0

    def __post_init__(self) -> None:
        """One clear sentence per bad option."""
        if self.method not in METHODS:
            raise RobustlabError(f"unknown UAP method '{self.method}'; use {' or '.join(METHODS)}")
        if self.norm not in UAP_NORMS:
            raise RobustlabError(
                f"universal perturbations support the norms {' and '.join(UAP_NORMS)}, "
                f"got '{self.norm}'"
            )
        if not (math.isfinite(self.xi) and self.xi > 0):
            raise RobustlabError(f"the UAP budget eps must be a finite number > 0, got {self.xi}")
        if not (math.isfinite(self.delta) and 0 < self.delta < 1):
            raise RobustlabError(f"delta must lie in (0, 1), got {self.delta}")
        for name in ("max_passes", "df_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise RobustlabError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.keep not in KEEP:
            raise RobustlabError(f"keep must be {' or '.join(KEEP)}, got '{self.keep}'")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise RobustlabError(f"the loss clip must be a finite number > 0, got {self.clip}")
        if self.step is not None and not (math.isfinite(self.step) and self.step > 0):
            raise RobustlabError(f"the SGD step must be a finite number > 0, got {self.step}")
        DeepFool(norm=self.norm, eps=self.xi, overshoot=self.overshoot, candidates=self.candidates)

    @property
    def sgd_step(self) -> float:
        """The SGD step size: ``step``, or 0.8 xi."""
        return 0.8 * self.xi if self.step is None else self.step

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form, the SGD step resolved; only the options of the method."""
        d = asdict(self)
        unused = {
            "deepfool": ("clip", "step"),
            "sgd": ("delta", "overshoot", "df_steps", "candidates"),
        }
        for key in unused[self.method]:
            d.pop(key)
        if self.method == "sgd":
            d["step"] = self.sgd_step
        return d


@dataclass
class UAP:
    """A crafted perturbation ``v`` (shaped like one input) and how it was crafted."""

    v: torch.Tensor
    passes: int
    fooling_history: list[float]  # fooling rate on the crafting points after each pass
    kept_pass: int  # the pass whose v this is (1-based)
    updates: int  # changes of v: DeepFool steps taken (deepfool) or minibatch steps (sgd)
    n_craft: int
    seconds: float


@dataclass(frozen=True)
class Scores:
    """A perturbation measured on ``n`` points (see the module docstring for each rate)."""

    n: int
    fooling_rate: float
    clean_accuracy: float
    perturbed_accuracy: float


def perturb(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The perturbed inputs ``clip(x + v, 0, 1)`` (``v`` one perturbation, or one per row)."""
    return (x + v).clamp(0.0, 1.0)


def project_ball(v: torch.Tensor, norm: str, xi: float) -> torch.Tensor:
    """``v`` projected onto the xi-ball of the norm (no box: ``v`` is not an image): linf
    clips each coordinate, l2 rescales."""
    if norm == "linf":
        return v.clamp(-xi, xi)
    length = float(v.norm())
    return v * (xi / length) if length > xi else v


def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The model's predictions, in batches."""
    with torch.no_grad():
        out = [infer(model, x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x.device)


def _fooled(
    model: nn.Module, x: torch.Tensor, clean: torch.Tensor, v: torch.Tensor, batch_size: int
) -> float:
    """The fraction of points whose prediction on clip(x + v) differs from ``clean``."""
    if len(x) == 0:
        return 0.0
    return float((_predict(model, perturb(x, v), batch_size) != clean).float().mean())


def _generator(seed: int, stream: int, device: torch.device) -> torch.Generator:
    """A private generator for one seed and stream (class, baseline, ...)."""
    state = int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(state)


def craft_uap(model: nn.Module, x: torch.Tensor, config: UAPConfig) -> UAP:
    """Craft one universal perturbation on the points ``x`` (labels are not needed: the
    model's clean predictions are the reference)."""
    if len(x) == 0:
        raise RobustlabError("a universal perturbation needs at least one crafting point")
    start = time.perf_counter()
    with frozen_eval(model):
        clean = _predict(model, x, config.batch_size)
        craft = _deepfool_uap if config.method == "deepfool" else _sgd_uap
        snapshots, history, updates = craft(model, x, clean, config)
    # best: the first pass with the highest crafting fooling rate (never a test point)
    kept = len(history) - 1 if config.keep == "last" else history.index(max(history))
    seconds = time.perf_counter() - start
    return UAP(snapshots[kept], len(history), history, kept + 1, updates, len(x), seconds)


def _deepfool_uap(
    model: nn.Module, x: torch.Tensor, clean: torch.Tensor, cfg: UAPConfig
) -> tuple[list[torch.Tensor], list[float], int]:
    """The DeepFool-based algorithm: v and the fooling rate after each pass, the updates."""
    deepfool = DeepFool(
        norm=cfg.norm,
        eps=cfg.xi,
        steps=cfg.df_steps,
        overshoot=cfg.overshoot,
        candidates=cfg.candidates,
    )
    gen = _generator(cfg.seed, 0, torch.device("cpu"))
    v = torch.zeros_like(x[0])
    history: list[float] = []
    snapshots: list[torch.Tensor] = []
    updates = 0
    fooling = 0.0
    while fooling < 1 - cfg.delta and len(history) < cfg.max_passes:
        order = torch.randperm(len(x), generator=gen).to(x.device)
        i = 0
        while i < len(order):
            chunk = order[i : i + cfg.batch_size]
            with torch.no_grad():
                same = infer(model, perturb(x[chunk], v)).argmax(1) == clean[chunk]
            moved_at = None
            for j in same.nonzero().flatten().tolist():  # in visiting order, v unchanged
                k = int(chunk[j])
                xv = perturb(x[k : k + 1], v)
                found = deepfool.minimal(model, xv, clean[k : k + 1])
                if bool(found.converged[0]):
                    v = project_ball(v + (found.x_adv - xv)[0], cfg.norm, cfg.xi)
                    updates += 1
                    moved_at = j
                    break
            # v changed: the points after the one that changed it are checked again
            i += len(chunk) if moved_at is None else moved_at + 1
        fooling = _fooled(model, x, clean, v, cfg.batch_size)
        history.append(fooling)
        snapshots.append(v)
    return snapshots, history, updates


def _sgd_uap(
    model: nn.Module, x: torch.Tensor, clean: torch.Tensor, cfg: UAPConfig
) -> tuple[list[torch.Tensor], list[float], int]:
    """The SGD-based algorithm: v and the fooling rate after each pass, the minibatch steps."""
    threat = ThreatModel(cfg.norm, cfg.xi)
    gen = _generator(cfg.seed, 0, torch.device("cpu"))
    v = torch.zeros_like(x[0])
    history: list[float] = []
    snapshots: list[torch.Tensor] = []
    updates = 0
    for _ in range(cfg.max_passes):
        order = torch.randperm(len(x), generator=gen).to(x.device)
        for i in range(0, len(order), cfg.batch_size):
            batch = order[i : i + cfg.batch_size]
            vg = v.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(perturb(x[batch], vg))
                loss = F.cross_entropy(logits, clean[batch], reduction="none")
                (grad,) = torch.autograd.grad(loss.clamp(max=cfg.clip).mean(), vg)
            v = project_ball(
                v + cfg.sgd_step * threat.steepest_step(grad[None])[0], cfg.norm, cfg.xi
            )
            updates += 1
        history.append(_fooled(model, x, clean, v, cfg.batch_size))
        snapshots.append(v.detach())
    return snapshots, history, updates


def score_uap(
    model: nn.Module,
    v: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 250,
) -> Scores:
    """Fooling rate (against the clean prediction) and clean / perturbed accuracy (against
    ``y``) of ``v`` (one perturbation, or one per point) on the points ``x``."""
    with frozen_eval(model):
        clean = _predict(model, x, batch_size)
        adv = _predict(model, perturb(x, v), batch_size)
    n = len(x)

    def rate(hit: torch.Tensor) -> float:
        """A fraction of the points (0 without points)."""
        return float(hit.float().mean()) if n else 0.0

    return Scores(n, rate(adv != clean), rate(clean == y), rate(adv == y))


def random_like(v: torch.Tensor, norm: str, seed: int = 0) -> torch.Tensor:
    """A random perturbation with the norm of ``v`` (the baseline a UAP must beat): linf
    random signs times ||v||_inf (a corner of the same ball), l2 a Gaussian direction scaled
    to ||v||_2."""
    gen = _generator(seed, 1, torch.device("cpu"))
    if norm == "linf":
        signs = torch.randint(0, 2, v.shape, generator=gen).to(v) * 2 - 1
        return signs * v.abs().max()
    g = torch.randn(v.shape, generator=gen).to(v)
    scaled: torch.Tensor = g * (v.norm() / g.norm().clamp_min(1e-12))
    return scaled


@dataclass
class UAPResult:
    """A universal (or per-class) perturbation crafted on some points and measured on others.

    ``v``: one perturbation (C, H, W), or with ``per_class`` one per class (K, C, H, W).
    ``craft_index`` / ``eval_index``: the points used, as indices into the crafting and the
    evaluation data. ``scores``: on the evaluation points; ``random``: a random perturbation
    of the same norm (per class with ``per_class``) on the same points. ``classes``: per
    class the crafting record and the scores (``per_class`` only).
    """

    config: UAPConfig
    per_class: bool
    v: torch.Tensor
    crafted: list[UAP | None]
    craft_index: torch.Tensor
    eval_index: torch.Tensor
    scores: Scores
    random: Scores
    class_scores: list[Scores] = field(default_factory=list)
    seconds: float = 0.0

    def norms(self) -> list[float]:
        """The norm of each perturbation."""
        threat = ThreatModel(self.config.norm, self.config.xi)
        return [float(n) for n in threat.norms(self.v.reshape(-1, *self.v.shape[-3:]))]

    def to_dict(self) -> dict[str, Any]:
        """The record's UAP fields (JSON-able; ``perturbation`` holds v itself, so that a
        report drawn from the results store can show it)."""
        crafted = [
            None
            if c is None
            else {
                "passes": c.passes,
                "updates": c.updates,
                "n_craft": c.n_craft,
                "fooling_history": c.fooling_history,
                "kept_pass": c.kept_pass,
                "seconds": c.seconds,
            }
            for c in self.crafted
        ]
        out: dict[str, Any] = {
            "attack": {"name": "uap", **self.config.as_dict()},
            "threat_model": {"norm": self.config.norm, "eps": self.config.xi},
            "perturbation": self.v.tolist(),
            "per_class": self.per_class,
            "norm_of_v": self.norms() if self.per_class else self.norms()[0],
            "fooling_rate": self.scores.fooling_rate,
            "clean_accuracy": self.scores.clean_accuracy,
            "perturbed_accuracy": self.scores.perturbed_accuracy,
            "n_eval": self.scores.n,
            "n_craft": len(self.craft_index),
            "random_fooling_rate": self.random.fooling_rate,
            "random_perturbed_accuracy": self.random.perturbed_accuracy,
            "passes": max((c.passes for c in self.crafted if c is not None), default=0),
            "crafting": crafted if self.per_class else crafted[0],
            "craft_index": self.craft_index.tolist(),
            "eval_index": self.eval_index.tolist(),
            "seconds": self.seconds,
            "definitions": {
                "fooling_rate": "prediction on clip(x + v) differs from the prediction on x",
                "accuracy": "prediction against the label, clean and on clip(x + v)",
            },
        }
        if self.per_class:
            out["classes"] = [asdict(s) for s in self.class_scores]
        return out


def pick_points(
    n_craft_data: int,
    n_eval_data: int,
    n_craft: int | None,
    n_eval: int | None,
    seed: int,
    *,
    same_data: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random indices of the crafting and evaluation points (all when None). With
    ``same_data`` both come from one set of points and never share one."""
    gen = _generator(seed, 2, torch.device("cpu"))
    if same_data:
        order = torch.randperm(n_craft_data, generator=gen)
        nc = n_craft_data // 2 if n_craft is None else n_craft
        ne = n_craft_data - nc if n_eval is None else n_eval
        if nc < 1 or ne < 1 or nc + ne > n_craft_data:
            raise RobustlabError(
                f"{n_craft_data} points cannot give {nc} crafting and {ne} evaluation points"
            )
        return order[:nc].sort().values, order[nc : nc + ne].sort().values
    nc = n_craft_data if n_craft is None else n_craft
    ne = n_eval_data if n_eval is None else n_eval
    if not 1 <= nc <= n_craft_data:
        raise RobustlabError(f"--n-craft must be between 1 and {n_craft_data}, got {nc}")
    if not 1 <= ne <= n_eval_data:
        raise RobustlabError(f"--n-eval must be between 1 and {n_eval_data}, got {ne}")
    craft = torch.randperm(n_craft_data, generator=gen)[:nc].sort().values
    held = torch.randperm(n_eval_data, generator=gen)[:ne].sort().values
    return craft, held


def universal_perturbation(
    model: nn.Module,
    craft: tuple[torch.Tensor, torch.Tensor],
    held: tuple[torch.Tensor, torch.Tensor] | None,
    config: UAPConfig,
    *,
    n_craft: int | None = None,
    n_eval: int | None = None,
    per_class: bool = False,
    num_classes: int | None = None,
) -> UAPResult:
    """Craft on ``n_craft`` points of ``craft`` (x, y), measure on ``n_eval`` points of
    ``held`` (or, when ``held`` is None, on other points of ``craft``); points picked at
    random with the config's seed. ``per_class``: one perturbation per label (``num_classes``
    of them; default: the largest label + 1)."""
    start = time.perf_counter()
    xc, yc = craft
    xe, ye = craft if held is None else held
    ci, ei = pick_points(len(xc), len(xe), n_craft, n_eval, config.seed, same_data=held is None)
    xc, yc, xe, ye = xc[ci], yc[ci], xe[ei], ye[ei]
    if not per_class:
        uap = craft_uap(model, xc, config)
        scores = score_uap(model, uap.v, xe, ye)
        rand = score_uap(model, random_like(uap.v, config.norm, config.seed), xe, ye)
        return UAPResult(
            config, False, uap.v, [uap], ci, ei, scores, rand,
            seconds=time.perf_counter() - start,
        )  # fmt: skip
    k = num_classes if num_classes is not None else int(max(yc.max(), ye.max())) + 1
    crafted: list[UAP | None] = []
    vs = torch.zeros((k, *xc.shape[1:]), dtype=xc.dtype, device=xc.device)
    rs = torch.zeros_like(vs)
    for c in range(k):
        mine = yc == c
        if not bool(mine.any()):  # no crafting point of this class: v stays 0
            crafted.append(None)
            continue
        cfg = replace(
            config, seed=int(np.random.SeedSequence([config.seed, c]).generate_state(1)[0])
        )
        uap = craft_uap(model, xc[mine], cfg)
        crafted.append(uap)
        vs[c] = uap.v
        rs[c] = random_like(uap.v, config.norm, cfg.seed)
    scores = score_uap(model, vs[ye], xe, ye)
    rand = score_uap(model, rs[ye], xe, ye)
    per = [score_uap(model, vs[c], xe[ye == c], ye[ye == c]) for c in range(k)]
    return UAPResult(
        config, True, vs, crafted, ci, ei, scores, rand, per, time.perf_counter() - start
    )

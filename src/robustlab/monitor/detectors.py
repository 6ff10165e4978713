"""Adversarial-input detectors: Mahalanobis, LID, feature squeezing and a logit-margin baseline.

Every detector maps a batch of inputs to one score per input (larger: more likely adversarial),
computed in torch from the model's intermediate features (``layer_features``), so an adaptive
attack can follow its gradient (see each class for what is not differentiable and how the
attack gets around it). Detectors are fitted on clean inputs the model did not train on;
the thresholds, chosen on other clean held-out inputs, live in
:mod:`robustlab.monitor.detectors_suite`.

- ``mahalanobis`` (Lee et al. 2018): per layer, class means and one tied covariance of the
  spatially averaged features; the layer's score is the largest negative Mahalanobis distance
  to a class mean (optionally after a small input step that raises it, ``noise``); the layer
  scores are combined by logistic regression, trained to tell clean inputs from FGSM examples
  of them (Lee et al.'s "validated on FGSM" variant: no knowledge of the attacks evaluated).
- ``lid`` (Ma et al. 2018): per layer, the maximum-likelihood local intrinsic dimensionality
  estimate from the distances to the k = 20 nearest of a reference batch of 100 clean held-out
  inputs, combined by logistic regression (clean vs FGSM). Ma et al. estimate it within each
  minibatch of 100; here the batch is fixed (stored in the artifact), so a score does not
  depend on the other inputs scored with it, but it does depend on which 100 were drawn.
- ``squeeze`` (Xu et al. 2018): the largest l1 distance between the softmax of an input and of
  its squeezed versions (bit depth reduction, 2x2 median filter).
- ``margin``: minus the gap between the two largest logits (a confidence baseline).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RobustlabError
from ..models.structure import Plan, features_and_output, plan_for, run_steps

#: The detectors, by name, in the order records list them.
DETECTORS = ("mahalanobis", "lid", "squeeze", "margin")
LID_K = 20
LID_BATCH = 100


# ---- intermediate features ---------------------------------------------------------------


def _plan(model: nn.Module) -> Plan | None:
    """The model's units (zoo models), or None when it declares none (features: penultimate)."""
    try:
        return plan_for(model, root="")
    except RobustlabError:
        return None


def layer_names(model: nn.Module) -> list[str]:
    """The layers whose features the detectors read: the model's units, else its penultimate."""
    plan = _plan(model)
    return list(plan.names) if plan is not None else ["penultimate"]


def _pooled(h: torch.Tensor) -> torch.Tensor:
    """Features averaged over space: (N, C, H, W) to (N, C), a transformer's (N, tokens, D)
    over its tokens to (N, D); flat features as they are."""
    if h.dim() == 4:
        return h.mean(dim=(2, 3))
    return h.mean(dim=1) if h.dim() == 3 else h.flatten(1)


def layer_features(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per detector layer, the spatially averaged features of ``x``, and the logits (one pass).

    The units come from :func:`robustlab.models.structure.plan_for` (zoo models); any other
    model gives its penultimate features (the input of its declared classifier head).
    """
    plan = _plan(model)
    if plan is None:
        h, out = features_and_output(model, x)
        return [_pooled(h)], out
    feats = []
    h = x
    for unit in plan.units:
        h = run_steps(model, unit, h)
        feats.append(_pooled(h))
    return feats, run_steps(model, plan.head, h)


# ---- a small logistic regression ---------------------------------------------------------


def fit_logistic(
    z: torch.Tensor, label: torch.Tensor, l2: float = 1e-3, iters: int = 200
) -> dict[str, torch.Tensor]:
    """Logistic regression of ``label`` (0 clean, 1 adversarial) on the standardised columns
    of ``z`` (L-BFGS, L2 penalty ``l2``): ``mean``, ``std``, ``weight`` and ``bias``."""
    device = z.device  # fitted on the CPU, returned where the scores live
    z, label = z.detach().double().cpu(), label.cpu()
    mean, std = z.mean(0), z.std(0).clamp_min(1e-12)
    u = (z - mean) / std
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")
    target = label.double()

    def closure() -> torch.Tensor:
        """The penalised mean log loss."""
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(u @ w + b, target) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    fitted = {
        "mean": mean.float(),
        "std": std.float(),
        "weight": w.detach().float(),
        "bias": b.detach().float().reshape(1),
    }
    return {k: v.to(device) for k, v in fitted.items()}


def logistic_score(z: torch.Tensor, lr: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fitted regression's logit (larger: adversarial) for the columns of ``z``."""
    return ((z - lr["mean"]) / lr["std"]) @ lr["weight"] + lr["bias"]


# ---- the detectors -----------------------------------------------------------------------


@dataclass
class FitData:
    """What a detector is fitted on: clean held-out inputs with labels, and FGSM examples of
    them (the negatives of the layer-combining regressions)."""

    x: torch.Tensor
    y: torch.Tensor
    x_fgsm: torch.Tensor
    num_classes: int


class Detector:
    """A fitted detector: ``score(model, x)`` per input (larger: more likely adversarial).

    ``tensors()`` and ``config()`` are all it is (safetensors + JSON); ``restore`` rebuilds it.
    ``gradient`` says how an adaptive attack gets the score's gradient.
    """

    name: ClassVar[str] = "detector"
    gradient: ClassVar[str] = "exact (autograd through the score)"

    def fit(self, model: nn.Module, data: FitData) -> None:
        """Fit on clean held-out data (and FGSM examples of it, where the detector needs them)."""

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Per-input scores, differentiable where the class says so."""
        return self.score_and_logits(model, x)[0]

    def score_and_logits(
        self, model: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The scores and the model's logits of ``x``, sharing the model's pass where the
        detector can (what an adaptive attack evaluates at every step)."""
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fitted tensors, by name."""
        return {}

    def config(self) -> dict[str, Any]:
        """The settings (JSON)."""
        return {}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take the fitted tensors back (``tensors`` as ``tensors()`` gave them)."""


def _batched(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, size: int = 250
) -> torch.Tensor:
    """``fn`` over ``x`` in batches, without gradients, concatenated."""
    with torch.no_grad():
        return torch.cat([fn(x[i : i + size]) for i in range(0, len(x), size)])


def _feature_dims(model: nn.Module, x: torch.Tensor) -> list[int]:
    """The width of each detector layer's features, from one probe input."""
    with torch.no_grad():
        return [int(f.shape[1]) for f in layer_features(model, x[:1])[0]]


class Mahalanobis(Detector):
    """Lee et al. (2018): class means and a tied covariance per layer; logistic combination."""

    name: ClassVar[str] = "mahalanobis"

    def __init__(self, noise: float = 0.0) -> None:
        self.noise = float(noise)
        self.means: list[torch.Tensor] = []  # per layer (K, d)
        self.precisions: list[torch.Tensor] = []  # per layer (d, d)
        self.lr: dict[str, torch.Tensor] = {}

    @property
    def gradient(self) -> str:  # type: ignore[override]
        """Exact without the input step; with it, the step is passed through as identity."""
        if self.noise == 0:
            return "exact (autograd through the features, distances and regression)"
        return (
            "autograd through the features, distances and regression; the input step "
            "(a sign of a gradient) passed through as identity (BPDA)"
        )

    @staticmethod
    def needed(dims: Sequence[int], num_classes: int) -> int:
        """Fewest fitting samples for a full-rank tied covariance of the widest layer."""
        return max(dims) + num_classes + 1

    def _confidences(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """(N, layers): per layer, minus the smallest Mahalanobis distance to a class mean."""
        cols = []
        for f, mu, prec in zip(feats, self.means, self.precisions, strict=True):
            diff = f[:, None, :] - mu[None, :, :]  # (N, K, d)
            dist = torch.einsum("nkd,de,nke->nk", diff, prec, diff)
            cols.append(-dist.min(dim=1).values)
        return torch.stack(cols, dim=1)

    def _layer_scores(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(N, layers) confidence scores, after the optional input step (per layer, as Lee et al.)."""
        return self._scores_logits(model, x)[0]

    def _scores_logits(
        self, model: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (N, layers) confidence scores and the logits of ``x``."""
        feats, logits = layer_features(model, x)
        if self.noise == 0:
            return self._confidences(feats), logits
        cols = []
        for layer in range(len(self.means)):
            with torch.enable_grad():
                probe = x.detach().requires_grad_(True)
                conf = self._confidences(layer_features(model, probe)[0])[:, layer]
                (grad,) = torch.autograd.grad(conf.sum(), probe)
            step = (x.detach() + self.noise * grad.sign()).clamp(0, 1) - x.detach()
            moved = x + step  # identity in the backward pass (BPDA), the step in the forward
            cols.append(self._confidences(layer_features(model, moved)[0])[:, layer])
        return torch.stack(cols, dim=1), logits

    def fit(self, model: nn.Module, data: FitData) -> None:
        """Class means and tied covariances per layer, then the clean-vs-FGSM regression."""
        feats = [
            torch.cat(parts)
            for parts in zip(
                *(
                    layer_features(model, data.x[i : i + 250])[0]
                    for i in range(0, len(data.x), 250)
                ),
                strict=True,
            )
        ]
        self.means, self.precisions = [], []
        labels = data.y.cpu()
        for f in feats:
            device = f.device  # fitted on the CPU in float64, kept where the features live
            f = f.detach().double().cpu()
            present = sorted({int(c) for c in labels.tolist()})
            mu = torch.zeros(data.num_classes, f.shape[1], dtype=torch.float64)
            for c in present:
                mu[c] = f[labels == c].mean(0)
            if len(present) < data.num_classes:  # a class without samples never is the nearest
                absent = [c for c in range(data.num_classes) if c not in present]
                mu[absent] = float("inf")
            centred = f - mu[labels]
            cov = centred.T @ centred / len(f)
            ridge = 1e-6 * float(cov.diagonal().mean().clamp_min(1e-12))
            prec = torch.linalg.inv(cov + ridge * torch.eye(len(cov), dtype=torch.float64))
            self.means.append(mu.float().contiguous().to(device))
            self.precisions.append(prec.float().contiguous().to(device))
        with torch.no_grad() if self.noise == 0 else torch.enable_grad():
            clean = torch.cat(
                [
                    self._layer_scores(model, data.x[i : i + 250]).detach()
                    for i in range(0, len(data.x), 250)
                ]
            )
            adv = torch.cat(
                [
                    self._layer_scores(model, data.x_fgsm[i : i + 250]).detach()
                    for i in range(0, len(data.x_fgsm), 250)
                ]
            )
        self.lr = _combine(clean, adv)

    def score_and_logits(
        self, model: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The regression's logit over the layers' confidence scores, and the logits."""
        scores, logits = self._scores_logits(model, x)
        return logistic_score(scores, self.lr), logits

    def tensors(self) -> dict[str, torch.Tensor]:
        """Means and precisions per layer, and the regression."""
        out = {f"mean.{i}": m for i, m in enumerate(self.means)}
        out.update({f"precision.{i}": p for i, p in enumerate(self.precisions)})
        out.update({f"lr.{k}": v for k, v in self.lr.items()})
        return out

    def config(self) -> dict[str, Any]:
        """The input step's size."""
        return {"noise": self.noise, "covariance": "tied per layer", "combine": "logistic (FGSM)"}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Means, precisions and regression back from their tensors."""
        layers = sum(1 for k in tensors if k.startswith("mean."))
        self.means = [tensors[f"mean.{i}"] for i in range(layers)]
        self.precisions = [tensors[f"precision.{i}"] for i in range(layers)]
        self.lr = {k[3:]: v for k, v in tensors.items() if k.startswith("lr.")}


def _combine(clean: torch.Tensor, adv: torch.Tensor) -> dict[str, torch.Tensor]:
    """The clean (0) vs FGSM (1) logistic regression over per-layer scores."""
    z = torch.cat([clean, adv])
    label = torch.cat([torch.zeros(len(clean)), torch.ones(len(adv))])
    return fit_logistic(z, label)


def lid_estimate(f: torch.Tensor, reference: torch.Tensor, k: int = LID_K) -> torch.Tensor:
    """Maximum-likelihood LID of each row of ``f`` from its ``k`` nearest ``reference`` rows:
    -(mean_i log(r_i / r_k))^-1 (Ma et al. 2018); differentiable almost everywhere."""
    dist = torch.cdist(f, reference).clamp_min(1e-12)
    near = dist.topk(k, dim=1, largest=False).values  # ascending: r_1 .. r_k
    logs = torch.log(near / near[:, -1:]).mean(dim=1)
    return -1.0 / logs.clamp_max(-1e-12)


class LID(Detector):
    """Ma et al. (2018): LID per layer against a fixed reference batch; logistic combination."""

    name: ClassVar[str] = "lid"
    gradient: ClassVar[str] = (
        "autograd through the k-nearest-neighbour distances to the stored reference batch "
        "(differentiable almost everywhere) and the regression"
    )

    def __init__(self, k: int = LID_K, batch: int = LID_BATCH) -> None:
        self.k, self.batch = int(k), int(batch)
        self.reference: list[torch.Tensor] = []  # per layer (batch, d), with the logits last
        self.lr: dict[str, torch.Tensor] = {}

    def _features(self, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """The layers' features and the logits."""
        feats, logits = layer_features(model, x)
        return [*feats, logits.flatten(1)]

    def _lids(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(N, layers + 1) LID estimates against the reference batch."""
        return self._lids_logits(model, x)[0]

    def _lids_logits(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (N, layers + 1) LID estimates and the logits of ``x``."""
        feats = self._features(model, x)
        cols = [lid_estimate(f, r, self.k) for f, r in zip(feats, self.reference, strict=True)]
        return torch.stack(cols, dim=1), feats[-1]

    def fit(self, model: nn.Module, data: FitData) -> None:
        """The first ``batch`` fitting inputs are the reference; the regression is fitted on
        the others (clean) and their FGSM examples."""
        ref, rest = slice(0, self.batch), slice(self.batch, None)
        with torch.no_grad():
            self.reference = [f.detach() for f in self._features(model, data.x[ref])]
            clean = _batched(lambda v: self._lids(model, v), data.x[rest])
            adv = _batched(lambda v: self._lids(model, v), data.x_fgsm[rest])
        self.lr = _combine(clean, adv)

    def score_and_logits(
        self, model: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The regression's logit over the per-layer LIDs, and the logits."""
        lids, logits = self._lids_logits(model, x)
        return logistic_score(lids, self.lr), logits

    def tensors(self) -> dict[str, torch.Tensor]:
        """The reference batch's features per layer, and the regression."""
        out = {f"reference.{i}": r for i, r in enumerate(self.reference)}
        out.update({f"lr.{k}": v for k, v in self.lr.items()})
        return out

    def config(self) -> dict[str, Any]:
        """k and the reference batch size."""
        return {
            "k": self.k,
            "reference_batch": self.batch,
            "combine": "logistic (FGSM)",
            "batch_dependence": (
                f"each input's LID is estimated from its {self.k} nearest neighbours among a "
                f"fixed reference batch of {self.batch} clean held-out inputs stored with the "
                "detector (Ma et al. use each test minibatch of 100): scores do not depend on "
                "the other inputs scored, but do on which reference inputs were drawn"
            ),
        }

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """The reference features and the regression back from their tensors."""
        layers = sum(1 for k in tensors if k.startswith("reference."))
        self.reference = [tensors[f"reference.{i}"] for i in range(layers)]
        self.lr = {k[3:]: v for k, v in tensors.items() if k.startswith("lr.")}


def bit_depth(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Xu et al.'s bit depth reduction to ``bits`` bits, passed through as identity in the
    backward pass (BPDA: rounding has no useful gradient)."""
    levels = 2**bits - 1
    squeezed = torch.round(x * levels) / levels
    out: torch.Tensor = x + (squeezed - x).detach()
    return out


def median_filter(x: torch.Tensor, size: int = 2) -> torch.Tensor:
    """A size x size median filter per channel, differentiable through the pick: for an even
    size the upper of the two middle values over a window reaching one pixel further back,
    edges repeated (as scipy.ndimage.median_filter with its default 'reflect' for size 2)."""
    lo = size // 2  # scipy's window for an even size reaches one further back than forward
    hi = size - 1 - lo
    padded = F.pad(x, (lo, hi, lo, hi), mode="replicate") if size > 1 else x
    n, c, h, w = x.shape
    patches = F.unfold(padded.reshape(n * c, 1, *padded.shape[2:]), size)  # (nc, s*s, h*w)
    mid = patches.sort(dim=1).values[:, (size * size) // 2, :]
    return mid.reshape(n, c, h, w)


class Squeeze(Detector):
    """Xu et al. (2018): max over squeezers of the l1 distance between softmax outputs."""

    name: ClassVar[str] = "squeeze"
    gradient: ClassVar[str] = (
        "autograd through both model passes and the median filter; the bit depth reduction "
        "passed through as identity (BPDA)"
    )

    def __init__(self, bits: int = 1, median: int = 2) -> None:
        self.bits, self.median = int(bits), int(median)

    def score_and_logits(
        self, model: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """max(|p(x) - p(bits(x))|_1, |p(x) - p(median(x))|_1), and the logits of ``x``."""
        logits = model(x)
        p = F.softmax(logits, dim=1)
        dists = [
            (p - F.softmax(model(sq), dim=1)).abs().sum(dim=1)
            for sq in (bit_depth(x, self.bits), median_filter(x, self.median))
        ]
        return torch.stack(dists, dim=1).amax(dim=1), logits

    def config(self) -> dict[str, Any]:
        """The squeezers."""
        return {"bit_depth": self.bits, "median": f"{self.median}x{self.median}"}


class Margin(Detector):
    """The baseline: minus the gap between the two largest logits (low confidence flagged)."""

    name: ClassVar[str] = "margin"

    def score_and_logits(
        self, model: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-(z_top1 - z_top2), and the logits."""
        logits: torch.Tensor = model(x)
        top = logits.topk(2, dim=1).values
        return top[:, 1] - top[:, 0], logits

    def config(self) -> dict[str, Any]:
        """What the score is."""
        return {"score": "-(largest logit - second largest)"}


def make_detector(name: str, config: dict[str, Any] | None = None) -> Detector:
    """A detector by name with its settings (as ``config()`` records them)."""
    cfg = config or {}
    if name == "mahalanobis":
        return Mahalanobis(noise=float(cfg.get("noise", 0.0)))
    if name == "lid":
        return LID(k=int(cfg.get("k", LID_K)), batch=int(cfg.get("reference_batch", LID_BATCH)))
    if name == "squeeze":
        median = str(cfg.get("median", "2x2")).split("x")[0]
        return Squeeze(bits=int(cfg.get("bit_depth", 1)), median=int(median))
    if name == "margin":
        return Margin()
    raise RobustlabError(f"unknown detector '{name}'; use one or more of {', '.join(DETECTORS)}")


def samples_needed(
    names: Sequence[str], model: nn.Module, x: torch.Tensor, num_classes: int
) -> tuple[int, str]:
    """The fewest clean fitting inputs the detectors ``names`` need on this model, and why."""
    need, why = 1, "a threshold needs at least one clean input"
    if "mahalanobis" in names:
        dims = _feature_dims(model, x)
        n = Mahalanobis.needed(dims, num_classes)
        if n > need:
            need = n
            why = (
                f"Mahalanobis needs at least {n} to estimate a full-rank covariance of the "
                f"{max(dims)}-dimensional features of the widest layer with {num_classes} "
                "class means"
            )
    if "lid" in names:
        n = LID_BATCH + max(LID_K, 10)
        if n > need:
            need, why = (
                n,
                f"LID needs at least {n} ({LID_BATCH} as its reference batch, the rest for its regression)",
            )
    return need, why


def check_noise(noise: float) -> float:
    """Mahalanobis' input step: a finite number >= 0."""
    if not math.isfinite(noise) or noise < 0:
        raise RobustlabError(f"--noise must be a finite number >= 0, got {noise}")
    return noise

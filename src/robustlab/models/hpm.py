"""The HPM l2-reclassifier head (Hybrid Prototype Mixing, arXiv 2606.01746) over any classifier.

:class:`HPMClassifier` wraps a base model (inputs in [0, 1], its normalisation inside, e.g. a
checkpoint's ``nn.Sequential``) whose final linear layer :mod:`.structure` can find (the zoo
declares it; a foreign model declares it with one call, ``declare_features(MyNet, "fc")``).
It keeps the FC head and predicts by l2 distances from the penultimate features to class
prototypes that mix dataset-level prototypes (an EMA of clean features per true class) with
batch-level prototypes built from the current batch through the FC head's predictions.

Only the paper's abstract is public, so every equation below is **our** choice:

- ``f`` = the flattened penultimate features, ``z`` = the FC head's logits (one pass).
- Assignment ``A = one_hot(argmax z)`` in the forward pass. With ``ste=True`` its gradient is
  that of ``softmax(z / temperature)`` (straight-through: ``A_hard + (A_soft - A_soft.detach())``, exactly ``A_hard`` forward);
  with ``ste=False`` the hard assignment carries no gradient.
- Batch prototype ``b_c = sum_i A_ic f_i / sum_i A_ic``; a class no point of the batch is
  assigned to falls back to its dataset prototype ``mu_c``.
- Mixed prototype ``P_c = (1 - mix) * mu_c + mix * b_c`` (mode ``"mix"``); mode ``"ema"`` uses
  ``mu`` alone, so its predictions do not depend on the rest of the batch.
- Logits ``-scale * ||f - P_c||_2 / r``: the plain l2 distance (1-Lipschitz in ``f``, unlike
  its square, whose logit differences are linear in ``f``) in units of ``r``, the mean
  distance of a training feature to its class prototype, measured once when the prototypes
  are initialised (a buffer, fixed afterwards). So ``scale`` means the same whatever the
  features' width and magnitude (adversarially trained features are several times smaller
  than standard ones): the logit drop per typical within-class distance. Default ``scale`` 2:
  on a PGD-AT resnet8 on mnist5k and a resnet8 on digits the median top softmax
  probability is then 0.85 and 0.91, none above 0.999 (at 4: 10-40 % above 0.999).
- Dataset prototypes are buffers, initialised to the class means of a pass over training
  data (:func:`init_prototypes`) and moved only by :meth:`HPMClassifier.update_prototypes`
  (``mu_c <- momentum * mu_c + (1 - momentum) * mean of the batch's clean features of true
  class c``, for classes present in the batch), which fine-tuning calls; no forward pass, in
  any mode, changes them, so they are frozen at evaluation and under attack.

Batch dependence: in mode ``"mix"`` a prediction depends on the other inputs of the batch
(an attacker who controls part of a batch moves the batch prototypes of every class its
points are assigned to). Batch size 1 is well defined: the one point's predicted class uses
``(1 - mix) * mu_c + mix * f`` and every other class ``mu_c``.

Surrogates for the Mixed Surrogate Attack are declared with
:func:`.structure.declare_surrogates` (see :func:`hpm_surrogates`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.guard import evaluating
from ..errors import RobustlabError
from .structure import classifier_head, declare_surrogates, features_and_output

MODES = ("mix", "ema")
ASSIGNMENTS = ("hard", "soft")
#: The surrogates :func:`hpm_surrogates` declares, in the order MSA attacks them.
SURROGATES = ("fc", "l2-ema", "hpm-ste", "hpm-detached", "hpm-soft")


def _number(value: object) -> float | None:
    """A finite real number as float, or None for anything else (bools and NaN included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class HPMConfig:
    """The head's settings: mixing weight, EMA momentum, logit scale, STE temperature, mode."""

    mix: float = 0.5
    momentum: float = 0.9
    scale: float = 2.0
    temperature: float = 1.0
    ste: bool = True
    mode: str = "mix"

    def __post_init__(self) -> None:
        mix, momentum = _number(self.mix), _number(self.momentum)
        scale, temperature = _number(self.scale), _number(self.temperature)
        if mix is None or not 0 <= mix <= 1:
            raise RobustlabError(f"the HPM mixing weight must lie in [0, 1], got {self.mix!r}")
        if momentum is None or not 0 < momentum < 1:
            raise RobustlabError(
                f"the HPM EMA momentum must lie strictly between 0 and 1, got {self.momentum!r}"
            )
        if scale is None or not scale > 0:
            raise RobustlabError(
                f"the HPM logit scale must be a finite number > 0, got {self.scale!r}"
            )
        if temperature is None or not temperature > 0:
            raise RobustlabError(
                f"the HPM STE temperature must be a finite number > 0, got {self.temperature!r}"
            )
        if not isinstance(self.ste, bool):
            raise RobustlabError(f"the HPM ste option must be true or false, got {self.ste!r}")
        check_mode(self.mode)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (what a checkpoint's manifest records)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> HPMConfig:
        """The config a manifest recorded, checked like any other."""
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or not set(data) <= known:
            raise RobustlabError("checkpoint manifest has an invalid hpm config")
        return cls(**data)


def check_mode(mode: object) -> str:
    """Refuse an unknown HPM inference mode with one sentence."""
    if mode not in MODES:
        raise RobustlabError(f"unknown HPM mode {mode!r}; use {' or '.join(MODES)}")
    return str(mode)


def l2_logits(
    f: torch.Tensor, prototypes: torch.Tensor, scale: float | torch.Tensor
) -> torch.Tensor:
    """``-scale * ||f_i - P_c||`` for every input i and class c (N x K).

    ``prototypes`` is K x D (shared by the batch). The distance is smoothed by 1e-12 under
    the square root so that its gradient stays finite when a point sits on a prototype.
    """
    sq = (f[:, None, :] - prototypes[None, :, :]).pow(2).sum(-1)
    return -scale * torch.sqrt(sq + 1e-12)


def assignment(z: torch.Tensor, temperature: float, *, ste: bool, kind: str) -> torch.Tensor:
    """The FC head's class assignment of each input (N x K): hard (with or without the STE
    gradient of ``softmax(z / temperature)``) or soft (``softmax(z / temperature)`` itself)."""
    soft = F.softmax(z / temperature, dim=1)
    if kind == "soft":
        return soft
    hard = F.one_hot(z.argmax(1), z.shape[1]).to(z.dtype)
    return hard + (soft - soft.detach()) if ste else hard  # exactly hard in the forward pass


def mixed_prototypes(
    f: torch.Tensor,
    a: torch.Tensor,
    mu: torch.Tensor,
    mix: float,
    *,
    detach_batch: bool = False,
) -> torch.Tensor:
    """``(1 - mix) * mu_c + mix * b_c`` with ``b_c`` the ``a``-weighted mean of the batch's
    features, ``mu_c`` where no input is assigned to class c (its weight sums to 0)."""
    counts = a.sum(0)
    present = counts.detach() > 1e-12
    denom = torch.where(present, counts, torch.ones_like(counts))
    batch = (a.transpose(0, 1) @ f) / denom[:, None]
    if detach_batch:
        batch = batch.detach()
    batch = torch.where(present[:, None], batch, mu)
    return (1 - mix) * mu + mix * batch


class HPMClassifier(nn.Module):
    """A base classifier with the HPM l2-reclassifier on its penultimate features (module doc).

    ``forward`` returns the HPM logits in the current ``mode`` (``"mix"`` or ``"ema"``);
    :meth:`heads` returns the features, the FC logits and the HPM logits of one pass. The
    base model keeps its head: ``model.base(x)`` is the FC prediction.
    """

    prototypes: torch.Tensor
    distance_unit: torch.Tensor

    def __init__(
        self,
        base: nn.Module,
        config: HPMConfig | None = None,
        *,
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.base = base
        self.config = config or HPMConfig()
        self.mode = self.config.mode
        head = classifier_head(base)
        if isinstance(head, nn.Linear):
            num_classes, dim = head.out_features, head.in_features
        elif input_shape is not None:
            param = next(base.parameters(), None)
            probe = torch.zeros(1, *input_shape, device=param.device if param is not None else None)
            with evaluating(base), torch.no_grad():
                f, z = self.features_and_logits(probe)
            num_classes, dim = z.shape[1], f.shape[1]
        else:
            raise RobustlabError(
                f"the classifier head of {type(base).__name__} is a {type(head).__name__}, not "
                "an nn.Linear: give input_shape so that HPM can measure its features"
            )
        self.num_classes, self.feature_dim = int(num_classes), int(dim)
        self.register_buffer("prototypes", torch.zeros(self.num_classes, self.feature_dim))
        self.register_buffer("distance_unit", torch.ones(()))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The flattened penultimate features (N x D) and the FC logits (N x K) of one pass of
        the base (the head's input is caught by a hook held only during the pass)."""
        f, z = features_and_output(self.base, x)
        if not isinstance(z, torch.Tensor) or z.dim() != 2:
            raise RobustlabError("HPM needs a base model that returns one logits tensor (N x K)")
        return f.flatten(1), z

    def hpm_logits(
        self,
        f: torch.Tensor,
        z: torch.Tensor,
        *,
        mode: str | None = None,
        ste: bool | None = None,
        kind: str = "hard",
        detach_batch: bool = False,
    ) -> torch.Tensor:
        """HPM logits from features and FC logits; options default to the model's own."""
        cfg = self.config
        mu = self.prototypes.to(f.dtype)
        scale = cfg.scale / self.distance_unit.to(f.dtype)
        if check_mode(mode or self.mode) == "ema":
            return l2_logits(f, mu, scale)
        a = assignment(z, cfg.temperature, ste=cfg.ste if ste is None else ste, kind=kind)
        return l2_logits(f, mixed_prototypes(f, a, mu, cfg.mix, detach_batch=detach_batch), scale)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features, FC logits and HPM logits (current mode) of one pass over ``x``."""
        f, z = self.features_and_logits(x)
        return f, z, self.hpm_logits(f, z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """HPM logits in the current mode."""
        f, z = self.features_and_logits(x)
        return self.hpm_logits(f, z)

    @torch.no_grad()
    def update_prototypes(self, f: torch.Tensor, y: torch.Tensor) -> None:
        """One EMA step of the dataset prototypes towards the batch's class means of the clean
        features ``f`` (true labels ``y``); classes absent from the batch are left as they are."""
        m = self.config.momentum
        onehot = F.one_hot(y, self.num_classes).to(f.dtype)
        counts = onehot.sum(0)
        present = counts > 0
        means = (onehot.transpose(0, 1) @ f.flatten(1)) / counts.clamp_min(1)[:, None]
        updated = m * self.prototypes + (1 - m) * means.to(self.prototypes.dtype)
        self.prototypes.copy_(torch.where(present[:, None], updated, self.prototypes))

    def extra_repr(self) -> str:
        """The head's settings, in the module's printout."""
        return f"classes={self.num_classes}, features={self.feature_dim}, mode={self.mode}, {self.config}"


@contextmanager
def with_mode(model: HPMClassifier, mode: str) -> Iterator[HPMClassifier]:
    """The model in another inference mode (``"mix"`` or ``"ema"``); its own restored on exit."""
    check_mode(mode)
    before = model.mode
    model.mode = mode
    try:
        yield model
    finally:
        model.mode = before


@contextmanager
def with_config(model: HPMClassifier, **changes: Any) -> Iterator[HPMClassifier]:
    """The model with some head settings changed (checked like any config; ``mode`` too), its
    own restored on exit: for ablations of mix, scale, temperature or ste without retraining."""
    try:
        config = replace(model.config, **changes)
    except TypeError as exc:
        raise RobustlabError(f"unknown HPM setting: {exc}") from None
    before, before_mode = model.config, model.mode
    model.config, model.mode = config, changes.get("mode", model.mode)
    try:
        yield model
    finally:
        model.config, model.mode = before, before_mode


@torch.no_grad()
def init_prototypes(
    model: HPMClassifier, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500
) -> torch.Tensor:
    """Set the dataset prototypes to the class means of the clean features of ``x`` and the
    distance unit to the mean distance of those features to their class's prototype (two
    passes in eval mode, the model's modes restored); every class needs a sample."""
    counts = torch.bincount(y.cpu(), minlength=model.num_classes)
    if len(counts) > model.num_classes:
        raise RobustlabError(
            f"the labels go up to class {len(counts) - 1} but the model predicts "
            f"{model.num_classes} classes"
        )
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise RobustlabError(
            f"HPM's prototypes need training samples of every class the model predicts, but "
            f"classes {missing} have none"
        )
    device = model.prototypes.device
    sums = torch.zeros_like(model.prototypes)
    with evaluating(model):
        for i in range(0, len(x), batch_size):
            f, _ = model.features_and_logits(x[i : i + batch_size].to(device))
            yb = y[i : i + batch_size].to(device)
            sums.index_add_(0, yb, f.to(sums.dtype))
    model.prototypes.copy_(sums / counts.to(device, sums.dtype)[:, None])
    total = torch.zeros((), dtype=sums.dtype, device=device)
    with evaluating(model):
        for i in range(0, len(x), batch_size):
            f, _ = model.features_and_logits(x[i : i + batch_size].to(device))
            own = model.prototypes[y[i : i + batch_size].to(device)]
            total += (f.to(sums.dtype) - own).norm(dim=1).sum()
    unit = total / len(x)
    if not unit > 0:
        raise RobustlabError(
            "HPM cannot set its distance unit: every training feature sits on its class prototype"
        )
    model.distance_unit.copy_(unit)
    return model.prototypes


class HPMSurrogate(nn.Module):
    """One differentiable stand-in of an HPM model (it holds the model itself: no copies).

    ``kind`` is one of :data:`SURROGATES`: ``"fc"`` the FC head's logits; ``"l2-ema"`` the
    pure l2 head on the dataset prototypes; ``"hpm-ste"`` the full mixing forward with STE
    gradients; ``"hpm-detached"`` the mixing forward with the batch prototypes detached;
    ``"hpm-soft"`` the mixing forward with soft assignments in the forward pass too. None of
    them changes the model's mode or buffers.
    """

    def __init__(self, model: HPMClassifier, kind: str) -> None:
        super().__init__()
        if kind not in SURROGATES:
            raise RobustlabError(
                f"unknown HPM surrogate {kind!r}; use one of {', '.join(SURROGATES)}"
            )
        self.model = model
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The surrogate's logits for inputs in [0, 1]."""
        f, z = self.model.features_and_logits(x)
        if self.kind == "fc":
            return z
        if self.kind == "l2-ema":
            return self.model.hpm_logits(f, z, mode="ema")
        if self.kind == "hpm-soft":
            return self.model.hpm_logits(f, z, mode="mix", kind="soft")
        detach = self.kind == "hpm-detached"
        return self.model.hpm_logits(f, z, mode="mix", ste=True, detach_batch=detach)

    def extra_repr(self) -> str:
        """Which surrogate this is."""
        return f"kind={self.kind}"


def hpm_surrogates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The named surrogates of an HPM model, in the order of :data:`SURROGATES`."""
    assert isinstance(model, HPMClassifier)
    return [(kind, HPMSurrogate(model, kind)) for kind in SURROGATES]


declare_surrogates(HPMClassifier, hpm_surrogates)


def model_section(
    base_section: dict[str, Any], model: HPMClassifier, base_sha256: str | None
) -> dict[str, Any]:
    """A checkpoint manifest's ``model`` section for an HPM model: the base's section plus an
    ``hpm`` object (the config, the feature dimension, the base weights' SHA-256)."""
    hpm = {
        "config": {**model.config.as_dict(), "mode": model.mode},
        "feature_dim": model.feature_dim,
        "base_sha256": base_sha256,
    }
    return {**{k: v for k, v in base_section.items() if k != "hpm"}, "hpm": hpm}

"""Adversarial fine-tuning of the HPM head on top of a trained (adversarially trained) model.

Our choices (the paper's abstract gives none):

- What trains: the FC head (``tune="head"``), or the FC head and the base's last unit of
  its :class:`~robustlab.models.structure.Plan` (``tune="last-block"``, zoo models); all the
  rest is frozen, and the base stays in eval mode throughout (batch-norm statistics as
  trained), so only the weights named here change.
- Loss: cross-entropy of the HPM logits (the model's mode, ``"mix"`` by default) on PGD
  examples, plus ``fc_weight`` (default 1) times the cross-entropy of the FC logits on the
  same examples: the FC head makes the assignments the batch prototypes are built from, and
  with a frozen feature extractor the HPM loss reaches it only through the STE, so it is
  trained to stay discriminative on its own.
- Adversarial examples: PGD (random start, ``steps`` steps of size ``2.5 * eps / steps``)
  on the HPM cross-entropy, as PGD-AT crafts them (the one ascent loop, ``optim.ascend``),
  the whole training batch attacked together.
- Prototypes: initialised to the class means of the clean training features under the base,
  then after every optimisation step one EMA step (``HPMClassifier.update_prototypes``)
  towards the batch's class means of the clean features, true labels.

It is one strategy (:class:`HPMAdversarial`, PGD-AT's with another loss) of the one training
loop (``loop.fit``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.guard import evaluating, preserved
from ..data import Dataset
from ..errors import RobustlabError
from ..models.hpm import HPMClassifier, init_prototypes, with_mode
from ..models.structure import classifier_head, plan_for
from .loop import Diverged, EpochSampler, accuracy, fit
from .methods import PGDAT, Step, require_finite

TUNES = ("head", "last-block")


@dataclass(frozen=True)
class HPMTrainConfig:
    """How to fine-tune an HPM head: threat model, PGD steps, epochs, what trains, the loss."""

    eps: float = 0.3
    norm: str = "linf"
    steps: int = 10
    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.01
    tune: str = "head"
    fc_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        require_finite(eps=self.eps, lr=self.lr, fc_weight=self.fc_weight)
        if self.tune not in TUNES:
            raise RobustlabError(f"unknown --tune '{self.tune}'; use {' or '.join(TUNES)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise RobustlabError(
                f"HPM fine-tuning needs epochs >= 1 and batch size >= 1, got {self.epochs} and "
                f"{self.batch_size}"
            )
        if not self.lr > 0:
            raise RobustlabError(f"learning rate must be > 0, got {self.lr}")
        if self.fc_weight < 0:
            raise RobustlabError(f"the FC loss weight must be >= 0, got {self.fc_weight}")
        self.method()  # checks the threat model and the steps

    def method(self) -> HPMAdversarial:
        """The training strategy this config describes."""
        return HPMAdversarial(
            eps=self.eps, norm=self.norm, steps=self.steps, fc_weight=self.fc_weight
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


@dataclass(frozen=True)
class HPMAdversarial(PGDAT):
    """PGD-AT for the HPM head: PGD on the HPM cross-entropy, loss = CE(HPM) + w * CE(FC) on
    the PGD examples, and an EMA step of the prototypes on the clean batch after each step."""

    name: ClassVar[str] = "hpm-pgd-at"
    fc_weight: float = 1.0

    def start(self, model: nn.Module) -> None:
        """The base stays in eval mode (frozen batch-norm statistics)."""
        assert isinstance(model, HPMClassifier)
        model.base.eval()

    def loss(self, model: nn.Module, step: Step) -> torch.Tensor:
        """CE of the HPM logits plus ``fc_weight`` times CE of the FC logits, on PGD examples."""
        assert isinstance(model, HPMClassifier)
        _, z, out = model.heads(step.adversarial)
        return F.cross_entropy(out, step.y) + self.fc_weight * F.cross_entropy(z, step.y)

    def after_step(self, step: Step) -> None:
        """EMA step of the dataset prototypes on the clean batch's features (true labels)."""
        model = step.model
        assert isinstance(model, HPMClassifier)
        with torch.no_grad(), evaluating(model):
            f, _ = model.features_and_logits(step.x)
        model.update_prototypes(f, step.y)


def tuned_parameters(model: HPMClassifier, tune: str) -> list[nn.Parameter]:
    """The parameters fine-tuning trains: the FC head's, and with ``last-block`` those of the
    last unit of the base's plan (found by structure; a zoo model)."""
    modules = [classifier_head(model.base)]
    if tune == "last-block":
        last = plan_for(model.base, root="").units[-1]
        modules += [model.base.get_submodule(path) for _, path in last]
    params: dict[int, nn.Parameter] = {}
    for module in modules:
        for p in module.parameters():
            params[id(p)] = p
    if not params:
        raise RobustlabError("HPM fine-tuning found no parameters to train in the head")
    return list(params.values())


def finetune_hpm(
    model: HPMClassifier,
    data: Dataset,
    config: HPMTrainConfig | None = None,
    *,
    device: str = "cpu",
    progress: bool = True,
    init: bool = True,
) -> dict[str, Any]:
    """Fine-tune the HPM head on ``data`` (in place); returns a training record.

    ``init`` first sets the prototypes to the class means of ``data``'s clean features. The
    model is left in eval mode with every parameter's ``requires_grad`` as it was.
    """
    cfg = config or HPMTrainConfig()
    if len(data) == 0:
        raise RobustlabError("cannot fine-tune HPM on an empty dataset")
    torch.manual_seed(cfg.seed)
    model.to(device)
    x, y = data.x.to(device), data.y.to(device)
    if init:
        init_prototypes(model, x, y)
    params = tuned_parameters(model, cfg.tune)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    attack_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    t0 = time.perf_counter()
    with preserved(model):
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True)
        try:
            history = fit(
                model,
                cfg.method(),
                optimizer,
                x,
                y,
                EpochSampler(len(x), gen),
                batch_size=cfg.batch_size,
                epochs=cfg.epochs,
                lr=cfg.lr,
                gen=attack_gen,
                progress=progress,
                desc=f"fine-tune HPM ({cfg.tune})",
            )
        except Diverged as exc:
            raise RobustlabError(f"{exc}; try a lower learning rate") from None
    model.eval()
    return {
        "config": cfg.as_dict(),
        "method": cfg.method().config(),
        "loss_per_epoch": [round(v, 5) for v in history],
        "train_time_s": round(time.perf_counter() - t0, 2),
        "train_samples": len(x),
        "tuned_parameters": sum(p.numel() for p in params),
    }


def clean_accuracies(
    model: HPMClassifier, data: Dataset, batch_size: int, device: str = "cpu"
) -> dict[str, float]:
    """Clean accuracy of the FC head and of HPM in both modes (mix at ``batch_size``, in the
    data's order), each in eval mode."""
    with with_mode(model, "mix"):
        mix = accuracy(model, data, batch_size, device)
    with with_mode(model, "ema"):
        ema = accuracy(model, data, batch_size, device)
    return {"fc": accuracy(model.base, data, batch_size, device), "hpm_mix": mix, "hpm_ema": ema}

"""The held-out robustness check: PGD robust accuracy on training data held out of training,
after every epoch, for robust early stopping (Rice et al. 2020: keep the best epoch's weights)
and for catching catastrophic overfitting (Wong et al. 2020: stop and roll back).

One check serves both: ``HeldOutCheck`` measures with ``robust_accuracy`` once per epoch and
does what it was asked with the number. Our rules (the papers leave them to their code):

- robust accuracy: the fraction of the held-out points that the model (eval mode) still
  classifies correctly on PGD's example: ``CHECK_STEPS`` steps of 2.5 eps / steps from one
  random start (seeded with the run's seed, the same start every epoch), cross-entropy, at the
  method's full eps. Rice et al. used PGD-10 on a 1,000-image validation split; the official
  fast AT check is PGD-5 on the epoch's first training batch (a batch it trains on).
- early stopping: the best epoch is the first one of highest held-out robust accuracy; at the
  end of the run the model takes its weights (``restore``).
- catastrophic overfitting: after epoch e, a collapse is a robust accuracy more than ``drop``
  (absolute, 0.2 by default) below the best of the epochs before e. The official rule compares
  with the previous epoch only, so a decline spread over several epochs escapes it. On a
  collapse the check says so in one line on stderr, puts the model and the optimiser back to
  their state after epoch e - 1 (the last epoch that passed the check) and stops training.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..attacks.pgd import PGD
from ..core.distributed import Processes, broadcast
from ..core.guard import evaluating
from ..core.threat import ThreatModel
from ..data import Dataset
from .methods import EpochEnd, Hook

CHECK_STEPS = 10
DEFAULT_HOLDOUT = 200  # training samples held out for the check when none are given


def robust_accuracy(
    model: nn.Module,
    data: Dataset,
    threat: ThreatModel,
    *,
    steps: int = CHECK_STEPS,
    seed: int = 0,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
) -> float:
    """Fraction of ``data`` the model (eval mode) classifies correctly on PGD's examples."""
    attack = PGD(threat.norm, threat.eps, steps, seed=seed)
    correct = 0
    with evaluating(model):
        for i in range(0, len(data), batch_size):
            x = data.x[i : i + batch_size].to(device)
            y = data.y[i : i + batch_size].to(device)
            x_adv = attack(model, x, y)
            with torch.inference_mode():
                correct += int((model(x_adv).argmax(1) == y).sum())
    return correct / len(data)


def _copy_state(module: nn.Module | torch.optim.Optimizer) -> dict[str, Any]:
    """A detached deep copy of a model's or optimiser's state dict."""
    return copy.deepcopy(module.state_dict())


def _stderr(line: str) -> None:
    """Say one line on stderr."""
    print(line, file=sys.stderr, flush=True)


class HeldOutCheck(Hook):
    """After every epoch, PGD robust accuracy on held-out data: keeps the best epoch's weights
    (``keep_best``) and, with ``drop`` > 0, stops with a rollback on a collapse (see the module).

    Call ``restore`` when training ends so the model holds the weights to keep, and ``record``
    for the manifest. Under torchrun (``processes``) every process measures the same weights on
    the same points; rank 0's number decides for all of them, and rank 0 alone speaks.
    """

    def __init__(
        self,
        data: Dataset,
        threat: ThreatModel,
        *,
        keep_best: bool = False,
        drop: float = 0.0,
        steps: int = CHECK_STEPS,
        seed: int = 0,
        device: str | torch.device = "cpu",
        say: Callable[[str], None] = _stderr,
        processes: Processes | None = None,
    ) -> None:
        self.data, self.threat, self.keep_best, self.drop = data, threat, keep_best, drop
        self.steps, self.seed, self.device, self.say = steps, seed, device, say
        self.processes = processes or Processes()
        self.accuracies: list[float] = []  # per epoch checked, from the run's first epoch
        self.best_epoch: int | None = None
        self.best_weights: dict[str, Any] | None = None
        self.previous: dict[str, Any] | None = None  # model and optimiser after the last epoch
        self.collapsed_at: int | None = None

    def _best(self) -> float | None:
        """Highest robust accuracy so far (None before the first check)."""
        if self.best_epoch is None:
            return None
        return self.accuracies[self.best_epoch - 1]

    def end_epoch(self, end: EpochEnd) -> None:
        """Measure; on a collapse roll back and stop, else remember this epoch's state."""
        acc = robust_accuracy(
            end.model,
            self.data,
            self.threat,
            steps=self.steps,
            seed=self.seed,
            device=self.device,
        )
        acc = broadcast(self.processes, acc)
        self.accuracies.append(acc)
        best = self._best()
        if self.drop > 0 and best is not None and acc < best - self.drop:
            assert self.previous is not None  # the best epoch was checked, so some epoch was
            self.collapsed_at = end.epoch
            end.model.load_state_dict(self.previous["model"])
            end.optimizer.load_state_dict(self.previous["optimizer"])
            if self.processes.main:
                self.say(
                    f"catastrophic overfitting after epoch {end.epoch}: held-out PGD-{self.steps} "
                    f"robust accuracy fell to {100 * acc:.1f} %, more than {100 * self.drop:g} points "
                    f"below its best ({100 * best:.1f} %, epoch {self.best_epoch}); rolled back to "
                    f"epoch {end.epoch - 1} and stopped"
                )
            end.stop = True
            return
        if best is None or acc > best:
            self.best_epoch = end.epoch
            if self.keep_best:
                self.best_weights = _copy_state(end.model)
        if self.drop > 0:
            self.previous = {
                "model": _copy_state(end.model),
                "optimizer": _copy_state(end.optimizer),
            }

    def kept_epoch(self, last: int) -> int:
        """The epoch whose weights the model keeps when a run that got to epoch ``last`` ends."""
        if self.keep_best and self.best_epoch is not None:
            return self.best_epoch
        return last - 1 if self.collapsed_at is not None else last

    def restore(self, model: nn.Module) -> None:
        """At the end of training: the best epoch's weights when keeping the best (the rollback
        already happened on a collapse)."""
        if self.keep_best and self.best_weights is not None:
            model.load_state_dict(self.best_weights)

    def record(self, last: int) -> dict[str, Any]:
        """What the manifest says about the check, for a run that got to epoch ``last``."""
        out: dict[str, Any] = {
            "held_out_check": {
                "attack": "pgd",
                **self.threat.as_dict(),
                "steps": self.steps,
                "alpha": 2.5 * self.threat.eps / self.steps,
                "seed": self.seed,
                "points": len(self.data),
                "robust_accuracy": [round(a, 6) for a in self.accuracies],
            }
        }
        if self.keep_best:
            out["best_epoch"] = self.best_epoch
        if self.collapsed_at is not None:
            out["overfitting"] = {
                "detected_epoch": self.collapsed_at,
                "kept_epoch": self.kept_epoch(last),
            }
        return out

    def state(self) -> dict[str, Any]:
        """Everything the check carries across epochs (for a resumed run)."""
        return {
            "accuracies": self.accuracies,
            "best_epoch": self.best_epoch,
            "best_weights": self.best_weights,
            "previous": self.previous,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Carry on from an interrupted run's check."""
        self.accuracies = list(state["accuracies"])
        self.best_epoch = state["best_epoch"]
        self.best_weights = state["best_weights"]
        self.previous = state["previous"]

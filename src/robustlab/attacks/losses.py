"""Per-sample attack objectives to maximise: cross-entropy, CW margin, DLR and targeted DLR.

Every loss takes ``(logits, y, targets)`` and returns one value per sample; larger is better
for the attacker. With ``targets`` the loss rewards moving toward the target class.
:func:`margin` is the one logit margin every attack uses (PGD/APGD's ``cw`` loss, CW-L2 and
Square).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import RobustlabError

Loss = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _other_max(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{i != y} z_i per sample."""
    masked = logits.scatter(1, y[:, None], float("-inf"))
    return masked.amax(dim=1)


def cross_entropy(
    logits: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None = None
) -> torch.Tensor:
    """CE(y) untargeted; -CE(target) targeted."""
    if targets is None:
        return F.cross_entropy(logits, y, reduction="none")
    return -F.cross_entropy(logits, targets, reduction="none")


def margin(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """z_label - max_{i != label} z_i per sample: > 0 exactly where ``label`` is the argmax."""
    return logits.gather(1, label[:, None])[:, 0] - _other_max(logits, label)


def cw_margin(
    logits: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None = None
) -> torch.Tensor:
    """Carlini-Wagner margin: max_{i != y} z_i - z_y, or z_t - max_{i != t} z_i when targeted.

    The targeted form is the negated f6 objective of Carlini & Wagner (2017) for target t,
    max(max_{i != t} Z_i - Z_t, -kappa), before the clamp: it is positive only when t beats
    every other class, not just the true one.
    """
    return -margin(logits, y) if targets is None else margin(logits, targets)


def dlr(logits: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Difference of logits ratio (Croce & Hein 2020); the targeted form when targets are given.

    Untargeted: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12).
    Targeted: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12).
    """
    if logits.shape[1] < (3 if targets is None else 4):
        raise RobustlabError(
            f"the DLR loss needs at least {3 if targets is None else 4} classes, "
            f"the model has {logits.shape[1]}"
        )
    srt = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y[:, None])[:, 0]
    if targets is None:
        return -margin(logits, y) / (srt[:, 0] - srt[:, 2] + 1e-12)
    z_t = logits.gather(1, targets[:, None])[:, 0]
    return -(z_y - z_t) / (srt[:, 0] - 0.5 * (srt[:, 2] + srt[:, 3]) + 1e-12)


LOSSES: dict[str, Loss] = {"ce": cross_entropy, "cw": cw_margin, "dlr": dlr}


def loss_name(loss: str | Loss) -> str:
    """A loss's name for records: its registered name, or a callable's __name__."""
    return loss if isinstance(loss, str) else getattr(loss, "__name__", "custom")


def get_loss(loss: str | Loss) -> Loss:
    """A loss by name (ce, cw, dlr) or a user-supplied callable ``(logits, y, targets)``."""
    if callable(loss):
        return loss
    try:
        return LOSSES[loss]
    except KeyError:
        raise RobustlabError(
            f"unknown loss '{loss}'; use one of {', '.join(LOSSES)} or a callable"
        ) from None

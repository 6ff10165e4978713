"""DeepFool (Moosavi-Dezfooli, Fawzi & Frossard, CVPR 2016), for linf and l2.

DeepFool is a minimum-norm attack. At the current iterate it linearises the classifier
around the label ``y`` it attacks: for each candidate class ``k`` the boundary ``f_k = f_y``
is the hyperplane ``f_k - f_y + w_k . r = 0`` with ``w_k`` the gradient of ``f_k - f_y``,
at distance ``|f_k - f_y| / ||w_k||_q`` (``q`` the dual norm: 1 for linf, 2 for l2). It
steps onto the nearest of these hyperplanes with an overshoot, ``x <- x + (1 + overshoot)
r``, until the prediction leaves ``y`` or ``steps`` iterations have run. (The reference
accumulates ``r_tot`` and moves to ``x0 + (1 + overshoot) r_tot``, which is the same point.)
Without the box the step onto the hyperplane is ``|f| / ||w||_2^2 * w`` (l2) and
``|f| / ||w||_1 * sign(w)`` (linf). On a linear classifier the first step is the exact
minimal perturbation, so DeepFool returns it times ``1 + overshoot`` in one iteration.

Choices (the reference implementation, LTS4/DeepFool, differs as stated):

- The box: the reference works on unbounded inputs. Here the step is the smallest one onto
  the chosen hyperplane inside the [0,1] box (FAB's exact
  :func:`~robustlab.attacks.fab.project_hyperplane_box`; the plain step above whenever the
  box does not bind), and each iterate is clipped to the box. Stepping as if unbounded and
  clipping afterwards fooled only 16 % (linf) / 19 % (l2) of 100 test digits (the steps
  push black background pixels below 0); the box-aware step converges on all of them in
  1.7 - 1.8 iterations on average.
- Candidates: the ``candidates`` classes with the largest clean logits, ``y`` among them
  (the reference's ``num_classes=10``, which includes the label). 0 means every class. The
  nearest boundary is chosen by the box-free distance above, as in the reference.
- The reference adds 1e-4 to each step's length; we do not (the overshoot alone carries the
  point across the boundary), so the linear case is exact.
- ``converged`` means the returned point is classified away from ``y``. (The universal
  perturbation reference counts a point as converged only when it needed fewer than
  ``steps - 1`` iterations; we count the last iteration too.)

As an :class:`~robustlab.attacks.base.Attack` (``make_attack("deepfool", norm, eps)``) the
minimal example is cut to the threat model like CW and FAB
(:func:`~robustlab.attacks.restarts.within_threat`): kept when inside eps, else projected
where that still succeeds, else the input. :meth:`DeepFool.minimal` gives the uncut result
with the per-sample convergence the universal perturbation algorithm needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.threat import ThreatModel
from ..errors import RobustlabError
from .base import Attack
from .fab import _jacobian, project_hyperplane_box
from .registry import register
from .restarts import within_threat

DEEPFOOL_NORMS = ("linf", "l2")


@dataclass(frozen=True)
class Boundary:
    """DeepFool's uncut answer: per sample the point reached, whether it left the label, and
    the iterations it took (0 for a point already classified away from its label)."""

    x_adv: torch.Tensor
    converged: torch.Tensor
    iterations: torch.Tensor


@register("deepfool")
@dataclass(frozen=True)
class DeepFool(Attack):
    """DeepFool (untargeted): the nearest linearised boundary, stepped onto until the label
    changes; ``overshoot`` 0.02 and ``steps`` 50 as in the paper's code, ``candidates`` the
    number of top classes considered (10; 0 = all)."""

    norm: str = "l2"
    eps: float = 0.5
    steps: int = 50
    overshoot: float = 0.02
    candidates: int = 10

    name: ClassVar[str] = "deepfool"

    def __post_init__(self) -> None:
        ThreatModel(self.norm, self.eps)
        if self.norm not in DEEPFOOL_NORMS:
            raise RobustlabError(
                f"deepfool supports the norms {' and '.join(DEEPFOOL_NORMS)}, got '{self.norm}'"
            )
        if self.steps < 1:
            raise RobustlabError(f"deepfool needs steps >= 1, got {self.steps}")
        if not (math.isfinite(self.overshoot) and self.overshoot >= 0):
            raise RobustlabError(f"deepfool needs overshoot >= 0, got {self.overshoot}")
        if self.candidates == 1 or self.candidates < 0:
            raise RobustlabError(
                f"deepfool needs candidates >= 2 (or 0 for every class), got {self.candidates}"
            )

    def run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """DeepFool on a model already in eval mode with frozen parameters, cut to eps."""
        if targets is not None:
            raise RobustlabError("deepfool is untargeted; it takes no target labels")
        if self.eps == 0:  # the threat model is the inputs themselves
            return x.clone()
        return within_threat(model, self.threat, x, y, None, self.minimal(model, x, y).x_adv)

    def minimal(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Boundary:
        """Per sample, the DeepFool point away from label ``y`` (not cut to eps), whether it
        got there, and in how many iterations; the model must be in the state to attack."""
        n = len(x)
        rows = torch.arange(n, device=x.device)
        x_cur = x.clone()
        converged = torch.zeros(n, dtype=torch.bool, device=x.device)
        iterations = torch.zeros(n, dtype=torch.long, device=x.device)
        active = rows
        classes: torch.Tensor | None = None  # per sample: y, then the other candidates
        for it in range(self.steps + 1):
            xa = x_cur[active].detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(xa)
                if classes is None:
                    classes = self._candidates(logits.detach(), y)
                left = logits.detach().argmax(1) != y[active]
                converged[active[left]] = True
                iterations[active] = it
                if it == self.steps or bool(left.all()):
                    break
                jac = _jacobian(logits.gather(1, classes[active]), xa)  # (n, k, *shape)
            keep = ~left
            active, jac = active[keep], jac[keep]
            f = logits.detach()[keep].gather(1, classes[active])
            step = self._step(
                xa.detach()[keep].flatten(1),
                f[:, 1:] - f[:, :1],
                (jac[:, 1:] - jac[:, :1]).flatten(2),
            )
            moved = x_cur[active] + (1 + self.overshoot) * step.view(len(active), *x.shape[1:])
            x_cur[active] = moved.clamp(0.0, 1.0)
        return Boundary(x_cur.detach(), converged, iterations)

    def _candidates(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per sample the classes DeepFool considers: ``y`` first, then the other classes
        with the largest logits (``candidates`` in all; 0 = every class)."""
        n_classes = logits.shape[1]
        if n_classes < 2:
            raise RobustlabError("deepfool needs a model with at least 2 classes")
        k = n_classes if self.candidates == 0 else min(self.candidates, n_classes)
        others = logits.scatter(1, y[:, None], -math.inf).topk(k - 1, dim=1).indices
        return torch.cat((y[:, None], others), dim=1)

    def _step(self, at: torch.Tensor, df: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
        """The step from ``at`` (n, d) onto the nearest linearised boundary: ``df`` (n, k-1)
        logit differences to the label, ``dw`` (n, k-1, d) their gradients; the nearest
        boundary by DeepFool's distance, the step the smallest one onto it inside the box."""
        dual = dw.abs().sum(2) if self.norm == "linf" else dw.norm(dim=2)
        pick = (df.abs() / dual.clamp_min(1e-12)).argmin(1)
        rows = torch.arange(len(df), device=df.device)
        return project_hyperplane_box(at, dw[rows, pick], -df[rows, pick], self.norm)

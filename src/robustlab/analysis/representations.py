"""Compressibility of a network's representations on a batch of data, and how far an
adversarial perturbation moves them.

- **Where** (ours): the output of each unit of a zoo model (the units multi-exit networks
  stop after, :func:`robustlab.models.structure.plan_for`: the stem, then each block), named
  as the units are; for a model that declares no units, the output of each weight layer
  (``models.structure.weight_layers``), named by its module path: for an
  ``nn.MultiheadAttention``, the attention's output (the first of the pair it returns, batch
  first; its ``out_proj`` is no module call of its own, so it has no entry). Each output is
  flattened to one row per sample.
- **Mode**: the model runs in eval mode (BatchNorm on its running statistics). The official
  code collects representations in train mode (batch statistics); we do not.
- ``stable_rank``: ``||Z||_F^2 / ||Z||_2^2`` of the ``n x d`` batch matrix.
- ``pq_index`` (Diao et al. 2023) with ``p = 1, q = 2``: per sample ``1 - d^(1/q - 1/p)
  ||z||_p / ||z||_q = 1 - ||z||_1 / (sqrt(d) ||z||_2)``, in ``[0, 1 - 1/sqrt(d)]`` (higher is
  sparser), averaged over the batch; an all-zero sample counts 0 (ours).
- ``zero_fraction``: the share of entries with ``|z| <= 1e-3 * max |z|`` of the layer's batch
  (ReLU zeros are exact), the same rule as the weights' near-zero fraction.
- ``shift``: per threat model, the mean over the batch of ``||z_adv - z||_2 / ||z||_2``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..core.guard import evaluating
from ..errors import RobustlabError
from ..models.structure import plan_for, run_steps, weight_layers
from .compressibility import near_zero_fraction

_ROWS = 32  # rows converted to float64 at a time by row_norms


def _unit_outputs(
    model: nn.Module, x: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each unit's output of a zoo model (or each weight layer's output of any other model)
    and the logits, from one forward pass."""
    try:
        plan = plan_for(model, root="")
    except RobustlabError:
        plan = None
    seen: dict[str, torch.Tensor] = {}
    if plan is not None:
        h = x
        for name, steps in zip(plan.names, plan.units, strict=True):
            h = run_steps(model, steps, h)
            seen[name] = h.detach().flatten(1).clone()
        return seen, run_steps(model, plan.head, h)
    handles = [
        m.register_forward_hook(
            lambda module, _a, out, name=name: seen.__setitem__(name, _rows(module, out))
        )
        for name, m in weight_layers(model)
    ]
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen, logits


def _rows(module: nn.Module, out: Any) -> torch.Tensor:
    """A weight layer's output as one row per sample (an attention's output, batch first)."""
    if isinstance(module, nn.MultiheadAttention):
        out = out[0]  # (attention output, attention weights or None)
        if not module.batch_first and out.dim() == 3:
            out = out.transpose(0, 1)
    if not isinstance(out, torch.Tensor):
        raise RobustlabError(f"{type(module).__name__} returned no tensor to measure")
    return out.detach().flatten(1).clone()


def representations_and_logits(
    model: nn.Module, x: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The flattened representations and the logits of a batch, from one forward pass (eval
    mode, no gradient): what ``compress`` shares between the representation metrics and the
    measured gap's losses."""
    with evaluating(model), torch.no_grad():
        return _unit_outputs(model, x)


def representations(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The flattened representations of a batch (one forward pass, eval mode, no gradient)."""
    return representations_and_logits(model, x)[0]


def batch_stable_rank(z: torch.Tensor) -> float:
    """``||Z||_F^2 / ||Z||_2^2`` of an ``n x d`` matrix, from its smaller Gram matrix (formed in
    the features' precision, its eigenvalues in float64)."""
    gram = (z @ z.T if z.shape[0] <= z.shape[1] else z.T @ z).double()
    top = float(torch.linalg.eigvalsh(gram)[-1])
    return float(gram.trace()) / top if top > 0 else 0.0


def row_norms(
    z: torch.Tensor, ords: tuple[float, ...] = (2.0,), *, minus: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Each row's ``ord``-norms of ``z`` (or of ``z - minus``) in float64, a few rows at a time:
    a float64 copy of a whole batch of feature maps costs more than the forward pass that made
    it (fresh memory)."""
    parts: list[list[torch.Tensor]] = [[] for _ in ords]
    for start in range(0, z.shape[0], _ROWS):
        rows = slice(start, start + _ROWS)
        chunk = z[rows].double() if minus is None else z[rows].double() - minus[rows].double()
        for part, order in zip(parts, ords, strict=True):
            part.append(torch.linalg.vector_norm(chunk, ord=order, dim=1))
    return [torch.cat(p) if p else z.new_zeros(0, dtype=torch.float64) for p in parts]


def pq_index(z: torch.Tensor) -> float:
    """Mean over samples of ``1 - ||z||_1 / (sqrt(d) ||z||_2)`` (p = 1, q = 2)."""
    l1, l2 = row_norms(z, (1.0, 2.0))
    return _pq(l1, l2, z.shape[1])


def _pq(l1: torch.Tensor, l2: torch.Tensor, d: int) -> float:
    """The PQ-index from the rows' l1 and l2 norms (an all-zero row counts 0)."""
    per = torch.where(l2 > 0, 1 - l1 / (d**0.5 * l2.clamp_min(1e-300)), torch.zeros_like(l2))
    return float(per.mean())


def relative_shift(
    z: torch.Tensor, z_adv: torch.Tensor, norms: torch.Tensor | None = None
) -> float:
    """Mean over samples of ``||z_adv - z||_2 / ||z||_2`` (samples with z = 0 left out);
    ``norms``: the rows' norms of ``z``, if already known."""
    (num,) = row_norms(z_adv, minus=z)
    den = row_norms(z)[0] if norms is None else norms
    keep = den > 0
    return float((num[keep] / den[keep]).mean()) if bool(keep.any()) else 0.0


def representation_rows(
    clean: Mapping[str, torch.Tensor], shifted: Mapping[str, Mapping[str, torch.Tensor]]
) -> list[dict[str, Any]]:
    """The metrics of representations already taken: ``clean`` by name, ``shifted`` by threat
    model then name (the same points, perturbed)."""
    rows = []
    for name, z in clean.items():
        l1, l2 = row_norms(z, (1.0, 2.0))
        rows.append(
            {
                "name": name,
                "width": int(z.shape[1]),
                "stable_rank": batch_stable_rank(z),
                "pq_index": _pq(l1, l2, z.shape[1]),
                "zero_fraction": near_zero_fraction(z),
                "shift": {k: relative_shift(z, reps[name], l2) for k, reps in shifted.items()},
            }
        )
    return rows


def representation_metrics(
    model: nn.Module, x: torch.Tensor, adversarial: Mapping[str, torch.Tensor] | None = None
) -> list[dict[str, Any]]:
    """Per representation: name, width, stable rank, PQ-index, zero fraction, and the shift
    under each adversarial batch in ``adversarial`` (keyed by threat model)."""
    clean = representations(model, x)
    shifted = {k: representations(model, xa) for k, xa in (adversarial or {}).items()}
    return representation_rows(clean, shifted)

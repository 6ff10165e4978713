"""Compressibility of a network's weights: per weight layer, and for the network.

Definitions (the paper's where it states them, ours where it does not; all ours are marked):

- **Weight matrix.** A linear layer's weight ``W`` (out x in); a convolution's weight reshaped
  to ``C_out x (C_in/groups * kh * kw)`` (one row per output filter); an
  ``nn.MultiheadAttention``'s packed input projection ``in_proj_weight`` (``3E x E``, the
  query, key and value rows stacked; kind ``attention``). Layers are found with
  :func:`robustlab.models.structure.weight_layers`; a layer's name is its module path, under
  which its weight is named in the model's state dict (``<name>.weight``; an attention's
  ``<name>.in_proj_weight``: :func:`robustlab.models.weights.weight_name`).
- **Best-k relative error** of a vector ``theta`` (Barsbey et al.): ``||theta - theta_k||_q /
  ||theta||_q`` with ``theta_k`` keeping the ``k`` entries of largest magnitude. Small means
  compressible. Ours: ``k = ceil(kappa * len(theta))`` for a fraction ``kappa`` in (0, 1)
  (so ``k >= 1``), default ``kappa`` in (0.1, 0.25, 0.5), ``q = 2``; a zero vector counts as
  perfectly compressible (error 0).
- **Neuron compressibility**: the best-k relative error of the row norms ``||w_i||_2``.
  **Spectral compressibility**: the same on the singular values.
- **Stable rank** ``||W||_F^2 / ||W||_2^2`` (0 for a zero matrix).
- **Effective rank** (Roy & Vetterli 2007), from ``p_i = sigma_i / sum_j sigma_j``:
  ``effective_rank_entropy`` is the Shannon entropy ``-sum p_i log p_i`` (natural log; what the
  official code calls "effective rank"), ``effective_rank_exp`` is ``exp`` of it (between 1 and
  the rank; ``n`` for an ``n x n`` identity). Both 0 for a zero matrix (ours).
- **Norms** of the weight matrix: Frobenius, spectral ``sigma_1``, and the l-inf operator norm
  (the largest row l1 norm). ``near_zero_fraction``: the share of weights with ``|w| <=
  1e-3 * max |w|`` of the layer (ours: relative, so it does not depend on the weights' scale;
  pruned weights, exact zeros, always count).
- **Network aggregates** (ours): the unweighted mean over layers of every per-layer number
  (each compressibility at each kappa, ranks, norms, near-zero fraction), plus the number of
  layers and of weights, and the near-zero fraction over all weights together.

Every number is computed in float64 from the weights as stored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import RobustlabError
from ..models.structure import weight_layers
from ..models.weights import as_matrix, best_k_error, layer_weight

DEFAULT_KAPPAS: tuple[float, ...] = (0.1, 0.25, 0.5)
NEAR_ZERO = 1e-3  # relative to the layer's largest |weight|


def check_kappas(kappas: Sequence[float]) -> tuple[float, ...]:
    """The fractions kappa, each strictly between 0 and 1, as a sorted tuple without repeats."""
    values = tuple(sorted({float(k) for k in kappas}))
    if not values:
        raise RobustlabError("kappa needs at least one fraction in (0, 1)")
    for k in values:
        if not (math.isfinite(k) and 0 < k < 1):
            raise RobustlabError(f"kappa must be a fraction strictly between 0 and 1, got {k}")
    return values


def best_k(kappa: float, length: int) -> int:
    """How many entries a fraction kappa keeps of a vector of this length: ceil(kappa * len)."""
    return max(1, min(length, math.ceil(kappa * length - 1e-12)))


def compressibility(
    theta: torch.Tensor, kappas: Sequence[float], q: float = 2.0
) -> dict[str, float]:
    """The best-k relative error at each fraction kappa, keyed by the fraction as written."""
    n = theta.numel()
    return {f"{kappa:g}": best_k_error(theta, best_k(kappa, n), q) for kappa in kappas}


def layer_kind(module: nn.Module) -> str:
    """What a weight layer is, for the record: ``linear``, ``conv`` or ``attention`` (the packed
    input projection of an ``nn.MultiheadAttention``)."""
    if isinstance(module, nn.MultiheadAttention):
        return "attention"
    return "linear" if isinstance(module, nn.Linear) else "conv"


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """A weight layer's weight as a float64 matrix, one row per output unit/filter."""
    return as_matrix(layer_weight(module).detach().to(torch.float64))


def stable_rank(sv: torch.Tensor) -> float:
    """``||W||_F^2 / ||W||_2^2`` from the singular values (0 for a zero matrix)."""
    top = float(sv.max()) if sv.numel() else 0.0
    return float((sv**2).sum()) / top**2 if top > 0 else 0.0


def effective_ranks(sv: torch.Tensor) -> tuple[float, float]:
    """(entropy, exp(entropy)) of the singular values normalised to sum 1 (both 0 if all 0)."""
    total = float(sv.sum())
    if total <= 0:
        return 0.0, 0.0
    p = sv[sv > 0] / total
    entropy = float(-(p * p.log()).sum())
    return entropy, math.exp(entropy)


def near_zero_fraction(t: torch.Tensor, rel: float = NEAR_ZERO) -> float:
    """Share of entries with ``|t| <= rel * max |t|`` (every entry of an all-zero tensor)."""
    mags = t.detach().abs()
    if mags.numel() == 0:
        return 0.0
    return int(torch.count_nonzero(mags <= rel * mags.max())) / mags.numel()


@dataclass(frozen=True)
class LayerMetrics:
    """The compressibility numbers of one weight layer (see the module docstring)."""

    name: str
    kind: str
    shape: list[int]
    matrix_shape: list[int]
    frobenius_norm: float
    spectral_norm: float
    linf_operator_norm: float
    stable_rank: float
    effective_rank_entropy: float
    effective_rank_exp: float
    near_zero_fraction: float
    neuron_compressibility: dict[str, float]
    spectral_compressibility: dict[str, float]
    singular_values: list[float] = field(repr=False)
    row_norms: list[float] = field(repr=False)

    def to_dict(self, *, vectors: bool = False) -> dict[str, Any]:
        """JSON-able; the singular values and row norms only with ``vectors``."""
        out = asdict(self)
        if not vectors:
            out.pop("singular_values")
            out.pop("row_norms")
        return out


def matrix_metrics(
    name: str,
    kind: str,
    shape: Sequence[int],
    w: torch.Tensor,
    kappas: Sequence[float],
    q: float = 2.0,
) -> LayerMetrics:
    """Every per-layer number of a weight matrix (float64, one row per output unit)."""
    w = w.to(torch.float64)
    sv = torch.linalg.svdvals(w)
    rows = torch.linalg.vector_norm(w, dim=1)
    ent, ent_exp = effective_ranks(sv)
    return LayerMetrics(
        name=name,
        kind=kind,
        shape=[int(s) for s in shape],
        matrix_shape=[int(s) for s in w.shape],
        frobenius_norm=float(torch.linalg.matrix_norm(w)),
        spectral_norm=float(sv.max()) if sv.numel() else 0.0,
        linf_operator_norm=float(w.abs().sum(dim=1).max()),
        stable_rank=stable_rank(sv),
        effective_rank_entropy=ent,
        effective_rank_exp=ent_exp,
        near_zero_fraction=near_zero_fraction(w),
        neuron_compressibility=compressibility(rows, kappas, q),
        spectral_compressibility=compressibility(sv, kappas, q),
        singular_values=sv.tolist(),
        row_norms=rows.tolist(),
    )


def layer_metrics(
    model: nn.Module, kappas: Sequence[float] = DEFAULT_KAPPAS, q: float = 2.0
) -> list[LayerMetrics]:
    """The metrics of every weight layer of a model, in module order."""
    kappas = check_kappas(kappas)
    if not (math.isfinite(q) and q > 0):
        raise RobustlabError(f"q must be a positive number, got {q}")
    layers = weight_layers(model)
    if not layers:
        raise RobustlabError(
            f"{type(model).__name__} has no conv or linear layer, so it has no weight "
            "compressibility to measure"
        )
    return [
        matrix_metrics(
            name,
            layer_kind(m),
            tuple(layer_weight(m).shape),
            weight_matrix(m),
            kappas,
            q,
        )
        for name, m in layers
    ]


def network_summary(layers: Sequence[LayerMetrics]) -> dict[str, Any]:
    """Network-level numbers: the unweighted mean over layers of each per-layer number."""
    if not layers:
        raise RobustlabError("no layers to summarise")
    n = len(layers)
    scalars = (
        "frobenius_norm",
        "spectral_norm",
        "linf_operator_norm",
        "stable_rank",
        "effective_rank_entropy",
        "effective_rank_exp",
        "near_zero_fraction",
    )
    out: dict[str, Any] = {"aggregate": "unweighted mean over layers", "layers": n}
    for key in scalars:
        out[key] = sum(float(getattr(m, key)) for m in layers) / n
    for key in ("neuron_compressibility", "spectral_compressibility"):
        kappas = list(getattr(layers[0], key))
        out[key] = {k: sum(getattr(m, key)[k] for m in layers) / n for k in kappas}
    sizes = [math.prod(m.matrix_shape) for m in layers]
    out["weights"] = sum(sizes)
    out["near_zero_fraction_all_weights"] = sum(
        m.near_zero_fraction * s for m, s in zip(layers, sizes, strict=True)
    ) / sum(sizes)
    return out

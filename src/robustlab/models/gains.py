"""The local gain of a network at given inputs: the operator norm of its logits' Jacobian,
what the robustness bound's alignment term measures (analysis) and the alignment penalty
lowers (train). One copy for both, differentiable in the weights on request."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..core.guard import evaluating
from ..errors import RobustlabError

#: The norms a local gain is measured in (the input's and the logits' norm alike).
GAIN_NORMS = ("linf", "l2")
#: Points whose Jacobians are taken together when no graph is kept: the graph of a larger
#: batch, kept across one backward pass per class, outgrows the caches (500 points of a
#: resnet20 cost ~1.7x as much per point as 128 did, measured).
CHUNK = 128


def input_jacobian(
    model: nn.Module, x: torch.Tensor, *, create_graph: bool = False
) -> torch.Tensor:
    """Each sample's Jacobian of the logits in its input, ``n x classes x input size``
    (float64), in eval mode.

    One backward pass per class (samples are independent in eval mode): the gradient of
    ``logits[:, j].sum()`` holds row ``j`` of every sample's Jacobian. With ``create_graph``
    it stays differentiable in the weights; otherwise it is detached.
    """
    with evaluating(model), torch.enable_grad():
        xr = x.detach().clone().requires_grad_(True)
        logits = model(xr)
        rows = []
        for j in range(logits.shape[1]):
            (g,) = torch.autograd.grad(
                logits[:, j].sum(),
                xr,
                retain_graph=create_graph or j + 1 < logits.shape[1],
                create_graph=create_graph,
            )
            rows.append(g.flatten(1))
        jac = torch.stack(rows, dim=1).double()
    return jac if create_graph else jac.detach()


def local_gains(
    model: nn.Module,
    x: torch.Tensor,
    norms: Sequence[str] = GAIN_NORMS,
    *,
    create_graph: bool = False,
) -> dict[str, torch.Tensor]:
    """Per sample and norm, the operator norm of the logits' Jacobian at ``x``: l-inf->l-inf
    (the largest row l1 norm) and l2 (the top singular value).

    The Jacobian (:func:`input_jacobian`) is computed once for all norms, ``CHUNK`` points at
    a time. With ``create_graph`` the gains stay differentiable in the weights (the alignment
    penalty of ``train.compression``; all points at once); otherwise they are detached.
    """
    for norm in norms:
        if norm not in GAIN_NORMS:
            raise RobustlabError(f"local gain covers linf and l2, not {norm}")
    if create_graph:
        chunks = [input_jacobian(model, x, create_graph=True)]
    else:
        chunks = [input_jacobian(model, x[i : i + CHUNK]) for i in range(0, len(x), CHUNK)]
    gains: dict[str, list[torch.Tensor]] = {norm: [] for norm in norms}
    for jac in chunks:
        for norm in norms:
            if norm == "linf":
                gains[norm].append(jac.abs().sum(dim=2).max(dim=1).values)
            else:
                gains[norm].append(torch.linalg.matrix_norm(jac, ord=2))
    return {norm: torch.cat(parts) for norm, parts in gains.items()}

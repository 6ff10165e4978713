r"""An upper bound on how much a perturbation of size eps can raise a sample's cross-entropy.

**The bound (ours, derived here; the paper's Theorem 3.1 gives its per-layer form).** Let
``f`` map [0,1] pixels to logits and ``CE(z, y) = logsumexp(z) - z_y``. For every sample and
every ``delta`` with ``||delta||_p <= eps`` (p = inf or 2)::

    CE(f(x + delta), y) - CE(f(x), y)  <=  L_CE(p) * Lip_p(f) * eps

1. *Cross-entropy in the logits.* ``grad_z CE = softmax(z) - e_y``; its l1 norm is
   ``2 (1 - p_y) < 2`` and its l2 norm ``sqrt((1-p_y)^2 + sum_{j!=y} p_j^2) <= sqrt(2) (1-p_y)
   < sqrt(2)``. By the mean value theorem, CE is 2-Lipschitz for the l-inf norm on the logits
   (l1 is its dual) and sqrt(2)-Lipschitz for l2: ``L_CE(inf) = 2``, ``L_CE(2) = sqrt(2)``.
2. *The network, layer by layer.* Every feature map carries the same norm as the input
   (l-inf for an l-inf threat, l2 for l2). The network's graph (``torch.fx``) is walked in
   order and each value gets a Lipschitz constant with respect to the input:

   - a module applied to a value multiplies its constant by the module's bound below;
   - a sum or difference of two values adds their constants (``||Da + Db|| <= ||Da|| +
     ||Db||``), which makes a residual block ``L_shortcut + L_branch`` times its input's
     constant (``1 + L(branch)`` for an identity shortcut), with the shortcut's own norm
     (a 1x1 conv + BatchNorm) when it has one;
   - concatenation (DenseNet): ``max`` of the parts for l-inf, ``sqrt(sum of squares)`` for l2;
   - multiplication or division by a constant (the Normalize layer's ``(x - mean) / std``)
     scales by ``max |c|`` or ``1 / min |c|``; adding a constant changes nothing; reshapes,
     flatten and permutations change no norm.

   Module bounds: *linear* ``W``: l-inf, the largest row l1 norm (exact); l2, the spectral
   norm (exact). *Convolution* (weights reshaped to ``C_out x C_in/g*kh*kw``, zero padding):
   each output value is a row of ``W`` times one input patch, so for l-inf the largest row l1
   norm (exact up to padding, which only removes terms); for l2, ``||y||^2 = sum_p ||W
   patch_p||^2 <= ||W||_2^2 sum_p ||patch_p||^2 <= ||W||_2^2 * m * ||x||^2`` where ``m`` is the
   most patches any one input pixel lies in: per spatial dimension ``min(k, ceil((d(k-1)+1) /
   s))`` (``ceil(k/s)`` for dilation 1), multiplied over dimensions; the bound is ``sqrt(m) *
   ||W||_2`` (a grouped conv is block diagonal, whose norm is at most the stacked matrix's).
   *Eval-mode BatchNorm* is the diagonal affine map ``x -> gamma (x - mu) / sqrt(var + eps)
   + beta``: ``max |gamma| / sqrt(var + eps)``. *ReLU* (and ReLU6, Identity, Dropout in eval,
   Flatten, Tanh): 1; LeakyReLU ``max(1, |slope|)``; Sigmoid 1/4. *Average pooling* (any
   linear map ``A`` with non-negative weights): l-inf, the largest row sum; l2, the Schur
   test ``sqrt(max row sum * max column sum)``, both read off the pool itself by a forward
   and a backward pass of ones (global average pooling of an ``h x w`` map gives
   ``1/sqrt(hw)`` for l2). *Max pooling*: l-inf 1; l2 ``sqrt(m)`` with ``m`` the patches per
   pixel as for a conv (1 when windows do not overlap). Anything else (LayerNorm, attention,
   a product of two features) is refused with one sentence naming the module: the bound
   covers the zoo's ResNets, PreAct-ResNets, VGGs, MLPs and DenseNets, not ViTs.
3. *Encoder and head.* The head is the final linear layer
   (:func:`robustlab.models.structure.classifier_head`); the encoder's constant is the one
   of the head's input and ``Lip(f) <= Lip(encoder) * ||head||``.

**Two forms of the per-layer norms.** ``exact`` uses the norms above, with one tightening
(ours): a BatchNorm that alone reads a conv or linear layer's output is folded into it, the
pair counting ``||diag(s) W||`` (``s`` the BatchNorm's per-channel gain; the same conv
derivation applies to the scaled weights) instead of ``||W|| * max(s)``. ``compressibility`` is
the paper's Theorem 3.1 form, an upper bound from compressibility times the Frobenius norm:
with ``c`` the best-k relative error (q = 2) at ``k = ceil(kappa * len)`` and ``kappa`` the
smallest fraction asked (ours), ``||theta||_inf <= ||theta_k||_2 = sqrt(1 - c^2) ||theta||_2``.
*Neuron* (rows ``r_i = ||w_i||_2``, ``||r||_2 = ||W||_F``), for l-inf: ``max_i ||w_i||_1 <=
sqrt(cols) * max_i ||w_i||_2 <= sqrt(cols) * sqrt(1 - c_neuron^2) * ||W||_F``. *Spectral*, for
l2: ``sigma_1 <= sqrt(1 - c_spectral^2) * ||W||_F`` (times ``sqrt(m)`` for a conv). At
``k = 1`` the spectral form is exact; it is never below the exact norm.

**Alignment term (ours).** How much of the plain product of norms the network realises
along its top singular directions, chained layer to layer with the activation pattern of
real inputs: ``alignment = max_i ||J(x_i)||_p / Lip_exact`` over the batch, ``J(x_i)`` the
Jacobian of the logits at ``x_i`` (the product ``W_L D_{L-1} ... D_1 W_1`` of the layers with
the ReLU masks of ``x_i``); ``||J||_{inf->inf}`` is its largest row l1 norm (exact), ``||J||_2``
its top singular value. It lies in (0, 1]. ``alignment * bound`` is a first-order estimate of
the gap, not a guaranteed bound; the guaranteed bounds are ``bound`` (exact norms) and
``bound_compressibility``. The local gains come from :mod:`robustlab.models.gains`, the one
copy that the ``alignment`` training penalty (``train.compression``) differentiates too.
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import reduce
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..core.guard import evaluating
from ..errors import RobustlabError
from ..models.gains import GAIN_NORMS
from ..models.gains import local_gains as local_gains  # re-exported: part of the API
from ..models.structure import classifier_head
from .compressibility import LayerMetrics, best_k, weight_matrix

NORMS = GAIN_NORMS
#: Lipschitz constant of the cross-entropy in the logits, per threat model's norm.
CE_LIPSCHITZ = {"linf": 2.0, "l2": math.sqrt(2.0)}
FORMS = ("exact", "compressibility")

_ONE = (
    nn.ReLU,
    nn.ReLU6,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Flatten,
    nn.Unflatten,
    nn.Tanh,
)
_AVG = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
_MAX = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_SUMS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_SCALE = {operator.mul, operator.imul, torch.mul}
_DIVIDE = {operator.truediv, operator.itruediv, torch.div}
_SAME = {torch.flatten, torch.reshape, torch.relu, nn.functional.relu, torch.permute}
_SAME_METHODS = {"flatten", "view", "reshape", "contiguous", "relu", "permute", "transpose"}
_CONST_METHODS = {"size", "dim"}


def _pairs(value: int | Sequence[int], dims: int) -> list[int]:
    """A conv/pool hyper-parameter as one int per spatial dimension."""
    return [int(v) for v in value] if isinstance(value, Sequence) else [int(value)] * dims


def patches_per_pixel(
    kernel: int | Sequence[int],
    stride: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
    dims: int = 2,
) -> int:
    """The most windows one input pixel lies in: prod over dims of min(k, ceil((d(k-1)+1)/s))."""
    ks = _pairs(kernel, dims)
    ss, ds = _pairs(stride, len(ks)), _pairs(dilation, len(ks))
    return math.prod(
        min(k, math.ceil((d * (k - 1) + 1) / s)) for k, s, d in zip(ks, ss, ds, strict=True)
    )


def conv_overlap(module: nn.Module) -> int:
    """Patches per input pixel of a conv (1 for a linear layer)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        dims = len(module.kernel_size)
        return patches_per_pixel(module.kernel_size, module.stride, module.dilation, dims)
    return 1


def _check_weight_layer(name: str, module: nn.Module) -> None:
    """Refuse the conv layers the derivation does not cover (transposed, non-zero padding)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        raise RobustlabError(
            f"the robustness bound does not cover transposed convolutions ('{name}')"
        )
    mode = getattr(module, "padding_mode", "zeros")
    if mode != "zeros":
        raise RobustlabError(
            f"the robustness bound covers zero-padded convolutions only; '{name}' pads with {mode}"
        )


def layer_bounds(
    metrics: LayerMetrics, module: nn.Module, kappa: float
) -> dict[str, dict[str, float]]:
    """A weight layer's operator-norm bounds on its feature maps: ``{norm: {form: value}}``.

    ``exact``: l-inf the largest row l1 norm, l2 ``sqrt(m) * sigma_1``; ``compressibility``:
    the Theorem 3.1 form at ``k = ceil(kappa * len)`` (see the module docstring).
    """
    _check_weight_layer(metrics.name, module)
    rows = torch.tensor(metrics.row_norms, dtype=torch.float64)
    sv = torch.tensor(metrics.singular_values, dtype=torch.float64)
    fro = metrics.frobenius_norm
    cols = metrics.matrix_shape[1]
    m = conv_overlap(module)

    def kept(theta: torch.Tensor) -> float:
        """``||theta_k||_2 / ||theta||_2 = sqrt(1 - c^2)`` at the smallest kappa."""
        if float(theta.norm()) == 0.0:
            return 0.0
        top = torch.sort(theta.abs(), descending=True).values[: best_k(kappa, theta.numel())]
        return float(top.norm() / theta.norm())

    return {
        "linf": {
            "exact": metrics.linf_operator_norm,
            "compressibility": math.sqrt(cols) * kept(rows) * fro,
        },
        "l2": {
            "exact": math.sqrt(m) * metrics.spectral_norm,
            "compressibility": math.sqrt(m) * kept(sv) * fro,
        },
    }


def _nonneg_linear_norms(
    module: nn.Module, shape: Sequence[int], like: torch.Tensor
) -> dict[str, float]:
    """l-inf (max row sum) and l2 (Schur test) norms of a pooling map with non-negative weights."""
    ones = torch.ones(1, *shape[1:], dtype=like.dtype, device=like.device, requires_grad=True)
    with torch.enable_grad():
        out = module(ones)
        (col,) = torch.autograd.grad(out.sum(), ones)
    row_max, col_max = float(out.detach().max()), float(col.max())
    return {"linf": row_max, "l2": math.sqrt(row_max * col_max)}


def bn_scale(name: str, module: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """The per-channel gain ``|gamma| / sqrt(var + eps)`` of an eval-mode BatchNorm (float64)."""
    if module.running_var is None:
        raise RobustlabError(
            f"the robustness bound needs BatchNorm running statistics; '{name}' has none"
        )
    scale = torch.rsqrt(module.running_var.detach().double() + module.eps)
    if module.weight is not None:
        scale = scale * module.weight.detach().double().abs()
    return scale


def folded_norm(layer: nn.Module, scale: torch.Tensor, norm: str) -> float:
    """The exact-form bound of a conv/linear layer whose output rows are scaled by ``scale``
    (the BatchNorm that follows it, folded in): ``diag(scale) W`` in place of ``W``."""
    w = weight_matrix(layer) * scale.to(torch.float64)[:, None]
    if norm == "linf":
        return float(w.abs().sum(dim=1).max())
    return math.sqrt(conv_overlap(layer)) * float(torch.linalg.matrix_norm(w, ord=2))


def module_bound(
    name: str, module: nn.Module, norm: str, in_shape: Sequence[int] | None, like: torch.Tensor
) -> float:
    """The Lipschitz bound of a parameter-free or normalising module (see the docstring)."""
    if isinstance(module, _ONE):
        return 1.0
    if isinstance(module, nn.LeakyReLU):
        return max(1.0, abs(float(module.negative_slope)))
    if isinstance(module, nn.Sigmoid):
        return 0.25
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return float(bn_scale(name, module).max())
    if isinstance(module, _MAX):
        if norm == "linf":
            return 1.0
        dims = int(type(module).__name__[-2])
        stride = module.stride if module.stride is not None else module.kernel_size
        return math.sqrt(patches_per_pixel(module.kernel_size, stride, module.dilation, dims))
    if isinstance(module, _AVG) and in_shape is not None:
        return _nonneg_linear_norms(module, in_shape, like)[norm]
    raise RobustlabError(
        f"the robustness bound cannot bound {type(module).__name__} ('{name}'): it covers "
        "convolutions, linear layers, BatchNorm, ReLU-like activations and pooling"
    )


def _constant(gm: fx.GraphModule, arg: Any) -> torch.Tensor | float | None:
    """The value of a constant argument (a number or a stored tensor), None if it is not one."""
    if isinstance(arg, (int, float)):
        return float(arg)
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = reduce(getattr, str(arg.target).split("."), gm)
        return value.detach() if isinstance(value, torch.Tensor) else None
    return None


def _scale(gm: fx.GraphModule, node: fx.Node, lip: dict[fx.Node, float | None]) -> float | None:
    """The constant of a product/quotient of a feature with a constant (else refuse)."""
    a, b = node.args[0], node.args[1]
    dependent = [x for x in (a, b) if isinstance(x, fx.Node) and lip.get(x) is not None]
    if not dependent:
        return None
    divide = node.target in _DIVIDE or node.target in ("div", "div_")
    other = b if dependent[0] is a else a
    value = _constant(gm, other)
    if len(dependent) > 1 or value is None or (divide and dependent[0] is not a):
        raise RobustlabError(
            f"the robustness bound cannot bound '{node.name}': it multiplies or divides "
            "features by something other than a constant"
        )
    mags = torch.as_tensor(value, dtype=torch.float64).abs()
    factor = 1.0 / float(mags.min()) if divide else float(mags.max())
    base = lip[dependent[0]]
    assert base is not None
    return base * factor


def _combine(norm: str, node: fx.Node, parts: list[float]) -> float:
    """The constant of a sum (added) or a concatenation (max / root of squares) of features."""
    if node.target is torch.cat:
        return max(parts) if norm == "linf" else math.sqrt(sum(p * p for p in parts))
    return sum(parts)


def _dependent(node: fx.Node, lip: dict[fx.Node, float | None]) -> list[float]:
    """The constants of the arguments of a node that depend on the input."""
    found: list[float] = []
    for arg in node.all_input_nodes:
        value = lip.get(arg)
        if value is not None:
            found.append(value)
    return found


@dataclass(frozen=True)
class Chain:
    """Lipschitz constants of a network w.r.t. its input, for one norm and one form."""

    network: float
    encoder: float | None
    head: float | None


def trace(model: nn.Module, input_shape: Sequence[int]) -> fx.GraphModule:
    """The model's graph with every value's shape (one probe pass of a batch of one)."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many kinds on code it cannot follow
        raise RobustlabError(
            f"the robustness bound cannot follow {type(model).__name__}'s forward pass "
            f"({type(exc).__name__}); it needs a model torch.fx can trace"
        ) from None
    param = next(model.parameters(), None)
    like = param if param is not None else torch.zeros(())
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(1, *input_shape, dtype=like.dtype, device=like.device))
    return gm


def chain_lipschitz(
    gm: fx.GraphModule,
    norm: str,
    weight_norm: Callable[[str, nn.Module], float],
    head_name: str | None,
    *,
    fold: bool = False,
) -> Chain:
    """Walk the traced graph and chain the per-module bounds into the network's constant.

    With ``fold``, a BatchNorm that alone reads a conv/linear layer's output is folded into
    it: the pair counts ``||diag(scale) W||`` (:func:`folded_norm`) instead of the product
    ``||W|| * max(scale)``.
    """
    lip: dict[fx.Node, float | None] = {}
    entering: dict[fx.Node, float] = {}  # the constant entering each weight layer
    params = list(gm.parameters())
    like = params[0] if params else torch.zeros(())
    network: float | None = None
    encoder = head = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            lip[node] = 1.0 if not any(n.op == "placeholder" for n in lip) else None
        elif node.op == "get_attr":
            lip[node] = None
        elif node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            parts = _dependent(node, lip)
            if not parts:
                lip[node] = None
                continue
            if len(parts) > 1:
                raise RobustlabError(
                    f"the robustness bound cannot bound '{node.target}': it reads two features"
                )
            arg = node.all_input_nodes[0]
            if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                factor = weight_norm(str(node.target), module)
                entering[node] = parts[0]
            elif (
                fold
                and isinstance(module, nn.modules.batchnorm._BatchNorm)
                and arg in entering
                and len(arg.users) == 1
            ):
                layer = gm.get_submodule(str(arg.target))
                lip[node] = entering[arg] * folded_norm(
                    layer, bn_scale(str(node.target), module), norm
                )
                continue
            else:
                meta = arg.meta.get("tensor_meta")
                shape = list(meta.shape) if meta is not None else None
                factor = module_bound(str(node.target), module, norm, shape, like)
            lip[node] = parts[0] * factor
            if str(node.target) == head_name:
                encoder, head = parts[0], factor
        elif node.op in ("call_function", "call_method"):
            target = node.target
            parts = _dependent(node, lip)
            if not parts:
                lip[node] = None
            elif target in _SUMS or target in ("add", "sub", "add_", "sub_") or target is torch.cat:
                lip[node] = _combine(norm, node, parts)
            elif target in _SCALE or target in _DIVIDE or target in ("mul", "div", "mul_", "div_"):
                lip[node] = _scale(gm, node, lip)
            elif target in _SAME or target in _SAME_METHODS:
                lip[node] = parts[0] if len(parts) == 1 else None
                if lip[node] is None:
                    raise RobustlabError(f"the robustness bound cannot bound '{node.name}'")
            elif target in _CONST_METHODS or target is builtins.getattr:
                lip[node] = None
            else:
                what = getattr(target, "__name__", str(target))
                raise RobustlabError(
                    f"the robustness bound cannot bound the operation {what} ('{node.name}')"
                )
        elif node.op == "output":
            out = node.args[0]
            network = lip.get(out) if isinstance(out, fx.Node) else None
    if network is None:
        raise RobustlabError(
            "the model's output does not depend on its input through a single tensor"
        )
    return Chain(network, encoder, head)


def head_name(model: nn.Module) -> str | None:
    """The module path of the classifier head, if the model declares one."""
    try:
        head = classifier_head(model)
    except RobustlabError:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def _per_layer(
    per_layer: Mapping[str, Mapping[str, Mapping[str, float]]], norm: str, form: str
) -> Callable[[str, nn.Module], float]:
    """The bound of each weight layer, by name, for one norm and one form."""

    def weight_norm(name: str, module: nn.Module) -> float:
        """The bound of one weight layer."""
        if name not in per_layer:
            raise RobustlabError(f"no metrics were given for the layer '{name}'")
        return per_layer[name][norm][form]

    return weight_norm


@dataclass(frozen=True)
class Bound:
    """The bound for one threat model: constants of both forms, the bound on the loss rise."""

    norm: str
    eps: float
    kappa: float
    ce_lipschitz: float
    lipschitz: dict[str, float]
    encoder_lipschitz: dict[str, float | None]
    head_norm: dict[str, float | None]
    bound: float
    bound_compressibility: float
    alignment: float | None = None
    aligned_estimate: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able."""
        return asdict(self)


def robustness_bounds(
    model: nn.Module,
    metrics: Sequence[LayerMetrics],
    input_shape: Sequence[int],
    eps: Mapping[str, float],
    kappa: float,
) -> dict[str, Bound]:
    """The bound on the rise of each sample's cross-entropy, per threat model in ``eps``.

    ``metrics`` are the model's :func:`~robustlab.analysis.compressibility.layer_metrics`;
    ``kappa`` the fraction whose compressibility the Theorem 3.1 form uses (the smallest asked).
    """
    by_name = {m.name: m for m in metrics}
    modules = dict(model.named_modules())
    per_layer = {
        name: layer_bounds(m, modules[name], kappa)
        for name, m in by_name.items()
        if name in modules
    }
    head = head_name(model)
    out: dict[str, Bound] = {}
    with evaluating(model), torch.no_grad():
        gm = trace(model, input_shape)
        for norm, budget in eps.items():
            if norm not in NORMS:
                raise RobustlabError(f"the robustness bound covers linf and l2, not {norm}")
            chains: dict[str, Chain] = {}
            for form in FORMS:
                weight_norm = _per_layer(per_layer, norm, form)
                chains[form] = chain_lipschitz(gm, norm, weight_norm, head, fold=form == "exact")
            ce = CE_LIPSCHITZ[norm]
            out[norm] = Bound(
                norm=norm,
                eps=float(budget),
                kappa=float(kappa),
                ce_lipschitz=ce,
                lipschitz={f: c.network for f, c in chains.items()},
                encoder_lipschitz={f: c.encoder for f, c in chains.items()},
                head_norm={f: c.head for f, c in chains.items()},
                bound=ce * chains["exact"].network * float(budget),
                bound_compressibility=ce * chains["compressibility"].network * float(budget),
            )
    return out


def with_alignment(bound: Bound, gains: Mapping[str, torch.Tensor]) -> Bound:
    """The bound with its alignment term: the largest local gain
    (:func:`robustlab.models.gains.local_gains`, re-exported here) over
    the batch divided by the network's Lipschitz bound (exact form)."""
    gain = float(gains[bound.norm].max())
    lip = bound.lipschitz["exact"]
    alignment = gain / lip if lip > 0 else 0.0
    return Bound(
        **{**asdict(bound), "alignment": alignment, "aligned_estimate": alignment * bound.bound}
    )

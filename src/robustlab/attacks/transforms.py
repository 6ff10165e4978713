"""Gradient transforms for transfer attacks: SGM (``skip_gradient``) and LinBP (``linbp``).

Both are context managers over a model: inside the ``with`` block, every backward pass
through the model is changed, the forward pass is bit-for-bit the same, and on exit (also
after an exception) every hook they added is removed, so the model is exactly as before.
Any gradient attack composes with them::

    with skip_gradient(model, gamma=0.2):
        x_adv = MIFGSM(eps=0.1)(model, x, y)

**Where the residual blocks are** is the model structure's answer
(:func:`robustlab.models.structure.find_residual_sites`, re-exported here with
:func:`declare_residual`). Blocks are found by structure, never by module name:

- robustlab's :class:`~robustlab.models.blocks.ResidualBlock` and ``DenseLayer`` expose
  their residual branch as ``.branch``;
- torchvision ResNets (``BasicBlock``, ``Bottleneck``), DenseNets (``_DenseLayer``) and
  ViTs (``EncoderBlock``), and timm ResNets, DenseNets and ViTs, are recognised when those
  libraries are installed and imported;
- any other model's blocks are declared with one call to :func:`declare_residual`.

A model with none of these gets a :class:`~robustlab.errors.RobustlabError`, never a silent
no-op.

**What SGM scales (Wu et al., ICLR 2020).** For ``z' = skip(z) + f(z)`` the gradient
leaving the branch output ``f(z)`` is multiplied by a factor in the backward pass; the
skip path keeps its gradient. The backward pass of a branch is linear in the gradient it
receives (ReLU masks, eval-mode batch norm and convolutions are fixed in the backward
pass), so scaling the branch output is exactly scaling anywhere along a chain-shaped
branch. The conventions:

- ResNet and pre-activation ResNet blocks: ``gamma`` per block.
- DenseNet dense layers: the paper puts ``sqrt(gamma)`` on each of the layer's two ReLUs;
  both lie on the (chain-shaped) branch, so this is the same as ``gamma`` on the layer's
  new features, which is what is done here (a test checks the equivalence).
- Transformer layers (blocks whose branch normalises with ``LayerNorm``, i.e. the
  attention and the MLP sub-blocks of a pre-norm ViT): ``sqrt(gamma)`` per sub-block, so a
  whole layer is scaled by ``gamma``.

Nothing else is scaled: in particular not the ReLU after the addition of a post-activation
ResNet block (a trap of the name-based reference code), and the forward values are copied
unchanged, so in-place ReLUs anywhere in the model are harmless.

**LinBP (Guo et al., NeurIPS 2020).** From a chosen residual block on, the backward pass
treats the activations inside residual branches (ReLU family and GELU) as the identity,
and (by default) rescales each branch's linearised input gradient, per sample, to the l2
norm the true gradient through that branch would have. The renormalisation runs each
such branch a second time (a forward and a backward pass of the branch only). A branch that
is no one module (torchvision's and timm's blocks call their layers one by one) is known as
the chain of modules the block runs on it (``ResidualSite.chain``): LinBP linearises the
activations among them, only for their calls on the branch (a torchvision block calls the
same ReLU again after the addition), and re-runs the chain from its first module's input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import RobustlabError
from ..models.structure import BranchSpec, ResidualSite, declare_residual, find_residual_sites

__all__ = [
    "LINEARISED",
    "BranchSpec",
    "ResidualSite",
    "check_gamma",
    "declare_residual",
    "find_residual_sites",
    "linbp",
    "skip_gradient",
]

#: Activations that LinBP treats as the identity in the backward pass.
LINEARISED: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU)


def check_gamma(gamma: float) -> float:
    """Validate an SGM decay factor: a number in (0, 1]."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise RobustlabError(f"gamma must be a number in (0, 1], got {gamma!r}")
    if not (math.isfinite(gamma) and 0 < gamma <= 1):
        raise RobustlabError(f"gamma must lie in (0, 1] (1 keeps the plain gradient), got {gamma}")
    return float(gamma)


def _no_blocks(model: nn.Module, what: str) -> RobustlabError:
    """The error for a model without residual blocks."""
    inner = model[-1] if isinstance(model, nn.Sequential) and len(model) else model
    return RobustlabError(
        f"{what} needs residual blocks, but {type(inner).__name__} has none that robustlab "
        "recognises; mark them with robustlab.attacks.transforms.declare_residual"
    )


class _ScaleGrad(torch.autograd.Function):
    """Identity forward (a copy, so in-place ops after it are safe); gradient times ``scale``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


# torch leaves Function.apply unannotated: this is its typed entry point
_scale_grad: Callable[[torch.Tensor, float], torch.Tensor] = _ScaleGrad.apply


def _map_outputs(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to the tensor(s) a module returned that carry a gradient; None if none do."""
    if isinstance(output, torch.Tensor):
        return fn(output) if output.requires_grad else None
    if isinstance(output, (tuple, list)):
        if not any(isinstance(o, torch.Tensor) and o.requires_grad for o in output):
            return None
        mapped = [fn(o) if isinstance(o, torch.Tensor) and o.requires_grad else o for o in output]
        return type(output)(mapped) if isinstance(output, list) else tuple(mapped)
    return None


def _scaling_hook(scale: float) -> Callable[[nn.Module, Any, Any], Any]:
    """A forward hook that scales the gradient of a module's output(s) by ``scale``."""

    def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
        if not torch.is_grad_enabled():
            return None
        return _map_outputs(output, lambda t: _scale_grad(t, scale))

    return hook


@contextmanager
def _removing(handles: list[RemovableHandle]) -> Iterator[None]:
    """Remove every hook handle on exit, also after an exception."""
    try:
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()
        handles.clear()


@contextmanager
def skip_gradient(
    model: nn.Module, gamma: float, *, sites: Sequence[ResidualSite] | None = None
) -> Iterator[list[ResidualSite]]:
    """SGM: scale the backward gradient through every residual branch of ``model`` by ``gamma``.

    ``gamma`` lies in (0, 1]; 1 gives exactly the plain gradient. ``sites`` restricts the
    transform to chosen blocks (default: all, see :func:`find_residual_sites`). Yields the
    sites it acts on. Nested uses multiply. See the module docstring for the conventions.
    """
    g = check_gamma(gamma)
    chosen = find_residual_sites(model) if sites is None else list(sites)
    if not chosen:
        raise _no_blocks(model, "skip_gradient (SGM)")
    handles: list[RemovableHandle] = []
    with _removing(handles):
        for site in chosen:
            scale = g**site.power
            for end in dict.fromkeys(site.ends):
                handles.append(end.register_forward_hook(_scaling_hook(scale)))
        yield chosen


# ---- LinBP -------------------------------------------------------------------------------


class _LinearThrough(torch.autograd.Function):
    """Forward: the activation's output; backward: the gradient passed to its input unchanged."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


# torch leaves Function.apply unannotated: this is its typed entry point
_linear_through: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _LinearThrough.apply


@dataclass
class _BranchPass:
    """One call of a branch under LinBP: its detached input, the true graph, the output grad."""

    x_true: torch.Tensor | None = None
    out_true: torch.Tensor | None = None
    grad_out: torch.Tensor | None = None


class _RenormIn(torch.autograd.Function):
    """At a branch input: rescale the linearised gradient to the true gradient's norm."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, state: _BranchPass) -> torch.Tensor:
        ctx.state = state
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        state: _BranchPass = ctx.state
        if state.grad_out is None or state.out_true is None or state.x_true is None:
            return grad, None
        with torch.enable_grad():
            (true,) = torch.autograd.grad(
                state.out_true, state.x_true, state.grad_out, retain_graph=True, allow_unused=True
            )
        if true is None:
            return grad, None
        dims = [1] * (grad.dim() - 1)
        ratio = true.flatten(1).norm(dim=1) / grad.flatten(1).norm(dim=1).clamp_min(1e-30)
        return grad * ratio.view(-1, *dims).to(grad.dtype), None


# torch leaves Function.apply unannotated: this is its typed entry point
_renorm_in: Callable[[torch.Tensor, _BranchPass], torch.Tensor] = _RenormIn.apply


class _CaptureOut(torch.autograd.Function):
    """At a branch output: remember the gradient arriving there, for :class:`_RenormIn`."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, state: _BranchPass) -> torch.Tensor:
        ctx.state = state
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.state.grad_out = grad
        return grad, None


# torch leaves Function.apply unannotated: this is its typed entry point
_capture_out: Callable[[torch.Tensor, _BranchPass], torch.Tensor] = _CaptureOut.apply


@dataclass
class _LinBPState:
    """Hook state shared by one ``linbp`` context (a re-run of a branch bypasses the hooks).

    ``limits`` caps how many calls of an activation, per call of its block, lie on a branch
    (a torchvision block calls its one ReLU inside the branch and again after the addition);
    ``calls`` counts them since the block's call began."""

    bypass: bool = False
    pending: dict[int, list[torch.Tensor | None]] = field(default_factory=dict)
    passes: dict[int, list[_BranchPass | None]] = field(default_factory=dict)
    limits: dict[int, int] = field(default_factory=dict)
    calls: dict[int, int] = field(default_factory=dict)


def _activation_hooks(
    state: _LinBPState,
) -> tuple[Callable[[nn.Module, Any], Any], Callable[[nn.Module, Any, Any], Any]]:
    """Forward pre-hook and hook making an activation's backward pass the identity."""

    def pre(module: nn.Module, args: Any) -> Any:
        stack = state.pending.setdefault(id(module), [])
        x = args[0] if args else None
        active = (
            not state.bypass
            and torch.is_grad_enabled()
            and isinstance(x, torch.Tensor)
            and x.requires_grad
        )
        limit = state.limits.get(id(module))
        if limit is not None and not state.bypass:  # only its first calls lie on the branch
            state.calls[id(module)] = state.calls.get(id(module), 0) + 1
            active = active and state.calls[id(module)] <= limit
        if not active or x is None:
            stack.append(None)
            return None
        # an in-place activation overwrites its input: keep a graph-connected copy of it
        stack.append(x.clone() if getattr(module, "inplace", False) else x)
        return None

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        pre_act = state.pending[id(module)].pop()
        if pre_act is None or not isinstance(output, torch.Tensor):
            return None
        return _linear_through(pre_act, output)

    return pre, hook


def _branch_hooks(
    state: _LinBPState, chain: tuple[nn.Module, ...]
) -> tuple[Callable[[nn.Module, Any], Any], Callable[[nn.Module, Any, Any], Any]]:
    """Forward pre-hook (for the chain's entry) and hook (for its last module) renormalising
    a linearised branch's input gradient; the branch is re-run from the entry's input."""

    def rerun(x: torch.Tensor, extra: tuple[Any, ...]) -> Any:
        """The branch again, without the hooks of its own chain modules."""
        h: Any = chain[0].forward(x, *extra)
        for module in chain[1:]:
            h = module.forward(h)
        return h

    def pre(module: nn.Module, args: Any) -> Any:
        stack = state.passes.setdefault(id(chain), [])
        x = args[0] if args else None
        if (
            state.bypass
            or not torch.is_grad_enabled()
            or not isinstance(x, torch.Tensor)
            or not x.requires_grad
        ):
            stack.append(None)
            return None
        run = _BranchPass(x_true=x.detach().requires_grad_(True))
        stack.append(run)
        return (_renorm_in(x, run), *args[1:])

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        run = state.passes[id(chain)].pop()
        extra = tuple(args[1:]) if len(chain) == 1 else ()  # a whole branch's further arguments
        if run is None or run.x_true is None or not isinstance(output, torch.Tensor):
            return None
        state.bypass = True
        try:
            with torch.enable_grad():
                run.out_true = rerun(run.x_true, extra)
        finally:
            state.bypass = False
        return _capture_out(output, run)

    return pre, hook


@contextmanager
def linbp(
    model: nn.Module,
    start_block: int = 0,
    *,
    renormalize: bool = True,
) -> Iterator[list[ResidualSite]]:
    """LinBP: from residual block ``start_block`` on, backpropagate through branch activations as identity.

    ``start_block`` indexes :func:`find_residual_sites` (module order; negative counts from
    the end, so ``-2`` linearises the last two blocks). With ``renormalize`` each branch's
    linearised input gradient is rescaled, per sample, to the l2 norm of the true one.
    Composes with :func:`skip_gradient` in either nesting order. Yields the blocks changed.
    """
    all_sites = find_residual_sites(model)
    if not all_sites:
        raise _no_blocks(model, "linbp")
    n = len(all_sites)
    if isinstance(start_block, bool) or not isinstance(start_block, int):
        raise RobustlabError(f"linbp start_block must be an integer, got {start_block!r}")
    if not -n <= start_block < n:
        raise RobustlabError(
            f"linbp start_block {start_block} is out of range: the model has {n} residual blocks"
        )
    chosen = all_sites[start_block:]
    chains: list[tuple[nn.Module, ...]] = []
    for site in chosen:
        if not site.branch_chain():
            raise RobustlabError(
                f"linbp needs the whole residual branch of {type(site.block).__name__}; declare "
                "it with declare_residual(..., whole_branch=True) for one module, or chain=[...] "
                "for the modules the block runs on it"
            )
        chains.append(site.branch_chain())
    # an activation listed as a step of a chain lies on the branch for as many of its calls
    # per block call as it is listed; one inside a step, for every call
    limits: dict[nn.Module, int] = {}
    activations: list[nn.Module] = []
    for chain in chains:
        for step in chain:
            if isinstance(step, LINEARISED) and len(chain) > 1:
                limits[step] = chain.count(step)
            activations.extend(m for m in step.modules() if isinstance(m, LINEARISED))
    if not activations:
        raise RobustlabError(
            f"linbp found no ReLU or GELU inside the residual branches from block {start_block} "
            "on, so it would change nothing"
        )
    state = _LinBPState(limits={id(m): k for m, k in limits.items()})
    handles: list[RemovableHandle] = []

    def new_block_call(module: nn.Module, args: Any) -> None:
        """A block's call begins: its activations' calls are counted afresh."""
        if not state.bypass:
            for step in limited.get(id(module), ()):
                state.calls[id(step)] = 0

    limited = {
        id(site.block): [s for s in chain if s in limits]
        for site, chain in zip(chosen, chains, strict=True)
    }
    with _removing(handles):
        for site in chosen:
            if limited[id(site.block)]:
                handles.append(site.block.register_forward_pre_hook(new_block_call))
        for act in dict.fromkeys(activations):
            pre, hook = _activation_hooks(state)
            handles.append(act.register_forward_pre_hook(pre))
            handles.append(act.register_forward_hook(hook))
        if renormalize:
            for chain in dict.fromkeys(chains):
                pre, hook = _branch_hooks(state, chain)
                # run first: the capture must sit under other transforms' output wrappers
                handles.append(chain[0].register_forward_pre_hook(pre, prepend=True))
                handles.append(chain[-1].register_forward_hook(hook, prepend=True))
        yield chosen

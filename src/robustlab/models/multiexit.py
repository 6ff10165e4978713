"""Multi-exit networks (Shallow-Deep Networks, Kaya et al. 2019) over any zoo backbone.

A :class:`MultiExitNetwork` keeps the backbone (``Normalize`` + zoo net, as ``build_model``
makes it) untouched under ``backbone`` and cuts its forward pass into *units* by structure:
the stem, then each block (a residual block, a VGG conv layer, a dense layer, a transformer
layer, a hidden layer of an MLP). Internal classifiers (ICs, :class:`ExitHead`) read the
features after chosen units; the backbone's own head is the final exit.

Its ``forward`` returns plain logits so that every other command accepts it:
``output="final"`` (default) runs the backbone alone, ``output="early"`` returns the logits of
the exit each input leaves at, ``output="all"`` returns the list of every exit's logits (ICs
first, the final exit last). :meth:`MultiExitNetwork.early_exit` is batched early-exit
inference: inputs leave the batch at the first IC whose confidence reaches the threshold,
and the rest of the network runs on the remaining inputs only.

Confidence is ``max softmax`` (rule ``max_softmax``) or ``1 - entropy / log(classes)`` (rule
``entropy``); an input exits where its confidence is >= the threshold q in (0, 1].
Thresholds are calibrated on a held-out calibration split
(:func:`robustlab.analysis.efficiency.calibrate`), never on test.

Where the units are is the backbone's own declaration (:mod:`robustlab.models.structure`);
this module knows no architecture by name. The cost of each unit, exit and head is counted
here with :mod:`robustlab.models.flops`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.guard import evaluating
from ..errors import RobustlabError
from .engine import infer
from .flops import FlopCounter
from .structure import Plan, Step, plan_for, run_steps

__all__ = [
    "DEFAULT_FRACTIONS",
    "HEAD_SIZE",
    "OUTPUTS",
    "RULES",
    "ExitHead",
    "ExitOutput",
    "MultiExitNetwork",
    "Plan",
    "Step",
    "attach_exits",
    "check_rule",
    "check_threshold",
    "confidence",
    "default_positions",
    "exit_flops",
    "exit_predictions",
    "first_exit",
    "head_flops",
    "plan_for",
    "unit_flops",
]

RULES = ("max_softmax", "entropy")
OUTPUTS = ("final", "early", "all")
DEFAULT_FRACTIONS = (0.15, 0.30, 0.45, 0.60, 0.75, 0.90)
HEAD_SIZE = 4  # ICs pool feature maps to 4x4, as in SDN


def check_rule(rule: str) -> str:
    """Refuse an unknown exit rule with one sentence."""
    if rule not in RULES:
        raise RobustlabError(f"unknown exit rule '{rule}'; use one of {', '.join(RULES)}")
    return rule


def check_threshold(q: float) -> float:
    """Refuse an exit threshold outside (0, 1] with one sentence."""
    if not isinstance(q, (int, float)) or isinstance(q, bool) or not 0 < float(q) <= 1:
        raise RobustlabError(f"an exit threshold must lie in (0, 1], got {q!r}")
    return float(q)


def confidence(logits: torch.Tensor, rule: str = "max_softmax") -> torch.Tensor:
    """Per-sample exit confidence in [0, 1]: max softmax, or 1 - normalised entropy."""
    logp = F.log_softmax(logits.float(), dim=1)
    if rule == "max_softmax":
        return logp.amax(dim=1).exp()
    if rule == "entropy":
        k = logits.shape[1]
        if k < 2:
            return torch.ones(len(logits), device=logits.device)
        entropy = -(logp.exp() * logp).sum(dim=1)
        return (1 - entropy / math.log(k)).clamp(0.0, 1.0)
    raise RobustlabError(f"unknown exit rule '{rule}'; use one of {', '.join(RULES)}")


def first_exit(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per sample, the first IC (column of ``scores``, N x E) reaching ``threshold``; E if none."""
    hit = scores >= threshold
    first = hit.to(torch.uint8).argmax(dim=1)
    return torch.where(hit.any(dim=1), first, torch.full_like(first, scores.shape[1]))


def adaptive_pool(
    h: torch.Tensor, declared: tuple[int, int], size: tuple[int, int], kind: str
) -> torch.Tensor:
    """PyTorch's adaptive max or average pooling of ``h`` to ``size``; while a model is
    traced for export (ONNX has no adaptive pooling to sizes that do not divide the input),
    the same windows of the ``declared`` input size (rows floor(i*H/s) to ceil((i+1)*H/s),
    likewise columns) pooled one by one."""
    pool = F.adaptive_max_pool2d if kind == "max" else F.adaptive_avg_pool2d
    height, width = declared
    tracing: bool = torch.jit.is_tracing()  # type: ignore[attr-defined,no-untyped-call]
    if not tracing or (height % size[0] == 0 and width % size[1] == 0):
        return pool(h, size)

    def windows(n: int, s: int) -> list[tuple[int, int]]:
        return [((i * n) // s, -(-((i + 1) * n) // s)) for i in range(s)]

    def reduce(w: torch.Tensor) -> torch.Tensor:
        return w.amax(dim=(-2, -1)) if kind == "max" else w.mean(dim=(-2, -1))

    rows = [
        torch.stack([reduce(h[..., r0:r1, c0:c1]) for c0, c1 in windows(width, size[1])], -1)
        for r0, r1 in windows(height, size[0])
    ]
    return torch.stack(rows, -2)


class ExitHead(nn.Module):
    """An SDN internal classifier: alpha*maxpool + (1-alpha)*avgpool to 4x4, flatten, linear.

    Feature maps already at most 4x4 are not pooled; token sequences (ViT) are read at the
    class token after a LayerNorm; flat features go straight to the linear layer. alpha is
    learnt (a sigmoid of one parameter, so it stays in [0, 1]).
    """

    def __init__(self, feature_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.feature_shape = tuple(int(s) for s in feature_shape)
        self.pool = False
        self.pool_size = (HEAD_SIZE, HEAD_SIZE)
        self.norm: nn.Module = nn.Identity()
        if len(self.feature_shape) == 3:
            c, h, w = self.feature_shape
            self.pool = h > HEAD_SIZE or w > HEAD_SIZE
            # from the declared shape, not the tensor's: a traced export keeps no Python branch
            self.pool_size = (min(h, HEAD_SIZE), min(w, HEAD_SIZE))
            features = c * (min(h, HEAD_SIZE) * min(w, HEAD_SIZE) if self.pool else h * w)
        elif len(self.feature_shape) == 2:
            features = self.feature_shape[1]
            self.norm = nn.LayerNorm(features)
        elif len(self.feature_shape) == 1:
            features = self.feature_shape[0]
        else:
            raise RobustlabError(f"an exit cannot read features of shape {self.feature_shape}")
        self.alpha_logit = nn.Parameter(torch.zeros(1))
        self.fc = nn.Linear(features, num_classes)

    @property
    def alpha(self) -> float:
        """The current max-pool weight of the blend."""
        return float(torch.sigmoid(self.alpha_logit.detach()))

    def features(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The parameter-free part of the head: max and avg pools, the class token, or h."""
        if self.pool:
            declared = (self.feature_shape[1], self.feature_shape[2])
            return (
                adaptive_pool(h, declared, self.pool_size, "max"),
                adaptive_pool(h, declared, self.pool_size, "avg"),
            )
        if len(self.feature_shape) == 2:
            return (h[:, 0],)
        return (h,)

    def classify(self, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Logits from :meth:`features` (kept apart so that a frozen backbone's can be cached)."""
        logits: torch.Tensor
        if self.pool:
            a = torch.sigmoid(self.alpha_logit)
            logits = self.fc((a * parts[0] + (1 - a) * parts[1]).flatten(1))
        elif len(self.feature_shape) == 2:
            logits = self.fc(self.norm(parts[0]))
        else:
            logits = self.fc(parts[0].flatten(1))
        return logits

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of this exit from the features after its block."""
        return self.classify(self.features(h))

    def flops(self, inp: torch.Tensor, out: torch.Tensor) -> int:
        """Cost of the pooling blend (the linear layer and norm are counted on their own)."""
        if not self.pool:
            return 0
        n = (
            inp.shape[0]
            * inp.shape[1]
            * min(inp.shape[2], HEAD_SIZE)
            * min(inp.shape[3], HEAD_SIZE)
        )
        return 2 * inp.numel() + 2 * n


@dataclass
class ExitOutput:
    """What early-exit inference returns: each input's logits and the exit it left at."""

    logits: torch.Tensor
    exits: torch.Tensor


class MultiExitNetwork(nn.Module):
    """A zoo backbone with SDN internal classifiers after chosen units (see the module doc)."""

    def __init__(
        self,
        backbone: nn.Module,
        input_shape: Sequence[int],
        num_classes: int,
        positions: Sequence[int] | None = None,
        *,
        rule: str = "max_softmax",
        threshold: float = 1.0,
        output: str = "final",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.plan: Plan = plan_for(backbone)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.rule = check_rule(rule)
        self.threshold = check_threshold(threshold)
        self.output = _check_output(output)
        last = len(self.plan.units) - 2
        if positions is None:
            positions = default_positions(self)
        chosen = [int(p) for p in positions]
        bad = [p for p in chosen if not 0 <= p <= last]
        if bad or len(set(chosen)) != len(chosen):
            where = f"0..{last}" if last >= 0 else "none"
            raise RobustlabError(
                f"exit positions {list(positions)} do not fit this backbone: it has "
                f"{len(self.plan.units)} units ({', '.join(self.plan.names)}), so exits go "
                f"after units {where}, each at most once"
            )
        if not chosen:
            raise RobustlabError("a multi-exit network needs at least one internal exit")
        self.positions = sorted(chosen)
        shapes = self._feature_shapes()
        self.heads = nn.ModuleList([ExitHead(shapes[p], self.num_classes) for p in self.positions])
        device = next(backbone.parameters()).device
        self.heads.to(device)
        self._costs: list[int] | None = None

    # -- running the backbone unit by unit ------------------------------------------------
    def run_steps(self, steps: Sequence[Step], h: torch.Tensor) -> torch.Tensor:
        """Apply the steps of one unit (or of the final head) to features ``h``."""
        return run_steps(self, steps, h)

    def _feature_shapes(self) -> list[tuple[int, ...]]:
        """The per-input feature shape after each unit, from a probe pass in eval mode."""
        param = next(self.backbone.parameters())
        h = torch.zeros(1, *self.input_shape, device=param.device, dtype=param.dtype)
        shapes = []
        try:
            with evaluating(self.backbone), torch.no_grad():
                for unit in self.plan.units:
                    h = self.run_steps(unit, h)
                    shapes.append(tuple(h.shape[1:]))
        except RuntimeError as exc:
            raise RobustlabError(
                f"the backbone does not take inputs of shape {self.input_shape}: {exc}"
            ) from None
        return shapes

    @property
    def exit_heads(self) -> list[ExitHead]:
        """The internal classifiers, in order (typed)."""
        return [h for h in self.heads if isinstance(h, ExitHead)]

    @property
    def num_exits(self) -> int:
        """Number of exits, the final one included."""
        return len(self.positions) + 1

    def exit_names(self) -> list[str]:
        """A readable name per exit: the unit it follows, then 'final'."""
        return [f"after {self.plan.names[p]}" for p in self.positions] + ["final"]

    # -- outputs --------------------------------------------------------------------------
    def all_exits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The logits of every exit for every input: ICs in order, the final exit last."""
        outs: list[torch.Tensor] = []
        h = x
        k = 0
        for u, unit in enumerate(self.plan.units):
            h = self.run_steps(unit, h)
            if k < len(self.positions) and self.positions[k] == u:
                outs.append(self.heads[k](h))
                k += 1
        outs.append(self.run_steps(self.plan.head, h))
        return outs

    def final(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's own logits (no IC is computed)."""
        h = x
        for unit in self.plan.units:
            h = self.run_steps(unit, h)
        return self.run_steps(self.plan.head, h)

    def early_exit(
        self, x: torch.Tensor, threshold: float | None = None, rule: str | None = None
    ) -> ExitOutput:
        """Batched early-exit inference: inputs leave at the first confident IC, the rest go on.

        The remaining units and heads run only on the inputs still in the batch, so the work
        saved is real. Differentiable through the exit each input takes.
        """
        q = self.threshold if threshold is None else check_threshold(threshold)
        rule = self.rule if rule is None else check_rule(rule)
        n = x.shape[0]
        logits = x.new_zeros(n, self.num_classes)
        exits = torch.full((n,), len(self.positions), dtype=torch.long, device=x.device)
        active = torch.arange(n, device=x.device)
        h = x
        k = 0
        for u, unit in enumerate(self.plan.units):
            if len(active) == 0:
                break
            h = self.run_steps(unit, h)
            if k < len(self.positions) and self.positions[k] == u:
                out = self.heads[k](h)
                leave = confidence(out, rule) >= q
                if bool(leave.any()):
                    gone = active[leave]
                    logits = logits.index_copy(0, gone, out[leave].to(logits.dtype))
                    exits[gone] = k
                    stay = ~leave
                    h, active = h[stay], active[stay]
                k += 1
        if len(active):
            out = self.run_steps(self.plan.head, h)
            logits = logits.index_copy(0, active, out.to(logits.dtype))
        return ExitOutput(logits, exits)

    def forward(self, x: torch.Tensor) -> Any:
        """Logits as ``output`` says: final exit, early-exit prediction, or all exits (a list)."""
        if self.output == "all":
            return self.all_exits(x)
        if self.output == "early":
            return self.early_exit(x).logits
        return self.final(x)

    @contextmanager
    def outputs(self, output: str) -> Iterator[MultiExitNetwork]:
        """Temporarily switch what ``forward`` returns (restored on exit, also on errors)."""
        before = self.output
        self.output = _check_output(output)
        try:
            yield self
        finally:
            self.output = before

    # -- cost and configuration -----------------------------------------------------------
    def exit_costs(self) -> list[int]:
        """Cumulative multiply-accumulates per input to reach each exit (earlier ICs included)."""
        if self._costs is None:
            self._costs = exit_flops(self)
        return list(self._costs)

    def config(self) -> dict[str, Any]:
        """The manifest's ``multi_exit`` section: everything needed to rebuild the exits."""
        return {
            "positions": list(self.positions),
            "rule": self.rule,
            "threshold": self.threshold,
            "output": self.output,
            "unit_names": list(self.plan.names),
        }

    def extra_repr(self) -> str:
        """Exits, rule and threshold, for print(model)."""
        return (
            f"exits after units {self.positions} of {len(self.plan.units)}, rule={self.rule}, "
            f"threshold={self.threshold:.4g}, output={self.output}"
        )


def _check_output(output: str) -> str:
    if output not in OUTPUTS:
        raise RobustlabError(f"unknown output mode '{output}'; use one of {', '.join(OUTPUTS)}")
    return output


def default_positions(
    model: MultiExitNetwork, fractions: Sequence[float] = DEFAULT_FRACTIONS
) -> list[int]:
    """Units whose cumulative backbone cost is nearest to each fraction of the total (deduplicated)."""
    costs = unit_flops(model)
    total = sum(costs) + head_flops(model)
    cumulative = [sum(costs[: i + 1]) / total for i in range(len(costs) - 1)]
    if not cumulative:
        return []
    chosen: list[int] = []
    for f in fractions:
        best = min(range(len(cumulative)), key=lambda i: (abs(cumulative[i] - f), i))
        if best not in chosen:
            chosen.append(best)
    return sorted(chosen)


def attach_exits(
    backbone: nn.Module,
    input_shape: Sequence[int],
    num_classes: int,
    positions: Sequence[int] | None = None,
    **kwargs: Any,
) -> MultiExitNetwork:
    """Wrap a ``build_model`` backbone with SDN exits (default: at ~15..90 % of its FLOPs)."""
    return MultiExitNetwork(backbone, input_shape, num_classes, positions, **kwargs)


# -- what every exit says, and what each costs ---------------------------------------------


@torch.no_grad()
def exit_predictions(
    model: MultiExitNetwork, x: torch.Tensor, rule: str, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every exit's confidence (N x ICs) and prediction (N x exits) for inputs ``x``, eval mode.

    The passes go through the inference engine attached to the model with ``output="all"``
    (:func:`~robustlab.models.engine.infer`), PyTorch when there is none."""
    device = next(model.parameters()).device
    scores, preds = [], []
    with evaluating(model), model.outputs("all"), torch.no_grad():
        for i in range(0, len(x), batch_size):
            outs = infer(model, x[i : i + batch_size].to(device))
            scores.append(torch.stack([confidence(o, rule) for o in outs[:-1]], 1).cpu())
            preds.append(torch.stack([o.argmax(1) for o in outs], 1).cpu())
    return torch.cat(scores), torch.cat(preds)


def _probe(model: MultiExitNetwork) -> torch.Tensor:
    """A zero input of the model's shape on its device, batch of one."""
    param = next(model.parameters())
    return torch.zeros(1, *model.input_shape, device=param.device, dtype=param.dtype)


def unit_flops(model: MultiExitNetwork) -> list[int]:
    """Multiply-accumulates per input of each backbone unit of a multi-exit network."""
    costs: list[int] = []
    with evaluating(model), torch.no_grad(), FlopCounter(model) as counter:
        h = _probe(model)
        for unit in model.plan.units:
            h = model.run_steps(unit, h)
            costs.append(counter.reset())
    return costs


def head_flops(model: MultiExitNetwork) -> int:
    """Multiply-accumulates per input of the backbone's own (final) head."""
    with evaluating(model), torch.no_grad():
        h = _probe(model)
        for unit in model.plan.units:
            h = model.run_steps(unit, h)
        with FlopCounter(model) as counter:
            model.run_steps(model.plan.head, h)
    return counter.total


def exit_flops(model: MultiExitNetwork) -> list[int]:
    """Cumulative multiply-accumulates per input to reach each exit, the final one last.

    An input leaving at IC k has paid for the backbone up to IC k's unit and for ICs 0..k;
    one reaching the final exit has paid for the whole backbone and every IC.
    """
    units = unit_flops(model)
    heads: list[int] = []
    with evaluating(model), torch.no_grad(), FlopCounter(model) as counter:
        h = _probe(model)
        k = 0
        for u, unit in enumerate(model.plan.units):
            h = model.run_steps(unit, h)
            counter.reset()
            if k < len(model.positions) and model.positions[k] == u:
                model.heads[k](h)
                heads.append(counter.reset())
                k += 1
    costs = [sum(units[: p + 1]) + sum(heads[: k + 1]) for k, p in enumerate(model.positions)]
    costs.append(sum(units) + sum(heads) + head_flops(model))
    return costs

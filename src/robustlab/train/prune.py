"""Magnitude pruning (global or per layer, by weight or by output filter), eps-targeted per-layer
pruning, and fine-tuning with the masks kept fixed in the one training loop.

Our choices, where the paper is silent:

- **Which layers.** Every weight layer (``models.structure.weight_layers``: conv, linear, and
  an ``nn.MultiheadAttention``'s packed input projection ``in_proj_weight``) but the first
  layer and the head (the layers the regularisers and the rank option leave out too; pruning
  the 9-weight filters of a first conv or a 10-row head costs accuracy out of proportion).
  Masks are keyed by the parameters' state-dict names (``models.weights.weight_name``).
  Unstructured pruning zeroes weights; structured pruning removes whole output filters (rows
  of ``C_out x C_in*kh*kw``; of an attention's ``3E x E`` input projection, one query, key or
  value unit each), with their bias and, when a BatchNorm directly follows the layer in an
  ``nn.Sequential`` or in a residual branch's declared chain (torchvision's and timm's ResNet
  blocks), that channel's BatchNorm scale and shift, so the channel outputs zero as if the
  filter were removed). Sparsities are over the pruned layers; ``sparsity_of`` gives the whole model's.
- **How many.** A sparsity ``S`` in (0, 1) zeroes ``round(S * n)`` weights: of all ranked weights
  (global) or of each layer's (per layer). Structured, ``S`` is the fraction of filters removed;
  globally, filters of layers of different fan-in are ranked by their root-mean-square weight
  (norm / sqrt(fan-in)). A structured layer always keeps at least one filter.
- **eps-targeted per-layer pruning** (the paper's mitigation): each layer keeps the fewest
  entries (weights, or filter norms when structured) whose best-k approximation has relative
  l2 error ``||v - v_k||_2 / ||v||_2 <= eps``; the per-layer and global sparsity that result
  are recorded.
- Ties in magnitude are broken by position, so the sparsity asked is met exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.device import resolve_device
from ..data import Dataset, DataSplits
from ..errors import RobustlabError
from ..models.checkpoint import MANIFEST, save_checkpoint
from ..models.structure import find_residual_sites, weight_layers
from ..models.weights import (
    as_matrix,
    best_k_error,
    bias_name,
    k_for_error,
    layer_bias,
    layer_weight,
    weight_name,
)
from .compression import penalized_layers
from .loop import EpochSampler, accuracy, fit
from .methods import Hook, Method, Step
from .recipes import recipe_for

SCOPES = ("global", "layer")


@dataclass(frozen=True)
class PruneSpec:
    """What to prune: a fixed sparsity (global or per layer) or a per-layer target error."""

    sparsity: float | None = None
    scope: str = "global"
    structured: bool = False
    target_error: float | None = None

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise RobustlabError(f"pruning scope must be global or layer, got '{self.scope}'")
        if (self.sparsity is None) == (self.target_error is None):
            raise RobustlabError("give either a sparsity or a target error to prune to, not both")
        for name, value in (("sparsity", self.sparsity), ("target error", self.target_error)):
            if value is not None and not (math.isfinite(value) and 0 < value < 1):
                raise RobustlabError(f"{name} must be a fraction in (0, 1), got {value}")

    def config(self) -> dict[str, Any]:
        """JSON-able description (a target error is per layer by definition)."""
        scope = "layer" if self.target_error is not None else self.scope
        return {
            "sparsity_asked": self.sparsity,
            "scope": scope,
            "structured": self.structured,
            "target_error": self.target_error,
        }


@dataclass
class Pruned:
    """Masks by state-dict name (1 keeps, 0 prunes) and what was pruned, layer by layer."""

    masks: dict[str, torch.Tensor]
    layers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights over every layer considered."""
        total = sum(int(layer["weights"]) for layer in self.layers)
        zero = sum(int(layer["zero_weights"]) for layer in self.layers)
        return zero / total if total else 0.0

    def record(self) -> dict[str, Any]:
        """The manifest's account: global sparsity (of weights; of filters when structured)
        and each layer's."""
        found: dict[str, Any] = {"sparsity": self.sparsity, "layers": self.layers}
        filters = sum(int(layer.get("filters", 0)) for layer in self.layers)
        if filters:
            pruned = sum(int(layer["filters_pruned"]) for layer in self.layers)
            found["filter_sparsity"] = pruned / filters
        return found


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers pruning considers: every weight layer but the first and the head."""
    layers = penalized_layers(model, everything=False)
    if not layers:
        raise RobustlabError(
            "the model has no conv or linear layer besides its first layer and its head to prune"
        )
    return layers


def _smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` smallest scores, ties broken by position."""
    return torch.sort(scores, stable=True).indices[:k]


def _filter_scores(weight: torch.Tensor) -> torch.Tensor:
    """Each output filter's root-mean-square weight (its norm over sqrt(fan-in))."""
    m = as_matrix(weight.detach())
    scores: torch.Tensor = torch.linalg.vector_norm(m, dim=1) / math.sqrt(m.shape[1])
    return scores


def _unstructured(layers: list[tuple[str, nn.Module]], spec: PruneSpec) -> dict[str, torch.Tensor]:
    """Weight masks of magnitude pruning, by layer name."""
    flat = {name: layer_weight(m).detach().abs().flatten() for name, m in layers}
    drop: dict[str, torch.Tensor] = {}
    if spec.target_error is not None:
        for name, v in flat.items():
            drop[name] = _smallest(v, v.numel() - k_for_error(v, spec.target_error))
    elif spec.scope == "layer":
        assert spec.sparsity is not None
        for name, v in flat.items():
            drop[name] = _smallest(v, round(spec.sparsity * v.numel()))
    else:
        assert spec.sparsity is not None
        scores = torch.cat([v.cpu() for v in flat.values()])
        chosen = _smallest(scores, round(spec.sparsity * scores.numel()))
        start = 0
        for name, v in flat.items():
            inside = (chosen >= start) & (chosen < start + v.numel())
            drop[name] = chosen[inside] - start
            start += v.numel()
    masks = {}
    for name, m in layers:
        weight = layer_weight(m)
        mask = torch.ones(weight.numel(), device=weight.device)
        mask[drop[name].to(weight.device)] = 0.0
        masks[name] = mask.reshape(weight.shape)
    return masks


def _structured(layers: list[tuple[str, nn.Module]], spec: PruneSpec) -> dict[str, torch.Tensor]:
    """Row masks (one entry per output filter) of filter pruning, by layer name."""
    scores = {name: _filter_scores(layer_weight(m)).cpu() for name, m in layers}
    drop: dict[str, list[int]] = {}
    if spec.target_error is not None:
        for name, s in scores.items():
            keep = max(1, k_for_error(s, spec.target_error))
            drop[name] = _smallest(s, s.numel() - keep).tolist()
    elif spec.scope == "layer":
        assert spec.sparsity is not None
        for name, s in scores.items():
            drop[name] = _smallest(s, min(round(spec.sparsity * s.numel()), s.numel() - 1)).tolist()
    else:
        assert spec.sparsity is not None
        owners = [(name, i) for name, s in scores.items() for i in range(s.numel())]
        order = _smallest(torch.cat(list(scores.values())), len(owners)).tolist()
        want = round(spec.sparsity * len(owners))
        left = {name: s.numel() for name, s in scores.items()}
        drop = {name: [] for name in scores}
        for j in order:
            if sum(len(d) for d in drop.values()) >= want:
                break
            name, i = owners[j]
            if left[name] > 1:
                drop[name].append(i)
                left[name] -= 1
    rows = {}
    for name, s in scores.items():
        row = torch.ones(s.numel())
        row[drop[name]] = 0.0
        rows[name] = row
    return rows


def following_batchnorms(model: nn.Module) -> dict[int, str]:
    """For each layer (by id) directly followed by an affine BatchNorm inside an
    ``nn.Sequential`` or in a residual branch's declared chain (a torchvision or timm
    ResNet block's ``conv1, bn1, ...``: ``models.structure.find_residual_sites``), that
    BatchNorm's name."""
    names = {id(m): n for n, m in model.named_modules()}
    runs = [list(m) for m in model.modules() if isinstance(m, nn.Sequential)]
    runs += [list(site.chain) for site in find_residual_sites(model)]
    found: dict[int, str] = {}
    for layers in runs:
        for a, b in zip(layers, layers[1:], strict=False):
            if isinstance(b, nn.modules.batchnorm._BatchNorm) and b.affine:
                found[id(a)] = names[id(b)]
    return found


def _apply(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Multiply each masked parameter by its mask (in place, no gradient)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask.to(params[name].device, params[name].dtype))


def prune(model: nn.Module, spec: PruneSpec) -> Pruned:
    """Prune ``model`` in place by ``spec``; returns the masks and what was pruned per layer."""
    layers = prunable_layers(model)
    masks: dict[str, torch.Tensor] = {}
    report = []
    if spec.structured:
        rows = _structured(layers, spec)
        norms = following_batchnorms(model)
    else:
        weights = _unstructured(layers, spec)
    for name, m in layers:
        weight = layer_weight(m)
        entry: dict[str, Any] = {"name": name, "shape": list(weight.shape)}
        if spec.structured:
            row = rows[name].to(weight.device)
            masks[weight_name(name, m)] = row.reshape(-1, *[1] * (weight.dim() - 1)).expand_as(
                weight
            )
            if layer_bias(m) is not None:
                masks[bias_name(name, m)] = row.clone()
            if id(m) in norms:
                masks[f"{norms[id(m)]}.weight"] = row.clone()
                masks[f"{norms[id(m)]}.bias"] = row.clone()
            entry["filters"] = row.numel()
            entry["filters_pruned"] = int((row == 0).sum())
            if spec.target_error is not None:
                scores = _filter_scores(weight)
                entry["error"] = best_k_error(scores, int(row.sum()))
        else:
            masks[weight_name(name, m)] = weights[name]
            if spec.target_error is not None:
                entry["error"] = best_k_error(weight.detach().flatten(), int(weights[name].sum()))
        report.append(entry)
    _apply(model, masks)
    for entry, (_, m) in zip(report, layers, strict=True):
        weight = layer_weight(m)
        entry["weights"] = weight.numel()
        entry["zero_weights"] = int((weight == 0).sum())
        entry["sparsity"] = entry["zero_weights"] / weight.numel()
    masks = {k: v.contiguous() for k, v in masks.items()}
    return Pruned(masks, report)


class KeepMasks(Hook):
    """Keeps pruned weights at zero through fine-tuning: masks re-applied after every step."""

    def __init__(self, masks: Mapping[str, torch.Tensor]) -> None:
        self.masks = dict(masks)

    def start(self, model: nn.Module) -> None:
        """Apply the masks before the first step."""
        _apply(model, self.masks)

    def after_step(self, step: Step) -> None:
        """Zero the pruned weights again after the optimiser moved them."""
        _apply(step.model, self.masks)


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning after pruning: a method, epochs, and the SGD recipe of ``train`` (lr lower)."""

    method: Method
    epochs: int
    lr: float = 0.01
    batch_size: int | None = None
    weight_decay: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise RobustlabError(f"fine-tuning needs at least one epoch, got {self.epochs}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise RobustlabError(f"fine-tuning learning rate must be > 0, got {self.lr}")

    def config(self) -> dict[str, Any]:
        """JSON-able description, with the recipe's values filled in."""
        recipe = recipe_for(self.method.name)
        return {
            "method": self.method.config(),
            "epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size or recipe["batch_size"],
            "weight_decay": recipe["weight_decay"]
            if self.weight_decay is None
            else self.weight_decay,
            "seed": self.seed,
        }


def finetune(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    data: Dataset,
    config: FinetuneConfig,
    *,
    device: str = "auto",
    progress: bool = False,
) -> list[float]:
    """Fine-tune a pruned model on ``data`` with ``fit``, its masks kept; mean loss per epoch."""
    dev = resolve_device(device)
    settings = config.config()
    model.to(dev)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=0.9,
        weight_decay=settings["weight_decay"],
        nesterov=True,
    )
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    attack_gen = torch.Generator(device=dev).manual_seed(config.seed + 1)
    history = fit(
        model,
        config.method,
        optimizer,
        data.x.to(dev),
        data.y.to(dev),
        EpochSampler(len(data), gen),
        batch_size=settings["batch_size"],
        epochs=config.epochs,
        lr=config.lr,
        gen=attack_gen,
        hooks=[KeepMasks(masks)],
        progress=progress,
        desc=f"fine-tune {config.method.name}",
    )
    model.eval()
    return history


def sparsity_of(model: nn.Module, names: Iterable[str] | None = None) -> float:
    """Fraction of zero weights over the named weight layers of a model (all: None)."""
    layers = weight_layers(model)
    if names is not None:
        wanted = set(names)
        layers = [(n, m) for n, m in layers if n in wanted]
    weights = [layer_weight(m).detach() for _, m in layers]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total if total else 0.0


def prune_checkpoint(
    model: nn.Module,
    manifest: Mapping[str, Any],
    splits: DataSplits,
    spec: PruneSpec,
    out: str | Path,
    *,
    finetuning: FinetuneConfig | None = None,
    base: Mapping[str, Any] | None = None,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Prune a loaded checkpoint's model (in place), fine-tune it if asked, and write a normal
    robustlab checkpoint (zeros in its weights) to ``out``; returns its manifest.

    The manifest keeps the base's ``model``, ``dataset`` and ``training`` sections and adds
    ``pruning`` (the spec, sparsity per layer and global, the base model's path and hash, the
    fine-tuning) and ``metrics`` with the clean test accuracy before pruning, right after it,
    and at the end (``clean_accuracy``)."""
    if "quantization" in manifest:
        raise RobustlabError(
            "cannot prune an int8 checkpoint; prune its float base model, then quantize that"
        )
    dev = resolve_device(device)
    model.to(dev).eval()
    before = accuracy(model, splits.test, device=dev)
    pruned = prune(model, spec)
    right_after = accuracy(model, splits.test, device=dev)
    record: dict[str, Any] = {**spec.config(), **pruned.record(), "base": dict(base or {})}
    final = right_after
    if finetuning is not None:
        history = finetune(
            model, pruned.masks, splits.train, finetuning, device=dev, progress=progress
        )
        final = accuracy(model, splits.test, device=dev)
        record["finetune"] = {**finetuning.config(), "loss": history}
        record["sparsity_after_finetune"] = sparsity_of(model, [e["name"] for e in pruned.layers])
    record["model_sparsity"] = sparsity_of(model)
    new: dict[str, Any] = {
        "model": manifest["model"],
        "dataset": manifest.get("dataset", splits.info()),
        "pruning": record,
        "metrics": {
            "clean_accuracy": final,
            "clean_accuracy_before_pruning": before,
            "clean_accuracy_after_pruning": right_after,
            "test_samples": len(splits.test),
        },
    }
    if "training" in manifest:
        new["training"] = manifest["training"]
    model.to("cpu")
    save_checkpoint(model, out, new)
    saved: dict[str, Any] = json.loads((Path(out) / MANIFEST).read_text())
    return saved

"""The architecture registry: build any zoo model by name for a given input shape (and a
torchvision:NAME or timm:NAME architecture through its library).

Each zoo module registers its architectures beside its definition (``register``); the
package imports every zoo module, so the registry is complete once ``robustlab.models`` is.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import RobustlabError
from .blocks import Normalize
from .libraries import library_builder, library_of
from .lowrank import RANK_OPTION, check_rank, factorize


@dataclass(frozen=True)
class Architecture:
    """A registered architecture: its builder, the arguments it fixes, and one line on it."""

    name: str
    builder: Callable[..., nn.Module]
    fixed: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def _generic_name(self) -> str:
        """The registered name of this builder without fixed arguments (e.g. resnet for resnet8)."""
        for arch in ARCHITECTURES.values():
            if arch.builder is self.builder and not arch.fixed:
                return arch.name
        return self.name

    def arguments(self, **overrides: Any) -> dict[str, Any]:
        """The full keyword arguments (defaults, then fixed, then overrides) of this architecture."""
        params = inspect.signature(self.builder).parameters
        shape_args = {"in_channels", "num_classes", "image_size"}
        known = {k: p.default for k, p in params.items() if k not in shape_args}
        shared = (
            {RANK_OPTION: check_rank(overrides[RANK_OPTION])} if RANK_OPTION in overrides else {}
        )
        overrides = {k: v for k, v in overrides.items() if k not in shared}
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise RobustlabError(
                f"architecture '{self.name}' has no option {', '.join(unknown)}; "
                f"its options are {', '.join(sorted(known)) or 'none'}"
            )
        for key, value in overrides.items():
            if key in self.fixed and value != self.fixed[key]:
                raise RobustlabError(
                    f"architecture '{self.name}' fixes {key}={self.fixed[key]}; "
                    f"build '{self._generic_name()}' with {key}={value} instead"
                )
            default = known[key]
            wants_int = isinstance(default, int) and not isinstance(default, bool)
            if wants_int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise RobustlabError(
                    f"option {key} of architecture '{self.name}' must be an integer, got {value!r}"
                )
        return {**known, **self.fixed, **overrides, **shared}


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> None:
    """Add an architecture to the registry (later issues and users add their own)."""
    ARCHITECTURES[arch.name] = arch


def get_architecture(name: str) -> Architecture:
    """Look up a registered architecture, or a torchvision:NAME / timm:NAME one (built by the
    library, see ``libraries``), with a clear error for unknown names."""
    found = library_of(name)
    if found is not None:
        return Architecture(name, library_builder(name), {}, f"{found[0]}'s {found[1]}")
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise RobustlabError(
            f"unknown architecture '{name}'; known: {', '.join(sorted(ARCHITECTURES))}, "
            "or torchvision:NAME and timm:NAME"
        ) from None


def build_model(
    arch: str,
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: int = 28,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **options: Any,
) -> nn.Sequential:
    """Build ``Normalize(mean, std)`` followed by the named network; it takes [0,1] inputs.

    Every architecture also takes ``rank=R``: its layers but the first and the head are then
    factorised at rank R (``lowrank.factorize``)."""
    spec = get_architecture(arch)
    kwargs = spec.arguments(**options)
    rank = kwargs.pop(RANK_OPTION, None)
    for label, value in (
        ("in_channels", in_channels),
        ("num_classes", num_classes),
        ("image_size", image_size),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise RobustlabError(f"{label} must be a positive integer, got {value!r}")
    try:
        mean = [float(m) for m in mean] if mean is not None else [0.0] * in_channels
        std = [float(s) for s in std] if std is not None else [1.0] * in_channels
    except (TypeError, ValueError):
        raise RobustlabError(
            f"normalisation mean and std must be sequences of numbers, got {mean!r} and {std!r}"
        ) from None
    if len(mean) != in_channels or len(std) != in_channels:
        raise RobustlabError(
            f"normalisation needs one mean and std per channel ({in_channels}), "
            f"got {len(mean)} and {len(std)}"
        )
    if not all(math.isfinite(s) and s > 0 for s in std):
        raise RobustlabError(f"normalisation std must be positive and finite, got {std}")
    if not all(math.isfinite(m) for m in mean):
        raise RobustlabError(f"normalisation mean must be finite, got {mean}")
    try:
        body = spec.builder(in_channels, num_classes, image_size, **kwargs)
    except ValueError as exc:
        raise RobustlabError(f"cannot build '{arch}': {exc}") from None
    if rank is not None:
        factorize(body, rank)
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=body))


def model_config(
    arch: str,
    in_channels: int,
    num_classes: int,
    image_size: int,
    mean: list[float] | tuple[float, ...],
    std: list[float] | tuple[float, ...],
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest's ``model`` section: everything ``build_model`` needs to rebuild it."""
    return {
        "arch": arch,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "image_size": image_size,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "options": dict(options or {}),
    }


#: Initialisers that draw from a normal distribution: on the meta device torch runs them
#: through its reference implementations, whose first use imports TorchDynamo (seconds).
_NORMAL_INITS = ("normal_", "kaiming_normal_", "xavier_normal_")


@contextmanager
def shapes_only() -> Iterator[None]:
    """Build models on the meta device (their shapes, no memory) and skip the normal-family
    initialisers on meta tensors, which alone would cost seconds the first time; they still
    run as usual on real tensors, in any thread."""
    originals = {name: getattr(nn.init, name) for name in _NORMAL_INITS}

    def skipping(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def init(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return tensor if tensor.is_meta else original(tensor, *args, **kwargs)

        return init

    try:
        for name, original in originals.items():
            setattr(nn.init, name, skipping(original))
        with torch.device("meta"):
            yield
    finally:
        for name, original in originals.items():
            setattr(nn.init, name, original)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

"""Shifted streams made for real: batches of a dataset, and from a chosen batch on, a shift
(noise, blur, brightness, a class-prior change, adversarial examples) applied to them.

A shift is written ``NAME:VALUE[,KEY=VALUE...]`` (``parse_shift``):

- ``noise:S``: Gaussian pixel noise of standard deviation S, clipped to [0, 1];
- ``blur:S``: Gaussian blur of standard deviation S pixels;
- ``brightness:D``: D added to every pixel (-1 <= D <= 1, not 0), clipped to [0, 1];
- ``prior:P[,class=C]``: a share P of each batch drawn from class C (default 0), the rest
  from the whole stream as usual (the labels choose the points; the monitor never sees them);
- ``adversarial:EPS[,attack=pgd,norm=linf,steps=10]``: each batch replaced by the attack's
  examples against the monitored model (any attack of the registry, on the true labels).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..attacks.registry import make_attack
from ..data.dataset import Dataset
from ..errors import RobustlabError

SHIFT_FORMS = (
    "noise:S, blur:S, brightness:D, prior:P[,class=C] or "
    "adversarial:EPS[,attack=pgd,norm=linf,steps=10]"
)


@dataclass(frozen=True)
class Shift:
    """A shift of the stream's batches: which points a batch takes and how they change."""

    name: str
    value: float
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> str:
        """The shift as written on the command line."""
        extra = "".join(f",{k}={v}" for k, v in self.options.items())
        return f"{self.name}:{self.value:g}{extra}"

    @property
    def selects(self) -> bool:
        """Whether the shift changes which points a batch takes (not their pixels)."""
        return self.name == "prior"

    def select(self, labels: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
        """Indices of a prior-shifted batch: round(P * size) points of the class, the rest
        drawn from the whole stream (no point twice in a batch)."""
        cls = int(self.options.get("class", 0))
        own = torch.nonzero(labels == cls).flatten()
        take = min(int(round(self.value * size)), len(own))
        chosen = own[torch.randperm(len(own), generator=gen)[:take]]
        left = torch.ones(len(labels), dtype=torch.bool)
        left[chosen] = False
        rest = torch.nonzero(left).flatten()
        more = rest[torch.randperm(len(rest), generator=gen)[: size - take]]
        return torch.cat([chosen, more])

    def apply(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, seed: int
    ) -> torch.Tensor:
        """The batch's inputs under the shift (the model: for adversarial batches)."""
        if self.name == "noise":
            noise = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
            return (x + self.value * noise).clamp(0.0, 1.0)
        if self.name == "blur":
            return gaussian_blur(x, self.value)
        if self.name == "brightness":
            return (x + self.value).clamp(0.0, 1.0)
        if self.name == "adversarial":
            opts = {k: v for k, v in self.options.items() if k not in ("attack", "norm")}
            attack = make_attack(
                str(self.options.get("attack", "pgd")),
                str(self.options.get("norm", "linf")),
                self.value,
                **{"steps": 10, **opts, "seed": seed},
            )
            param = next(model.parameters(), None)
            device = param.device if param is not None else x.device
            return attack(model, x.to(device), y.to(device)).detach().to(x.device)
        return x  # prior: the points change, not their pixels


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Each channel blurred by a Gaussian of ``sigma`` pixels (reflected at the borders)."""
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    c = x.shape[1]
    padded = torch.nn.functional.pad(x, (radius, radius, radius, radius), mode="reflect")
    rows = torch.nn.functional.conv2d(padded, g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return torch.nn.functional.conv2d(rows, g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _option(key: str, raw: str) -> Any:
    """One KEY=VALUE option of a shift, as a number where it reads as one."""
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def parse_shift(text: str, num_classes: int | None = None) -> Shift:
    """A shift from ``NAME:VALUE[,KEY=VALUE...]``, with its value checked."""
    head, _, rest = text.strip().partition(",")
    name, sep, raw = head.partition(":")
    name = name.strip().lower()
    try:
        value = float(raw) if sep else math.nan
    except ValueError:
        value = math.nan
    if name not in ("noise", "blur", "brightness", "prior", "adversarial") or math.isnan(value):
        raise RobustlabError(f"shift '{text}' is not one of {SHIFT_FORMS}")
    options: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise RobustlabError(f"shift option '{item}' must look like KEY=VALUE")
        options[key.strip()] = _option(key.strip(), val.strip())
    allowed = {"prior": {"class"}, "adversarial": None}.get(name, set())
    if allowed is not None and set(options) - allowed:
        unknown = ", ".join(sorted(set(options) - allowed))
        raise RobustlabError(f"the {name} shift has no option {unknown}")
    _check_value(name, value, options, num_classes)
    return Shift(name, value, options)


def _check_value(name: str, value: float, options: dict[str, Any], classes: int | None) -> None:
    """A shift's value within what makes it a shift, in one sentence."""
    if name in ("noise", "blur", "adversarial") and not value > 0:
        raise RobustlabError(f"the {name} shift needs a value > 0, got {value:g}")
    if name == "brightness" and not (-1.0 <= value <= 1.0 and value != 0):
        raise RobustlabError(f"the brightness shift needs -1 <= D <= 1 and D != 0, got {value:g}")
    if name == "prior":
        if not 0.0 < value <= 1.0:
            raise RobustlabError(f"the prior shift needs a share 0 < P <= 1, got {value:g}")
        cls = options.get("class", 0)
        if not isinstance(cls, int) or cls < 0 or (classes is not None and cls >= classes):
            upto = f" 0..{classes - 1}" if classes else ""
            raise RobustlabError(
                f"the prior shift's class must be one of the classes{upto}, got {cls}"
            )


@dataclass(frozen=True)
class StreamBatch:
    """One batch of the stream: its place, inputs, labels, the points it took, and whether
    it was shifted."""

    index: int
    x: torch.Tensor
    y: torch.Tensor
    points: torch.Tensor
    shifted: bool


def check_stream(points: int, batch_size: int, batches: int | None, start: int | None) -> int:
    """The number of batches the stream gives, with its settings checked in one sentence."""
    if batch_size < 2:
        raise RobustlabError(f"the batch size must be at least 2 inputs, got {batch_size}")
    if batch_size > points:
        raise RobustlabError(
            f"the batch size {batch_size} is larger than the stream ({points} held-out inputs): "
            f"use --batch-size {points} or less"
        )
    count = points // batch_size if batches is None else batches
    if count < 1:
        raise RobustlabError(f"the stream needs at least 1 batch, got {count}")
    if start is not None and not 0 <= start < count:
        raise RobustlabError(
            f"the shift starts at batch {start}, but the stream's batches are 0..{count - 1}"
        )
    return count


def stream_batches(
    data: Dataset,
    batch_size: int,
    *,
    batches: int | None = None,
    shift: Shift | None = None,
    start: int = 0,
    model: nn.Module | None = None,
    seed: int = 0,
) -> Iterator[StreamBatch]:
    """The stream's batches: passes over the data in seeded random order, ``batch_size``
    points each (``batches``: how many, by default one pass; more take more passes, so points
    recur across passes but never within a batch); from batch ``start`` on, shifted."""
    count = check_stream(len(data), batch_size, batches, start if shift else None)
    if shift is not None and shift.name == "adversarial" and model is None:
        raise RobustlabError("adversarial batches need the model to attack")
    gen = torch.Generator().manual_seed(seed)
    per_pass = len(data) // batch_size
    order = torch.randperm(len(data), generator=gen)
    for i in range(count):
        if i and i % per_pass == 0:
            order = torch.randperm(len(data), generator=gen)
        shifted = shift is not None and i >= start
        if shifted and shift is not None and shift.selects:
            points = shift.select(data.y, batch_size, gen)
        else:
            j = i % per_pass
            points = order[j * batch_size : (j + 1) * batch_size]
        x, y = data.x[points], data.y[points]
        if shifted and shift is not None:
            x = shift.apply(model if model is not None else nn.Identity(), x, y, gen, seed + i)
        yield StreamBatch(i, x, y, points, shifted)

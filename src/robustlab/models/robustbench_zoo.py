"""RobustBench's model zoo (``robustbench:NAME`` with its dataset and threat model, as
RobustBench names them), loaded by RobustBench's own loader when the package is installed.

RobustBench models take [0, 1] pixels and normalise inside, so they declare no further
normalisation. Their weights are downloaded by RobustBench on first use into
``$ROBUSTLAB_CACHE/robustbench`` (a network is needed once); without one the error says so.
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import RobustlabError
from ..io import cache_dir

DEFAULT_DATASET = "cifar10"
DEFAULT_THREAT = "Linf"
#: Input shape (channels, side) and classes of RobustBench's datasets.
SHAPES = {"cifar10": (3, 32, 10), "cifar100": (3, 32, 100), "imagenet": (3, 224, 1000)}


@dataclass(frozen=True)
class BenchModel:
    """A RobustBench model and what it declares: input shape, classes, its weights file."""

    model: nn.Module
    in_channels: int
    image_size: int
    num_classes: int
    weights: Path | None


def _package() -> tuple[Any, Any, Any, Any]:
    """RobustBench's loader, model table and enums, or one sentence saying it is missing."""
    try:
        from robustbench.model_zoo import model_dicts  # type: ignore[import-not-found,unused-ignore]
        from robustbench.model_zoo.enums import (  # type: ignore[import-not-found,unused-ignore]
            BenchmarkDataset,
            ThreatModel,
        )
        from robustbench.utils import load_model  # type: ignore[import-not-found,unused-ignore]
    except ModuleNotFoundError:
        raise RobustlabError(
            "robustbench: models need the robustbench package, which is not installed "
            "(pip install robustbench)"
        ) from None
    except Exception as exc:  # e.g. a dependency of robustbench that fails to import
        raise RobustlabError(
            f"robustbench is installed but does not import ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else ''})"
        ) from None
    return load_model, model_dicts, BenchmarkDataset, ThreatModel


def _choose(what: str, value: str, known: list[str]) -> str:
    """``value`` if it is one of ``known`` (case-insensitively), else an error naming close ones."""
    for k in known:
        if k.lower() == value.lower():
            return k
    close = difflib.get_close_matches(value, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; it has {', '.join(known)}"
    raise RobustlabError(f"RobustBench has no {what} '{value}'{hint}")


def load_robustbench(name: str, dataset: str | None, threat_model: str | None) -> BenchModel:
    """RobustBench's model ``name`` for ``dataset`` and ``threat_model`` (its names; defaults
    cifar10 and Linf), with its weights (downloaded once by RobustBench)."""
    load_model, model_dicts, benchmark_dataset, threat_enum = _package()
    data = _choose("dataset", dataset or DEFAULT_DATASET, [d.value for d in benchmark_dataset])
    threat = _choose("threat model", threat_model or DEFAULT_THREAT, [t.value for t in threat_enum])
    table = model_dicts[benchmark_dataset(data)].get(threat_enum(threat), {})
    known = sorted(table)
    if name not in table:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise RobustlabError(
            f"RobustBench has no model '{name}' for {data} {threat}{hint} "
            f"({len(known)} models there)"
        )
    folder = cache_dir() / "robustbench"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load_model(
                model_name=name, model_dir=str(folder), dataset=data, threat_model=threat
            )
    except Exception as exc:  # download (HTTP, gdown), unpickling and build errors alike
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise RobustlabError(
            f"RobustBench could not load {name} ({type(exc).__name__}: {first}); it downloads "
            f"the weights once into {folder}, which needs a network"
        ) from None
    if not isinstance(model, nn.Module):
        raise RobustlabError(f"RobustBench's loader returned a {type(model).__name__} for {name}")
    channels, side, classes = SHAPES.get(data, (3, 32, 10))
    weights = folder / data / threat / f"{name}.pt"  # where RobustBench keeps them
    return BenchModel(model.eval(), channels, side, classes, weights if weights.is_file() else None)

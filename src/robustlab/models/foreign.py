"""Models that are not robustlab checkpoints, as ``--model`` and ``robustlab.load`` name them:
``torchvision:NAME`` and ``timm:NAME`` (with ``--weights FILE`` or ``--weights hub``),
``robustbench:NAME`` (with its dataset and threat model), ``python:FILE.py:FACTORY`` (with
optional ``--weights FILE``) and TorchScript files (``torchscript:PATH``, or any TorchScript
archive given as a path).

Each becomes what a checkpoint is: ``Normalize(mean, std)`` followed by the network, as
``build_model`` makes zoo models (an ``nn.Sequential`` with children ``normalize`` and
``net``), so attacks work in [0, 1] pixel space and every structural feature finds the network
where it looks for a zoo one; and a manifest whose ``model`` section gives its input shape,
classes and normalisation and whose ``source`` section says what was loaded (kind, name, the
weights file and its SHA-256, the code's SHA-256). The input shape and classes come from
what the user gives (``input_size``, ``num_classes``), else the weights, else the data the
command runs on; the normalisation from the user, else what the source declares (pretrained
hub weights, RobustBench's models, a state dict saved from a robustlab model); a probe pass
checks that the model returns one row of logits per input.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import RobustlabError
from .blocks import Normalize
from .fingerprint import tensor_digest
from .libraries import HUB, build_library_model, is_hub, library_of
from .registry import model_config, shapes_only
from .robustbench_zoo import load_robustbench
from .structure import classifier_head
from .usercode import load_python_factory, load_torchscript, parse_python_spec
from .weightfile import file_sha256, is_torchscript, load_state, read_state_dict

KINDS = ("torchvision", "timm", "robustbench", "python", "torchscript")
FORMAT = "foreign-model"
#: Kinds whose model cannot be rebuilt from a manifest without running the user's code again.
NOT_REBUILT = ("python", "torchscript", "robustbench")
PROBE_BATCH = 2


@dataclass(frozen=True)
class ForeignOptions:
    """What a foreign model is given besides its name: weights, input shape, classes,
    normalisation, and RobustBench's dataset and threat model."""

    weights: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_size: tuple[int, int, int] | None = None
    num_classes: int | None = None
    dataset: str | None = None
    threat_model: str | None = None

    @classmethod
    def of(cls, **given: Any) -> ForeignOptions:
        """Options from keyword arguments (``robustlab.load``), each checked."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise RobustlabError(
                f"unknown model option {', '.join(unknown)}; a foreign model takes "
                f"{', '.join(names)}"
            )
        return cls(
            weights=None if given.get("weights") is None else str(given["weights"]),
            mean=_numbers(given.get("mean"), "mean"),
            std=_numbers(given.get("std"), "std"),
            input_size=_input_size(given.get("input_size")),
            num_classes=_positive(given.get("num_classes"), "num_classes"),
            dataset=given.get("dataset"),
            threat_model=given.get("threat_model"),
        )

    def given(self) -> dict[str, Any]:
        """The options that were given (not left to the model, its weights or the data), as
        JSON values: what a record says a model was given."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in values.items() if v is not None
        }


@dataclass(frozen=True)
class DataShape:
    """What the data a command runs on tells a model it must take (used where neither the
    user nor the model says)."""

    in_channels: int
    image_size: int
    num_classes: int


def _numbers(value: Any, what: str) -> tuple[float, ...] | None:
    """A per-channel sequence of finite numbers (or one number), or None."""
    if value is None:
        return None
    items = [value] if isinstance(value, numbers.Real) else value
    try:
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise RobustlabError(
            f"{what} must be a number or a sequence of numbers, got {value!r}"
        ) from None
    if not out or not all(math.isfinite(v) for v in out):
        raise RobustlabError(f"{what} must be finite numbers, got {value!r}")
    return out


def _positive(value: Any, what: str) -> int | None:
    """A positive whole number, or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise RobustlabError(f"{what} must be a positive whole number, got {value!r}")
    return int(value)


def _input_size(value: Any) -> tuple[int, int, int] | None:
    """(channels, height, width) with height == width, or None."""
    if value is None:
        return None
    try:
        dims = tuple(value)
    except TypeError:
        dims = ()
    if len(dims) != 3 or not all(_positive(d, "input size") for d in dims):
        raise RobustlabError(
            f"the input size is channels, height, width (e.g. 3,32,32), got {value!r}"
        )
    c, h, w = (int(d) for d in dims)
    if h != w:
        raise RobustlabError(f"robustlab models take square images, got an input size of {h}x{w}")
    return c, h, w


def foreign_kind(spec: str | Path) -> str | None:
    """Which kind of foreign model a ``--model`` value names; None for a robustlab checkpoint."""
    text = str(spec)
    kind, sep, _ = text.partition(":")
    if sep and kind.strip().lower() in KINDS:
        return kind.strip().lower()
    path = Path(text).expanduser()
    return "torchscript" if path.is_file() and is_torchscript(path) else None


def foreign_inputs(spec: str | Path, weights: str | None = None) -> list[Path]:
    """The files a foreign model reads (its code or archive, its weights), which a command
    must never write over."""
    kind = foreign_kind(spec)
    files: list[Path] = []
    if kind == "python":
        files.append(parse_python_spec(str(spec))[0])
    elif kind == "torchscript":
        files.append(_script_path(str(spec)))
    if weights is not None and not is_hub(weights):
        files.append(Path(weights).expanduser())
    return files


def _script_path(spec: str) -> Path:
    """The file of a TorchScript spec (``torchscript:PATH`` or the path itself)."""
    kind, sep, rest = spec.partition(":")
    return Path(rest if sep and kind.strip().lower() == "torchscript" else spec).expanduser()


@dataclass
class _Loaded:
    """A foreign network before its normalisation layer, and what it declares or was given."""

    net: nn.Module
    arch: str
    source: dict[str, Any]
    in_channels: int | None = None
    image_size: int | None = None
    num_classes: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def _first(*values: int | None) -> int | None:
    """The first value that is not None."""
    return next((v for v in values if v is not None), None)


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names and tensors (weights that come from no file of the
    user's, such as a library's pretrained ones)."""
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        tensor_digest(h, tensor)
    return h.hexdigest()


def _unwrap(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], tuple[float, ...] | None, tuple[float, ...] | None]:
    """The network's own keys of a state dict (DataParallel's ``module.`` and a robustlab
    model's ``net.`` removed) and the normalisation a robustlab model's state carries."""
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    mean = std = None
    if "normalize.mean" in state and "normalize.std" in state:
        mean = tuple(float(v) for v in state["normalize.mean"].flatten())
        std = tuple(float(v) for v in state["normalize.std"].flatten())
        state = {
            k.removeprefix("net."): v for k, v in state.items() if not k.startswith("normalize.")
        }
    return state, mean, std


def _weights_file(spec: str, weights: str) -> Path:
    """The user's weights file, which must exist."""
    path = Path(weights).expanduser()
    if not path.exists():
        raise RobustlabError(f"weights file {path} (for {spec}) does not exist")
    return path


def _named(net: nn.Module, module: nn.Module) -> str | None:
    """The path of a submodule within ``net``."""
    return next((name for name, m in net.named_modules() if m is module), None)


def _shape_from_state(
    arch: str, state: dict[str, torch.Tensor], image_size: int
) -> tuple[int | None, int | None]:
    """Input channels and classes the weights were trained for: the first convolution's
    input width and the classifier head's rows (found on a model built on the meta device)."""
    with shapes_only():
        net = build_library_model(arch, 3, 1000, image_size)[0]
    channels = classes = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            weight = state.get(f"{name}.weight")
            channels = int(weight.shape[1]) * module.groups if weight is not None else None
            break
    try:
        head = _named(net, classifier_head(net))
    except RobustlabError:
        head = None
    weight = state.get(f"{head}.weight") if head is not None else None
    if weight is not None and weight.dim() == 2:
        classes = int(weight.shape[0])
    return channels, classes


def _library(spec: str, options: ForeignOptions, data: DataShape | None) -> _Loaded:
    """A torchvision or timm architecture with the user's weights or the library's."""
    found = library_of(spec)
    assert found is not None
    arch = f"{found[0]}:{found[1]}"
    weights = options.weights
    given = options.input_size
    if weights is None:
        raise RobustlabError(
            f"{arch} needs weights: --weights FILE (safetensors, or a .pt/.pth state dict) or "
            f"--weights hub (the library's pretrained ones); to train one, robustlab train "
            f"--arch {arch}"
        )
    size = _first(given[1] if given else None, data.image_size if data else None) or 224
    if is_hub(weights):
        channels = given[0] if given else 3
        net, declared = build_library_model(
            arch, channels, 1000, size, hub=weights.partition(":")[2]
        )
        assert declared is not None
        source = {
            "kind": found[0],
            "name": found[1],
            "weights": f"{HUB}:{declared.tag}",
            "sha256": state_sha256(net.state_dict()),
            "sha256_of": "tensors",
        }
        return _Loaded(
            net,
            arch,
            source,
            channels,
            size,
            declared.num_classes or None,
            declared.mean or None,
            declared.std or None,
        )
    path = _weights_file(arch, weights)
    state, mean, std = _unwrap(read_state_dict(path))
    file_channels, file_classes = _shape_from_state(arch, state, size)
    channels = (
        _first(given[0] if given else None, file_channels, data.in_channels if data else None) or 3
    )
    classes = _first(options.num_classes, file_classes, data.num_classes if data else None) or 1000
    net = build_library_model(arch, channels, classes, size)[0]
    load_state(net, state, path)
    source = {"kind": found[0], "name": found[1], "weights": str(path), "sha256": file_sha256(path)}
    return _Loaded(net, arch, source, channels, size, classes, mean, std)


def _python(spec: str, options: ForeignOptions, data: DataShape | None) -> _Loaded:
    """The user's factory, and their weights if given."""
    path, factory = parse_python_spec(spec)
    if not path.exists():
        raise RobustlabError(f"Python file {path} (of {spec}) does not exist")
    code = file_sha256(path)
    net = load_python_factory(path, factory)
    source: dict[str, Any] = {
        "kind": "python",
        "name": f"{path}:{factory}",
        "code_sha256": code,
        "weights": None,
        "sha256": None,
    }
    mean = std = None
    if options.weights is not None:
        if is_hub(options.weights):
            raise RobustlabError(f"{spec} has no hub weights; pass --weights FILE")
        wpath = _weights_file(spec, options.weights)
        state, mean, std = _unwrap(read_state_dict(wpath))
        load_state(net, state, wpath)
        source.update(weights=str(wpath), sha256=file_sha256(wpath))
    return _Loaded(net, f"python:{path}:{factory}", source, mean=mean, std=std)


def _torchscript(spec: str, options: ForeignOptions, data: DataShape | None) -> _Loaded:
    """A TorchScript archive (which holds its own weights)."""
    path = _script_path(spec)
    if options.weights is not None:
        raise RobustlabError(
            f"a TorchScript file holds its own weights; --weights does not apply to {path}"
        )
    net = load_torchscript(path)
    digest = file_sha256(path)
    source = {"kind": "torchscript", "name": str(path), "weights": str(path), "sha256": digest}
    return _Loaded(net, f"torchscript:{path}", source)


def _robustbench(spec: str, options: ForeignOptions, data: DataShape | None) -> _Loaded:
    """A RobustBench model (it normalises inside: its inputs are [0, 1] pixels)."""
    name = spec.partition(":")[2].strip()
    if options.weights is not None:
        raise RobustlabError(
            f"RobustBench loads the weights of {name} itself; --weights does not apply"
        )
    got = load_robustbench(name, options.dataset, options.threat_model)
    source = {
        "kind": "robustbench",
        "name": name,
        "dataset": options.dataset or "cifar10",
        "threat_model": options.threat_model or "Linf",
        "weights": None if got.weights is None else str(got.weights),
        "sha256": None if got.weights is None else file_sha256(got.weights),
    }
    identity = (0.0,) * got.in_channels, (1.0,) * got.in_channels
    return _Loaded(
        got.model,
        f"robustbench:{name}",
        source,
        got.in_channels,
        got.image_size,
        got.num_classes,
        *identity,
    )


_LOADERS = {
    "torchvision": _library,
    "timm": _library,
    "python": _python,
    "torchscript": _torchscript,
    "robustbench": _robustbench,
}


def _per_channel(values: tuple[float, ...], channels: int, what: str) -> tuple[float, ...]:
    """One value per channel (a single value stands for every channel)."""
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise RobustlabError(
            f"--{what} needs one value per input channel ({channels}), got {len(values)}"
        )
    return values


def _normalisation(
    spec: str, options: ForeignOptions, loaded: _Loaded, channels: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std the model was trained with: the user's, else the source's."""
    if (options.mean is None) != (options.std is None):
        raise RobustlabError("give both --mean and --std (the normalisation), or neither")
    mean, std = (
        (options.mean, options.std) if options.mean is not None else (loaded.mean, loaded.std)
    )
    if mean is None or std is None:
        raise RobustlabError(
            f"{spec} does not declare the input normalisation it was trained with; pass "
            "--mean and --std (per channel, e.g. --mean 0.485,0.456,0.406 --std "
            "0.229,0.224,0.225 for ImageNet statistics, or --mean 0 --std 1 if it takes [0, 1] "
            "pixels as they are; mean= and std= in Python)"
        )
    mean, std = _per_channel(mean, channels, "mean"), _per_channel(std, channels, "std")
    if not all(s > 0 for s in std):
        raise RobustlabError(f"the normalisation std must be positive, got {list(std)}")
    return mean, std


def _probe(spec: str, model: nn.Module, channels: int, size: int) -> int:
    """Run the model once on a small batch; it must return (batch, classes) logits."""
    x = torch.full((PROBE_BATCH, channels, size, size), 0.5)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # a shape error in the user's network, most often
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise RobustlabError(
            f"{spec} fails on {channels}x{size}x{size} inputs ({type(exc).__name__}: {first}); "
            "give the input size it takes with --input-size C,H,W"
        ) from None
    if not isinstance(out, torch.Tensor):
        raise RobustlabError(
            f"{spec} returns a {type(out).__name__}, not a tensor of logits of shape "
            "(batch, classes)"
        )
    if out.dim() != 2 or out.shape[0] != PROBE_BATCH or out.shape[1] < 1:
        raise RobustlabError(
            f"{spec} returns outputs of shape {tuple(out.shape)} for a batch of {PROBE_BATCH} "
            "inputs, not (batch, classes): robustlab needs a classifier's logits, one row per input"
        )
    return int(out.shape[1])


def load_foreign(
    spec: str | Path, options: ForeignOptions | None = None, data: DataShape | None = None
) -> tuple[nn.Sequential, dict[str, Any]]:
    """Load a foreign model (see the module's docstring) in eval mode, with its manifest."""
    text = str(spec).strip()
    kind = foreign_kind(text)
    if kind is None:
        raise RobustlabError(f"'{text}' does not name a foreign model ({', '.join(KINDS)})")
    options = options or ForeignOptions()
    if kind != "robustbench" and (options.dataset or options.threat_model):
        raise RobustlabError("--dataset and --threat-model only apply to robustbench: models")
    loaded = _LOADERS[kind](text, options, data)
    given = options.input_size
    channels = _first(
        given[0] if given else None, loaded.in_channels, data.in_channels if data else None
    )
    size = _first(given[1] if given else None, loaded.image_size, data.image_size if data else None)
    if channels is None or size is None:
        raise RobustlabError(
            f"{text} does not declare its input size; pass --input-size C,H,W (input_size=)"
        )
    mean, std = _normalisation(text, options, loaded, channels)
    model = nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=loaded.net)).eval()
    classes = _probe(text, model, channels, size)
    want = options.num_classes
    if want is not None and want != classes:
        raise RobustlabError(
            f"{text} predicts {classes} classes, but the number of classes given is {want}"
        )
    manifest = {
        "format": FORMAT,
        "model": model_config(loaded.arch, channels, classes, size, mean, std),
        "source": loaded.source,
        "weights": {"file": loaded.source.get("weights"), "sha256": loaded.source.get("sha256")},
    }
    return model, manifest


def check_rebuilt(manifest: dict[str, Any], what: str) -> None:
    """Refuse, before any work, to save a checkpoint of a model that a manifest cannot rebuild
    without running the user's code (a python: factory, TorchScript) or RobustBench's loader."""
    kind = (manifest.get("source") or {}).get("kind")
    if manifest.get("format") == FORMAT and kind in NOT_REBUILT:
        raise RobustlabError(
            f"{what} saves a robustlab checkpoint, which is rebuilt from its manifest without "
            f"running code, and a {kind} model cannot be; use a zoo, torchvision: or timm: "
            "architecture with your weights"
        )

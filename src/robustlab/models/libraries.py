"""torchvision and timm architectures by name (``torchvision:resnet18``, ``timm:resnet18``),
built for an input shape and number of classes, with the library's pretrained weights only
when asked for (``hub``).

The libraries are optional and imported only here, inside the functions that need them. A
name they do not know gets the close names they do; a download that fails (no network) says
how to get the weights otherwise. The registry builds these names like zoo architectures
(``build_model("torchvision:resnet18", 1, 10, 28)``), so ``robustlab train --arch`` and every
checkpoint of such a model rebuild through the same builder.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import RobustlabError

LIBRARIES = ("torchvision", "timm")
#: The ``--weights`` value that asks for the library's pretrained weights (``hub:TAG``: a tag).
HUB = "hub"


def is_hub(weights: str | None) -> bool:
    """Whether ``--weights`` asks for the library's pretrained weights (``hub``, ``hub:TAG``)."""
    return weights is not None and (weights == HUB or weights.startswith(f"{HUB}:"))


@dataclass(frozen=True)
class HubWeights:
    """What pretrained weights declare: the classes they predict and their normalisation."""

    tag: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def library_of(arch: str) -> tuple[str, str] | None:
    """``("torchvision", "resnet18")`` for ``torchvision:resnet18`` (likewise timm); else None."""
    lib, sep, name = arch.partition(":")
    if sep and lib.strip().lower() in LIBRARIES:
        return lib.strip().lower(), name.strip()
    return None


def _import(lib: str, arch: str) -> Any:
    """The library's module, or one sentence saying it is missing or does not import here."""
    try:
        if lib == "torchvision":
            import torchvision.models as module  # type: ignore[import-not-found,unused-ignore]
        else:
            import timm as module  # type: ignore[import-not-found,no-redef,unused-ignore]
    except ModuleNotFoundError:
        raise RobustlabError(
            f"{arch} needs the {lib} package, which is not installed (pip install {lib}; "
            "see README.md, 'Your own model')"
        ) from None
    except Exception as exc:  # a torchvision built for another torch fails with RuntimeError
        raise RobustlabError(
            f"{arch} needs {lib}, which is installed but does not import with this torch "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); install the {lib} "
            "release built for this torch"
        ) from None
    return module


def library_names(lib: str, arch: str = "") -> list[str]:
    """The classification models the library can build by name."""
    module = _import(lib, arch or f"{lib}:NAME")
    if lib == "torchvision":
        return sorted(module.list_models(module=module))
    return sorted(module.list_models())


def check_name(lib: str, name: str) -> None:
    """Refuse a name the library does not know, suggesting the closest ones it does."""
    known = library_names(lib, f"{lib}:{name}")
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    lister = "torchvision.models.list_models()" if lib == "torchvision" else "timm.list_models()"
    raise RobustlabError(f"{lib} has no model '{name}'{hint} ({lister} lists them)")


def _replace_first_conv(net: nn.Module, in_channels: int) -> None:
    """Give the first convolution ``in_channels`` inputs (torchvision builds RGB models)."""
    for path, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return
            conv = nn.Conv2d(
                in_channels,
                module.out_channels,
                module.kernel_size,  # type: ignore[arg-type]
                module.stride,  # type: ignore[arg-type]
                module.padding,  # type: ignore[arg-type]
                module.dilation,  # type: ignore[arg-type]
                module.groups if module.groups == 1 else in_channels,
                module.bias is not None,
                module.padding_mode,
            )
            parent_path, _, attr = path.rpartition(".")
            setattr(net.get_submodule(parent_path) if parent_path else net, attr, conv)
            return
    if in_channels != 3:
        raise RobustlabError(
            f"{type(net).__name__} has no convolution to give {in_channels} input channels"
        )


def _hub_error(arch: str, exc: Exception) -> RobustlabError:
    """A failed download of pretrained weights, and how to do without it."""
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    return RobustlabError(
        f"cannot get the pretrained weights of {arch} ({type(exc).__name__}: {first}); "
        "--weights hub needs a network once (torchvision keeps them under $TORCH_HOME, timm "
        "under $HF_HOME), or pass your own file with --weights FILE"
    )


def _torchvision(
    name: str, in_channels: int, num_classes: int, image_size: int, tag: str | None
) -> tuple[nn.Module, HubWeights | None]:
    """A torchvision classifier, randomly initialised or with the pretrained weights ``tag``."""
    tvm = _import("torchvision", f"torchvision:{name}")
    arch = f"torchvision:{name}"
    kwargs: dict[str, Any] = {}
    if name.startswith("vit_") or name.startswith("swin_"):
        kwargs["image_size"] = image_size
    if tag is None:
        try:
            net = tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        except (ValueError, TypeError) as exc:
            raise RobustlabError(f"cannot build {arch} for this input: {exc}") from None
        _replace_first_conv(net, in_channels)
        return net, None
    try:
        enum = tvm.get_model_weights(name)
        weights = enum.DEFAULT if tag in ("", "DEFAULT") else enum[tag]
    except (KeyError, ValueError):
        tags = ", ".join(w.name for w in tvm.get_model_weights(name))
        raise RobustlabError(f"{arch} has no pretrained weights '{tag}'; it has {tags}") from None
    try:
        net = tvm.get_model(name, weights=weights)
    except Exception as exc:  # urllib, HTTP and OS errors all mean: could not download
        raise _hub_error(arch, exc) from None
    transform = weights.transforms()
    declared = HubWeights(
        weights.name,
        len(weights.meta["categories"]),
        tuple(float(m) for m in transform.mean),
        tuple(float(s) for s in transform.std),
    )
    _replace_first_conv(net, in_channels)
    return net, declared


def _timm(
    name: str, in_channels: int, num_classes: int, image_size: int, tag: str | None
) -> tuple[nn.Module, HubWeights | None]:
    """A timm classifier, randomly initialised or with the pretrained weights ``tag``."""
    timm = _import("timm", f"timm:{name}")
    arch = f"timm:{name}"
    full = f"{name}.{tag}" if tag not in (None, "", "DEFAULT") else name
    kwargs: dict[str, Any] = {"in_chans": in_channels}
    if tag is None:
        kwargs["num_classes"] = num_classes

    def create(**extra: Any) -> nn.Module:
        net: nn.Module = timm.create_model(full, pretrained=tag is not None, **kwargs, **extra)
        return net

    try:
        try:
            net = create(img_size=image_size)
        except TypeError as exc:  # only some families take an image size
            if "img_size" not in str(exc):
                raise
            net = create()
    except Exception as exc:  # timm's own errors, or huggingface_hub's and HTTP ones
        if tag is not None:
            raise _hub_error(arch, exc) from None
        raise RobustlabError(f"cannot build {arch} for this input: {exc}") from None
    if tag is None:
        return net, None
    cfg = getattr(net, "pretrained_cfg", None) or {}
    declared = HubWeights(
        str(cfg.get("tag") or tag or "default"),
        int(getattr(net, "num_classes", 0) or cfg.get("num_classes", 0)),
        tuple(float(m) for m in cfg.get("mean", ())),
        tuple(float(s) for s in cfg.get("std", ())),
    )
    return net, declared


Builder = Callable[[str, int, int, int, str | None], tuple[nn.Module, HubWeights | None]]
_BUILDERS: dict[str, Builder] = {"torchvision": _torchvision, "timm": _timm}


def build_library_model(
    arch: str,
    in_channels: int,
    num_classes: int,
    image_size: int,
    hub: str | None = None,
) -> tuple[nn.Module, HubWeights | None]:
    """Build ``torchvision:NAME`` or ``timm:NAME`` for the input shape and classes (randomly
    initialised), or with the library's pretrained weights when ``hub`` is a tag ('' for the
    default ones; they fix the classes). Returns the network and what its weights declare."""
    found = library_of(arch)
    if found is None:
        raise RobustlabError(f"'{arch}' is not a torchvision:NAME or timm:NAME architecture")
    lib, name = found
    check_name(lib, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notes of the libraries, not the user's
        return _BUILDERS[lib](name, in_channels, num_classes, image_size, hub)


def library_builder(arch: str) -> Callable[..., nn.Module]:
    """The registry's builder of a library architecture: ``(in_channels, num_classes,
    image_size) -> network``, randomly initialised (checking the name first)."""
    found = library_of(arch)
    if found is None:
        raise RobustlabError(f"'{arch}' is not a torchvision:NAME or timm:NAME architecture")
    check_name(*found)

    def build(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
        """The randomly initialised network for this input shape and these classes."""
        return build_library_model(arch, in_channels, num_classes, image_size)[0]

    return build

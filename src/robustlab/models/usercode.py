"""Models that are programs: a factory in the user's own Python file
(``python:path/to/file.py:factory``) and TorchScript files.

Both run code the user hands in: the Python file is imported (its top level runs) and its
factory called; a TorchScript file carries its compiled forward pass. That is the user's
choice, made by naming them; robustlab's own checkpoints never run code.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import RobustlabError
from ..io import check_regular, limits
from .weightfile import file_sha256, is_torchscript


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, short."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def parse_python_spec(spec: str) -> tuple[Path, str]:
    """``python:path/to/file.py:factory`` -> (the file, the factory's name)."""
    body = spec.partition(":")[2]
    path, sep, factory = body.rpartition(":")
    if not sep or not path or not factory.isidentifier():
        raise RobustlabError(
            f"'{spec}' does not name a factory: write python:path/to/file.py:FUNCTION, the "
            "function that returns the model"
        )
    return Path(path).expanduser(), factory


def load_python_factory(path: Path, factory: str) -> nn.Module:
    """Import the user's Python file and call ``factory()``; it must return an ``nn.Module``.
    The file's folder is on ``sys.path`` while it is imported, so it can import its neighbours."""
    if not path.exists():
        raise RobustlabError(f"Python file {path} does not exist")
    check_regular(path, "Python file", limits().text_bytes)
    name = f"robustlab_user_model_{file_sha256(path)[:16]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise RobustlabError(f"{path} cannot be imported as a Python file (name it *.py)")
    module = importlib.util.module_from_spec(module_spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise RobustlabError(f"importing {path} failed ({_first_line(exc)})") from exc
    finally:
        if sys.path and sys.path[0] == folder:
            sys.path.pop(0)
    fn = getattr(module, factory, None)
    if not callable(fn):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise RobustlabError(
            f"{path} has no function '{factory}'; it defines {', '.join(found) or 'none'}"
        )
    try:
        model = fn()
    except Exception as exc:
        raise RobustlabError(f"{path}:{factory}() failed ({_first_line(exc)})") from exc
    if not isinstance(model, nn.Module):
        raise RobustlabError(
            f"{path}:{factory}() returned a {type(model).__name__}, not a torch.nn.Module; "
            "the factory must return the model"
        )
    return model


def load_torchscript(path: Path) -> nn.Module:
    """A TorchScript file's module, on the CPU."""
    if not path.exists():
        raise RobustlabError(f"TorchScript file {path} does not exist")
    check_regular(path, "TorchScript file", limits().data_bytes)
    if not is_torchscript(path):
        raise RobustlabError(
            f"{path} is not a TorchScript file (torch.jit.save writes them); for a state dict "
            "name its architecture (torchvision:NAME, timm:NAME, python:FILE.py:FACTORY) "
            "and pass the file with --weights"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notes
            model: nn.Module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    except Exception as exc:  # torch.jit raises RuntimeError and others on bad archives
        raise RobustlabError(f"cannot load TorchScript file {path} ({_first_line(exc)})") from None
    return model

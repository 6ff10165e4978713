"""The inference engine: forward-only passes through ONNX Runtime where it is faithful and faster.

Much of an evaluation needs no gradient: Square's queries, the clean and checking passes of
AutoAttack and FAB, transfer targets, early-exit evaluation. For those passes a model can be
exported once to ONNX and run by ONNX Runtime (CPU), which on small convolutional networks
is 2-3x faster than eager PyTorch (benchmarks/RESULTS.md). Gradient passes always stay in
PyTorch.

How it is used: :func:`inference_engine` chooses the engine for a model (``auto``,
``torch`` or ``onnxruntime``), checks the export against PyTorch on a probe batch and
attaches it to that model object for the duration of a ``with`` block; code that needs
no gradient calls :func:`infer` (``infer(model, x)`` instead of ``model(x)``), which takes
the attached engine when it still computes what the model computes, PyTorch otherwise.

What keeps a pass faithful:

- the probe: the export is traced on random inputs and then compared with PyTorch on the
  caller's probe batch and on its first point alone (batch size 1): predictions equal and
  every logit within ``TOLERANCE`` (relative to the largest logit, at least 1). A trace
  that converts a tensor to a Python value (a ``TracerWarning`` on data-dependent control
  flow) is refused, since it would bake one branch into the graph; iterating over a
  tensor's fixed dimension is allowed (the two probe batch sizes catch a batch-size one);
- every call checks that the model is still the one exported: no parameter or buffer
  changed in place (tensor version counters), every module in the same train/eval mode and
  with the same plain settings (``mode``, ``output``, thresholds, frozen configs), no
  forward hook registered anywhere, gradients off, a float32 CPU input. Otherwise the pass
  runs in PyTorch, so a hook-based transform (SGM, feature capture) or a context manager
  that switches a head's mode is never bypassed.

Sessions are cached in the process by the model's fingerprint (structure, state and plain
settings), so a curve, a transfer matrix or a repeated evaluation exports a model once.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import sys
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from ..core.guard import evaluating
from ..errors import RobustlabError
from .fingerprint import model_fingerprint

ENGINES = ("auto", "torch", "onnxruntime")
TOLERANCE = 1e-4  # largest |logit difference| allowed, relative to max(1, largest |logit|)
OPSET = 17
TIMED = 32  # points of the probe batch the two engines are timed on
INSTALL = "pip install onnxruntime"
_PLAIN = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class EngineChoice:
    """Which engine runs a model's forward-only passes, and why."""

    requested: str  # auto, torch or onnxruntime
    engine: str  # torch or onnxruntime: what runs
    reason: str  # one sentence: why this engine
    max_logit_diff: float | None = None  # onnxruntime vs torch on the probe
    time_ratio: float | None = None  # onnxruntime / torch time of one probe pass
    failed: bool = False  # the export failed or disagreed with PyTorch

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form, for records."""
        return dataclasses.asdict(self)


def onnxruntime_available() -> bool:
    """Whether the onnxruntime package can be imported here."""
    return importlib.util.find_spec("onnxruntime") is not None


def check_engine(name: str) -> str:
    """An engine name, checked: known, and installed when asked for by name."""
    if name not in ENGINES:
        raise RobustlabError(f"unknown engine '{name}'; use one of {', '.join(ENGINES)}")
    if name == "onnxruntime" and not onnxruntime_available():
        raise RobustlabError(
            f"engine onnxruntime was asked for but is not installed; install it with "
            f"'{INSTALL}', or use --engine auto or torch"
        )
    return name


# -- what a call checks -----------------------------------------------------------------


def _settings(module: nn.Module) -> tuple[tuple[str, Any], ...]:
    """A module's plain public settings (mode flags, names, numbers, frozen configs)."""
    out = []
    for key, value in vars(module).items():
        if key.startswith("_"):
            continue
        plain = isinstance(value, _PLAIN) or (
            isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value)
        )
        frozen = dataclasses.is_dataclass(value) and getattr(
            getattr(value, "__dataclass_params__", None), "frozen", False
        )
        if plain or frozen:
            out.append((key, value))
    return tuple(out)


def _hooked(modules: list[nn.Module]) -> bool:
    """Whether any forward hook is registered on these modules or globally."""
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class _Runner:
    """An ONNX Runtime session standing in for one model object's forward pass."""

    def __init__(self, model: nn.Module, session: Any, outputs: int | None) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.outputs = outputs  # None: forward returns one tensor; k: a list of k tensors
        self.model = weakref.ref(model)  # the runner is stored under the model: no cycle
        self.modules = list(model.modules())
        self.tensors = list(model.parameters()) + list(model.buffers())
        self.versions = self._versions()
        # torch's own layers (conv, linear, norm, activation) change with their weights, which
        # are checked; modes and settings that switch a function live in modules of their own
        self.watched = [m for m in self.modules if not type(m).__module__.startswith("torch.")]
        self.settings = [_settings(m) for m in self.watched]
        self.modes = [m.training for m in self.modules]

    def _versions(self) -> list[tuple[int, int]]:
        """Each weight's version counter and storage: both change when it is rewritten."""
        return [(t._version, t.data_ptr()) for t in self.tensors]

    def _same_modules(self) -> bool:
        model = self.model()
        if model is None:
            return False
        now = list(model.modules())
        return len(now) == len(self.modules) and all(
            a is b for a, b in zip(now, self.modules, strict=True)
        )

    def applies(self, x: torch.Tensor) -> bool:
        """Whether this session computes what the model would for ``x``, right now."""
        return (
            not torch.is_grad_enabled()
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and len(x) > 0
            and self._same_modules()
            and not _hooked(self.modules)
            and self._versions() == self.versions
            and [m.training for m in self.modules] == self.modes
            and [_settings(m) for m in self.watched] == self.settings
        )

    def __call__(self, x: torch.Tensor) -> Any:
        out = self.session.run(None, {self.input_name: x.detach().contiguous().numpy()})
        tensors = [torch.from_numpy(o) for o in out]
        return tensors[0] if self.outputs is None else tensors


_ATTACHED: WeakKeyDictionary[nn.Module, tuple[_Runner | None, EngineChoice]] = WeakKeyDictionary()
_SESSIONS: OrderedDict[str, Any] = OrderedDict()  # export key -> session, this process
_KEEP = 8  # sessions kept (least recently used dropped first)


def infer(model: nn.Module, x: torch.Tensor) -> Any:
    """``model(x)`` for a pass that needs no gradient: run by the engine attached to the model
    when it still matches the model, by PyTorch otherwise (same outputs either way)."""
    runner = _ATTACHED.get(model, (None, None))[0]
    if runner is not None and runner.applies(x):
        return runner(x)
    return model(x)


def engine_of(model: nn.Module) -> EngineChoice | None:
    """The engine choice attached to a model object (None: none attached)."""
    return _ATTACHED.get(model, (None, None))[1]


# -- export and probe -------------------------------------------------------------------


def _structure(out: Any) -> int | None:
    """None for a tensor output, k for a list or tuple of k tensors; refuses anything else."""
    if isinstance(out, torch.Tensor):
        return None
    if isinstance(out, (list, tuple)) and out and all(isinstance(o, torch.Tensor) for o in out):
        return len(out)
    raise ValueError(f"its forward returns {type(out).__name__}, not a tensor or list of tensors")


def _session_for(model: nn.Module, example: torch.Tensor, outputs: int | None) -> Any:
    """A session running the model's export: made once per model fingerprint (structure,
    weights, settings), input shape and thread count, then reused."""
    settings = repr([_settings(m) for m in model.modules()])
    key = "|".join(
        [
            model_fingerprint(model),
            settings,
            str(tuple(example.shape[1:])),
            torch.__version__,
            str(OPSET),
            str(torch.get_num_threads()),
        ]
    )
    if key in _SESSIONS:
        _SESSIONS.move_to_end(key)
        return _SESSIONS[key]
    session = _session(_export(model, example, outputs))
    _SESSIONS[key] = session
    while len(_SESSIONS) > _KEEP:
        _SESSIONS.popitem(last=False)
    return session


def _export(model: nn.Module, example: torch.Tensor, outputs: int | None) -> bytes:
    """The model as ONNX bytes with a dynamic batch axis (traced on ``example``)."""
    names = ["logits"] if outputs is None else [f"logits{i}" for i in range(outputs)]
    axes = {name: {0: "batch"} for name in ["x", *names]}
    buf = io.BytesIO()
    chatter = io.StringIO()  # the exporter prints whole graphs when it fails
    with (
        warnings.catch_warnings(record=True) as caught,
        redirect_stdout(chatter),
        redirect_stderr(chatter),
    ):
        warnings.simplefilter("always")
        torch.onnx.export(
            model,
            (example,),
            buf,  # type: ignore[arg-type]  # torch takes a file object; its stub says paths
            input_names=["x"],
            output_names=names,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    traced = [
        w
        for w in caught
        if w.category.__name__ == "TracerWarning" and "to a Python" in str(w.message)
    ]
    if traced:
        first = str(traced[0].message).splitlines()[0]
        raise ValueError(f"its forward has data-dependent Python control flow ({first})")
    return buf.getvalue()


def _session(onnx: bytes) -> Any:
    """An ONNX Runtime CPU session with as many threads as PyTorch uses."""
    import onnxruntime as ort  # an optional dependency: imported only when used

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # gradient passes in PyTorch alternate with these: idle ORT threads must not spin
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])


def _flat(out: Any) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


def _disagreement(ref: Any, got: Any) -> tuple[float, str | None]:
    """Largest logit difference, and why the outputs disagree (None: they agree)."""
    worst = 0.0
    for a, b in zip(_flat(ref), _flat(got), strict=True):
        if a.shape != b.shape:
            return float("inf"), f"output shape {tuple(b.shape)} instead of {tuple(a.shape)}"
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        worst = max(worst, diff)
        scale = max(1.0, float(a.abs().max()) if a.numel() else 1.0)
        if diff > TOLERANCE * scale:
            return worst, f"logits differ by {diff:.2g} (tolerance {TOLERANCE * scale:.2g})"
        if a.dim() == 2 and not torch.equal(a.argmax(1), b.argmax(1)):
            return worst, "predictions differ"
    return worst, None


def _seconds(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def choose_engine(model: nn.Module, probe: torch.Tensor, engine: str = "auto") -> EngineChoice:
    """Attach the engine for ``model``'s forward-only passes, checked on ``probe``.

    ``auto`` takes ONNX Runtime when it is installed, the model exports, agrees with
    PyTorch on the probe and runs it faster; ``onnxruntime`` insists (an error when it
    cannot); ``torch`` never exports. The choice stays attached until :func:`detach_engine`.
    """
    check_engine(engine)
    runner, choice = _choose(model, probe, engine)
    _ATTACHED[model] = (runner, choice)
    return choice


def detach_engine(model: nn.Module) -> None:
    """Forget the engine attached to a model object (its passes run in PyTorch again)."""
    _ATTACHED.pop(model, None)


@contextmanager
def inference_engine(
    model: nn.Module, probe: torch.Tensor, engine: str = "auto", *, announce: bool = True
) -> Iterator[EngineChoice]:
    """The engine for a model's forward-only passes within a ``with`` block.

    An engine already attached to this model object (an outer block) is kept and reused.
    With ``announce``, an ``auto`` choice that fell back to PyTorch because the export
    failed or disagreed prints one line saying why.
    """
    known = engine_of(model)
    if known is not None:
        yield known
        return
    choice = choose_engine(model, probe, engine)
    if announce and choice.failed:
        print(f"robustlab: note: forward passes run in PyTorch: {choice.reason}", file=sys.stderr)
    try:
        yield choice
    finally:
        detach_engine(model)


def _choose(
    model: nn.Module, probe: torch.Tensor, engine: str
) -> tuple[_Runner | None, EngineChoice]:
    if engine == "torch":
        return None, EngineChoice(engine, "torch", "PyTorch was asked for")
    if not onnxruntime_available():
        return None, EngineChoice(engine, "torch", f"onnxruntime is not installed ({INSTALL})")
    why = _unsuitable(probe)
    if why is None:
        try:
            return _probe(model, probe, engine)
        except Exception as exc:  # any export or runtime failure means: stay in PyTorch
            why = _sentence(exc)
    if engine == "onnxruntime":
        raise RobustlabError(f"engine onnxruntime cannot run this model: {why}")
    reason = f"the model could not run in ONNX Runtime: {why}"
    return None, EngineChoice(engine, "torch", reason, failed=True)


def _unsuitable(probe: torch.Tensor) -> str | None:
    """Why a probe batch cannot check an export (None: it can)."""
    if probe.device.type != "cpu":
        return f"ONNX Runtime here runs on the CPU and the model is on {probe.device}"
    if probe.dtype != torch.float32:
        return f"the inputs are {probe.dtype}, not float32"
    if len(probe) == 0:
        return "there is no probe input"
    return None


def _sentence(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _probe(
    model: nn.Module, probe: torch.Tensor, engine: str
) -> tuple[_Runner | None, EngineChoice]:
    """Export, compare with PyTorch on the probe (whole and its first point), time both."""
    with evaluating(model), torch.no_grad():
        ref = model(probe)
        outputs = _structure(ref)
        generator = torch.Generator().manual_seed(0)
        example = torch.rand((2, *probe.shape[1:]), generator=generator)
        session = _session_for(model, example, outputs)
        runner = _Runner(model, session, outputs)
        worst = 0.0
        for batch, expected in ((probe, ref), (probe[:1], model(probe[:1]))):
            diff, why = _disagreement(expected, runner(batch))
            worst = max(worst, diff)
            if why is not None:
                raise ValueError(f"its export disagrees with PyTorch on the probe batch: {why}")
        # timed on a slice, twice each in turn (the fastest kept): a probe must cost little
        # beside an evaluation that makes one pass over its points
        sample = probe[:TIMED]
        t_torch, t_ort = float("inf"), float("inf")
        for _ in range(2):
            t_torch = min(t_torch, _seconds(lambda: model(sample)))
            t_ort = min(t_ort, _seconds(lambda: runner(sample)))
    ratio = t_ort / max(t_torch, 1e-9)
    if engine == "auto" and ratio >= 1.0:
        reason = f"ONNX Runtime was not faster on the probe ({ratio:.2f}x PyTorch's time)"
        return None, EngineChoice(engine, "torch", reason, worst, ratio)
    reason = f"ONNX Runtime agrees with PyTorch on the probe and takes {ratio:.2f}x its time"
    return runner, EngineChoice(engine, "onnxruntime", reason, worst, ratio)

"""Post-training int8 models (PyTorch's own static quantization, FX graph mode, CPU), and how a
quantized checkpoint is rebuilt without pickle.

Quantizing runs ``prepare_fx`` with the backend's default qconfig (per-channel int8 weights,
histogram-calibrated uint8 activations; conv-bn-relu fused), feeds a calibration batch through
the observers, and ``convert_fx``. A quantized model's packed int8 weights cannot be stored in
safetensors, so a quantized checkpoint stores the float model's weights (``model.safetensors``,
as any checkpoint) and the calibrated observers' state (their histograms and ranges, plain
tensors, ``quantization.safetensors``): rebuilding re-runs ``prepare_fx``, loads the observers and
converts, which gives the same int8 model bit for bit (ours; tested).

Robustness, honestly: the int8 forward gives no useful gradient. ``QuantizedModel`` therefore
returns the int8 model's logits with the float model's gradient (a straight-through estimator:
attacks follow the float model and are judged on the int8 predictions), and declares the float
model as its surrogate (``structure.declare_surrogates``) for the MSA protocol.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
from torch.fx import GraphModule

from ..errors import RobustlabError
from .structure import declare_surrogates

#: Quantization engines robustlab knows; which of them this machine has is torch's to say.
BACKENDS = ("x86", "fbgemm", "qnnpack", "onednn")
OBSERVERS = "quantization.safetensors"
_OBSERVER_MARK = "activation_post_process"


def check_backend(backend: str) -> str:
    """A quantization engine this torch build supports (else one sentence naming those it has)."""
    have = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    if backend not in have:
        raise RobustlabError(
            f"quantization backend '{backend}' is not available on this machine; "
            f"this PyTorch supports {', '.join(have) or 'none'}"
        )
    return backend


@contextmanager
def engine(backend: str) -> Iterator[None]:
    """Run with this quantized engine selected (the previous one is restored)."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = backend
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def _prepared(model: nn.Module, example: torch.Tensor, backend: str) -> GraphModule:
    """The float model (a copy, eval mode) with observers inserted for ``backend``."""
    float_copy = copy.deepcopy(model).cpu().eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao announces its own deprecation
            return prepare_fx(float_copy, get_default_qconfig_mapping(backend), (example,))
    except Exception as exc:  # FX tracing fails in many ways on code it cannot follow
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise RobustlabError(
            f"cannot quantize {type(model).__name__}: FX graph mode could not trace it ({first})"
        ) from None


def _converted(prepared: GraphModule) -> nn.Module:
    """The int8 model of a calibrated prepared model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_fx(copy.deepcopy(prepared))


def observer_state(prepared: nn.Module) -> dict[str, torch.Tensor]:
    """The calibrated observers' tensors (all a rebuild needs besides the float weights)."""
    return {
        k: v.detach().cpu().clone()  # observers shared by two nodes share their tensors
        for k, v in prepared.state_dict().items()
        if _OBSERVER_MARK in k
    }


class QuantizedModel(nn.Module):
    """An int8 model beside its float original: int8 predictions, the float model's gradient.

    ``forward`` runs the int8 model on CPU (inputs and outputs keep their device); when the
    input requires a gradient, the output is ``f(x) + (q(x) - f(x)).detach()``: the int8
    logits, differentiated as the float model's. Its state dict is the float model's weights
    and the observers' tensors (``calibration``), which determine the int8 model; the int8
    graph itself (packed weights, not plain tensors) is held outside the module tree.
    """

    int8_model: nn.Module

    def __init__(
        self,
        float_model: nn.Module,
        quantized: nn.Module,
        observers: Mapping[str, torch.Tensor],
        backend: str,
    ) -> None:
        super().__init__()
        self.float_model = float_model
        self.calibration = nn.Module()
        for name, tensor in observers.items():
            self.calibration.register_buffer(name.replace(".", "__"), tensor.detach().clone())
        object.__setattr__(self, "int8_model", quantized)  # not a submodule: see above
        self.backend = backend
        self.eval()

    @property
    def observers(self) -> dict[str, torch.Tensor]:
        """The calibrated observers' tensors by their name in the prepared model (on CPU)."""
        return {k.replace("__", "."): v.cpu() for k, v in self.calibration.named_buffers()}

    def int8(self, x: torch.Tensor) -> torch.Tensor:
        """The int8 model's logits (no gradient)."""
        with torch.no_grad(), engine(self.backend):
            out: torch.Tensor = self.int8_model(x.detach().float().cpu())
        return out.to(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.int8(x)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return q
        f: torch.Tensor = self.float_model(x)
        return q + (f - f.detach())  # exactly q's values (f - f is 0), the float gradient

    def extra_repr(self) -> str:
        return f"int8 ({self.backend}) of the float model below"


def _float_surrogate(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """A quantized model's one surrogate: the float model it was quantized from."""
    assert isinstance(model, QuantizedModel)
    return [("float", model.float_model)]


declare_surrogates(QuantizedModel, _float_surrogate)


def quantize(
    model: nn.Module, calibration: torch.Tensor, backend: str = "x86", batch_size: int = 256
) -> QuantizedModel:
    """Static post-training int8 quantization of a float model, calibrated on a batch of inputs."""
    check_backend(backend)
    if calibration.shape[0] < 1:
        raise RobustlabError("quantization needs at least one calibration input")
    float_model = copy.deepcopy(model).cpu().eval()
    with engine(backend):
        prepared = _prepared(float_model, calibration[:1].cpu(), backend)
        with torch.no_grad():
            for i in range(0, calibration.shape[0], batch_size):
                prepared(calibration[i : i + batch_size].cpu())
        quantized = _converted(prepared)
    return QuantizedModel(float_model, quantized, observer_state(prepared), backend)


def rebuild(
    float_model: nn.Module,
    observers: Mapping[str, torch.Tensor],
    backend: str,
    input_shape: tuple[int, ...],
) -> QuantizedModel:
    """The int8 model again from its float model and stored observers (what loading does)."""
    check_backend(backend)
    float_model = float_model.cpu().eval()
    with engine(backend):
        prepared = _prepared(float_model, torch.zeros(1, *input_shape), backend)
        want = set(observer_state(prepared))
        if set(observers) != want:
            raise RobustlabError(
                "the stored quantization observers do not fit the model "
                f"({len(observers)} stored, {len(want)} expected)"
            )
        full = {**prepared.state_dict(), **observers}
        prepared.load_state_dict(full, strict=True)
        quantized = _converted(prepared)
    return QuantizedModel(float_model, quantized, observers, backend)

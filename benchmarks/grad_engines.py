"""Forward + backward with respect to the input: the eager floor vs other engines (issue 14, part 3).

One pass is what an attack step costs: cross-entropy (summed) of the model's logits, gradient
with respect to the input only, parameters frozen (``requires_grad_(False)``, as the attacks
see them). The floor is what robustlab runs today: ``fast_copy`` (BatchNorm folded,
channels_last when the model has a convolution, as ``evaluate`` decides) in eager PyTorch.

Every candidate is built and checked against the floor's input gradient (max |diff| / max
|floor grad| <= --tol is "equal numerics"); a candidate that fails to build or run is
reported with its error, never a crash. Timing: repetitions interleaved over batches and
candidates (the order rotates per repetition), medians per candidate, and the ratio to the
floor as the median of per-repetition ratios (the machine is shared; only ratios taken side
by side mean anything).

    python benchmarks/grad_engines.py --threads 1 --out benchmarks/results_grad_engines.jsonl
    python benchmarks/grad_engines.py --summarize benchmarks/results_grad_engines.jsonl

Candidates needing onnxruntime-training (``ort-training-gradient-graph``) run only in a
venv that has it instead of onnxruntime (the two packages share the module name).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import json
import operator
import platform
import signal
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._decomp import core_aten_decompositions
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.attention import SDPBackend, sdpa_kernel

from robustlab.evaluate.fast import fast_copy
from robustlab.models import build_model

GradFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ARCHS = ("resnet8", "resnet20", "mlp", "vit")
WARMUP = 5


@dataclass
class Setup:
    """One architecture's models: the fresh one (eval mode) and the floor's fast copy."""

    arch: str
    base: nn.Module
    floor: nn.Module
    channels_last: bool
    threads: int


@dataclass
class Built:
    """A candidate ready to time: its pass, the input it takes, and what to say about it."""

    fn: GradFn
    x: torch.Tensor
    notes: str = ""


@dataclass
class Row:
    """One candidate at one batch size: its build, numerics and timings."""

    candidate: str
    batch: int
    status: str = "ok"
    error: str = ""
    notes: str = ""
    build_s: float = 0.0
    rel_diff: float | None = None
    built: Built | None = None
    times: list[float] = field(default_factory=list)


class BuildTimeout(Exception):
    """A candidate's build or first pass took longer than --build-timeout."""


def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The attacks' loss: cross-entropy summed over the batch."""
    return F.cross_entropy(logits, y, reduction="sum")


def frozen(model: nn.Module, requires_grad: bool = False) -> nn.Module:
    """The model with every parameter's requires_grad set (False, as the attacks see it)."""
    for p in model.parameters():
        p.requires_grad_(requires_grad)
    return model


def autograd_pass(model: Callable[[torch.Tensor], torch.Tensor]) -> GradFn:
    """The floor's pass: forward, summed cross-entropy, ``torch.autograd.grad`` to the input."""

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xx = x.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(loss_of(model(xx), y), xx)
        return g

    return run


def randomise_batchnorm(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial statistics and affine terms, so folding is not the identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                assert m.running_var is not None
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.1)


def make_setup(arch: str, threads: int, seed: int) -> Setup:
    """The architecture's fresh model and the floor: robustlab's fast copy, frozen."""
    torch.manual_seed(seed)
    base = build_model(arch, in_channels=1, num_classes=10, image_size=28).eval()
    randomise_batchnorm(base)
    frozen(base)
    # evaluate's rule (robust._fast_copy): channels_last on CPU when the model has a Conv2d
    cl = any(isinstance(m, nn.Conv2d) for m in base.modules())
    floor = frozen(fast_copy(base, channels_last=cl))
    return Setup(arch, base, floor, cl, threads)


def floor_input(s: Setup, x: torch.Tensor) -> torch.Tensor:
    """The input as evaluate hands it to a channels_last model."""
    return x.contiguous(memory_format=torch.channels_last) if s.channels_last else x


# --- candidates: each returns a Built or raises; a raise is reported as a failure ---------------


def c_floor(s: Setup, x: torch.Tensor) -> Built:
    return Built(autograd_pass(s.floor), floor_input(s, x), "fast_copy, eager")


def c_contiguous(s: Setup, x: torch.Tensor) -> Built:
    if not s.channels_last:
        raise RuntimeError("skipped: the floor is already contiguous for this model")
    m = frozen(fast_copy(s.base, channels_last=False))
    return Built(autograd_pass(m), x, "BatchNorm folded, NCHW contiguous")


def c_params_grad(s: Setup, x: torch.Tensor) -> Built:
    m = frozen(copy.deepcopy(s.floor), requires_grad=True)
    return Built(autograd_pass(m), floor_input(s, x), "parameters requires_grad=True")


def c_not_folded(s: Setup, x: torch.Tensor) -> Built:
    m = frozen(fast_copy(s.base, channels_last=s.channels_last, fold=False))
    return Built(autograd_pass(m), floor_input(s, x), "BatchNorm not folded (before issue 9)")


def c_mkldnn_off(s: Setup, x: torch.Tensor) -> Built:
    inner = autograd_pass(s.floor)

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.backends.mkldnn.flags(enabled=False):
            return inner(x, y)

    return Built(run, floor_input(s, x), "torch.backends.mkldnn.flags(enabled=False)")


def c_other_threads(s: Setup, x: torch.Tensor) -> Built:
    other = 1 if s.threads != 1 else 2
    inner = autograd_pass(s.floor)

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        torch.set_num_threads(other)
        try:
            return inner(x, y)
        finally:
            torch.set_num_threads(s.threads)

    return Built(run, floor_input(s, x), f"the floor with torch.set_num_threads({other})")


def c_func_grad(s: Setup, x: torch.Tensor) -> Built:
    params = {k: v.detach() for k, v in s.floor.named_parameters()}
    buffers = {k: v.detach() for k, v in s.floor.named_buffers()}

    def loss(xx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(s.floor, (params, buffers), (xx,))
        return loss_of(out, y)

    grad = torch.func.grad(loss)
    return Built(grad, floor_input(s, x), "functional_call + torch.func.grad")


def c_func_vjp(s: Setup, x: torch.Tensor) -> Built:
    params = {k: v.detach() for k, v in s.floor.named_parameters()}
    buffers = {k: v.detach() for k, v in s.floor.named_buffers()}

    def run(xx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def loss(z: torch.Tensor) -> torch.Tensor:
            return loss_of(torch.func.functional_call(s.floor, (params, buffers), (z,)), y)

        value, vjp = torch.func.vjp(loss, xx)[:2]
        (g,) = vjp(torch.ones_like(value))
        return g  # type: ignore[no-any-return]

    return Built(run, floor_input(s, x), "functional_call + torch.func.vjp")


def _traced(s: Setup, x: torch.Tensor) -> torch.jit.ScriptModule:
    traced = torch.jit.trace(  # type: ignore[no-untyped-call]
        copy.deepcopy(s.floor), floor_input(s, x), check_trace=False
    )
    assert isinstance(traced, torch.jit.ScriptModule)
    return traced


def c_jit_trace(s: Setup, x: torch.Tensor) -> Built:
    return Built(autograd_pass(_traced(s, x)), floor_input(s, x), "torch.jit.trace")


def c_jit_freeze(s: Setup, x: torch.Tensor) -> Built:
    m = torch.jit.freeze(_traced(s, x).eval())
    return Built(autograd_pass(m), floor_input(s, x), "torch.jit.trace + freeze")


def c_jit_optimize(s: Setup, x: torch.Tensor) -> Built:
    m = torch.jit.optimize_for_inference(torch.jit.freeze(_traced(s, x).eval()))
    return Built(autograd_pass(m), floor_input(s, x), "trace + freeze + optimize_for_inference")


def c_to_mkldnn(s: Setup, x: torch.Tensor) -> Built:
    import torch.utils.mkldnn

    m = torch.utils.mkldnn.to_mkldnn(  # type: ignore[no-untyped-call]
        frozen(fast_copy(s.base, channels_last=False))
    )

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xx = x.detach().to_mkldnn().requires_grad_(True)
        with torch.enable_grad():
            out = m(xx)
            out = out.to_dense() if out.is_mkldnn else out
            (g,) = torch.autograd.grad(loss_of(out, y), xx)
        return g.to_dense()

    return Built(run, x, "torch.utils.mkldnn.to_mkldnn, mkldnn input")


def _compiled(s: Setup, x: torch.Tensor, **kw: Any) -> Built:
    m = torch.compile(copy.deepcopy(s.floor), dynamic=False, **kw)
    return Built(autograd_pass(m), floor_input(s, x), f"torch.compile(dynamic=False, {kw})")


def c_compile(s: Setup, x: torch.Tensor) -> Built:
    return _compiled(s, x)


def c_compile_autotune(s: Setup, x: torch.Tensor) -> Built:
    return _compiled(s, x, mode="max-autotune-no-cudagraphs")


def c_compile_func_grad(s: Setup, x: torch.Tensor) -> Built:
    inner = c_func_grad(s, x)
    fn = torch.compile(inner.fn, dynamic=False)
    return Built(fn, inner.x, "torch.compile(torch.func.grad(...)): one graph, forward + backward")


def input_gradient_graph(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, as_conv: bool = False
) -> torch.fx.GraphModule:
    """The pass traced to aten ops (make_fx, core decompositions, attention's math kernel),
    with every input-gradient ``convolution_backward`` rewritten as the transposed convolution
    it is, which ONNX has; with ``as_conv``, a stride-1 ungrouped one becomes a plain
    convolution with the flipped, transposed kernel (ONNX Runtime's fast Conv path)."""
    # attention's math kernel: its backward is matmuls and softmax, which ONNX has (the fused
    # CPU kernel's backward has no ONNX function)
    with sdpa_kernel(SDPBackend.MATH):
        gm = make_fx(autograd_pass(model), decomposition_table=dict(core_aten_decompositions()))(
            x, y
        )
    conv_bwd = torch.ops.aten.convolution_backward.default
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not conv_bwd:
            continue
        go, inp, w, _, stride, padding, dilation, transposed, _, groups, mask = node.args
        if transposed or list(mask) != [True, False, False]:
            raise RuntimeError(f"convolution_backward with transposed={transposed}, mask={mask}")
        i_sh, o_sh, k_sh = (a.meta["val"].shape for a in (inp, go, w))
        out_pad = [
            i_sh[2 + d]
            - ((o_sh[2 + d] - 1) * stride[d] - 2 * padding[d] + dilation[d] * (k_sh[2 + d] - 1) + 1)
            for d in range(len(stride))
        ]
        plain = as_conv and groups == 1 and set(stride) == {1} and w.op == "get_attr"
        plain = plain and all(
            dilation[d] * (k_sh[2 + d] - 1) >= padding[d] for d in range(len(stride))
        )
        with gm.graph.inserting_before(node):
            if plain:  # dL/dx = conv(dL/dout, flip(W)^T) padded d(k-1)-p: the same sums
                name = f"_input_grad_kernel_{w.target}"
                flipped = getattr(gm, w.target).flip(list(range(2, len(k_sh)))).transpose(0, 1)
                gm.register_buffer(name, flipped.contiguous())
                w2 = gm.graph.get_attr(name)
                pad = [dilation[d] * (k_sh[2 + d] - 1) - padding[d] for d in range(len(stride))]
                args = (go, w2, None, stride, pad, dilation, False, [0] * len(stride), 1)
            else:
                args = (go, w, None, stride, padding, dilation, True, out_pad, groups)
            new = gm.graph.call_function(torch.ops.aten.convolution.default, args)
        for user in list(node.users):
            if user.target is not operator.getitem:
                raise RuntimeError(f"unexpected user {user.target} of convolution_backward")
            if user.args[1] == 0:
                user.replace_all_uses_with(new)
            elif user.users:
                raise RuntimeError("a weight or bias gradient is used")
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def _ort_session(path_or_bytes: str | bytes, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])


def _ort_fn(sess: Any, x_name: str, y_name: str, out_name: str) -> GradFn:
    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        (g,) = sess.run([out_name], {x_name: x.numpy(), y_name: y.numpy()})
        return torch.from_numpy(g)

    return run


def _onnx_explicit_backward(s: Setup, x: torch.Tensor, as_conv: bool) -> Built:
    import onnxruntime as ort

    m = frozen(fast_copy(s.base, channels_last=False))
    y = torch.zeros(len(x), dtype=torch.long)
    gm = input_gradient_graph(m, x, y, as_conv=as_conv)
    with tempfile.TemporaryDirectory() as d, _quiet():
        path = str(Path(d) / "grad.onnx")
        prog = torch.onnx.export(gm, (x, y), dynamo=True, verbose=False)
        assert prog is not None
        prog.save(path)
        sess = _ort_session(path, s.threads)
    names = [i.name for i in sess.get_inputs()]
    out = sess.get_outputs()[0].name
    how = (
        "stride-1 as Conv with flipped kernel, others ConvTranspose" if as_conv else "ConvTranspose"
    )
    note = f"make_fx fwd+bwd, conv input-grad as {how}, ONNX Runtime {ort.__version__}"
    return Built(_ort_fn(sess, names[0], names[1], out), x, note)


def c_onnx_explicit_backward(s: Setup, x: torch.Tensor) -> Built:
    return _onnx_explicit_backward(s, x, as_conv=False)


def c_onnx_explicit_backward_conv(s: Setup, x: torch.Tensor) -> Built:
    return _onnx_explicit_backward(s, x, as_conv=True)


class _GradModule(nn.Module):
    """A module whose forward is the pass itself (for exporters that only see forward)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return autograd_pass(self.model)(x, y)


def c_onnx_legacy_autograd(s: Setup, x: torch.Tensor) -> Built:
    m = _GradModule(frozen(fast_copy(s.base, channels_last=False)))
    y = torch.zeros(len(x), dtype=torch.long)
    f: Any = io.BytesIO()  # torch.onnx.export takes a file object; its stubs say a path
    with _quiet():
        torch.onnx.export(m, (x, y), f, dynamo=False)
    sess = _ort_session(f.getvalue(), s.threads)
    names = [i.name for i in sess.get_inputs()]
    return Built(
        _ort_fn(sess, names[0], names[1], sess.get_outputs()[0].name), x, "legacy exporter"
    )


def c_onnx_dynamo_func_grad(s: Setup, x: torch.Tensor) -> Built:
    m = frozen(fast_copy(s.base, channels_last=False))

    class G(nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            g: torch.Tensor = torch.func.grad(lambda z: loss_of(m(z), y))(x)
            return g

    y = torch.zeros(len(x), dtype=torch.long)
    with tempfile.TemporaryDirectory() as d, _quiet():
        path = str(Path(d) / "grad.onnx")
        prog = torch.onnx.export(G(), (x, y), dynamo=True, verbose=False)
        assert prog is not None
        prog.save(path)
        sess = _ort_session(path, s.threads)
    names = [i.name for i in sess.get_inputs()]
    out = sess.get_outputs()[0].name
    return Built(_ort_fn(sess, names[0], names[1], out), x, "torch.func.grad under torch.export")


class _LossModule(nn.Module):
    """The model and its loss, the forward graph a gradient builder differentiates."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # the summed cross-entropy from elementary ops: ORT's gradient builder fails on the
        # exporter's SoftmaxCrossEntropyLoss node (it expects the log-probability output too)
        logp = torch.log_softmax(self.model(x), dim=1)
        return -logp.gather(1, y[:, None]).sum()


def c_ort_training_graph(s: Setup, x: torch.Tensor) -> Built:
    import onnxruntime as ort
    from onnxruntime.capi._pybind_state import GradientGraphBuilder

    m = _LossModule(frozen(fast_copy(s.base, channels_last=False)))
    y = torch.zeros(len(x), dtype=torch.long)
    f: Any = io.BytesIO()  # torch.onnx.export takes a file object; its stubs say a path
    # the legacy exporter at opset 14: ORT 1.19's gradient builder has no gradient for opset
    # 17's single-output LayerNormalization node; at 14 layer norm is exported as primitives
    with _quiet():
        torch.onnx.export(
            m, (x, y), f, dynamo=False, input_names=["input", "labels"], output_names=["loss"],
            opset_version=14, do_constant_folding=False,
        )  # fmt: skip
    builder = GradientGraphBuilder(f.getvalue(), {"loss"}, {"input"}, "loss")
    builder.build()
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "grad.onnx")
        builder.save(path)
        sess = _ort_session(path, s.threads)
    outs = [o.name for o in sess.get_outputs()]
    grad_name = next(n for n in outs if n.startswith("input") and "grad" in n)
    note = f"GradientGraphBuilder(loss -> input), onnxruntime-training {ort.__version__}"
    return Built(_ort_fn(sess, "input", "labels", grad_name), x, note)


def c_ortmodule(s: Setup, x: torch.Tensor) -> Built:
    from onnxruntime.training.ortmodule import ORTModule

    m = ORTModule(frozen(fast_copy(s.base, channels_last=False)))
    return Built(autograd_pass(m), x, "onnxruntime.training.ortmodule.ORTModule")


CANDIDATES: dict[str, Callable[[Setup, torch.Tensor], Built]] = {
    "eager-floor": c_floor,
    "eager-contiguous": c_contiguous,
    "eager-params-requires-grad": c_params_grad,
    "eager-bn-not-folded": c_not_folded,
    "eager-mkldnn-off": c_mkldnn_off,
    "eager-other-thread-count": c_other_threads,
    "func-grad": c_func_grad,
    "func-vjp": c_func_vjp,
    "jit-trace": c_jit_trace,
    "jit-trace-freeze": c_jit_freeze,
    "jit-freeze-optimize-for-inference": c_jit_optimize,
    "mkldnn-to-mkldnn": c_to_mkldnn,
    "compile-default": c_compile,
    "compile-max-autotune-no-cudagraphs": c_compile_autotune,
    "compile-func-grad": c_compile_func_grad,
    "onnx-explicit-backward-ort": c_onnx_explicit_backward,
    "onnx-explicit-backward-ort-conv": c_onnx_explicit_backward_conv,
    "onnx-legacy-export-autograd-grad": c_onnx_legacy_autograd,
    "onnx-dynamo-export-func-grad": c_onnx_dynamo_func_grad,
    "ort-training-gradient-graph": c_ort_training_graph,
    "ort-training-ortmodule": c_ortmodule,
}


# --- running ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence exporters' progress prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Raise BuildTimeout in this thread after ``seconds`` (0: no limit)."""

    def fire(signum: int, frame: FrameType | None) -> None:
        raise BuildTimeout(f"build + first pass took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _short(e: BaseException) -> str:
    """The error in one line (for exporters: the first line of their exception summary)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if "## Exception summary" in lines:
        lines = lines[lines.index("## Exception summary") + 1 :]
    return f"{type(e).__name__}: {(lines or [''])[0][:300]}"


def build_rows(
    s: Setup, names: list[str], batches: list[int], seed: int, timeout: int, tol: float
) -> tuple[list[Row], dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Build every candidate at every batch size and check its gradient against the floor's."""
    rows: list[Row] = []
    data: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for b in batches:
        g = torch.Generator().manual_seed(seed + b)
        x = torch.rand(b, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (b,), generator=g)
        data[b] = (x, y)
        ref = autograd_pass(s.floor)(floor_input(s, x), y).contiguous()
        for name in names:
            row = Row(name, b)
            t0 = time.perf_counter()
            try:
                with _deadline(timeout):
                    built = CANDIDATES[name](s, x)
                    grad = built.fn(built.x, y)  # first call: compilation, profiling
                row.build_s = time.perf_counter() - t0
                with _deadline(timeout):
                    for _ in range(WARMUP):  # the JIT's profiling runs, compile's later graphs
                        built.fn(built.x, y)
                row.notes = built.notes
                row.rel_diff = float(
                    (grad.to_dense().contiguous() - ref).abs().max() / ref.abs().max()
                )
                row.built = built
            except Exception as e:  # every failure is a result to report
                row.build_s = time.perf_counter() - t0
                row.status = "skipped" if str(e).startswith("skipped") else "failed"
                row.error = _short(e)
            rows.append(row)
            print(f"  built {s.arch} b={b} {name}: {row.status} {row.build_s:.1f}s "
                  f"rel_diff={row.rel_diff} {row.error[:150]}", flush=True)  # fmt: skip
    return rows, data


def time_rows(
    rows: list[Row], data: dict[int, tuple[torch.Tensor, torch.Tensor]], reps: int, inner: int
) -> None:
    """Interleaved repetitions: per repetition, every batch and every built candidate in a
    rotating order, ``inner`` passes each; appends seconds per pass."""
    ok = [r for r in rows if r.built is not None]
    for rep in range(reps):
        order = ok[rep % len(ok) :] + ok[: rep % len(ok)]
        for r in order:
            assert r.built is not None
            _, y = data[r.batch]
            t0 = time.perf_counter()
            for _ in range(inner):
                r.built.fn(r.built.x, y)
            r.times.append((time.perf_counter() - t0) / inner)


def records(s: Setup, rows: list[Row], tol: float, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """One JSON record per candidate and batch: medians, paired ratio to the floor, numerics."""
    floor = {r.batch: r for r in rows if r.candidate == "eager-floor"}
    out = []
    for r in rows:
        rec: dict[str, Any] = {
            **meta, "arch": s.arch, "batch": r.batch, "candidate": r.candidate,
            "status": r.status, "error": r.error, "notes": r.notes,
            "build_s": round(r.build_s, 2), "channels_last_floor": s.channels_last,
        }  # fmt: skip
        if r.times:
            f = floor[r.batch].times
            rec["median_ms"] = round(1e3 * statistics.median(r.times), 3)
            rec["ratio"] = round(
                statistics.median(a / b for a, b in zip(r.times, f, strict=True)), 4
            )
            rec["times_ms"] = [round(1e3 * t, 3) for t in r.times]
        if r.rel_diff is not None:
            rec["rel_diff"] = r.rel_diff
            rec["equal_numerics"] = r.rel_diff <= tol
        out.append(rec)
    return out


def run(args: argparse.Namespace) -> None:
    """Build, check and time every candidate for every architecture; append JSON lines."""
    torch.set_num_threads(args.threads)
    for key in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, 64)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": args.threads, "torch": torch.__version__, "onnxruntime": _ort_version(),
        "python": platform.python_version(), "reps": args.reps, "inner": args.inner,
        "tol": args.tol, "load_at_start": _loadavg(), "tag": args.tag,
    }  # fmt: skip
    names = ["eager-floor", *[n for n in args.candidates.split(",") if n and n != "eager-floor"]]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise SystemExit(f"unknown candidates {unknown}; known: {', '.join(CANDIDATES)}")
    batches = [int(b) for b in args.batches.split(",")]
    for i, arch in enumerate(args.archs.split(",")):
        torch._dynamo.reset()
        s = make_setup(arch, args.threads, args.seed + i)
        rows, data = build_rows(s, names, batches, args.seed, args.build_timeout, args.tol)
        time_rows(rows, data, args.reps, args.inner)
        recs = records(s, rows, args.tol, {**meta, "load_at_end": _loadavg()})
        with open(args.out, "a") as f:
            for rec in recs:
                f.write(json.dumps(rec) + "\n")
        for rec in recs:
            print(f"{arch:9s} b={rec['batch']:<4d} {rec['candidate']:36s} {rec['status']:7s} "
                  f"{rec.get('median_ms', '-')!s:>9s} ms  ratio {rec.get('ratio', '-')!s:7s} "
                  f"eq {rec.get('equal_numerics', '-')!s:5s} {rec['error'][:80]}", flush=True)  # fmt: skip


def _ort_version() -> str | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    return str(ort.__version__)


def _loadavg() -> float:
    return round(float(Path("/proc/loadavg").read_text().split()[0]), 2)


def _equal(rel: float, tol: float, noise: float) -> str:
    """'yes' within tol; 'yes*' within the floor's own layout noise; '**no**' beyond both."""
    if rel <= tol:
        return f"yes ({rel:.0e})"
    return f"yes* ({rel:.0e})" if rel <= noise * 1.0001 else f"**no** ({rel:.0e})"


def summarize(paths: list[str]) -> None:
    """Markdown tables, one per architecture and batch, thread counts side by side.

    Numerics: the candidate's input gradient against the floor's, max |diff| / max |floor
    grad|; 'yes*' marks a difference above --tol but no larger than that between two of
    PyTorch's own eager layouts (NCHW vs channels_last) on the same batch, i.e. rounding
    that flips a ReLU at its kink for a few points, not a different function.
    """
    recs = [json.loads(ln) for p in paths for ln in Path(p).read_text().splitlines() if ln.strip()]
    venvs: dict[tuple[str, int, str], set[str | None]] = {}
    for r in recs:
        venvs.setdefault((r["arch"], r["batch"], r["candidate"]), set()).add(r["onnxruntime"])
    recs = [  # an ImportError in the venv without the package says nothing when another venv ran it
        r for r in recs
        if not (r["error"].startswith(("ImportError", "ModuleNotFoundError"))
                and "onnxruntime" in r["error"]
                and len(venvs[(r["arch"], r["batch"], r["candidate"])]) > 1)
    ]  # fmt: skip
    threads = sorted({r["threads"] for r in recs})
    for arch in sorted(
        {r["arch"] for r in recs}, key=lambda a: ARCHS.index(a) if a in ARCHS else 9
    ):
        for b in sorted({r["batch"] for r in recs if r["arch"] == arch}):
            sel = [r for r in recs if r["arch"] == arch and r["batch"] == b]
            noise = max(
                [r["rel_diff"] for r in sel if r["candidate"] == "eager-contiguous" and "rel_diff" in r]
                or [0.0]
            )  # fmt: skip
            print(f"\n**{arch}, batch {b}**\n")
            head = " | ".join(f"{t} thr: ms / ratio" for t in threads)
            print(f"| candidate | venv | {head} | numerics equal | notes |")
            print("| --- | --- | " + " | ".join("---:" for _ in threads) + " | --- | --- |")
            rows: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
            for r in sel:
                engine = f"ort {r['onnxruntime']}" if r["onnxruntime"] else "no ort"
                engine += f" ({r['tag']})" if r.get("tag") else ""
                rows.setdefault((r["candidate"], engine), {})[r["threads"]] = r
            for (cand, engine), by_t in rows.items():
                first = next(iter(by_t.values()))
                cells = []
                for t in threads:
                    r = by_t.get(t)
                    cells.append(
                        f"{r['median_ms']:.1f} / {r['ratio']:.2f}"
                        if r and "median_ms" in r
                        else "–"
                    )
                rel = [r["rel_diff"] for r in by_t.values() if "rel_diff" in r]
                eq = _equal(max(rel), first["tol"], noise) if rel else "–"
                note = (
                    first["notes"]
                    if first["status"] == "ok"
                    else f"{first['status']}: {first['error']}"
                )
                note = note.replace("|", "/")
                print(f"| {cand} | {engine} | {' | '.join(cells)} | {eq} | {note} |")


def main() -> None:
    """Parse arguments; run the benchmark or summarize earlier runs."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--batches", default="85,250")
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--inner", type=int, default=2, help="passes per timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-4, help="max |diff| / max |floor grad|")
    p.add_argument("--build-timeout", type=int, default=600, help="seconds per candidate build")
    p.add_argument("--out", default="benchmarks/results_grad_engines.jsonl")
    p.add_argument("--tag", default="", help="names this run in the records and the summary")
    p.add_argument("--summarize", nargs="+", metavar="JSONL")
    args = p.parse_args()
    if args.summarize:
        summarize(args.summarize)
    else:
        run(args)


if __name__ == "__main__":
    main()

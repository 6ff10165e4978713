"""The inference engine: ONNX Runtime and PyTorch agree on small models of every kind, a pass
that could differ from the model (hooks, changed weights, switched modes, gradients) runs in
PyTorch, exports that cannot be faithful fall back (or fail when asked for), and the
evaluation records the engine that ran and gives the same per-sample results with both."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustlab.attacks import AutoAttack
from robustlab.attacks.registry import make_attack
from robustlab.data import load_data
from robustlab.errors import RobustlabError
from robustlab.evaluate import evaluate
from robustlab.evaluate.fast import fast_copy
from robustlab.models import build_model
from robustlab.models import engine as engine_module
from robustlab.models.engine import (
    TOLERANCE,
    check_engine,
    choose_engine,
    detach_engine,
    engine_of,
    infer,
    inference_engine,
)
from robustlab.models.hpm import HPMClassifier, with_mode
from robustlab.models.multiexit import adaptive_pool, attach_exits


def _x(n: int = 12, size: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 1, size, size), generator=torch.Generator().manual_seed(seed))


def _close(a: Any, b: Any) -> bool:
    scale = max(1.0, float(a.abs().max()))
    return float((a - b).abs().max()) <= TOLERANCE * scale and torch.equal(a.argmax(1), b.argmax(1))


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "resnet8 (folded, channels_last)": fast_copy(
            build_model("resnet8", width=8).eval(), channels_last=True
        ),
        "mlp": build_model("mlp").eval(),
        "vit": build_model("vit").eval(),
        "hpm": HPMClassifier(build_model("resnet8", width=8)).eval(),
    }


@pytest.mark.parametrize("name", list(_models()))
def test_onnxruntime_gives_pytorchs_logits_at_every_batch_size(name: str) -> None:
    model = _models()[name]
    probe = _x(16)
    with inference_engine(model, probe, "onnxruntime") as choice, torch.no_grad():
        assert choice.engine == "onnxruntime"
        assert engine_of(model) is choice
        for n in (1, 5, 16, 40):  # sizes other than the traced 2 and the probe's 16
            x = _x(n, seed=n)
            got, want = infer(model, x), model(x)
            assert got.shape == want.shape
            assert _close(want, got), name
    assert engine_of(model) is None  # detached on leaving the block


class CountingSession:
    """An ONNX Runtime session that counts the batches it runs."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.batches: list[int] = []

    def get_inputs(self) -> Any:
        return self.session.get_inputs()

    def run(self, names: Any, feeds: dict[str, Any]) -> Any:
        self.batches.extend(len(v) for v in feeds.values())
        return self.session.run(names, feeds)


def test_infer_runs_the_session_and_plain_calls_do_not() -> None:
    model = build_model("mlp").eval()
    x = _x(8)
    with inference_engine(model, _x(16), "onnxruntime"), torch.no_grad():
        runner = engine_module._ATTACHED[model][0]
        assert runner is not None
        counting = CountingSession(runner.session)
        runner.session = counting
        got = infer(model, x)
        model(x)  # a plain call is PyTorch's
        assert counting.batches == [8]
        assert _close(model(x), got)


def test_a_multi_exit_model_returns_every_exit_through_onnxruntime() -> None:
    torch.manual_seed(0)
    # 28 x 28: exits pool 28, 14 and 7 to 4 x 4, windows the exporter must spell out
    net = attach_exits(build_model("resnet8", width=8), (1, 28, 28), 10).eval()
    x = _x(6)
    with (
        net.outputs("all"),
        inference_engine(net, _x(16), "onnxruntime"),
        torch.no_grad(),
    ):
        got, want = infer(net, x), net(x)
    assert isinstance(got, list) and len(got) == len(want) == net.num_exits
    assert all(_close(w, g) for w, g in zip(want, got, strict=True))


def test_a_hook_registered_after_the_export_sends_the_pass_to_pytorch() -> None:
    model = build_model("mlp").eval()
    seen: list[int] = []
    with inference_engine(model, _x(16), "onnxruntime"), torch.no_grad():
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        handle = last.register_forward_hook(lambda m, i, o: seen.append(len(o)))
        try:
            infer(model, _x(3))
        finally:
            handle.remove()
        infer(model, _x(3))
    assert seen == [3]  # the hooked pass ran in PyTorch (the hook saw it), the next did not


def test_weights_changed_in_place_are_never_answered_by_the_old_export() -> None:
    model = build_model("mlp").eval()
    x = _x(5)
    with inference_engine(model, _x(16), "onnxruntime"), torch.no_grad():
        old = infer(model, x)
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        last.bias.add_(torch.arange(10.0) * 5)
        new = infer(model, x)
        assert torch.equal(new, model(x))
        assert not _close(old, new)


def test_a_head_switched_to_another_mode_is_run_in_that_mode() -> None:
    torch.manual_seed(0)
    model = HPMClassifier(build_model("resnet8", width=8)).eval()
    x = _x(9)
    with inference_engine(model, _x(16), "onnxruntime"), torch.no_grad():
        mix = infer(model, x)
        with with_mode(model, "ema"):
            ema = infer(model, x)
            assert torch.equal(ema, model(x))  # PyTorch ran it: the export is of "mix"
        assert _close(model(x), mix)


def test_a_layer_put_in_train_mode_is_run_in_pytorch() -> None:
    torch.manual_seed(0)
    model = build_model("resnet8", width=8).eval()
    x = _x(6)
    with inference_engine(model, _x(16), "onnxruntime"), torch.no_grad():
        bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        bn.train()  # batch statistics now: the eval-mode export no longer applies
        got = infer(model, x)
        assert torch.equal(got, model(x))
        bn.eval()


def test_passes_with_gradients_run_in_pytorch() -> None:
    model = build_model("mlp").eval()
    with inference_engine(model, _x(16), "onnxruntime"):
        x = _x(4).requires_grad_(True)
        out = infer(model, x)
        assert out.grad_fn is not None  # a graph: PyTorch ran it


class Branchy(nn.Module):
    """A forward whose answer depends on a Python branch on the data: tracing would bake it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(28 * 28, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z: torch.Tensor = self.fc(x.flatten(1))
        if float(x.mean()) > 0.5:
            return -z
        return z


def test_an_export_that_could_bake_a_branch_falls_back_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = Branchy()
    with inference_engine(model, _x(16), "auto") as choice, torch.no_grad():
        assert choice.engine == "torch" and choice.failed
        assert "data-dependent" in choice.reason
        x = _x(4) + 0.5
        assert torch.equal(infer(model, x), model(x))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robustlab: note: forward passes run in PyTorch")


def test_asking_for_onnxruntime_on_a_model_it_cannot_run_is_an_error() -> None:
    with pytest.raises(RobustlabError, match="engine onnxruntime cannot run this model"):
        choose_engine(Branchy(), _x(16), "onnxruntime")
    detach_engine(Branchy())  # nothing attached: a no-op


def test_torch_is_never_exported_and_auto_picks_a_faithful_engine() -> None:
    model = build_model("mlp").eval()
    torch_choice = choose_engine(model, _x(16), "torch")
    assert torch_choice.engine == "torch" and torch_choice.max_logit_diff is None
    detach_engine(model)
    auto = choose_engine(model, _x(16), "auto")
    detach_engine(model)
    assert auto.max_logit_diff is not None and auto.max_logit_diff <= TOLERANCE * 10
    assert auto.time_ratio is not None and auto.time_ratio > 0
    assert auto.engine == ("onnxruntime" if auto.time_ratio < 1 else "torch")


def test_an_unknown_engine_is_refused() -> None:
    with pytest.raises(RobustlabError, match="unknown engine 'fast'; use one of auto, torch"):
        check_engine("fast")


def test_onnxruntime_asked_for_but_not_importable_says_how_to_install(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"  # as if it were not installed
        "from robustlab.cli import main\n"
        "sys.exit(main(['eval', '--model', 'x', '--eps', '0.1', '--engine', 'onnxruntime']))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "robustlab: error: engine onnxruntime was asked for but is not installed; install it "
        "with 'pip install onnxruntime', or use --engine auto or torch"
    )


@pytest.mark.parametrize("attack", ["square", "autoattack"])
def test_both_engines_give_the_same_evaluation_and_the_record_names_the_engine(
    attack: str,
) -> None:
    data = load_data("digits").test
    torch.manual_seed(0)
    model = build_model("resnet8", in_channels=1, image_size=8, width=8).eval()
    if attack == "square":
        made = make_attack("square", "linf", 0.1, queries=60)
    else:
        made = AutoAttack(norm="linf", eps=0.1, attacks=("apgd-ce", "fab-t", "square"))
    records = {
        engine: evaluate(model, data, made, n=24, batch_size=12, progress=False, engine=engine)
        for engine in ("torch", "onnxruntime")
    }
    a, b = records["torch"], records["onnxruntime"]
    assert a.engine is not None and a.engine["engine"] == "torch"
    assert b.engine is not None and b.engine["engine"] == "onnxruntime"
    assert a.samples == b.samples
    assert a.robust_accuracy == b.robust_accuracy


@pytest.mark.parametrize("side", [28, 14, 7, 8, 3])
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_exit_pooling_traced_for_export_is_pytorchs_adaptive_pooling(side: int, kind: str) -> None:
    size = (min(side, 4), min(side, 4))

    class Pool(nn.Module):
        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return adaptive_pool(h, (side, side), size, kind)

    h = torch.randn(3, 5, side, side)
    traced = torch.jit.trace(Pool(), (h,))  # type: ignore[no-untyped-call]
    if side % size[0]:  # the windows, not the operator ONNX cannot take
        assert "adaptive" not in str(traced.graph)
    other = torch.randn(2, 5, side, side)  # the trace holds for new values
    want = (F.adaptive_max_pool2d if kind == "max" else F.adaptive_avg_pool2d)(other, size)
    torch.testing.assert_close(traced(other), want, rtol=0, atol=1e-6)

"""Fast AT (one FGSM step from a random start) and free AT (replayed batches, the perturbation
carried over): their examples against hand computations on a linear model, the loop's replays
and learning-rate schedule, training end to end on digits, and resumption."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustlab.core.distributed import sample_seed
from robustlab.data import DataSplits
from robustlab.errors import RobustlabError
from robustlab.train import (
    EpochEnd,
    EpochSampler,
    FastAT,
    FreeAT,
    Hook,
    Step,
    TrainConfig,
    fit,
    lr_at,
    make_method,
    train,
)

MLP: dict[str, Any] = {"arch": "mlp", "data": "digits", "channels_last": False}


def _linear(d: int = 16, classes: int = 3) -> nn.Sequential:
    """A linear classifier on (N, 1, 4, 4) inputs, in float64."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, classes)).double()


def _input_gradient(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d CE / d x for a linear model, written out: W^T (softmax(W x + b) - onehot(y))."""
    linear = model[1]
    assert isinstance(linear, nn.Linear)
    logits = x.flatten(1) @ linear.weight.T + linear.bias
    p = torch.softmax(logits, dim=1) - F.one_hot(y, logits.shape[1]).double()
    return (p @ linear.weight).view(x.shape)


def _uniform_per_sample(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Step 0's first random draw for samples 0, 1, ...: uniform in [0, 1), one generator each."""
    rows = []
    for i in range(len(x)):
        g = torch.Generator().manual_seed(sample_seed(seed, 0, 1, i))
        rows.append(torch.rand(x[i : i + 1].shape, generator=g, dtype=x.dtype))
    return torch.cat(rows)


def test_fast_at_example_is_one_fgsm_step_from_the_uniform_random_start() -> None:
    model = _linear()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    eps = 0.3
    method = make_method("fast-at", eps=eps)
    assert isinstance(method, FastAT) and method.config()["alpha"] == pytest.approx(1.25 * eps)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = Step(model, opt, x, y, torch.arange(8), 0, 0, 1, torch.Generator().manual_seed(7))
    method.before_forward(step)
    # by hand: a uniform draw in the eps box per sample (seeded from the run's seed, the step,
    # the draw and the sample's index), clipped to [0, 1]; one signed step of 1.25 eps on the
    # cross-entropy there; back into the eps box and [0, 1]
    u = _uniform_per_sample(x, seed=7)
    start = (x + (2 * u - 1) * eps).clamp(0, 1)
    moved = start + 1.25 * eps * _input_gradient(model, start, y).sign()
    want = torch.minimum(torch.maximum(moved, x - eps), x + eps).clamp(0, 1)
    assert torch.allclose(step.adversarial, want, atol=1e-12, rtol=0)
    assert not torch.allclose(step.adversarial, start)
    # a second step would move it again: this is one step, not PGD
    again = start + 1.25 * eps * _input_gradient(model, want, y).sign()
    assert not torch.allclose(want, torch.minimum(torch.maximum(again, x - eps), x + eps))


def test_fast_at_crafts_with_batch_statistics_and_leaves_the_running_ones() -> None:
    """Batch norm in train mode while crafting, as the official code: the step follows the
    gradient of the network that normalises with the start batch's own statistics (written out
    by hand here), and the running statistics do not move."""
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(1)
    linear = nn.Linear(16, 3)
    model = nn.Sequential(norm, nn.Flatten(), linear).double().train()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 1, 4, 4, generator=g, dtype=torch.float64) * 0.5
    y = torch.randint(0, 3, (8,), generator=g)
    eps = 0.2
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = Step(model, opt, x, y, torch.arange(8), 0, 0, 1, torch.Generator().manual_seed(7))
    make_method("fast-at", eps=eps, alpha_ratio=1.0).before_forward(step)
    mean, count = norm.running_mean, norm.num_batches_tracked
    assert mean is not None and count is not None
    assert float(mean) == 0.0 and int(count) == 0
    assert model.training  # the model's mode is restored

    u = _uniform_per_sample(x, seed=7)
    start = (x + (2 * u - 1) * eps).clamp(0, 1).requires_grad_(True)
    z = (start - start.mean()) / (start.var(unbiased=False) + norm.eps).sqrt()
    logits = (z * norm.weight + norm.bias).flatten(1) @ linear.weight.T + linear.bias
    F.cross_entropy(logits, y, reduction="sum").backward()
    assert start.grad is not None
    moved = start.detach() + eps * start.grad.sign()
    want = torch.minimum(torch.maximum(moved, x - eps), x + eps).clamp(0, 1)
    assert torch.allclose(step.adversarial, want, atol=1e-12, rtol=0)
    # in eval mode (running statistics 0 and 1) the step would go elsewhere
    at = start.detach().clone().requires_grad_(True)
    F.cross_entropy(model.eval()(at), y, reduction="sum").backward()
    assert at.grad is not None and not torch.equal(at.grad.sign(), start.grad.sign())


class _Seen(Hook):
    """Records each step's number, replay, indices, clean and perturbed inputs, the gradient the
    backward pass gave the perturbed inputs, and the learning rate."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def before_forward(self, step: Step) -> None:
        self.steps.append(
            {
                "number": step.number,
                "replay": step.replay,
                "index": step.index.tolist(),
                "x": step.x.clone(),
                "x_adv": step.adversarial.detach().clone(),
                "lr": step.optimizer.param_groups[0]["lr"],
            }
        )

    def after_backward(self, step: Step) -> None:
        grad = step.adversarial.grad
        assert grad is not None
        self.steps[-1]["grad"] = grad.clone()


def _free_run(
    replays: int, epochs: int = 2, n: int = 48, batch: int = 16
) -> tuple[_Seen, torch.optim.Optimizer, float]:
    """Free AT on a linear model over ``n`` random points for ``epochs`` epochs, with Adam (which
    counts its own steps)."""
    model = _linear()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(n, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    seen = _Seen()
    eps = 0.1
    fit(
        model,
        FreeAT(eps=eps, replays=replays),
        opt,
        x,
        y,
        EpochSampler(n, torch.Generator().manual_seed(3)),
        batch_size=batch,
        epochs=epochs,
        lr=0.01,
        gen=torch.Generator().manual_seed(4),
        hooks=[seen],
    )
    return seen, opt, eps


def test_free_at_carries_the_perturbation_over_replays_and_batches() -> None:
    seen, _, eps = _free_run(replays=3)
    steps = seen.steps
    assert torch.equal(steps[0]["x_adv"], steps[0]["x"])  # nothing to carry yet
    for prev, cur in zip(steps, steps[1:], strict=False):
        # the step before moved its perturbation by eps along the sign of the gradient its
        # backward pass gave, kept in the eps box and [0, 1] around its batch; this step
        # starts from that perturbation, on its own batch
        moved = prev["x_adv"] + eps * prev["grad"].sign()
        delta = torch.minimum(torch.maximum(moved, prev["x"] - eps), prev["x"] + eps).clamp(0, 1)
        delta = delta - prev["x"]
        want = torch.minimum(torch.maximum(cur["x"] + delta, cur["x"] - eps), cur["x"] + eps)
        assert torch.allclose(cur["x_adv"], want.clamp(0, 1), atol=1e-12, rtol=0), cur["number"]
    # the carried perturbation is not zero: a replay or a new batch does not start clean
    assert all(not torch.equal(s["x_adv"], s["x"]) for s in steps[1:])


def test_free_at_replays_each_batch_and_the_schedule_spans_every_step() -> None:
    replays, epochs, n, batch = 3, 2, 40, 16  # batches of 16, 16 and 8
    seen, opt, _ = _free_run(replays, epochs, n, batch)
    batches = 3
    total = epochs * batches * replays
    adam_steps = {int(s["step"]) for s in opt.state.values()}
    assert adam_steps == {total}  # the optimiser stepped once per replay
    assert [s["number"] for s in seen.steps] == list(range(total))
    assert [s["replay"] for s in seen.steps] == [0, 1, 2] * (epochs * batches)
    for i in range(0, total, replays):  # a replay is the same batch again
        assert seen.steps[i]["index"] == seen.steps[i + 1]["index"] == seen.steps[i + 2]["index"]
    assert [len(seen.steps[i]["index"]) for i in range(0, total, replays)] == [16, 16, 8] * 2
    assert [s["lr"] for s in seen.steps] == [lr_at(i, total, 0.01) for i in range(total)]
    assert seen.steps[-1]["lr"] < 0.01 * 1e-2  # the one-cycle schedule ends with the run


class _Weights(Hook):
    """Keeps a copy of the weights after every epoch."""

    def __init__(self) -> None:
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def end_epoch(self, end: EpochEnd) -> None:
        self.after[end.epoch] = {k: v.clone() for k, v in end.model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_free_at_resumes_with_the_carried_perturbation(tmp_path: Path, digits: DataSplits) -> None:
    cfg = TrainConfig(**MLP, method="free-at", eps=0.1, epochs=2, replays=2)
    whole = train(cfg, tmp_path / "whole", splits=digits, progress=False)
    train(cfg, tmp_path / "part", splits=digits, progress=False, stop_after_epochs=1)
    resumed = train(cfg, tmp_path / "part", splits=digits, progress=False)
    assert _same(whole.model.state_dict(), resumed.model.state_dict())
    assert whole.manifest["training"]["replays"] == 2
    assert whole.manifest["training"]["method_config"] == {
        "eps": 0.1,
        "norm": "linf",
        "eps_warmup": 0.3,
        "replays": 2,
        "alpha": 0.1,
        "name": "free-at",
    }


def test_fast_and_free_at_train_on_digits(tmp_path: Path) -> None:
    for method in ("fast-at", "free-at"):
        cfg = TrainConfig(**MLP, method=method, eps=0.1, epochs=2)
        result = train(cfg, tmp_path / method, progress=False)  # holds data out as needed
        assert result.manifest["metrics"]["clean_accuracy"] > 0.5, method
        checked = "held_out_check" in result.manifest["training"]
        assert checked == (method == "fast-at")  # fast AT's recipe checks for overfitting
        assert result.manifest["dataset"]["calibration_size"] == (200 if checked else 0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "free-at", "replays": 0}, "free-at needs replays >= 1, got 0"),
        ({"method": "fast-at", "alpha_ratio": -1.0}, "the step-size ratio must be > 0"),
        ({"method": "fast-at", "eps": 0.0}, "adversarial training needs eps > 0"),
    ],
)
def test_bad_fast_and_free_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(RobustlabError, match=message):
        TrainConfig(**{"eps": 0.1, **options}).make_method()

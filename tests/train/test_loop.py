"""The loop's hooks and sampler: a weight perturbation around the step (as AWP) fits, the hooks
run in the documented order, and torch's DistributedSampler can take the sampler's place."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler, TensorDataset

from robustlab.data import DataSplits
from robustlab.models import build_model
from robustlab.train import (
    EpochEnd,
    EpochSampler,
    Hook,
    Standard,
    Step,
    TrainConfig,
    fit,
    lr_at,
    train,
)

MLP: dict[str, Any] = {
    "arch": "mlp",
    "data": "digits",
    "arch_options": {"width": 32},
    "channels_last": False,
}
GAMMA = 0.05


class _WeightPerturbation(Hook):
    """As AWP: w += gamma * w on weight matrices before the forward/backward, undone after the
    optimiser step (w -= the same diff)."""

    def __init__(self, gamma: float) -> None:
        self.gamma = gamma
        self.diffs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    def before_forward(self, step: Step) -> None:
        with torch.no_grad():
            self.diffs = [(p, self.gamma * p.detach().clone()) for p in step.model.parameters()]
            self.diffs = [(p, d) for p, d in self.diffs if p.dim() > 1]
            for p, d in self.diffs:
                p.add_(d)

    def after_step(self, step: Step) -> None:
        with torch.no_grad():
            for p, d in self.diffs:
                p.sub_(d)


def _hand_written_awp_loop(digits: DataSplits, epochs: int) -> dict[str, torch.Tensor]:
    """What `train` does for the standard method (same seeds, recipe and schedule), written
    out by hand with the weight perturbation inlined around the step."""
    torch.manual_seed(0)
    model = build_model(
        "mlp",
        digits.in_channels,
        digits.num_classes,
        digits.image_size,
        digits.mean,
        digits.std,
        width=32,
    )
    lr, batch = 0.05, 64  # the standard recipe
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    gen = torch.Generator().manual_seed(0)
    x_all, y_all = digits.train.x, digits.train.y
    n = len(x_all)
    per_epoch = math.ceil(n / batch)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for b in range(per_epoch):
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch * per_epoch + b, epochs * per_epoch, lr)
            idx = perm[b * batch : (b + 1) * batch]
            with torch.no_grad():
                diffs = [(p, GAMMA * p.clone()) for p in model.parameters() if p.dim() > 1]
                for p, d in diffs:
                    p.add_(d)
            loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for p, d in diffs:
                    p.sub_(d)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_weight_perturbation_add_on_equals_the_hand_written_loop(
    tmp_path: Path, digits: DataSplits
) -> None:
    cfg = TrainConfig(**MLP, epochs=2)
    hooked = train(
        cfg,
        tmp_path / "awp",
        splits=digits,
        device="cpu",
        progress=False,
        hooks=[_WeightPerturbation(GAMMA)],
    )
    plain = train(cfg, tmp_path / "plain", splits=digits, device="cpu", progress=False)
    expected = _hand_written_awp_loop(digits, epochs=2)
    got = hooked.model.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert any(not torch.equal(plain.model.state_dict()[k], expected[k]) for k in expected)


class _Recorder(Hook):
    """Writes what it sees at each hook point into a shared event list."""

    def __init__(self, tag: str, events: list[tuple[object, ...]]) -> None:
        self.tag, self.events = tag, events

    def start(self, model: torch.nn.Module) -> None:
        self.events.append((self.tag, "start", model.training))

    def before_forward(self, step: Step) -> None:
        self.events.append((self.tag, "before_forward", step.x_adv is not None, step.loss))

    def after_backward(self, step: Step) -> None:
        grads = all(p.grad is not None for p in step.model.parameters())
        self.events.append((self.tag, "after_backward", grads, step.loss is not None))

    def after_step(self, step: Step) -> None:
        self.events.append((self.tag, "after_step", step.number))

    def end_epoch(self, end: EpochEnd) -> None:
        self.events.append((self.tag, "end_epoch", end.epoch, math.isfinite(end.loss)))


def test_hooks_run_around_the_step_in_order(tmp_path: Path, digits: DataSplits) -> None:
    events: list[tuple[object, ...]] = []
    cfg = TrainConfig(**MLP, epochs=1, method="pgd-at", eps=0.1, steps=1)
    train(
        cfg,
        tmp_path,
        splits=digits,
        device="cpu",
        progress=False,
        hooks=[_Recorder("a", events), _Recorder("b", events)],
    )
    per_epoch = math.ceil(len(digits.train) / 64)
    step0 = [
        ("a", "before_forward", True, None),  # the method crafted its examples first
        ("b", "before_forward", True, None),
        ("a", "after_backward", True, True),
        ("b", "after_backward", True, True),
        ("b", "after_step", 0),  # unwound in reverse order
        ("a", "after_step", 0),
    ]
    assert events[:2] == [("a", "start", True), ("b", "start", True)]
    assert events[2:8] == step0
    assert len(events) == 2 + 6 * per_epoch + 2
    assert events[-2:] == [("a", "end_epoch", 1, True), ("b", "end_epoch", 1, True)]


def test_epoch_sampler_draws_one_permutation_per_epoch_from_its_generator() -> None:
    sampler = EpochSampler(10, torch.Generator().manual_seed(3))
    reference = torch.Generator().manual_seed(3)
    assert len(sampler) == 10
    first, second = list(sampler), list(sampler)
    assert first == torch.randperm(10, generator=reference).tolist()
    assert second == torch.randperm(10, generator=reference).tolist()
    assert first != second


def test_a_distributed_sampler_can_replace_the_epoch_sampler(digits: DataSplits) -> None:
    n = 96
    x, y = digits.train.x[:n], digits.train.y[:n]
    torch.manual_seed(0)
    model = build_model("mlp", 1, 10, 8, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sampler: DistributedSampler[int] = DistributedSampler(
        TensorDataset(x, y), num_replicas=2, rank=1, shuffle=True, seed=5
    )
    seen: list[list[int]] = [[], []]

    class _Indices(Hook):
        def before_forward(self, step: Step) -> None:
            seen[step.epoch].extend(step.index.tolist())

    history = fit(
        model,
        Standard(),
        opt,
        x,
        y,
        sampler,
        batch_size=16,
        epochs=2,
        lr=0.01,
        gen=torch.Generator(),
        hooks=[_Indices()],
    )
    assert len(history) == 2
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        assert seen[epoch] == list(sampler)  # this rank's half, in the epoch's order
        assert len(set(seen[epoch])) == n // 2
    assert seen[0] != seen[1]  # the loop told the sampler which epoch it is


class _StopAfter(Hook):
    """Ends training after the given epoch, as an early-stopping check would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def end_epoch(self, end: EpochEnd) -> None:
        end.stop = end.epoch == self.epoch


def test_a_hook_can_stop_training_after_an_epoch(tmp_path: Path, digits: DataSplits) -> None:
    cfg = TrainConfig(**MLP, epochs=3)
    stopped = train(cfg, tmp_path / "stop", splits=digits, progress=False, hooks=[_StopAfter(1)])
    assert stopped.manifest["training"]["stopped_after_epoch"] == 1
    assert not (tmp_path / "stop" / "resume.pt").exists()
    part = train(cfg, tmp_path / "part", splits=digits, progress=False, stop_after_epochs=1)
    for k, v in part.model.state_dict().items():
        assert torch.equal(stopped.model.state_dict()[k], v), k

"""Distributed training for real: torchrun starts gloo processes on this CPU machine and the
model they train is the one a single process trains with the same seed and global batch; a
killed process stops the run with one sentence and the run resumes; bad worlds are refused.

Every torchrun run is a real subprocess (``python -m torch.distributed.run``) with a timeout;
single-process references run in this process, on one thread as the workers do.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from _torchrun import TIMEOUT_S, environment, free_port, torchrun, torchrun_command
from robustlab.cli import STOPPED_UNDER_TORCHRUN, main, stop_on_sigterm
from robustlab.core.distributed import Processes
from robustlab.core.threat import ThreatModel
from robustlab.data import DataSplits
from robustlab.errors import RobustlabError, RunStopped
from robustlab.models import build_model
from robustlab.train import Hook, Step, TrainConfig, train
from robustlab.train.distributed import (
    SyncedBatchNorm,
    check_regularizers_for,
    check_shares,
    synchronised_batchnorm,
)

MLP = ["--arch", "mlp", "--data", "digits", "--arch-option", "width=32", "--seed", "3"]
PGD_AT = [*MLP, "--method", "pgd-at", "--eps", "0.1", "--steps", "3", "--epochs", "2"]
TOLERANCE = 1e-5


def _two_processes(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node 2 -m robustlab train ARGS``."""
    return torchrun(["train", "--no-progress", *args])


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Single-process references computed on one thread, as each worker computes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _one_process(args: Sequence[str], out: Path) -> dict[str, torch.Tensor]:
    """Train with the same command in this process; its weights."""
    assert main(["train", "--no-progress", *args, "--out", str(out)]) == 0
    return load_file(out / "model.safetensors")


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two checkpoints' tensors (same names)."""
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _manifest(folder: Path) -> dict[str, Any]:
    """A checkpoint's manifest."""
    manifest: dict[str, Any] = json.loads((folder / "manifest.json").read_text())
    return manifest


def _errors(stderr: str) -> list[str]:
    """The lines robustlab printed as errors."""
    return [line for line in stderr.splitlines() if line.startswith("robustlab: error:")]


def test_two_processes_train_pgd_at_as_one_process_does(tmp_path: Path, one_thread: None) -> None:
    done = _two_processes([*PGD_AT, "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("trained mlp (pgd-at)") == 1  # rank 0 alone speaks
    one = _one_process(PGD_AT, tmp_path / "one")
    assert _max_difference(load_file(tmp_path / "two" / "model.safetensors"), one) < TOLERANCE
    manifest = _manifest(tmp_path / "two")
    assert manifest["processes"] == {
        "world_size": 2,
        "backend": "gloo",
        "global_batch_size": 64,
        "batch_size_per_process": [32, 32],
        "lr": 0.05,
        "sync_bn": True,
    }
    single = _manifest(tmp_path / "one")
    assert manifest["training"] == single["training"]
    assert single["processes"]["world_size"] == 1 and single["processes"]["sync_bn"] is None
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "manifest.json",
        "model.safetensors",
    ]


@pytest.mark.slow
def test_two_processes_train_pgd_at_with_awp_as_one_process_does(
    tmp_path: Path, one_thread: None
) -> None:
    """AWP's weight perturbation comes from the whole global batch's gradient on every process
    (each process's own part alone would make the replicas drift apart)."""
    args = [*PGD_AT, "--awp", "0.01"]
    done = _two_processes([*args, "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr
    one = _one_process(args, tmp_path / "one")
    assert _max_difference(load_file(tmp_path / "two" / "model.safetensors"), one) < TOLERANCE
    assert _manifest(tmp_path / "two")["training"]["add_ons"][0]["name"] == "awp"


# one epoch: fast AT's sign step turns float rounding (the processes sum BatchNorm's statistics
# in another order) into whole steps on pixels whose gradient is near zero, so over epochs two
# processes drift from one as float computations of training do
FAST_AT = ["--arch", "resnet8", "--arch-option", "width=4", "--data", "digits", "--seed", "3"]
FAST_AT += ["--method", "fast-at", "--eps", "0.1", "--epochs", "1", "--early-stop"]
FAST_AT += ["--batch-size", "62"]  # 200 held out: 1,238 samples, a last batch of 60
FREE_AT = [*MLP, "--method", "free-at", "--eps", "0.1", "--replays", "2", "--epochs", "2"]


@pytest.mark.parametrize("args", [FAST_AT, FREE_AT], ids=["fast-at", "free-at"])
def test_two_processes_train_fast_and_free_at_as_one_process_does(
    tmp_path: Path, one_thread: None, args: list[str]
) -> None:
    """Fast AT's step on synchronised batch statistics and its held-out check (the same decision
    on every process), free AT's replays and the perturbation each process carries for its own
    part of the batch: the model one process trains."""
    done = _two_processes([*args, "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr
    one = _one_process(args, tmp_path / "one")
    assert _max_difference(load_file(tmp_path / "two" / "model.safetensors"), one) < TOLERANCE
    assert _manifest(tmp_path / "two")["training"] == _manifest(tmp_path / "one")["training"]


def _worker(launcher: subprocess.Popen[str], rank: int) -> int:
    """The pid of the worker of a torchrun launcher that has ``rank``."""
    for _ in range(200):
        children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
        for pid in children:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank} found")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "killed"),
    [(["--method", "pgd-at", "--steps", "10"], 1), (["--method", "free-at", "--replays", "2"], 0)],
    ids=["pgd-at-rank-1-killed", "free-at-rank-0-killed"],
)
def test_a_killed_process_stops_the_run_with_one_sentence_and_the_run_resumes(
    tmp_path: Path, digits: DataSplits, one_thread: None, method: list[str], killed: int
) -> None:
    """The sentence is said once: by rank 0, or by the surviving process when rank 0 died.
    free-at: the resumed processes carry on with the perturbation the run carried."""
    out = tmp_path / "two"
    args = [*MLP, *method, "--eps", "0.1", "--epochs", "6"]
    launcher = subprocess.Popen(
        torchrun_command(
            ["--standalone", "--nproc_per_node", "2"],
            ["train", "--no-progress", *args, "--out", str(out)],
        ),
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (out / "resume.pt").exists():  # the first epoch is saved
            assert launcher.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(_worker(launcher, killed), signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=TIMEOUT_S)
    finally:
        launcher.kill()
    assert launcher.returncode != 0
    said = [line for line in stderr.splitlines() if line.startswith("robustlab:")]
    assert len(said) == 1, stderr
    kept = said[0].removeprefix(f"robustlab: stopped: {STOPPED_UNDER_TORCHRUN}; the state after ")
    assert re.fullmatch(
        rf"epoch \d+ stays in {re.escape(str(out / 'resume.pt'))}; run the same command again "
        "to resume",
        kept,
    ), said
    assert not (out / "manifest.json").exists()
    state = torch.load(out / "resume.pt", weights_only=True)
    assert 1 <= state["epoch"] < 6 and state["processes"]["world_size"] == 2

    # one process cannot take the run over: the world size changed
    steps, replays = (10, None) if "pgd-at" in method else (None, 2)
    cfg = TrainConfig(
        "mlp",
        "digits",
        method[1],
        eps=0.1,
        epochs=6,
        steps=steps,
        seed=3,
        replays=replays,
        arch_options={"width": 32},
    )
    with pytest.raises(RobustlabError, match=r"unfinished run of 2 process\(es\).* this run has 1"):
        train(cfg, out, splits=digits, progress=False)

    resumed = _two_processes([*args, "--out", str(out)])
    assert resumed.returncode == 0, resumed.stderr
    one = _one_process(args, tmp_path / "one")
    assert _max_difference(load_file(out / "model.safetensors"), one) < TOLERANCE


def test_two_nodes_with_sync_bn_train_a_batchnorm_model_as_one_process_does(
    tmp_path: Path, one_thread: None
) -> None:
    """Two torchrun launchers (one process each) meet on the loopback rendezvous; their
    BatchNorm statistics are the global batch's (--sync-bn)."""
    args = ["--arch", "resnet8", "--arch-option", "width=4", "--data", "digits", "--epochs", "1"]
    endpoint = f"127.0.0.1:{free_port()}"
    launcher = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d"]
    launcher += ["--rdzv_endpoint", endpoint, "--rdzv_id", "robustlab-test"]
    train = ["train", "--no-progress", *args, "--sync-bn", "--out", str(tmp_path / "two")]
    command = torchrun_command(launcher, train)
    nodes = [
        subprocess.Popen(
            command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        outputs = [node.communicate(timeout=TIMEOUT_S) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], [err for _, err in outputs]
    assert sum(out.count("trained resnet8 (standard)") for out, _ in outputs) == 1
    one = _one_process(args, tmp_path / "one")
    two = load_file(tmp_path / "two" / "model.safetensors")
    assert any("running_var" in k for k in two)  # BatchNorm statistics compared too
    assert _max_difference(two, one) < TOLERANCE
    processes = _manifest(tmp_path / "two")["processes"]
    assert processes["world_size"] == 2 and processes["sync_bn"] is True


def test_a_run_resumed_with_another_world_size_is_one_sentence(
    tmp_path: Path, digits: DataSplits
) -> None:
    cfg = TrainConfig("mlp", "digits", epochs=2, arch_options={"width": 8}, channels_last=False)
    train(cfg, tmp_path, splits=digits, progress=False, stop_after_epochs=1)
    state = torch.load(tmp_path / "resume.pt", weights_only=True)
    assert state["processes"] == {"world_size": 1, "sync_bn": None}
    state["processes"] = {"world_size": 2, "sync_bn": True}  # as 2 processes write it (slow test)
    torch.save(state, tmp_path / "resume.pt")
    with pytest.raises(
        RobustlabError,
        match=r"holds an unfinished run of 2 process\(es\) \(torchrun's world size\) and this "
        r"run has 1; resume it with 2 process\(es\) in all",
    ):
        train(cfg, tmp_path, splits=digits, progress=False)
    assert (tmp_path / "resume.pt").exists()


@pytest.mark.slow
def test_without_sync_bn_each_process_normalises_its_own_part(
    tmp_path: Path, one_thread: None
) -> None:
    args = ["--arch", "resnet8", "--arch-option", "width=4", "--data", "digits", "--epochs", "1"]
    done = _two_processes([*args, "--no-sync-bn", "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr
    one = _one_process(args, tmp_path / "one")
    assert _max_difference(load_file(tmp_path / "two" / "model.safetensors"), one) > 1e-3
    assert _manifest(tmp_path / "two")["processes"]["sync_bn"] is False


@pytest.mark.parametrize(
    ("samples", "batch", "world", "message"),
    [
        (3, 64, 4, "4 processes cannot share a training set of 3 samples"),
        (1438, 2, 4, "4 processes cannot share batches of 2 samples"),
        (1438, 64, 32, "the last batch of every epoch has 30 samples"),
    ],
)
def test_a_world_too_large_for_the_batches_is_one_sentence(
    samples: int, batch: int, world: int, message: str
) -> None:
    with pytest.raises(RobustlabError, match=message):
        check_shares(samples, batch, Processes(0, world, 0, "gloo"))
    check_shares(samples, batch, Processes(0, 1))  # one process takes any batch


def test_a_batch_regularizer_under_torchrun_is_one_sentence() -> None:
    two = Processes(0, 2, 0, "gloo")
    with pytest.raises(
        RobustlabError, match="the alignment regularizer is computed on the training"
    ):
        check_regularizers_for({"l1": 1e-4, "alignment": 0.1}, two)
    check_regularizers_for({"l1": 1e-4, "nuclear": 1e-3}, two)  # weights only: the same everywhere
    check_regularizers_for({"alignment": 0.1}, Processes())


@pytest.mark.slow
def test_more_processes_than_a_batch_is_one_sentence_under_torchrun(tmp_path: Path) -> None:
    done = _two_processes([*MLP, "--batch-size", "1", "--out", str(tmp_path / "two")])
    assert done.returncode != 0
    assert _errors(done.stderr) == [
        "robustlab: error: 2 processes cannot share batches of 1 samples (--batch-size is the "
        "global batch, split across the processes); use a batch size of at least 2 or fewer "
        "processes"
    ]


def _step(x: torch.Tensor, index: torch.Tensor, number: int, seed: int) -> Step:
    """A training step over ``x`` (positions ``index`` in the training set)."""
    model = nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(seed)
    return Step(model, opt, x, torch.zeros(len(x), dtype=torch.long), index, 0, number, 10, gen)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_draws_do_not_depend_on_how_the_batch_is_split(norm: str) -> None:
    x, index = torch.rand(6, 1, 4, 4), torch.tensor([5, 9, 2, 7, 0, 3])
    threat = ThreatModel(norm, 0.3)
    whole = _step(x, index, 4, seed=1)
    halves = [_step(x[i : i + 3], index[i : i + 3], 4, seed=1) for i in (0, 3)]
    assert torch.equal(
        whole.random_start(threat), torch.cat([h.random_start(threat) for h in halves])
    )
    assert torch.equal(whole.noise(), torch.cat([h.noise() for h in halves]))
    again = _step(x, index, 4, seed=1)
    assert torch.equal(again.random_start(threat), _step(x, index, 4, seed=1).random_start(threat))
    first = again.noise()
    assert not torch.equal(first, again.noise())  # a second draw of the step is a new one
    assert not torch.equal(first, _step(x, index, 5, seed=1).noise())  # another step
    assert not torch.equal(first, _step(x, index, 4, seed=2).noise())  # another seed
    assert not torch.equal(first[:1], first[1:2])  # every sample its own


def test_synchronised_batchnorm_shares_the_layers_state_and_puts_them_back() -> None:
    model = build_model("resnet8", 1, 10, 8, (0.0,), (1.0,), width=4)
    before = dict(model.named_modules())
    norms = {n: m for n, m in before.items() if isinstance(m, nn.BatchNorm2d)}
    with synchronised_batchnorm(model) as replaced:
        assert replaced == len(norms) > 0
        modules = dict(model.named_modules())
        for name, norm in norms.items():
            synced = modules[name]
            assert isinstance(synced, SyncedBatchNorm)
            assert synced.weight is norm.weight and synced.running_var is norm.running_var
        model.eval()
    assert dict(model.named_modules()) == before
    assert not any(m.training for m in norms.values())  # the mode set inside carries over


def _synced_layer_worker(rank: int, port: int, affine: bool, track: bool, out: str) -> None:
    """One of 2 gloo processes: its half of a batch through a SyncedBatchNorm, forward and
    backward; writes its output, input gradient, parameter gradients and running statistics."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        x, g, layer = _synced_layer_case(affine, track)
        model = nn.Sequential(layer)
        with synchronised_batchnorm(model) as replaced:  # shares the layer's parameters
            assert replaced == 1
            part = x.tensor_split(2)[rank].clone().requires_grad_(True)
            y = model(part)
            (y * g.tensor_split(2)[rank]).sum().backward()
        grads = {n: p.grad for n, p in layer.named_parameters()}
        saved = {"y": y.detach(), "dx": part.grad, "grads": grads}
        torch.save({**saved, "buffers": dict(layer.named_buffers())}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def _synced_layer_case(affine: bool, track: bool) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """A batch far from zero mean, an output gradient and a BatchNorm layer with its state."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, 5, 5, generator=gen) * 3 + 5
    g = torch.randn(12, 3, 5, 5, generator=gen)
    layer = nn.BatchNorm2d(3, affine=affine, track_running_stats=track)
    if affine:
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
            layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    if track:
        assert layer.running_mean is not None
        layer.running_mean.fill_(4.0)  # the shift the sums are taken about
    return x, g, layer


@pytest.mark.parametrize(("affine", "track"), [(True, True), (False, True), (True, False)])
def test_synced_batchnorm_on_two_processes_is_batchnorm_on_the_whole_batch(
    tmp_path: Path, affine: bool, track: bool
) -> None:
    """Each process's half of the output and of the input gradient, the sum of the processes'
    parameter gradients (what DDP averages x 2) and the running statistics equal one
    BatchNorm's on the whole batch (a layer using its own half's statistics fails)."""
    from torch.multiprocessing.spawn import spawn

    out = str(tmp_path / "half")
    spawn(_synced_layer_worker, args=(free_port(), affine, track, out), nprocs=2)  # type: ignore[no-untyped-call]
    halves = [torch.load(f"{out}.{r}") for r in range(2)]
    x, g, layer = _synced_layer_case(affine, track)
    x.requires_grad_(True)
    y = layer(x)
    (y * g).sum().backward()
    assert torch.allclose(torch.cat([h["y"] for h in halves]), y.detach(), atol=1e-5)
    assert x.grad is not None
    assert torch.allclose(torch.cat([h["dx"] for h in halves]), x.grad, atol=1e-5)
    for name, p in layer.named_parameters():
        assert p.grad is not None
        assert torch.allclose(
            halves[0]["grads"][name] + halves[1]["grads"][name], p.grad, atol=1e-4
        )
    for name, b in layer.named_buffers():
        for h in halves:
            assert torch.allclose(h["buffers"][name].double(), b.double(), atol=1e-5), name


class _SigtermAt(Hook):
    """Sends this process SIGTERM after step ``number``, as torchrun does to the survivors."""

    def __init__(self, number: int) -> None:
        self.number = number

    def after_step(self, step: Step) -> None:
        if step.number == self.number:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_stops_training_and_says_which_epoch_it_kept(
    tmp_path: Path, digits: DataSplits
) -> None:
    cfg = TrainConfig("mlp", "digits", epochs=3, arch_options={"width": 8}, channels_last=False)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunStopped) as stopped, stop_on_sigterm():
        train(cfg, tmp_path, splits=digits, progress=False, hooks=[_SigtermAt(30)])  # epoch 2
    assert stopped.value.kept == f"the state after epoch 1 stays in {tmp_path / 'resume.pt'}"
    assert signal.getsignal(signal.SIGTERM) == before
    assert torch.load(tmp_path / "resume.pt", weights_only=True)["epoch"] == 1

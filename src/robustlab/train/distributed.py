"""Training under torchrun: DistributedDataParallel replicas that give one process's training.

Every process draws the same seeded epoch order and takes its contiguous part of each global
batch (``--batch-size`` is the global batch); it crafts adversarial examples on its part only,
with per-sample random draws (``Step.sample_seeds``), and scales its mean loss by its share of
the batch so that DDP's average of the gradients is the gradient of the global batch's mean.
BatchNorm layers normalise with the whole global batch's statistics when ``sync_bn`` is on (what
one process does), with each process's part when it is off (torch DDP's own default).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from ..core.distributed import Processes
from ..errors import RobustlabError
from .compression import BATCH_PENALTIES


def check_shares(samples: int, batch_size: int, processes: Processes) -> None:
    """Refuse, in one sentence, a world whose processes would not each get at least one sample
    of every global batch of an epoch (``samples`` training samples in batches of
    ``batch_size``)."""
    world = processes.world_size
    if world == 1:
        return
    if world > samples:
        raise RobustlabError(
            f"{world} processes cannot share a training set of {samples} samples: each needs "
            f"at least one sample of every batch; use at most {samples} processes"
        )
    if world > batch_size:
        raise RobustlabError(
            f"{world} processes cannot share batches of {batch_size} samples (--batch-size is "
            f"the global batch, split across the processes); use a batch size of at least "
            f"{world} or fewer processes"
        )
    last = samples % batch_size
    if 0 < last < world:
        raise RobustlabError(
            f"the last batch of every epoch has {last} samples ({samples} training samples in "
            f"batches of {batch_size}), fewer than the {world} processes that must share it; "
            "choose a batch size that leaves at least one sample per process, or fewer processes"
        )


def check_regularizers_for(strengths: Mapping[str, float], processes: Processes) -> None:
    """Refuse, in one sentence, a regulariser computed on each process's part of the batch under
    torchrun: each process would add another gradient and the replicas would drift apart."""
    batch = [name for name, value in strengths.items() if value and name in BATCH_PENALTIES]
    if processes.distributed and batch:
        raise RobustlabError(
            f"the {batch[0]} regularizer is computed on the training batch, and under torchrun "
            "on each process's part of it, which is not supported yet; train it with one process"
        )


def batch_sizes(batch_size: int, processes: Processes) -> list[int]:
    """How many samples of a full global batch each process takes (rank 0 first)."""
    return [len(part) for part in torch.arange(batch_size).tensor_split(processes.world_size)]


def effective_sync_bn(sync_bn: bool, processes: Processes) -> bool | None:
    """Whether BatchNorm statistics are synchronised across processes (None: one process, where
    they are the global batch's anyway)."""
    return sync_bn if processes.distributed else None


def processes_record(
    processes: Processes, batch_size: int, lr: float, sync_bn: bool
) -> dict[str, Any]:
    """The manifest's account of the processes a model was trained with: world size, backend,
    the global batch (``--batch-size``) and each process's part of it, the peak learning rate
    (for the global batch: it is not rescaled with the world size) and whether BatchNorm
    statistics were synchronised."""
    return {
        **processes.as_dict(),
        "global_batch_size": batch_size,
        "batch_size_per_process": batch_sizes(batch_size, processes),
        "lr": lr,
        "sync_bn": effective_sync_bn(sync_bn, processes),
    }


class _GlobalNorm(torch.autograd.Function):
    """``x`` normalised with statistics of the global batch, as BatchNorm's own kernels do it;
    the backward pass sums its two per-channel reductions over the processes (one all-reduce)
    and applies BatchNorm's training-mode input gradient with them."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mean: torch.Tensor,
        var: torch.Tensor,
        eps: float,
        count: float,
        group: Any,
    ) -> torch.Tensor:
        """BatchNorm's affine transform of ``x`` with the given mean and (biased) variance."""
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps, ctx.count, ctx.group = eps, count, group
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Gradients of the input (global reductions), weight and bias (this process's part:
        DDP sums those)."""
        (dy,) = grads
        x, weight, mean, var = ctx.saved_tensors
        dims = [0, *range(2, x.dim())]
        shape = [1, -1, *[1] * (x.dim() - 2)]
        features = x.shape[1]
        invstd = torch.rsqrt(var + ctx.eps)
        centred = x - mean.view(shape)
        local = torch.cat([dy.sum(dims), (centred * dy).sum(dims)])
        sums = local.clone()
        dist.all_reduce(sums, group=ctx.group)
        sum_dy, dot = sums[:features], sums[features:]
        scale = invstd if weight is None else invstd * weight
        k = dot * invstd * invstd / ctx.count
        dx = (dy - (sum_dy / ctx.count).view(shape) - centred * k.view(shape)) * scale.view(shape)
        grad_weight = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = local[features:] * invstd
        grad_bias = local[:features] if ctx.needs_input_grad[2] else None
        return dx, grad_weight, grad_bias, None, None, None, None, None


class SyncedBatchNorm(_BatchNorm):
    """BatchNorm whose training-mode statistics are those of the whole global batch, summed over
    every process; on any device and backend (torch's ``SyncBatchNorm`` refuses CPU tensors,
    whose fused statistics kernels are CUDA-only). Eval mode, or one process, is plain
    BatchNorm.

    One all-reduce per forward pass and one per backward pass, over ``group`` (a process group
    of its own, so that it does not queue behind DDP's gradient buckets). Forward: the count,
    the sum and the sum of squares of the input shifted by the running mean (which every
    process holds alike, so the one-pass variance has no cancellation to speak of), taken in
    the input's precision as BatchNorm's own sums are and combined in float64; then BatchNorm's
    own kernel normalises. Backward (:class:`_GlobalNorm`): BatchNorm's input gradient with
    the global sums of the output gradient and of its product with the centred input."""

    group: Any = None  # the process group the statistics are summed over (None: the default)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        """Any batch of at least two dimensions (samples, channels, ...)."""
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise with the global batch's mean and (biased) variance; update the running
        statistics as BatchNorm does (unbiased variance, momentum or cumulative average)."""
        self._check_input_dim(input)
        synced = self.training and dist.is_available() and dist.is_initialized()
        if not synced or dist.get_world_size(self.group) == 1:
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1, *[1] * (input.dim() - 2)]
        features = input.shape[1]
        with torch.no_grad():
            shift = (
                self.running_mean.to(input.dtype)
                if self.running_mean is not None
                else input.new_zeros(features)
            )
            moved = input - shift.view(shape)
            local = torch.full(
                (1,), input.numel() // features, dtype=torch.float64, device=input.device
            )
            totals = torch.cat(
                [moved.sum(dims).double(), (moved * moved).sum(dims).double(), local]
            )
            dist.all_reduce(totals, group=self.group)
            count = float(totals[-1])
            offset = totals[:features] / count
            var64 = (totals[features : 2 * features] / count - offset * offset).clamp_min(0)
            mean = (shift.to(torch.float64) + offset).to(input.dtype)
            var = var64.to(input.dtype)
        weight = self.weight if self.affine else None
        bias = self.bias if self.affine else None
        out: torch.Tensor = _GlobalNorm.apply(  # type: ignore[no-untyped-call]
            input, weight, bias, mean, var, self.eps, count, self.group
        )
        if self.track_running_stats and self.running_mean is not None:
            self._update_running(mean, var, count)
        return out

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        """Running statistics as ``F.batch_norm`` keeps them, from the global batch's."""
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        tracked = float(self.num_batches_tracked)
        factor = 1.0 / tracked if self.momentum is None else self.momentum
        unbiased = var * (count / max(count - 1.0, 1.0))
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)


def _synced_copy(norm: _BatchNorm, device: torch.device) -> _BatchNorm:
    """A synchronised BatchNorm sharing ``norm``'s parameters and buffers (torch's fused
    ``SyncBatchNorm`` on CUDA, ``SyncedBatchNorm`` elsewhere)."""
    cls: type[_BatchNorm] = nn.SyncBatchNorm if device.type == "cuda" else SyncedBatchNorm
    synced = cls(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats)
    synced.weight, synced.bias = norm.weight, norm.bias
    synced.running_mean, synced.running_var = norm.running_mean, norm.running_var
    synced.num_batches_tracked = norm.num_batches_tracked
    synced.train(norm.training)
    return synced


@contextmanager
def synchronised_batchnorm(model: nn.Module) -> Iterator[int]:
    """For the block, every BatchNorm layer of ``model`` is replaced by a synchronised one that
    shares its weights and running statistics; the original layers are put back afterwards,
    also on errors. Yields how many layers were replaced. Under torchrun off CUDA, the layers
    sum their statistics over a process group of their own, made here on every process alike
    and destroyed on the way out."""
    swapped: list[tuple[nn.Module, str, _BatchNorm, _BatchNorm]] = []
    state = [*model.parameters(), *model.buffers()]
    device = state[0].device if state else torch.device("cpu")
    group = (
        dist.new_group(backend="gloo")
        if device.type != "cuda" and dist.is_available() and dist.is_initialized()
        else None
    )
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm) and not isinstance(
                child, (nn.SyncBatchNorm, SyncedBatchNorm)
            ):
                synced = _synced_copy(child, device)
                if isinstance(synced, SyncedBatchNorm):
                    synced.group = group
                setattr(parent, name, synced)
                swapped.append((parent, name, child, synced))
    try:
        yield len(swapped)
    finally:
        for parent, name, original, synced in swapped:
            original.train(synced.training)
            setattr(parent, name, original)
        if group is not None:
            dist.destroy_process_group(group)


@dataclass
class Replicas:
    """The model as the training loop drives it: ``forward`` is what the loss runs through (the
    DDP wrapper under torchrun, else the model itself), ``processes`` says which part of every
    global batch is this process's."""

    model: nn.Module
    forward: nn.Module
    processes: Processes

    @classmethod
    def single(cls, model: nn.Module) -> Replicas:
        """One process: the whole batch, the model itself."""
        return cls(model, model, Processes())

    def share(self, index: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This process's contiguous part of a global batch (positions in the training set) and
        the factor its mean loss is scaled by (its part's size x world size / batch size) so
        that DDP's average of the gradients is the gradient of the whole batch's mean loss."""
        world = self.processes.world_size
        if world == 1:
            return index, 1.0
        part = index.tensor_split(world)[self.processes.rank]
        return part, len(part) * world / len(index)

    def rows(self, size: int) -> slice:
        """Where this process's part (``share``) sits in a global batch of ``size`` samples."""
        world = self.processes.world_size
        if world == 1:
            return slice(0, size)
        sizes = [len(part) for part in torch.arange(size).tensor_split(world)]
        start = sum(sizes[: self.processes.rank])
        return slice(start, start + sizes[self.processes.rank])

    def batch_losses(self, scaled: torch.Tensor) -> torch.Tensor:
        """The mean loss of each global batch, from every process's scaled mean losses."""
        if not self.processes.distributed:
            return scaled
        total = scaled.detach().clone()
        dist.all_reduce(total)
        return total / self.processes.world_size

    def check_identical(self, epoch: int) -> None:
        """Every process must hold the same weights after an epoch (DDP keeps them so); an
        add-on that changed the gradients of one process only would make them drift apart."""
        if not self.processes.distributed:
            return
        with torch.no_grad():
            total = sum(p.detach().double().sum() for p in self.model.parameters())
            mine = torch.as_tensor(total, dtype=torch.float64).reshape(1).cpu()
        if self.processes.backend == "nccl":
            mine = mine.cuda()
        every = [torch.zeros_like(mine) for _ in range(self.processes.world_size)]
        dist.all_gather(every, mine)
        if any(not torch.equal(t, every[0]) for t in every):
            raise RobustlabError(
                f"the processes' weights differ after epoch {epoch}: something changed the "
                "gradients of one process only (an add-on that is not distributed-aware?)"
            )


@contextmanager
def replicate(
    model: nn.Module, processes: Processes, *, sync_bn: bool = True
) -> Iterator[Replicas]:
    """The replicas of ``model`` for the block: under torchrun a DDP wrapper (BatchNorm layers
    synchronised first when ``sync_bn``), whose processes leave the block with rank 0's
    buffers (per-process BatchNorm statistics differ otherwise); one process: the model."""
    if not processes.distributed:
        yield Replicas.single(model)
        return
    device = next(model.parameters()).device
    with synchronised_batchnorm(model) if sync_bn else _nothing():
        # synchronised statistics are alike on every process: no broadcast of buffers per pass
        wrapped = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=not sync_bn,
        )
        yield Replicas(model, cast(nn.Module, wrapped), processes)
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


@contextmanager
def _nothing() -> Iterator[int]:
    """No BatchNorm layer replaced."""
    yield 0

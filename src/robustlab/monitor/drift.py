"""Drift monitoring: each incoming batch is compared with a reference window of held-out
inputs, statistic by statistic, with one stated per-batch false-alarm rate alpha.

The statistics (``BUILTIN``) look at the inputs (per-image mean, std and intensity histogram),
at the model's outputs (top softmax probability, predicted classes) and at its penultimate
features (``models.structure``): squared MMD and the largest per-dimension KS distance. Each
gets a permutation p-value and a Westfall-Young min-P adjusted p-value over all of them
(``drift_stats``), and a statistic alarms when its adjusted p-value is <= alpha: a batch drawn
from the reference's distribution raises any alarm with probability at most alpha.

More statistics plug in as per-input scores (``InputScore``): any function from inputs to one
number per input, e.g. a fitted adversarial-input detector's score, is monitored with a KS
test like the confidence and enters the same correction, so alpha stays the rate of any alarm.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.guard import evaluating
from ..errors import RobustlabError
from ..models.structure import features_and_output
from .drift_stats import (
    assignments,
    chi2_counts,
    chi2_mean,
    ks_distance,
    ks_max,
    median_bandwidth,
    min_p_adjusted,
    mmd2,
)

#: A per-input score: inputs (N, C, H, W) in [0, 1] -> (N,) numbers (e.g. a detector's score).
InputScore = Callable[[torch.Tensor], torch.Tensor]

#: The built-in statistics: name -> (test, what it looks at).
BUILTIN: dict[str, tuple[str, str]] = {
    "input_mean": ("ks", "per-image mean intensity"),
    "input_std": ("ks", "per-image intensity standard deviation"),
    "intensity_histogram": ("chi2-mean", "per-image intensity histogram on [0, 1]"),
    "confidence": ("ks", "top softmax probability"),
    "predicted_classes": ("chi2-counts", "predicted class"),
    "feature_mmd": ("mmd", "penultimate features"),
    "feature_ks": ("ks-max", "penultimate features, each dimension"),
}
SCORE_PREFIX = "score:"  # the name of a plugged-in per-input score in records


@dataclass(frozen=True)
class DriftConfig:
    """How batches are tested: alpha (the per-batch probability of any alarm on a batch from
    the reference's distribution), permutations per batch, histogram bins, seed, how many
    inputs one forward pass takes, and the most reference inputs kept (a seeded random subset
    of a larger window: the MMD's kernel matrix grows with its square)."""

    alpha: float = 0.05
    permutations: int = 500
    bins: int = 16
    seed: int = 0
    chunk: int = 256
    max_reference: int = 1000

    def __post_init__(self) -> None:
        """Refuse settings under which the stated false-alarm rate means nothing."""
        if isinstance(self.alpha, bool) or not 0.0 < float(self.alpha) < 1.0:
            raise RobustlabError(
                f"alpha (the per-batch false-alarm rate) must be in (0, 1), got {self.alpha}"
            )
        if self.permutations < 1 or (1.0 / (self.permutations + 1)) > self.alpha:
            need = int(1.0 / self.alpha)
            raise RobustlabError(
                f"{self.permutations} permutations cannot give a p-value <= alpha={self.alpha} "
                f"(the smallest is 1/(permutations + 1)): use at least {need}, better "
                f"{20 * need}"
            )
        if self.bins < 2:
            raise RobustlabError(f"the intensity histogram needs at least 2 bins, got {self.bins}")
        if self.max_reference < 2:
            raise RobustlabError(
                f"the reference window needs at least 2 inputs, max_reference is {self.max_reference}"
            )
        if self.chunk < 1:
            raise RobustlabError(f"chunk must be at least 1 input, got {self.chunk}")


@dataclass(frozen=True)
class Profile:
    """What the monitor keeps of each input: image summaries, the model's confidence and
    prediction, its penultimate features, and any plugged-in scores."""

    mean: torch.Tensor
    std: torch.Tensor
    hist: torch.Tensor
    confidence: torch.Tensor
    predicted: torch.Tensor
    features: torch.Tensor
    scores: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        """Number of inputs."""
        return int(self.mean.shape[0])

    def joined(self, other: Profile) -> Profile:
        """This profile followed by another (the pooled reference + batch)."""
        return Profile(
            torch.cat([self.mean, other.mean]),
            torch.cat([self.std, other.std]),
            torch.cat([self.hist, other.hist]),
            torch.cat([self.confidence, other.confidence]),
            torch.cat([self.predicted, other.predicted]),
            torch.cat([self.features, other.features]),
            {k: torch.cat([v, other.scores[k]]) for k, v in self.scores.items()},
        )


def _image_summaries(x: torch.Tensor, bins: int) -> tuple[torch.Tensor, ...]:
    """Per-image mean, std and intensity histogram (fractions of pixels per bin on [0, 1])."""
    flat = x.reshape(x.shape[0], -1).to(torch.float64)
    which = (flat.clamp(0.0, 1.0) * bins).long().clamp_max(bins - 1)
    hist = torch.nn.functional.one_hot(which, bins).to(torch.float64).mean(dim=1)
    return flat.mean(dim=1), flat.std(dim=1, correction=0), hist


def profile(
    model: nn.Module,
    x: torch.Tensor,
    *,
    bins: int = 16,
    scores: Mapping[str, InputScore] | None = None,
    chunk: int = 256,
) -> Profile:
    """The per-input profile of inputs ``x`` (on the model's device), kept on the CPU."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    parts: list[tuple[torch.Tensor, ...]] = []
    with evaluating(model), torch.inference_mode():
        for xc in torch.split(x, chunk):
            feats, out = features_and_output(model, xc.to(device))
            if not isinstance(out, torch.Tensor) or out.dim() != 2:
                raise RobustlabError(
                    "drift monitoring needs a model whose output is one row of logits per input"
                )
            probs = torch.softmax(out.double(), dim=1)
            conf, pred = probs.max(dim=1)
            parts.append(
                (*_image_summaries(xc, bins), conf, pred, feats.reshape(len(xc), -1).double())
            )
    cols = [torch.cat([p[i] for p in parts]).cpu() for i in range(6)]
    scored = {}
    for name, score in (scores or {}).items():
        value = torch.as_tensor(score(x)).detach().reshape(-1).double().cpu()
        if value.shape[0] != x.shape[0]:
            raise RobustlabError(
                f"the score '{name}' gave {value.shape[0]} values for {x.shape[0]} inputs; a "
                "monitored score gives one number per input"
            )
        scored[name] = value
    mean, std, hist, confidence, predicted, features = cols
    return Profile(mean, std, hist, confidence, predicted, features, scored)


@dataclass(frozen=True)
class StatResult:
    """One statistic on one batch: its test, value, raw and adjusted p-values, and alarm."""

    test: str
    value: float
    p_value: float
    adjusted_p: float
    alarm: bool

    def to_dict(self) -> dict[str, Any]:
        """As a JSON line gives it."""
        return {
            "test": self.test,
            "value": self.value,
            "p_value": self.p_value,
            "adjusted_p": self.adjusted_p,
            "alarm": self.alarm,
        }


@dataclass(frozen=True)
class BatchCheck:
    """A batch compared with the reference window: each statistic, and whether any alarmed."""

    index: int
    size: int
    statistics: dict[str, StatResult]
    mean_confidence: float
    accuracy: float | None = None

    @property
    def alarm(self) -> bool:
        """Whether any statistic alarmed."""
        return any(s.alarm for s in self.statistics.values())

    @property
    def alarms(self) -> list[str]:
        """The statistics that alarmed."""
        return [name for name, s in self.statistics.items() if s.alarm]

    def to_dict(self) -> dict[str, Any]:
        """The batch's JSON line (without what the stream adds: shift, points)."""
        out: dict[str, Any] = {
            "kind": "drift_batch",
            "batch": self.index,
            "size": self.size,
            "alarm": self.alarm,
            "alarms": self.alarms,
            "min_adjusted_p": min(s.adjusted_p for s in self.statistics.values()),
            "mean_confidence": self.mean_confidence,
            "statistics": {name: s.to_dict() for name, s in self.statistics.items()},
        }
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy
        return out


class DriftMonitor:
    """Compares batches with a reference window of inputs the model did not train on."""

    def __init__(
        self,
        model: nn.Module,
        reference: torch.Tensor,
        config: DriftConfig | None = None,
        *,
        num_classes: int | None = None,
        scores: Mapping[str, InputScore] | None = None,
    ) -> None:
        """Profile the reference window once (``scores``: plugged-in per-input scores, by
        name; ``num_classes``: the model's, else read from its output)."""
        self.config = config or DriftConfig()
        if reference.dim() != 4 or reference.shape[0] < 2:
            raise RobustlabError(
                "the reference window must be at least 2 images (N, C, H, W), got shape "
                f"{tuple(reference.shape)}"
            )
        self.model = model
        self.input_shape = tuple(int(s) for s in reference.shape[1:])
        self.scores = dict(scores or {})
        if reference.shape[0] > self.config.max_reference:
            gen = torch.Generator().manual_seed(self.config.seed)
            keep = torch.randperm(reference.shape[0], generator=gen)[: self.config.max_reference]
            reference = reference[keep.sort().values]
        self.reference = profile(
            model, reference, bins=self.config.bins, scores=self.scores, chunk=self.config.chunk
        )
        self.num_classes = num_classes or int(self.reference.predicted.max()) + 1
        self.bandwidth = median_bandwidth(self.reference.features)

    @property
    def statistics(self) -> dict[str, tuple[str, str]]:
        """Every monitored statistic: name -> (test, what it looks at)."""
        extra = {f"{SCORE_PREFIX}{k}": ("ks", f"the score '{k}' per input") for k in self.scores}
        return {**BUILTIN, **extra}

    def check_shape(self, x: torch.Tensor, what: str = "the batch") -> None:
        """Refuse inputs of another shape than the reference window's, in one sentence."""
        shape = tuple(int(s) for s in x.shape[1:])
        if x.dim() != 4 or shape != self.input_shape:
            have = "x".join(map(str, shape)) if x.dim() == 4 else f"shape {tuple(x.shape)}"
            raise RobustlabError(
                f"{what} has {have} inputs but the reference window has "
                f"{'x'.join(map(str, self.input_shape))}: a monitor compares inputs of one shape"
            )

    def check(
        self, x: torch.Tensor, index: int = 0, labels: torch.Tensor | None = None
    ) -> BatchCheck:
        """Test one batch against the reference window (``index``: its place in the stream,
        which seeds its permutations; ``labels``: only to report the batch's accuracy)."""
        self.check_shape(x)
        if x.shape[0] < 2:
            raise RobustlabError(f"a batch needs at least 2 inputs, got {x.shape[0]}")
        cfg = self.config
        batch = profile(self.model, x, bins=cfg.bins, scores=self.scores, chunk=cfg.chunk)
        pooled = self.reference.joined(batch)
        gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + index) % (1 << 63))
        member = assignments(len(self.reference), len(batch), cfg.permutations, gen)
        columns = [
            ks_distance(pooled.mean, member),
            ks_distance(pooled.std, member),
            chi2_mean(pooled.hist, member),
            ks_distance(pooled.confidence, member),
            chi2_counts(pooled.predicted, self.num_classes, member),
            mmd2(pooled.features, member, self.bandwidth),
            ks_max(pooled.features, member),
            *(ks_distance(pooled.scores[k], member) for k in self.scores),
        ]
        tested = min_p_adjusted(torch.stack(columns, dim=1), gen)
        results = {}
        for j, (name, (test, _)) in enumerate(self.statistics.items()):
            adjusted = float(tested.adjusted[j])
            results[name] = StatResult(
                test,
                float(tested.values[j]),
                float(tested.p_values[j]),
                adjusted,
                adjusted <= cfg.alpha,
            )
        accuracy = None
        if labels is not None:
            accuracy = float((batch.predicted == labels.cpu()).double().mean())
        return BatchCheck(index, len(batch), results, float(batch.confidence.mean()), accuracy)


def drift_summary(
    lines: Sequence[Mapping[str, Any]], statistics: Sequence[str], alpha: float
) -> dict[str, Any]:
    """What a run's batch lines add up to: the share of batches alarmed without a shift (the
    measured false-alarm rate, to compare with alpha) and with one (the detection rate), per
    statistic and for any alarm, how many batches after the onset the first alarm came, and
    the per-batch series a report plots."""
    shifted = [bool(line.get("shifted")) for line in lines]
    alarm = [bool(line["alarm"]) for line in lines]

    def share(flags: Sequence[bool], among: Sequence[bool]) -> float | None:
        """The share of the batches in ``among`` whose flag is set (None if there are none)."""
        picked = [f for f, a in zip(flags, among, strict=True) if a]
        return sum(picked) / len(picked) if picked else None

    clean = [not s for s in shifted]
    per_stat = {}
    for name in statistics:
        flags = [bool(line["statistics"][name]["alarm"]) for line in lines]
        per_stat[name] = {
            "alarms": sum(flags),
            "alarmed_clean": share(flags, clean),
            "alarmed_shifted": share(flags, shifted),
        }
    onset = next((i for i, s in enumerate(shifted) if s), None)
    first = None if onset is None else next((i for i in range(onset, len(lines)) if alarm[i]), None)
    return {
        "batches": len(lines),
        "clean_batches": sum(clean),
        "shifted_batches": sum(shifted),
        "alarmed": sum(alarm),
        "false_alarm_rate": share(alarm, clean),
        "detection_rate": share(alarm, shifted),
        "onset_batch": onset,
        "first_alarm_after_onset": first,
        "delay_batches": None if onset is None or first is None else first - onset,
        "per_statistic": per_stat,
        "series": {
            "batch": [int(line["batch"]) for line in lines],
            "shifted": shifted,
            "alarm": alarm,
            "adjusted_p": {
                name: [float(line["statistics"][name]["adjusted_p"]) for line in lines]
                for name in statistics
            },
        },
    }

"""Backdoor scans of a training split with a model trained on it: activation clustering
(Chen et al. 2018) and spectral signatures (Tran et al. 2018), each flagging training samples
and the class(es) they target.

Both read the penultimate features (the classifier head's input, ``models.structure``) of
every training sample, in eval mode, grouped by the training label (a poisoned sample carries
the target's label, so the poison hides inside the target class).

- **Label agreement (ours)**: a stand-in for Chen et al.'s exclusionary reclassification
  (retrain without a suspicious group and ask whether the new model gives the group its
  label, a training per group). Here the group is left out of the training split and each of
  its samples is "reclassified" by its ``neighbours`` = 10 nearest remaining samples in input
  space (Euclidean on the pixels): the group's agreement is the mean share of those that carry
  its label. Dirty-label poison looks like its source classes and carries the target's label:
  on mnist5k (5 %, 3x3 patch, resnet8) the poisoned cluster of the target class agrees 0.04,
  while the natural sub-populations under 35 % of their class (slanted ones, crossed sevens)
  agree 0.87 and 0.77. Leaving the group out matters: poisoned samples share the trigger, so
  with the group in, they are each other's nearest neighbours (on 8x8 digits a 3x3 patch is
  14 % of the pixels and decides the nearest neighbours).
- **Activation clustering**: per class, the features reduced to ``dims`` = 10 dimensions by
  PCA (Chen et al. use ICA; PCA is deterministic and ranks the directions), then 2-means
  (k-means++, 10 starts). Chen et al.'s relative-size criterion: the smaller cluster is
  flagged only when it holds less than ``max_share`` = 35 % of its class, and (ours) its label
  agreement is below ``min_agreement`` = 0.5 (most of its neighbours carry other labels). IBM
  ART's default rule ("smaller") flags the smaller cluster of every class, so a clean class
  always loses samples; the size rule alone still flags natural sub-populations, which agree
  with their label and are left alone here. Scores per class: the smaller cluster's share,
  its label agreement and the split's silhouette (Chen et al.'s second criterion, reported).
- **Spectral signatures**: per class, the features centred on the class mean, their top right
  singular vector ``v`` and each sample's score ``((r - mean) . v)^2``. Tran et al. remove the
  ``ceil(1.5 eps n)`` highest scores of every class, ``eps`` the expected poisoning rate; here
  ``eps`` is a share of the whole training split of ``n`` samples (the unit of ``robustlab
  poison --rate``: an all-to-one attack puts its whole budget into one class), at most all of
  a class. Removing them from clean classes costs clean data for nothing, so only suspect
  classes lose them. **The rule (ours)**: a class is suspect when the label agreement of its
  ``ceil(eps n)`` highest scores (at most half the class: the samples most likely to be the
  poison, if there is any) is below ``min_agreement`` and an outlier among the classes, a
  robust z-score ``(a - median) / (1.4826 MAD)`` below ``-z_suspect`` = -3.5 (Iglewicz and
  Hoaglin's cut-off for outliers); with fewer than 3 classes only the first test counts. (The
  spectral concentration ``sigma_1^2 / sum sigma_j^2`` did not single out the target class on
  mnist5k, so it is reported, not used.)
- ``flagged`` of a scan: the union of both methods' flags (each method's own is kept too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.checks import check_whole
from ..core.guard import evaluating
from ..data.dataset import Dataset
from ..errors import RobustlabError
from ..models.structure import penultimate_features

METHODS = ("activation_clustering", "spectral_signatures")
MIN_CLASS_SAMPLES = 4  # a class with fewer training samples is not clustered (no meaningful split)
MAD_SCALE = 1.4826  # MAD of a normal sample * this = its standard deviation


@dataclass(frozen=True)
class ScanConfig:
    """The scans' settings (module doc): AC's dimensions and size rule, the expected rate and
    removal factor of spectral signatures, its suspicion cut-off, the seed of 2-means."""

    dims: int = 10
    max_share: float = 0.35
    neighbours: int = 10
    min_agreement: float = 0.5
    expected_rate: float = 0.05
    removal_factor: float = 1.5
    z_suspect: float = 3.5
    methods: tuple[str, ...] = METHODS
    batch_size: int = 500
    seed: int = 0

    def check(self) -> None:
        """Refuse, in one sentence, a setting the scans cannot run with."""
        check_whole(self.dims, "the reduced dimensions")
        if not 0.0 < float(self.max_share) <= 0.5:
            raise RobustlabError(
                f"the cluster share that flags must be in (0, 0.5] (the smaller of two clusters "
                f"holds at most half), got {self.max_share}"
            )
        if not 0.0 < float(self.expected_rate) < 1.0:
            raise RobustlabError(
                "the expected poisoning rate must be a share strictly between 0 and 1 of the "
                f"training split, got {self.expected_rate}"
            )
        check_whole(self.neighbours, "the number of neighbours")
        if not 0.0 < float(self.min_agreement) <= 1.0:
            raise RobustlabError(
                f"the label agreement that clears a cluster must be in (0, 1], got {self.min_agreement}"
            )
        if not float(self.removal_factor) > 0.0:
            raise RobustlabError(f"the removal factor must be > 0, got {self.removal_factor}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise RobustlabError(
                f"unknown scan method {', '.join(unknown) or '(none given)'}; use "
                f"{' and/or '.join(METHODS)}"
            )
        check_whole(self.batch_size, "the batch size")


def training_features(
    model: nn.Module, data: Dataset, batch_size: int = 500, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """The flattened penultimate features (N x D, float64 on the CPU) of every sample, in eval
    mode without gradients (the model's modes are restored)."""
    parts: list[torch.Tensor] = []
    with torch.inference_mode(), evaluating(model):
        for i in range(0, len(data), batch_size):
            x = data.x[i : i + batch_size].to(device)
            parts.append(penultimate_features(model, x).flatten(1).to("cpu", torch.float64))
    if not parts:
        raise RobustlabError(f"{data.name} has no samples to scan")
    return torch.cat(parts)


class Neighbours:
    """Label agreement of training samples with their nearest neighbours in input space
    (Euclidean distance on the pixels), the samples under suspicion left out (module doc)."""

    def __init__(self, data: Dataset, k: int = 10, chunk: int = 512) -> None:
        """Keep the flattened images, their squared norms and the labels."""
        self.x = data.x.flatten(1).to("cpu", torch.float32)
        self.sq = (self.x * self.x).sum(1)
        self.y = data.y.cpu()
        self.k = k
        self.chunk = chunk

    def agreement(self, members: np.ndarray, label: int) -> float:
        """The mean, over ``members`` (indices), of the share of each one's ``k`` nearest
        samples outside ``members`` that carry ``label``; 1 when nothing is left outside."""
        left = len(self.y) - len(members)
        k = min(self.k, left)
        if k < 1 or len(members) == 0:
            return 1.0
        rows_all = torch.from_numpy(np.asarray(members, dtype=np.int64))
        total = 0.0
        for i in range(0, len(rows_all), self.chunk):
            rows = rows_all[i : i + self.chunk]
            xr = self.x[rows]
            d = self.sq[rows, None] - 2.0 * xr @ self.x.T + self.sq[None, :]
            d[:, rows_all] = float("inf")
            near = d.topk(k, dim=1, largest=False).indices
            total += float((self.y[near] == label).double().mean(1).sum())
        return total / len(rows_all)


@dataclass
class MethodResult:
    """One method's verdict: the flagged indices (into the scanned split), the suspected
    target classes and per-class scores."""

    method: str
    flagged: list[int]
    suspected_classes: list[int]
    classes: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """As the JSON record has it."""
        return {
            "flagged": self.flagged,
            "flagged_count": len(self.flagged),
            "suspected_classes": self.suspected_classes,
            "classes": self.classes,
            "settings": self.settings,
        }


def _two_means(z: np.ndarray, seed: int) -> np.ndarray:
    """Cluster labels (0/1) of 2-means on the rows of z (k-means++, 10 starts)."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=2, n_init=10, random_state=seed)
    return np.asarray(km.fit_predict(z), dtype=np.int64)


def _reduced(f: np.ndarray, dims: int) -> np.ndarray:
    """The rows of f projected on their top ``dims`` principal directions (centred)."""
    centred = f - f.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return np.asarray(centred @ vt[: min(dims, vt.shape[0])].T)


def _silhouette(z: np.ndarray, labels: np.ndarray, seed: int) -> float | None:
    """The mean silhouette of a 2-cluster split (on at most 2,000 rows), None if undefined."""
    from sklearn.metrics import silhouette_score

    if len(np.unique(labels)) < 2 or len(z) < 3:
        return None
    size = min(len(z), 2000)
    return float(silhouette_score(z, labels, sample_size=size, random_state=seed))


def activation_clustering(
    features: torch.Tensor,
    labels: torch.Tensor,
    neighbours: Neighbours,
    num_classes: int,
    config: ScanConfig,
) -> MethodResult:
    """Chen et al.'s activation clustering with the relative-size rule, confirmed by label
    agreement (module doc)."""
    f_all = features.numpy()
    y = labels.numpy()
    flagged: list[int] = []
    suspects: list[int] = []
    rows: list[dict[str, Any]] = []
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)
        row: dict[str, Any] = {"class": c, "n": int(len(idx))}
        if len(idx) < MIN_CLASS_SAMPLES:
            rows.append(
                {**row, "smaller_share": None, "agreement": None, "silhouette": None, "flagged": 0}
            )
            continue
        z = _reduced(f_all[idx], config.dims)
        assign = _two_means(z, config.seed)
        counts = np.bincount(assign, minlength=2)
        small = int(np.argmin(counts))
        share = float(counts[small] / len(idx))
        agreed = neighbours.agreement(idx[assign == small], c)
        hit = 0 < share < config.max_share and agreed < config.min_agreement
        if hit:
            flagged.extend(int(i) for i in idx[assign == small])
            suspects.append(c)
        rows.append(
            {
                **row,
                "smaller_share": share,
                "agreement": agreed,
                "silhouette": _silhouette(z, assign, config.seed),
                "flagged": int(counts[small]) if hit else 0,
            }
        )
    return MethodResult(
        "activation_clustering",
        sorted(flagged),
        suspects,
        rows,
        {
            "dims": config.dims,
            "reduction": "pca",
            "max_share": config.max_share,
            "min_agreement": config.min_agreement,
            "neighbours": config.neighbours,
        },
    )


def robust_z(values: Sequence[float]) -> list[float]:
    """(v - median) / (1.4826 MAD) of each value; 0 for all when the MAD is 0."""
    v = np.asarray(values, dtype=np.float64)
    med = float(np.median(v))
    mad = float(np.median(np.abs(v - med))) * MAD_SCALE
    if mad <= 0:
        return [0.0] * len(v)
    return [float(x) for x in (v - med) / mad]


def spectral_signatures(
    features: torch.Tensor,
    labels: torch.Tensor,
    neighbours: Neighbours,
    num_classes: int,
    config: ScanConfig,
) -> MethodResult:
    """Tran et al.'s spectral signatures, removing only in suspect classes (module doc)."""
    f_all = features.numpy()
    y = labels.numpy()
    expected = math.ceil(config.expected_rate * len(y))
    remove = math.ceil(config.removal_factor * config.expected_rate * len(y))
    per_class: dict[int, dict[str, Any]] = {}
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)
        if len(idx) < MIN_CLASS_SAMPLES:
            continue
        centred = f_all[idx] - f_all[idx].mean(axis=0, keepdims=True)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        energy = float((s * s).sum())
        scores = (centred @ vt[0]) ** 2
        order = np.argsort(-scores, kind="stable")
        probe = order[: max(1, min(expected, len(idx) // 2))]
        per_class[c] = {
            "idx": idx,
            "top": order[:remove],
            "concentration": float(s[0] ** 2 / energy) if energy > 0 else 0.0,
            "top_agreement": neighbours.agreement(idx[probe], c),
            "score_median": float(np.median(scores)),
            "score_max": float(scores.max()),
        }
    classes = sorted(per_class)
    lows = [per_class[c]["top_agreement"] for c in classes]
    zs = robust_z(lows) if len(classes) >= 3 else [-math.inf] * len(classes)
    flagged: list[int] = []
    suspects: list[int] = []
    rows: list[dict[str, Any]] = []
    for c in range(num_classes):
        if c not in per_class:
            rows.append({"class": c, "n": int(np.sum(y == c)), "top_agreement": None, "z": None})
            continue
        info = per_class[c]
        z = zs[classes.index(c)]
        suspect = z < -config.z_suspect and info["top_agreement"] < config.min_agreement
        if suspect:
            flagged.extend(int(i) for i in info["idx"][info["top"]])
            suspects.append(c)
        rows.append(
            {
                "class": c,
                "n": int(len(info["idx"])),
                "top_agreement": info["top_agreement"],
                "z": z,
                "concentration": info["concentration"],
                "score_median": info["score_median"],
                "score_max": info["score_max"],
                "flagged": int(len(info["top"])) if suspect else 0,
            }
        )
    return MethodResult(
        "spectral_signatures",
        sorted(flagged),
        suspects,
        rows,
        {
            "expected_rate": config.expected_rate,
            "removal_factor": config.removal_factor,
            "z_suspect": config.z_suspect,
            "removed_per_suspect_class": remove,
        },
    )


def precision_recall(flagged: Sequence[int], truth: Sequence[int]) -> dict[str, Any]:
    """Precision and recall of flagged indices against the poisoned ones (None when undefined)."""
    hits = len(set(flagged) & set(truth))
    return {
        "true_positives": hits,
        "precision": hits / len(flagged) if flagged else None,
        "recall": hits / len(truth) if truth else None,
    }


@dataclass
class ScanResult:
    """Every method's verdict on one training split, and their union."""

    n: int
    num_classes: int
    methods: dict[str, MethodResult]
    seconds: float = 0.0

    @property
    def flagged(self) -> list[int]:
        """The union of the methods' flags, sorted."""
        return sorted({i for m in self.methods.values() for i in m.flagged})

    @property
    def suspected_classes(self) -> list[int]:
        """Every class some method suspects."""
        return sorted({c for m in self.methods.values() for c in m.suspected_classes})

    def to_dict(self, truth: Sequence[int] | None = None) -> dict[str, Any]:
        """As the JSON record has it; with ``truth`` (the poisoned indices), precision and
        recall of each method's flags and of the union."""
        out: dict[str, Any] = {
            "train_size": self.n,
            "num_classes": self.num_classes,
            "flagged": self.flagged,
            "flagged_count": len(self.flagged),
            "suspected_classes": self.suspected_classes,
            "methods": {name: m.to_dict() for name, m in self.methods.items()},
            "seconds": self.seconds,
        }
        if truth is not None:
            out["poisoned_count"] = len(truth)
            out["detection"] = {
                "union": precision_recall(self.flagged, truth),
                **{name: precision_recall(m.flagged, truth) for name, m in self.methods.items()},
            }
        return out


def scan(
    model: nn.Module,
    train: Dataset,
    config: ScanConfig | None = None,
    *,
    device: str | torch.device = "cpu",
) -> ScanResult:
    """Scan a training split with a model trained on it (module doc)."""
    import time

    config = config or ScanConfig()
    config.check()
    start = time.perf_counter()
    features = training_features(model, train, config.batch_size, device)
    near = Neighbours(train, config.neighbours)
    y = train.y.cpu()
    k = train.num_classes
    found: dict[str, MethodResult] = {}
    if "activation_clustering" in config.methods:
        found["activation_clustering"] = activation_clustering(features, y, near, k, config)
    if "spectral_signatures" in config.methods:
        found["spectral_signatures"] = spectral_signatures(features, y, near, k, config)
    return ScanResult(len(train), train.num_classes, found, time.perf_counter() - start)

"""Backdoor poisoning test cases: a BadNets-style patch or a blended trigger stamped into a share
of a training split, relabelled to a target class, with the ground truth a scan is scored on.

- **Rate**: the share R of the whole training split that is poisoned, ``round(R * n)`` samples
  drawn (seeded, without replacement) from the source pool. This is what "a poisoning rate of
  5 %" means in the literature the scans are measured against (Chen et al. 2018; Tran et al.
  2018 state it per target class): the attacker's budget as a share of the training set.
- **Source** (the pool): one class, or by default every class but the target (BadNets'
  all-to-one attack). The default is all because one class holds only about 1/K of a split,
  so it cannot supply rates near 1/K and beyond, and because an all-to-one trigger must
  override the content of every digit, the stronger and more common test case.
- **Triggers**: ``patch`` (Gu et al. 2017, BadNets): a black-and-white checkerboard of
  ``patch_size`` pixels a side, one pixel in from the bottom-right corner, on every channel;
  ``blend`` (Chen et al. 2017, blended injection): ``(1 - alpha) x + alpha t`` with ``t`` a
  fixed uniform-noise image drawn from the seed (their key pattern, a random image; ours is
  noise so that no image file is needed).
- **Attack success** is measured on the triggered test inputs of the source pool's classes
  (never the target class), labelled with the target: the share classified as the target.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.dataset import Dataset, DataSplits
from ..errors import RobustlabError
from ..io import atomic_write, read_regular_bytes, write_json

TRIGGERS = ("patch", "blend")
PATCH_MARGIN = 1  # pixels between the patch and the bottom-right corner


def check_rate(rate: object) -> None:
    """A poisoning rate must be a share strictly between 0 and 1; one sentence if not."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise RobustlabError(f"the poisoning rate must be a number, got {rate!r}")
    if not (0.0 < float(rate) < 1.0):  # also refuses NaN
        raise RobustlabError(
            "the poisoning rate must be a share strictly between 0 and 1 (e.g. 0.05 for 5 % of "
            f"the training split), got {rate}"
        )


@dataclass(frozen=True)
class PoisonConfig:
    """What to poison: target class, source class (None: every other class), rate, trigger."""

    target: int
    rate: float
    source: int | None = None
    trigger: str = "patch"
    patch_size: int = 3
    blend_alpha: float = 0.2
    seed: int = 0

    def check(self, num_classes: int, image_size: int) -> None:
        """Refuse, in one sentence, a setting that cannot make a poisoned split of this data."""
        check_rate(self.rate)
        for what, value in (("target", self.target), ("source", self.source)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise RobustlabError(f"the {what} class must be a whole number, got {value!r}")
            if not 0 <= value < num_classes:
                raise RobustlabError(
                    f"the {what} class {value} does not exist: the data has classes 0 to "
                    f"{num_classes - 1}"
                )
        if self.source == self.target:
            raise RobustlabError(
                f"the source class must differ from the target class {self.target}: its samples "
                "already carry the target label"
            )
        if self.trigger not in TRIGGERS:
            raise RobustlabError(f"unknown trigger {self.trigger!r}; use {' or '.join(TRIGGERS)}")
        if self.trigger == "patch" and not (
            isinstance(self.patch_size, int) and 1 <= self.patch_size <= image_size - PATCH_MARGIN
        ):
            raise RobustlabError(
                f"the patch size must be a whole number of pixels from 1 to "
                f"{image_size - PATCH_MARGIN} for {image_size}x{image_size} images, got "
                f"{self.patch_size!r}"
            )
        if self.trigger == "blend" and not (0.0 < float(self.blend_alpha) <= 1.0):
            raise RobustlabError(
                f"the blend alpha must be in (0, 1] (the trigger's weight), got {self.blend_alpha}"
            )

    def record(self) -> dict[str, object]:
        """The settings as a manifest records them (source 'all' for every other class)."""
        out: dict[str, object] = asdict(self)
        out["source"] = "all" if self.source is None else self.source
        if self.trigger == "patch":
            del out["blend_alpha"]
        else:
            del out["patch_size"]
        return out


def trigger_pattern(config: PoisonConfig, shape: tuple[int, int, int]) -> torch.Tensor:
    """The trigger image (C, H, W): the checkerboard patch (elsewhere 0, unused) or the blend
    pattern, uniform noise in [0, 1] drawn from the seed."""
    c, h, w = shape
    if config.trigger == "blend":
        gen = torch.Generator().manual_seed(config.seed)
        return torch.rand((c, h, w), generator=gen)
    k = config.patch_size
    rows = torch.arange(k).view(k, 1)
    cols = torch.arange(k).view(1, k)
    board = ((rows + cols) % 2 == 0).float()  # white on the corners of the patch
    pattern = torch.zeros((c, h, w))
    top, left = h - PATCH_MARGIN - k, w - PATCH_MARGIN - k
    pattern[:, top : top + k, left : left + k] = board
    return pattern


def stamp(x: torch.Tensor, config: PoisonConfig) -> torch.Tensor:
    """Inputs (N, C, H, W) in [0, 1] with the trigger on them (a new tensor)."""
    pattern = trigger_pattern(config, (x.shape[1], x.shape[2], x.shape[3])).to(x)
    if config.trigger == "blend":
        a = float(config.blend_alpha)
        return ((1.0 - a) * x + a * pattern).clamp(0.0, 1.0)
    k, h, w = config.patch_size, x.shape[2], x.shape[3]
    top, left = h - PATCH_MARGIN - k, w - PATCH_MARGIN - k
    out = x.clone()
    out[:, :, top : top + k, left : left + k] = pattern[:, top : top + k, left : left + k]
    return out


def source_pool(y: torch.Tensor, config: PoisonConfig) -> torch.Tensor:
    """Indices of the samples the trigger may go into: the source class, or all non-target."""
    keep = y != config.target if config.source is None else y == config.source
    return torch.nonzero(keep).flatten()


def poison_count(n: int, rate: float) -> int:
    """How many of n training samples a rate poisons: round(rate * n), halves rounded up."""
    return math.floor(rate * n + 0.5)


def choose_poisoned(train: Dataset, config: PoisonConfig) -> torch.Tensor:
    """The sorted indices of the training samples to poison (seeded), or one sentence why the
    rate cannot be met."""
    n = len(train)
    count = poison_count(n, config.rate)
    if count == 0:
        raise RobustlabError(
            f"a poisoning rate of {config.rate} poisons no sample of the {n} in the training "
            f"split: use a rate of at least {0.5 / n:.2g}"
        )
    pool = source_pool(train.y, config)
    if count > len(pool):
        where = (
            "the non-target classes hold"
            if config.source is None
            else f"class {config.source} holds"
        )
        raise RobustlabError(
            f"a poisoning rate of {config.rate} needs {count} training samples but {where} "
            f"only {len(pool)}: lower the rate or use every non-target class as the source"
        )
    rng = np.random.default_rng([config.seed, 18])
    picked = rng.choice(len(pool), size=count, replace=False)
    return pool[torch.from_numpy(np.sort(picked))].sort().values


@dataclass(frozen=True, eq=False)
class Poisoned:
    """A poisoned training split, the clean test split, the triggered test inputs (source
    classes, labelled with the target) and the ground truth of what was poisoned."""

    train: Dataset
    test: Dataset
    triggered: Dataset
    indices: torch.Tensor  # into train, sorted
    original_labels: torch.Tensor  # the labels those samples had
    config: PoisonConfig

    def manifest(self) -> dict[str, object]:
        """The ground truth as the manifest records it (indices into the training split)."""
        return {
            "poison": self.config.record(),
            "train_size": len(self.train),
            "test_size": len(self.test),
            "triggered_test_size": len(self.triggered),
            "poisoned_count": len(self.indices),
            "poisoned_indices": [int(i) for i in self.indices],
            "original_labels": [int(c) for c in self.original_labels],
        }


def poison_splits(splits: DataSplits, config: PoisonConfig) -> Poisoned:
    """Poison the training split of ``splits`` as ``config`` says (module doc); the test split
    is kept, and its source-pool samples, triggered, become the attack-success test set."""
    config.check(splits.num_classes, splits.image_size)
    train = splits.train
    idx = choose_poisoned(train, config)
    x, y = train.x.clone(), train.y.clone()
    x[idx] = stamp(train.x[idx], config)
    y[idx] = config.target
    poisoned = Dataset(x, y, splits.num_classes, f"{splits.name}/train (poisoned)")
    test_pool = source_pool(splits.test.y, config)
    triggered = Dataset(
        stamp(splits.test.x[test_pool], config),
        torch.full((len(test_pool),), config.target, dtype=torch.int64),
        splits.num_classes,
        f"{splits.name}/test (triggered)",
    )
    return Poisoned(
        train=poisoned,
        test=splits.test,
        triggered=triggered,
        indices=idx,
        original_labels=train.y[idx].clone(),
        config=config,
    )


#: The files ``write_poisoned`` puts in its folder.
POISONED, TRIGGERED, MANIFEST = "poisoned.npz", "triggered.npz", "poison.json"
POISONED_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _save_npz(path: Path, arrays: dict[str, torch.Tensor]) -> None:
    """Write tensors as a compressed .npz (float32 images, int64 labels), atomically."""

    numpy_arrays: dict[str, Any] = {k: v.cpu().numpy() for k, v in arrays.items()}

    def write(tmp: Path) -> None:
        """Into the temporary file (a file object: numpy adds no suffix)."""
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **numpy_arrays)

    atomic_write(path, write)


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_poisoned(poisoned: Poisoned, out: str | Path, data: str) -> dict[str, Any]:
    """Write the poisoned data into the folder ``out`` and return its manifest:

    - ``poisoned.npz``: x_train, y_train (poisoned) and x_test, y_test (the clean test split),
      read back as ``npz:OUT/poisoned.npz`` with the training split in this order;
    - ``triggered.npz``: x_test, y_test = the triggered test inputs of the source classes
      labelled with the target (so ``robustlab eval`` on it reports the attack's success rate
      as its clean accuracy), beside x_train, y_train = the clean test split (an .npz with a
      test split needs a train split that holds every class);
    - ``poison.json``: the manifest (``Poisoned.manifest``, the data it came from, the files
      and the SHA-256 of poisoned.npz, which ``robustlab scan`` checks before trusting it).
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    p = poisoned
    _save_npz(
        folder / POISONED,
        {"x_train": p.train.x, "y_train": p.train.y, "x_test": p.test.x, "y_test": p.test.y},
    )
    _save_npz(
        folder / TRIGGERED,
        {
            "x_train": p.test.x,
            "y_train": p.test.y,
            "x_test": p.triggered.x,
            "y_test": p.triggered.y,
        },
    )
    manifest: dict[str, Any] = {
        "kind": "poison",
        "data": data,
        **p.manifest(),
        "files": {"poisoned": POISONED, "triggered": TRIGGERED},
        "poisoned_sha256": sha256_of(folder / POISONED),
    }
    write_json(folder / MANIFEST, manifest)
    return manifest


def manifest_for(npz: Path) -> dict[str, Any] | None:
    """The poison manifest beside a poisoned.npz that ``write_poisoned`` wrote, if it is there
    and names this very file (by its SHA-256); None otherwise."""
    record = npz.parent / MANIFEST
    if not record.is_file():
        return None
    manifest = read_manifest(record)
    if (manifest.get("files") or {}).get("poisoned") != npz.name:
        return None
    return manifest if manifest.get("poisoned_sha256") == sha256_of(npz) else None


def read_manifest(path: str | Path) -> dict[str, Any]:
    """A poison manifest, checked for what a scan needs, or one sentence why it is not one."""
    try:
        obj = json.loads(read_regular_bytes(path, "poison manifest"))
    except ValueError as exc:
        raise RobustlabError(f"the poison manifest {path} is not valid JSON ({exc})") from exc
    indices = obj.get("poisoned_indices") if isinstance(obj, dict) else None
    if (
        not isinstance(obj, dict)
        or obj.get("kind") != "poison"
        or not isinstance(indices, list)
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices)
    ):
        raise RobustlabError(
            f"{path} is not a poison manifest (robustlab poison writes one as {MANIFEST})"
        )
    return dict(obj)

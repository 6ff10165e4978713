"""The data a drift monitor compares: a reference window and a stream of inputs the model did
not train on, taken from the held-out splits ``data.load_data`` gives.

- The reference window: the calibration split the model held out of this data (``robustlab
  train --calibration N``), else its test split; data the model was not trained on is all
  held out (a user file without its own test split is then all test points).
- The stream: the test split of its data. When the reference window is that same test split
  (same data, no calibration split), the test points are split in two, seeded: the first
  ``reference_share`` for the reference window, the rest for the stream, so that no point is
  in both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..data import Dataset, DataSplits, load_data
from ..data.datasets import same_source
from ..errors import RobustlabError


@dataclass(frozen=True)
class Windows:
    """The reference window and the stream, where each came from, and the stream's classes."""

    reference: Dataset
    stream: Dataset
    reference_split: str
    stream_split: str
    splits: DataSplits  # the reference data's splits (shape, classes, names)
    stream_data: str

    def info(self) -> dict[str, Any]:
        """What a record says of them."""
        return {
            "reference": {"data": self.splits.name, "split": self.reference_split,
                          "points": len(self.reference)},
            "stream": {"data": self.stream_data, "split": self.stream_split,
                       "points": len(self.stream)},
        }  # fmt: skip


def _trained_on(manifest: dict[str, Any]) -> tuple[str, int, int]:
    """(data, calibration size, seed) of the model's training, ('', 0, 0) when unknown."""
    dataset = manifest.get("dataset")
    if not isinstance(dataset, dict):
        return "", 0, 0
    name = str(dataset.get("name") or "")
    return name, int(dataset.get("calibration_size", 0) or 0), int(dataset.get("seed", 0) or 0)


def _halves(data: Dataset, share: float, seed: int) -> tuple[Dataset, Dataset]:
    """A seeded random split of ``data`` into a first ``share`` and the rest."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    cut = int(round(share * len(data)))
    if cut < 2 or len(data) - cut < 2:
        raise RobustlabError(
            f"{data.name} has {len(data)} held-out points, too few to split into a reference "
            "window and a stream of at least 2 each"
        )
    first, rest = data.subset(order[:cut]), data.subset(order[cut:])
    return first, rest


def held_out_windows(
    reference: str, stream: str, manifest: dict[str, Any], *, reference_share: float = 0.5
) -> Windows:
    """The reference window and the stream for a model (its checkpoint ``manifest`` says what
    it trained on), from the data specs ``reference`` and ``stream``."""
    trained, calibration, seed = _trained_on(manifest)
    on_training_data = bool(trained) and same_source(reference, trained)
    if on_training_data and calibration > 0:
        ref_splits = load_data(reference, calibration=calibration, seed=seed)
        assert ref_splits.calibration is not None
        window, ref_split = ref_splits.calibration, "calibration"
    else:
        ref_splits = load_data(reference, seed=seed, test_only=not on_training_data)
        window, ref_split = ref_splits.test, "test"
    if same_source(stream, reference):
        if ref_split == "calibration":
            return Windows(window, ref_splits.test, ref_split, "test", ref_splits, stream)
        first, rest = _halves(window, reference_share, seed)
        return Windows(first, rest, "test (first part)", "test (rest)", ref_splits, stream)
    stream_trained = bool(trained) and same_source(stream, trained)
    stream_splits = load_data(stream, seed=seed, test_only=not stream_trained)
    window_shape = tuple(window.x.shape[1:])
    stream_shape = tuple(stream_splits.test.x.shape[1:])
    if stream_shape != window_shape:
        raise RobustlabError(
            f"the stream {stream} has {'x'.join(map(str, stream_shape))} inputs but the "
            f"reference {reference} has {'x'.join(map(str, window_shape))}: a monitor compares "
            "inputs of one shape"
        )
    return Windows(window, stream_splits.test, ref_split, "test", ref_splits, stream)

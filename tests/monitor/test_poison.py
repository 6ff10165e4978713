"""robustlab.monitor.poison: how many samples get the trigger, which ones, what they look like,
what the manifest says, and one clear sentence for every setting that cannot be met."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from robustlab.data import DataSplits, load_data
from robustlab.errors import RobustlabError
from robustlab.monitor.poison import (
    MANIFEST,
    POISONED,
    TRIGGERED,
    PoisonConfig,
    manifest_for,
    poison_splits,
    read_manifest,
    stamp,
    trigger_pattern,
    write_poisoned,
)


def _changed(a: torch.Tensor, b: torch.Tensor) -> set[int]:
    """Indices of the samples whose images differ."""
    return {int(i) for i in torch.nonzero((a != b).flatten(1).any(1)).flatten()}


def test_written_set_has_round_rate_n_triggered_relabelled_samples_the_manifest_lists(
    digits: DataSplits, tmp_path: Path
) -> None:
    config = PoisonConfig(target=3, rate=0.07, trigger="patch", patch_size=3, seed=5)
    manifest = write_poisoned(poison_splits(digits, config), tmp_path, "digits")
    back = load_data(f"npz:{tmp_path / POISONED}")
    n = len(digits.train)
    expected = math.floor(0.07 * n + 0.5)
    listed = manifest["poisoned_indices"]
    assert manifest["poisoned_count"] == len(listed) == expected == 101
    assert len(set(listed)) == expected and manifest["train_size"] == n
    # exactly the listed samples changed, each carries the patch and the target's label
    assert _changed(back.train.x, digits.train.x) == set(listed)
    label_changed = {int(i) for i in torch.nonzero(back.train.y != digits.train.y).flatten()}
    assert label_changed == set(listed)  # the pool is non-target: every label really changes
    assert manifest["original_labels"] == [int(digits.train.y[i]) for i in listed]
    assert all(c != 3 for c in manifest["original_labels"])
    assert bool((back.train.y[listed] == 3).all())
    patch = back.train.x[listed][:, :, 4:7, 4:7]  # 8x8 images, 3x3 patch, 1 pixel margin
    board = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert torch.equal(patch, board.expand_as(patch))
    # the test split is the original one; the triggered set is its non-target part, relabelled
    assert torch.equal(back.test.x, digits.test.x) and torch.equal(back.test.y, digits.test.y)
    trig = load_data(f"npz:{tmp_path / TRIGGERED}", test_only=True).test
    non_target = digits.test.y != 3
    assert len(trig) == int(non_target.sum()) == manifest["triggered_test_size"]
    assert bool((trig.y == 3).all())
    assert torch.equal(trig.x, stamp(digits.test.x[non_target], config))
    # the manifest names this file, and a changed file is no longer matched
    assert manifest_for(tmp_path / POISONED) == read_manifest(tmp_path / MANIFEST)
    (tmp_path / POISONED).write_bytes((tmp_path / POISONED).read_bytes() + b"\0")
    assert manifest_for(tmp_path / POISONED) is None


def test_blend_trigger_mixes_the_seeded_pattern_into_samples_of_the_source_class(
    digits: DataSplits,
) -> None:
    config = PoisonConfig(target=0, source=7, rate=0.05, trigger="blend", blend_alpha=0.25)
    p = poison_splits(digits, config)
    idx = p.indices
    assert len(idx) == math.floor(0.05 * len(digits.train) + 0.5)
    assert bool((digits.train.y[idx] == 7).all()) and bool((p.train.y[idx] == 0).all())
    t = trigger_pattern(config, (1, 8, 8))
    assert torch.allclose(p.train.x[idx], 0.75 * digits.train.x[idx] + 0.25 * t, atol=1e-6)
    other = PoisonConfig(target=0, source=7, rate=0.05, trigger="blend", seed=1)
    assert not torch.equal(trigger_pattern(other, (1, 8, 8)), t)
    assert len(p.triggered) == int((digits.test.y == 7).sum())


@pytest.mark.parametrize(
    ("config", "said"),
    [
        (PoisonConfig(target=0, rate=0.0), "strictly between 0 and 1"),
        (PoisonConfig(target=0, rate=1.0), "strictly between 0 and 1"),
        (PoisonConfig(target=0, rate=-0.2), "strictly between 0 and 1"),
        (PoisonConfig(target=0, rate=float("nan")), "strictly between 0 and 1"),
        (PoisonConfig(target=10, rate=0.05), "target class 10 does not exist"),
        (PoisonConfig(target=1, source=-1, rate=0.05), "source class -1 does not exist"),
        (PoisonConfig(target=4, source=4, rate=0.05), "must differ from the target class 4"),
        (PoisonConfig(target=0, source=2, rate=0.2), "class 2 holds only"),
        (PoisonConfig(target=0, rate=0.0001), "poisons no sample"),
        (PoisonConfig(target=0, rate=0.05, trigger="star"), "unknown trigger"),
        (PoisonConfig(target=0, rate=0.05, patch_size=8), "patch size"),
        (PoisonConfig(target=0, rate=0.05, trigger="blend", blend_alpha=0.0), "blend alpha"),
    ],
)
def test_settings_that_cannot_be_met_are_one_sentence(
    digits: DataSplits, config: PoisonConfig, said: str
) -> None:
    with pytest.raises(RobustlabError) as err:
        poison_splits(digits, config)
    text = str(err.value)
    assert said in text and "\n" not in text

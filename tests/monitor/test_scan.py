"""robustlab.monitor.scan on real models trained in the test: a backdoored digits model (the
scan finds the poison far above chance) and a clean mnist5k model (nothing is flagged, where
IBM ART's default 'smaller' rule flags part of every class)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from robustlab.data import DataSplits
from robustlab.errors import RobustlabError
from robustlab.monitor.poison import PoisonConfig, Poisoned, poison_splits
from robustlab.monitor.scan import ScanConfig, scan
from robustlab.train import TrainConfig, accuracy, train


@pytest.fixture(scope="module")
def backdoored(
    digits: DataSplits, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Poisoned, nn.Module]:
    """digits with 5 % of the training split blended (alpha 0.2) and relabelled 0, and a
    resnet8 trained 10 epochs on it (~7 s)."""
    p = poison_splits(digits, PoisonConfig(target=0, rate=0.05, trigger="blend"))
    splits = dataclasses.replace(digits, train=p.train)
    cfg = TrainConfig(arch="resnet8", data="digits (poisoned)", epochs=10)
    out = tmp_path_factory.mktemp("backdoored")
    return p, train(cfg, out, splits=splits, progress=False).model


def test_backdoored_model_obeys_the_trigger_and_both_scans_find_poison_far_above_chance(
    backdoored: tuple[Poisoned, nn.Module],
) -> None:
    p, model = backdoored
    assert accuracy(model, p.test) > 0.9
    assert accuracy(model, p.triggered) > 0.9  # the backdoor works
    result = scan(model, p.train, ScanConfig(expected_rate=0.05))
    truth = [int(i) for i in p.indices]
    found = result.to_dict(truth)
    chance = len(truth) / len(p.train)  # a random flagger's expected precision: 5 %
    for name in ("activation_clustering", "spectral_signatures"):
        d = found["detection"][name]
        assert 0 in found["methods"][name]["suspected_classes"], name
        assert d["precision"] >= 8 * chance and d["recall"] >= 0.6, (name, d)
    assert found["flagged"] == sorted(
        set(found["methods"]["activation_clustering"]["flagged"])
        | set(found["methods"]["spectral_signatures"]["flagged"])
    )
    assert found["detection"]["union"]["recall"] >= 0.7


def test_clean_model_loses_nothing_where_arts_smaller_rule_flags_every_class(
    mnist: DataSplits, tmp_path: Path
) -> None:
    cfg = TrainConfig(arch="mlp", data="mnist5k", epochs=3)
    model = train(cfg, tmp_path, splits=mnist, progress=False).model
    result = scan(model, mnist.train)
    ac = result.methods["activation_clustering"]
    smaller = [round(row["smaller_share"] * row["n"]) for row in ac.classes]
    assert all(k > 0 for k in smaller)  # ART's 'smaller' rule flags each of these
    assert sum(smaller) > 0.3 * len(mnist.train)
    assert ac.flagged == [] and ac.suspected_classes == []
    # spectral signatures as published would drop ceil(1.5 * 5 % * n) of every class
    assert result.methods["spectral_signatures"].flagged == []
    assert result.flagged == []


@pytest.mark.parametrize(
    ("config", "said"),
    [
        (ScanConfig(expected_rate=0.0), "expected poisoning rate"),
        (ScanConfig(expected_rate=1.5), "expected poisoning rate"),
        (ScanConfig(max_share=0.7), "at most half"),
        (ScanConfig(dims=0), "reduced dimensions"),
        (ScanConfig(neighbours=0), "number of neighbours"),
        (ScanConfig(methods=("strip",)), "unknown scan method strip"),
    ],
)
def test_bad_scan_settings_are_one_sentence(
    digits: DataSplits, config: ScanConfig, said: str
) -> None:
    with pytest.raises(RobustlabError) as err:
        scan(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), digits.train, config)
    assert said in str(err.value) and "\n" not in str(err.value)


def test_scanning_an_empty_split_is_one_sentence(digits: DataSplits) -> None:
    empty = digits.train.subset(torch.zeros(len(digits.train), dtype=torch.bool))
    with pytest.raises(RobustlabError, match="no samples to scan"):
        scan(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), empty)

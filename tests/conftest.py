"""Shared fixtures: a private cache folder, small real datasets loaded once, and a small conv
net trained on digits once per session (plain, and with trained exits)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from robustlab.analysis.efficiency import calibrate
from robustlab.data import DataSplits, load_data
from robustlab.models.multiexit import MultiExitNetwork, attach_exits
from robustlab.train import TrainConfig, train
from robustlab.train.sdn import SDNConfig, train_exits


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Tests never write into the user's cache."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("robustlab-cache")
    mp.setenv("ROBUSTLAB_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def digits() -> DataSplits:
    """scikit-learn's 8x8 digits (real data, tiny, fast to train on)."""
    return load_data("digits")


@pytest.fixture(scope="session")
def mnist() -> DataSplits:
    """The built-in mnist5k."""
    return load_data("mnist5k")


@pytest.fixture(scope="session")
def digits_net(digits: DataSplits, tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    """A width-8 resnet8 trained 4 epochs on digits (~2 s; 94 % on the first 100 test images).

    Shared by every test in the session: tests must not change it (attacks restore it).
    """
    cfg = TrainConfig(arch="resnet8", data="digits", epochs=4, arch_options={"width": 8})
    out = tmp_path_factory.mktemp("digits-net")
    return train(cfg, out, splits=digits, progress=False).model.eval()


@pytest.fixture(scope="session")
def digits_multiexit(digits_net: nn.Module, digits: DataSplits) -> MultiExitNetwork:
    """A copy of :func:`digits_net` with three trained exits and a threshold for a 15 % drop."""
    torch.manual_seed(0)
    model = attach_exits(copy.deepcopy(digits_net), (1, 8, 8), 10, [0, 1, 2])
    fit, held = digits.train.subset(slice(200, None)), digits.train.head(200)
    train_exits(model, fit, SDNConfig(epochs=4), progress=False)
    model.threshold = calibrate(model, held, (0.15,)).thresholds["15%"]
    return model.eval()


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    """Small models run faster on one thread, and tests then leave a core to the rest."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)

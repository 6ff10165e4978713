"""Shared fixtures: a private cache folder, and small real datasets loaded once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from robustlab.data import DataSplits, load_data


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


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    """Small models run faster on one thread, and tests then leave a core to the rest."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)

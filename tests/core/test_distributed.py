"""The process bookkeeping of torchrun runs that needs no second process: one process without
torchrun's variables, round-robin ownership, malformed variables."""

from __future__ import annotations

import pytest

from robustlab.core.distributed import TORCHRUN_VARIABLES, Processes, start
from robustlab.errors import RobustlabError


def test_without_torchrun_a_run_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    processes, device = start("cpu")
    assert processes == Processes() and device == "cpu"
    assert processes.main and not processes.distributed and processes.world_size == 1


def test_items_are_owned_round_robin_and_every_item_once() -> None:
    world = [Processes(rank, 3, rank, "gloo") for rank in range(3)]
    owners = [[p.rank for p in world if p.owns(item)] for item in range(7)]
    assert owners == [[0], [1], [2], [0], [1], [2], [0]]


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"RANK": "x"}, r"RANK='x' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, r"rank 2 of a world of 2 processes"),
    ],
)
def test_malformed_torchrun_variables_are_one_sentence(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], message: str
) -> None:
    base = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for name, value in {**base, "MASTER_PORT": "29500", **variables}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RobustlabError, match=message):
        start("cpu")

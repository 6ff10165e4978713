"""The process bookkeeping of torchrun runs that needs no second process: one process without
torchrun's variables, round-robin ownership, shard file names, malformed variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from robustlab.core.distributed import (
    TORCHRUN_VARIABLES,
    Processes,
    check_share,
    shard_files,
    shard_path,
    start,
)
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


def test_each_process_keeps_its_shard_in_a_file_named_by_rank_and_world_size(
    tmp_path: Path,
) -> None:
    run = tmp_path / "r.json.progress.jsonl"
    assert shard_path(run, Processes()) == run
    assert shard_path(run, Processes(1, 3, 1, "gloo")) == tmp_path / (
        "r.json.progress.rank1-of-3.jsonl"
    )
    names = ["r.json.progress.jsonl", "r.json.progress.rank0-of-3.jsonl"]
    names += ["r.json.progress.rank1-of-x.jsonl", "s.json.progress.rank0-of-2.jsonl"]
    for name in names:
        (tmp_path / name).write_text("")
    assert shard_files(run) == {run: 1, tmp_path / names[1]: 3}


def test_more_processes_than_items_is_one_sentence() -> None:
    check_share(Processes(1, 2, 1, "gloo"), 2, ("batch", "batches"), "use smaller batches")
    with pytest.raises(RobustlabError, match=r"started 3 processes but there is only 2 batches"):
        check_share(Processes(0, 3, 0, "gloo"), 2, ("batch", "batches"), "use smaller batches")

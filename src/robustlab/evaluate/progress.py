"""The progress file of an evaluation: one line per finished batch, so that a killed run resumes.

Its first line is ``{"key": "<run key>"}``: what a resumed run must share with the first (the
model's structure and weights, the evaluated points and the configuration). Each later line
is one finished batch, written whole and synced before the next batch starts; a line cut short
by a kill is dropped and its batch redone. Under torchrun every process keeps the batches it
owns in a file of its own beside the run's (``core.distributed.shard_path``); a file written
by another number of processes is refused, never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..attacks.base import Attack
from ..core.distributed import Processes, shard_files, shard_path
from ..data import Dataset
from ..errors import RobustlabError
from ..io import limits, read_head, read_regular_text
from ..models.fingerprint import model_digest, tensor_digest


def run_key(
    attacks: Sequence[Attack],
    model: nn.Module,
    data: Dataset,
    total: int,
    batch_size: int,
    seed: int,
    extra: object = None,
) -> str:
    """What a resumed run must share with the first: the model (its structure and every
    weight and buffer), the evaluated points and the configuration (``extra``: more of it,
    JSON-able); never a path or name."""
    h = hashlib.sha256()
    model_digest(h, model)
    tensor_digest(h, data.x[:total])
    tensor_digest(h, data.y[:total])
    config = [[a.config() for a in attacks], total, batch_size, seed]
    if extra is not None:
        config.append(extra)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _check_row(row: Any, index: int, label: int) -> bool:
    """Whether one stored per-sample row is well formed and belongs to this point."""
    if not isinstance(row, dict) or row.get("index") != index or row.get("label") != label:
        return False
    preds = row.get("clean_pred"), row.get("final_pred")
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in preds):
        return False
    robust, by, norm = row.get("robust"), row.get("broken_by"), row.get("perturbation_norm")
    if not isinstance(robust, bool) or not (by is None or isinstance(by, str)):
        return False
    if robust and preds != (label, label):
        return False
    return norm is None or isinstance(norm, (int, float)) and not isinstance(norm, bool)


def _check_batch_record(
    batch: Any, data: Dataset, total: int, size: int, eps: int, processes: Processes
) -> bool:
    """Whether one stored batch is well formed for this evaluation (points, labels, eps) and
    is one of this process's batches."""
    if not isinstance(batch, dict) or not isinstance(batch.get("per_eps"), dict):
        return False
    start = batch.get("start")
    if (
        not isinstance(start, int)
        or isinstance(start, bool)
        or start % size
        or not 0 <= start < total
        or not processes.owns(start // size)
    ):
        return False
    end = min(total, start + size)
    per_eps = batch["per_eps"]
    if set(per_eps) != {str(i) for i in range(eps)}:
        return False
    labels = data.y[start:end].tolist()
    for entry in per_eps.values():
        if not isinstance(entry, dict) or not isinstance(entry.get("rows"), list):
            return False
        seconds, spent = entry.get("seconds"), entry.get("total_s")
        if not isinstance(seconds, dict) or not isinstance(spent, (int, float)):
            return False
        if not all(isinstance(v, (int, float)) for v in seconds.values()):
            return False
        rows = entry["rows"]
        if len(rows) != end - start or not all(
            _check_row(r, start + j, labels[j]) for j, r in enumerate(rows)
        ):
            return False
    return True


def _damaged(path: Path, line: int) -> RobustlabError:
    """The error for a progress file whose content is not what robustlab wrote."""
    return RobustlabError(
        f"progress file {path} is damaged or was edited (line {line}); delete it to start "
        "the evaluation over"
    )


def _read_progress(
    path: Path, key: str, data: Dataset, total: int, size: int, eps: int, processes: Processes
) -> tuple[dict[int, dict[str, Any]], bool]:
    """Finished batches of an earlier run with the same key, and whether the file must be
    started afresh (missing, empty, or cut before its first line ended). A line cut short by
    a kill is dropped from the file; any other damage is refused with a sentence."""
    if not path.exists() and not path.is_symlink():
        return {}, True
    text = read_regular_text(path, "progress file", limits().text_bytes)
    complete, _, torn = text.rpartition("\n")
    if not complete.strip():
        return {}, True  # killed before the first line was written whole
    lines = complete.split("\n")
    try:
        head = json.loads(lines[0])
    except ValueError:
        head = None
    if not isinstance(head, dict) or not isinstance(head.get("key"), str):
        raise RobustlabError(
            f"{path} is not a robustlab progress file; delete it or use another --json"
        )
    if head["key"] != key:
        raise RobustlabError(
            f"{path} holds progress of a different evaluation; delete it or use another --json"
        )
    done: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(lines[1:], start=2):
        try:
            batch = json.loads(line)
        except ValueError:
            raise _damaged(path, number) from None
        if (
            not _check_batch_record(batch, data, total, size, eps, processes)
            or batch["start"] in done
        ):
            raise _damaged(path, number)
        done[batch["start"]] = batch
    if torn:
        with open(path, "r+b") as f:  # drop the line a kill cut short; it is redone
            f.truncate(len(complete.encode()) + 1)
    return done, False


def open_progress(
    path: Path,
    key: str,
    data: Dataset,
    total: int,
    size: int,
    eps: int,
    processes: Processes | None = None,
) -> tuple[Path, dict[int, dict[str, Any]]]:
    """This process's progress file of the run whose progress file is ``path``, and the
    finished batches an earlier run with this key left in it; when there is nothing to
    resume, the file is started afresh with its key line. Progress that another number of
    processes wrote is refused with a sentence."""
    processes = processes or Processes()
    check_world_size(path, processes)
    own = shard_path(path, processes)
    done, fresh = _read_progress(own, key, data, total, size, eps, processes)
    if fresh:
        own.parent.mkdir(parents=True, exist_ok=True)
        own.unlink(missing_ok=True)
        append(own, {"key": key})
    return own, done


def _processes_text(world_size: int) -> str:
    """'one process' or 'N processes (torchrun)'."""
    return "one process" if world_size == 1 else f"{world_size} processes (torchrun)"


def check_world_size(path: Path, processes: Processes) -> None:
    """Refuse to resume when the progress beside ``path`` was written by another number of
    processes than this run has (its batches were shared among them otherwise)."""
    other = {f: w for f, w in shard_files(path).items() if w != processes.world_size}
    if other:
        first, world = next(iter(other.items()))
        raise RobustlabError(
            f"{first} holds progress of an interrupted run of {_processes_text(world)}, and "
            f"this run has {_processes_text(processes.world_size)}: resume it with "
            f"{_processes_text(world)} as before, or delete its progress files to start over"
        )


#: How every progress file robustlab writes begins: its first line is {"key": "<run key>"}.
PROGRESS_PREFIX = b'{"key": "'


def is_progress_file(path: Path) -> bool:
    """Whether a file is an evaluation progress file robustlab wrote (possibly killed before
    its first line was whole: empty, or a prefix of that line), so a run may replace it."""
    head = read_head(path, len(PROGRESS_PREFIX))
    return PROGRESS_PREFIX.startswith(head)


def append(path: Path, obj: dict[str, Any]) -> None:
    """Add one line to a progress file, on disk before the next batch starts."""
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())

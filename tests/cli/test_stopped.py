"""How a command ends early, the same for every command: an error is one sentence (said by
rank 0 alone under torchrun), a stop (SIGTERM, or another process of a torchrun run gone) is
one message saying what was kept, with exit status 130; a real process stopped by SIGTERM in
training and in evaluation says it alike and keeps its resume state."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from _torchrun import TIMEOUT_S, environment
from robustlab.cli import STOPPED_BY_SIGTERM, STOPPED_UNDER_TORCHRUN, ended, main
from robustlab.errors import RobustlabError, RunStopped

RESUME = "run the same command again to resume"


def test_an_error_a_stop_and_an_interrupt_end_with_one_message_and_their_status() -> None:
    lost = RuntimeError("[gloo/transport/tcp/pair.cc:537] Connection closed by peer")
    assert ended(RobustlabError("bad --eps"), 1) == (2, "robustlab: error: bad --eps")
    stopped = (130, f"robustlab: stopped: {STOPPED_UNDER_TORCHRUN}")
    assert ended(RunStopped(), 2) == ended(lost, 2) == stopped  # whichever came first
    assert ended(RunStopped("the state after epoch 1 stays in r"), 1) == (
        130,
        f"robustlab: stopped: {STOPPED_BY_SIGTERM}; the state after epoch 1 stays in r; {RESUME}",
    )
    assert ended(KeyboardInterrupt(), 2) == (
        130,
        "robustlab: interrupted (finished epochs/batches are kept; run again to resume)",
    )
    assert ended(lost, 1) is None  # no other process: a bug, its traceback
    assert ended(ValueError("a bug"), 2) is None


def test_an_error_on_a_process_other_than_rank_0_ends_it_quietly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Every process meets the same checks, before the command starts and in it: rank 0
    alone says them."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    missing = str(tmp_path / "missing")
    save = str(tmp_path / "a.npz")
    for rank, said in (("1", ""), ("0", "robustlab: error: robustlab attack does not share")):
        monkeypatch.setenv("RANK", rank)
        assert main(["attack", "--model", missing, "--eps", "0.1", "--save", save]) == 2
        assert capsys.readouterr().err.startswith(said)
    monkeypatch.setenv("RANK", "1")
    assert main(["eval", "--model", missing, "--eps", "0.1", "--no-progress"]) == 2
    assert capsys.readouterr().err == ""


def _stopped_by_sigterm(
    args: list[str], started: Callable[[], bool], launcher: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """``robustlab ARGS`` as one process (or under ``launcher``, a module run with python's
    ``-m``), sent SIGTERM once ``started()`` holds."""
    command = [sys.executable, *launcher, "-m", "robustlab", *args]
    proc = subprocess.Popen(
        command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not started():
            assert proc.poll() is None, "the run ended before it was stopped"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _said(done: subprocess.CompletedProcess[str]) -> list[str]:
    """The lines robustlab printed about how the run ended."""
    return [line for line in done.stderr.splitlines() if line.startswith("robustlab:")]


MLP = ["--arch", "mlp", "--data", "digits", "--arch-option", "width=32", "--seed", "3"]


@pytest.mark.slow  # ~30 s: two commands started and stopped, the evaluation resumed
def test_sigterm_stops_training_and_evaluation_alike_and_both_resume(tmp_path: Path) -> None:
    out = tmp_path / "mlp"
    train = ["train", "--no-progress", *MLP, "--method", "pgd-at", "--eps", "0.1"]
    train += ["--steps", "10", "--epochs", "20", "--out", str(out)]
    done = _stopped_by_sigterm(train, (out / "resume.pt").exists)
    state = torch.load(out / "resume.pt", weights_only=True)
    assert done.returncode == 130 and 1 <= state["epoch"] < 20
    assert _said(done) == [
        f"robustlab: stopped: {STOPPED_BY_SIGTERM}; the state after epoch {state['epoch']} "
        f"stays in {out / 'resume.pt'}; {RESUME}"
    ]
    assert not (out / "manifest.json").exists()

    ckpt = tmp_path / "ckpt"
    assert main(["train", "--no-progress", *MLP, "--epochs", "2", "--out", str(ckpt)]) == 0
    record = tmp_path / "r.json"
    progress = tmp_path / "r.json.progress.jsonl"
    evaluate = ["eval", "--no-progress", "--model", str(ckpt), "--data", "digits"]
    evaluate += ["--attack", "autoattack", "--attacks", "apgd-ce,apgd-dlr", "--norm", "l2"]
    evaluate += ["--eps", "1.0", "--points", "200", "--batch-size", "20", "--engine", "torch"]
    evaluate += ["--json", str(record)]

    def batches() -> int:
        """Finished batches in the progress file (its lines after the key line)."""
        return max(0, progress.read_text().count("\n") - 1) if progress.exists() else 0

    done = _stopped_by_sigterm(evaluate, lambda: batches() >= 1)
    assert done.returncode == 130 and done.stdout == "" and not record.exists()
    assert _said(done) == [
        f"robustlab: stopped: {STOPPED_BY_SIGTERM}; the finished batches stay in {progress}; "
        f"{RESUME}"
    ]
    finished = batches()
    assert 1 <= finished < 10
    assert main(evaluate) == 0
    assert json.loads(record.read_text())["resumed_batches"] == finished
    assert not progress.exists()


@pytest.mark.slow  # ~30 s: a torchrun run of 2 processes
def test_sigterm_to_torchrun_stops_every_process_and_is_said_once(tmp_path: Path) -> None:
    """torchrun passes SIGTERM on to both processes: each stops, rank 0 claims the run's voice
    and the other, finding it claimed, says nothing."""
    out = tmp_path / "mlp"
    train = ["train", "--no-progress", *MLP, "--method", "pgd-at", "--eps", "0.1"]
    train += ["--steps", "10", "--epochs", "20", "--out", str(out)]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = _stopped_by_sigterm(train, (out / "resume.pt").exists, launcher)
    state = torch.load(out / "resume.pt", weights_only=True)
    assert done.returncode != 0 and 1 <= state["epoch"] < 20
    assert _said(done) == [
        f"robustlab: stopped: {STOPPED_UNDER_TORCHRUN}; the state after epoch {state['epoch']} "
        f"stays in {out / 'resume.pt'}; {RESUME}"
    ]

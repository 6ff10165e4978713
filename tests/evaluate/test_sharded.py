"""Sharded evaluation under real torchrun runs of 2 gloo processes on this CPU machine: the
merged per-sample table equals one process's, a rank that dies stops the run with one
message and keeps its finished batches for the resume, and bad input is one sentence.

Every run uses one thread per process (as torchrun gives), so one process and two compute
the same floats; the single-process references run in this test process (one thread too).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from _torchrun import TIMEOUT_S, environment, free_port, torchrun, torchrun_command
from robustlab.cli import STOPPED_UNDER_TORCHRUN, main

#: AutoAttack's APGD members (random starts; at this eps each point's rows depend on them)
#: on 100 digits points in 5 batches: process 0 attacks batches 0, 2 and 4, process 1 the
#: batches 1 and 3.
AUTOATTACK = [
    "--attack", "autoattack", "--attacks", "apgd-ce,apgd-dlr", "--norm", "l2", "--eps", "1.0",
    "--points", "100", "--batch-size", "20", "--engine", "torch",
]  # fmt: skip
#: A robustness curve under Square with few queries: which points break depends on each
#: point's random draws, so on the composition of its batch; ONNX Runtime runs the queries.
SQUARE_CURVE = [
    "--attack", "square", "--queries", "60", "--eps", "0.05,0.1", "--points", "60",
    "--batch-size", "20", "--engine", "onnxruntime",
]  # fmt: skip


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small mlp trained on digits, as a checkpoint folder."""
    out = tmp_path_factory.mktemp("sharded") / "mlp"
    args = ["train", "--arch", "mlp", "--data", "digits", "--epochs", "3", "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    return out


def eval_args(ckpt: Path, options: list[str], json_path: Path) -> list[str]:
    """The arguments of one ``robustlab eval`` run."""
    base = ["eval", "--model", str(ckpt), "--data", "digits", "--no-progress"]
    return [*base, *options, "--json", str(json_path)]


def two_nodes(args: list[list[str]]) -> list[subprocess.CompletedProcess[str]]:
    """Two launchers of one process each, nodes 0 and 1 of a run on a loopback rendezvous
    (``args``: each node's robustlab arguments)."""
    port = str(free_port())
    launchers = [
        subprocess.Popen(
            torchrun_command(
                [
                    "--nnodes",
                    "2",
                    "--node_rank",
                    str(node),
                    "--nproc_per_node",
                    "1",
                    "--master_addr",
                    "127.0.0.1",
                    "--master_port",
                    port,
                ],  # fmt: skip
                node_args,
            ),
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node, node_args in enumerate(args)
    ]
    done = []
    try:
        for node, proc in enumerate(launchers):
            out, err = proc.communicate(timeout=TIMEOUT_S)
            done.append(subprocess.CompletedProcess(args[node], proc.returncode, out, err))
    finally:
        for proc in launchers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def rows(json_path: Path) -> list[str]:
    """The per-sample table written beside a record, one line per point and eps."""
    return json_path.with_suffix(".samples.csv").read_text().splitlines()


def records(json_path: Path) -> list[dict[str, Any]]:
    """The records of an eval run (one per eps)."""
    data = json.loads(json_path.read_text())
    return list(data["records"]) if "records" in data else [data]


def progress_files(json_path: Path) -> list[Path]:
    """Progress files of any run writing ``json_path``."""
    return sorted(json_path.parent.glob(json_path.name + ".progress*"))


def batch_lines(path: Path) -> int:
    """Finished batches in a progress file (its whole lines after the key line)."""
    return max(0, path.read_text().count("\n") - 1) if path.exists() else 0


def worker_of_rank(launcher: subprocess.Popen[str], rank: int) -> int | None:
    """The process id of the worker of this rank that a torchrun launcher started."""
    root = Path(f"/proc/{launcher.pid}/task")
    for task in root.iterdir():
        for child in (task / "children").read_text().split():
            try:
                variables = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in variables:
                return int(child)
    return None


@pytest.mark.parametrize(
    "killed", [1, pytest.param(0, marks=pytest.mark.slow)], ids=["rank-1", "rank-0"]
)
def test_killed_rank_stops_the_run_and_the_resume_equals_one_process(
    ckpt: Path, tmp_path: Path, killed: int
) -> None:
    """AutoAttack on 2 processes: one process killed with SIGKILL after its first batch; the
    run stops with one message (rank 0's, or the survivor's when rank 0 died) and both
    progress files keep their finished batches; one process may not resume them; 2 processes
    resume them, and the merged table equals one process's sample for sample."""
    single = tmp_path / "single.json"
    assert main(eval_args(ckpt, AUTOATTACK, single)) == 0
    sharded = tmp_path / "sharded.json"
    args = eval_args(ckpt, AUTOATTACK, sharded)
    launcher = subprocess.Popen(
        torchrun_command(["--standalone", "--nproc_per_node", "2"], args),
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    own = tmp_path / f"sharded.json.progress.rank{killed}-of-2.jsonl"
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and launcher.poll() is None:
            if batch_lines(own) >= 1:
                pid = worker_of_rank(launcher, killed)
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        out, err = launcher.communicate(timeout=TIMEOUT_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode != 0 and not sharded.exists(), "the run ended before the kill"
    said = [line for line in err.splitlines() if line.startswith("robustlab:")]
    assert out == "" and said == [
        f"robustlab: stopped: {STOPPED_UNDER_TORCHRUN}; the finished batches stay in "
        f"{tmp_path / 'sharded.json.progress.rank*-of-2.jsonl'}; run the same command again to "
        "resume"
    ]
    files = progress_files(sharded)
    assert [f.name.split(".progress.")[1] for f in files] == [
        "rank0-of-2.jsonl",
        "rank1-of-2.jsonl",
    ]
    finished = sum(batch_lines(f) for f in files)
    assert batch_lines(own) >= 1
    # the world size changed: one process refuses progress two processes wrote
    assert main(args) == 2
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in progress_files(sharded)]
    resumed = torchrun(args)
    assert resumed.returncode == 0, resumed.stderr
    assert rows(sharded) == rows(single)
    one, two = records(single)[0], records(sharded)[0]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["resumed_batches"] == finished
    steps = [[(s["attack"], s["broken"]) for s in r["per_attack"]] for r in (one, two)]
    assert steps[0] and steps[0] == steps[1]
    assert resumed.stdout.count("100 points, l2 eps=1.0") == 1  # rank 0 alone prints
    assert progress_files(sharded) == []


def test_more_processes_than_batches_is_one_sentence(ckpt: Path, tmp_path: Path) -> None:
    done = torchrun(eval_args(ckpt, ["--eps", "0.1", "--points", "10"], tmp_path / "r.json"))
    said = [line for line in done.stderr.splitlines() if line.startswith("robustlab:")]
    assert done.returncode != 0 and said == [
        "robustlab: error: torchrun started 2 processes but there is only 1 evaluation batch "
        "to share among them: start at most 1, or use a smaller batch size"
    ]
    assert progress_files(tmp_path / "r.json") == []


def test_two_launchers_on_one_machine_equal_one_process(ckpt: Path, tmp_path: Path) -> None:
    """Nodes 0 and 1 of a run, one process each, on the loopback rendezvous: a robustness
    curve under Square whose rows depend on each batch's make-up (another batch size changes
    them) equals one process's sample for sample."""
    single, other = tmp_path / "single.json", tmp_path / "other.json"
    assert main(eval_args(ckpt, SQUARE_CURVE, single)) == 0
    assert main(eval_args(ckpt, [*SQUARE_CURVE, "--batch-size", "15"], other)) == 0
    assert rows(other) != rows(single)
    sharded = tmp_path / "sharded.json"
    nodes = two_nodes([eval_args(ckpt, SQUARE_CURVE, sharded)] * 2)
    assert [n.returncode for n in nodes] == [0, 0], nodes[1].stderr
    assert rows(sharded) == rows(single)
    assert [r["world_size"] for r in records(sharded)] == [2, 2]
    assert records(sharded)[0]["engine"]["engine"] == "onnxruntime"
    assert nodes[1].stdout == "" and "points, linf eps=0.1" in nodes[0].stdout


@pytest.mark.slow  # ~25 s: two more launchers
def test_nodes_given_different_checkpoints_stop_with_one_sentence(
    ckpt: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    args = ["train", "--arch", "mlp", "--data", "digits", "--epochs", "1", "--out", str(other)]
    assert main([*args, "--no-progress"]) == 0
    out = tmp_path / "r.json"
    nodes = two_nodes([eval_args(ckpt, SQUARE_CURVE, out), eval_args(other, SQUARE_CURVE, out)])
    said = [line for n in nodes for line in n.stderr.splitlines() if line.startswith("robustlab:")]
    assert [n.returncode for n in nodes] != [0, 0] and said == [
        "robustlab: error: process 1 of the run evaluates another model, other points or another "
        "configuration than process 0: every process must be given the same checkpoint, data "
        "and options"
    ]
    assert not out.exists()


def test_commands_that_do_not_share_work_refuse_to_run_as_several_processes(
    ckpt: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """torchrun's variables say this is process 0 of 2: attack would do the whole work twice."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["attack", "--model", str(ckpt), "--eps", "0.1", "--save", str(tmp_path / "a.npz")]
    assert main(args) == 2
    assert capsys.readouterr().err == (
        "robustlab: error: robustlab attack does not share its work among processes, and "
        "torchrun started 2 of them: run it as one process (without torchrun); under torchrun "
        "run eval, train, transfer or sloth\n"
    )


MSA_SCRIPT = '''
import json, sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from robustlab.core.distributed import processes_of_run
from robustlab.data import load_data
from robustlab.evaluate import evaluate_msa
from robustlab.models.checkpoint import load_checkpoint


class HardDecision(nn.Module):
    """The base's decision as one-hot logits: no input gradient, the base its surrogate."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        z = self.base(x)
        return 10.0 * F.one_hot(z.argmax(1), z.shape[1]).to(z.dtype) + 0 * z


def run(processes=None):
    torch.set_num_threads(1)
    base = load_checkpoint(sys.argv[1]).model.eval()
    return evaluate_msa(
        HardDecision(base), load_data("digits").test, [("base", base)], norm="l2", eps=1.0,
        attacks=("apgd-ce",), n=60, batch_size=20, progress=False, engine="torch",
        processes=processes,
    )


if __name__ == "__main__":
    with processes_of_run("cpu") as (processes, _):
        record = run(processes)
        if processes.main:
            Path(sys.argv[2]).write_text(json.dumps([record.samples, record.world_size]))
'''


@pytest.mark.slow  # ~25 s: a torchrun run of a library script
def test_sharded_msa_equals_one_process(ckpt: Path, tmp_path: Path) -> None:
    """evaluate_msa from a script torchrun starts: the surrogate stage breaks what plain
    AutoAttack cannot, and the merged rows equal one process's."""
    script = tmp_path / "msa.py"
    script.write_text(MSA_SCRIPT)
    single, sharded = tmp_path / "single.json", tmp_path / "sharded.json"
    runs = []
    for launcher, out in (([], single), (["-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2"], sharded)):  # fmt: skip
        runs.append(
            subprocess.run(
                [sys.executable, *launcher, str(script), str(ckpt), str(out)],
                env=environment(),
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
                check=False,
            )
        )
    assert [r.returncode for r in runs] == [0, 0], runs[1].stderr
    (one, world_one), (two, world_two) = (json.loads(p.read_text()) for p in (single, sharded))
    assert (world_one, world_two) == (1, 2) and one == two
    assert any(str(row["broken_by"]).startswith("base/") for row in one)

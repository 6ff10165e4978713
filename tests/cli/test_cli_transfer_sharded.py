"""``robustlab transfer`` under real torchrun runs of 2 gloo processes on this CPU machine: the
merged matrix equals one process's, every cell's numbers and per-sample hits, rank 0 alone
trains the zoo models and speaks, and too many processes are one sentence before any work.

Every run uses one thread per process (as torchrun gives), so one process and two compute
the same floats; the single-process reference runs in this test process (one thread too).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from _torchrun import torchrun
from robustlab.cli import main

#: 100 digits points in 5 batches of 20: process 0 crafts batches 0, 2 and 4, process 1 the
#: batches 1 and 3. sgm+mi+di draws DI transformations from each batch's own seed.
MATRIX = [
    "transfer", "--sources", "resnet8", "--targets", "resnet8,mlp", "--attacks",
    "pgd,sgm+mi+di", "--data", "digits", "--epochs", "1", "--points", "100",
    "--batch-size", "20", "--steps", "3", "--seed", "3", "--engine", "torch", "--no-progress",
]  # fmt: skip


def said(stderr: str) -> list[str]:
    """The lines robustlab itself said on stderr (not torchrun's report)."""
    return [line for line in stderr.splitlines() if line.startswith("robustlab:")]


def test_two_processes_give_the_one_process_matrix(tmp_path: Path) -> None:
    """Two processes on an empty model cache: rank 0 trains each zoo model once, the other
    reuses it; the matrix equals the one a single process then computes with the same seed
    and batch size, cell for cell and hit for hit (a share crafted with other seeds, or a
    rank's share dropped, would change the hits); rank 0 alone prints and writes."""
    cache, plots = tmp_path / "cache", tmp_path / "plots"
    sharded = tmp_path / "sharded.json"
    args = [*MATRIX, "--cache", str(cache)]
    done = torchrun([*args, "--json", str(sharded), "--plots", str(plots)])
    assert done.returncode == 0, done.stderr
    single = tmp_path / "single.json"
    assert main([*args, "--json", str(single)]) == 0  # reuses the models rank 0 trained
    one, two = (json.loads(p.read_text()) for p in (single, sharded))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert len(two["cells"]) == 1 * 2 * 2
    assert two["cells"] == one["cells"]
    for cell in two["cells"]:
        assert len(cell["hits"]) == cell["n_all"] == 100
        assert cell["success_rate_all"] == cell["hits"].count("1") / 100
    assert (two["generations"], two["target_forwards"]) == (2, 2 * (1 + 2))
    assert set(two["craft_seconds"]) == set(one["craft_seconds"])
    assert done.stdout.count("untargeted transfer success (%) on 100 digits points") == 1
    assert "2 processes" in done.stdout
    training = [line for line in done.stderr.splitlines() if line.startswith("training ")]
    assert [line.split()[1] for line in training] == ["resnet8", "mlp"]
    assert "reusing" not in done.stderr
    assert sorted(p.name for p in plots.iterdir()) == ["transfer_heatmap.png"]


def test_more_processes_than_batches_is_one_sentence_before_any_training(
    tmp_path: Path,
) -> None:
    out, cache = tmp_path / "r.json", tmp_path / "cache"
    args = [*MATRIX, "--points", "10", "--cache", str(cache), "--json", str(out)]
    done = torchrun(args)
    assert done.returncode != 0 and said(done.stderr) == [
        "robustlab: error: torchrun started 2 processes but there is only 1 evaluation batch "
        "to share among them: start at most 1, or use a smaller batch size"
    ]
    assert done.stdout == "" and not out.exists()
    assert not any(cache.rglob("*.safetensors")), "a model was trained before the refusal"


def test_bad_input_is_said_once(tmp_path: Path) -> None:
    args: list[Any] = [*MATRIX, "--attacks", "pgd,foo", "--cache", str(tmp_path / "cache")]
    done = torchrun(args)
    assert done.returncode != 0 and said(done.stderr) == [
        "robustlab: error: unknown transfer attack 'foo' in 'foo'; join these with '+': "
        "pgd, ifgsm, bim, fgsm, i-fgsm, mi, di, ti, sgm, linbp"
    ]

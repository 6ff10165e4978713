"""DeepSloth slowdown runs in batches: each batch draws from its own seed, and under real
torchrun runs of 2 gloo processes the merged record equals one process's, sample for sample;
what cannot be shared is said in one sentence.

Every run uses one thread per process (as torchrun gives), so one process and two compute
the same floats; the single-process references run in this test process (one thread too).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from _torchrun import torchrun
from robustlab.analysis.efficiency import early_exit_all
from robustlab.analysis.slowdown import attack_variant, measure_slowdown
from robustlab.attacks.base import Attack
from robustlab.attacks.deepsloth import DeepSloth, ExitPGD
from robustlab.cli import main
from robustlab.data import DataSplits
from robustlab.models.multiexit import MultiExitNetwork

#: 60 digits test points in 3 batches (process 0 takes batches 0 and 2, process 1 batch 1),
#: every variant: DeepSloth with a second descent from a random start, the PGD baselines
#: (random starts), the universal and class-universal perturbations, the paper's attack.
SLOTH = [
    "--data", "digits", "--eps", "0.2", "--steps", "2", "--restarts", "2", "--points", "60",
    "--batch-size", "20", "--baselines", "--universal", "--class-universal",
    "--universal-samples", "100", "--universal-epochs", "1", "--latency-samples", "5",
    "--engine", "onnxruntime", "--seed", "3", "--no-progress",
]  # fmt: skip
#: What an efficiency record holds that is not computed from the points' outcomes: wall-clock
#: times (the engine's probe timed ONNX Runtime against PyTorch too).
TIMES = ("latency_ms", "latency_full_ms", "latency_saving", "engine")


@pytest.fixture(scope="module")
def multi_exit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small mlp trained on digits with exits attached and calibrated, as a checkpoint."""
    root = tmp_path_factory.mktemp("slowdown")
    common = ["--data", "digits", "--epochs", "2", "--no-progress"]
    assert main(["train", "--arch", "mlp", "--out", str(root / "bb"), *common]) == 0
    args = ["exits", "--model", str(root / "bb"), "--out", str(root / "me"), *common]
    assert main([*args, "--calibration", "100", "--latency-samples", "0"]) == 0
    return root / "me"


def without_times(record: dict[str, Any]) -> dict[str, Any]:
    """A sloth record's outcomes: every efficiency record without its wall-clock times, and
    the per-sample table (no seconds, dates, command line, engine or world size)."""
    runs = ["clean", "attacked", *record["extras"]]
    kept = {r: {k: v for k, v in record[r].items() if k not in TIMES} for r in runs}
    return {**kept, "per_sample": record["per_sample"], "extras": record["extras"]}


def test_each_batch_draws_from_its_own_seed(
    digits_multiexit: MultiExitNetwork, digits: DataSplits
) -> None:
    """The second batch of a run (points 20-39) is exactly each attack run on those points
    alone with the run's seed + 20, which draws other random starts than the seed itself."""
    model, data = digits_multiexit, digits.test
    attacks: dict[str, Attack] = {
        "deepsloth": DeepSloth(eps=0.2, steps=2, restarts=2, seed=3),
        "pgd-avg": ExitPGD(eps=0.2, steps=2, seed=3),
    }
    variants = {name: attack_variant(a, model) for name, a in attacks.items()}
    run = measure_slowdown(
        model, data, 40, variants, batch_size=20, seed=3, latency_samples=0, engine="torch"
    )
    x, y = data.x[20:40], data.y[20:40]

    def alone(attack: Any, seed: int) -> list[list[int]]:
        """Early predictions, exits and final predictions of the attack on points 20-39."""
        adv = replace(attack, seed=seed)(model, x, y)
        return [t.tolist() for t in early_exit_all(model, adv, batch_size=20, engine="torch")[:3]]

    unseeded = []
    for name, attack in attacks.items():
        got = [run.early[name][20:], run.exits[name][20:], run.final[name][20:]]
        assert got == alone(attack, 3 + 20), name
        unseeded.append(got == alone(attack, 3))
    assert not all(unseeded)  # the seed changes the outcomes: the check above has teeth


def test_two_processes_equal_one(multi_exit: Path, tmp_path: Path) -> None:
    """Every variant on 2 processes: the merged record equals one process's sample for
    sample (but for wall-clock times), rank 0 alone prints and writes it, once."""
    single, sharded = tmp_path / "single.json", tmp_path / "sharded.json"
    args = ["sloth", "--model", str(multi_exit), *SLOTH]
    assert main([*args, "--json", str(single)]) == 0
    done = torchrun([*args, "--json", str(sharded), "--plots", str(tmp_path / "plots")])
    assert done.returncode == 0, done.stderr
    one, two = (json.loads(p.read_text()) for p in (single, sharded))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["extras"] == [
        "universal", "class_universal", "pgd-final", "pgd-avg", "pgd-max", "deepsloth-uniform-pgd",
    ]  # fmt: skip
    assert without_times(two) == without_times(one)
    engines = [r["clean"]["engine"] for r in (one, two)]
    assert engines[0]["engine"] == engines[1]["engine"] == "onnxruntime"
    assert len(two["per_sample"]["exit"]["deepsloth-cost-apgd"]) == 60
    assert two["attacked"]["latency_samples"] == 5 and two["attacked"]["latency_ms"] > 0
    assert done.stdout.count("deepsloth-cost-apgd at linf eps=0.2") == 1
    assert done.stderr.count("60 test points") == 1
    assert (tmp_path / "plots" / "sloth_exit_histogram.png").exists()


def test_more_processes_than_batches_is_one_sentence(multi_exit: Path, tmp_path: Path) -> None:
    args = ["sloth", "--model", str(multi_exit), "--data", "digits", "--eps", "0.1"]
    out = tmp_path / "s.json"
    done = torchrun([*args, "--points", "10", "--batch-size", "20", "--json", str(out)])
    said = [line for line in done.stderr.splitlines() if line.startswith("robustlab:")]
    assert done.returncode != 0 and said == [
        "robustlab: error: torchrun started 2 processes but there is only 1 evaluation batch "
        "to share among them: start at most 1, or use a smaller batch size"
    ]
    assert not out.exists() and done.stdout == ""

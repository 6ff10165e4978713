"""Evaluation resume is keyed on the model's weights, the points and the configuration (never
a path), and a damaged, empty or cut-short progress file gets a sentence or a fresh start."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from robustlab.attacks import PGD
from robustlab.cli import eval as cli_eval
from robustlab.cli import main
from robustlab.data import Dataset
from robustlab.errors import RobustlabError
from robustlab.evaluate import evaluate_curve
from robustlab.models import build_model
from robustlab.models.checkpoint import model_config, save_checkpoint

BATCH = 10


class Killed(Exception):
    """Stands for kill -9 in the middle of an evaluation."""


class DiesAfter(PGD):
    """PGD that kills the evaluation when it reaches a given batch."""

    def __init__(self, batches: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.left = batches

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *a: Any, **k: Any) -> Any:
        """Attack as PGD would, until the evaluation is killed."""
        if self.left == 0:
            raise Killed
        self.left -= 1
        return super().run(model, x, y, *a, **k)


def toy() -> tuple[nn.Sequential, Dataset]:
    """A small model and 60 points it mostly classifies right."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    x = torch.rand(60, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, Dataset(x, y, 3, "npz:/home/me/data.npz")


def run(
    model: nn.Module, data: Dataset, progress: Path, path: str, attack: PGD | None = None
) -> Any:
    """One evaluation as the CLI runs it, the model named by ``path``."""
    return evaluate_curve(
        model,
        data,
        [attack or PGD(eps=0.1, steps=2)],
        batch_size=BATCH,
        progress=False,
        resume=progress,
        model_info={"path": path, "arch": "toy"},
    )[0]


def killed_run(model: nn.Module, data: Dataset, progress: Path, batches: int = 3) -> None:
    """An evaluation killed after ``batches`` finished batches."""
    with pytest.raises(Killed):
        run(model, data, progress, "/abs/ckpt", DiesAfter(batches, eps=0.1, steps=2))


def test_the_same_model_named_by_another_path_resumes(tmp_path: Path) -> None:
    model, data = toy()
    whole = run(model, data, tmp_path / "whole.progress", "ckpt")
    progress = tmp_path / "p.progress"
    killed_run(model, data, progress)
    renamed = Dataset(data.x, data.y, 3, "npz:data.npz")  # the data by a relative path too
    resumed = run(model, renamed, progress, "ckpt")
    assert resumed.resumed_batches == 3
    assert resumed.robust_accuracy == whole.robust_accuracy
    assert resumed.samples == whole.samples
    assert not progress.exists()


def test_other_weights_do_not_resume(tmp_path: Path) -> None:
    model, data = toy()
    progress = tmp_path / "p.progress"
    killed_run(model, data, progress)
    first = model[1]
    assert isinstance(first, nn.Linear)
    with torch.no_grad():
        first.bias.add_(0.01)
    with pytest.raises(RobustlabError, match="progress of a different evaluation"):
        run(model, data, progress, "/abs/ckpt")


@pytest.mark.parametrize("content", ["", "\n", '{"ke'], ids=["empty", "blank", "torn head"])
def test_an_empty_or_unfinished_progress_file_starts_afresh(tmp_path: Path, content: str) -> None:
    model, data = toy()
    whole = run(model, data, tmp_path / "whole.progress", "ckpt")
    progress = tmp_path / "p.progress"
    progress.write_text(content)
    again = run(model, data, progress, "ckpt")
    assert again.resumed_batches == 0 and again.robust_accuracy == whole.robust_accuracy


def test_a_line_cut_short_by_a_kill_is_redone_and_later_runs_still_resume(
    tmp_path: Path,
) -> None:
    model, data = toy()
    whole = run(model, data, tmp_path / "whole.progress", "ckpt")
    progress = tmp_path / "p.progress"
    killed_run(model, data, progress, batches=2)
    with open(progress, "a") as f:
        f.write('{"start": 20, "per_eps": {"0": {"ro')  # killed while writing batch 3
    killed_run(model, data, progress, batches=2)  # batches 3 and 4 finish, then killed again
    third = run(model, data, progress, "ckpt")
    assert third.resumed_batches == 4
    assert third.samples == whole.samples


def edit_line(progress: Path, number: int, change: Any) -> None:
    """Replace line ``number`` (1 = the head) of a progress file with change(old line)."""
    lines = progress.read_text().splitlines()
    lines[number - 1] = change(lines[number - 1])
    progress.write_text("\n".join(lines) + "\n")


def flip_robust(line: str) -> str:
    """A finished batch whose first point is claimed robust although misclassified."""
    batch = json.loads(line)
    row = batch["per_eps"]["0"]["rows"][0]
    row["robust"], row["final_pred"] = True, (row["label"] + 1) % 3
    return json.dumps(batch)


@pytest.mark.parametrize(
    ("line", "change", "match"),
    [
        (1, lambda _: "my own notes", "is not a robustlab progress file"),
        (1, lambda _: "[1, 2]", "is not a robustlab progress file"),
        (2, lambda _: "[]", r"damaged or was edited \(line 2\)"),
        (2, lambda _: "not json", r"damaged or was edited \(line 2\)"),
        (3, lambda s: s.replace('"start": 10', '"start": "10"'), r"\(line 3\)"),
        (3, lambda s: s.replace('"start": 10', '"start": 0'), r"\(line 3\)"),
        (2, lambda s: s.replace('"label": ', '"label": 7'), r"\(line 2\)"),
        (2, lambda s: s.replace('"rows": [', '"rows": [{}, '), r"\(line 2\)"),
        (2, flip_robust, r"\(line 2\)"),
    ],
    ids=["text", "list head", "list", "not json", "str start", "twice", "label", "rows", "robust"],
)
def test_a_tampered_progress_file_gets_a_sentence(
    tmp_path: Path, line: int, change: Any, match: str
) -> None:
    model, data = toy()
    progress = tmp_path / "p.progress"
    killed_run(model, data, progress)
    edit_line(progress, line, change)
    with pytest.raises(RobustlabError, match=match):
        run(model, data, progress, "/abs/ckpt")


def test_keep_resume_leaves_the_progress_for_the_caller(tmp_path: Path) -> None:
    model, data = toy()
    progress = tmp_path / "p.progress"
    evaluate_curve(
        model, data, [PGD(eps=0.1, steps=1)], progress=False, resume=progress, keep_resume=True
    )
    assert progress.exists()
    again = evaluate_curve(model, data, [PGD(eps=0.1, steps=1)], progress=False, resume=progress)
    assert again[0].resumed_batches == 1 and not progress.exists()


def test_the_cli_resumes_a_checkpoint_named_by_an_absolute_then_a_relative_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after evaluating (its --json could not be written), eval keeps the progress and
    a run naming the same checkpoint by a relative path resumes every batch, then removes it."""
    torch.manual_seed(0)
    model = build_model("mlp", 1, 10, 8)
    save_checkpoint(model, tmp_path / "m", {"model": model_config("mlp", 1, 10, 8, [0.0], [1.0])})
    monkeypatch.chdir(tmp_path)
    args = ["--data", "digits", "--eps", "0.1", "--steps", "2", "--n", "30", "--batch-size", "10"]
    args += ["--device", "cpu", "--no-progress"]
    assert main(["eval", "--model", "m", *args, "--json", "whole.json", "--no-resume"]) == 0

    def killed(path: Any, obj: Any) -> None:
        """The --json write, cut short by a kill."""
        raise Killed

    with monkeypatch.context() as patched:
        patched.setattr(cli_eval, "write_json", killed)
        with pytest.raises(Killed):
            main(["eval", "--model", str(tmp_path / "m"), *args, "--json", "r.json"])
    progress = tmp_path / "r.json.progress.jsonl"
    assert progress.exists() and not (tmp_path / "r.json").exists()
    assert main(["eval", "--model", "m", *args, "--json", "r.json"]) == 0
    resumed = json.loads((tmp_path / "r.json").read_text())
    whole = json.loads((tmp_path / "whole.json").read_text())
    assert resumed["resumed_batches"] == 3 and not progress.exists()
    assert resumed["robust_accuracy"] == whole["robust_accuracy"]
    assert (tmp_path / "r.samples.csv").read_text() == (tmp_path / "whole.samples.csv").read_text()

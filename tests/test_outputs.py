"""Outputs are checked before any work: never over an input, a folder, an unwritable place or
a file robustlab did not write (unless overwrite); resume state goes only after every output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from robustlab.data.datasets import source_path
from robustlab.errors import RobustlabError
from robustlab.evaluate.robust import is_samples_csv
from robustlab.io import (
    Output,
    check_outputs,
    is_robustlab_json,
    npz_with_keys,
    resume_state,
    write_json,
)
from robustlab.models import build_model
from robustlab.models.checkpoint import (
    MANIFEST,
    WEIGHTS,
    checkpoint_files,
    checkpoint_outputs,
    model_config,
    save_checkpoint,
)
from robustlab.report.html import is_robustlab_report
from robustlab.report.plots import is_robustlab_png
from robustlab.store import ResultStore, is_results_store


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A small checkpoint folder (an input of eval, attack, transfer, sloth)."""
    model = build_model("mlp", 1, 10, 8)
    return save_checkpoint(
        model, tmp_path / "m", {"model": model_config("mlp", 1, 10, 8, [0.0], [1.0])}
    )


def json_out(path: Path, option: str = "--json") -> Output:
    """An output the way a command's --json is declared."""
    return Output(path, option, ours=is_robustlab_json)


def test_an_output_that_is_an_input_file_is_refused_even_with_overwrite(ckpt: Path) -> None:
    before = (ckpt / MANIFEST).read_bytes()
    for overwrite in (False, True):
        with pytest.raises(RobustlabError, match="same file as the input"):
            check_outputs([json_out(ckpt / MANIFEST)], inputs=[ckpt], overwrite=overwrite)
    assert (ckpt / MANIFEST).read_bytes() == before


def test_a_file_inside_an_input_folder_is_an_input_through_links(
    ckpt: Path, tmp_path: Path
) -> None:
    link = tmp_path / "link.json"
    link.symlink_to(ckpt / MANIFEST)
    hard = tmp_path / "hard.safetensors"
    os.link(ckpt / WEIGHTS, hard)
    relative = Path(os.path.relpath(ckpt / WEIGHTS))
    for out in (link, hard, relative):
        with pytest.raises(RobustlabError, match="never writes over a file it reads"):
            check_outputs([json_out(out)], inputs=checkpoint_files(ckpt / MANIFEST))


def test_a_data_file_is_an_input(tmp_path: Path) -> None:
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 2, 2)), y=np.arange(4) % 2)
    assert source_path("digits") is None
    with pytest.raises(RobustlabError, match="same file as the input"):
        check_outputs([Output(data, "--save")], inputs=[source_path(f"npz:{data}")])


def test_a_report_over_its_own_store_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "s.sqlite"
    ResultStore(store).add({"kind": "eval"})
    out = Output(store, "--out", ours=is_robustlab_report)
    with pytest.raises(RobustlabError, match="--out .* same file as the input"):
        check_outputs([out], inputs=[store], overwrite=True)


def test_folders_and_unwritable_places_are_refused_before_work(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(RobustlabError, match="--json .*dir is a folder; give a file name"):
        check_outputs([json_out(tmp_path / "dir")])
    with pytest.raises(RobustlabError, match="cannot be written: .*file is a file, not a folder"):
        check_outputs([json_out(tmp_path / "file" / "deeper" / "r.json")])
    with pytest.raises(RobustlabError, match="--plots .*names a file; it must be a folder"):
        check_outputs([Output(tmp_path / "file", "--plots", folder=True)])
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "x.json")
    with pytest.raises(RobustlabError, match="broken link"):
        check_outputs([json_out(tmp_path / "dangling")])
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(RobustlabError, match="not a regular file"):
        check_outputs([json_out(fifo)], overwrite=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_folder_without_write_permission_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(RobustlabError, match="no permission to write"):
            check_outputs([json_out(locked / "r.json")])
    finally:
        locked.chmod(0o700)


def test_new_files_and_files_robustlab_wrote_pass(tmp_path: Path) -> None:
    ours = tmp_path / "ours.json"
    write_json(ours, {"kind": "eval", "robust_accuracy": 0.5})
    listing = tmp_path / "models.json"
    write_json(listing, [{"arch": "mlp"}, {"arch": "vit"}])
    outs = [json_out(ours), json_out(listing, "--json2"), json_out(tmp_path / "new" / "r.json")]
    assert check_outputs(outs) == outs
    assert json.loads(ours.read_text())["robustlab_version"]


def test_a_file_robustlab_did_not_write_needs_overwrite(tmp_path: Path) -> None:
    theirs = tmp_path / "notes.json"
    theirs.write_text(json.dumps({"my": "notes"}))
    with pytest.raises(RobustlabError, match="was not written by robustlab; pass --overwrite"):
        check_outputs([json_out(theirs)])
    assert check_outputs([json_out(theirs)], overwrite=True)
    csv = tmp_path / "samples.csv"
    csv.write_text("name,phone\n")
    with pytest.raises(RobustlabError, match="--samples"):
        check_outputs([Output(csv, "--samples", ours=is_samples_csv)])
    plain = tmp_path / "x.npz"
    np.savez(plain, a=np.zeros(2))
    with pytest.raises(RobustlabError, match="--save"):
        check_outputs([Output(plain, "--save", ours=npz_with_keys(["x_adv", "y"]))])
    png = tmp_path / "photo.png"
    from PIL import Image

    Image.new("L", (4, 4)).save(png)
    with pytest.raises(RobustlabError, match="--plots"):
        check_outputs([Output(png, "--plots", ours=is_robustlab_png)])


def test_the_same_output_named_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RobustlabError, match="--samples and --json both name"):
        check_outputs([json_out(tmp_path / "r.json"), Output(tmp_path / "r.json", "--samples")])


def test_a_store_output_must_be_a_robustlab_store_even_with_overwrite(tmp_path: Path) -> None:
    import sqlite3

    other = tmp_path / "app.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE users (name TEXT)")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    for path in (other, text):
        out = Output(path, "--store", ours=is_results_store, appends=True)
        with pytest.raises(RobustlabError, match="not one robustlab wrote"):
            check_outputs([out], overwrite=True)
    ours = tmp_path / "results.sqlite"
    ResultStore(ours)
    check_outputs([Output(ours, "--store", ours=is_results_store, appends=True)])


def test_a_record_never_replaces_another_checkpoints_manifest(ckpt: Path) -> None:
    with pytest.raises(RobustlabError, match="was not written by robustlab"):
        check_outputs([json_out(ckpt / MANIFEST)], inputs=["elsewhere"])


def test_checkpoint_outputs_recognise_robustlab_checkpoints(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(
        RobustlabError, match="is a trained checkpoint's manifest; pass --overwrite"
    ):
        check_outputs(checkpoint_outputs(ckpt))  # a finished checkpoint is kept
    check_outputs(checkpoint_outputs(ckpt), overwrite=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / WEIGHTS).write_bytes(b"someone else's weights")
    with pytest.raises(RobustlabError, match="was not written by robustlab"):
        check_outputs(checkpoint_outputs(foreign))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RobustlabError, match="names a file; it must be a folder"):
        check_outputs(checkpoint_outputs(tmp_path / "afile"))


def test_resume_state_is_removed_only_after_the_block_finished(tmp_path: Path) -> None:
    progress = tmp_path / "r.json.progress.jsonl"
    progress.write_text('{"key": "k"}\n')
    with pytest.raises(OSError), resume_state(progress) as held:
        assert held == progress
        raise OSError("the --json write failed")
    assert progress.exists()  # kept: the next run resumes
    with resume_state(progress):
        pass
    assert not progress.exists()

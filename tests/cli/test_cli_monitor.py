"""robustlab monitor: end to end on mnist5k (JSON lines, summary record, store, report, plot),
and one-sentence errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from robustlab.cli import main
from robustlab.monitor import BUILTIN
from robustlab.report.html import render_report
from robustlab.report.plots import is_robustlab_png
from robustlab.store import ResultStore


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLP trained on mnist5k by robustlab train, 500 training points held out."""
    out = tmp_path_factory.mktemp("monitor") / "net"
    args = ["train", "--arch", "mlp", "--data", "mnist5k", "--epochs", "3", "--calibration"]
    args += ["500", "--arch-option", "width=32", "--arch-option", "depth=1", "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    return out


def _monitor(net: Path, out: Path, *extra: str) -> list[str]:
    """The monitor command line on mnist5k, 100 permutations per batch."""
    args = ["monitor", "--model", str(net), "--reference", "mnist5k", "--permutations", "100"]
    return [*args, "--out", str(out), "--no-progress", *extra]


def test_monitor_writes_a_line_per_batch_then_the_summary_into_store_and_report(
    net: Path, tmp_path: Path
) -> None:
    out, store = tmp_path / "drift.jsonl", tmp_path / "s.sqlite"
    extra = ["--shift", "noise:0.3", "--shift-start", "6", "--batch-size", "100"]
    extra += ["--store", str(store), "--json", str(tmp_path / "d.json")]
    assert main(_monitor(net, out, *extra, "--plot", str(tmp_path / "d.png"))) == 0
    lines = [json.loads(t) for t in out.read_text().splitlines()]
    batches, summary = lines[:-1], lines[-1]
    assert [b["kind"] for b in batches] == ["drift_batch"] * 10 and summary["kind"] == "drift"
    assert [b["batch"] for b in batches] == list(range(10))
    assert [b["shifted"] for b in batches] == [False] * 6 + [True] * 4
    for b in batches:
        assert set(b["statistics"]) == set(BUILTIN) and b["size"] == 100
        assert set(b["alarms"]) == {k for k, s in b["statistics"].items() if s["alarm"]}
    assert all(b["alarm"] for b in batches[6:])
    assert summary == json.loads((tmp_path / "d.json").read_text())
    assert summary["reference"] == {"data": "mnist5k", "split": "calibration", "points": 500}
    assert summary["shift"] == "noise:0.3" and summary["detection_rate"] == 1.0
    assert summary["alarmed"] == sum(b["alarm"] for b in batches)
    stored = ResultStore(store, read_only=True).records(kind="drift")
    assert len(stored) == 1 and stored[0]["per_statistic"] == summary["per_statistic"]
    page = render_report(ResultStore(store, read_only=True), tmp_path / "r.html").read_text()
    assert "<h2>Drift monitoring</h2>" in page and 'alt="drift alarms"' in page
    assert is_robustlab_png(tmp_path / "d.png")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--stream", "digits"],
            "the stream digits has 1x8x8 inputs but the reference mnist5k has 1x28x28",
        ),
        (["--alpha", "0"], "alpha (the per-batch false-alarm rate) must be in (0, 1), got 0"),
        (["--alpha", "1.5"], "must be in (0, 1), got 1.5"),
        (
            ["--batch-size", "5000"],
            "the batch size 5000 is larger than the stream (1000 held-out inputs)",
        ),
        (["--shift", "fog:1"], "shift 'fog:1' is not one of"),
        (["--shift-start", "3"], "--shift-start says when --shift begins; give --shift as well"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_code_2(
    net: Path, tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "drift.jsonl"
    assert main(_monitor(net, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("robustlab: error: ") and len(err.splitlines()) == 1
    assert message in err
    assert not out.exists()


def test_out_replaces_its_own_lines_but_not_a_file_robustlab_did_not_write(
    net: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "drift.jsonl"
    run = _monitor(net, out, "--batches", "2", "--permutations", "20")
    assert main(run) == 0 and main(run) == 0  # a rerun replaces its own lines
    assert len(out.read_text().splitlines()) == 3
    other = tmp_path / "notes.jsonl"
    other.write_text('{"mine": 1}\n')
    assert main(_monitor(net, other, "--batches", "2", "--permutations", "20")) == 2
    assert "--out" in capsys.readouterr().err and other.read_text() == '{"mine": 1}\n'


def test_a_fitted_detector_adds_its_scores_to_the_monitored_statistics(
    net: Path, tmp_path: Path
) -> None:
    """monitor --detector: each detector of the artifact is one more statistic per batch."""
    det = tmp_path / "det"
    fit = ["detect", "fit", "--model", str(net), "--data", "mnist5k", "--detectors"]
    assert main([*fit, "margin,squeeze", "--out", str(det), "--no-progress"]) == 0
    out = tmp_path / "drift.jsonl"
    extra = ["--detector", str(det), "--shift", "noise:0.3", "--batch-size", "100"]
    assert main(_monitor(net, out, *extra, "--batches", "3")) == 0
    lines = [json.loads(t) for t in out.read_text().splitlines()]
    for b in lines[:-1]:
        assert set(b["statistics"]) == {*BUILTIN, "score:margin", "score:squeeze"}
    assert lines[-1]["detector"] == str(det)
    assert any(b["statistics"]["score:squeeze"]["alarm"] for b in lines[:-1])


def test_a_detector_fitted_on_another_model_is_refused(
    net: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    args = ["train", "--arch", "mlp", "--data", "mnist5k", "--epochs", "1", "--calibration"]
    args += ["500", "--arch-option", "width=16", "--arch-option", "depth=1", "--out", str(other)]
    assert main([*args, "--no-progress"]) == 0
    det = tmp_path / "det"
    fit = ["detect", "fit", "--model", str(other), "--data", "mnist5k", "--detectors"]
    assert main([*fit, "margin", "--out", str(det), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(_monitor(net, tmp_path / "d.jsonl", "--detector", str(det))) == 2
    assert "cannot score" in capsys.readouterr().err

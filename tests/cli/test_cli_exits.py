"""robustlab exits (and sloth): end to end on digits, and one-sentence errors with exit code 2."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import robustlab
from robustlab.cli import main
from robustlab.errors import RobustlabError
from robustlab.models.multiexit import MultiExitNetwork
from robustlab.report import exit_plots
from robustlab.store import ResultStore


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exits") / "bb"
    args = ["train", "--arch", "resnet8", "--data", "digits", "--epochs", "4"]
    args += ["--arch-option", "width=8", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def multi_exit(backbone: Path) -> tuple[Path, dict[str, object]]:
    out = backbone.parent / "me"
    record = backbone.parent / "me.json"
    args = ["exits", "--model", str(backbone), "--data", "digits", "--out", str(out)]
    args += ["--epochs", "4", "--calibration", "200", "--latency-samples", "20"]
    args += ["--json", str(record), "--no-progress"]
    assert main(args) == 0
    return out, json.loads(record.read_text())


def test_exits_writes_a_calibrated_multi_exit_checkpoint(
    multi_exit: tuple[Path, dict[str, object]],
) -> None:
    out, manifest = multi_exit
    model = robustlab.load(out)
    assert isinstance(model, MultiExitNetwork)
    calibration = manifest["calibration"]
    assert isinstance(calibration, dict)
    # thresholds come from the held-out calibration split, never from the test split
    assert calibration["samples"] == 200 and calibration["split"].endswith("/calibration")
    assert model.threshold == calibration["thresholds"]["5%"]
    assert set(calibration["thresholds"]) == {"5%", "15%"}
    assert calibration["seen_by_backbone"] is True  # `robustlab train` held nothing out
    dataset = manifest["dataset"]
    assert isinstance(dataset, dict) and dataset["calibration_size"] == 200
    metrics = manifest["metrics"]
    assert isinstance(metrics, dict)
    rec = metrics["early_exit_test"]["5%"]
    assert abs(sum(rec["exit_fractions"]) - 1) < 1e-9 and 0 <= rec["efficacy"] <= 1
    assert (out / "exit_histogram.png").stat().st_size > 0
    assert (out / "efficacy_curve.png").stat().st_size > 0


def test_exits_after_every_block(backbone: Path, tmp_path: Path) -> None:
    args = ["exits", "--model", str(backbone), "--data", "digits", "--out", str(tmp_path / "a")]
    args += ["--exits", "all", "--epochs", "1", "--calibration", "100", "--latency-samples", "0"]
    assert main([*args, "--no-progress"]) == 0
    model = robustlab.load(tmp_path / "a")
    assert isinstance(model, MultiExitNetwork) and model.positions == [0, 1, 2]


def test_backbone_trained_with_the_calibration_split_held_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bb = tmp_path / "bb"
    args = ["train", "--arch", "mlp", "--data", "digits", "--epochs", "1", "--out", str(bb)]
    assert main([*args, "--calibration", "150", "--data-seed", "3", "--no-progress"]) == 0
    dataset = json.loads((bb / "manifest.json").read_text())["dataset"]
    assert dataset["calibration_size"] == 150 and dataset["seed"] == 3
    capsys.readouterr()

    def exits(out: str, *extra: str) -> dict[str, Any]:
        cmd = ["exits", "--model", str(bb), "--data", "digits", "--out", str(tmp_path / out)]
        cmd += ["--epochs", "1", "--latency-samples", "0", "--no-progress", *extra]
        assert main(cmd) == 0
        manifest = json.loads((tmp_path / out / "manifest.json").read_text())
        assert isinstance(manifest, dict)
        return manifest

    # by default, exits calibrate on exactly the split the backbone never trained on
    same = exits("same")
    assert same["calibration"]["samples"] == 150 and same["dataset"]["seed"] == 3
    assert same["calibration"]["seen_by_backbone"] is False
    assert same["dataset"]["train_size"] == dataset["train_size"]
    assert "note:" not in capsys.readouterr().err
    # another seed draws other samples, some of which the backbone trained on: flagged
    other = exits("other", "--data-seed", "0")
    assert other["calibration"]["seen_by_backbone"] is True
    assert "another calibration split held out (150 samples, seed 3)" in capsys.readouterr().err


def test_resume_refuses_another_training_split(tmp_path: Path) -> None:
    from robustlab.data import load_data
    from robustlab.errors import RobustlabError
    from robustlab.train import TrainConfig, train

    cfg = TrainConfig(arch="mlp", data="digits", epochs=2)
    held = load_data("digits", calibration=100, seed=1)
    train(cfg, tmp_path, splits=held, progress=False, stop_after_epochs=1)
    with pytest.raises(RobustlabError, match="another training split"):
        train(cfg, tmp_path, splits=load_data("digits"), progress=False)
    done = train(cfg, tmp_path, splits=held, progress=False)  # the same split resumes
    assert done.manifest["dataset"]["calibration_size"] == 100


def test_other_commands_accept_the_multi_exit_checkpoint(
    multi_exit: tuple[Path, dict[str, object]], tmp_path: Path
) -> None:
    out, _ = multi_exit
    args = ["eval", "--model", str(out), "--data", "digits", "--eps", "0.1", "--steps", "2"]
    args += ["--n", "40", "--json", str(tmp_path / "e.json"), "--no-progress"]
    assert main(args) == 0
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 40


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--exits", "1,9"], "do not fit this backbone"),
        (["--calibration", "0"], "calibration split is empty"),
        (["--drops", "0.05,abc"], "comma-separated numbers"),
        (["--drop", "1.5"], "relative accuracy drop must lie in"),
        (["--rule", "margin"], "unknown exit rule"),
        (["--mode", "heads"], "unknown exit training mode"),
    ],
)
def test_bad_input_gives_one_sentence_and_exit_code_2(
    backbone: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    args = ["exits", "--model", str(backbone), "--data", "digits", "--out", str(tmp_path / "o")]
    args += ["--epochs", "1", "--latency-samples", "0", "--no-progress", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("robustlab: error")]) == 1


def test_exits_refuses_a_multi_exit_checkpoint_as_backbone(
    multi_exit: tuple[Path, dict[str, object]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = multi_exit
    args = ["exits", "--model", str(out), "--data", "digits", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "already has exits" in capsys.readouterr().err


def test_sloth_reports_clean_and_attacked(
    multi_exit: tuple[Path, dict[str, object]], tmp_path: Path
) -> None:
    out, _ = multi_exit
    record = tmp_path / "s.json"
    args = ["sloth", "--model", str(out), "--data", "digits", "--norm", "linf", "--eps", "0.1"]
    args += ["--n", "40", "--steps", "5", "--latency-samples", "10", "--universal"]
    args += ["--universal-samples", "100", "--universal-epochs", "1", "--plots", str(tmp_path)]
    args += ["--json", str(record), "--no-progress"]
    assert main(args) == 0
    rec = json.loads(record.read_text())
    assert rec["variant"] == "deepsloth-cost-apgd"
    for part in ("clean", "attacked", "universal"):
        for key in (
            "efficacy",
            "avg_flops",
            "exit_fractions",
            "accuracy_final",
            "accuracy_early_exit",
            "latency_ms",
        ):
            assert key in rec[part], (part, key)
    assert rec["attacked"]["efficacy"] <= rec["clean"]["efficacy"] + 1e-9
    assert (tmp_path / "sloth_exit_histogram.png").exists()


def test_sloth_store_renders_a_report_section(
    multi_exit: tuple[Path, dict[str, object]], tmp_path: Path
) -> None:
    out, _ = multi_exit
    store = tmp_path / "r.sqlite"
    args = ["sloth", "--model", str(out), "--data", "digits", "--eps", "0.1", "--n", "30"]
    args += ["--steps", "3", "--latency-samples", "5", "--baselines", "--no-progress"]
    assert main([*args, "--store", str(store), "--label", "digits <probe>"]) == 0
    assert main([*args, "--store", str(store), "--latency-samples", "0"]) == 0
    page_path = tmp_path / "report.html"
    assert main(["report", "--store", str(store), "--out", str(page_path)]) == 0
    page = page_path.read_text()
    assert "<h2>DeepSloth: digits &lt;probe&gt;</h2>" in page
    assert "<h2>DeepSloth</h2>" in page
    assert page.count('alt="exit histogram"') == 2 and page.count('alt="efficacy curves"') == 2
    assert "data: digits" in page
    # one table row per run: clean, our default, the three PGD baselines, the paper's attack
    for label in ("clean", "deepsloth-cost-apgd", "deepsloth-uniform-pgd"):
        assert page.count(f"<td class=l>{label}</td>") == 2, label
    assert page.count("<td class=l>pgd-") == 6
    # latency is shown only where it was measured
    rows = re.findall(r"<tr><td class=l>clean</td>(.*?)</tr>", page)
    assert "–" not in rows[0].split("</td>")[4] and "–" in rows[1].split("</td>")[4]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--eps", "-0.1"], "eps must be"),
        (["--eps", "0.1", "--objective", "flat"], "DeepSloth objective"),
        (["--eps", "0.1", "--threshold", "0"], "threshold must lie in"),
        (["--eps", "0.1", "--drop", "0.5"], "no threshold calibrated for a 50% drop"),
        (["--eps", "0.1", "--n", "0"], "n must be between"),
    ],
)
def test_sloth_bad_input(
    multi_exit: tuple[Path, dict[str, object]],
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    out, _ = multi_exit
    assert main(["sloth", "--model", str(out), "--data", "digits", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_sloth_refuses_a_plain_model(backbone: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sloth", "--model", str(backbone), "--data", "digits", "--eps", "0.1"]) == 2
    assert "not a multi-exit checkpoint" in capsys.readouterr().err


def test_a_sloth_plot_that_fails_never_costs_the_records(
    multi_exit: tuple[Path, dict[str, object]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The JSON record and the store row come first; the other plot is still drawn."""
    out, _ = multi_exit

    def broken(*args: object, **kw: object) -> Path:
        """An exit histogram that cannot be drawn."""
        raise RobustlabError("could not draw the exit histogram plot (ValueError: bad)")

    monkeypatch.setattr(exit_plots, "exit_histogram", broken)
    args = ["sloth", "--model", str(out), "--data", "digits", "--eps", "0.1", "--n", "20"]
    args += ["--steps", "2", "--latency-samples", "0", "--no-progress"]
    args += ["--json", str(tmp_path / "s.json"), "--store", str(tmp_path / "s.sqlite")]
    assert main([*args, "--plots", str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err
    assert "exit histogram" in err and "records were written" in err and "Traceback" not in err
    assert json.loads((tmp_path / "s.json").read_text())["kind"] == "sloth"
    assert [r["kind"] for r in ResultStore(tmp_path / "s.sqlite").records()] == ["sloth"]
    assert (tmp_path / "plots" / "sloth_efficacy_curve.png").exists()


def test_sloth_checks_the_surrogate_fits_the_data_before_attacking(
    multi_exit: tuple[Path, dict[str, object]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A surrogate built for other inputs is refused with a sentence, not a torch traceback."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(200, 3, 10, 10), dtype=np.uint8)
    np.savez(tmp_path / "other.npz", x=x, y=np.arange(200) % 4)
    data = f"npz:{tmp_path / 'other.npz'}"
    bb, me = tmp_path / "bb", tmp_path / "me"
    common = ["--data", data, "--epochs", "1", "--no-progress"]
    assert main(["train", "--arch", "mlp", "--out", str(bb), *common]) == 0
    assert (
        main(["exits", "--model", str(bb), "--out", str(me), "--calibration", "50", *common]) == 0
    )
    args = ["sloth", "--model", str(multi_exit[0]), "--data", "digits", "--surrogate", str(me)]
    assert main([*args, "--eps", "0.1", "--n", "4", "--no-progress"]) == 2
    assert "the model takes 3x10x10 inputs but digits has 1x8x8 images" in capsys.readouterr().err


def test_exits_keeps_a_finished_checkpoint_unless_told_to_overwrite(
    backbone: Path, multi_exit: tuple[Path, dict[str, object]], capsys: pytest.CaptureFixture[str]
) -> None:
    out = multi_exit[0]
    before = (out / "manifest.json").read_bytes()
    args = ["exits", "--model", str(backbone), "--data", "digits", "--out", str(out)]
    assert main([*args, "--epochs", "1", "--no-progress"]) == 2
    assert "is a trained checkpoint's manifest; pass --overwrite" in capsys.readouterr().err
    assert (out / "manifest.json").read_bytes() == before

"""``robustlab transfer`` end to end on digits, and one-sentence errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from robustlab.cli import main
from robustlab.errors import RobustlabError
from robustlab.models import build_model
from robustlab.models.checkpoint import model_config, save_checkpoint
from robustlab.report import transfer_plots
from robustlab.store import ResultStore

FAST = ["--data", "digits", "--epochs", "1", "--n", "40", "--steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One matrix (training resnet8 and mlp on digits into the private cache); its JSON, plots."""
    out = tmp_path_factory.mktemp("transfer")
    args = [
        "transfer",
        "--sources",
        "resnet8",
        "--targets",
        "resnet8,mlp",
        "--attacks",
        "pgd,sgm+mi+di",
        "--json",
        str(out / "t.json"),
        "--plots",
        str(out / "plots"),
        *FAST,
    ]
    assert main(args) == 0
    return out / "t.json", out / "plots"


def test_transfer_writes_cells_table_and_plots(
    first_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    json_path, plots = first_run
    record = json.loads(json_path.read_text())
    cells = record["cells"]
    assert len(cells) == 1 * 2 * 2
    for c in cells:
        assert {"source", "target", "attack", "success_rate", "n", "success_rate_all"} <= set(c)
        assert c["white_box"] == (c["target"] == "resnet8")
    sgm = [c for c in cells if c["attack"] == "sgm+mi+di"]
    assert all(c["gamma"] == 0.2 for c in sgm)
    assert record["generations"] == 2 and record["target_forwards"] == 2 * (1 + 2)
    assert (plots / "transfer_heatmap.png").exists()
    assert set(record["models"]) == {"resnet8", "mlp"}


def test_second_run_reuses_the_models_and_sweeps_gamma(
    first_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["transfer", "--sources", "resnet8", "--targets", "mlp", "--attacks", "sgm"]
    args += ["--gamma", "0.5,1.0", "--plots", str(tmp_path), "--json", str(tmp_path / "g.json")]
    assert main(args + FAST) == 0
    captured = capsys.readouterr()
    assert "reusing resnet8" in captured.err and "training" not in captured.err
    assert "sgm (gamma 0.5)" in captured.out and "cost: 2 attack generations" in captured.out
    assert [c["gamma"] for c in json.loads((tmp_path / "g.json").read_text())["cells"]] == [
        0.5,
        1.0,
    ]
    assert (tmp_path / "gamma_sweep.png").exists()


def test_checkpoint_paths_and_ensembles(
    first_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "mlp-ckpt"
    assert (
        main(
            ["train", "--arch", "mlp", "--data", "digits", "--epochs", "1"]
            + ["--out", str(ckpt), "--no-progress"]
        )
        == 0
    )
    args = ["transfer", "--sources", "resnet8+mlp", "--targets", f"{ckpt},mlp"]
    args += ["--attacks", "mi", "--targeted", "--json", str(tmp_path / "e.json")]
    assert main(args + FAST) == 0
    cells = json.loads((tmp_path / "e.json").read_text())["cells"]
    assert [(c["source"], c["target"], c["white_box"]) for c in cells] == [
        ("resnet8+mlp", str(ckpt), False),
        ("resnet8+mlp", "mlp", True),
    ]


def _fails(args: list[str], capsys: pytest.CaptureFixture[str], message: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("robustlab: error: ") and message in last, err
    assert "Traceback" not in err and err.count("robustlab: error") == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sources", "resnet9", "--targets", "mlp"], "unknown model 'resnet9'"),
        (["--sources", "resnet8", "--targets", "mlp:fancy-at"], "unknown training method"),
        (["--sources", "resnet8", "--targets", "nope/model"], "nope/model does not exist"),
        (
            ["--sources", "resnet8", "--targets", "mlp", "--attacks", "pgd,foo"],
            "unknown transfer attack 'foo'",
        ),
        (["--sources", "resnet8", "--targets", "mlp", "--gamma", "0"], "gamma must lie in (0, 1]"),
        (
            ["--sources", "resnet8", "--targets", "mlp", "--gamma", "0.5,1.5"],
            "gamma must lie in (0, 1]",
        ),
        (["--sources", "resnet8", "--targets", "mlp", "--gamma", "abc"], "--gamma must be"),
        (
            ["--sources", "resnet8", "--targets", "mlp", "--attacks", "pgd", "--gamma", "0.5"],
            "no attack in --attacks uses sgm",
        ),
        (["--sources", "resnet8", "--targets", "mlp", "--eps", "-1"], "eps must be"),
    ],
)
def test_bad_input_before_any_work(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _fails(["transfer", *extra, *FAST], capsys, message)


def test_bad_models_after_loading(
    first_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = build_model("mlp", image_size=28)
    config = model_config("mlp", 1, 10, 28, [0.0], [1.0])
    save_checkpoint(big, tmp_path / "big", {"model": config})
    args = ["transfer", "--sources", "resnet8", "--targets", str(tmp_path / "big"), *FAST]
    _fails(args, capsys, "takes 1x28x28 inputs, but the sources (resnet8) take 1x8x8 inputs")
    _fails(
        ["transfer", "--sources", "mlp", "--targets", "resnet8", "--attacks", "sgm", *FAST],
        capsys,
        "attack 'sgm' on source 'mlp'",
    )


def test_help_lists_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["transfer", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--sources", "--targets", "--attacks", "--gamma", "--eps", "--json", "--seed"):
        assert flag in out
    # the foreign-model options, each repeatable as VALUE or MEMBER=VALUE in transfer alone
    assert "--weights [MEMBER=]FILE" in out and "MEMBER=VALUE only to MEMBER" in " ".join(
        out.split()
    )
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "--weights FILE" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("sources", "attacks", "message"),
    [
        ("vgg", "sgm", "attack 'sgm' on source 'vgg'"),
        ("mlp+vgg", "pgd,linbp", "attack 'linbp' on source 'mlp+vgg'"),
    ],
)
def test_structure_is_checked_before_any_training(
    sources: str, attacks: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SGM and LinBP need residual blocks: said from the untrained architecture, nothing trained."""
    cache = tmp_path / "cache"
    args = ["transfer", "--sources", sources, "--targets", "mlp", "--attacks", attacks]
    _fails([*args, "--cache", str(cache), *FAST], capsys, message)
    assert not cache.exists() or not any(cache.iterdir())


def test_output_paths_are_checked_before_any_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    (tmp_path / "file").write_text("")
    base = ["transfer", "--sources", "mlp", "--targets", "mlp", "--cache", str(cache), *FAST]
    _fails([*base, "--json", str(tmp_path)], capsys, "is a folder")
    _fails([*base, "--plots", str(tmp_path / "file")], capsys, "names a file; it must be a folder")
    _fails([*base, "--store", str(tmp_path / "file" / "s.sqlite")], capsys, "cannot be written")
    assert not cache.exists() or not any(cache.iterdir())


def test_the_batch_size_is_checked_before_any_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    base = ["transfer", "--sources", "mlp", "--targets", "mlp", "--cache", str(cache), *FAST]
    _fails([*base, "--batch-size", "0"], capsys, "batch size must be >= 1, got 0")
    assert not cache.exists() or not any(cache.iterdir())


def test_a_plot_that_fails_never_costs_the_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The JSON record and the store row are written before any plot is drawn."""
    ckpt = save_checkpoint(
        build_model("mlp", 1, 10, 8),
        tmp_path / "m",
        {"model": model_config("mlp", 1, 10, 8, [0.0], [1.0])},
    )

    def broken(*args: object, **kw: object) -> Path:
        """A heatmap that cannot be drawn."""
        raise RobustlabError("could not draw the transfer heatmap plot (ValueError: bad)")

    monkeypatch.setattr(transfer_plots, "transfer_heatmap", broken)
    args = ["transfer", "--sources", str(ckpt), "--targets", str(ckpt), "--attacks", "pgd"]
    args += ["--json", str(tmp_path / "t.json"), "--store", str(tmp_path / "s.sqlite")]
    _fails([*args, "--plots", str(tmp_path / "plots"), *FAST], capsys, "records were written")
    assert len(json.loads((tmp_path / "t.json").read_text())["cells"]) == 1
    assert [r["kind"] for r in ResultStore(tmp_path / "s.sqlite").records()] == ["transfer"]


def test_an_unhashed_checkpoint_is_used_only_when_trusted_and_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = save_checkpoint(
        build_model("mlp", 1, 10, 8),
        tmp_path / "m",
        {"model": model_config("mlp", 1, 10, 8, [0.0], [1.0])},
    )
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["weights"]["sha256"] = ""
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    args = ["transfer", "--sources", str(ckpt), "--targets", str(ckpt), "--attacks", "pgd"]
    args += ["--json", str(tmp_path / "t.json"), *FAST]
    _fails(args, capsys, "load it only if you trust it")
    assert main([*args, "--trust-unhashed"]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["models"][str(ckpt)]["trusted_unhashed"]

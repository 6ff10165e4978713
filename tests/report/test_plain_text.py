"""Text from users is shown as text in every plot (no mathtext), and a plot that cannot be
drawn never stops a report from being written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from robustlab.errors import RobustlabError
from robustlab.report import curves, render_report
from robustlab.report.exit_plots import efficacy_curves, exit_histogram
from robustlab.report.plots import is_robustlab_png, plot, robustness_curve
from robustlab.report.transfer_plots import gamma_sweep_plot, transfer_heatmap
from robustlab.store import ResultStore

TEX = r"$\foo{$"  # mathtext would fail to parse this


def efficiency(names: list[str]) -> dict[str, Any]:
    """A minimal efficiency record as the exit plots read it."""
    return {
        "exit_fractions": [0.5, 0.5],
        "exit_names": names,
        "exit_flops": [1.0, 2.0],
        "efficacy": 0.6,
    }


TRANSFER = {
    "cells": [
        {"source": TEX, "target": TEX, "attack": "sgm", "gamma": g, "success_rate": 0.5}
        | {"success_rate_all": 0.4, "white_box": False}
        for g in (0.2, 1.0)
    ],
    "targets": [TEX],
}


@pytest.mark.parametrize(
    ("draw", "data", "kw"),
    [
        (robustness_curve, {TEX: [(0.0, 1.0), (0.1, 0.5)]}, {"xlabel": TEX, "title": TEX}),
        (exit_histogram, {TEX: efficiency([TEX, "$x"])}, {"title": TEX}),
        (efficacy_curves, {TEX: efficiency([TEX, "$x"])}, {"title": TEX}),
        (transfer_heatmap, TRANSFER, {"title": TEX}),
        (gamma_sweep_plot, TRANSFER, {"title": TEX}),
    ],
    ids=["curve", "histogram", "efficacy", "heatmap", "gamma"],
)
def test_user_text_is_plain_text_in_every_plot(
    draw: Any, data: Any, kw: dict[str, Any], tmp_path: Path
) -> None:
    out = draw(data, tmp_path / "p.png", **kw)
    with Image.open(out) as img:
        assert img.size[0] > 100
    assert is_robustlab_png(out)


def test_a_report_with_user_text_renders(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "s.sqlite")
    record = {"kind": "eval", "threat_model": {"norm": TEX, "eps": 0.1}}
    store.add({**record, "robust_accuracy": 0.5, "attack": {"name": TEX}, "n": 4}, label=TEX)
    store.add({**TRANSFER, "kind": "transfer", "threat_model": {"eps": 0.1}}, label=TEX)
    page = render_report(store, tmp_path / "r.html").read_text()
    assert page.count("data:image/png;base64,") == 3  # curve, heatmap, gamma sweep
    assert "not shown" not in page


def test_a_plot_that_fails_leaves_a_note_and_the_report_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    @plot
    def broken(*_: Any, **__: Any) -> Path:
        raise OverflowError("cannot draw this")

    monkeypatch.setattr(curves, "robustness_curve", broken)
    store = ResultStore(tmp_path / "s.sqlite")
    store.add(
        {"kind": "eval", "threat_model": {"norm": "linf", "eps": 0.1}}
        | {"robust_accuracy": 0.5, "attack": {"name": "pgd"}, "n": 4}
    )
    page = render_report(store, tmp_path / "r.html").read_text()
    assert "accuracy vs eps (linf) not shown: could not draw the broken plot" in page
    assert "50.0 %" in page  # the table is still there
    with pytest.raises(RobustlabError, match="could not draw the broken plot .OverflowError"):
        broken({}, tmp_path / "x.png")


def test_a_stored_record_the_report_cannot_read_leaves_a_note(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "s.sqlite")
    store.add({"kind": "eval"}, label="hand-made")  # no threat model, no accuracy
    store.add(
        {"kind": "eval", "threat_model": {"norm": "linf", "eps": 0.1}}
        | {"robust_accuracy": 0.25, "attack": {"name": "pgd"}, "n": 4},
        label="readable",
    )
    store.add({"kind": "timing", "step": "train", "seconds": 3.0})
    page = render_report(store, tmp_path / "r.html").read_text()
    assert "1 stored eval record that could not be shown: KeyError" in page
    assert "<td class=l>readable</td>" in page and "25.0 %" in page  # the others are shown
    assert "<td class=l>train</td><td>3.0 s</td>" in page

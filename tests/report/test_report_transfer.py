"""The HTML report renders every stored transfer matrix: heatmap, gamma sweep and table."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from torch import nn

from robustlab.analysis import gamma_sweep, parse_attack, transfer_matrix
from robustlab.data import DataSplits
from robustlab.report import render_report
from robustlab.store import ResultStore
from robustlab.train import TrainConfig, train


@pytest.fixture(scope="module")
def tiny_models(
    digits: DataSplits, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, nn.Module]:
    """A resnet8 (source) and an MLP (target) trained for one epoch on digits."""
    out = tmp_path_factory.mktemp("report-transfer")
    return {
        arch: train(
            TrainConfig(arch=arch, data="digits", epochs=1),
            out / arch,
            splits=digits,
            progress=False,
        ).model.eval()
        for arch in ("resnet8", "mlp")
    }


def _pngs(page: str) -> list[bytes]:
    """The decoded PNG images embedded in a page."""
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_report_has_a_section_per_stored_transfer_matrix(
    tiny_models: dict[str, nn.Module], digits: DataSplits, tmp_path: Path
) -> None:
    source, target = tiny_models["resnet8"], tiny_models["mlp"]
    pgd = parse_attack("pgd", "linf", 0.2, steps=2)
    sgm = gamma_sweep(parse_attack("sgm", "linf", 0.2, steps=2), [0.2, 1.0])
    store = ResultStore(tmp_path / "r.sqlite")
    first = transfer_matrix(
        {"resnet8": source}, {"resnet8": source, "mlp": target}, [pgd, *sgm], digits.test, n=40
    )
    store.add(first.to_dict(), label="digits <sweep>")
    second = transfer_matrix({"resnet8": source}, {"mlp": target}, [pgd], digits.test, n=40)
    store.add(second.to_dict())  # no label: the plain heading
    assert len(store.records(kind="transfer")) == 2

    page = render_report(store, tmp_path / "report.html").read_text()

    assert page.count("<h2>Transfer matrix") == 2
    assert "<h2>Transfer matrix: digits &lt;sweep&gt;</h2>" in page
    assert "<h2>Transfer matrix</h2>" in page
    assert page.count('alt="transfer heatmap"') == 2
    assert page.count('alt="success vs gamma"') == 1  # only the matrix with a sweep
    images = _pngs(page)
    assert len(images) == 3 and all(img.startswith(b"\x89PNG\r\n\x1a\n") for img in images)
    # the table: one row per source and attack, white-box cell starred, both conventions
    assert "<th class=l>source: attack</th><th>resnet8</th><th>mlp</th>" in page
    for row in ("resnet8: pgd", "resnet8: sgm γ=0.2", "resnet8: sgm γ=1"):
        assert f"<td class=l>{row}</td>" in page
    cell = first.cell("resnet8", "mlp", "sgm", 0.2)
    shown = (
        f"<td>{100 * cell.success_rate:.1f} <span class=muted>({100 * cell.success_rate_all:.1f})"
    )
    assert shown in page
    white = first.cell("resnet8", "resnet8", "pgd")
    assert f"<td>{100 * white.success_rate:.1f}* " in page
    assert "data: digits" in page


def test_report_without_transfer_records_has_no_transfer_section(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "r.sqlite")
    store.add({"kind": "timing", "step": "nothing", "seconds": 0.1, "created": ""})
    page = render_report(store, tmp_path / "report.html").read_text()
    assert "Transfer matrix" not in page and "data:image/png" not in page

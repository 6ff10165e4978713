"""The real demo, as a user runs it: slow (minutes), run with `pytest -m slow`."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_robustlab_demo_from_a_cold_cache_loads_the_shipped_models(tmp_path: Path) -> None:
    exe = shutil.which("robustlab", path=str(Path(sys.executable).parent))
    assert exe is not None
    env = {**os.environ, "ROBUSTLAB_CACHE": str(tmp_path / "cache")}
    run = subprocess.run(
        [exe, "demo", "--out", str(tmp_path / "demo"), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
        timeout=1800,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    match = re.search(r"report: (.+\.html)", run.stdout)
    assert match and Path(match.group(1)).exists()
    assert "load standard resnet8 (zoo:resnet8-standard)" in run.stderr and "total:" in run.stderr
    assert "train " not in run.stderr and not (tmp_path / "cache" / "demo").exists()
    with sqlite3.connect(tmp_path / "demo" / "results.sqlite") as db:
        rows = dict(
            db.execute(
                "SELECT label, json_extract(record, '$.robust_accuracy') FROM results "
                "WHERE kind = 'eval' AND eps = 0.3"
            ).fetchall()
        )
    at, std = rows["PGD-AT resnet8 (eps 0.3)"], rows["standard resnet8"]
    assert at > 0.6 and std < 0.2, rows  # adversarial training buys robustness at eps 0.3

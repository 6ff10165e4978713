"""The results store: a schema marker identifies it; other databases are refused untouched,
and a store opened read-only (report) is never changed."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from robustlab.errors import RobustlabError
from robustlab.report import render_report
from robustlab.store import APPLICATION_ID, ResultStore, is_results_store

LEGACY_SCHEMA = """
CREATE TABLE results (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, created TEXT NOT NULL,
    model TEXT, label TEXT, data TEXT, attack TEXT, norm TEXT, eps REAL, record TEXT NOT NULL
);
CREATE INDEX results_kind ON results(kind, label);
INSERT INTO results (kind, created, label, record) VALUES ('train', 'then', 'old', '{"kind": "train"}');
"""


def digest(path: Path) -> str:
    """A file's SHA-256, to show it was not changed."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def foreign(tmp_path: Path) -> Path:
    """The SQLite database of another application."""
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (name TEXT)")
        db.execute("INSERT INTO users VALUES ('ada')")
    return path


def test_a_database_of_another_application_is_refused_untouched(
    foreign: Path, tmp_path: Path
) -> None:
    before = digest(foreign)
    for read_only in (False, True):
        with pytest.raises(RobustlabError, match="another application .*users.* untouched"):
            ResultStore(foreign, read_only=read_only)
    with pytest.raises(RobustlabError, match="another application"):
        render_report(ResultStore(foreign), tmp_path / "r.html")
    assert digest(foreign) == before
    assert not is_results_store(foreign)


def test_a_new_store_carries_the_schema_marker(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    ResultStore(path).add({"kind": "eval"}, label="a")
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert is_results_store(path)


def test_read_only_opening_never_writes(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    ResultStore(path).add({"kind": "eval"}, label="a")
    before = digest(path)
    store = ResultStore(path, read_only=True)
    assert [r["label"] for r in store.records()] == ["a"]
    with pytest.raises(RobustlabError, match="read-only"):
        store.add({"kind": "eval"})
    assert digest(path) == before
    with pytest.raises(RobustlabError, match="does not exist"):
        ResultStore(tmp_path / "missing.sqlite", read_only=True)
    assert not (tmp_path / "missing.sqlite").exists()


def test_a_store_from_before_the_marker_is_still_read_and_written(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(LEGACY_SCHEMA)
    before = digest(path)
    assert ResultStore(path, read_only=True).records() == [{"kind": "train", "label": "old"}]
    assert digest(path) == before  # reading leaves it as it was
    ResultStore(path).add({"kind": "eval"}, label="new")
    assert [r["label"] for r in ResultStore(path).records()] == ["old", "new"]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID

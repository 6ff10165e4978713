"""The results store: every record a command produces, in one SQLite file, written atomically.

A robustlab store is recognised by a schema marker, the SQLite application id ``RLAB`` in the
file's header (stores made before the marker are recognised by their one ``results`` table and
get the marker when next written). Any other database is refused, never changed; a store
opened ``read_only`` (as ``report`` does) is opened with SQLite's ``mode=ro``.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .errors import RobustlabError
from .io import check_regular

APPLICATION_ID = 0x524C4142  # "RLAB": the schema marker in the SQLite header
SCHEMA_VERSION = 1
COLUMNS = ("id", "kind", "created", "model", "label", "data", "attack", "norm", "eps", "record")
SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    created TEXT NOT NULL,
    model TEXT,
    label TEXT,
    data TEXT,
    attack TEXT,
    norm TEXT,
    eps REAL,
    record TEXT NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS results_kind ON results(kind, label)",
)
OWN_TABLES = {"results", "sqlite_sequence"}


def _state(db: sqlite3.Connection, path: Path) -> str:
    """'ours', 'legacy' (a store from before the marker) or 'empty'; refuses anything else."""
    app_id = int(db.execute("PRAGMA application_id").fetchone()[0])
    if app_id == APPLICATION_ID:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise RobustlabError(
                f"{path} is a results store of a newer robustlab (schema {version}); upgrade"
            )
        return "ours"
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if app_id == 0 and not tables:
        return "empty"
    if app_id == 0 and tables <= OWN_TABLES and "results" in tables:
        columns = tuple(r[1] for r in db.execute("PRAGMA table_info(results)"))
        if columns == COLUMNS:
            return "legacy"
    shown = ", ".join(sorted(tables)) or "none"
    raise RobustlabError(
        f"{path} is a SQLite database of another application (tables: {shown}), not a "
        "robustlab results store; robustlab leaves it untouched"
    )


def is_results_store(path: Path) -> bool:
    """Whether an existing file is a robustlab results store (read without changing it)."""
    try:
        ResultStore(path, read_only=True)
    except RobustlabError:
        return False
    return True


class ResultStore:
    """Append and query typed result records (stored as JSON) in a SQLite file."""

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path).expanduser()
        self.read_only = read_only
        if read_only or self.path.exists() or self.path.is_symlink():
            check_regular(self.path, "results store")
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as db:
                state = _state(db, self.path)
                if read_only and state == "empty":
                    raise RobustlabError(f"{self.path} is an empty file, not a results store")
                if not read_only and state != "ours":
                    for statement in SCHEMA:
                        db.execute(statement)
                    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise RobustlabError(f"{self.path} is not a robustlab results store: {exc}") from None

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """One transaction (committed whole or rolled back); read-only stores open mode=ro."""
        if self.read_only:
            uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
            db = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None)
        else:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("BEGIN" if self.read_only else "BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    def add(self, record: dict[str, Any], label: str | None = None) -> int:
        """Store one record; returns its id."""
        if self.read_only:
            raise RobustlabError(f"results store {self.path} was opened read-only")
        tm = record.get("threat_model") or {}
        attack = record.get("attack") or {}
        model = record.get("model") or {}
        with self._connect() as db:
            cur = db.execute(
                "INSERT INTO results (kind, created, model, label, data, attack, norm, eps, record)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    str(record.get("kind", "eval")),
                    str(record.get("created", "")),
                    str(model.get("sha256", "")) if isinstance(model, dict) else "",
                    label,
                    str(record.get("data", "")),
                    str(attack.get("name", "")) if isinstance(attack, dict) else "",
                    str(tm.get("norm", "")) if isinstance(tm, dict) else "",
                    float(tm["eps"]) if isinstance(tm, dict) and "eps" in tm else None,
                    json.dumps(record, sort_keys=True),
                ),
            )
            return int(cur.lastrowid or 0)

    def records(self, kind: str | None = None, label: str | None = None) -> list[dict[str, Any]]:
        """Stored records (optionally of one kind / label), oldest first, each with its label."""
        query, args = "SELECT label, record FROM results", []
        conds = []
        if kind is not None:
            conds.append("kind = ?")
            args.append(kind)
        if label is not None:
            conds.append("label = ?")
            args.append(label)
        if conds:
            query += " WHERE " + " AND ".join(conds)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY id", args).fetchall()
        out = []
        for lab, rec in rows:
            try:
                obj = json.loads(rec)
            except (TypeError, ValueError):
                raise RobustlabError(f"results store {self.path} holds a damaged record") from None
            if not isinstance(obj, dict):
                raise RobustlabError(f"results store {self.path} holds a damaged record")
            out.append({**obj, "label": lab})
        return out

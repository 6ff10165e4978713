"""The results store: every record a command produces, in one SQLite file, written atomically."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import RobustlabError

SCHEMA = """
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
);
CREATE INDEX IF NOT EXISTS results_kind ON results(kind, label);
"""


class ResultStore:
    """Append and query typed result records (stored as JSON) in a SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as db:
                db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise RobustlabError(f"{self.path} is not a robustlab results store: {exc}") from None

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        try:
            with db:  # one transaction: committed whole or rolled back
                yield db
        finally:
            db.close()

    def add(self, record: dict[str, Any], label: str | None = None) -> int:
        """Store one record; returns its id."""
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
        return [{**json.loads(rec), "label": lab} for lab, rec in rows]

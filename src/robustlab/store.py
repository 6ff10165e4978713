"""The results store: every record a command produces, in one SQLite file, written atomically.

**Identity.** A robustlab store is recognised by a schema marker, the SQLite application id
``RLAB`` in the file's header, and carries its schema version in ``user_version``. Stores made
before the marker are recognised by their one ``results`` table. Any other database is refused,
never changed.

**Schema (version 2).** ``results`` holds one row per record: its JSON and the columns a query
filters on, among them ``run``, the key a record shares with the other records of its run (the
eps of one robustness curve). ``samples`` holds the per-sample outcomes of an evaluation record
(point index, label, clean and final prediction, robust, what broke it, the size of the
perturbation that did, eps), keyed by the record's id; a record and its samples are written in
one transaction, so nobody ever sees one without the other. Version 1 had no ``samples`` and no
``run``.

**Migration.** Opening an older store for writing (version 1, or a store from before the
marker) migrates it to the current version in one transaction: its records are kept (with no
per-sample outcomes: they were never stored), and a migration that fails leaves the file as it
was. A new store is built by the same steps (version 1's tables, then each migration), so old
and new stores cannot drift apart. Opening ``read_only`` (``report``, ``runs``, ``compare``)
reads an older store as it is, never changing it (SQLite's ``mode=ro``). A store of a newer
schema than this code knows is refused, read or write, with one sentence.

**Concurrency.** Any number of processes may read and append at once and nothing is lost: every
write is one ``BEGIN IMMEDIATE`` transaction (the writer takes the write lock before it reads
anything, so two writers queue instead of failing on a lock upgrade), every read is one
transaction (a consistent snapshot), and a process waits up to ``BUSY_TIMEOUT_S`` for another's
lock before it gives up with one sentence. A writer killed mid-write leaves its undo journal
beside the file; the next writer rolls it back (a read-only reader may not, and says so).

The store keeps SQLite's default rollback journal and ``synchronous=FULL``, not WAL: WAL needs
shared memory beside the file, so it does not work on network filesystems (where a shared store
is likely to live), a read-only open of a WAL file needs write access to its folder (or a
``-shm`` file left behind), and a store copied without its ``-wal`` file silently loses its last
records. WAL's gain, readers that do not wait for a writer, is worth little here: a write is
one evaluation's rows, tens of milliseconds. Over a network filesystem the store is as safe as
that filesystem's file locks (SQLite's own caveat).
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .errors import RobustlabError
from .io import check_regular
from .version import __version__

APPLICATION_ID = 0x524C4142  # "RLAB": the schema marker in the SQLite header
SCHEMA_VERSION = 2
BUSY_TIMEOUT_S = 60.0  # how long a process waits for another's lock before it gives up
COLUMNS = ("id", "kind", "created", "model", "label", "data", "attack", "norm", "eps", "record")
#: Version 1's tables, with which every store starts (a new one, and one from before the marker).
SCHEMA_V1 = (
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
#: The statements that take a store from version k to k + 1, by k.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "ALTER TABLE results ADD COLUMN run TEXT",
        "CREATE INDEX results_run ON results(run)",
        """
CREATE TABLE samples (
    result INTEGER NOT NULL REFERENCES results(id),
    point INTEGER NOT NULL,
    eps REAL,
    label INTEGER NOT NULL,
    clean_pred INTEGER NOT NULL,
    final_pred INTEGER NOT NULL,
    robust INTEGER NOT NULL CHECK (robust IN (0, 1)),
    broken_by TEXT,
    perturbation_norm REAL,
    PRIMARY KEY (result, point)
) WITHOUT ROWID""",
    ),
}
OWN_TABLES = {"results", "sqlite_sequence"}  # a store from before the marker has just these
#: A per-sample row as ``samples`` gives it back (``evaluate.robust.SAMPLE_COLUMNS``).
SAMPLE_KEYS = (
    "eps",
    "index",
    "label",
    "clean_pred",
    "final_pred",
    "robust",
    "broken_by",
    "perturbation_norm",
)


def _version(db: sqlite3.Connection, path: Path) -> int:
    """The store's schema version: 0 for an empty file or a store from before the marker;
    refuses another application's database and a schema newer than this code knows."""
    app_id = int(db.execute("PRAGMA application_id").fetchone()[0])
    if app_id == APPLICATION_ID:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise RobustlabError(
                f"{path} is a results store of schema version {version}, newer than robustlab "
                f"{__version__} knows (version {SCHEMA_VERSION}): upgrade robustlab to use it"
            )
        if version < 1:
            raise RobustlabError(
                f"{path} carries robustlab's store marker but no schema version, so robustlab "
                "cannot tell how to read it"
            )
        return version
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if app_id == 0 and not tables:
        return 0
    if app_id == 0 and tables <= OWN_TABLES and "results" in tables:
        columns = tuple(r[1] for r in db.execute("PRAGMA table_info(results)"))
        if columns == COLUMNS:
            return 0
    shown = ", ".join(sorted(tables)) or "none"
    raise RobustlabError(
        f"{path} is a SQLite database of another application (tables: {shown}), not a "
        "robustlab results store; robustlab leaves it untouched"
    )


def _migrate(db: sqlite3.Connection, version: int) -> None:
    """Bring a store from ``version`` (0: empty or from before the marker) to the current one,
    inside the caller's transaction."""
    if version == 0:
        for statement in SCHEMA_V1:
            db.execute(statement)
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        version = 1
    for step in range(version, SCHEMA_VERSION):
        for statement in MIGRATIONS[step]:
            db.execute(statement)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def is_results_store(path: Path) -> bool:
    """Whether an existing file is a robustlab results store (read without changing it)."""
    try:
        ResultStore(path, read_only=True)
    except RobustlabError:
        return False
    return True


@dataclass(frozen=True)
class Stored:
    """One stored record with what the store knows of it: its id, the run it belongs to (the id
    of the run's first record), its label, and how many per-sample rows it has."""

    id: int
    run: int
    label: str | None
    record: dict[str, Any]
    samples: int


def _sample_rows(record: Mapping[str, Any], rows: object) -> list[tuple[Any, ...]]:
    """A record's per-sample rows as the ``samples`` table's values (without the record id);
    refuses a table that is not one well-formed row per point."""
    if not isinstance(rows, list):
        raise RobustlabError("a record's per-sample outcomes ('samples') must be a list of rows")
    tm = record.get("threat_model")
    record_eps = tm.get("eps") if isinstance(tm, dict) else None  # a row's eps, unless it says
    out: list[tuple[Any, ...]] = []
    seen: set[int] = set()
    for k, row in enumerate(rows):
        try:
            point, eps = row["index"], row.get("eps", record_eps)
            values = (
                None if eps is None else float(eps),
                int(row["label"]),
                int(row["clean_pred"]),
                int(row["final_pred"]),
                int(bool(row["robust"])),
                None if row["broken_by"] is None else str(row["broken_by"]),
                None if row["perturbation_norm"] is None else float(row["perturbation_norm"]),
            )
        except (TypeError, KeyError, ValueError, AttributeError):
            raise RobustlabError(
                f"per-sample row {k} of the record is not a well-formed outcome (keys: "
                f"{', '.join(SAMPLE_KEYS)})"
            ) from None
        if isinstance(point, bool) or not isinstance(point, int) or point < 0:
            raise RobustlabError(f"per-sample row {k} of the record has no valid point index")
        if point in seen:
            raise RobustlabError(f"the record's per-sample outcomes list point {point} twice")
        if values[0] is not None and not math.isfinite(values[0]):
            raise RobustlabError(f"per-sample row {k} of the record has a non-finite eps")
        seen.add(point)
        out.append((point, *values))
    return out


class ResultStore:
    """Append and query typed result records (stored as JSON) and their per-sample outcomes in a
    SQLite file; see the module's docstring for the schema and the concurrency guarantees."""

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path).expanduser()
        self.read_only = read_only
        #: The file's schema version as last read (older than SCHEMA_VERSION only read-only).
        self.version = SCHEMA_VERSION
        if read_only or self.path.exists() or self.path.is_symlink():
            check_regular(self.path, "results store")
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._transaction(opening=True):
            pass

    @property
    def has_samples(self) -> bool:
        """Whether the store's schema keeps per-sample outcomes (version 2 on)."""
        return self.version >= 2

    @contextmanager
    def _transaction(self, *, opening: bool = False) -> Iterator[sqlite3.Connection]:
        """One transaction on a store checked (and, opened for writing, migrated) inside it:
        the version is read again each time, as another process may have migrated the file."""
        with self._connect(opening=opening) as db:
            version = _version(db, self.path)
            if self.read_only and version == 0 and not _has_results(db):
                raise RobustlabError(f"{self.path} is an empty file, not a results store")
            if not self.read_only and version < SCHEMA_VERSION:
                try:
                    _migrate(db, version)
                except sqlite3.DatabaseError as exc:
                    raise RobustlabError(
                        f"cannot bring results store {self.path} from schema version "
                        f"{max(version, 1)} to {SCHEMA_VERSION} ({exc}); it is left as it was"
                    ) from None
                version = SCHEMA_VERSION
            self.version = max(version, 1)
            yield db

    @contextmanager
    def _connect(self, *, opening: bool = False) -> Iterator[sqlite3.Connection]:
        """One transaction (committed whole or rolled back); read-only stores open mode=ro.
        SQLite's errors become one sentence: a lock held too long, or a file that is no store
        (``opening``) or is damaged."""
        try:
            if self.read_only:
                uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
                db = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            else:
                db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            try:
                db.execute("BEGIN" if self.read_only else "BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    if db.in_transaction:  # SQLite may have rolled back already (disk full)
                        db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            finally:
                db.close()
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise RobustlabError(
                    f"results store {self.path} stayed locked by another process for "
                    f"{BUSY_TIMEOUT_S:g} s; try again once it has finished writing"
                ) from None
            if self.read_only and "readonly" in str(exc):  # a hot journal: recovery writes
                raise RobustlabError(
                    f"results store {self.path} holds the unfinished write of a process that "
                    f"stopped mid-write (in {self.path.name}-journal), which a read-only reader "
                    "may not undo: the next robustlab command that writes to the store undoes it"
                ) from None
            raise self._damaged(exc, opening) from None
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc, opening) from None

    def _damaged(self, exc: sqlite3.DatabaseError, opening: bool) -> RobustlabError:
        """The sentence for a SQLite error other than a lock."""
        if opening:
            return RobustlabError(f"{self.path} is not a robustlab results store: {exc}")
        return RobustlabError(f"results store {self.path} could not be read or written: {exc}")

    def add(self, record: Mapping[str, Any], label: str | None = None) -> int:
        """Store one record; returns its id. Its per-sample outcomes, if the record carries them
        under ``samples`` (``EvalRecord.to_dict(samples=True)``), go into the samples table in
        the same transaction (the stored JSON leaves them out)."""
        return self.add_many([record], label)[0]

    def add_many(self, records: Sequence[Mapping[str, Any]], label: str | None = None) -> list[int]:
        """Store several records (each with its per-sample outcomes, as ``add``) in one
        transaction: all of them, or none; returns their ids."""
        if self.read_only:
            raise RobustlabError(f"results store {self.path} was opened read-only")
        prepared = [_prepared(record) for record in records]
        ids: list[int] = []
        with self._transaction() as db:
            for columns, samples in prepared:
                cur = db.execute(
                    "INSERT INTO results (kind, created, model, label, data, attack, norm, eps,"
                    " record, run) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*columns[:3], label, *columns[3:]),
                )
                rid = int(cur.lastrowid or 0)
                db.executemany(
                    "INSERT INTO samples (result, point, eps, label, clean_pred, final_pred,"
                    " robust, broken_by, perturbation_norm) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(rid, *row) for row in samples],
                )
                ids.append(rid)
        return ids

    def records(self, kind: str | None = None, label: str | None = None) -> list[dict[str, Any]]:
        """Stored records (optionally of one kind / label), oldest first, each with its label."""
        return [{**s.record, "label": s.label} for s in self.entries(kind=kind, label=label)]

    def entries(
        self, kind: str | None = None, label: str | None = None, ids: Sequence[int] | None = None
    ) -> list[Stored]:
        """Stored records with their ids, runs and per-sample counts (optionally of one kind,
        label, or of the given record ids), oldest first, read in one transaction."""
        with self._transaction() as db:
            return self._entries(db, kind, label, ids)

    def _entries(
        self,
        db: sqlite3.Connection,
        kind: str | None = None,
        label: str | None = None,
        ids: Sequence[int] | None = None,
    ) -> list[Stored]:
        """``entries`` within the caller's transaction."""
        if self.has_samples:
            query = (
                "SELECT r.id, (SELECT MIN(o.id) FROM results o WHERE o.run = r.run), r.label,"
                " r.record, (SELECT COUNT(*) FROM samples s WHERE s.result = r.id)"
                " FROM results r"
            )
        else:
            query = "SELECT r.id, NULL, r.label, r.record, 0 FROM results r"
        conds: list[str] = []
        args: list[Any] = []
        for column, value in (("kind", kind), ("label", label)):
            if value is not None:
                conds.append(f"r.{column} = ?")
                args.append(value)
        if ids is not None:
            conds.append(f"r.id IN ({', '.join('?' * len(ids))})")
            args.extend(int(i) for i in ids)
        if conds:
            query += " WHERE " + " AND ".join(conds)
        rows = db.execute(query + " ORDER BY r.id", args).fetchall()
        return [
            Stored(int(rid), int(run if run is not None else rid), lab, self._json(rec), int(n))
            for rid, run, lab, rec, n in rows
        ]

    def run_of(self, record_id: int) -> list[Stored]:
        """Every record of the run a record belongs to (the eps of one curve), oldest first;
        empty if the store has no record of that id."""
        with self._transaction() as db:
            if not self.has_samples:
                return self._entries(db, ids=[record_id])
            found = db.execute("SELECT run FROM results WHERE id = ?", (record_id,)).fetchone()
            if found is None:
                return []
            if found[0] is None:
                return self._entries(db, ids=[record_id])
            ids = [int(r[0]) for r in db.execute("SELECT id FROM results WHERE run = ?", found)]
            return self._entries(db, ids=ids)

    def samples(self, record_ids: Sequence[int]) -> dict[int, list[dict[str, Any]]]:
        """The per-sample outcomes of records, by record id, ordered by point (an empty list
        for a record without them), read in one transaction."""
        out: dict[int, list[dict[str, Any]]] = {int(i): [] for i in record_ids}
        if not out:
            return out
        marks = ", ".join("?" * len(out))
        with self._transaction() as db:
            if not self.has_samples:
                return out
            rows = db.execute(
                "SELECT result, eps, point, label, clean_pred, final_pred, robust, broken_by,"
                f" perturbation_norm FROM samples WHERE result IN ({marks})"
                " ORDER BY result, point",
                list(out),
            ).fetchall()
        for result, *values in rows:
            row = dict(zip(SAMPLE_KEYS, values, strict=True))
            row["robust"] = bool(row["robust"])
            out[int(result)].append(row)
        return out

    def _json(self, text: str) -> dict[str, Any]:
        """A stored record's JSON; a damaged one is refused with one sentence."""
        try:
            obj = json.loads(text)
        except (TypeError, ValueError):
            raise RobustlabError(f"results store {self.path} holds a damaged record") from None
        if not isinstance(obj, dict):
            raise RobustlabError(f"results store {self.path} holds a damaged record")
        return obj


def _has_results(db: sqlite3.Connection) -> bool:
    """Whether the file has the results table (a store from before the marker does)."""
    found = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'results'")
    return found.fetchone() is not None


def _prepared(record: Mapping[str, Any]) -> tuple[tuple[Any, ...], list[tuple[Any, ...]]]:
    """A record's column values (kind, created, model, then data, attack, norm, eps, JSON, run;
    the label goes between) and its per-sample rows, checked before the transaction starts."""
    tm = record.get("threat_model") or {}
    attack = record.get("attack") or {}
    model = record.get("model") or {}
    samples = _sample_rows(record, record["samples"]) if "samples" in record else []
    stored = {k: v for k, v in record.items() if k != "samples"}
    run = record.get("run")
    columns = (
        str(record.get("kind", "eval")),
        str(record.get("created", "")),
        str(model.get("sha256", "")) if isinstance(model, dict) else "",
        str(record.get("data", "")),
        str(attack.get("name", "")) if isinstance(attack, dict) else "",
        str(tm.get("norm", "")) if isinstance(tm, dict) else "",
        float(tm["eps"]) if isinstance(tm, dict) and "eps" in tm else None,
        json.dumps(stored, sort_keys=True),
        run if isinstance(run, str) and run else None,
    )
    return columns, samples

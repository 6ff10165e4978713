"""The store's schema version 2 (per-sample outcomes with each record), its migration path (real
version-1 files made with version 1's own DDL, stores from before the marker, a store of a newer
schema), and the store shared by concurrent processes: real processes writing many records into
one real file at once lose nothing, and readers meanwhile only ever see whole records."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from robustlab import store as store_module
from robustlab.errors import RobustlabError
from robustlab.store import APPLICATION_ID, SCHEMA_VERSION, ResultStore

#: Two records as version 1 stored them (its ``add`` kept each record's JSON, and a few of its
#: fields as columns).
OLD_RECORDS: list[dict[str, Any]] = [
    {
        "kind": "eval",
        "created": "2024-05-01T10:00:00+00:00",
        "model": {"sha256": "abc" * 21 + "d", "arch": "mlp", "path": "old"},
        "data": "digits/test",
        "attack": {"name": "pgd"},
        "threat_model": {"norm": "linf", "eps": 0.1},
        "n": 20,
        "clean_accuracy": 0.9,
        "robust_accuracy": 0.5,
    },
    {"kind": "train", "created": "2024-05-01T09:00:00+00:00"},
]
#: Version 1 of the store exactly as robustlab wrote it (store.py before schema 2): its tables,
#: then the marker and the version, and the two records.
V1_STORE = f"""
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
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = 1;
INSERT INTO results (kind, created, model, label, data, attack, norm, eps, record) VALUES
    ('eval', '2024-05-01T10:00:00+00:00', '{"abc" * 21 + "d"}', 'old model', 'digits/test',
     'pgd', 'linf', 0.1, '{json.dumps(OLD_RECORDS[0], sort_keys=True)}'),
    ('train', '2024-05-01T09:00:00+00:00', '', 'old model', '', '', '', NULL,
     '{json.dumps(OLD_RECORDS[1], sort_keys=True)}');
"""
LEGACY_STORE = """
CREATE TABLE results (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, created TEXT NOT NULL,
    model TEXT, label TEXT, data TEXT, attack TEXT, norm TEXT, eps REAL, record TEXT NOT NULL
);
INSERT INTO results (kind, created, label, record) VALUES ('eval', 'then', 'older', '{"kind": "eval"}');
"""


def made_with(path: Path, script: str) -> Path:
    """A store file written by the given SQL (an older robustlab's schema)."""
    db = sqlite3.connect(path)
    db.executescript(script)
    db.close()
    return path


def digest(path: Path) -> str:
    """A file's SHA-256, to show it was not changed."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def header(path: Path) -> tuple[int, int, list[str], list[str]]:
    """The file's marker, schema version, tables and results columns, read with plain SQLite."""
    db = sqlite3.connect(path)
    try:
        app = int(db.execute("PRAGMA application_id").fetchone()[0])
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        tables = sorted(
            r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
        )
        columns = [r[1] for r in db.execute("PRAGMA table_info(results)")]
    finally:
        db.close()
    return app, version, tables, columns


def evaluation(n: int, eps: float = 0.1, run: str = "r1") -> dict[str, Any]:
    """An evaluation record with ``n`` per-sample outcomes (every third point broken)."""
    rows = [
        {
            "index": i,
            "label": i % 10,
            "clean_pred": i % 10,
            "final_pred": (i + 1) % 10 if i % 3 == 0 else i % 10,
            "robust": i % 3 != 0,
            "broken_by": "pgd" if i % 3 == 0 else None,
            "perturbation_norm": eps if i % 3 == 0 else None,
        }
        for i in range(n)
    ]
    robust = sum(1 for i in range(n) if i % 3 != 0) / n
    return {
        "kind": "eval",
        "n": n,
        "run": run,
        "robust_accuracy": robust,
        "threat_model": {"norm": "linf", "eps": eps},
        "samples": rows,
    }


def test_a_version_1_store_is_read_as_it_is_when_opened_read_only(tmp_path: Path) -> None:
    path = made_with(tmp_path / "v1.sqlite", V1_STORE)
    before = digest(path)
    store = ResultStore(path, read_only=True)
    assert store.version == 1 and not store.has_samples
    assert store.records() == [{**r, "label": "old model"} for r in OLD_RECORDS]
    assert [(e.id, e.run, e.samples) for e in store.entries()] == [(1, 1, 0), (2, 2, 0)]
    assert store.samples([1]) == {1: []}
    assert digest(path) == before


def test_a_version_1_store_opened_for_writing_is_migrated_keeping_its_records(
    tmp_path: Path,
) -> None:
    path = made_with(tmp_path / "v1.sqlite", V1_STORE)
    store = ResultStore(path)
    app, version, tables, columns = header(path)
    assert (app, version) == (APPLICATION_ID, SCHEMA_VERSION) == (APPLICATION_ID, 2)
    assert "samples" in tables and "run" in columns
    new = store.add(evaluation(30), label="new model")
    assert new == 3  # ids go on after the old records
    assert store.records()[:2] == [{**r, "label": "old model"} for r in OLD_RECORDS]
    assert [e.samples for e in store.entries()] == [0, 0, 30]
    again = ResultStore(path, read_only=True)
    assert again.version == 2 and len(again.samples([new])[new]) == 30


def test_a_store_from_before_the_marker_is_migrated_to_the_current_version(
    tmp_path: Path,
) -> None:
    path = made_with(tmp_path / "legacy.sqlite", LEGACY_STORE)
    before = digest(path)
    assert ResultStore(path, read_only=True).version == 1
    assert digest(path) == before
    ResultStore(path).add(evaluation(5), label="new")
    app, version, tables, _ = header(path)
    assert (app, version) == (APPLICATION_ID, SCHEMA_VERSION) and "samples" in tables
    store = ResultStore(path, read_only=True)
    assert [r["label"] for r in store.records()] == ["older", "new"]
    assert [e.samples for e in store.entries()] == [0, 5]


def test_a_migration_that_fails_leaves_the_store_as_it_was(tmp_path: Path) -> None:
    path = made_with(tmp_path / "v1.sqlite", V1_STORE + "CREATE TABLE samples (x);")
    before = digest(path)
    with pytest.raises(RobustlabError, match="from schema version 1 to 2 .* left as it was"):
        ResultStore(path)
    assert digest(path) == before
    _, version, _, columns = header(path)
    assert version == 1 and "run" not in columns  # the first migration step was undone too


@pytest.mark.parametrize("read_only", [True, False])
def test_a_store_of_a_newer_schema_is_refused_untouched(tmp_path: Path, read_only: bool) -> None:
    path = made_with(
        tmp_path / "v9.sqlite",
        V1_STORE.replace("user_version = 1", "user_version = 9"),
    )
    before = digest(path)
    with pytest.raises(RobustlabError) as err:
        ResultStore(path, read_only=read_only)
    message = str(err.value)
    assert "schema version 9, newer than robustlab" in message and "upgrade robustlab" in message
    assert ". " not in message and "\n" not in message  # one sentence
    assert digest(path) == before


def test_per_sample_outcomes_are_stored_beside_the_record_not_in_its_json(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.sqlite"
    record = evaluation(12, eps=0.25)
    rid = ResultStore(path).add(record, label="m")
    store = ResultStore(path, read_only=True)
    (stored,) = store.records()
    assert "samples" not in stored and stored["run"] == "r1"
    got = store.samples([rid])[rid]
    assert got == [{**row, "eps": 0.25} for row in record["samples"]]
    db = sqlite3.connect(path)
    text = db.execute("SELECT record FROM results").fetchone()[0]
    db.close()
    assert "samples" not in json.loads(text)


def test_records_of_one_run_key_form_one_run(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "s.sqlite")
    first = store.add_many([evaluation(4, 0.1, "curve"), evaluation(4, 0.2, "curve")])
    alone = store.add(evaluation(4, 0.1, "other"))
    plain = store.add({"kind": "transfer"})
    late = store.add(evaluation(4, 0.3, "curve"))
    runs = {e.id: e.run for e in store.entries()}
    assert runs == {first[0]: 1, first[1]: 1, alone: alone, plain: plain, late: 1}
    assert [e.id for e in store.run_of(first[1])] == [*first, late]
    assert store.run_of(99) == []


def test_a_malformed_per_sample_table_stores_nothing_of_the_batch(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "s.sqlite")
    good = evaluation(3)
    twice = {**evaluation(3), "samples": [*evaluation(3)["samples"], evaluation(1)["samples"][0]]}
    missing = {**evaluation(2), "samples": [{"index": 0, "label": 1}]}
    with pytest.raises(RobustlabError, match="list point 0 twice"):
        store.add_many([good, twice])
    with pytest.raises(RobustlabError, match="row 0 of the record is not a well-formed outcome"):
        store.add_many([good, missing])
    assert store.entries() == []


# -- concurrency ------------------------------------------------------------------------

WRITERS = 3
RECORDS = 40  # per writer


def record(writer: int, i: int) -> dict[str, Any]:
    """Writer ``writer``'s ``i``-th record: its size and outcomes depend on both."""
    n = 20 + (7 * writer + i) % 30
    rows = [
        {
            "index": k,
            "label": (k + writer) % 10,
            "clean_pred": (k + writer) % 10,
            "final_pred": (k + i) % 10,
            "robust": (k + i) % 10 == (k + writer) % 10,
            "broken_by": None if (k + i) % 10 == (k + writer) % 10 else f"pgd-{writer}",
            "perturbation_norm": None if (k + i) % 10 == (k + writer) % 10 else 0.01 * k,
            "eps": 0.1,
        }
        for k in range(n)
    ]
    return {
        "kind": "eval",
        "n": n,
        "writer": writer,
        "i": i,
        "run": f"w{writer}-{i // 2}",
        "threat_model": {"norm": "linf", "eps": 0.1},
        "samples": rows,
    }


def write(path: str, writer: int, go: str) -> None:
    """One writer process: wait for the start, then append its records one transaction each."""
    while not Path(go).exists():
        time.sleep(0.002)
    store = ResultStore(path)  # the v1 file is migrated by whichever process comes first
    for i in range(RECORDS):
        store.add(record(writer, i), label=f"w{writer}")
        time.sleep(0.003)  # evaluations write now and then, not back to back


def read(path: str, done: str, out: Any) -> None:
    """A reader process: snapshot after snapshot until the writers are done, checking that every
    record it sees has all its per-sample outcomes; reports what it saw."""
    seen: list[int] = []
    broken: list[str] = []
    while True:
        finished = Path(done).exists()
        entries = ResultStore(path, read_only=True).entries(kind="eval")
        for e in entries:
            if e.record.get("writer") is not None and e.samples != e.record["n"]:
                broken.append(f"record {e.id}: {e.samples} of {e.record['n']} outcomes")
        seen.append(len(entries))
        if len(seen) == 1:
            out.put("ready")
        if finished:
            break
    out.put((seen, broken))


def test_concurrent_writers_lose_nothing_and_readers_see_whole_records(tmp_path: Path) -> None:
    path = made_with(tmp_path / "shared.sqlite", V1_STORE)  # migrated under contention
    go, done = tmp_path / "go", tmp_path / "done"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    reader = ctx.Process(target=read, args=(str(path), str(done), out))
    writers = [ctx.Process(target=write, args=(str(path), w, str(go))) for w in range(WRITERS)]
    reader.start()
    for p in writers:
        p.start()
    assert out.get(timeout=60) == "ready"
    go.touch()
    for p in writers:
        p.join(timeout=120)
    done.touch()
    seen, broken = out.get(timeout=60)
    reader.join(timeout=60)
    assert [p.exitcode for p in writers] == [0] * WRITERS and reader.exitcode == 0
    assert broken == []
    assert any(1 < k < 1 + WRITERS * RECORDS for k in seen)  # it read while they wrote

    store = ResultStore(path, read_only=True)
    entries = store.entries()
    assert len(entries) == 2 + WRITERS * RECORDS and store.version == 2
    assert [e.record["kind"] for e in entries[:2]] == ["eval", "train"]  # the v1 records kept
    samples = store.samples([e.id for e in entries])
    for w in range(WRITERS):
        mine = [e for e in entries if e.label == f"w{w}"]
        assert [e.record["i"] for e in mine] == list(range(RECORDS))  # all, in order
        for e in mine:
            want = record(w, e.record["i"])
            assert e.record == {k: v for k, v in want.items() if k != "samples"}
            assert samples[e.id] == want["samples"]
            assert e.run == min(x.id for x in mine if x.record["run"] == want["run"])


def test_a_reader_sees_the_last_commit_while_a_write_is_under_way(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    ResultStore(path).add(record(0, 0), label="committed")
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another process mid-write: its row not committed yet
    writer.execute(
        "INSERT INTO results (kind, created, label, record) VALUES ('eval', '', 'half', '{}')"
    )
    try:
        store = ResultStore(path, read_only=True)
        assert [e.label for e in store.entries()] == ["committed"]
        assert [e.samples for e in store.entries()] == [record(0, 0)["n"]]
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_lock_held_past_the_busy_timeout_gives_one_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.sqlite"
    store = ResultStore(path)
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_S", 0.2)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(RobustlabError, match="stayed locked by another process for 0.2 s"):
            store.add({"kind": "eval"})
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert store.add({"kind": "eval"}) == 1  # nothing half-written was left behind


# -- the commands on an older store -------------------------------------------------------------


def test_runs_and_compare_read_a_version_1_store_and_refuse_its_records_for_compare(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from robustlab.cli import main

    path = made_with(tmp_path / "v1.sqlite", V1_STORE)
    before = digest(path)
    assert main(["runs", "--store", str(path)]) == 0
    assert "old model abcabcab" in capsys.readouterr().out  # listed, read as it is
    assert main(["compare", "1", "1", "--store", str(path)]) == 2
    assert "schema version 1, which kept no per-sample outcomes" in capsys.readouterr().err
    assert digest(path) == before

    model = tmp_path / "mlp"
    train = ["train", "--arch", "mlp", "--data", "digits", "--epochs", "1", "--no-progress"]
    assert main([*train, "--out", str(model)]) == 0
    evaluate = ["eval", "--model", str(model), "--data", "digits", "--eps", "0.1", "--n", "20"]
    assert main([*evaluate, "--steps", "2", "--engine", "torch", "--store", str(path)]) == 0
    assert header(path)[1] == 2  # migrated by the command that wrote into it
    capsys.readouterr()
    assert main(["compare", "1", "3", "--store", str(path)]) == 2
    err = capsys.readouterr().err
    assert "run 1 has no per-sample outcomes (it was stored before the store kept them)" in err
    assert [e.samples for e in ResultStore(path, read_only=True).entries()] == [0, 0, 20]


def test_a_writer_killed_mid_write_leaves_no_half_record(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    ResultStore(path).add(record(0, 0), label="committed")
    # a real process killed in the middle of its transaction: its pages spill to the file,
    # its journal (the undo) stays behind
    killed = (
        "import os, sqlite3\n"
        f"db = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
        "db.execute('PRAGMA cache_size = 1')\n"
        "db.execute('BEGIN IMMEDIATE')\n"
        "for i in range(3000):\n"
        "    db.execute(\"INSERT INTO results (kind, created, record) VALUES ('eval', '', ?)\","
        " ('x' * 500,))\n"
        "os._exit(1)\n"
    )
    assert subprocess.run([sys.executable, "-c", killed], check=False).returncode == 1
    assert Path(f"{path}-journal").exists()
    with pytest.raises(RobustlabError, match="unfinished write of a process that stopped"):
        ResultStore(path, read_only=True)
    store = ResultStore(path)  # a writer undoes it
    assert [e.label for e in store.entries()] == ["committed"]
    assert not Path(f"{path}-journal").exists()
    assert ResultStore(path, read_only=True).entries()[0].samples == record(0, 0)["n"]

"""Bulk writes: ``insert_many`` (COPY on PostgreSQL) and ``Database.write_together`` (SQLite's
batches that share one commit)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from backend.db import Database, Tx, insert_many
from backend.errors import IntegrityError


def _drivers(db: Database) -> list[str]:
    return [str(r["id"]) for r in db.query("SELECT id FROM drivers ORDER BY id")]


def test_insert_many_writes_every_row_and_skips_conflicts(db_url: str) -> None:
    db = Database.open(db_url)
    db.migrate()
    rows = [(f"d{i:04d}", i) for i in range(1200)]          # more than one statement's parameters
    with db.write() as tx:
        assert insert_many(tx, "drivers", ("id", "created_at"), rows) == 1200
    with db.write() as tx:
        again = [("d0005", 1), ("new-one", 2), ("d1199", 3), ("new-two", 4)]
        assert insert_many(tx, "drivers", ("id", "created_at"), again, conflict="id") == 2
    ids = _drivers(db)
    assert len(ids) == 1202 and "new-one" in ids and "new-two" in ids
    assert db.one("SELECT created_at FROM drivers WHERE id = ?", ("d0005",)) == {"created_at": 5}
    with db.write() as tx:
        assert insert_many(tx, "drivers", ("id", "created_at"), []) == 0
    db.close()


def test_insert_many_of_a_clashing_row_raises_and_keeps_what_was_stored(db_url: str) -> None:
    db = Database.open(db_url)
    db.migrate()
    with db.write() as tx:
        insert_many(tx, "drivers", ("id", "created_at"), [("alice", 1)])
    with pytest.raises(IntegrityError), db.write() as tx:
        insert_many(tx, "drivers", ("id", "created_at"), [("bob", 2), ("alice", 3), ("carol", 4)])
    assert _drivers(db) == ["alice"]
    db.close()


def test_insert_many_keeps_bytes_nulls_and_large_integers(db_url: str) -> None:
    db = Database.open(db_url)
    db.migrate()
    blob = bytes(range(256)) + b"\\N\t\n\r"
    with db.write() as tx:
        insert_many(tx, "translog_queue", ("entry_kind", "ref", "entry", "created_at"),
                    [("record", "r1", blob, 2**62), ("record", "r2", b"", 0)])
    rows = db.query("SELECT ref, entry, created_at FROM translog_queue ORDER BY ref")
    got = [(r["ref"], bytes(r["entry"]), r["created_at"]) for r in rows]
    assert got == [("r1", blob, 2**62), ("r2", b"", 0)]
    db.close()


def _sqlite(tmp_path: Path) -> Database:
    db = Database.open(f"sqlite:///{tmp_path}/together.db")
    db.migrate()
    return db


def _together(db: Database, writes: Mapping[str, Callable[[Tx], object]]) -> dict[str, object]:
    """Run ``writes`` with ``write_together``, each from a thread of its own, queued behind one
    that holds the lock until they all wait: what each caller got back, or the exception it saw."""
    got: dict[str, object] = {}
    gate = threading.Event()

    def run(name: str, fn: Callable[[Tx], object]) -> None:
        try:
            got[name] = db.write_together(fn)
        except BaseException as exc:  # noqa: BLE001 - what each caller sees
            got[name] = exc

    first = threading.Thread(target=run, args=("hold", lambda tx: gate.wait(5)))
    first.start()
    time.sleep(0.2)
    others = [threading.Thread(target=run, args=item) for item in writes.items()]
    for t in others:
        t.start()
    time.sleep(0.3)
    gate.set()
    for t in [first, *others]:
        t.join(10)
    assert got.pop("hold") is True
    return got


def _insert(name: str, *more: str) -> Callable[[Tx], str]:
    def fn(tx: Tx) -> str:
        for driver in (name, *more):
            tx.execute("INSERT INTO drivers (id, created_at) VALUES (?, ?)", (driver, 1))
        return name
    return fn


def test_writes_done_together_each_get_their_own_result_and_error(tmp_path: Path) -> None:
    db = _sqlite(tmp_path)
    with db.write() as tx:
        tx.execute("INSERT INTO drivers (id, created_at) VALUES (?, ?)", ("first", 1))
    writes = {f"g{i}": _insert(f"g{i}") for i in range(5)}
    writes["bad"] = _insert("bad-partial", "first")          # its second row clashes
    got = _together(db, writes)
    assert {got[f"g{i}"] for i in range(5)} == {f"g{i}" for i in range(5)}
    assert isinstance(got["bad"], IntegrityError)
    # the failing write was rolled back alone: its first row is gone, every other write is stored
    assert _drivers(db) == sorted(["first", *(f"g{i}" for i in range(5))])
    db.close()


def test_a_failed_commit_fails_every_write_done_with_it(tmp_path: Path) -> None:
    db = _sqlite(tmp_path)
    with db.write() as tx:               # a check that only the commit makes
        tx.execute("CREATE TABLE parent (id TEXT PRIMARY KEY)")
        tx.execute("CREATE TABLE child (p TEXT REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)")

    def orphan(tx: Tx) -> None:          # breaks the deferred check: the commit fails
        tx.execute("INSERT INTO child (p) VALUES ('nobody')")

    got = _together(db, {"orphan": orphan, "good": _insert("alice")})
    assert isinstance(got["orphan"], sqlite3.IntegrityError)        # raised by the COMMIT
    assert got["good"] is got["orphan"]
    assert _drivers(db) == [] and db.query("SELECT p FROM child") == []
    db.close()


def test_write_together_returns_and_raises_as_a_write_does(db_url: str) -> None:
    db = Database.open(db_url)
    db.migrate()

    def fn(tx: Tx) -> int:
        return tx.execute("INSERT INTO drivers (id, created_at) VALUES (?, ?)", ("alice", 1))
    assert db.write_together(fn) == 1
    with pytest.raises(IntegrityError):
        db.write_together(fn)
    assert _drivers(db) == ["alice"]
    db.close()

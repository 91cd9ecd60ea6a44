from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from backend.db import Database, Tx
from backend.errors import DatabaseError, IntegrityError


def test_migrations_apply_once(db_url: str) -> None:
    db = Database.open(db_url)
    first = db.migrate()
    assert "001_devices" in first
    assert db.migrate() == []
    db.close()


def test_unique_violation_is_one_exception_and_rolls_back(db_url: str) -> None:
    db = Database.open(db_url)
    db.migrate()
    with db.write() as tx:
        tx.execute("INSERT INTO drivers (id, created_at) VALUES (?, ?)", ("alice", 1))
    with pytest.raises(IntegrityError), db.write() as tx:
        tx.execute("INSERT INTO drivers (id, created_at) VALUES (?, ?)", ("bob", 2))
        tx.execute("INSERT INTO drivers (id, created_at) VALUES (?, ?)", ("alice", 3))
    assert [r["id"] for r in db.query("SELECT id FROM drivers ORDER BY id")] == ["alice"]
    assert db.one("SELECT count(*) AS n FROM drivers WHERE id LIKE ?", ("a%",)) == {"n": 1}
    db.close()


@pytest.mark.parametrize("url", ["mysql://x", "sqlite://relative.db", "postgresql://h/db?schema=Bad-Name"])
def test_bad_urls_are_named(url: str) -> None:
    with pytest.raises(DatabaseError, match=re.escape(repr(url))) as err:
        Database.open(url)
    assert "--db" not in str(err.value)  # the CLI says where the URL came from, not the database


def test_sqlite_writers_of_one_file_take_turns_and_are_woken_when_it_is_free(tmp_path: Path) -> None:
    """Two handles on one SQLite file (as two processes have): a writer waits for the other's
    commit through the writers' lock beside the file, and goes on at once after it."""
    import threading
    import time

    url = f"sqlite:///{tmp_path}/turns.db"
    first, second = Database.open(url), Database.open(url)
    first.migrate()
    held, released, done = threading.Event(), [0.0], [0.0]

    def hold() -> None:
        with first.write() as tx:
            tx.execute("INSERT INTO settings (name, value) VALUES ('a', '1')")
            held.set()
            time.sleep(0.3)
            released[0] = time.monotonic()

    t = threading.Thread(target=hold)
    t.start()
    assert held.wait(5)
    assert (tmp_path / "turns.db-writer").exists()
    with second.write() as tx:
        done[0] = time.monotonic()
        assert tx.scalar("SELECT value FROM settings WHERE name = 'a'") == "1"    # after its commit
        tx.execute("INSERT INTO settings (name, value) VALUES ('b', '2')")
    t.join(5)
    assert 0 <= done[0] - released[0] < 0.1
    assert {r["name"] for r in first.query("SELECT name FROM settings")} >= {"a", "b"}
    first.close()
    second.close()


def test_write_each_rolls_back_a_write_that_raises_alone(db_url: str) -> None:
    db = Database.open(db_url)
    db.migrate()

    def put(name: str) -> Callable[[Tx], str]:
        def fn(tx: Tx) -> str:
            tx.execute("INSERT INTO settings (name, value) VALUES (?, ?)", (name, "v"))
            if name == "bad":
                raise ValueError("refused")
            return name
        return fn

    answers = db.write_each([put("one"), put("bad"), put("two")])
    assert answers[0] == "one" and answers[2] == "two"
    assert isinstance(answers[1], ValueError)
    names = {r["name"] for r in db.query("SELECT name FROM settings")}
    assert {"one", "two"} <= names and "bad" not in names
    db.close()

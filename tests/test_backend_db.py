from __future__ import annotations

import re

import pytest

from backend.db import Database
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

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backend.db import Database
from sim.broker import Broker, start_broker
from sim.devices import load_test_rules
from sim.stack import Stack
from tests.e2e_support import left_running

#: The PostgreSQL server the suite uses; each test gets a fresh schema in it.
PG_URL = os.environ.get("ODO_TEST_PG", "postgresql://127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """A real mosquitto on a free loopback port, shared by the session."""
    b = start_broker()
    yield b
    b.stop()


def _drop_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty backend database: a SQLite file, or a new PostgreSQL schema.

    PostgreSQL is required, never skipped: a missing server is a failure."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/backend.db"
        return
    schema = f"odo_test_{uuid.uuid4().hex[:12]}"
    sep = "&" if "?" in PG_URL else "?"
    yield f"{PG_URL}{sep}schema={schema}"
    _drop_schema(schema)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """The whole system on real parts: mosquitto, and `odo-backend run` on SQLite; add cars."""
    with Stack(tmp_path / "stack") as s:
        s.start_broker()
        s.start_backend()
        yield s
    assert left_running(tmp_path) == []


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    """A migrated backend database on each of SQLite and PostgreSQL."""
    database = Database.open(db_url)
    database.migrate()
    yield database
    database.close()


@pytest.fixture
def rules(tmp_path: Path) -> Any:
    """The rules file of the backend tests, loaded."""
    return load_test_rules(tmp_path)

"""The one place that knows SQLite from PostgreSQL.

Everything else writes portable SQL with ``?`` placeholders and gets rows as
dicts. On SQLite, a process's write transactions take turns on one lock (the file
has one writer anyway, and waiting on a lock beats SQLite's busy retries); on
PostgreSQL each thread writes on its own connection, at the same time as the
others, and what must be ordered is ordered by advisory locks (:meth:`Database.lock_key`),
across threads and processes alike. Both dialects see the same schema through
named, ordered migrations.

    db = Database.open("sqlite:///var/lib/odo/backend.db")
    db.migrate()
    with db.write() as tx:
        tx.execute("INSERT INTO drivers (id, created_at) VALUES (?, ?)", ("alice", now))
    rows = db.query("SELECT * FROM drivers")
"""

from __future__ import annotations

import re
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from backend.errors import DatabaseError, IntegrityError, LockTimeout
from common.clock import now_ms

Row = dict[str, Any]
Params = Sequence[Any]


_TOKENS = {
    "sqlite": {"{id}": "INTEGER PRIMARY KEY AUTOINCREMENT", "{blob}": "BLOB", "{bigint}": "INTEGER",
               "{bool}": "INTEGER"},
    "postgresql": {"{id}": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "{blob}": "BYTEA",
                   "{bigint}": "BIGINT", "{bool}": "INTEGER"},
}


class Tx:
    """A transaction: ``execute`` and ``query`` with ``?`` placeholders."""

    def __init__(self, db: Database, conn: Any) -> None:
        self._db = db
        self._conn = conn

    def execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement; return the number of rows it changed."""
        cur = self._db._run(self._conn, sql, params)
        return int(cur.rowcount or 0)

    def query(self, sql: str, params: Params = ()) -> list[Row]:
        cur = self._db._run(self._conn, sql, params)
        return self._db._rows(cur)

    def one(self, sql: str, params: Params = ()) -> Row | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def scalar(self, sql: str, params: Params = ()) -> Any:
        row = self.one(sql, params)
        return next(iter(row.values())) if row else None

    def insert_ignore(self, table: str, values: dict[str, Any], conflict: Sequence[str]) -> bool:
        """INSERT … ON CONFLICT DO NOTHING; True when a row was inserted."""
        cols = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        sql = (f"INSERT INTO {table} ({cols}) VALUES ({marks}) "
               f"ON CONFLICT ({', '.join(conflict)}) DO NOTHING")
        return self.execute(sql, tuple(values.values())) == 1


def insert_many(tx: Tx, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                conflict: str | None = None) -> int:
    """Insert ``rows`` in as few statements as the parameter limit allows (SQLite takes 999 a
    statement); with ``conflict``, rows that clash on that column are skipped. Returns the rows
    inserted."""
    per = max(1, 900 // len(columns))
    marks = "(" + ", ".join("?" for _ in columns) + ")"
    tail = f" ON CONFLICT ({conflict}) DO NOTHING" if conflict else ""
    done = 0
    for n in range(0, len(rows), per):
        chunk = rows[n:n + per]
        done += tx.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                           f"{', '.join(marks for _ in chunk)}{tail}", [v for row in chunk for v in row])
    return done


class Database:
    """A SQLite file or a PostgreSQL database, opened from a URL."""

    def __init__(self, url: str, dialect: str, target: str, schema: str | None) -> None:
        self.url = url
        self.dialect = dialect
        self._target = target
        self._schema = schema
        self._local = threading.local()
        # SQLite only: its writers take turns in the process. PostgreSQL's run at once.
        self._write_lock: AbstractContextManager[Any] = (
            threading.RLock() if dialect == "sqlite" else nullcontext())

    # -- opening --------------------------------------------------------------

    @classmethod
    def open(cls, url: str) -> Database:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme == "sqlite":
            path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
            if not path:
                raise DatabaseError(f"{url!r}: use sqlite:///path/to/file.db")
            if path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            return cls(url, "sqlite", path, None)
        if parsed.scheme in ("postgresql", "postgres"):
            query = urllib.parse.parse_qs(parsed.query)
            schema = query.pop("schema", [None])[0]
            if schema is not None and not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
                raise DatabaseError(f"{url!r}: schema {schema!r} must be a plain lowercase identifier")
            rest = urllib.parse.urlencode({k: v[0] for k, v in query.items()})
            target = urllib.parse.urlunsplit(parsed._replace(query=rest))
            return cls(url, "postgresql", target, schema)
        raise DatabaseError(
            f"{url!r}: unsupported scheme {parsed.scheme!r} (use sqlite:/// or postgresql://)"
        )

    def _connect(self) -> Any:
        if self.dialect == "sqlite":
            lite = sqlite3.connect(self._target, timeout=30, isolation_level=None,
                                   check_same_thread=False)
            lite.execute("PRAGMA journal_mode=WAL")
            # FULL: a record acknowledged to a device must survive a power cut of the server.
            lite.execute("PRAGMA synchronous=FULL")
            lite.execute("PRAGMA foreign_keys=ON")
            lite.row_factory = sqlite3.Row
            return lite
        import psycopg
        from psycopg.rows import dict_row

        try:
            conn = psycopg.connect(self._target, autocommit=True, row_factory=dict_row)
        except psycopg.OperationalError as exc:
            raise DatabaseError(f"cannot connect to PostgreSQL: {exc}".strip()) from None
        if self._schema:
            conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self._schema}"')
            conn.execute(f'SET search_path TO "{self._schema}"')
        return conn

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- statements -----------------------------------------------------------

    def _sql(self, sql: str) -> str:
        if self.dialect == "postgresql":
            return sql.replace("%", "%%").replace("?", "%s")
        return sql

    def _run(self, conn: Any, sql: str, params: Params) -> Any:
        try:
            if self.dialect == "sqlite":
                return conn.execute(sql, tuple(params))
            return conn.execute(self._sql(sql), tuple(params))
        except sqlite3.IntegrityError as exc:
            raise IntegrityError(str(exc)) from exc
        except Exception as exc:
            if type(exc).__name__ in ("UniqueViolation", "ForeignKeyViolation", "IntegrityError"):
                raise IntegrityError(str(exc)) from exc
            raise

    def _rows(self, cur: Any) -> list[Row]:
        if cur.description is None:
            return []
        return [dict(r) for r in cur.fetchall()]

    @contextmanager
    def write(self) -> Iterator[Tx]:
        """A write transaction (``BEGIN IMMEDIATE`` on SQLite); commits on success.

        On SQLite one thread of the process at a time is in one; on PostgreSQL, threads are
        in theirs at once (each has its own connection)."""
        with self._write_lock:
            conn = self._conn()
            if self.dialect == "sqlite":
                conn.execute("BEGIN IMMEDIATE")
            else:
                conn.execute("BEGIN")
            try:
                yield Tx(self, conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[Tx]:
        """A consistent read snapshot."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield Tx(self, conn)
        finally:
            conn.execute("ROLLBACK")

    def query(self, sql: str, params: Params = ()) -> list[Row]:
        with self.read() as tx:
            return tx.query(sql, params)

    def one(self, sql: str, params: Params = ()) -> Row | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def lock_key(self, tx: Tx, key: int, wait_ms: int | None = None, *, shared: bool = False) -> None:
        """Serialise writers across processes on one key (PostgreSQL advisory lock;
        SQLite's BEGIN IMMEDIATE already serialises every writer); ``shared``: only against
        those that take the key exclusively. With ``wait_ms``, waiting longer than that for a
        lock (this one or any later one of the transaction) raises :class:`LockTimeout`, and
        the transaction is rolled back."""
        if self.dialect != "postgresql":
            return
        if wait_ms is not None:
            tx.execute(f"SET LOCAL lock_timeout = {int(wait_ms)}")
        try:
            tx.execute(f"SELECT pg_advisory_xact_lock{'_shared' if shared else ''}(?)", (key,))
        except Exception as exc:
            if type(exc).__name__ == "LockNotAvailable":
                raise LockTimeout(f"a lock was held by another process for more than {wait_ms} ms") from None
            raise

    def try_lock_key(self, tx: Tx, key: int) -> bool:
        """:meth:`lock_key` if no other transaction holds it now; False (not waiting) if one does."""
        if self.dialect == "postgresql":
            return bool(tx.scalar("SELECT pg_try_advisory_xact_lock(?) AS ok", (key,)))
        return True

    # -- schema ---------------------------------------------------------------

    def ddl(self, sql: str) -> str:
        for token, value in _TOKENS[self.dialect].items():
            sql = sql.replace(token, value)
        return sql

    def migrate(self, migrations: Sequence[tuple[str, str]] | None = None) -> list[str]:
        """Apply the named migrations not yet recorded; return their names."""
        if migrations is None:
            from backend.schema import MIGRATIONS

            migrations = MIGRATIONS
        applied: list[str] = []
        with self.write() as tx:
            self.lock_key(tx, 0x0D0_0001)
            tx.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                       "(name TEXT PRIMARY KEY, applied_at {bigint} NOT NULL)".replace(
                           "{bigint}", _TOKENS[self.dialect]["{bigint}"]))
            done = {r["name"] for r in tx.query("SELECT name FROM schema_migrations")}
            for name, sql in migrations:
                if name in done:
                    continue
                for statement in (s.strip() for s in self.ddl(sql).split(";")):
                    if statement:
                        tx.execute(statement)
                tx.execute("INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)",
                           (name, now_ms()))
                applied.append(name)
        return applied

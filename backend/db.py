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

import fcntl
import os
import re
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Generic, TypeVar

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


@contextmanager
def _integrity_errors() -> Iterator[None]:
    """Either driver's constraint violations, as :class:`IntegrityError`."""
    try:
        yield
    except sqlite3.IntegrityError as exc:
        raise IntegrityError(str(exc)) from exc
    except Exception as exc:
        if type(exc).__name__ in ("UniqueViolation", "ForeignKeyViolation", "IntegrityError"):
            raise IntegrityError(str(exc)) from exc
        raise


def insert_many(tx: Tx, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                conflict: str | None = None) -> int:
    """Insert ``rows``; with ``conflict``, rows that clash on that column are skipped. Returns the
    rows inserted.

    On SQLite, in as few statements as its parameter limit allows (999 a statement). On
    PostgreSQL, with ``COPY`` (a multi-row ``INSERT`` costs the client ten times as much CPU a
    row, adapting every parameter), or, to skip conflicts, one prepared ``INSERT … ON CONFLICT``
    sent for every row in one pipeline."""
    if not rows:
        return 0
    return tx._db._insert_many(tx._conn, table, columns, rows, conflict)


#: Writes done together in one SQLite transaction, at most (:meth:`Database.write_together`).
MAX_TOGETHER = 16
T = TypeVar("T")


class _Job(Generic[T]):
    """A write submitted to :meth:`Database.write_together`, and what came of it."""

    def __init__(self, fn: Callable[[Tx], T]) -> None:
        self.fn = fn
        self.done = False
        self.result: T | None = None
        self.error: BaseException | None = None


#: How long a SQLite writer looks for the writers' lock of the file (then it leaves it to
#: SQLite's own wait, which gives up after its timeout), and how often.
WRITER_WAIT_S = 30.0
WRITER_POLL_S = 0.0005


class _Writers:
    """SQLite's writers, one at a time: the threads of this process by a lock, and the processes
    that write the same file (``odo-backend run`` and its ingest processes, the CLI) by an
    ``flock`` on ``<file>-writer`` beside it, looked for every half millisecond. SQLite's own
    wait (its busy handler) sleeps ever longer between tries, up to 100 ms, so that under load
    a process could wait on while others take the lock again and again. A file that cannot be
    made (a read-only directory) leaves it to SQLite's wait alone."""

    def __init__(self, path: str) -> None:
        self._lock = threading.RLock()
        self._path = None if path == ":memory:" else f"{path}-writer"
        self._fd: int | None = None
        self._depth = 0                        # writes of the thread that holds the lock, nested
        self._locked = False                   # the flock is held

    def __enter__(self) -> None:
        self._lock.acquire()
        try:
            if self._depth == 0 and self._path is not None:
                if self._fd is None:
                    try:
                        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                    except OSError:
                        self._path = None       # SQLite's own locking alone
                if self._fd is not None:
                    self._locked = _flock(self._fd)
        except BaseException:
            self._lock.release()
            raise
        self._depth += 1

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0 and self._locked:
            assert self._fd is not None
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._locked = False
        self._lock.release()


def _flock(fd: int) -> bool:
    """Take the writers' lock of a file: True, or False if another process kept it for
    :data:`WRITER_WAIT_S` (a writer stopped in its transaction: SQLite's wait decides then)."""
    deadline = time.monotonic() + WRITER_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(WRITER_POLL_S)


class Database:
    """A SQLite file or a PostgreSQL database, opened from a URL."""

    def __init__(self, url: str, dialect: str, target: str, schema: str | None) -> None:
        self.url = url
        self.dialect = dialect
        self._target = target
        self._schema = schema
        self._local = threading.local()
        # SQLite only: its writers take turns, in the process and across processes. PostgreSQL's
        # run at once.
        self._write_lock: AbstractContextManager[Any] = (
            _Writers(target) if dialect == "sqlite" else nullcontext())
        self._waiting: list[_Job[Any]] = []          # SQLite: writes for the next holder of the lock
        self._waiting_lock = threading.Lock()

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
        with _integrity_errors():
            if self.dialect == "sqlite":
                return conn.execute(sql, tuple(params))
            return conn.execute(self._sql(sql), tuple(params))

    def _insert_many(self, conn: Any, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                     conflict: str | None) -> int:
        tail = f" ON CONFLICT ({conflict}) DO NOTHING" if conflict else ""
        names = ", ".join(columns)
        if self.dialect == "sqlite":
            per = max(1, 900 // len(columns))
            marks = "(" + ", ".join("?" for _ in columns) + ")"
            done = 0
            for n in range(0, len(rows), per):
                chunk = rows[n:n + per]
                done += int(self._run(conn, f"INSERT INTO {table} ({names}) VALUES "
                                            f"{', '.join(marks for _ in chunk)}{tail}",
                                      [v for row in chunk for v in row]).rowcount)
            return done
        with _integrity_errors():
            cur = conn.cursor()
            if conflict is None:
                with cur.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
                return len(rows)
            marks = ", ".join("%s" for _ in columns)
            cur.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks}){tail}", rows)
            return int(cur.rowcount)

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

    def write_together(self, fn: Callable[[Tx], T]) -> T:
        """``fn`` in a write transaction, its result returned (its exception raised).

        On SQLite, the writes that other threads submit this way while one is in hand are done
        together when the lock is free, in one transaction of one commit (one fsync, one turn of
        the lock), each in a savepoint of its own: one that raises is rolled back alone, and only
        its caller sees the exception. If the commit fails, each caller sees that. On PostgreSQL,
        whose writers run at once, simply :meth:`write`."""
        if self.dialect != "sqlite":
            with self.write() as tx:
                return fn(tx)
        job = _Job(fn)
        with self._waiting_lock:
            self._waiting.append(job)
        with self._write_lock:
            while not job.done:              # unless done by the thread that held the lock before
                with self._waiting_lock:
                    jobs, self._waiting = self._waiting[:MAX_TOGETHER], self._waiting[MAX_TOGETHER:]
                self._run_together(jobs)
        assert job.done
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    def write_each(self, fns: Sequence[Callable[[Tx], T]]) -> list[T | Exception]:
        """Each of ``fns`` in a savepoint of its own, what it returned or the exception it raised:
        on SQLite in one transaction of one commit (by :data:`MAX_TOGETHER` at most), so that
        one that raises is rolled back alone; if a commit fails, every write with it has that
        exception. On PostgreSQL, each in its own transaction."""
        if self.dialect != "sqlite":
            out: list[T | Exception] = []
            for fn in fns:
                try:
                    with self.write() as tx:
                        out.append(fn(tx))
                except Exception as exc:  # noqa: BLE001 - handed to the caller, one per write
                    out.append(exc)
            return out
        jobs = [_Job(fn) for fn in fns]
        with self._write_lock:
            for n in range(0, len(jobs), MAX_TOGETHER):
                self._run_together(jobs[n:n + MAX_TOGETHER])
        answers: list[T | Exception] = []
        for job in jobs:
            if job.error is not None and not isinstance(job.error, Exception):
                raise job.error                  # KeyboardInterrupt and the like
            answers.append(job.error if job.error is not None else job.result)  # type: ignore[arg-type]
        return answers

    def _run_together(self, jobs: list[_Job[Any]]) -> None:
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for job in jobs:
                    conn.execute("SAVEPOINT together")
                    try:
                        job.result = job.fn(Tx(self, conn))
                    except BaseException as exc:   # noqa: BLE001 - handed to its caller
                        if not conn.in_transaction:
                            raise                  # SQLite rolled it all back (a full disk, an I/O error)
                        conn.execute("ROLLBACK TO together")
                        job.error = exc
                    conn.execute("RELEASE together")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except BaseException as exc:         # noqa: BLE001 - the transaction failed: every write with it
            for job in jobs:
                if job.error is None:
                    job.error, job.result = exc, None
        finally:
            for job in jobs:
                job.done = True

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

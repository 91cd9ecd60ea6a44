"""The outbox: every signed record, kept in SQLite until the backend acknowledges it.

One table of records and a small key/value table of state (the vehicle snapshot,
the chain tip, the last ack and balance, the VIN, the enrolment, the last
confirmation: every key and its value type are in :mod:`agent.state`; this
module only gets and puts its JSON values). Writes take ``BEGIN IMMEDIATE``, so
the write lock is held from reading the chain tip to inserting the record that
extends it: the daemon and ``odo-agent confirm`` (another process) can both
append, and seqs stay unique and gap-free. Schema changes are named, ordered migrations.

``synchronous=FULL``: in WAL mode, ``NORMAL`` only fsyncs at checkpoints, so a
power cut (the normal way a car turns a dongle off) can roll back the last
commits. Those records may already have been read and published by the sync
loop: after the reboot the agent would sign *different* records under the same
seqs, which the backend must treat as a ``fork`` (cloned key or broken device),
and the driver's confirmation could vanish. With ``FULL`` every commit is on
disk before anything else can see it, so a seq once used is never reused. It
costs ~0.2 ms a commit (5.6k/s measured) against ~1 record a second. ``DELETE``
journal + ``FULL`` would be as safe, but it fsyncs the journal and the database on
every commit (~0.9 ms a commit against ~0.25 ms measured side by side) and blocks
readers (``status``, the UI) while it writes. SQLite fsyncs the directory when it
creates the WAL; the outbox file itself is created here and fsynced with its
directory, so that a new outbox survives a power cut too.

The file is created mode 0600 whatever the umask, and SQLite gives its ``-wal`` and
``-shm`` the same mode; an existing file that others may read is tightened (logged).

Opening checks the file before anything else uses it (tests/test_outbox_faults.py cuts
the power at many points to show why): SQLite's ``integrity_check`` (~0.1 s for 50k
records measured; ``quick_check`` is 4 times faster but misses an index that a torn
page left out of step with its table), then the chain's invariants: the tip is the last
record, and the unsynced records run gap-free up to it. A file that fails is a
:class:`StorageError` naming the file and the problem, and nothing is appended to it:
appending to a damaged chain would sign records the backend cannot take.

Pruning never deletes an unsynced record: the backend accepts seqs strictly in
order, so a hole would block the device's sync for ever. Synced records go
after ``retention_days``, or earlier, oldest first, when the table is over its
cap or the disk is full (:mod:`agent.recorder` prunes then). What to do when
the *unsynced* backlog alone is too big is the recorder's admission policy (it
stops writing odometer samples, then everything but trips and confirmations).

Exceptions: :class:`StorageError` (disk full, I/O error, lock timeout): the
write did not happen and nothing already stored changed.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import StorageError
from agent.state import ACK, LAST_REJECTION, TIP, LastAck, LastRejection, Tip, Writes, writes
from protocol.messages import UNSEQUENCED, Ack, Rejection
from protocol.records import Record

log = logging.getLogger(__name__)

MIGRATIONS: list[tuple[str, list[str]]] = [
    ("001_records_and_state", [
        """CREATE TABLE records (
            seq      INTEGER PRIMARY KEY,        -- 1, 2, 3 … per device, gap-free
            id       TEXT NOT NULL UNIQUE,       -- SHA-256 of the JWS
            jws      TEXT NOT NULL,              -- verbatim, as signed
            kind     TEXT NOT NULL,
            t        INTEGER NOT NULL,           -- Unix ms, as signed
            odo_m    INTEGER,
            synced   INTEGER NOT NULL DEFAULT 0, -- 1 once an ack's `through` covers it
            acked_at INTEGER,                    -- when that ack came (Unix ms)
            rejected TEXT                        -- the backend's reason, when it rejected it
        )""",
        "CREATE INDEX records_synced ON records (synced, seq)",
        "CREATE INDEX records_kind ON records (kind, seq)",
        "CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL)",  # JSON values
    ]),
]

Builder = Callable[[int, str], Record]
"""Signs the record for (seq, prev); called inside the write transaction."""


@dataclass(frozen=True)
class Stored:
    seq: int
    id: str
    jws: str
    kind: str
    t: int
    odo_m: int | None
    synced: bool
    acked_at: int | None
    rejected: str | None


@dataclass(frozen=True)
class Counts:
    total: int
    unsynced: int
    last_seq: int
    synced_through: int


@dataclass(frozen=True)
class AckOutcome:
    through: int                       # the highest `through` seen so far
    newly_synced: int                  # records this ack marked synced
    pending: tuple[Rejection, ...]     # rejections that did not take a seq (e.g. unknown_device)


def _private_file(path: Path) -> None:
    """Create ``path`` empty, mode 0600 whatever the umask, on disk with its directory entry;
    or tighten the outbox's files that are there and that others may read."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for p in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal"))):
            try:
                mode = stat.S_IMODE(p.stat().st_mode)
                if mode & 0o077:
                    os.chmod(p, mode & 0o700)
                    log.warning("%s was mode %o; made it %o", p, mode, mode & 0o700)
            except FileNotFoundError:
                pass
            except PermissionError as exc:
                log.warning("%s may be readable by others: %s", p, exc.strerror)
        return
    try:
        os.fchmod(fd, 0o600)
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _row(r: sqlite3.Row) -> Stored:
    return Stored(r["seq"], r["id"], r["jws"], r["kind"], r["t"], r["odo_m"], bool(r["synced"]),
                  r["acked_at"], r["rejected"])


class Outbox:
    """One connection per process, shared by its threads under a lock."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._lock = threading.RLock()
        self.path = path

    @classmethod
    def open(cls, path: Path, *, busy_timeout_s: float = 10.0) -> Outbox:
        """Open (or create) the outbox; :class:`StorageError` when it cannot or is damaged."""
        try:
            _private_file(path)
        except OSError as exc:
            raise StorageError(f"cannot open the outbox {path}: {exc.strerror}") from exc
        try:
            conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the outbox {path}: {exc}") from exc
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # see the module docstring
            box = cls(conn, path)
            box._check()
            box._migrate()
        except (sqlite3.Error, StorageError) as exc:
            conn.close()
            raise StorageError(f"cannot open the outbox {path}: {exc}") from exc
        return box

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- transactions ---------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StorageError(f"outbox: cannot start a write: {exc}") from exc
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise StorageError(f"outbox: write failed: {exc}") from exc
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # already rolled back by SQLite (e.g. SQLITE_FULL)

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._conn.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StorageError(f"outbox: read failed: {exc}") from exc

    def _check(self) -> None:
        """Raise :class:`StorageError` when the file is damaged (see the module docstring)."""
        with self._lock:
            c = self._conn
            c.execute("BEGIN")  # one snapshot for all the checks
            try:
                problems = [str(r[0]) for r in c.execute("PRAGMA integrity_check(3)")]
                if problems != ["ok"]:
                    raise StorageError(f"the file is damaged: {'; '.join(problems)}")
                if c.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'records'"
                             ).fetchone() is None:
                    return  # a new outbox
                tip = TIP.load(self._get(c, TIP.name))
                last = c.execute("SELECT seq, id FROM records ORDER BY seq DESC LIMIT 1").fetchone()
                if last is not None and (last[0], last[1]) != (tip.seq, tip.id):
                    raise StorageError(f"the file is damaged: its chain tip (seq {tip.seq}) "
                                       f"is not its last record (seq {last[0]})")
                first, n = c.execute("SELECT MIN(seq), COUNT(*) FROM records WHERE synced = 0").fetchone()
                if n and tip.seq - first + 1 != n:
                    raise StorageError(f"the file is damaged: {tip.seq - first + 1 - n} unsynced "
                                       f"records between seq {first} and {tip.seq} are missing")
            finally:
                if c.in_transaction:  # SQLite may have ended it on an error
                    c.execute("COMMIT")

    def _migrate(self) -> None:
        with self._write() as c:
            c.execute(
                "CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
            done = {r[0] for r in c.execute("SELECT name FROM migrations")}
            for name, statements in MIGRATIONS:
                if name in done:
                    continue
                for sql in statements:
                    c.execute(sql)
                c.execute("INSERT INTO migrations VALUES (?, datetime('now'))", (name,))
                log.debug("outbox: applied migration %s", name)

    # -- state ----------------------------------------------------------------------------------

    @staticmethod
    def _get(c: sqlite3.Connection, key: str) -> object:
        row = c.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    @staticmethod
    def _put(c: sqlite3.Connection, values: Mapping[str, object]) -> None:
        for key, value in values.items():
            c.execute("INSERT INTO state VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                      (key, json.dumps(value, separators=(",", ":"))))

    def state(self, key: str, default: Any = None) -> Any:
        """The JSON value of ``key`` (low level: the agent reads it through :mod:`agent.state`)."""
        rows = self._read("SELECT value FROM state WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else default

    def set_state(self, values: Mapping[str, object]) -> None:
        """Save JSON values in one transaction (low level: see :mod:`agent.state`)."""
        with self._write() as c:
            self._put(c, values)

    # -- appending ------------------------------------------------------------------------------

    def append(self, builders: Sequence[Builder], state: Writes | None = None) -> list[Record]:
        """Sign and insert records at the chain tip, and save ``state``, in ONE transaction."""
        out: list[Record] = []
        with self._write() as c:
            tip = TIP.load(self._get(c, TIP.name))
            seq, prev = tip.seq, tip.id
            for build in builders:
                rec = build(seq + 1, prev)
                if rec.seq != seq + 1 or rec.prev != prev:
                    raise ValueError("builder signed the wrong seq/prev")
                c.execute(
                    "INSERT INTO records (seq, id, jws, kind, t, odo_m) VALUES (?, ?, ?, ?, ?, ?)",
                    (rec.seq, rec.id, rec.jws, rec.kind, rec.t, rec.odo_m),
                )
                seq, prev = rec.seq, rec.id
                out.append(rec)
            self._put(c, {**writes(TIP.entry(Tip(seq, prev))), **(state or {})})
        return out

    def tip(self) -> tuple[int, str]:
        tip = TIP.get(self)
        return tip.seq, tip.id

    # -- reading --------------------------------------------------------------------------------

    def get(self, seq: int) -> Stored | None:
        rows = self._read("SELECT * FROM records WHERE seq = ?", (seq,))
        return _row(rows[0]) if rows else None

    def records(self, after_seq: int = 0, limit: int = 1000) -> list[Stored]:
        rows = self._read("SELECT * FROM records WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit))
        return [_row(r) for r in rows]

    def pending(self, from_seq: int, limit: int) -> list[tuple[int, str]]:
        """Unsynced records from ``from_seq`` on, ascending: (seq, jws)."""
        rows = self._read(
            "SELECT seq, jws FROM records WHERE synced = 0 AND seq >= ? ORDER BY seq LIMIT ?",
            (from_seq, limit),
        )
        return [(int(r[0]), str(r[1])) for r in rows]

    def first_unsynced(self) -> int | None:
        rows = self._read("SELECT MIN(seq) FROM records WHERE synced = 0")
        return int(rows[0][0]) if rows[0][0] is not None else None

    def latest(self, kind: str) -> Stored | None:
        rows = self._read("SELECT * FROM records WHERE kind = ? ORDER BY seq DESC LIMIT 1", (kind,))
        return _row(rows[0]) if rows else None

    def counts(self) -> Counts:
        rows = self._read("SELECT COUNT(*), COALESCE(SUM(synced = 0), 0) FROM records")
        last_seq, _ = self.tip()
        ack = ACK.get(self)
        return Counts(int(rows[0][0]), int(rows[0][1]), last_seq, ack.through if ack is not None else 0)

    def backlog(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM records WHERE synced = 0")[0][0])

    # -- acks -----------------------------------------------------------------------------------

    def apply_ack(self, ack: Ack, now_ms: int) -> AckOutcome:
        """Mark records up to ``through`` synced, store their rejections, keep the balance.

        A rejection of a seq ≤ ``through`` with a reason that takes the seq is the
        final word on that record. A rejection that does not take a seq (e.g.
        ``unknown_device`` before approval) leaves the record unsynced, to be sent
        again; it is kept as ``last_rejection`` for status.
        """
        pending: list[Rejection] = []
        with self._write() as c:
            prev = ACK.load(self._get(c, ACK.name))
            through = max(prev.through if prev is not None else 0, ack.through)
            tip = TIP.load(self._get(c, TIP.name)).seq
            if ack.through > tip:
                log.warning("ack through %d is beyond this device's last seq %d", ack.through, tip)
            cur = c.execute(
                "UPDATE records SET synced = 1, acked_at = ? WHERE synced = 0 AND seq <= ?",
                (now_ms, ack.through),
            )
            newly = cur.rowcount
            for rej in ack.rejected:
                if rej.seq is not None and rej.seq <= ack.through and rej.reason not in UNSEQUENCED:
                    c.execute("UPDATE records SET rejected = ? WHERE seq = ?", (rej.reason, rej.seq))
                else:
                    pending.append(rej)
            update = writes(ACK.entry(LastAck(through, now_ms, ack.balance)))
            if pending:
                last = pending[-1]
                update.update([LAST_REJECTION.entry(LastRejection(last.seq, last.reason, now_ms))])
            elif newly:
                update.update([LAST_REJECTION.entry(None)])
            self._put(c, update)
        return AckOutcome(through, newly, tuple(pending))

    # -- pruning --------------------------------------------------------------------------------

    def prune(self, now_ms: int, *, retention_ms: int, max_records: int) -> tuple[int, int]:
        """Delete synced records past retention, then the oldest synced ones while
        over ``max_records``. Never an unsynced one. Returns (expired, over_cap)."""
        with self._write() as c:
            expired = c.execute(
                "DELETE FROM records WHERE synced = 1 AND acked_at < ?", (now_ms - retention_ms,)
            ).rowcount
            total = int(c.execute("SELECT COUNT(*) FROM records").fetchone()[0])
            over = 0
            if total > max_records:
                over = c.execute(
                    "DELETE FROM records WHERE seq IN "
                    "(SELECT seq FROM records WHERE synced = 1 ORDER BY seq LIMIT ?)",
                    (total - max_records,),
                ).rowcount
        return expired, over

"""The witness's state file (SQLite): its own key and name, and the last checkpoint it cosigned
for each log.

Tables::

    witness      one row: the witness's name and Ed25519 key (PKCS#8 PEM), made on first use
    checkpoints  per log origin: the size and root last cosigned, the note as cosigned, and when
    refused      log-signed checkpoints refused as inconsistent (the evidence of a fork): the
                 first MAX_REFUSED are kept, later ones only logged

The check of the old size and the write of the new checkpoint are one compare-and-set
(:meth:`State.advance`), so two requests racing on one log can never roll it back, even from
two processes sharing the file. Writes are durable before they return (SQLite's rollback
journal, ``synchronous = FULL``).
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from protocol import note
from protocol.errors import BadFormat
from protocol.identity import SigningKey
from protocol.witness import MAX_SIZE
from witness.core import Cosigned

VERSION = 1
MAX_REFUSED = 256
DEFAULT_NAME_PREFIX = "witness-"

SCHEMA = """
CREATE TABLE witness (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    name        TEXT NOT NULL,                  -- the key name of its cosignatures
    key_pem     BLOB NOT NULL,                  -- Ed25519, PKCS#8 PEM
    created_ms  INTEGER NOT NULL
);
CREATE TABLE checkpoints (
    origin      TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    root        BLOB NOT NULL,
    note        TEXT NOT NULL,                  -- the log's signature lines and this cosignature
    cosigned_ms INTEGER NOT NULL
);
CREATE TABLE refused (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    origin      TEXT NOT NULL,
    at_ms       INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    body        BLOB NOT NULL                   -- the add-checkpoint request, as received
);
"""
_TABLES = {"witness", "checkpoints", "refused"}


class StateError(Exception):
    """The state file cannot be opened or used, or holds what this version cannot read."""


class NameMismatch(StateError):
    """A name was asked for that is not the one stored with the key."""


@dataclass(frozen=True)
class Identity:
    """The witness's name and key."""

    name: str
    key: SigningKey = field(repr=False)

    @property
    def verifier(self) -> note.Verifier:
        """Its cosignature/v1 (type 0x04) verifier key."""
        return note.Verifier(self.name, note.COSIGNATURE_V1, self.key.public)


@dataclass(frozen=True)
class Record:
    """A stored checkpoint: what was cosigned, the note with its cosignature, and when."""

    cosigned: Cosigned
    note: str = field(repr=False)
    cosigned_ms: int = 0


def default_name() -> str:
    return DEFAULT_NAME_PREFIX + secrets.token_hex(4)


class State:
    """An open state file; its methods may be called from several threads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            if not os.path.exists(path):
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        except OSError as exc:
            raise StateError(f"{path}: cannot create or open it ({exc.strerror})") from None
        except sqlite3.Error as exc:
            raise StateError(f"{path}: cannot open it ({exc})") from None
        try:
            self._migrate()
            self.records()                       # every stored row is checked once, at start
        except StateError as exc:
            self._db.close()
            if isinstance(exc.__cause__, sqlite3.Error):
                raise StateError(f"{path}: not a witness state file ({exc.__cause__})") from None
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``), committed unless an exception escapes;
        a failure of SQLite is a :class:`StateError`."""
        with self._lock, self._errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._errors():
            yield self._db

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: {exc}") from exc

    def _migrate(self) -> None:
        with self._read() as db:
            db.execute("PRAGMA synchronous = FULL")
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if version == 0 and not tables:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {VERSION}")
                return
            if version != VERSION:
                raise StateError(f"{self.path}: state version {version}; this witness reads {VERSION}")
            if not _TABLES <= tables:
                raise StateError(f"{self.path}: lacks the tables {', '.join(sorted(_TABLES - tables))}")

    # -- the witness's key ------------------------------------------------------------------

    def identity(self, name: str | None = None, now_ms: int = 0) -> Identity:
        """The stored name and key, made on first use (under ``name``, or a random default);
        :class:`NameMismatch` if ``name`` is not the stored name."""
        if name is not None:
            try:
                note.check_name(name, "witness name")
            except BadFormat as exc:
                raise NameMismatch(str(exc)) from None
        with self._tx() as db:
            row = db.execute("SELECT name, key_pem FROM witness WHERE id = 1").fetchone()
            if row is None:
                if db.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0]:
                    raise StateError(f"{self.path}: holds cosigned checkpoints but no witness key")
                made = Identity(name or default_name(), SigningKey.generate())
                db.execute("INSERT INTO witness (id, name, key_pem, created_ms) VALUES (1, ?, ?, ?)",
                           (made.name, made.key.to_pem(), now_ms))
                return made
        stored_name, pem = row
        try:
            identity = Identity(note.check_name(str(stored_name), "stored witness name"),
                                SigningKey.from_pem(bytes(pem)))
        except (BadFormat, TypeError) as exc:
            raise StateError(f"{self.path}: the stored witness key is unreadable ({exc})") from None
        if name is not None and name != identity.name:
            raise NameMismatch(f"the witness in {self.path} is named {identity.name!r}, not {name!r}")
        return identity

    # -- checkpoints --------------------------------------------------------------------------

    def _record(self, row: tuple[object, ...]) -> Record:
        origin, size, root, text, at = row
        if (not isinstance(origin, str) or not isinstance(size, int) or not 0 <= size <= MAX_SIZE
                or not isinstance(root, bytes) or len(root) != 32 or not isinstance(text, str)
                or not isinstance(at, int)):
            raise StateError(f"{self.path}: the stored checkpoint of {origin!r} is corrupt")
        return Record(Cosigned(origin, size, root), text, at)

    def records(self) -> list[Record]:
        """Every log's last cosigned checkpoint, by origin."""
        with self._read() as db:
            rows = db.execute(
                "SELECT origin, size, root, note, cosigned_ms FROM checkpoints ORDER BY origin").fetchall()
        return [self._record(r) for r in rows]

    def last(self, origin: str) -> Record | None:
        """The last checkpoint cosigned for ``origin``."""
        with self._read() as db:
            row = db.execute("SELECT origin, size, root, note, cosigned_ms FROM checkpoints "
                             "WHERE origin = ?", (origin,)).fetchone()
        return None if row is None else self._record(row)

    def advance(self, old: Cosigned | None, new: Cosigned, signed_note: str, now_ms: int) -> bool:
        """Record ``new`` as cosigned if the stored checkpoint of its log is still ``old``
        (None: none); False, and nothing written, if another request changed it first."""
        with self._tx() as db:
            if old is None:
                cur = db.execute("INSERT INTO checkpoints (origin, size, root, note, cosigned_ms) "
                                 "VALUES (?, ?, ?, ?, ?) ON CONFLICT (origin) DO NOTHING",
                                 (new.origin, new.size, new.root, signed_note, now_ms))
            else:
                cur = db.execute("UPDATE checkpoints SET size = ?, root = ?, note = ?, cosigned_ms = ? "
                                 "WHERE origin = ? AND size = ? AND root = ?",
                                 (new.size, new.root, signed_note, now_ms, old.origin, old.size, old.root))
            return cur.rowcount == 1

    def keep_refused(self, origin: str, reason: str, body: bytes, now_ms: int) -> bool:
        """Keep a refused log-signed request, unless MAX_REFUSED are kept already (the first
        ones are the evidence); whether it was kept."""
        with self._tx() as db:
            if db.execute("SELECT COUNT(*) FROM refused").fetchone()[0] >= MAX_REFUSED:
                return False
            db.execute("INSERT INTO refused (origin, at_ms, reason, body) VALUES (?, ?, ?, ?)",
                       (origin, now_ms, reason, body))
            return True

    def refused(self) -> list[tuple[str, int, str, bytes]]:
        """The refused requests kept, oldest first: origin, when, why, the body."""
        with self._read() as db:
            rows = db.execute("SELECT origin, at_ms, reason, body FROM refused ORDER BY id").fetchall()
        return [(str(o), int(t), str(r), bytes(b)) for o, t, r, b in rows]

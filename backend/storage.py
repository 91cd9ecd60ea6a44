"""Whether the database could not store at all: a full disk, an I/O error, a lost connection.

The ingest tells these apart from a message that failed on its own: they say nothing about the
message, they stop every write until they pass, and the backend reports them on ``/healthz`` and
``odo_storage_failing`` (:mod:`backend.metrics`) until a write works again.

    reason = storage.failure(exc)      # "database or disk is full", or None for any other error
"""

from __future__ import annotations

from backend.errors import DatabaseError, StorageUnavailable

#: SQLite's primary result codes (https://www.sqlite.org/rescode.html) that mean the file cannot
#: be written, by what they mean. Read off the exception: :mod:`backend.db` alone imports sqlite3.
_SQLITE = {
    13: "database or disk is full",              # SQLITE_FULL
    10: "disk I/O error",                        # SQLITE_IOERR, and its extended codes
    14: "cannot open the database file",         # SQLITE_CANTOPEN
    8: "the database file is read-only",         # SQLITE_READONLY
    7: "out of memory",                          # SQLITE_NOMEM
}

#: PostgreSQL SQLSTATE classes and codes (https://www.postgresql.org/docs/current/errcodes-appendix.html).
_POSTGRES = {
    "53100": "database or disk is full",
    "53200": "out of memory",
    "53": "insufficient resources",
    "58030": "disk I/O error",
    "58": "system error",
    "08": "the database connection failed",
    "57P": "the database server is shutting down",
}


def failure(exc: BaseException) -> str | None:
    """Why ``exc`` means the database cannot store now, or None when it does not."""
    if isinstance(exc, StorageUnavailable):            # said by an ingest process
        return exc.reason
    if type(exc) is DatabaseError:                      # raised by a connection that cannot be made
        return "cannot connect to the database"
    if type(exc).__module__ == "sqlite3":
        code = getattr(exc, "sqlite_errorcode", None)
        return _SQLITE.get(code & 0xFF) if isinstance(code, int) else None
    state = getattr(exc, "sqlstate", None)
    if isinstance(state, str):
        for prefix in (state, state[:3], state[:2]):
            if prefix in _POSTGRES:
                return _POSTGRES[prefix]
        return None
    if type(exc).__name__ == "OperationalError" and type(exc).__module__.startswith("psycopg"):
        return "the database connection failed"        # psycopg's own: no SQLSTATE, no server
    return None

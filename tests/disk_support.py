"""A disk that fills up, for the full-disk tests: a small tmpfs when the tests run as root (a
real ENOSPC under SQLite or PostgreSQL), else SQLite's own page limit (``PRAGMA
max_page_count``: a real SQLITE_FULL from SQLite itself). ``ODO_TEST_DISK=page_limit`` takes
the page limit under root too.

    with small_disk(tmp_path / "disk") as disk:
        ...                         # files in disk.path
        disk.fill()                 # no space left: writes fail
        disk.free()                 # space again
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

#: What the tmpfs holds, filler and all.
TMPFS_SIZE = "8m"
CHUNK = 4096


def tmpfs_available() -> bool:
    """Whether these tests mount a real small filesystem (root, not told otherwise)."""
    return os.geteuid() == 0 and os.environ.get("ODO_TEST_DISK", "tmpfs") != "page_limit"


class SmallDisk:
    """A directory on a tmpfs of its own, filled up with a file of zeros."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> int:
        """Write zeros until the filesystem has no block left; the bytes written."""
        written = 0
        with open(self.filler, "ab", buffering=0) as fh:
            block = b"\0" * CHUNK
            while True:
                try:
                    written += fh.write(block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
            try:                                  # the last partial block too
                while fh.write(b"\0"):
                    written += 1
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
        return written

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


class PageLimit:
    """SQLite's page limit on the connections it is given: full at their current size."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.full = False
        self.connections: list[Callable[[], sqlite3.Connection | None]] = []

    def watch(self, connection: Callable[[], sqlite3.Connection | None]) -> None:
        self.connections.append(connection)

    def limit(self, conn: sqlite3.Connection) -> None:
        """Apply the current limit to ``conn`` (full: no page beyond those it has)."""
        pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
        conn.execute(f"PRAGMA max_page_count = {pages if self.full else 1_000_000_000}")

    def fill(self) -> int:
        self.full = True
        self._apply()
        return 0

    def free(self) -> None:
        self.full = False
        self._apply()

    def _apply(self) -> None:
        for get in self.connections:
            conn = get()
            if conn is not None:
                self.limit(conn)


@contextlib.contextmanager
def small_disk(path: Path, *, owner: str | None = None) -> Iterator[SmallDisk | PageLimit]:
    """A :class:`SmallDisk` mounted at ``path`` (owned by ``owner`` when given), unmounted after;
    a :class:`PageLimit` when this process may not mount."""
    path.mkdir(parents=True, exist_ok=True)
    if not tmpfs_available():
        yield PageLimit(path)
        return
    options = f"size={TMPFS_SIZE},mode=0700"
    if owner is not None:
        entry = pwd.getpwnam(owner)
        options += f",uid={entry.pw_uid},gid={entry.pw_gid}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "odo-test-disk", str(path)], check=True)
    try:
        yield SmallDisk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)

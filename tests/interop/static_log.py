"""A transparency log as a static directory, served over loopback HTTP (test support).

:func:`write` lays out, for a list of entries, what a c2sp.org/tlog-tiles log publishes:

* ``checkpoint`` -- a c2sp.org/tlog-checkpoint note signed by the log key (key name = origin),
  followed by any witnesses' cosignature/v1 lines;
* ``tile/<L>/<N>[.p/<W>]`` -- the hash tiles of every level: each full tile, and the partial
  tile at the right edge of a level;
* ``tile/entries/<N>[.p/<W>]`` -- the entry bundles.

:func:`serve` publishes such a directory on a free loopback port; the base URL it yields is what
``BASE`` is to ``tlogcheck -url BASE``, and so any other log serving the same paths can stand in.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from protocol import checkpoint, merkle, note, tiles
from protocol.identity import SigningKey
from witness.state import Identity as Witness

#: The most entries a static log is built from (every leaf hash is kept in memory).
MAX_ENTRIES = 1 << 20


@dataclass(frozen=True)
class StaticLog:
    """What :func:`write` laid out under ``directory``."""

    directory: Path
    origin: str
    size: int
    root: bytes
    checkpoint: str = field(repr=False)        # the note, signatures and cosignatures included

    def file(self, tile_path: str) -> Path:
        return self.directory / tile_path


def root(entries: Sequence[bytes]) -> bytes:
    """The RFC 6962 root of a log holding ``entries``."""
    return merkle.root([merkle.leaf_hash(e) for e in entries])


def tile_rows(leaf_hashes: Sequence[bytes]) -> list[list[bytes]]:
    """Row ``L`` holds the hashes of tree level ``8*L``: the roots of the full subtrees of
    ``256**L`` leaves, left to right (row 0 is the leaf hashes)."""
    rows: list[list[bytes]] = []
    row = list(leaf_hashes)
    level = 0
    while row:
        if level % tiles.HEIGHT == 0:
            rows.append(row)
        row = [merkle.node_hash(row[i], row[i + 1]) for i in range(0, len(row) - 1, 2)]
        level += 1
    return rows


def _put(directory: Path, tile_path: str, data: bytes) -> None:
    target = directory / tile_path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def write(directory: Path, entries: Sequence[bytes], key: SigningKey, origin: str,
          witnesses: Sequence[Witness] = (), timestamp: int = 1_700_000_000) -> StaticLog:
    """Lay out the log of ``entries`` under ``directory``, its checkpoint signed by ``key`` as
    ``origin`` and cosigned by each of ``witnesses`` at ``timestamp`` (POSIX seconds)."""
    if len(entries) > MAX_ENTRIES:
        raise ValueError(f"a static log holds at most {MAX_ENTRIES} entries, not {len(entries)}")
    for i, e in enumerate(entries):
        if len(e) > tiles.MAX_ENTRY_BYTES:
            raise ValueError(f"entry {i}: {len(e)} bytes, more than {tiles.MAX_ENTRY_BYTES}")
    size = len(entries)
    leaf_hashes = [merkle.leaf_hash(e) for e in entries]
    for level, row in enumerate(tile_rows(leaf_hashes)):
        for n in range(0, (len(row) + tiles.WIDTH - 1) // tiles.WIDTH):
            width = tiles.width_at(size, level, n)
            if width is None:
                raise AssertionError(f"tile {level}/{n} should exist in a tree of {size} leaves")
            hashes = row[n * tiles.WIDTH:n * tiles.WIDTH + width]
            partial = None if width == tiles.WIDTH else width
            _put(directory, tiles.path(level, n, partial), b"".join(hashes))
            if level == 0:
                bundle = tiles.encode_bundle(entries[n * tiles.WIDTH:n * tiles.WIDTH + width])
                _put(directory, tiles.path(None, n, partial), bundle)
    tree_root = merkle.root(leaf_hashes)
    signed = checkpoint.sign_note(key, origin, size, tree_root)
    cosignatures = tuple(note.cosign(signed.text, w.name, w.key, timestamp) for w in witnesses)
    text = note.Note(signed.text, note.parse(signed.signed).signatures + cosignatures).encode()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "checkpoint").write_text(text, encoding="utf-8")
    return StaticLog(directory, origin, size, tree_root, text)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve ``directory`` on a free loopback port; yields its base URL (no trailing slash)."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="static-log", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)

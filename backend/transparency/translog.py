"""The transparency log (docs/log.md): an append-only Merkle tree of what the backend accepted
and decided: records, transfers, enrolments, decisions on devices, rules versions.

Leaves are hashed as RFC 6962 does (:mod:`protocol.merkle`). Each append stores
the leaf and every complete subtree it closes (table ``translog_nodes``), so a
root, an inclusion proof or a tile costs O(log n) lookups, never a pass over the
log. Leaf indexes are allocated under one advisory lock, so several backend
processes on one PostgreSQL never collide; on SQLite, ``BEGIN IMMEDIATE``
already serialises writers.

The log is named by its origin, fixed at first use. Checkpoints are C2SP notes
(:mod:`protocol.checkpoint`) signed by the backend's own Ed25519 log key, made on
first use and kept (PKCS#8 PEM) in table ``settings``; witnesses' cosignatures of
them are kept beside them (:mod:`backend.transparency.witnesses`). Tiles
(c2sp.org/tlog-tiles) are read straight from the stored nodes: a hash at tile
level L is a node at tree level 8L.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from backend.db import Database, Row, Tx, insert_many
from backend.errors import TranslogError
from common.clock import now_ms
from protocol import checkpoint as cp
from protocol import merkle, note, tiles
from protocol.identity import SigningKey, VerifyKey

log = logging.getLogger(__name__)

#: The sequencer's advisory lock: whoever holds it allocates leaf indexes. Nothing else takes it.
LOCK = 0x0D0_7106
#: Entries the sequencer integrates in one transaction, at most.
INTEGRATE_BATCH = 5000
KEY_SETTING = "translog.log_key"
ORIGIN_SETTING = "translog.origin"
#: The origin of a log whose operator named none: this prefix and the log key's id.
DEFAULT_ORIGIN_PREFIX = "odoledger/log/"
ORIGIN_RE = re.compile(r"[\x21-\x2a\x2c-\x7e]{1,255}")
ENTRY_KINDS = ("record", "transfer", "enrolment", "decision", "rules")
#: The largest entry: an entry bundle (c2sp.org/tlog-tiles) gives each a 16-bit length.
MAX_ENTRY_BYTES = 65535
T = TypeVar("T")


def _b(value: Any) -> bytes:
    return bytes(value)


def lock(tx: Tx, key: int) -> None:
    """``Database.lock_key`` for code that holds only the transaction."""
    tx._db.lock_key(tx, key)


def append(tx: Tx, entry_kind: str, ref: str, entry: bytes, now: int | None = None) -> None:
    """Store ``entry`` for the log, to be integrated into the tree by the sequencer
    (:func:`integrate`), in arrival order. Takes no lock that other writers share: the
    entry is durable when the transaction commits, and gets its leaf index a moment later.

    Appending the same ``ref`` with the same bytes again is a no-op; other bytes under a
    ``ref`` already stored raise :class:`TranslogError`.
    """
    if entry_kind not in ENTRY_KINDS:
        raise ValueError(f"entry kind must be one of {', '.join(ENTRY_KINDS)}, got {entry_kind!r}")
    if len(entry) > MAX_ENTRY_BYTES:
        raise TranslogError(f"{entry_kind} {ref}: {len(entry)} bytes, more than a log entry holds "
                            f"({MAX_ENTRY_BYTES})")
    if tx.insert_ignore("translog_queue", {"entry_kind": entry_kind, "ref": ref, "entry": entry,
                                           "created_at": now_ms() if now is None else now}, ("ref",)):
        known = tx.scalar("SELECT entry FROM translog WHERE ref = ?", (ref,))    # integrated before?
    else:
        known = tx.scalar("SELECT entry FROM translog_queue WHERE ref = ?", (ref,))
    if known is not None and _b(known) != entry:
        raise TranslogError(f"{entry_kind} {ref}: already logged with other content")


def append_many(tx: Tx, entry_kind: str, items: Sequence[tuple[str, bytes]], now: int) -> None:
    """:func:`append` of many entries in a few statements, for entries whose ref is a hash of
    their content (a record's id is that of its JWS: a ref stored before holds the same bytes),
    or was never used before (the key of a transfer that the transaction has just inserted).
    Those are checked all the same when the queue already held them."""
    if entry_kind not in ENTRY_KINDS:
        raise ValueError(f"entry kind must be one of {', '.join(ENTRY_KINDS)}, got {entry_kind!r}")
    for ref, entry in items:
        if len(entry) > MAX_ENTRY_BYTES:
            raise TranslogError(f"{entry_kind} {ref}: {len(entry)} bytes, more than a log entry holds "
                                f"({MAX_ENTRY_BYTES})")
    inserted = insert_many(tx, "translog_queue", ("entry_kind", "ref", "entry", "created_at"),
                            [(entry_kind, ref, entry, now) for ref, entry in items], conflict="ref")
    if inserted < len(items):
        for ref, entry in items:
            known = _stored(tx, ref)
            if known is not None and known != entry:
                raise TranslogError(f"{entry_kind} {ref}: already logged with other content")


def _stored(tx: Tx, ref: str) -> bytes | None:
    for table in ("translog", "translog_queue"):
        value = tx.scalar(f"SELECT entry FROM {table} WHERE ref = ?", (ref,))
        if value is not None:
            return _b(value)
    return None


@dataclass(frozen=True)
class Integrated:
    """What one run of the sequencer did."""

    entries: int                     # leaves added
    size: int | None                 # the tree's size after; None: nothing stored, or another sequencer at it
    delays_ms: tuple[int, ...] = ()  # from storing to integrating, per entry


@dataclass(frozen=True)
class _Plan:
    """What integrating the oldest stored entries into a tree of ``size`` leaves writes."""

    size: int
    queue_ids: list[int]
    leaves: list[tuple[int, str, str, bytes, bytes, int]]
    nodes: list[tuple[int, int, bytes]]
    delays_ms: tuple[int, ...]


def _plan(tx: Tx, limit: int, at: int) -> _Plan:
    rows = tx.query("SELECT id, entry_kind, ref, entry, created_at FROM translog_queue "
                    "ORDER BY id LIMIT ?", (limit,))
    size = _size(tx)
    refs = [str(r["ref"]) for r in rows]
    done = {str(r["ref"]) for n in range(0, len(refs), 500) for r in tx.query(
        f"SELECT ref FROM translog WHERE ref IN ({', '.join('?' for _ in refs[n:n + 500])})",
        refs[n:n + 500])}
    leaves: list[tuple[int, str, str, bytes, bytes, int]] = []
    nodes: list[tuple[int, int, bytes]] = []
    made: dict[tuple[int, int], bytes] = {}
    delays = []
    for r in rows:
        if str(r["ref"]) in done:
            continue
        entry = _b(r["entry"])
        idx = size + len(leaves)
        leaf = merkle.leaf_hash(entry)
        leaves.append((idx, str(r["entry_kind"]), str(r["ref"]), entry, leaf, at))
        delays.append(max(0, at - int(r["created_at"])))
        made[(0, idx)] = leaf
        level, i, h = 0, idx, leaf
        while i & 1:
            left = made.get((level, i - 1)) or _node(tx, level, i - 1)
            h = merkle.node_hash(left, h)
            level, i = level + 1, i >> 1
            made[(level, i)] = h
            nodes.append((level, i, h))
    return _Plan(size, [int(r["id"]) for r in rows], leaves, nodes, tuple(delays))


def integrate(db: Database, now: int | None = None, *, limit: int = INTEGRATE_BATCH,
              wait: bool = False) -> Integrated:
    """The sequencer: move up to ``limit`` stored entries, oldest first, into the tree, with
    the subtrees they close, in one transaction. One sequencer at a time across processes (the
    log's advisory lock); another one finds the lock taken and returns at once (or, with
    ``wait``, waits for it). An entry whose ref the tree already holds (two writers raced) is
    dropped from the queue.

    On SQLite, whose writers take turns, the entries are read and hashed first in a read
    snapshot, outside the write lock that the ingest waits for; the write transaction only
    checks that the tree has not grown meanwhile (no other sequencer ran: then the same
    entries are still the oldest stored, as SQLite's writers commit in the order of their ids)
    and writes. If it has grown, the plan is made again inside the transaction."""
    if not wait and db.one("SELECT id FROM translog_queue LIMIT 1") is None:
        return Integrated(0, None)          # nothing stored: no write transaction (SQLite has one writer)
    at = now_ms() if now is None else now
    early: _Plan | None = None
    if db.dialect == "sqlite":
        with db.read() as tx:
            early = _plan(tx, limit, at)
    with db.write() as tx:
        if wait:
            lock(tx, LOCK)
        elif not db.try_lock_key(tx, LOCK):
            return Integrated(0, None)
        plan = early if early is not None and early.size == _size(tx) else _plan(tx, limit, at)
        if not plan.queue_ids:
            return Integrated(0, plan.size)
        insert_many(tx, "translog", ("idx", "entry_kind", "ref", "entry", "leaf_hash", "created_at"),
                    plan.leaves)
        insert_many(tx, "translog_nodes", ("level", "idx", "hash"), plan.nodes)
        ids = plan.queue_ids
        for n in range(0, len(ids), 500):
            tx.execute(f"DELETE FROM translog_queue WHERE id IN ({', '.join('?' for _ in ids[n:n + 500])})",
                       ids[n:n + 500])
        return Integrated(len(plan.leaves), plan.size + len(plan.leaves), plan.delays_ms)


def integrate_all(db: Database) -> int:
    """Integrate every entry stored so far (waiting for another sequencer if one is at it);
    the tree's size after. For what needs leaf indexes now: certificates, the audit, tests."""
    while True:
        done = integrate(db, wait=True)
        if done.entries == 0:
            assert done.size is not None
            return done.size


def queued(tx: Tx) -> int:
    """Entries stored and not yet in the tree."""
    return int(tx.scalar("SELECT COUNT(*) AS n FROM translog_queue"))


def _size(tx: Tx) -> int:
    return int(tx.scalar("SELECT COALESCE(MAX(idx) + 1, 0) AS n FROM translog"))


def size(tx: Tx) -> int:
    """The number of leaves in the log."""
    return _size(tx)


def _node(tx: Tx, level: int, idx: int) -> bytes:
    if level == 0:
        value = tx.scalar("SELECT leaf_hash FROM translog WHERE idx = ?", (idx,))
    else:
        value = tx.scalar("SELECT hash FROM translog_nodes WHERE level = ? AND idx = ?", (level, idx))
    if value is None:
        raise TranslogError(f"log node ({level}, {idx}) is missing")
    return _b(value)


class _Tree:
    """Hashes of ranges of the first ``size`` leaves, read from stored subtrees.

    :meth:`run` walks a computation twice: once to learn which stored nodes it
    needs, which are then fetched in a few queries, and once to compute.
    """

    _CHUNK = 200

    def __init__(self, tx: Tx, size: int) -> None:
        self.tx = tx
        self.size = size
        self._cache: dict[tuple[int, int], bytes] = {}
        self._wanted: set[tuple[int, int]] | None = None

    def node(self, level: int, idx: int) -> bytes:
        key = (level, idx)
        if self._wanted is not None:
            if key not in self._cache:
                self._wanted.add(key)
            return bytes(32)
        if key not in self._cache:
            self._cache[key] = _node(self.tx, level, idx)
        return self._cache[key]

    def run(self, compute: Callable[[], T]) -> T:
        self._wanted = set()
        try:
            compute()
            wanted = sorted(self._wanted)
        finally:
            self._wanted = None
        leaves = [i for level, i in wanted if level == 0]
        for n in range(0, len(leaves), self._CHUNK):
            some = leaves[n:n + self._CHUNK]
            for row in self.tx.query(f"SELECT idx, leaf_hash FROM translog WHERE idx IN "
                                     f"({', '.join('?' for _ in some)})", some):
                self._cache[(0, int(row["idx"]))] = _b(row["leaf_hash"])
        inner = [key for key in wanted if key[0] > 0]
        for n in range(0, len(inner), self._CHUNK):
            chunk = inner[n:n + self._CHUNK]
            where = " OR ".join("(level = ? AND idx = ?)" for _ in chunk)
            params = [v for key in chunk for v in key]
            for row in self.tx.query(f"SELECT level, idx, hash FROM translog_nodes WHERE {where}", params):
                self._cache[(int(row["level"]), int(row["idx"]))] = _b(row["hash"])
        return compute()

    def mth(self, start: int, end: int) -> bytes:
        """MTH of leaves [start, end); ``start`` is always aligned as RFC 6962 splits."""
        n = end - start
        if n == 0:
            return merkle.EMPTY_ROOT
        if n & (n - 1) == 0 and start % n == 0:
            return self.node(n.bit_length() - 1, start // n)
        k = merkle.split(n)
        return merkle.node_hash(self.mth(start, start + k), self.mth(start + k, end))


def root(tx: Tx, tree_size: int | None = None) -> bytes:
    """The RFC 6962 root of the first ``tree_size`` leaves (default: all of them)."""
    n = _size(tx) if tree_size is None else tree_size
    tree = _Tree(tx, n)
    return tree.run(lambda: tree.mth(0, n))


def has(tx: Tx, ref: str) -> bool:
    """Whether an entry of ``ref`` is stored, in the tree or waiting for it."""
    return _stored(tx, ref) is not None


def leaf_index(tx: Tx, ref: str) -> int | None:
    value = tx.scalar("SELECT idx FROM translog WHERE ref = ?", (ref,))
    return None if value is None else int(value)


def inclusion_proofs(tx: Tx, indexes: Iterable[int], tree_size: int) -> list[list[bytes]]:
    """Audit paths (RFC 6962 §2.1.1) of leaves into the tree of ``tree_size`` leaves."""
    wanted = list(indexes)
    for i in wanted:
        if not 0 <= i < tree_size:
            raise ValueError(f"leaf {i} is outside a tree of {tree_size} leaves")
    tree = _Tree(tx, tree_size)
    return tree.run(lambda: [merkle.inclusion_path(tree.mth, i, tree_size) for i in wanted])


def consistency_proof(tx: Tx, old_size: int, new_size: int) -> list[bytes]:
    """PROOF(old_size, D[new_size]) of RFC 6962 §2.1.2."""
    tree = _Tree(tx, new_size)
    return tree.run(lambda: merkle.consistency_path(tree.mth, old_size, new_size))


# -- the log key and checkpoints ------------------------------------------------------------


def signing_key(tx: Tx) -> SigningKey:
    """The log's private key (made on first use): it signs checkpoints and certificates' annotations."""
    pem = tx.scalar("SELECT value FROM settings WHERE name = ?", (KEY_SETTING,))
    if pem is None:
        fresh = SigningKey.generate()
        if tx.insert_ignore("settings", {"name": KEY_SETTING, "value": fresh.to_pem().decode("ascii")},
                            ("name",)):
            log.info("made the transparency log's key %s", fresh.public.id)
        pem = tx.scalar("SELECT value FROM settings WHERE name = ?", (KEY_SETTING,))
    return SigningKey.from_pem(str(pem).encode("ascii"))


def public_key(db: Database) -> VerifyKey:
    """The log's verifier key (made on first use)."""
    with db.write() as tx:
        return signing_key(tx).public


# -- the log's origin, its checkpoints and cosignatures ---------------------------------------


def _stored_origin(tx: Tx) -> str | None:
    value = tx.scalar("SELECT value FROM settings WHERE name = ?", (ORIGIN_SETTING,))
    return None if value is None else str(value)


def _origin(tx: Tx, wanted: str | None = None) -> str:
    stored = _stored_origin(tx)
    if stored is None:
        name = wanted or f"{DEFAULT_ORIGIN_PREFIX}{signing_key(tx).public.id[:16]}"
        tx.insert_ignore("settings", {"name": ORIGIN_SETTING, "value": name}, ("name",))
        stored = _stored_origin(tx)
        assert stored is not None
        log.info("the transparency log's origin is %s", stored)
    if wanted is not None and wanted != stored:
        raise TranslogError(f"the log's origin is {stored}, fixed when the log began; it cannot become "
                            f"{wanted}")
    return stored


def check_origin(text: str) -> str:
    """``text`` if it can name a log (a note key name: no spaces or '+'); else ValueError."""
    if not ORIGIN_RE.fullmatch(text):
        raise ValueError(f"{text!r} cannot name a log: 1 to 255 printable characters, no spaces and no '+' "
                         "(e.g. odoledger.example.net/log)")
    return text


def origin(db: Database, wanted: str | None = None) -> str:
    """The log's origin, fixed at first use (to ``wanted``, or a name made from the log key);
    :class:`TranslogError` when ``wanted`` is not the fixed one."""
    if wanted is not None:
        check_origin(wanted)
    with db.write() as tx:
        return _origin(tx, wanted)


def verifier(db: Database) -> note.Verifier:
    """The log's note verifier key (its name is the origin)."""
    with db.write() as tx:
        return cp.log_verifier(_origin(tx), signing_key(tx).public)


def _checkpoint_dict(row: Row, origin_name: str, cosignatures: list[str]) -> dict[str, Any]:
    signed = str(row["note"]) + "".join(cosignatures)
    return {"origin": origin_name, "size": int(row["size"]), "root": _b(row["root"]).hex(),
            "t": int(row["created_at"]), "note": signed, "cosignatures": len(cosignatures)}


def cosignature_lines(tx: Tx, size: int) -> list[str]:
    """The witnesses' cosignature lines kept for the checkpoint of ``size``, by witness."""
    return [str(r["line"]) for r in tx.query(
        "SELECT line FROM log_cosignatures WHERE size = ? ORDER BY witness", (size,))]


def checkpoint(db: Database, now_ms: int, *, min_interval_ms: int = 0) -> dict[str, Any]:
    """The latest checkpoint, signing a new one first if the log has grown (and the latest is at
    least ``min_interval_ms`` old).

    Returns ``{"origin", "size", "root" (hex), "t", "note" (with its cosignatures), "cosignatures"}``.
    """
    with db.write() as tx:
        name = _origin(tx)
        latest = tx.one("SELECT * FROM log_checkpoints ORDER BY size DESC LIMIT 1")
        n = _size(tx)
        fresh = latest is not None and (int(latest["size"]) >= n or (
            min_interval_ms > 0 and now_ms - int(latest["created_at"]) < min_interval_ms))
        if latest is None or not fresh:
            signed = cp.sign_note(signing_key(tx), name, n, root(tx, n))
            tx.insert_ignore("log_checkpoints", {"size": n, "root": signed.root, "note": signed.signed,
                                                 "created_at": now_ms}, ("size",))
            latest = tx.one("SELECT * FROM log_checkpoints WHERE size = ?", (n,))
            assert latest is not None
            log.debug("checkpoint of %d leaves, root %s", n, signed.root_b64)
        return _checkpoint_dict(latest, name, cosignature_lines(tx, int(latest["size"])))


def checkpoint_now(db: Database, now_ms: int) -> dict[str, Any]:
    """:func:`checkpoint` of every entry stored so far (the sequencer run first)."""
    integrate_all(db)
    return checkpoint(db, now_ms)


def latest_checkpoint(db: Database) -> dict[str, Any] | None:
    """The latest checkpoint signed, with its cosignatures; None before the first."""
    with db.read() as tx:
        row = tx.one("SELECT * FROM log_checkpoints ORDER BY size DESC LIMIT 1")
        if row is None:
            return None
        name = _stored_origin(tx)
        assert name is not None
        return _checkpoint_dict(row, name, cosignature_lines(tx, int(row["size"])))


def witnessed_checkpoint(db: Database, witnesses: int) -> dict[str, Any] | None:
    """The largest checkpoint cosigned by at least ``witnesses`` witnesses, else the latest."""
    with db.read() as tx:
        row = tx.one("SELECT c.size FROM log_checkpoints c WHERE (SELECT COUNT(*) FROM log_cosignatures s "
                     "WHERE s.size = c.size) >= ? ORDER BY c.size DESC LIMIT 1", (witnesses,))
        if row is not None:
            return checkpoint_at(tx, int(row["size"]))
    return latest_checkpoint(db)


def checkpoint_at(tx: Tx, size: int) -> dict[str, Any] | None:
    row = tx.one("SELECT * FROM log_checkpoints WHERE size = ?", (size,))
    name = _stored_origin(tx)
    return None if row is None or name is None else _checkpoint_dict(row, name, cosignature_lines(tx, size))


def best_checkpoint(tx: Tx, at_least: int) -> dict[str, Any] | None:
    """Of the checkpoints that cover the first ``at_least`` leaves, the most cosigned (then the
    largest)."""
    row = tx.one("SELECT c.size, (SELECT COUNT(*) FROM log_cosignatures s WHERE s.size = c.size) AS n "
                 "FROM log_checkpoints c WHERE c.size >= ? ORDER BY n DESC, c.size DESC LIMIT 1", (at_least,))
    return None if row is None else checkpoint_at(tx, int(row["size"]))


# -- tiles (c2sp.org/tlog-tiles), read from the stored nodes ---------------------------------


def tile(tx: Tx, level: int | None, n: int, width: int | None, tree_size: int) -> bytes | None:
    """The hash tile ``level``/``n`` (or entry bundle, ``level`` None) of ``width`` hashes (None:
    a full tile), as served for a tree of ``tree_size`` leaves; None when the tree does not hold it."""
    w = tiles.WIDTH if width is None else width
    lvl = 0 if level is None else level
    if (n * tiles.WIDTH + w) << (tiles.HEIGHT * lvl) > tree_size:
        return None
    first, end = n * tiles.WIDTH, n * tiles.WIDTH + w
    if level is None:
        rows = tx.query("SELECT entry FROM translog WHERE idx >= ? AND idx < ? ORDER BY idx", (first, end))
        data = [_b(r["entry"]) for r in rows]
        if len(data) != w:
            raise TranslogError(f"log entries {first}..{end - 1} are missing")
        return tiles.encode_bundle(data)
    if level == 0:
        rows = tx.query("SELECT leaf_hash AS h FROM translog WHERE idx >= ? AND idx < ? ORDER BY idx",
                        (first, end))
    else:
        rows = tx.query("SELECT hash AS h FROM translog_nodes WHERE level = ? AND idx >= ? AND idx < ? "
                        "ORDER BY idx", (tiles.HEIGHT * level, first, end))
    hashes = [_b(r["h"]) for r in rows]
    if len(hashes) != w:
        raise TranslogError(f"log tile {tiles.path(level, n, width)}: {len(hashes)} of {w} hashes stored")
    return b"".join(hashes)

"""The transparency log: an append-only Merkle tree of accepted records and transfers (DESIGN §6).

Leaves are hashed as RFC 6962 does (:mod:`protocol.merkle`). Each append stores
the leaf and every complete subtree it closes (table ``translog_nodes``), so a
root or an inclusion proof costs O(log n) lookups, never a pass over the log.
Leaf indexes are allocated under one advisory lock, so several backend processes
on one PostgreSQL never collide; on SQLite, ``BEGIN IMMEDIATE`` already
serialises writers.

Checkpoints are signed by the backend's own Ed25519 log key, made on first use
and kept (PKCS#8 PEM) in table ``settings``; :mod:`protocol.checkpoint` fixes
their format.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from backend.db import Database, Tx
from backend.errors import TranslogError
from common.clock import now_ms
from protocol import checkpoint as cp
from protocol import jws, merkle
from protocol.identity import SigningKey, VerifyKey

log = logging.getLogger(__name__)

#: Advisory lock held by every transaction that appends (so every one that credits a reward);
#: it allocates leaf indexes, and orders assignments with crediting.
LOCK = 0x0D0_7106
KEY_SETTING = "translog.log_key"
ENTRY_KINDS = ("record", "transfer")
T = TypeVar("T")


def _b(value: Any) -> bytes:
    return bytes(value)


def lock(tx: Tx, key: int) -> None:
    """``Database.lock_key`` for code that holds only the transaction."""
    tx._db.lock_key(tx, key)


def append(tx: Tx, entry_kind: str, ref: str, entry: bytes) -> int:
    """Append ``entry`` as the next leaf; return its index.

    Appending the same ``ref`` with the same bytes again returns the first index;
    other bytes under a ``ref`` already logged raise :class:`TranslogError`.
    """
    if entry_kind not in ENTRY_KINDS:
        raise ValueError(f"entry kind must be one of {', '.join(ENTRY_KINDS)}, got {entry_kind!r}")
    lock(tx, LOCK)
    known = tx.one("SELECT idx, entry FROM translog WHERE ref = ?", (ref,))
    if known is not None:
        if _b(known["entry"]) != entry:
            raise TranslogError(f"{entry_kind} {ref}: already logged with other content")
        return int(known["idx"])
    idx = _size(tx)
    leaf = merkle.leaf_hash(entry)
    tx.execute("INSERT INTO translog (idx, entry_kind, ref, entry, leaf_hash, created_at) "
               "VALUES (?, ?, ?, ?, ?, ?)", (idx, entry_kind, ref, entry, leaf, now_ms()))
    level, i, h = 0, idx, leaf
    while i & 1:
        h = merkle.node_hash(_node(tx, level, i - 1), h)
        level, i = level + 1, i >> 1
        tx.execute("INSERT INTO translog_nodes (level, idx, hash) VALUES (?, ?, ?)", (level, i, h))
    return idx


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


def _signing_key(tx: Tx) -> SigningKey:
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
        return _signing_key(tx).public


def _as_dict(row: dict[str, Any]) -> dict[str, Any]:
    signed = str(row["signed"])
    return {"v": cp.VERSION, "size": int(row["size"]), "root": _b(row["root"]).hex(),
            "t": int(row["created_at"]), "kid": jws.split(signed).kid, "jws": signed}


def checkpoint(db: Database, now_ms: int) -> dict[str, Any]:
    """Sign a checkpoint of the whole log, or return the latest one if the log has not grown.

    Returns ``{"v", "size", "root" (hex), "t", "kid", "jws"}``.
    """
    with db.write() as tx:
        n = _size(tx)
        latest = tx.one("SELECT * FROM checkpoints ORDER BY size DESC LIMIT 1")
        if latest is not None and int(latest["size"]) >= n:
            return _as_dict(latest)
        signed = cp.sign(_signing_key(tx), n, root(tx, n), now_ms)
        tx.insert_ignore("checkpoints", {"size": n, "root": signed.root, "signed": signed.jws,
                                         "created_at": now_ms}, ("size",))
        row = tx.one("SELECT * FROM checkpoints WHERE size = ?", (n,))
        assert row is not None
        log.debug("checkpoint of %d leaves, root %s", n, signed.root_hex)
        return _as_dict(row)


def latest_checkpoint(db: Database) -> dict[str, Any] | None:
    row = db.one("SELECT * FROM checkpoints ORDER BY size DESC LIMIT 1")
    return None if row is None else _as_dict(row)

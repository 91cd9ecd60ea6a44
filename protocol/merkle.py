"""Merkle-tree hashing, inclusion and consistency proofs (RFC 6962 / RFC 9162 §2.1)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from protocol.errors import BadFormat


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


EMPTY_ROOT = hashlib.sha256(b"").digest()


def split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n > 1): where RFC 6962 splits a tree."""
    return 1 << ((n - 1).bit_length() - 1)


RangeHash = Callable[[int, int], bytes]
"""MTH(D[start:end]) of some tree, for the ranges RFC 6962's recursion asks for."""


def inclusion_path(mth: RangeHash, index: int, size: int) -> list[bytes]:
    """PATH(index, D[size]) of RFC 6962 §2.1.1, from the range hashes ``mth`` gives."""
    if not 0 <= index < size:
        raise ValueError("index outside the tree")

    def path(m: int, start: int, end: int) -> list[bytes]:
        n = end - start
        if n == 1:
            return []
        k = split(n)
        if m < k:
            return path(m, start, start + k) + [mth(start + k, end)]
        return path(m - k, start + k, end) + [mth(start, start + k)]

    return path(index, 0, size)


def consistency_path(mth: RangeHash, old_size: int, size: int) -> list[bytes]:
    """PROOF(old_size, D[size]) of RFC 6962 §2.1.2, from the range hashes ``mth`` gives."""
    if not 0 < old_size <= size:
        raise ValueError("old size outside the tree")

    def subproof(m: int, start: int, end: int, complete: bool) -> list[bytes]:
        n = end - start
        if m == n:
            return [] if complete else [mth(start, end)]
        k = split(n)
        if m <= k:
            return subproof(m, start, start + k, complete) + [mth(start + k, end)]
        return subproof(m - k, start + k, end, False) + [mth(start, start + k)]

    return subproof(old_size, 0, size, True)


def range_hashes(leaves: Sequence[bytes]) -> RangeHash:
    """MTH(D[start:end]) of the tree of ``leaves`` (leaf hashes), each range computed once: for
    :func:`inclusion_path` and :func:`consistency_path` over a tree held in memory."""
    done: dict[tuple[int, int], bytes] = {}

    def mth(start: int, end: int) -> bytes:
        got = done.get((start, end))
        if got is None:
            if end - start == 1:
                got = leaves[start]
            else:
                k = split(end - start)
                got = node_hash(mth(start, start + k), mth(start + k, end))
            done[(start, end)] = got
        return got

    return mth


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH over leaf hashes (not raw data)."""
    n = len(leaves)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaves[0]
    k = split(n)
    return node_hash(root(leaves[:k]), root(leaves[k:]))


def inclusion_proof(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n]) of RFC 6962 §2.1.1, over leaf hashes."""
    return inclusion_path(lambda start, end: root(leaves[start:end]), index, len(leaves))


def root_from_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """RFC 9162 §2.1.3.2: the root that ``proof`` implies; raise BadFormat if malformed."""
    if not 0 <= index < size:
        raise BadFormat("inclusion proof: index outside the tree")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise BadFormat("inclusion proof: too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise BadFormat("inclusion proof: too short")
    return r


class InclusionWalker:
    """:func:`root_from_inclusion` for many leaves of one tree of ``size`` leaves, with the same
    answers and errors, faster when the leaves come in ascending order (a certificate's entries).

    The walk up from a leaf depends only on where it is (``fn``, ``sn``), the hash it holds and
    the proof hashes left. A walk that reaches a point where an earlier walk that succeeded was,
    with the same hash and the same proof hashes left, would repeat the rest of it: it ends
    there, with that walk's root. Nothing is taken on trust: every byte is compared.
    """

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError("tree size must not be negative")
        self.size = size
        #: sn -> (fn, hash, proof, offset in it, root) of the last walk that passed there
        self._seen: dict[int, tuple[int, bytes, bytes, int, bytes]] = {}

    def root(self, index: int, leaf: bytes, proof: Sequence[bytes] | bytes) -> bytes:
        """:func:`root_from_inclusion`; ``proof`` as its hashes, or as their concatenation (32
        bytes each, as a certificate carries them: no list of hashes is made)."""
        if not isinstance(proof, bytes):
            if any(len(p) != 32 for p in proof):
                raise BadFormat("inclusion proof: a hash is not 32 bytes")
            proof = b"".join(proof)
        elif len(proof) % 32:
            raise BadFormat("inclusion proof: a hash is not 32 bytes")
        if not 0 <= index < self.size:
            raise BadFormat("inclusion proof: index outside the tree")
        seen = self._seen
        walked: list[tuple[int, int, bytes, int]] = []
        fn, sn, r = index, self.size - 1, leaf
        sha256 = hashlib.sha256
        for j in range(0, len(proof), 32):
            if sn == 0:
                raise BadFormat("inclusion proof: too long")
            was = seen.get(sn)
            if was is not None and was[0] == fn and was[1] == r and proof[j:] == was[2][was[3]:]:
                r = was[4]
                break
            walked.append((sn, fn, r, j))
            if fn & 1 or fn == sn:
                r = sha256(b"\x01" + proof[j:j + 32] + r).digest()
                if not fn & 1:
                    while fn and not fn & 1:
                        fn >>= 1
                        sn >>= 1
            else:
                r = sha256(b"\x01" + r + proof[j:j + 32]).digest()
            fn >>= 1
            sn >>= 1
        else:
            if sn != 0:
                raise BadFormat("inclusion proof: too short")
        for at, f, h, j in walked:
            seen[at] = (f, h, proof, j, r)
        return r


def consistency_proof(old_size: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) of RFC 6962 §2.1.2."""
    return consistency_path(lambda start, end: root(leaves[start:end]), old_size, len(leaves))


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> bool:
    """RFC 9162 §2.1.4.2."""
    if old_size == new_size:
        return old_root == new_root and not proof
    if not 0 < old_size < new_size:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    if not path:
        return False
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root

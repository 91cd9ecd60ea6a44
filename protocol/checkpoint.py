"""Signed checkpoints of the backend's transparency log (DESIGN §6).

A checkpoint is a compact JWS (``alg`` ``Ed25519``) by the log key, whose ``kid``
is the log key's id (derived from its public key as a device id is). The payload
is canonical JSON::

    {"v": 1, "size": <leaves>, "root": "<64 hex: RFC 6962 root>", "t": <Unix ms>}

The tree it commits to hashes its leaves as RFC 6962 does; a leaf's data is the
ASCII compact JWS of an accepted record, or the canonical JSON of a transfer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from protocol import canonical, jws, merkle
from protocol.errors import BadFormat
from protocol.identity import SigningKey, VerifyKey

VERSION = 1
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FIELDS = {"v", "size", "root", "t"}
MAX_INT = 2**53 - 1


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint whose signature has been made or checked."""

    jws: str = field(repr=False)
    kid: str
    size: int
    root: bytes
    t: int

    @property
    def root_hex(self) -> str:
        return self.root.hex()


def sign(key: SigningKey, size: int, root: bytes, t: int) -> Checkpoint:
    """Sign a checkpoint of a tree of ``size`` leaves with root ``root``."""
    payload = {"v": VERSION, "size": size, "root": root.hex(), "t": t}
    _validate(payload)
    kid = key.public.id
    compact = jws.sign(canonical.dumps(payload), key, kid)
    return Checkpoint(compact, kid, size, root, t)


def _validate(p: dict[str, object]) -> None:
    extra = sorted(set(p) - _FIELDS)
    if extra:
        raise BadFormat(f"checkpoint: unexpected fields {', '.join(extra)}")
    if p.get("v") != VERSION or isinstance(p.get("v"), bool):
        raise BadFormat(f"checkpoint: unsupported version {p.get('v')!r}")
    for name in ("size", "t"):
        value = p.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INT:
            raise BadFormat(f"checkpoint: {name} must be a non-negative integer")
    root = p.get("root")
    if not isinstance(root, str) or not _HEX64.fullmatch(root):
        raise BadFormat("checkpoint: root must be 64 lowercase hex characters")


def verify(compact: str | bytes, key: VerifyKey) -> Checkpoint:
    """Check the log key's signature, then parse; raise BadFormat or BadSignature."""
    parts = jws.split(compact)
    if parts.kid != key.id:
        raise BadFormat(f"checkpoint: signed by log key {parts.kid}, not by {key.id}")
    payload = canonical.loads_object(jws.verify(parts, key), "checkpoint")
    _validate(payload)
    if payload["size"] == 0 and payload["root"] != merkle.EMPTY_ROOT.hex():
        raise BadFormat("checkpoint: an empty tree has another root")
    return Checkpoint(parts.text, parts.kid, payload["size"], bytes.fromhex(payload["root"]), payload["t"])


def verify_inclusion(checkpoint: Checkpoint, index: int, entry: bytes, proof: Sequence[bytes]) -> None:
    """Raise BadFormat unless ``entry`` is leaf ``index`` of the checkpointed tree."""
    if not 0 <= index < checkpoint.size:
        raise BadFormat(f"inclusion proof: leaf {index} is outside the checkpoint's {checkpoint.size} leaves")
    got = merkle.root_from_inclusion(index, checkpoint.size, merkle.leaf_hash(entry), proof)
    if got != checkpoint.root:
        raise BadFormat(f"inclusion proof: leaf {index} does not lead to the checkpoint's root")


def verify_consistency(old: Checkpoint, new: Checkpoint, proof: Sequence[bytes]) -> None:
    """Raise BadFormat unless ``new``'s tree extends ``old``'s (the log only grew)."""
    if old.size == 0 and not proof:
        return
    if old.size > new.size or not merkle.verify_consistency(old.size, new.size, old.root, new.root, proof):
        raise BadFormat(f"consistency proof: the tree of size {new.size} does not extend the one of size "
                        f"{old.size}")

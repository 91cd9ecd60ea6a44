"""Checkpoints of the backend's transparency log: C2SP signed notes (docs/log.md).

A checkpoint is a c2sp.org/tlog-checkpoint note: the log's origin, the tree size in decimal and
the base64 RFC 6962 root, one a line, signed (c2sp.org/signed-note, Ed25519) by the log key
under the origin as key name, and cosigned by witnesses (c2sp.org/tlog-cosignature). The tree
hashes its leaves as RFC 6962 does; docs/log.md says what the entries are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from protocol import b64, merkle, note
from protocol.errors import BadFormat, BadSignature
from protocol.identity import SigningKey, VerifyKey

MAX_INT = 2**53 - 1


#: A tree size fits in a JSON-safe integer, and so in a u64 everywhere.
_SIZE = re.compile(r"0|[1-9][0-9]{0,15}")


@dataclass(frozen=True)
class NoteCheckpoint:
    """A checkpoint in the C2SP format: origin, tree size, root; and its verified signatures."""

    origin: str
    size: int
    root: bytes
    text: str = field(repr=False)               # the signed note text (three lines)
    signed: str = field(repr=False)             # the whole note, every signature line kept
    cosignatures: tuple[note.Verified, ...] = ()

    @property
    def root_b64(self) -> str:
        return b64.std_encode(self.root)


def note_text(origin: str, size: int, root: bytes) -> str:
    """The three lines of a checkpoint: origin, decimal size, base64 root."""
    note.check_name(origin, "origin")
    if not 0 <= size <= MAX_INT or len(root) != 32:
        raise ValueError("a checkpoint has a size of 0 .. 2^53 - 1 and a 32-byte root")
    return f"{origin}\n{size}\n{b64.std_encode(root)}\n"


def parse_text(text: str) -> tuple[str, int, bytes]:
    """Origin, size and root of a checkpoint's note text; extension lines are refused."""
    lines = text.split("\n")
    if len(lines) != 4 or lines[3] != "":
        raise BadFormat("checkpoint: must be exactly an origin, a size and a root hash line")
    origin = note.check_name(lines[0], "checkpoint origin")
    if not _SIZE.fullmatch(lines[1]) or int(lines[1]) > MAX_INT:
        raise BadFormat("checkpoint: the tree size must be a decimal integer with no leading zeroes")
    root = b64.std_decode(lines[2], "checkpoint root hash")
    if len(root) != 32:
        raise BadFormat("checkpoint: the root hash must be 32 bytes")
    size = int(lines[1])
    if size == 0 and root != merkle.EMPTY_ROOT:
        raise BadFormat("checkpoint: an empty tree has another root")
    return origin, size, root


def sign_note(key: SigningKey, origin: str, size: int, root: bytes) -> NoteCheckpoint:
    """The log's checkpoint: signed with type 0x01 under the origin as key name."""
    text = note_text(origin, size, root)
    signed = note.Note(text, (note.sign(text, origin, key),)).encode()
    return NoteCheckpoint(origin, size, root, text, signed)


def log_verifier(origin: str, key: VerifyKey) -> note.Verifier:
    """The log's verifier key: its name is the origin."""
    return note.Verifier(origin, note.ED25519, key)


def open_note(data: str | bytes, log: note.Verifier, witnesses: Sequence[note.Verifier] = (),
              quorum: int = 0) -> NoteCheckpoint:
    """Verify a checkpoint note by the log's key, and at least ``quorum`` of ``witnesses``'
    cosignatures; raise BadFormat or BadSignature."""
    if log.kind != note.ED25519:
        raise BadFormat("checkpoint: the log's key must be an Ed25519 (type 0x01) key")
    parsed = note.parse(data, "checkpoint")
    origin, size, root = parse_text(parsed.text)
    if origin != log.name:
        raise BadFormat(f"checkpoint: of log {origin}, not of {log.name}")
    note.verify(parsed, [log])
    cosigners = [w for w in witnesses if w.kind == note.COSIGNATURE_V1]
    cosigned = note.verify(parsed, cosigners, at_least=0)
    if len(cosigned) < quorum:
        raise BadSignature(f"checkpoint: cosigned by {len(cosigned)} of the known witnesses, "
                           f"{quorum} needed")
    signed = data.decode("utf-8") if isinstance(data, bytes) else data
    return NoteCheckpoint(origin, size, root, parsed.text, signed, tuple(cosigned))


def verify_inclusion(checkpoint: NoteCheckpoint, index: int, entry: bytes, proof: Sequence[bytes],
                     walker: merkle.InclusionWalker | None = None) -> None:
    """Raise BadFormat unless ``entry`` is leaf ``index`` of the checkpointed tree; ``walker``
    (of the checkpoint's size) checks many entries of it faster, with the same answers."""
    if not 0 <= index < checkpoint.size:
        raise BadFormat(f"inclusion proof: leaf {index} is outside the checkpoint's {checkpoint.size} leaves")
    if walker is None:
        got = merkle.root_from_inclusion(index, checkpoint.size, merkle.leaf_hash(entry), proof)
    elif walker.size != checkpoint.size:
        raise ValueError(f"a walker of a tree of {walker.size} leaves, not {checkpoint.size}")
    else:
        got = walker.root(index, merkle.leaf_hash(entry), proof)
    if got != checkpoint.root:
        raise BadFormat(f"inclusion proof: leaf {index} does not lead to the checkpoint's root")


def verify_consistency(old: NoteCheckpoint, new: NoteCheckpoint, proof: Sequence[bytes]) -> None:
    """Raise BadFormat unless ``new``'s tree extends ``old``'s (the log only grew)."""
    if old.origin != new.origin:
        raise BadFormat(f"consistency proof: checkpoints of two logs ({old.origin}, {new.origin})")
    if old.size == 0 and not proof:
        return
    if old.size > new.size or not merkle.verify_consistency(old.size, new.size, old.root, new.root, proof):
        raise BadFormat(f"consistency proof: the tree of size {new.size} does not extend the one of size "
                        f"{old.size}")

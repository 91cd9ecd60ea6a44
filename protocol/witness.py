"""The witness exchange of c2sp.org/tlog-witness: the ``add-checkpoint`` request and its answer.

A log asks a witness to cosign a checkpoint with ``POST <prefix>/add-checkpoint`` and a body of

- an old size line, ``old <size>`` (decimal, no leading zeroes): the size of the checkpoint the
  log believes the witness cosigned last (0 if none);
- zero to 63 consistency-proof lines, each one base64 SHA-256 hash: an RFC 6962 §2.1.2 proof
  from the old size to the new checkpoint's;
- an empty line;
- the checkpoint note (c2sp.org/tlog-checkpoint, signed by the log).

Every line ends in a newline. A witness that cosigns answers 200 with one or more signature
lines (c2sp.org/tlog-cosignature); one whose last cosigned size is not ``old`` answers 409 with
that size and a newline, as ``text/x.tlog.size``.

Only the framing is read here: the note is split into its text and signature lines
(:func:`protocol.note.parse`), but whose signatures they are, and whether the proof holds, is
for the witness to check. Every input is bounded before it is read.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from protocol import note as signed_note
from protocol.b64 import std_decode, std_encode
from protocol.errors import BadFormat

PATH = "/add-checkpoint"
SIZE_CONTENT_TYPE = "text/x.tlog.size"
#: A client sends at most 63 proof lines (c2sp.org/tlog-witness); each is a SHA-256 hash.
MAX_PROOF_LINES = 63
HASH_BYTES = 32
#: A tree size is read as the checkpoints read it: a JSON-safe integer.
MAX_SIZE = 2**53 - 1
_SIZE = re.compile(r"0|[1-9][0-9]{0,15}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HASH_LINE_CHARS = 44                      # base64 of 32 bytes, with its padding
_OLD_LINE_CHARS = len("old ") + 16
#: The largest request: the old size line, 63 proof lines, the empty line and the largest note.
MAX_REQUEST_BYTES = ((_OLD_LINE_CHARS + 1) + MAX_PROOF_LINES * (_HASH_LINE_CHARS + 1) + 1
                     + signed_note.MAX_NOTE_BYTES)
#: The largest 200 answer read, and its most lines.
MAX_RESPONSE_BYTES = signed_note.MAX_NOTE_BYTES
MAX_RESPONSE_LINES = signed_note.MAX_SIGNATURES


@dataclass(frozen=True)
class AddCheckpoint:
    """A well-framed add-checkpoint request; the note is split, not yet verified."""

    old_size: int
    proof: tuple[bytes, ...]
    note: bytes = field(repr=False)          # the checkpoint note, as sent


def _check_size(size: int, what: str) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_SIZE:
        raise ValueError(f"{what}: a tree size is an integer from 0 to 2^53 - 1")


def encode_add_checkpoint(old_size: int, proof: Sequence[bytes], note: bytes) -> bytes:
    """The request body asking a witness to cosign ``note`` (a signed checkpoint note),
    given the size it cosigned last and a consistency proof from that size; ValueError if an
    argument could not be sent, BadFormat if the note is not a signed note."""
    _check_size(old_size, "old size")
    if len(proof) > MAX_PROOF_LINES:
        raise ValueError(f"consistency proof: {len(proof)} hashes, at most {MAX_PROOF_LINES} may be sent")
    for i, h in enumerate(proof):
        if len(h) != HASH_BYTES:
            raise ValueError(f"consistency proof: hash {i} is {len(h)} bytes, not {HASH_BYTES}")
    signed_note.parse(note, "checkpoint")
    lines = "".join(f"{std_encode(h)}\n" for h in proof)
    return f"old {old_size}\n{lines}\n".encode("ascii") + note


def _next_line(body: bytes, start: int, limit: int, what: str) -> tuple[bytes, int]:
    """The line at ``start`` (without its newline), looked for in at most ``limit`` bytes, and
    where the next one starts."""
    end = body.find(b"\n", start, start + limit + 1)
    if end < 0:
        raise BadFormat(f"add-checkpoint: {what} is longer than {limit} characters or has no newline")
    return body[start:end], end + 1


def parse_add_checkpoint(body: bytes) -> AddCheckpoint:
    """Read an add-checkpoint request body strictly; raise BadFormat naming what was wrong."""
    if len(body) > MAX_REQUEST_BYTES:
        raise BadFormat(f"add-checkpoint: the body is larger than {MAX_REQUEST_BYTES} bytes")
    line, pos = _next_line(body, 0, _OLD_LINE_CHARS, "the old size line")
    if not line.startswith(b"old "):
        raise BadFormat("add-checkpoint: the body must start with an old size line, 'old <size>'")
    digits = line[4:].decode("ascii", "replace")
    if not _SIZE.fullmatch(digits) or int(digits) > MAX_SIZE:
        raise BadFormat("add-checkpoint: the old size must be a decimal integer from 0 to 2^53 - 1 "
                        "with no leading zeroes")
    old_size = int(digits)
    proof: list[bytes] = []
    while True:
        if pos >= len(body):
            raise BadFormat("add-checkpoint: no empty line before the checkpoint")
        line, pos = _next_line(body, pos, _HASH_LINE_CHARS, f"proof line {len(proof) + 1}")
        if not line:
            break
        if len(proof) == MAX_PROOF_LINES:
            raise BadFormat(f"add-checkpoint: more than {MAX_PROOF_LINES} consistency proof lines")
        text = line.decode("ascii", "replace")
        h = std_decode(text, f"add-checkpoint: proof line {len(proof) + 1}")
        if len(h) != HASH_BYTES:
            raise BadFormat(f"add-checkpoint: proof line {len(proof) + 1} is not a {HASH_BYTES}-byte hash")
        proof.append(h)
    checkpoint = body[pos:]
    if not checkpoint:
        raise BadFormat("add-checkpoint: no checkpoint after the empty line")
    signed_note.parse(checkpoint, "add-checkpoint: checkpoint")
    return AddCheckpoint(old_size, tuple(proof), checkpoint)


def encode_size(size: int) -> bytes:
    """The body of a 409 answer: the witness's last cosigned size, and a newline."""
    _check_size(size, "size")
    return f"{size}\n".encode("ascii")


def parse_size(body: bytes) -> int:
    """The size in a 409 answer (``text/x.tlog.size``); raise BadFormat."""
    if len(body) > _OLD_LINE_CHARS or not body.endswith(b"\n"):
        raise BadFormat("witness size: must be a decimal size and a newline")
    digits = body[:-1].decode("ascii", "replace")
    if not _SIZE.fullmatch(digits) or int(digits) > MAX_SIZE:
        raise BadFormat("witness size: must be a decimal integer from 0 to 2^53 - 1 with no leading zeroes")
    return int(digits)


def encode_cosignatures(signatures: Sequence[signed_note.Signature]) -> bytes:
    """The body of a 200 answer: the cosignature lines."""
    if not 0 < len(signatures) <= MAX_RESPONSE_LINES:
        raise ValueError(f"an answer holds 1 to {MAX_RESPONSE_LINES} signature lines")
    return "".join(s.line for s in signatures).encode("utf-8")


def parse_cosignatures(body: bytes) -> list[signed_note.Signature]:
    """The signature lines of a 200 answer, not yet verified (c2sp.org/tlog-witness: a client
    keeps those of the witness keys it knows, checked with :func:`protocol.note.verify`)."""
    if len(body) > MAX_RESPONSE_BYTES:
        raise BadFormat(f"witness answer: larger than {MAX_RESPONSE_BYTES} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadFormat("witness answer: not UTF-8") from None
    if not text or not text.endswith("\n"):
        raise BadFormat("witness answer: must be one or more signature lines, each ending in a newline")
    lines = text[:-1].split("\n")
    if len(lines) > MAX_RESPONSE_LINES:
        raise BadFormat(f"witness answer: more than {MAX_RESPONSE_LINES} signature lines")
    if any(_CONTROL.search(line) for line in lines):
        raise BadFormat("witness answer: holds a control character other than newline")
    return [signed_note.parse_signature_line(line, f"witness answer: line {i + 1}")
            for i, line in enumerate(lines)]

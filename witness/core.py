"""The witness's decisions on an add-checkpoint request (c2sp.org/tlog-witness), without I/O.

:func:`open_submission` reads a request and verifies the log's signature on its checkpoint;
:func:`check` compares it with the last checkpoint cosigned for that log. Each refusal is a
:class:`Refused` carrying the HTTP status the spec asks for:

- 400: a malformed body, or an old size above the checkpoint's size;
- 403: no valid signature by a key trusted for the origin, or one that fails to verify;
- 404: an origin this witness does not know;
- 409: an old size other than the size it cosigned last (the answer carries that size);
- 422: an empty tree with another root, a proof where none may be, a proof that does not
  verify, or another root at the size already cosigned: the last two are a log showing two
  histories.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from protocol import checkpoint as cp
from protocol import merkle, note
from protocol import witness as wire
from protocol.b64 import std_decode, std_encode
from protocol.errors import BadFormat, BadSignature

BAD_REQUEST = 400
FORBIDDEN = 403
NOT_FOUND = 404
CONFLICT = 409
UNPROCESSABLE = 422


class Refused(Exception):
    """The request is not cosigned: ``status`` is the HTTP answer, ``reason`` says why, and
    ``size`` (for a 409) is the size this witness cosigned last."""

    def __init__(self, status: int, reason: str, size: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.size = size

    @property
    def evidence(self) -> bool:
        """Whether a log-signed checkpoint was refused as inconsistent (worth keeping)."""
        return self.status == UNPROCESSABLE


@dataclass(frozen=True)
class Submission:
    """A checkpoint whose log signature verified, with the old size and proof sent with it."""

    origin: str
    size: int
    root: bytes
    text: str = field(repr=False)                    # the checkpoint's note text
    log_signatures: tuple[note.Signature, ...] = field(repr=False)
    old_size: int
    proof: tuple[bytes, ...] = field(repr=False)

    @property
    def signed_note(self) -> str:
        """The checkpoint with the log's verified signature lines only."""
        return note.Note(self.text, self.log_signatures).encode()


@dataclass(frozen=True)
class Cosigned:
    """The last checkpoint this witness cosigned for a log."""

    origin: str
    size: int
    root: bytes


def _read_text(text: str) -> tuple[str, int, bytes]:
    """Origin, size and root of a checkpoint's text. An empty tree with another root is read as
    it is (it is refused with 422 once its signature is known to be the log's); any other fault
    is a 400."""
    try:
        return cp.parse_text(text)
    except BadFormat as exc:
        lines = text.split("\n")
        if len(lines) == 4 and lines[1] == "0":
            try:
                origin, _, _ = cp.parse_text(f"{lines[0]}\n0\n{std_encode(merkle.EMPTY_ROOT)}\n")
                root = std_decode(lines[2], "checkpoint root hash")
            except BadFormat:
                raise Refused(BAD_REQUEST, str(exc)) from None
            if len(root) == 32:
                return origin, 0, root
        raise Refused(BAD_REQUEST, str(exc)) from None


def open_submission(body: bytes, logs: Mapping[str, Sequence[note.Verifier]]) -> Submission:
    """Read an add-checkpoint body and verify the log's signature on its checkpoint, by the
    keys ``logs`` trusts for its origin; raise :class:`Refused`."""
    try:
        request = wire.parse_add_checkpoint(body)
        parsed = note.parse(request.note, "checkpoint")
    except BadFormat as exc:
        raise Refused(BAD_REQUEST, str(exc)) from None
    origin, size, root = _read_text(parsed.text)
    keys = logs.get(origin)
    if not keys:
        raise Refused(NOT_FOUND, f"unknown log origin {origin!r}")
    try:
        verified = note.verify(parsed, keys)
    except (BadSignature, BadFormat) as exc:
        raise Refused(FORBIDDEN, f"checkpoint of {origin}: {exc}") from None
    if request.old_size > size:
        raise Refused(BAD_REQUEST, f"old size {request.old_size} is above the checkpoint's size {size}")
    if size == 0 and root != merkle.EMPTY_ROOT:
        raise Refused(UNPROCESSABLE, f"checkpoint of {origin}: an empty tree whose root is not the "
                                     "hash of the empty string")
    return Submission(origin, size, root, parsed.text, tuple(v.signature for v in verified),
                      request.old_size, request.proof)


def check(sub: Submission, last: Cosigned | None) -> None:
    """Raise :class:`Refused` unless ``sub`` extends ``last`` (the last checkpoint cosigned for
    its log, None if none), as its old size and proof show."""
    cosigned = last.size if last else 0
    if sub.old_size != cosigned:
        raise Refused(CONFLICT, f"old size {sub.old_size}, but the last cosigned size is {cosigned}",
                      cosigned)
    if sub.old_size == 0:
        if sub.proof:
            raise Refused(UNPROCESSABLE, "old size 0 takes an empty consistency proof, "
                                         f"not {len(sub.proof)} hashes")
        return
    if last is None:                                 # not reached: the old size is the cosigned one
        raise Refused(CONFLICT, f"old size {sub.old_size}, but nothing is cosigned yet", 0)
    if sub.size == last.size:
        if sub.proof:
            raise Refused(UNPROCESSABLE, f"old size {sub.old_size} equals the checkpoint's size: "
                                         "the consistency proof must be empty")
        if sub.root != last.root:
            raise Refused(UNPROCESSABLE, f"size {sub.size} was cosigned with root "
                                         f"{std_encode(last.root)}, not {std_encode(sub.root)}")
        return
    if not merkle.verify_consistency(last.size, sub.size, last.root, sub.root, sub.proof):
        raise Refused(UNPROCESSABLE, f"the consistency proof does not lead from the cosigned size "
                                     f"{last.size} (root {std_encode(last.root)}) to size {sub.size}")

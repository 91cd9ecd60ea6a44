"""What makes verifying a large mileage certificate cheap (:mod:`protocol.certificate`): the
entries read straight from the certificate's one encoding, inclusion proofs checked as blobs of
hashes with the walks they share done once, and the records' signatures checked ahead by an
executor the caller gives (worker processes: :mod:`verifier.cli`).

Each gives exactly the answers of the plain way, in the same order: what cannot be read here is
read the plain way, and the certificate's checks still decide in certificate order what fails
first.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import re
from collections.abc import Sequence
from concurrent.futures import BrokenExecutor, CancelledError, Executor, Future

from protocol import jws, merkle
from protocol.errors import BadFormat, BadSignature
from protocol.identity import VerifyKey

# -- the entries, from the certificate's one encoding -----------------------------------------

#: Where the entries begin and end in the one encoding: its members are sorted, "annotations"
#: before "entries" before "format", each at one space of indent.
_ENTRIES_START = b',\n "entries": [\n  '
_ENTRIES_END = b'\n ],\n "format": '
#: One entry as the one encoding writes it (certificate._entry_text), then what follows it. The
#: leaf: printable ASCII, which is written as it is but for ``"`` and ``\``, which are escaped.
_ENTRY_TEXT = re.compile(
    rb'\{\n   "index": (0|[1-9][0-9]{0,19}),\n'
    rb'   "leaf": "([ !#-\[\]-~]*(?:\\[ -~][ !#-\[\]-~]*)*)",\n'
    rb'   "proof": (?:\[\]|\[\n    "([0-9a-f",\n ]*)"\n   \])\n  \}(,\n  )?')
_HASH_SEP = b'",\n    "'

#: An entry read: its index, its bytes and its proof (the hashes, concatenated).
FastEntry = tuple[int, bytes, bytes]


def _leaf(text: bytes) -> bytes | None:
    """The bytes of a leaf written as ``text`` (between the quotes), if that is how the one
    encoding writes them."""
    if b"\\" not in text:
        return text
    try:
        value = json.loads(b'"' + text + b'"')
    except ValueError:
        return None
    if not isinstance(value, str) or json.encoder.encode_basestring_ascii(value) != '"' + text.decode() + '"':
        return None
    return value.encode("utf-8", "surrogatepass")


def split_encoded(raw: bytes) -> tuple[bytes, list[FastEntry]] | None:
    """``raw`` without its entries (``"entries": []`` in their place), and the entries, read
    without building them as JSON: only if ``raw`` is ASCII and its entries are each exactly as
    the one encoding writes an entry of an integer index, a string leaf and a proof of 64
    lowercase hex strings. Otherwise None (read the plain way). The rest of ``raw`` is not
    checked here: the caller parses it, and checks that it is in the one encoding."""
    if not raw.isascii():
        return None
    start = raw.find(_ENTRIES_START)
    end = raw.rfind(_ENTRIES_END)
    if start < 0 or end < start:
        return None
    pos = start + len(_ENTRIES_START)
    match, a2b, b2a = _ENTRY_TEXT.match, binascii.a2b_hex, binascii.b2a_hex
    out: list[FastEntry] = []
    append = out.append
    while True:
        m = match(raw, pos, end)
        if m is None:
            return None
        index, text, block, more = m.groups()
        leaf = _leaf(text)
        if leaf is None:
            return None
        if block is None:
            proof = b""
        else:
            try:
                proof = a2b(block.translate(None, b'",\n '))
            except binascii.Error:
                return None
            # each hash 64 lowercase hex (a2b_hex reads capitals too), in its place
            if len(proof) % 32 or b2a(proof, b"\n", 32).replace(b"\n", _HASH_SEP) != block:
                return None
        append((int(index), leaf, proof))
        pos = m.end()
        if more is None:
            break
    if pos != end:
        return None
    return raw[:start] + b',\n "entries": []' + raw[end + len(b"\n ]"):], out


# -- inclusion proofs -------------------------------------------------------------------------

def check_inclusion(walker: merkle.InclusionWalker, root: bytes, index: int, entry: bytes,
                    proof: bytes) -> None:
    """:func:`protocol.checkpoint.verify_inclusion`, with a walker: raise BadFormat unless
    ``entry`` is leaf ``index`` of the tree of ``root``."""
    got = walker.root(index, hashlib.sha256(b"\x00" + entry).digest(), proof)
    if got != root:
        raise BadFormat(f"inclusion proof: leaf {index} does not lead to the checkpoint's root")


# -- signatures, checked ahead ----------------------------------------------------------------

#: Signatures checked at a time by a worker: enough that handing them over costs little, few
#: enough that the workers start early and a failure near the start is known soon.
CHUNK = 1024
#: Workers are given signatures once this many wait (for fewer, starting them costs more).
START_AT = 2 * CHUNK

#: A signature to check: the record's index, the public key, the signature, the signed bytes.
Job = tuple[int, bytes, bytes, bytes]


def check_chunk(chunk: Sequence[Job]) -> list[int]:
    """The indexes in ``chunk`` whose signature does not verify (:meth:`VerifyKey.verify`, as
    :func:`protocol.jws.verify` checks a record's)."""
    failed = []
    for index, public, signature, data in chunk:
        try:
            VerifyKey(public).verify(signature, data)
        except BadSignature:
            failed.append(index)
    return failed


class Signatures:
    """The records' signatures (:func:`protocol.jws.verify` by the device's key), each checked
    once: those added ahead, by ``executor`` (``check_chunk`` on chunks of them) while the
    caller goes on; any other when asked. :meth:`verifies` answers for one record, whichever
    way it was checked; a chunk the executor has not begun, or could not check, is checked
    when asked (so the caller, done with the rest, checks signatures too). Without an executor,
    each is checked when asked."""

    def __init__(self, executor: Executor | None = None) -> None:
        self._executor = executor
        self._chunks: list[list[Job]] = []
        self._futures: list[Future[list[int]] | None] = []     # None: checked when asked
        self._where: dict[int, tuple[int, VerifyKey]] = {}     # index -> (chunk, key)
        self._waiting = 0
        self._failed: set[int] = set()
        self._collected = 0                                    # chunks whose failures are in _failed
        self._stolen: dict[int, list[int]] = {}                # chunks checked here, from the last back
        self._back: int | None = None                          # the first of those

    def add(self, index: int, key: VerifyKey, parts: jws.Compact) -> None:
        """Check the signature of the record logged at ``index`` ahead."""
        if self._executor is None:
            return
        if not self._chunks or len(self._chunks[-1]) >= CHUNK:
            self.flush()
            self._chunks.append([])
        self._where[index] = (len(self._chunks) - 1, key)
        self._chunks[-1].append((index, key.raw, parts.signature, parts.signing_input))
        self._waiting += 1

    def flush(self) -> None:
        """Hand the chunks added so far to the executor, once enough wait."""
        if self._executor is None or self._waiting < START_AT:
            return
        while len(self._futures) < len(self._chunks):
            chunk = self._chunks[len(self._futures)]
            try:
                future: Future[list[int]] | None = self._executor.submit(check_chunk, chunk)
            except (BrokenExecutor, RuntimeError):      # broken, or shut down: checked here
                future = None
            self._futures.append(future)

    def verifies(self, index: int, key: VerifyKey, parts: jws.Compact) -> bool:
        """Whether the record logged at ``index`` is signed by ``key``."""
        where = self._where.get(index)
        if where is None or where[1] != key:
            try:
                jws.verify(parts, key)
            except BadSignature:
                return False
            return True
        self.flush()
        while self._collected <= where[0]:
            n = self._collected
            future = self._futures[n] if n < len(self._futures) else None
            # While the executor checks the chunk needed next, the last it has not begun is checked
            # here: the executor takes them in order, so they meet.
            while future is not None and not future.done() and self._steal(n):
                pass
            self._failed.update(self._result(n))
            self._chunks[n] = []
            self._collected += 1
        return index not in self._failed

    def _result(self, n: int) -> list[int]:
        """The indexes in chunk ``n`` whose signature does not verify."""
        if n in self._stolen:
            return self._stolen.pop(n)
        future = self._futures[n] if n < len(self._futures) else None
        if future is None or future.cancel():          # not begun there: checked here
            return check_chunk(self._chunks[n])
        try:
            return future.result()
        except (BrokenExecutor, CancelledError):        # not checked there: checked here
            return check_chunk(self._chunks[n])

    def _steal(self, n: int) -> bool:
        """Check here the last chunk after ``n`` that the executor has not begun, if any."""
        if self._back is None:
            self._back = len(self._futures)
        last = self._back - 1
        if last <= n:
            return False
        future = self._futures[last]
        if future is not None and not future.cancel():
            return False
        self._stolen[last] = check_chunk(self._chunks[last])
        self._back = last
        return True

    def close(self) -> None:
        """Drop what the executor has not yet begun."""
        for future in self._futures[self._collected:]:
            if future is not None:
                future.cancel()

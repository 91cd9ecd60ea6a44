"""base64url without padding (RFC 7515 §2), and standard padded base64 (RFC 4648 §4) for
signed notes; both decoded strictly, so that only the one encoding of some bytes is read."""

from __future__ import annotations

import base64
import binascii
import re

from protocol.errors import BadFormat

_ALPHABET = re.compile(r"[A-Za-z0-9_-]*")
_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
#: The characters that may end a canonical unpadded text of 4n+2 and 4n+3 characters: those whose
#: bits past the data are zero.
_LAST_OF = {2: frozenset("AQgw"), 3: frozenset("AEIMQUYcgkosw048")}
_STD = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def decode(text: str, what: str = "value") -> bytes:
    tail = len(text) % 4
    if tail == 1 or not _ALPHABET.fullmatch(text):
        raise BadFormat(f"{what}: not base64url")
    if tail and text[-1] not in _LAST_OF[tail]:
        raise BadFormat(f"{what}: non-canonical base64url")
    try:
        return binascii.a2b_base64(text.encode("ascii").translate(_TO_STANDARD) + b"=" * (-tail % 4))
    except (binascii.Error, ValueError):
        raise BadFormat(f"{what}: not base64url") from None


def std_encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def std_decode(text: str, what: str = "value") -> bytes:
    """Standard base64 (RFC 4648 §4), canonical only."""
    if not _STD.fullmatch(text) or len(text) % 4:
        raise BadFormat(f"{what}: not base64")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadFormat(f"{what}: not base64") from None
    if std_encode(data) != text:
        raise BadFormat(f"{what}: non-canonical base64")
    return data

"""base64url without padding (RFC 7515 §2), and standard padded base64 (RFC 4648 §4) for
signed notes; both decoded strictly, so that only the one encoding of some bytes is read."""

from __future__ import annotations

import base64
import binascii
import re

from protocol.errors import BadFormat

_ALPHABET = re.compile(r"[A-Za-z0-9_-]*")
_STD = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def decode(text: str, what: str = "value") -> bytes:
    if not _ALPHABET.fullmatch(text) or len(text) % 4 == 1:
        raise BadFormat(f"{what}: not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise BadFormat(f"{what}: not base64url") from None
    if encode(data) != text:
        raise BadFormat(f"{what}: non-canonical base64url")
    return data


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

"""base64url without padding (RFC 7515 §2)."""

from __future__ import annotations

import base64
import binascii
import re

from protocol.errors import BadFormat

_ALPHABET = re.compile(r"[A-Za-z0-9_-]*")


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

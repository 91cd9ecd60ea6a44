"""Compact JWS (RFC 7515) with the fully specified ``Ed25519`` algorithm (RFC 9864).

Sign bytes, verify bytes, then parse: :func:`verify` returns the payload bytes
exactly as signed, and nothing here re-serialises them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from protocol import b64, canonical
from protocol.errors import BadFormat
from protocol.identity import SigningKey, VerifyKey

ALG = "Ed25519"
#: At most what one log entry holds (a record is logged verbatim; docs/log.md).
MAX_JWS_BYTES = 65535


@dataclass(frozen=True)
class Compact:
    """A compact JWS split into its parts; the signature is not yet checked."""

    text: str
    header: dict[str, object]
    payload: bytes
    signature: bytes
    kid: str                     # the header's, checked to be a string

    @property
    def signing_input(self) -> bytes:
        return self.text[:self.text.rindex(".")].encode("ascii")


def sign(payload: bytes, key: SigningKey, kid: str) -> str:
    header = json.dumps({"alg": ALG, "kid": kid}, separators=(",", ":")).encode()
    signing_input = f"{b64.encode(header)}.{b64.encode(payload)}"
    return f"{signing_input}.{b64.encode(key.sign(signing_input.encode('ascii')))}"


@functools.lru_cache(maxsize=4096)
def _header(segment: str) -> tuple[tuple[str, object], ...]:
    """A protected header, checked; cached, as one device signs every record under the same
    header (a refused one raises every time: exceptions are not cached)."""
    header = canonical.loads_object(b64.decode(segment, "jws header"), "jws header")
    if header.get("alg") != ALG:
        raise BadFormat(f"jws header: alg must be {ALG!r}, got {header.get('alg')!r}")
    if not isinstance(header.get("kid"), str):
        raise BadFormat("jws header: kid missing")
    if set(header) - {"alg", "kid"}:
        raise BadFormat(f"jws header: unexpected fields {sorted(set(header) - {'alg', 'kid'})}")
    return tuple(header.items())


def split(text: str | bytes) -> Compact:
    """Parse the structure and the protected header; raise :class:`BadFormat`."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise BadFormat("jws: not ASCII") from None
    if not isinstance(text, str):
        raise BadFormat("jws: must be a string")
    if len(text) > MAX_JWS_BYTES:
        raise BadFormat(f"jws: longer than {MAX_JWS_BYTES} bytes")
    parts = text.split(".")
    if len(parts) != 3:
        raise BadFormat("jws: compact serialization needs three parts")
    header = dict(_header(parts[0]))
    payload = b64.decode(parts[1], "jws payload")
    signature = b64.decode(parts[2], "jws signature")
    if len(signature) != 64:
        raise BadFormat("jws signature: must be 64 bytes")
    kid = header["kid"]
    assert isinstance(kid, str)                  # _header checked it
    return Compact(text, header, payload, signature, kid)


def verify(compact: Compact, key: VerifyKey) -> bytes:
    """Return the signed payload bytes; raise :class:`BadSignature` if they are not."""
    key.verify(compact.signature, compact.signing_input)
    return compact.payload

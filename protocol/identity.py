"""Device and log identities: Ed25519 keys, and the ids derived from them.

Keys are generated, kept and used to sign with ``cryptography``. Signatures are checked with
libsodium (PyNaCl) when it can be imported, about twice as fast, and with ``cryptography``
otherwise (the base install, that of ``odo-verify``, has only that). Both give the same answer to
every signature, because what is accepted is decided here and not left to the library: RFC 8032's
equation ``[S]B = R + [k]A`` (without the cofactor), with ``S`` below the group order, a public key
``A`` in its canonical encoding, and neither ``A`` nor ``R`` a point of small order (a signature
anyone could make). libsodium checks all of that itself; ``cryptography`` (OpenSSL) checks only
``S`` and the equation, so the rest is checked before it is called (:func:`acceptable`).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from protocol.errors import BadFormat, BadSignature

DEV_RE = re.compile(r"[0-9a-f]{32}")
#: A VIN (ISO 3779): 17 characters of A-H, J-N, P, R-Z and 0-9 (no I, O or Q); match with fullmatch.
VIN_RE = re.compile(r"[A-HJ-NPR-Z0-9]{17}")


def device_id(public_raw: bytes) -> str:
    """Lowercase hex of the first 16 bytes of SHA-256 of the raw 32-byte key."""
    if len(public_raw) != 32:
        raise BadFormat("public key: must be 32 raw bytes")
    return hashlib.sha256(public_raw).digest()[:16].hex()


def is_device_id(text: object) -> bool:
    return isinstance(text, str) and bool(DEV_RE.fullmatch(text))


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key; ``repr`` never shows it."""

    _key: Ed25519PrivateKey = field(repr=False)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes) -> SigningKey:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise BadFormat(f"private key: not a PKCS#8 PEM key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise BadFormat("private key: not an Ed25519 key")
        return cls(key)

    def to_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def public(self) -> VerifyKey:
        return VerifyKey(
            self._key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        )

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


@dataclass(frozen=True)
class VerifyKey:
    """An Ed25519 public key as its 32 raw bytes."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != 32:
            raise BadFormat("public key: must be 32 raw bytes")

    @functools.cached_property
    def id(self) -> str:
        return device_id(self.raw)

    @classmethod
    def from_pem(cls, pem: bytes) -> VerifyKey:
        try:
            key = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError) as exc:
            raise BadFormat(f"public key: not a PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise BadFormat("public key: not an Ed25519 key")
        return cls(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    def to_pem(self) -> bytes:
        return Ed25519PublicKey.from_public_bytes(self.raw).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def verify(self, signature: bytes, data: bytes) -> None:
        """Raise :class:`BadSignature` unless ``signature`` signs ``data`` (with :data:`LIBRARY`)."""
        if not (acceptable(self.raw, signature) and _verify(self.raw, signature, data)):
            raise BadSignature("signature does not verify")


# -- checking signatures ----------------------------------------------------------------------

#: The field's prime, and the mask of the 255 bits of an encoded point that hold its y.
_P = 2**255 - 19
_Y_BITS = (1 << 255) - 1
#: The y of every point of small order (the eight of order 1, 2, 4 and 8), the sign bit of x
#: aside, and the two other encodings of 0 and 1 (y = p, p + 1): libsodium's list.
_SMALL_ORDER_Y = frozenset({
    0, 1, _P - 1, _P, _P + 1,
    2707385501144840649318225287225658788936804267575313519463743609750303402022,
    55188659117513257062467267217118295137698188065244968500265048394206261417927,
})


def weak_key(public: bytes) -> bool:
    """Whether no signature by this 32-byte public key is accepted: its y is not below the
    field's prime (a non-canonical encoding), or it is a point of small order."""
    y = int.from_bytes(public, "little") & _Y_BITS
    return y >= _P or y in _SMALL_ORDER_Y


def acceptable(public: bytes, signature: bytes) -> bool:
    """What is checked here before the library's verify: a 64-byte signature whose ``R`` is not
    of small order, by a public key that is not :func:`weak <weak_key>`."""
    return (len(signature) == 64
            and int.from_bytes(signature[:32], "little") & _Y_BITS not in _SMALL_ORDER_Y
            and not weak_key(public))


def _cryptography(public: bytes, signature: bytes, data: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, data)
    except InvalidSignature:
        return False
    return True


#: The libraries that can check a signature, each as ``verify(public, signature, data) -> bool``
#: (after :func:`acceptable`); both always give the same answer.
LIBRARIES: dict[str, Callable[[bytes, bytes, bytes], bool]] = {"cryptography": _cryptography}

try:
    from nacl.bindings import crypto_sign_open
    from nacl.exceptions import BadSignatureError
except ImportError:  # the base install: odo-verify and the agent need only cryptography
    pass
else:
    def _libsodium(public: bytes, signature: bytes, data: bytes) -> bool:
        try:
            crypto_sign_open(signature + data, public)  # what nacl.signing.VerifyKey.verify calls
        except BadSignatureError:
            return False
        return True

    LIBRARIES["libsodium"] = _libsodium

#: The library :meth:`VerifyKey.verify` uses: libsodium when PyNaCl is installed.
LIBRARY = "libsodium" if "libsodium" in LIBRARIES else "cryptography"
_verify = LIBRARIES[LIBRARY]


def verify_with(library: str, public: bytes, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` signs ``data`` by ``public``, checked with ``library`` (a key of
    :data:`LIBRARIES`); :meth:`VerifyKey.verify` is this with :data:`LIBRARY`."""
    return acceptable(public, signature) and LIBRARIES[library](public, signature, data)

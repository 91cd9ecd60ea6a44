"""Device and log identities: Ed25519 keys, and the ids derived from them."""

from __future__ import annotations

import hashlib
import re
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

    @property
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
        """Raise :class:`BadSignature` unless ``signature`` signs ``data``."""
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except InvalidSignature:
            raise BadSignature("signature does not verify") from None

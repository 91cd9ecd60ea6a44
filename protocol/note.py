"""Signed notes (c2sp.org/signed-note) and timestamped cosignatures (c2sp.org/tlog-cosignature).

A signed note is a UTF-8 text ending in a newline, a blank line, and one or more signature
lines ``— <key name> base64(key ID || signature)``. A key is known by its *verifier key*
(vkey), ``<name>+<hex key ID>+base64(type || public key)``; the key ID is the first four bytes
of ``SHA-256(name || "\\n" || type || public key)``. Two signature types are spoken here:

- ``0x01``: Ed25519 over the note text (the log's signature on its checkpoints);
- ``0x04``: an Ed25519 cosignature, whose signature is ``timestamp (u64, big-endian) ||
  Ed25519(cosignature/v1\\ntime <timestamp>\\n || note text)`` (a witness's statement that,
  at that time, this was the largest consistent tree it had seen of the log).

Every input is bounded before it is read; base64 must be canonical, so that no changed byte
of a note or a vkey can still be accepted as the same thing.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from protocol.b64 import std_decode, std_encode
from protocol.errors import BadFormat, BadSignature
from protocol.identity import SigningKey, VerifyKey

ED25519 = 0x01
COSIGNATURE_V1 = 0x04
TYPES = (ED25519, COSIGNATURE_V1)
#: The largest note read, and the most signature lines (the spec asks for at least 16).
MAX_NOTE_BYTES = 64 * 1024
MAX_SIGNATURES = 64
MAX_NAME_CHARS = 255
MAX_VKEY_CHARS = 512
#: A cosignature's timestamp must not exceed 2^63 - 1 (c2sp.org/tlog-cosignature).
MAX_TIMESTAMP = 2**63 - 1
DASH = "\u2014"
COSIGNATURE_HEADER = "cosignature/v1\n"

_NAME = re.compile(r"[^\s+]{1,255}")
_HEX8 = re.compile(r"[0-9a-f]{8}")
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")


def check_name(name: str, what: str = "key name") -> str:
    if not _NAME.fullmatch(name):
        raise BadFormat(f"{what}: 1 to {MAX_NAME_CHARS} characters, no spaces and no '+'")
    return name


def key_id(name: str, kind: int, public: VerifyKey) -> bytes:
    """``SHA-256(name || 0x0A || type || public key)[:4]``."""
    return hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([kind]) + public.raw).digest()[:4]


@dataclass(frozen=True)
class Verifier:
    """A known key: its name, signature type and public key."""

    name: str
    kind: int
    public: VerifyKey

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.kind not in TYPES:
            raise BadFormat(f"verifier key: signature type 0x{self.kind:02x} is not spoken here")

    @property
    def id(self) -> bytes:
        return key_id(self.name, self.kind, self.public)

    @property
    def vkey(self) -> str:
        return f"{self.name}+{self.id.hex()}+{std_encode(bytes([self.kind]) + self.public.raw)}"


def parse_vkey(text: str) -> Verifier:
    """A verifier key ``<name>+<hex key ID>+<base64(type || key)>``; raise BadFormat."""
    text = text.strip()
    if len(text) > MAX_VKEY_CHARS:
        raise BadFormat(f"verifier key: longer than {MAX_VKEY_CHARS} characters")
    parts = text.split("+", 2)         # the name and the ID hold no "+"; base64 may
    if len(parts) != 3:
        raise BadFormat("verifier key: not <name>+<key ID>+<key>")
    name, hex_id, material = parts
    check_name(name, "verifier key name")
    if not _HEX8.fullmatch(hex_id):
        raise BadFormat("verifier key: the key ID must be 8 lowercase hex characters")
    raw = std_decode(material, "verifier key")
    if len(raw) != 33:
        raise BadFormat("verifier key: an Ed25519 key is a type byte and 32 bytes")
    verifier = Verifier(name, raw[0], VerifyKey(raw[1:]))
    if verifier.id.hex() != hex_id:
        raise BadFormat(f"verifier key {name}: key ID {hex_id} is not the ID of its key "
                        f"({verifier.id.hex()})")
    return verifier


@dataclass(frozen=True)
class Signature:
    """One signature line: the key's name, its 4-byte ID and the signature after it."""

    name: str
    key_id: bytes
    signature: bytes = field(repr=False)

    @property
    def line(self) -> str:
        return f"{DASH} {self.name} {std_encode(self.key_id + self.signature)}\n"


@dataclass(frozen=True)
class Note:
    text: str                           # ends in a newline; the signed bytes
    signatures: tuple[Signature, ...]

    def encode(self) -> str:
        return self.text + "\n" + "".join(s.line for s in self.signatures)


def _check_text(text: str, what: str) -> None:
    if not text.endswith("\n"):
        raise BadFormat(f"{what}: the text must end in a newline")
    if _CONTROL.search(text):
        raise BadFormat(f"{what}: holds a control character other than newline")


def parse_signature_line(line: str, what: str = "signature line") -> Signature:
    """``— <name> <base64>`` (without its newline)."""
    prefix = DASH + " "
    if not line.startswith(prefix):
        raise BadFormat(f"{what}: must start with an em dash and a space")
    parts = line[len(prefix):].split(" ")
    if len(parts) != 2:
        raise BadFormat(f"{what}: must be a key name and a signature")
    name = check_name(parts[0], f"{what}: key name")
    raw = std_decode(parts[1], f"{what} {name}")
    if len(raw) < 5:
        raise BadFormat(f"{what} {name}: too short")
    return Signature(name, raw[:4], raw[4:])


def parse(data: bytes | str, what: str = "note") -> Note:
    """Split a signed note into its text and signature lines; nothing is verified yet."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if len(raw) > MAX_NOTE_BYTES:
        raise BadFormat(f"{what}: larger than {MAX_NOTE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadFormat(f"{what}: not UTF-8") from None
    if _CONTROL.search(text):
        raise BadFormat(f"{what}: holds a control character other than newline")
    cut = text.rfind("\n\n")
    if cut < 0 or not text.endswith("\n"):
        raise BadFormat(f"{what}: no blank line before the signatures, or no final newline")
    body, lines = text[:cut + 1], text[cut + 2:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise BadFormat(f"{what}: more than {MAX_SIGNATURES} signatures")
    return Note(body, tuple(parse_signature_line(line, f"{what}: signature line") for line in lines))


def sign(text: str, name: str, key: SigningKey) -> Signature:
    """An Ed25519 (type 0x01) signature of ``text`` by ``key`` under ``name``."""
    _check_text(text, "note")
    check_name(name)
    return Signature(name, key_id(name, ED25519, key.public), key.sign(text.encode("utf-8")))


def _cosigned_message(text: str, timestamp: int) -> bytes:
    return f"{COSIGNATURE_HEADER}time {timestamp}\n{text}".encode()


def cosign(text: str, name: str, key: SigningKey, timestamp: int) -> Signature:
    """A cosignature/v1 (type 0x04) of the checkpoint ``text`` at ``timestamp`` (POSIX seconds)."""
    _check_text(text, "checkpoint")
    check_name(name)
    if not 0 < timestamp <= MAX_TIMESTAMP:
        raise ValueError("a cosignature's timestamp is 1 .. 2^63 - 1 seconds")
    body = struct.pack(">Q", timestamp) + key.sign(_cosigned_message(text, timestamp))
    return Signature(name, key_id(name, COSIGNATURE_V1, key.public), body)


@dataclass(frozen=True)
class Verified:
    """A signature line that verified: by whom, and (for a cosignature) when."""

    verifier: Verifier
    signature: Signature
    timestamp: int | None = None


def matches(signature: Signature, verifier: Verifier) -> bool:
    return signature.name == verifier.name and signature.key_id == verifier.id


def verify_signature(text: str, signature: Signature, verifier: Verifier) -> Verified:
    """Check one line that :func:`matches` ``verifier``; raise BadSignature or BadFormat."""
    if verifier.kind == ED25519:
        verifier.public.verify(signature.signature, text.encode("utf-8"))
        return Verified(verifier, signature)
    body = signature.signature
    if len(body) != 8 + 64:
        raise BadFormat(f"cosignature by {verifier.name}: must be a timestamp and a 64-byte signature")
    (timestamp,) = struct.unpack(">Q", body[:8])
    if timestamp > MAX_TIMESTAMP:
        raise BadFormat(f"cosignature by {verifier.name}: timestamp beyond 2^63 - 1")
    verifier.public.verify(body[8:], _cosigned_message(text, timestamp))
    return Verified(verifier, signature, timestamp)


def verify(note: Note, verifiers: Sequence[Verifier], *, at_least: int = 1) -> list[Verified]:
    """The signatures of known keys, each checked; unknown ones are ignored (the spec says so).

    A line of a known key that fails to verify fails the whole note (:class:`BadSignature`);
    fewer than ``at_least`` verified signatures is :class:`BadSignature` too."""
    out: list[Verified] = []
    seen: set[tuple[str, bytes]] = set()
    for sig in note.signatures:
        for v in verifiers:
            if matches(sig, v):
                try:
                    got = verify_signature(note.text, sig, v)
                except BadSignature:
                    raise BadSignature(f"the signature of {v.name} ({v.id.hex()}) does not verify") from None
                if (v.name, v.id) not in seen:
                    seen.add((v.name, v.id))
                    out.append(got)
    if len(out) < at_least:
        names = ", ".join(v.name for v in verifiers) or "no key"
        raise BadSignature(f"note: {len(out)} valid signature(s) by {names}, {at_least} needed")
    return out

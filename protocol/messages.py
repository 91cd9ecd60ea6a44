"""MQTT message bodies (docs/protocol.md §4): encode and strictly decode each shape."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from protocol import b64, canonical, jws
from protocol.errors import BadFormat
from protocol.identity import DEV_RE, VIN_RE, SigningKey, VerifyKey, device_id

MAX_BATCH_RECORDS = 500
MAX_BATCH_BYTES = 256 * 1024
REASONS = (
    "bad_format", "bad_signature", "unknown_device", "revoked_device", "dev_mismatch",
    "chain_break", "fork", "odometer_rollback", "implausible_distance", "vin_mismatch",
    "clock_ahead", "trip_mismatch",
)
#: Reasons that do not take the record's seq (docs/protocol.md §4).
UNSEQUENCED = frozenset(
    {"bad_format", "bad_signature", "unknown_device", "revoked_device", "dev_mismatch", "vin_mismatch"}
)
ENROLL_STATUSES = ("approved", "pending", "rejected")


class TooLarge(BadFormat):
    """A message over its size or count limit, refused before its parts are read."""


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _int(obj: dict[str, Any], name: str, what: str, *, nullable: bool = False) -> int | None:
    value = obj.get(name)
    if value is None and nullable:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadFormat(f"{what}: {name} must be a non-negative integer")
    return value


# -- records batch -----------------------------------------------------------

#: A device's monotonic clock, in ms since its boot: well below 2^53 (a JSON-safe integer).
MAX_MONO_MS = 2**53 - 1
_BOOT = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class Batch:
    """A ``records`` message: the compact JWS records, in ascending seq, and optionally the
    device's clock when it sent them (``boot`` and ``mono_ms`` of the sending moment), which
    lets the backend date records of an unsynced clock from their arrival.

    Decoded, ``records`` holds each item as sent: an item that is not a string is refused on
    its own by whoever reads the batch, so that it cannot take the good records beside it down.
    """

    records: tuple[object, ...]
    boot: str | None = None
    mono_ms: int | None = None


def encode_batch(records: list[str], *, boot: str | None = None, mono_ms: int | None = None) -> bytes:
    if len(records) > MAX_BATCH_RECORDS:
        raise ValueError(f"a batch holds at most {MAX_BATCH_RECORDS} records")
    if (boot is None) != (mono_ms is None):
        raise ValueError("a batch carries boot and mono_ms together, or neither")
    obj: dict[str, Any] = {"records": records}
    if boot is not None and mono_ms is not None:
        if not _BOOT.fullmatch(boot) or not 0 <= mono_ms <= MAX_MONO_MS:
            raise ValueError(f"a batch's clock must be a boot id and 0..{MAX_MONO_MS} ms")
        obj.update(boot=boot, mono_ms=mono_ms)
    body = _dumps(obj)
    if len(body) > MAX_BATCH_BYTES:
        raise ValueError(f"a batch is at most {MAX_BATCH_BYTES} bytes")
    return body


#: What ``boot`` and ``mono_ms`` add to a batch at most (keys, quotes, a 64-character boot id).
_CLOCK_BYTES = len(',"boot":"","mono_ms":') + 64 + 16


def batch_fits(records: list[str]) -> bool:
    """Whether ``records`` fit in one batch (count and encoded size, with room for the clock)."""
    size = len('{"records":[]}') + sum(len(r) + 3 for r in records) + _CLOCK_BYTES
    return len(records) <= MAX_BATCH_RECORDS and size <= MAX_BATCH_BYTES


def decode_batch(body: bytes) -> Batch:
    """The batch in ``body``; its size is checked before it is parsed. A malformed clock is
    ignored (it only helps dating); a body that is not an object with a list of at most
    :data:`MAX_BATCH_RECORDS` items is :class:`BadFormat`."""
    if len(body) > MAX_BATCH_BYTES:
        raise TooLarge(f"records batch: larger than {MAX_BATCH_BYTES} bytes")
    obj = canonical.loads_object(body, "records batch")
    items = obj.get("records")
    if not isinstance(items, list):
        raise BadFormat("records batch: 'records' must be a list")
    if len(items) > MAX_BATCH_RECORDS:
        raise TooLarge(f"records batch: more than {MAX_BATCH_RECORDS} records")
    boot, mono = obj.get("boot"), obj.get("mono_ms")
    if (isinstance(boot, str) and _BOOT.fullmatch(boot) and isinstance(mono, int)
            and not isinstance(mono, bool) and 0 <= mono <= MAX_MONO_MS):
        return Batch(tuple(items), boot, mono)
    return Batch(tuple(items))


# -- ack ---------------------------------------------------------------------

@dataclass(frozen=True)
class Rejection:
    seq: int | None
    reason: str


@dataclass(frozen=True)
class Ack:
    through: int
    rejected: tuple[Rejection, ...] = ()
    balance: int | None = None


def encode_ack(ack: Ack) -> bytes:
    rejected = [
        {"seq": r.seq, "reason": r.reason} if r.seq is not None else {"reason": r.reason}
        for r in ack.rejected
    ]
    return _dumps({"through": ack.through, "rejected": rejected, "balance": ack.balance})


def decode_ack(body: bytes) -> Ack:
    obj = canonical.loads_object(body, "ack")
    through = _int(obj, "through", "ack")
    assert through is not None
    balance = _int(obj, "balance", "ack", nullable=True) if "balance" in obj else None
    raw = obj.get("rejected", [])
    if not isinstance(raw, list):
        raise BadFormat("ack: rejected must be a list")
    rejected = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("reason"), str):
            raise BadFormat("ack: each rejection needs a reason")
        rejected.append(Rejection(_int(item, "seq", "ack rejection", nullable=True), item["reason"]))
    return Ack(through, tuple(rejected), balance)


# -- status ------------------------------------------------------------------

OFFLINE = _dumps({"online": False})


def encode_status(**fields: Any) -> bytes:
    return _dumps({"online": True, **fields})


def decode_status(body: bytes) -> dict[str, Any]:
    obj = canonical.loads_object(body, "status") if body else {"online": False}
    if not isinstance(obj.get("online"), bool):
        raise BadFormat("status: online must be true or false")
    return obj


# -- enrolment ---------------------------------------------------------------

#: The largest ``enroll`` message: a signed enrolment is well under 1 KiB.
MAX_ENROLL_BYTES = 8 * 1024
#: A fleet token: 1 to 200 printable ASCII characters.
FLEET_TOKEN_RE = re.compile(r"[\x20-\x7e]{1,200}")
_ENROLL_MEMBERS = frozenset({"enrolment", "fleet_token"})
_ENROLLMENT_MEMBERS = frozenset({"v", "dev", "pub", "vin", "t"})
_NEW_FORM = '{"enrolment": "<the signed enrolment>", "fleet_token": "<token>" or null}'


@dataclass(frozen=True)
class Enrollment:
    """A device's self-signed enrolment: ``jws`` is the compact JWS, verbatim, of the payload
    ``{"v":1,"dev","pub","vin","t"}``; it never holds a fleet token."""

    jws: str = field(repr=False)
    dev: str
    pub: VerifyKey
    vin: str | None
    t: int


def sign_enrollment(key: SigningKey, vin: str | None, t: int) -> str:
    """The device's enrolment, signed by its own key (a compact JWS)."""
    if not 0 <= t <= MAX_MONO_MS:
        raise ValueError(f"an enrolment's time must be 0..{MAX_MONO_MS} ms, got {t}")
    pub = key.public
    payload = {"v": 1, "dev": pub.id, "pub": b64.encode(pub.raw), "vin": vin, "t": t}
    return jws.sign(canonical.dumps(payload), key, pub.id)


def check_fleet_token(token: str | None) -> str | None:
    """``token`` if it is None or 1 to 200 printable ASCII characters; else :class:`ValueError`
    (whose message never repeats the token)."""
    if token is not None and (not isinstance(token, str) or not FLEET_TOKEN_RE.fullmatch(token)):
        raise ValueError("a fleet token must be 1 to 200 printable ASCII characters")
    return token


def encode_enroll(enrolment_jws: str, fleet_token: str | None) -> bytes:
    """The ``enroll`` message: the signed enrolment, and the fleet token beside it (not in it)."""
    check_fleet_token(fleet_token)
    body = _dumps({"enrolment": enrolment_jws, "fleet_token": fleet_token})
    if len(body) > MAX_ENROLL_BYTES:
        raise ValueError(f"an enroll message is at most {MAX_ENROLL_BYTES} bytes")
    return body


def decode_enroll(body: bytes) -> tuple[Enrollment, str | None]:
    """The verified enrolment in an ``enroll`` message, and the fleet token that came with it.

    The size is checked before anything is parsed; unknown members are refused; the old form
    (a bare signed enrolment, or one whose payload holds the token) is refused saying so.
    Raises :class:`BadFormat` or :class:`BadSignature`; no message repeats the token."""
    if len(body) > MAX_ENROLL_BYTES:
        raise TooLarge(f"enroll: larger than {MAX_ENROLL_BYTES} bytes")
    if body.startswith(b"eyJ"):
        raise BadFormat(f"enroll: a bare signed enrolment is the old form of this message; send {_NEW_FORM}")
    obj = canonical.loads_object(body, "enroll", max_bytes=MAX_ENROLL_BYTES, max_depth=1)
    canonical.check_members(obj, _ENROLL_MEMBERS, "enroll", f"; the message is {_NEW_FORM}")
    signed, token = obj["enrolment"], obj["fleet_token"]
    if not isinstance(signed, str):
        raise BadFormat("enroll: enrolment must be a string (a compact JWS)")
    if token is not None and (not isinstance(token, str) or not FLEET_TOKEN_RE.fullmatch(token)):
        raise BadFormat("enroll: fleet_token must be 1 to 200 printable ASCII characters, or null")
    return verify_enrollment(signed), token


def verify_enrollment(body: bytes | str) -> Enrollment:
    """Verify a self-signed enrolment: the key in the payload signed it, and
    the device id is derived from that key. Raises BadFormat / BadSignature."""
    parts = jws.split(body)
    # The key travels inside the payload, so it is read before the signature
    # can be checked; nothing else is trusted until it is.
    unverified = canonical.loads_object(parts.payload, "enrolment")
    if "fleet_token" in unverified:
        raise BadFormat("enrolment: a signed enrolment holding fleet_token is the old form; the token now "
                        f"travels beside it, never inside it: {_NEW_FORM}, signed payload "
                        '{"v":1,"dev","pub","vin","t"}')
    pub_text = unverified.get("pub")
    if not isinstance(pub_text, str):
        raise BadFormat("enrolment: pub missing")
    pub = VerifyKey(b64.decode(pub_text, "enrolment pub"))
    if parts.kid != pub.id:
        raise BadFormat("enrolment: kid is not the id of pub")
    payload = canonical.loads_object(jws.verify(parts, pub), "enrolment")
    canonical.check_members(payload, _ENROLLMENT_MEMBERS, "enrolment")
    if payload["v"] != 1 or isinstance(payload["v"], bool):
        raise BadFormat("enrolment: v must be 1")
    if payload["dev"] != device_id(pub.raw) or not DEV_RE.fullmatch(str(payload["dev"])):
        raise BadFormat("enrolment: dev is not the id of pub")
    vin = payload["vin"]
    if vin is not None and (not isinstance(vin, str) or not VIN_RE.fullmatch(vin)):
        raise BadFormat("enrolment: vin must be a VIN (17 characters of A-H, J-N, P, R-Z and 0-9) or null")
    t = _int(payload, "t", "enrolment")
    assert t is not None
    if t > MAX_MONO_MS:
        raise BadFormat(f"enrolment: t must be at most {MAX_MONO_MS}")
    return Enrollment(parts.text, pub.id, pub, vin, t)


def encode_enrolled(status: str, reason: str | None = None) -> bytes:
    if status not in ENROLL_STATUSES:
        raise ValueError(status)
    return _dumps({"status": status, "reason": reason})


def decode_enrolled(body: bytes) -> tuple[str, str | None]:
    obj = canonical.loads_object(body, "enrolled")
    status = obj.get("status")
    if status not in ENROLL_STATUSES:
        raise BadFormat(f"enrolled: unknown status {status!r}")
    reason = obj.get("reason")
    return status, reason if isinstance(reason, str) else None


# -- claim -------------------------------------------------------------------

#: A pairing code's characters: digits and capitals without 0/O, 1/I/L and U, so that nothing
#: read off a phone can be typed as another character.
CLAIM_CODE_ALPHABET = "23456789ABCDEFGHJKMNPQRSTVWXYZ"
CLAIM_CODE_LEN = 8
CLAIM_CODE_RE = re.compile(f"[{CLAIM_CODE_ALPHABET}]{{{CLAIM_CODE_LEN}}}")
#: What a person may type for a code at most (spaces and dashes between the characters).
MAX_CLAIM_CODE_INPUT = 32
#: The largest ``claim`` message: a signed claim is well under 512 bytes.
MAX_CLAIM_BYTES = 2 * 1024
MAX_CLAIM_RESULT_BYTES = 2 * 1024
CLAIM_STATUSES = ("claimed", "refused")
_CLAIM_MEMBERS = frozenset({"v", "dev", "code", "t"})
_CLAIM_RESULT_MEMBERS = frozenset({"id", "status", "reason", "driver", "vin", "from"})
_CLAIM_REASON = re.compile(r"[a-z_]{1,40}")
_DRIVER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


def normalise_claim_code(text: str) -> str | None:
    """The pairing code in what a person typed: case, spaces and dashes do not matter; None
    when it is not :data:`CLAIM_CODE_LEN` characters of :data:`CLAIM_CODE_ALPHABET`."""
    if not isinstance(text, str) or len(text) > MAX_CLAIM_CODE_INPUT:
        return None
    code = re.sub(r"[\s-]", "", text).upper()
    return code if CLAIM_CODE_RE.fullmatch(code) else None


@dataclass(frozen=True)
class Claim:
    """A device's signed claim of its vehicle for the driver whose pairing code it carries:
    ``jws`` is the compact JWS, verbatim, of ``{"v":1,"dev","code","t"}`` (``t``, the device's
    wall clock in ms, which the backend only bounds); ``id`` is the SHA-256 hex of ``jws``."""

    jws: str = field(repr=False)
    id: str
    dev: str
    code: str = field(repr=False)
    t: int


def sign_claim(key: SigningKey, code: str, t: int) -> str:
    """A claim, signed by the device's key (the ``claim`` message's body)."""
    normal = normalise_claim_code(code)
    if normal is None:
        raise ValueError(f"a pairing code is {CLAIM_CODE_LEN} characters of {CLAIM_CODE_ALPHABET}")
    if not 0 <= t <= MAX_MONO_MS:
        raise ValueError(f"a claim's time must be 0..{MAX_MONO_MS} ms, got {t}")
    dev = key.public.id
    return jws.sign(canonical.dumps({"v": 1, "dev": dev, "code": normal, "t": t}), key, dev)


def claim_kid(body: bytes) -> str:
    """The device that says it signed the ``claim`` in ``body``, read before the signature is
    checked (to find its key); :class:`BadFormat` for anything but a bounded compact JWS."""
    if len(body) > MAX_CLAIM_BYTES:
        raise BadFormat(f"claim: larger than {MAX_CLAIM_BYTES} bytes")
    kid = jws.split(body).kid
    if not DEV_RE.fullmatch(kid):
        raise BadFormat("claim: kid must be a device id (32 hex characters)")
    return kid


def verify_claim(body: bytes, pub: VerifyKey) -> Claim:
    """The claim in ``body``, signed by ``pub``; its size is checked before it is parsed,
    unknown members are refused. Raises :class:`BadFormat` or :class:`BadSignature`."""
    if len(body) > MAX_CLAIM_BYTES:
        raise BadFormat(f"claim: larger than {MAX_CLAIM_BYTES} bytes")
    parts = jws.split(body)
    if parts.kid != pub.id:
        raise BadFormat("claim: kid is not the id of the device's key")
    payload = canonical.loads_object(jws.verify(parts, pub), "claim", max_bytes=MAX_CLAIM_BYTES, max_depth=1)
    canonical.check_members(payload, _CLAIM_MEMBERS, "claim")
    if payload["v"] != 1 or isinstance(payload["v"], bool):
        raise BadFormat("claim: v must be 1")
    if payload["dev"] != pub.id:
        raise BadFormat("claim: dev is not the id of the key that signed it")
    code = payload["code"]
    if not isinstance(code, str) or not CLAIM_CODE_RE.fullmatch(code):
        raise BadFormat(f"claim: code must be {CLAIM_CODE_LEN} characters of {CLAIM_CODE_ALPHABET}")
    t = _int(payload, "t", "claim")
    assert t is not None
    if t > MAX_MONO_MS:
        raise BadFormat(f"claim: t must be at most {MAX_MONO_MS}")
    return Claim(parts.text, claim_id(parts.text), pub.id, code, t)


def claim_id(signed: str) -> str:
    """A claim's id: the SHA-256 hex of its compact JWS, as the agent and the backend see it."""
    return hashlib.sha256(signed.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class ClaimResult:
    """The backend's answer to a claim, published on the device's ``enrolled`` topic (not
    retained) as ``{"claim": {...}}``: ``id`` names the claim, ``reason`` says why one was
    refused; a claimed one names the driver, the VIN and the assignment's start."""

    id: str
    status: str
    reason: str | None = None
    driver: str | None = None
    vin: str | None = None
    valid_from: int | None = None


def encode_claim_result(result: ClaimResult) -> bytes:
    if result.status not in CLAIM_STATUSES:
        raise ValueError(result.status)
    body = _dumps({"claim": {"id": result.id, "status": result.status, "reason": result.reason,
                             "driver": result.driver, "vin": result.vin, "from": result.valid_from}})
    if len(body) > MAX_CLAIM_RESULT_BYTES:
        raise ValueError(f"a claim result is at most {MAX_CLAIM_RESULT_BYTES} bytes")
    return body


def is_claim_result(body: bytes) -> bool:
    """Whether an ``enrolled`` message is a claim result rather than an enrolment answer."""
    return body.startswith(b'{"claim":')


def decode_claim_result(body: bytes) -> ClaimResult:
    if len(body) > MAX_CLAIM_RESULT_BYTES:
        raise BadFormat(f"claim result: larger than {MAX_CLAIM_RESULT_BYTES} bytes")
    outer = canonical.loads_object(body, "claim result", max_bytes=MAX_CLAIM_RESULT_BYTES, max_depth=2)
    canonical.check_members(outer, frozenset({"claim"}), "claim result")
    obj = outer["claim"]
    if not isinstance(obj, dict):
        raise BadFormat("claim result: claim must be an object")
    canonical.check_members(obj, _CLAIM_RESULT_MEMBERS, "claim result")
    cid, status, reason, driver, vin = obj["id"], obj["status"], obj["reason"], obj["driver"], obj["vin"]
    if not isinstance(cid, str) or not re.fullmatch(r"[0-9a-f]{64}", cid):
        raise BadFormat("claim result: id must be 64 hex characters")
    if status not in CLAIM_STATUSES:
        raise BadFormat(f"claim result: unknown status {status!r}")
    if reason is not None and (not isinstance(reason, str) or not _CLAIM_REASON.fullmatch(reason)):
        raise BadFormat("claim result: reason must be 1 to 40 of a-z and '_', or null")
    if driver is not None and (not isinstance(driver, str) or not _DRIVER.fullmatch(driver)):
        raise BadFormat("claim result: driver must be a driver id or null")
    if vin is not None and (not isinstance(vin, str) or not VIN_RE.fullmatch(vin)):
        raise BadFormat("claim result: vin must be a VIN or null")
    valid_from = _int(obj, "from", "claim result", nullable=True)
    return ClaimResult(cid, status, reason, driver, vin, valid_from)

"""Records: build, sign, verify and parse (docs/protocol.md §3).

A record is a compact JWS whose payload is canonical JSON with integers only.
Its id is the SHA-256 of the compact string; ``prev`` chains each record to the
one before it from the same device.
"""

from __future__ import annotations

import datetime
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from protocol import canonical, jws
from protocol.errors import BadFormat
from protocol.identity import DEV_RE, VIN_RE, SigningKey, VerifyKey

VERSION = 1
GENESIS = "0" * 64
KINDS = ("odometer", "trip", "confirmation", "event")
SOURCES = ("obd", "derived", "driver")
CLOCKS = ("synced", "unsynced")
MAX_INT = 2**53 - 1
#: Wall times (``t``, a trip's ``start_t`` and ``end_t``) are before 2100-01-01; a synced ``t``
#: is after 2000-01-01. An unsynced clock may say anything earlier (a Pi boots in 1970).
MIN_SYNCED_T = 946_684_800_000
MAX_T = 4_102_444_800_000
#: Odometer figures are below 10^10 m (ten million kilometres); speeds below 1000 km/h.
MAX_ODO_M = 10**10 - 1
MAX_KPH = 999

COMMON = ("v", "dev", "seq", "prev", "kind", "t", "clock", "boot", "mono_ms", "vin")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_WEEK = re.compile(r"[0-9]{4}-W(0[1-9]|[1-4][0-9]|5[0-3])")
_BOOT = re.compile(r"[A-Za-z0-9_-]{1,64}")
_EVENT = re.compile(r"[a-z][a-z0-9_]{0,63}")


def record_id(compact: str) -> str:
    """Lowercase hex SHA-256 of the ASCII compact JWS."""
    return hashlib.sha256(compact.encode("ascii")).hexdigest()


def iso_week(t_ms: int) -> str:
    """ISO week of a Unix-milliseconds time, e.g. ``2026-W47`` (UTC)."""
    day = datetime.datetime.fromtimestamp(t_ms // 1000, tz=datetime.UTC).date()
    year, week, _ = day.isocalendar()
    return f"{year:04d}-W{week:02d}"


@dataclass(frozen=True)
class Record:
    """A verified (or freshly signed) record and its parsed payload."""

    jws: str = field(repr=False)
    id: str
    dev: str
    seq: int
    prev: str
    kind: str
    t: int
    clock: str
    boot: str
    mono_ms: int
    vin: str | None
    fields: Mapping[str, Any]

    @property
    def odo_m(self) -> int | None:
        """The odometer value this record states, if any."""
        if self.kind == "trip":
            return int(self.fields["end_odo_m"])
        value = self.fields.get("odo_m")
        return int(value) if value is not None else None

    @property
    def payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "v": VERSION, "dev": self.dev, "seq": self.seq, "prev": self.prev,
            "kind": self.kind, "t": self.t, "clock": self.clock, "boot": self.boot,
            "mono_ms": self.mono_ms, "vin": self.vin,
        }
        out.update(self.fields)
        return out


def _int(p: Mapping[str, Any], name: str, *, minimum: int = 0, maximum: int = MAX_INT,
         nullable: bool = False) -> None:
    value = p.get(name)
    if value is None and nullable and name in p:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadFormat(f"{name}: must be an integer" + (" or null" if nullable else ""))
    if not minimum <= value <= maximum:
        raise BadFormat(f"{name}: {value} out of range ({minimum} to {maximum})")


def _choice(p: Mapping[str, Any], name: str, allowed: tuple[str, ...]) -> None:
    if p.get(name) not in allowed:
        raise BadFormat(f"{name}: must be one of {', '.join(allowed)}, got {p.get(name)!r}")


def _match(p: Mapping[str, Any], name: str, pattern: re.Pattern[str], *, nullable: bool = False) -> None:
    value = p.get(name)
    if value is None and nullable and name in p:
        return
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise BadFormat(f"{name}: malformed value {value!r}")


_KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "odometer": ("odo_m", "src"),
    "trip": ("start_t", "end_t", "start_odo_m", "end_odo_m", "max_kph", "src"),
    "confirmation": ("odo_m", "device_odo_m", "week"),
    "event": ("event", "detail"),
}


def validate(p: Mapping[str, Any]) -> None:
    """Check a payload's fields; raise :class:`BadFormat` naming the first fault."""
    for name in COMMON:
        if name not in p:
            raise BadFormat(f"{name}: missing")
    if p["v"] != VERSION or isinstance(p["v"], bool):
        raise BadFormat(f"v: unsupported version {p['v']!r}")
    _match(p, "dev", DEV_RE)
    _int(p, "seq", minimum=1)
    _match(p, "prev", _HEX64)
    if p["seq"] == 1 and p["prev"] != GENESIS:
        raise BadFormat("prev: must be 64 zeros for seq 1")
    _choice(p, "kind", KINDS)
    _choice(p, "clock", CLOCKS)
    _int(p, "t", minimum=MIN_SYNCED_T if p["clock"] == "synced" else 0, maximum=MAX_T)
    _match(p, "boot", _BOOT)
    _int(p, "mono_ms")
    _match(p, "vin", VIN_RE, nullable=True)
    kind = p["kind"]
    allowed = set(COMMON) | set(_KIND_FIELDS[kind])
    extra = sorted(set(p) - allowed)
    if extra:
        raise BadFormat(f"{kind} record: unexpected fields {', '.join(extra)}")
    for name in _KIND_FIELDS[kind]:
        if name not in p:
            raise BadFormat(f"{name}: missing for a {kind} record")
    if kind == "odometer":
        _int(p, "odo_m", maximum=MAX_ODO_M)
        _choice(p, "src", SOURCES)
    elif kind == "trip":
        for name in ("start_t", "end_t"):
            _int(p, name, maximum=MAX_T)
        for name in ("start_odo_m", "end_odo_m"):
            _int(p, name, maximum=MAX_ODO_M)
        _int(p, "max_kph", maximum=MAX_KPH)
        _choice(p, "src", SOURCES)
        if p["end_t"] < p["start_t"]:
            raise BadFormat("end_t: before start_t")
        if p["end_odo_m"] < p["start_odo_m"]:
            raise BadFormat("end_odo_m: below start_odo_m")
    elif kind == "confirmation":
        _int(p, "odo_m", maximum=MAX_ODO_M)
        _int(p, "device_odo_m", maximum=MAX_ODO_M, nullable=True)
        _match(p, "week", _WEEK)
    else:
        _match(p, "event", _EVENT)
        canonical.dumps({"detail": p["detail"]})


def _from_payload(compact: str, p: Mapping[str, Any]) -> Record:
    extra = {k: v for k, v in p.items() if k not in COMMON}
    return Record(
        jws=compact, id=record_id(compact), dev=p["dev"], seq=p["seq"], prev=p["prev"],
        kind=p["kind"], t=p["t"], clock=p["clock"], boot=p["boot"], mono_ms=p["mono_ms"],
        vin=p["vin"], fields=MappingProxyType(extra),
    )


def sign(key: SigningKey, payload: Mapping[str, Any]) -> Record:
    """Validate, encode canonically and sign a payload; return the record."""
    body = {"v": VERSION, **payload}
    validate(body)
    if body["dev"] != key.public.id:
        raise BadFormat("dev: does not match the signing key")
    compact = jws.sign(canonical.dumps(body), key, body["dev"])
    return _from_payload(compact, body)


def open_unverified(compact: str | bytes) -> jws.Compact:
    """Split a record's JWS; the caller looks up the key by ``kid`` and verifies."""
    parts = jws.split(compact)
    if not DEV_RE.fullmatch(parts.kid):
        raise BadFormat(f"jws header: kid {parts.kid!r} is not a device id")
    return parts


def read_payload(parts: jws.Compact) -> dict[str, Any]:
    """Parse and validate a record's payload, the signature not yet checked: to refuse a
    malformed record before its key is looked up. Raises :class:`BadFormat`."""
    payload = canonical.loads_object(parts.payload)
    validate(payload)
    if payload["dev"] != parts.kid:
        raise BadFormat("dev: differs from the header's kid")
    return payload


def verify(compact: str | bytes | jws.Compact, key: VerifyKey, *,
           payload: Mapping[str, Any] | None = None) -> Record:
    """Verify the signature over the bytes, then parse and validate the payload. ``payload``
    is what :func:`read_payload` read from these same bytes, when the caller has it: the
    signature is checked over the bytes it was read from, and they are not read again.

    Raises :class:`BadSignature` or :class:`BadFormat`.
    """
    parts = compact if isinstance(compact, jws.Compact) else open_unverified(compact)
    if key.id != parts.kid:
        raise BadFormat("jws header: kid does not match the key")
    jws.verify(parts, key)
    return _from_payload(parts.text, read_payload(parts) if payload is None else payload)


def assemble(compact: str, payload: Mapping[str, Any]) -> Record:
    """What :func:`verify` returns once the signature has verified, for a caller that checked it
    itself (a batch of signatures in other processes): ``payload`` is what :func:`read_payload`
    read from ``compact``."""
    return _from_payload(compact, payload)


def peek_seq(compact: str | bytes) -> int | None:
    """The payload's ``seq`` without verifying anything, for error reports only."""
    try:
        payload = canonical.loads_object(jws.split(compact).payload)
    except Exception:  # noqa: BLE001 - a best-effort read of a rejected record
        return None
    seq = payload.get("seq")
    if isinstance(seq, int) and not isinstance(seq, bool) and 1 <= seq <= MAX_INT:
        return seq
    return None

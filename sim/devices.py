"""Simulated devices that sign real records, and a rules file: fixtures for the backend's
tests and for the benchmarks.

A :class:`Dongle` holds a device's key and the head of its chain; each call signs the next
record (seq and prev follow on, time moves forward). :func:`batch` makes the body of a records
message, :func:`enroll` approves a device in a database, :func:`write_rules` writes
:data:`RULES` (the rules the figures in the tests are computed against)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol import canonical, jws, messages, records
from protocol.identity import SigningKey
from protocol.records import GENESIS, Record

if TYPE_CHECKING:
    from backend.db import Database
    from backend.ledger.rules import Rules

T0 = 1_790_000_000_000            # 2026-09-21, a Monday
VIN = "WVWZZZ1JZXW000001"
OTHER_VIN = "WBA00000000000002"
FLEET_TOKEN = "fleet-token-for-tests"

RULES = """\
version = "test-2026"
max_speed_kph = 250
# The simulated devices sign from T0 (2026-09-21) on, whatever today is: every period earns.
reward_backfill_days = 36500

[[rule]]
id = "weekly-confirmation"
on = "confirmation"
per = "week"
milli_tokens = 10000
tolerance_m = 2000

[[rule]]
id = "distance"
on = "trip"
milli_tokens_per_km = 10
cap_milli_tokens_per_week = 5000

[[catalogue]]
item = "tyre-voucher"
milli_tokens = 5000

[[catalogue]]
item = "car-wash"
milli_tokens = 1000
"""


def write_rules(directory: Path) -> Path:
    """:data:`RULES` as ``directory/rules.toml``."""
    path = directory / "rules.toml"
    path.write_text(RULES)
    return path


def load_test_rules(directory: Path) -> Rules:
    """:data:`RULES`, written to ``directory`` and loaded as the backend loads a rules file."""
    from backend.ledger.rules import load_rules

    return load_rules(write_rules(directory))


_vins = itertools.count(1)


def fresh_vin() -> str:
    """A VIN of its own for each simulated car (a vehicle has one active device)."""
    return f"WVWZZZ1JZ{next(_vins):08d}"


@dataclass
class Dongle:
    """A device that signs a chain of records: seq and prev follow on, time moves forward."""

    key: SigningKey = field(default_factory=SigningKey.generate)
    vin: str | None = field(default_factory=fresh_vin)      # a car of its own
    seq: int = 0
    head: str = GENESIS
    t: int = T0
    mono: int = 10_000
    boot: str = "boot-1"
    odo_m: int = 50_000_000

    @property
    def dev(self) -> str:
        return self.key.public.id

    def payload(self, kind: str, fields: dict[str, Any], *, dt_ms: int = 60_000, clock: str = "synced",
                seq: int | None = None, prev: str | None = None, vin: Any = "default") -> dict[str, Any]:
        self.t += dt_ms
        self.mono += dt_ms
        return {"dev": self.dev, "seq": self.seq + 1 if seq is None else seq,
                "prev": self.head if prev is None else prev, "kind": kind, "t": self.t, "clock": clock,
                "boot": self.boot, "mono_ms": self.mono, "vin": self.vin if vin == "default" else vin,
                **fields}

    def sign(self, payload: dict[str, Any], *, advance: bool = True) -> Record:
        record = records.sign(self.key, payload)
        if advance:
            self.seq, self.head = record.seq, record.id
        return record

    def odometer(self, km: float = 1.0, *, src: str = "obd", **kw: Any) -> Record:
        """The next odometer reading, ``km`` further on (negative: a rollback)."""
        advance = kw.pop("advance", True)
        odo = self.odo_m + int(km * 1000)
        record = self.sign(self.payload("odometer", {"odo_m": odo, "src": src}, **kw), advance=advance)
        if advance:
            self.odo_m = odo
        return record

    def confirmation(self, week: str, *, odo_m: int | None = None, **kw: Any) -> Record:
        fields = {"odo_m": self.odo_m if odo_m is None else odo_m, "device_odo_m": self.odo_m, "week": week}
        return self.sign(self.payload("confirmation", fields, **kw))

    def trip(self, km: float, minutes: int = 30, **kw: Any) -> Record:
        start_t, start_odo = self.t, self.odo_m
        self.odo_m += int(km * 1000)
        fields = {"start_t": start_t, "end_t": start_t + minutes * 60_000, "start_odo_m": start_odo,
                  "end_odo_m": self.odo_m, "max_kph": 90, "src": "obd"}
        return self.sign(self.payload("trip", fields, dt_ms=minutes * 60_000, **kw))

    def forged(self, payload: dict[str, Any], by: SigningKey) -> str:
        """A record claiming to be this device's, signed with another key."""
        return jws.sign(canonical.dumps({"v": 1, **payload}), by, self.dev)

    def enrollment(self, t: int = T0) -> str:
        """The device's signed enrolment (a compact JWS, no token in it)."""
        return messages.sign_enrollment(self.key, self.vin, t)

    def enroll_message(self, token: str | None = FLEET_TOKEN, t: int = T0) -> bytes:
        """The ``enroll`` message: the signed enrolment, ``token`` beside it."""
        return messages.encode_enroll(self.enrollment(t), token)


def batch(*items: Record | str, **extra: Any) -> bytes:
    """A records message of ``items`` (records or raw JWS texts), with ``extra`` top-level keys."""
    texts = [i.jws if isinstance(i, Record) else i for i in items]
    if not extra:
        return messages.encode_batch(texts)
    import json

    return json.dumps({"records": texts, **extra}).encode()


def enroll(db: Database, device: Dongle, *, approved: bool = True, now_ms: int = T0) -> None:
    """Enrol ``device`` in ``db`` as the backend would: with the fleet token (approved) or without
    (pending)."""
    from backend.records import enrollment

    answer = enrollment.handle(db, device.dev, device.enroll_message(FLEET_TOKEN if approved else None),
                               now_ms, FLEET_TOKEN)
    expected = "approved" if approved else "pending"
    if answer.status != expected:
        raise RuntimeError(f"enrolling {device.dev}: {answer} (expected {expected})")

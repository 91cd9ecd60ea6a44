"""Verification decisions (docs/protocol.md §5), as pure functions over values.

Two steps, in this order for every record of a batch:

1. :func:`parse` and :func:`authenticate`: is it a well-formed record, from an approved device,
   published on that device's own topic, with a good signature? If not, a :class:`Refusal`
   (``bad_format``, ``unknown_device``, ``revoked_device``, ``dev_mismatch``, ``bad_signature``)
   that never takes the record's seq.
2. :func:`decide`: what to do with an authenticated record, given the device's chain
   (:class:`Chain`): a no-op replay, a ``fork``, a gap, a ``vin_mismatch`` hold, or the next seq,
   accepted or rejected as evidence (``chain_break``, ``clock_ahead``, ``odometer_rollback``,
   ``implausible_distance``, ``trip_mismatch``).

The odometer is judged per *vehicle*: a reading below the highest one accepted for its VIN from
any device is a rollback, and a trip must agree with the vehicle's readings around it.

:func:`estimate_time` gives a best wall-clock time for records signed with an unsynced clock.
Nothing here touches a database, a clock or a socket; :mod:`backend.records.store` does.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from backend.ledger.rules import DEFAULT_MAX_CLOCK_AHEAD_MS, DEFAULT_ROLLBACK_TOLERANCE_M
from protocol import jws, records
from protocol.errors import BadFormat, BadSignature
from protocol.identity import VerifyKey
from protocol.records import GENESIS, Record

#: Odometer figures that are not the car's own (``derived`` from speed, or typed by a driver)
#: may fall back by this much without being a rollback: a driver's confirmation corrects a
#: derived figure that ran ahead of the dashboard.
NON_OBD_SLACK_M = 2_000
#: Distance allowed on top of ``max_speed_kph × elapsed time`` (odometer resolution).
PLAUSIBILITY_SLACK_M = 1_000
#: Earlier wall times are an unset clock (a Raspberry Pi without RTC starts at 1970).
MIN_WALL_MS = 1_577_836_800_000          # 2020-01-01T00:00:00Z

Outcome = Literal["accept", "reject", "duplicate", "fork", "gap", "hold"]


@dataclass(frozen=True)
class Refusal:
    """A record that does not take its seq; ``seq`` only when it could be read."""

    seq: int | None
    reason: str
    detail: str


@dataclass(frozen=True)
class DeviceKey:
    """What authentication needs to know of the device named by a record's ``kid``."""

    status: str                 # pending | approved | revoked | rejected
    pub: bytes

    @functools.cached_property
    def key(self) -> VerifyKey:
        """The public key, made once for all the records of a batch."""
        return VerifyKey(self.pub)


@dataclass(frozen=True)
class Parsed:
    """A record whose form is right; its signature is not checked yet."""

    parts: jws.Compact
    payload: Mapping[str, Any] = field(repr=False)     # read from parts.payload, validated

    @property
    def seq(self) -> int:
        return int(self.payload["seq"])

    @property
    def kid(self) -> str:
        return self.parts.kid


def parse(item: object) -> Parsed | Refusal:
    """Check the record's form without any key: JWS structure and payload fields."""
    if not isinstance(item, str):
        return Refusal(None, "bad_format", "a record must be a JWS string")
    try:
        parts = records.open_unverified(item)
        payload = records.read_payload(parts)
    except BadFormat as exc:
        return Refusal(records.peek_seq(item), "bad_format", str(exc))
    return Parsed(parts, payload)


def authenticate(topic_dev: str, parsed: Parsed, device: DeviceKey | None) -> Record | Refusal:
    """Decide whether ``parsed`` comes from an approved device on its own topic."""
    seq, kid = parsed.seq, parsed.kid
    if device is None or device.status == "pending":
        return Refusal(seq, "unknown_device", f"no approved device {kid}")
    if device.status != "approved":
        return Refusal(seq, "revoked_device", f"device {kid} is {device.status}")
    if kid != topic_dev:
        return Refusal(seq, "dev_mismatch", f"record of {kid} published on {topic_dev}'s topic")
    try:
        return records.verify(parsed.parts, device.key, payload=parsed.payload)
    except BadSignature as exc:
        return Refusal(seq, "bad_signature", str(exc))
    except BadFormat as exc:
        return Refusal(seq, "bad_format", str(exc))


# -- the chain -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reading:
    """An accepted record's odometer figure and when it was taken."""

    odo_m: int
    src: str | None
    t: int
    clock: str
    boot: str
    mono_ms: int

    @classmethod
    def of(cls, record: Record) -> Reading | None:
        odo = record.odo_m
        if odo is None:
            return None
        return cls(odo, source_of(record), record.t, record.clock, record.boot, record.mono_ms)


@dataclass(frozen=True)
class Stored:
    """What is stored at a seq that is already taken."""

    id: str
    status: str
    reason: str | None


@dataclass(frozen=True)
class VehicleTop:
    """The highest odometer reading accepted for a vehicle, from any of its devices."""

    odo_m: int
    src: str | None
    dev: str
    seq: int = 0


@dataclass(frozen=True)
class TripContext:
    """What the vehicle's accepted readings say about a trip's time: the highest reading taken
    before it started (``before_m``), and the lowest and highest taken during it."""

    before_m: int | None
    during_min_m: int | None
    during_max_m: int | None


@dataclass(frozen=True)
class Limits:
    """The rules file's verification settings, and when the backend received the record."""

    max_speed_kph: int
    received_ms: int
    max_clock_ahead_ms: int = DEFAULT_MAX_CLOCK_AHEAD_MS
    rollback_tolerance_m: int = DEFAULT_ROLLBACK_TOLERANCE_M


@dataclass(frozen=True)
class Chain:
    """A device's state before the next record: ``through`` and its ``head_id``, the approved
    VIN, the device's last accepted odometer reading of the vehicle the record names, that
    vehicle's highest reading from any device, and (for a trip) what its readings say."""

    through: int
    head_id: str
    vin: str | None
    last: Reading | None
    limits: Limits
    vehicle_top: VehicleTop | None = None
    trip: TripContext | None = None


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: str | None = None
    detail: str = ""

    @property
    def takes_seq(self) -> bool:
        return self.outcome in ("accept", "reject")


def source(kind: str, src: object) -> str | None:
    """Where an odometer figure comes from: a record's ``src``, or the driver for a confirmation."""
    if isinstance(src, str):
        return src
    return "driver" if kind == "confirmation" else None


def source_of(record: Record) -> str | None:
    return source(record.kind, record.fields.get("src"))


def elapsed_ms(before: Reading, record: Record) -> int | None:
    """Time between two readings: monotonic within one boot, wall time when both clocks were
    synced, else unknown (an unsynced clock says nothing across boots)."""
    if before.boot == record.boot:
        return max(record.mono_ms - before.mono_ms, 0)
    if before.clock == "synced" and record.clock == "synced":
        return max(record.t - before.t, 0)
    return None


def decide(record: Record, chain: Chain, stored: Stored | None) -> Decision:
    """What to do with an authenticated record of the device whose chain is ``chain``."""
    if record.seq <= chain.through:
        if stored is not None and stored.id == record.id:
            return Decision("duplicate", stored.reason)
        return Decision("fork", "fork", f"seq {record.seq} is already taken by another record")
    if record.seq > chain.through + 1:
        return Decision("gap", None, f"expected seq {chain.through + 1}")
    if record.vin is not None and chain.vin is not None and record.vin != chain.vin:
        return Decision("hold", "vin_mismatch", f"record reads VIN {record.vin}, approved for {chain.vin}")
    head = chain.head_id if chain.through else GENESIS
    if record.prev != head:
        return Decision("reject", "chain_break", f"prev {record.prev[:16]}… is not the head {head[:16]}…")
    limits = chain.limits
    latest = max(record.t, int(record.fields["end_t"])) if record.kind == "trip" else record.t
    if latest > limits.received_ms + limits.max_clock_ahead_ms:
        return Decision("reject", "clock_ahead", f"dated {latest - limits.received_ms} ms after its receipt "
                        f"(at most {limits.max_clock_ahead_ms})")
    odo = record.odo_m
    if odo is None:
        return Decision("accept")
    top = chain.vehicle_top
    if top is not None:
        obd = source_of(record) == "obd" and top.src == "obd"
        slack = limits.rollback_tolerance_m if obd else max(limits.rollback_tolerance_m, NON_OBD_SLACK_M)
        if odo < top.odo_m - slack:
            return Decision("reject", "odometer_rollback",
                            f"odo_m {odo} below the vehicle's highest accepted {top.odo_m} "
                            f"(device {top.dev})")
    if record.kind == "trip" and chain.trip is not None:
        mismatch = trip_mismatch(record, chain.trip, limits.rollback_tolerance_m)
        if mismatch:
            return Decision("reject", "trip_mismatch", mismatch)
    last = chain.last
    if last is None:
        return Decision("accept")
    slack = 0 if source_of(record) == "obd" and last.src == "obd" else NON_OBD_SLACK_M
    if odo < last.odo_m - slack:
        return Decision("reject", "odometer_rollback", f"odo_m {odo} below the last accepted {last.odo_m}")
    gone = odo - last.odo_m
    elapsed = elapsed_ms(last, record)
    if gone > PLAUSIBILITY_SLACK_M and elapsed is not None:
        if gone * 3600 > limits.max_speed_kph * elapsed + PLAUSIBILITY_SLACK_M * 3600:
            return Decision("reject", "implausible_distance",
                            f"{gone} m in {elapsed} ms is faster than {limits.max_speed_kph} km/h")
    return Decision("accept")


def trip_mismatch(record: Record, ctx: TripContext, tolerance_m: int) -> str:
    """Why a trip disagrees with the vehicle's readings around it, or "" when it agrees: it may
    not start below the highest reading taken before it, and every reading taken during it lies
    between its start and its end."""
    start, end = int(record.fields["start_odo_m"]), int(record.fields["end_odo_m"])
    if ctx.before_m is not None and start < ctx.before_m - tolerance_m:
        return f"starts at {start} m, below the vehicle's {ctx.before_m} m before the trip"
    if ctx.during_min_m is not None and ctx.during_min_m < start - tolerance_m:
        return f"starts at {start} m, above the vehicle's {ctx.during_min_m} m during the trip"
    if ctx.during_max_m is not None and ctx.during_max_m > end + tolerance_m:
        return f"ends at {end} m, below the vehicle's {ctx.during_max_m} m during the trip"
    return ""


# -- time ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Anchor:
    """A synced record of the same boot: its wall time and its monotonic time."""

    t: int
    mono_ms: int


def estimate_time(record: Record, anchors: Sequence[Anchor], arrival_ms: int,
                  device_mono_ms: int | None = None) -> int:
    """Best wall-clock time of ``record``, never before 2020 nor after its arrival when the
    clock was unsynced.

    A synced clock's ``t`` stands. Otherwise, from the nearest synced record of the same boot
    (``anchor.t + record.mono_ms - anchor.mono_ms``); else from the arrival time and the
    device's current monotonic time in that boot, when the batch tells it; else the arrival.
    """
    if record.clock == "synced" and record.t >= MIN_WALL_MS:
        return record.t
    estimate: int | None = None
    if anchors:
        nearest = min(anchors, key=lambda a: abs(record.mono_ms - a.mono_ms))
        estimate = nearest.t + record.mono_ms - nearest.mono_ms
    elif device_mono_ms is not None and device_mono_ms >= record.mono_ms:
        estimate = arrival_ms - (device_mono_ms - record.mono_ms)
    if estimate is None or estimate < MIN_WALL_MS:
        return arrival_ms
    return min(estimate, arrival_ms)

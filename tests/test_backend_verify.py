"""Unit tests of the verification decisions (pure: no database)."""

from __future__ import annotations

import pytest

from backend.records.verify import (
    MIN_WALL_MS,
    Anchor,
    Chain,
    Decision,
    DeviceKey,
    Limits,
    Reading,
    Refusal,
    Stored,
    authenticate,
    decide,
    estimate_time,
    parse,
)
from protocol import BadFormat, canonical, jws
from protocol.identity import SigningKey
from protocol.records import GENESIS, Record
from sim.devices import OTHER_VIN, T0, Dongle

LIMITS = Limits(250, received_ms=T0 + 365 * 86_400_000)


def _chain(d: Dongle, *, through: int | None = None, last: Reading | None = None,
           vin: str | None = "dongle's") -> Chain:
    return Chain(d.seq if through is None else through, d.head, d.vin if vin == "dongle's" else vin, last,
                 LIMITS)


def _reading(odo_m: int, *, src: str = "obd", t: int = T0, boot: str = "boot-1", mono: int = 10_000,
             clock: str = "synced") -> Reading:
    return Reading(odo_m, src, t, clock, boot, mono)


def test_parse_names_bad_format_with_seq_when_readable() -> None:
    d = Dongle()
    good = d.odometer(1)
    assert not isinstance(parse(good.jws), Refusal)
    assert parse(123) == Refusal(None, "bad_format", "a record must be a JWS string")
    broken = parse("a.b")
    assert isinstance(broken, Refusal) and broken.reason == "bad_format" and broken.seq is None
    raw = canonical.dumps({"v": 1, **d.payload("odometer", {"odo_m": 1, "src": "obd"}, seq=7)})
    refusal = parse(jws.sign(raw.replace(b'"odo_m":1', b'"odo_m":1.5'), d.key, d.dev))
    assert isinstance(refusal, Refusal) and refusal.reason == "bad_format" and "float" in refusal.detail
    extra = canonical.dumps({"v": 1, **d.payload("odometer", {"odo_m": 1, "src": "obd", "x": 1}, seq=7)})
    expected = Refusal(7, "bad_format", "odometer record: unexpected fields x")
    assert parse(jws.sign(extra, d.key, d.dev)) == expected


def _reason(result: Record | Refusal) -> str:
    return result.reason if isinstance(result, Refusal) else "accepted"


def test_authenticate_in_the_documented_order() -> None:
    d, other = Dongle(), Dongle()
    parts = parse(d.odometer(1).jws)
    assert not isinstance(parts, Refusal)
    pub = d.key.public.raw
    assert _reason(authenticate(d.dev, parts, DeviceKey("approved", pub))) == "accepted"
    assert _reason(authenticate(d.dev, parts, None)) == "unknown_device"
    assert _reason(authenticate(d.dev, parts, DeviceKey("pending", pub))) == "unknown_device"
    assert _reason(authenticate(d.dev, parts, DeviceKey("revoked", pub))) == "revoked_device"
    # revoked comes before the wrong topic, and the topic before the signature
    assert _reason(authenticate(other.dev, parts, DeviceKey("revoked", pub))) == "revoked_device"
    assert _reason(authenticate(other.dev, parts, DeviceKey("approved", pub))) == "dev_mismatch"
    forged = parse(d.forged(d.payload("odometer", {"odo_m": 1, "src": "obd"}, seq=2), SigningKey.generate()))
    assert not isinstance(forged, Refusal)
    assert _reason(authenticate(other.dev, forged, DeviceKey("approved", pub))) == "dev_mismatch"
    assert authenticate(d.dev, forged, DeviceKey("approved", pub)) == Refusal(
        2, "bad_signature", "signature does not verify")


def test_decide_next_seq() -> None:
    d = Dongle()
    rec = d.odometer(1, advance=False)
    assert decide(rec, _chain(d), None) == Decision("accept")
    d.seq, d.head = 1, "cd" * 32
    assert decide(d.odometer(1, advance=False), _chain(d, through=0), None).outcome == "gap"


def test_decide_replay_and_fork() -> None:
    d = Dongle()
    rec = d.odometer(1)
    chain = _chain(d)
    assert decide(rec, chain, Stored(rec.id, "accepted", None)) == Decision("duplicate", None)
    replayed = decide(rec, chain, Stored(rec.id, "rejected", "chain_break"))
    assert replayed == Decision("duplicate", "chain_break")
    assert decide(rec, chain, Stored("ee" * 32, "accepted", None)).reason == "fork"


def test_decide_vin_mismatch_holds_only_when_both_vins_are_known() -> None:
    d = Dongle()
    moved = d.odometer(1, vin=OTHER_VIN, advance=False)
    held = decide(moved, _chain(d), None)
    assert (held.outcome, held.reason, held.takes_seq) == ("hold", "vin_mismatch", False)
    assert decide(moved, _chain(d, vin=None), None).outcome == "accept"
    assert decide(d.odometer(1, vin=None, advance=False), _chain(d), None).outcome == "accept"


def test_decide_chain_break() -> None:
    d = Dongle()
    d.odometer(1)
    bad = d.sign(d.payload("odometer", {"odo_m": d.odo_m, "src": "obd"}, prev="ab" * 32), advance=False)
    decision = decide(bad, _chain(d), None)
    assert (decision.outcome, decision.reason, decision.takes_seq) == ("reject", "chain_break", True)
    first = Dongle().odometer(1)
    assert first.prev == GENESIS
    assert decide(first, Chain(0, "", first.vin, None, LIMITS), None).outcome == "accept"


def test_decide_rollback_with_slack_for_figures_not_from_the_car() -> None:
    d = Dongle()
    last = _reading(d.odo_m)
    assert decide(d.odometer(-0.001, advance=False), _chain(d, last=last), None).reason == "odometer_rollback"
    derived = d.odometer(-1.9, src="derived", advance=False)
    assert decide(derived, _chain(d, last=last), None).outcome == "accept"
    assert decide(d.odometer(-2.1, src="derived", advance=False), _chain(d, last=last), None).reason == (
        "odometer_rollback")
    typed = d.confirmation("2026-W39", odo_m=d.odo_m - 1500)
    assert decide(typed, _chain(d, through=d.seq - 1, last=last), None).outcome == "accept"


def _before(record: Record, odo_m: int, *, ms: int = 60_000, wall_ms: int | None = None,
            boot: str = "boot-1", clock: str = "synced") -> Reading:
    """The last accepted reading, ``ms`` of monotonic time (``wall_ms`` of wall time) earlier."""
    return _reading(odo_m, t=record.t - (ms if wall_ms is None else wall_ms), mono=record.mono_ms - ms,
                    boot=boot, clock=clock)


def test_decide_speed_uses_mono_within_a_boot_and_synced_time_across_boots() -> None:
    d = Dongle()
    start = d.odo_m

    def judge(km: float, last: Reading | None = None, **kw: object) -> str | None:
        rec = d.odometer(km, advance=False)
        return decide(rec, _chain(d, last=last or _before(rec, start, **kw)), None).reason  # type: ignore[arg-type]

    # 4 km in 60 s is 240 km/h, allowed at 250; 5.2 km is 312 km/h (1 km of slack for resolution)
    assert judge(4) is None
    assert judge(5.2) == "implausible_distance"
    # the wall clock jumped an hour, but the monotonic clock says one minute: still too fast
    assert judge(50, wall_ms=3_600_000) == "implausible_distance"
    # another boot: synced wall times decide
    assert judge(50, wall_ms=3_600_000, ms=10**9, boot="boot-0") is None
    assert judge(50, wall_ms=60_000, ms=10**9, boot="boot-0") == "implausible_distance"
    # another boot and an unsynced clock: nothing to judge by
    assert judge(50, wall_ms=60_000, ms=10**9, boot="boot-0", clock="unsynced") is None


def test_estimate_time() -> None:
    d = Dongle()
    synced = d.odometer(1)
    assert estimate_time(synced, [], T0 + 10**9) == synced.t
    d.t = 0
    unsynced = d.odometer(1, clock="unsynced", dt_ms=5_000)
    arrival = T0 + 10**9
    assert estimate_time(unsynced, [Anchor(T0, unsynced.mono_ms - 5_000)], arrival) == T0 + 5_000
    nearest = [Anchor(T0, unsynced.mono_ms - 50_000), Anchor(T0 + 100_000, unsynced.mono_ms + 1_000)]
    assert estimate_time(unsynced, nearest, arrival) == T0 + 99_000
    assert estimate_time(unsynced, [], arrival, unsynced.mono_ms + 7_000) == arrival - 7_000
    assert estimate_time(unsynced, [], arrival) == arrival
    # never later than the arrival, never before 2020
    assert estimate_time(unsynced, [Anchor(arrival, unsynced.mono_ms - 60_000)], arrival) == arrival
    assert estimate_time(unsynced, [Anchor(5, unsynced.mono_ms)], arrival) == arrival
    assert MIN_WALL_MS < T0
    # a "synced" clock that says 1970 cannot even be signed: the record format bounds it
    d.t = 0
    with pytest.raises(BadFormat, match="t: 1 out of range"):
        d.odometer(1, dt_ms=1)

"""The vehicle is the unit of truth: time bounded by receipt, one odometer per VIN across its
dongles, one rewarding dongle per vehicle, trips that agree with the chain, rewards that
cannot be farmed (through the store's own entry point, on SQLite and PostgreSQL)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from backend.db import Database
from backend.errors import DeviceInputError
from backend.ledger import audit
from backend.records import devices, store
from protocol.messages import Ack
from protocol.records import iso_week
from sim.devices import FLEET_TOKEN, T0, Dongle, batch, enroll

DAY = 86_400_000
WEEK = 7 * DAY
NOW = T0 + DAY


def send(db: Database, rules: Any, d: Dongle, *recs: Any, now: int = NOW) -> Ack:
    return store.process_batch(db, rules, d.dev, batch(*recs), now).ack


def reasons(ack: Ack) -> list[str]:
    return [r.reason for r in ack.rejected]


def rewards_of(db: Database) -> list[str]:
    return [r["key"] for r in db.query("SELECT key FROM transfers WHERE key LIKE 'reward:%' ORDER BY key")]


def test_records_dated_ahead_of_their_receipt_are_clock_ahead_and_earn_nothing(db: Database,
                                                                               rules: Any) -> None:
    d = Dongle()
    enroll(db, d)
    future = [d.confirmation(iso_week(d.t + w * WEEK), dt_ms=WEEK) for w in range(1, 53)]
    ack = send(db, rules, d, *future)
    assert ack.through == 52 and set(reasons(ack)) == {"clock_ahead"} and len(ack.rejected) == 52
    assert rewards_of(db) == [] and ack.balance == 0
    # a little ahead (within max_clock_ahead_ms, 10 minutes by default) is a clock's drift: fine
    d.t = NOW + 5 * 60_000 - 60_000
    ack = send(db, rules, d, d.odometer(1))
    assert ack.through == 53 and ack.rejected == ()


def test_a_second_dongle_below_the_vehicles_odometer_is_a_rollback_and_is_held(db: Database,
                                                                               rules: Any) -> None:
    first = Dongle()
    enroll(db, first)
    assert send(db, rules, first, first.odometer(2)).through == 1          # the car stands at 50,002 km
    second = Dongle(vin=first.vin, odo_m=1_000_000)                # 1,000 km: another car's figure
    # a fleet token does not approve a second dongle of an active vehicle: it waits
    enroll(db, second, approved=False)
    with pytest.raises(DeviceInputError, match=first.dev):
        devices.approve(db, second.dev, NOW, "test")
    devices.approve(db, second.dev, NOW, "test", replace=True)
    assert devices.get_device(db, first.dev)["status"] == "retired"
    ack = send(db, rules, second, second.odometer(1))
    assert reasons(ack) == ["odometer_rollback"] and ack.through == 1      # taken, as evidence
    held = devices.get_device(db, second.dev)
    assert held["held_since"] == NOW and "odometer_rollback" in held["held_reason"]
    # the retired dongle's new records are refused; its history stays
    assert reasons(send(db, rules, first, first.odometer(1))) == ["revoked_device"]
    assert db.one("SELECT COUNT(*) AS n FROM records WHERE dev = ?", (first.dev,)) == {"n": 1}


def test_two_dongles_in_one_car_never_earn_the_same_week_twice(db: Database, rules: Any) -> None:
    first = Dongle()
    enroll(db, first)
    week = iso_week(first.t + 60_000)
    assert send(db, rules, first, first.odometer(1), first.confirmation(week)).balance == 10_000
    second = Dongle(vin=first.vin, odo_m=first.odo_m, t=first.t)
    enroll(db, second, approved=False)
    devices.approve(db, second.dev, NOW, "test", replace=True)
    ack = send(db, rules, second, second.odometer(1), second.confirmation(week), now=NOW + 1)
    assert ack.rejected == () and ack.through == 2
    assert rewards_of(db) == [f"reward:weekly-confirmation:{first.vin}:{week}"]
    assert audit.audit(db, rules) == []


def test_a_trip_that_disagrees_with_the_chain_is_trip_mismatch_and_earns_nothing(db: Database,
                                                                                 rules: Any) -> None:
    d = Dongle()
    enroll(db, d)
    assert send(db, rules, d, d.odometer(1)).through == 1                   # the car is at 50,001 km
    fields = {"start_t": d.t, "end_t": d.t + 30 * 60_000, "start_odo_m": 0, "end_odo_m": d.odo_m + 20_000,
              "max_kph": 90, "src": "obd"}
    bogus = d.sign(d.payload("trip", fields, dt_ms=30 * 60_000))
    ack = send(db, rules, d, bogus)
    assert reasons(ack) == ["trip_mismatch"] and ack.through == 2
    assert rewards_of(db) == []
    # a trip that continues from the chain earns for the distance the chain shows
    honest = d.trip(12.5)
    ack = send(db, rules, d, honest)
    assert ack.rejected == () and rewards_of(db) == [f"reward:distance:{d.vin}:{honest.id}"]
    assert ack.balance == 125                                               # 12.5 km × 10 milli-tokens


def test_rewards_start_from_the_backfill_before_approval(db: Database, rules: Any) -> None:
    rules = dataclasses.replace(rules, reward_backfill_days=35)
    d = Dongle(t=T0 - 60 * DAY)                                             # claims readings from 60 days ago
    enroll(db, d, now_ms=T0)
    old = d.confirmation(iso_week(d.t + 60_000))
    d.t = T0 - 10 * DAY                                                     # offline for a while: still earns
    recent = d.confirmation(iso_week(d.t + 60_000))
    ack = send(db, rules, d, old, recent)
    assert ack.rejected == () and ack.through == 2
    assert rewards_of(db) == [f"reward:weekly-confirmation:{d.vin}:{iso_week(T0 - 10 * DAY + 60_000)}"]
    assert audit.audit(db, rules) == []


def test_a_fleet_token_enrolment_for_an_active_vehicle_waits_with_a_reason(db: Database) -> None:
    from backend.records import enrollment

    first = Dongle()
    second = Dongle(vin=first.vin)
    enroll(db, first)
    answer = enrollment.handle(db, second.dev, second.enroll_message(FLEET_TOKEN), NOW, FLEET_TOKEN)
    assert answer.status == "pending" and str(first.vin) in (answer.reason or "")

"""Attack: rolling the odometer back, to sell a car with less on the clock. On the car's own
dongle, even in steps each small enough to pass as a derived figure's correction; and with a
second dongle in the same car that reads a lower figure, approved by a fleet token once the
first one was revoked. The reading is taken as evidence (``odometer_rollback``), the device is
held (its rewards wait for an operator), the vehicle's highest reading stands, and the other
cars of the fleet go on earning. A second dongle that enrols without a VIN while the car's own
is active (the fleet token approves it, as it names no vehicle) is held the moment it reads
the car's VIN: its readings are not stored, and an operator must replace the car's dongle."""

from __future__ import annotations

from typing import Any

import pytest

from backend.db import Database
from backend.errors import DeviceInputError
from backend.records import devices
from sim.devices import Dongle, enroll
from tests.attacks.support import NOW, Target, added, balance, device_row, reasons, record_rows, rejections
from tests.backend_helpers import snapshot


def vehicle_top(db: Database, vin: str | None) -> dict[str, Any] | None:
    return db.one("SELECT top_odo_m, top_dev FROM vehicles WHERE vin = ?", (vin,))


def test_rollback_on_the_same_dongle(db: Database, rules: Any) -> None:
    backend = Target(db, rules)
    car, neighbour = Dongle(), Dongle()
    enroll(db, car)
    enroll(db, neighbour)
    assert backend.send(car, car.odometer(10, src="derived")).through == 1     # the car is at 50,010 km
    before = snapshot(db)

    # 1.5 km back is within what a derived figure may be corrected by; 1.5 km more is not
    ack = backend.send(car, car.odometer(-1.5, src="derived"), car.odometer(-1.5, src="derived"))
    assert ack.through == 3 and reasons(ack) == [(3, "odometer_rollback")]
    held = device_row(db, car)
    assert held["held_at"] == NOW and held["held_reason"].startswith("odometer_rollback at seq 3: odo_m "
                                                                      "50007000 below the vehicle's "
                                                                      "highest accepted 50010000")
    assert vehicle_top(db, car.vin) == {"top_odo_m": 50_010_000, "top_dev": car.dev}
    assert backend.counted("rejected", "odometer_rollback") == 1
    assert devices.fleet_gauges(db).held == 1
    assert [r["seq"] for r in added(before, snapshot(db))["records"]] == [2, 3]

    # held: the week's confirmation is accepted and earns nothing; the neighbour's earns
    assert backend.send(car, car.confirmation("2026-W39", odo_m=car.odo_m + 1_500)).balance == 0
    assert backend.send(neighbour, neighbour.confirmation("2026-W39")).balance == 10_000
    assert record_rows(db, car)[-1] == (4, "accepted", None)
    # what was held is credited only once an operator has looked and cleared the device
    devices.clear(db, rules, car.dev, NOW + 1, "cli:ops")
    assert balance(db, f"unassigned:{car.dev}") == 10_000 and device_row(db, car)["held_at"] is None


def test_rollback_by_another_dongle_in_the_same_car(db: Database, rules: Any) -> None:
    backend = Target(db, rules)
    first = Dongle()
    enroll(db, first)
    assert backend.send(first, first.odometer(2)).through == 1                   # 50,002 km
    devices.revoke(db, first.dev, NOW, "cli:ops")                                # reported lost
    # a dongle that reads 1,000 km in the same car; nothing else is active there, so the fleet
    # token approves it at once
    second = Dongle(vin=first.vin, odo_m=1_000_000)
    enroll(db, second)
    before = snapshot(db)

    ack = backend.send(second, second.odometer(1), second.confirmation("2026-W39"))

    assert ack.through == 2 and reasons(ack) == [(1, "odometer_rollback"), (2, "odometer_rollback")]
    assert ack.balance == 0
    held = device_row(db, second)
    assert held["held_at"] == NOW and held["held_reason"] == (
        "odometer_rollback at seq 1: odo_m 1001000 below the vehicle's highest accepted 50002000 "
        f"(device {first.dev})")
    assert vehicle_top(db, first.vin) == {"top_odo_m": 50_002_000, "top_dev": first.dev}
    grown = added(before, snapshot(db))
    assert [(r["dev"], r["seq"], r["status"]) for r in grown["records"]] == [
        (second.dev, 1, "rejected"), (second.dev, 2, "rejected")]
    assert set(grown) == {"records"}                                           # no credit, no log entry
    assert backend.counted("rejected", "odometer_rollback") == 2
    assert devices.fleet_gauges(db).held == 1


def test_rollback_by_a_dongle_enrolled_without_a_vin(db: Database, rules: Any) -> None:
    backend = Target(db, rules)
    first = Dongle()
    enroll(db, first)
    assert backend.send(first, first.odometer(2)).through == 1
    second = Dongle(vin=None, odo_m=1_000_000)
    enroll(db, second)                                          # approved: it names no vehicle
    second.vin = first.vin                                      # and then reads the car's VIN
    before = snapshot(db)

    low = second.odometer(1)
    ack = backend.send(second, low, second.odometer(1))

    assert ack.through == 0 and reasons(ack) == [(1, "vin_mismatch")]
    row = device_row(db, second)
    assert (row["vin"], row["flagged_vin"], row["through"]) == (None, first.vin, 0)
    assert added(before, snapshot(db)) == {}
    assert rejections(db, second) == [{"seq": 1, "reason": "vin_mismatch", "body": low.jws}]
    assert vehicle_top(db, first.vin) == {"top_odo_m": 50_002_000, "top_dev": first.dev}
    with pytest.raises(DeviceInputError, match=first.dev):
        devices.approve(db, second.dev, NOW, "cli:ops")
    assert backend.send(first, first.odometer(1)).through == 2            # the car's own dongle goes on

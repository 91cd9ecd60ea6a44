"""Attack: a gap, to leave out a record the backend would judge. The owner keeps back seq 2 (a
reading he would rather not show) and sends what follows: nothing past the gap is stored,
acknowledged or credited, however long the gap stands; the record kept back is still wanted,
and once it comes it is judged like any other and the rest follow it."""

from __future__ import annotations

from typing import Any

from backend.db import Database
from sim.devices import Dongle, enroll
from tests.attacks.support import NOW, Target, added, device_row, reasons, record_rows
from tests.backend_helpers import snapshot

DAY = 86_400_000


def test_gap(db: Database, rules: Any) -> None:
    backend = Target(db, rules)
    car = Dongle()
    enroll(db, car)
    assert backend.send(car, car.odometer(1)).through == 1
    kept_back = car.odometer(-5)                              # 5 km back: an odometer rollback
    car.odo_m += 5_000
    after = [car.odometer(1), car.confirmation("2026-W39"), car.odometer(1)]
    before = snapshot(db)

    for day in range(3):                                      # sent again and again, never the gap
        ack = backend.send(car, *after, now=NOW + day * DAY)
        assert ack.through == 1 and ack.rejected == () and ack.balance == 0
    assert snapshot(db) == before and added(before, snapshot(db)) == {}
    assert backend.counted("gap") == 9
    assert device_row(db, car)["held_at"] is None

    # the record kept back comes at last: a rollback, taken as evidence; the device is held and
    # what follows is accepted but earns nothing until an operator has looked
    ack = backend.send(car, kept_back, *after, now=NOW + 3 * DAY)
    assert ack.through == 5 and reasons(ack) == [(2, "odometer_rollback")] and ack.balance == 0
    assert record_rows(db, car)[1] == (2, "rejected", "odometer_rollback")
    assert "odometer_rollback at seq 2" in device_row(db, car)["held_reason"]

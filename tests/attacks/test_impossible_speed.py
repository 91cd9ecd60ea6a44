"""Attack: distance no car could drive, to farm the distance reward or to age a car on paper. A
reading 100 km on after one minute, and a trip of 400 km in 30 minutes, are faster than the
rules' ``max_speed_kph`` (250): each takes its seq as a rejected ``implausible_distance``, earns
nothing, and the next honest reading is judged against the last accepted one."""

from __future__ import annotations

from typing import Any

from backend.db import Database
from sim.devices import Dongle, enroll
from tests.attacks.support import Target, added, reasons, record_rows
from tests.backend_helpers import snapshot


def test_impossible_speed(db: Database, rules: Any) -> None:
    backend = Target(db, rules)
    car = Dongle()
    enroll(db, car)
    assert backend.send(car, car.odometer(1)).through == 1
    before = snapshot(db)

    jump = car.odometer(100, dt_ms=60_000)                       # 6,000 km/h
    car.odo_m -= 100_000
    race = car.trip(400, minutes=30)                             # 800 km/h, 4,000 milli-tokens' worth
    car.odo_m -= 400_000
    ack = backend.send(car, jump, race)

    assert ack.through == 3 and ack.balance == 0
    assert reasons(ack) == [(2, "implausible_distance"), (3, "implausible_distance")]
    grown = added(before, snapshot(db))
    assert [(r["seq"], r["id"], r["status"], r["reason"]) for r in grown["records"]] == [
        (2, jump.id, "rejected", "implausible_distance"), (3, race.id, "rejected", "implausible_distance")]
    assert set(grown) == {"records"}                             # not logged, not credited
    assert backend.counted("rejected", "implausible_distance") == 2

    # an honest trip after it: 12 km in 30 minutes from the last accepted reading, and it earns
    ack = backend.send(car, car.trip(12, minutes=30))
    assert ack.through == 4 and ack.rejected == () and ack.balance == 120
    assert record_rows(db, car)[-1] == (4, "accepted", None)

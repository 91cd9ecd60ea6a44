"""Attack: records dated ahead of the backend's clock, to confirm weeks not lived yet and bank
their rewards now. A confirmation a week ahead, a trip that ends tomorrow, and a reading that
calls its clock unsynced to dodge the check: each is received too early (``clock_ahead``, more
than ``max_clock_ahead_ms`` after its receipt), takes its seq as evidence and earns nothing.
A clock a few minutes fast is only a clock's drift."""

from __future__ import annotations

from typing import Any

from backend.db import Database
from protocol.records import iso_week
from sim.devices import Dongle, enroll
from tests.attacks.support import NOW, Target, added, reasons
from tests.backend_helpers import snapshot

DAY = 86_400_000


def test_future_dated_records(db: Database, rules: Any) -> None:
    backend = Target(db, rules)
    car = Dongle(t=NOW - 3_600_000)
    enroll(db, car)
    assert backend.send(car, car.odometer(1)).through == 1
    before = snapshot(db)

    next_week = car.confirmation(iso_week(NOW + 7 * DAY), dt_ms=7 * DAY)
    car.t = NOW - 60 * 60_000
    overnight = car.trip(30, minutes=25 * 60)                     # started an hour ago, ends tomorrow
    car.t = NOW + DAY
    unsynced = car.odometer(1, clock="unsynced")
    ack = backend.send(car, next_week, overnight, unsynced)

    assert ack.through == 4 and ack.balance == 0
    assert reasons(ack) == [(2, "clock_ahead"), (3, "clock_ahead"), (4, "clock_ahead")]
    grown = added(before, snapshot(db))
    assert [(r["seq"], r["status"], r["reason"]) for r in grown["records"]] == [
        (2, "rejected", "clock_ahead"), (3, "rejected", "clock_ahead"), (4, "rejected", "clock_ahead")]
    assert set(grown) == {"records"}                              # not logged, not credited
    assert backend.counted("rejected", "clock_ahead") == 3

    # five minutes fast: accepted, and this week's confirmation earns
    car.t = NOW + 5 * 60_000 - 60_000
    ack = backend.send(car, car.confirmation(iso_week(NOW)))
    assert ack.through == 5 and ack.rejected == () and ack.balance == 10_000

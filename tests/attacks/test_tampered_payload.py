"""Attack: a genuine record changed on its way. Someone between the dongle and the backend (a
hotspot, a broker that is not the fleet's) stretches a trip by 100 km to earn its distance
reward: the signature no longer covers the payload, the record is refused and kept, and the
untouched record is accepted and earns for the distance really driven."""

from __future__ import annotations

from typing import Any

from backend.db import Database
from sim.devices import Dongle, enroll
from tests.attacks.support import Target, added, altered, reasons, rejections
from tests.backend_helpers import snapshot


def test_tampered_payload(db: Database, rules: Any) -> None:
    backend = Target(db, rules)
    car = Dongle()
    enroll(db, car)
    assert backend.send(car, car.odometer(1)).through == 1
    trip = car.trip(12.5)
    longer = altered(trip, end_odo_m=int(trip.fields["end_odo_m"]) + 100_000)
    before = snapshot(db)

    ack = backend.send(car, longer)

    assert ack.through == 1 and reasons(ack) == [(2, "bad_signature")] and ack.balance == 0
    assert snapshot(db) == before and added(before, snapshot(db)) == {}
    assert rejections(db, car) == [{"seq": 2, "reason": "bad_signature", "body": longer}]
    assert backend.counted("rejected", "bad_signature") == 1

    # the trip as the dongle signed it: accepted, and 12.5 km earn 125 milli-tokens, once
    ack = backend.send(car, trip)
    assert ack.through == 2 and ack.rejected == () and ack.balance == 125
    assert [t["amount"] for t in added(before, snapshot(db))["transfers"]] == [125]

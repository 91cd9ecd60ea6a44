"""Attack: a record inserted into a chain already stored. Whoever holds the device's key signs a
trip (20 km, 200 milli-tokens' worth) for a seq between two accepted records, or splices one
onto an earlier record at the next seq: the first is a fork, kept beside the record that holds
the seq; the second takes its seq as a rejected ``chain_break``. Neither changes a stored
record, enters the log or earns."""

from __future__ import annotations

import dataclasses
from typing import Any

from backend.db import Database
from sim.devices import Dongle, enroll
from tests.attacks.support import Target, added, device_row, forks, reasons, record_rows
from tests.backend_helpers import snapshot


def test_inserted_record(db: Database, rules: Any) -> None:
    backend = Target(db, rules)
    car = Dongle()
    enroll(db, car)
    r1, r2, r3 = car.odometer(1), car.odometer(1), car.confirmation("2026-W39")
    assert backend.send(car, r1, r2, r3).balance == 10_000
    before = snapshot(db)

    # between seq 1 and seq 2, chained to seq 1
    between = dataclasses.replace(car, seq=1, head=r1.id).trip(20)
    ack = backend.send(car, between)
    assert ack.through == 3 and reasons(ack) == [(2, "fork")] and ack.balance == 10_000
    assert [(f["seq"], f["record_id"], f["jws"]) for f in forks(db, car)] == [(2, between.id, between.jws)]
    assert added(before, snapshot(db)) == {"forks": [{"dev": car.dev, "seq": 2, "record_id": between.id}]}
    assert snapshot(db)["devices"] == before["devices"]
    assert backend.counted("rejected", "fork") == 1

    # spliced on seq 1 at the next seq: it takes seq 4 as evidence, earns nothing, is not logged
    spliced = car.trip(20, prev=r1.id)
    ack = backend.send(car, spliced)
    assert ack.through == 4 and reasons(ack) == [(4, "chain_break")] and ack.balance == 10_000
    grown = added(before, snapshot(db))
    assert [(r["seq"], r["id"], r["status"], r["reason"]) for r in grown["records"]] == [
        (4, spliced.id, "rejected", "chain_break")]
    assert set(grown) == {"forks", "records"}                       # no transfer, no log entry
    assert record_rows(db, car)[:3] == [(1, "accepted", None), (2, "accepted", None), (3, "accepted", None)]

    # the device's next record chains on from the one that took seq 4
    assert backend.send(car, car.odometer(1)).through == 5
    assert device_row(db, car)["through"] == 5

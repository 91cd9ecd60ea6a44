"""Attack: a clone of a dongle's key, through a real mosquitto and the backend's ingest. The
clone knows the chain's head and gets its own record for seq 3 in first; the genuine dongle's
seq 3 is then a fork: refused in the ack and kept beside the record that holds the seq, as the
evidence of two signers of one key, and the device is flagged: its rewards wait for an
operator. The genuine dongle's next record no longer follows the head
(``chain_break``, taken as evidence), and each further record of the clone is a fork again."""

from __future__ import annotations

import dataclasses
from typing import Any

from backend.db import Database
from protocol.messages import Ack, Rejection
from sim.devices import Dongle, enroll
from sim.mqtt_device import MqttDevice
from tests.attacks.support import added, forks, live, record_rows
from tests.backend_helpers import snapshot
from tests.rules_support import Wire


def test_cloned_key_fork(db_url: str, db: Database, rules: Any) -> None:
    car = Dongle()
    enroll(db, car)
    with live(db_url, rules) as backend, MqttDevice(car, backend.broker.host, backend.broker.port) as genuine:
        assert genuine.send([car.odometer(1), car.odometer(1)]).through == 2
        clone = dataclasses.replace(car)                   # the same key, head and clock
        wire = Wire(backend.broker, [car.dev])             # the clone's own connection
        try:
            ahead = clone.odometer(1)
            wire.send(car.dev, [ahead])
            assert wire.acks[car.dev].get(timeout=10) == Ack(3, (), 0)
            assert genuine.acks.get(timeout=10) == Ack(3, (), 0)           # the device sees it too
            before = snapshot(db)

            mine = car.odometer(2)
            assert genuine.send([mine]) == Ack(3, (Rejection(3, "fork"),), 0)
            assert [(f["seq"], f["record_id"], f["jws"]) for f in forks(db, car)] == [(3, mine.id, mine.jws)]
            assert added(before, snapshot(db)) == {"forks": [{"dev": car.dev, "seq": 3,
                                                              "record_id": mine.id}]}
            assert backend.counted("rejected", "fork")
            flagged = db.one("SELECT held_at, held_reason FROM devices WHERE dev = ?", (car.dev,))
            assert flagged is not None and flagged["held_at"] is not None      # rewards held
            assert str(flagged["held_reason"]).startswith("fork at seq 3:")

            # the genuine dongle goes on from its own seq 3: a chain break, then its chain again
            after_mine = car.odometer(1)
            assert genuine.send([after_mine]) == Ack(4, (Rejection(4, "chain_break"),), 0)
            assert genuine.send([car.odometer(1)]) == Ack(5, (), 0)
            # the clone's next record, on its own head, finds seq 4 taken
            overheard = [wire.acks[car.dev].get(timeout=10).through for _ in range(3)]
            assert overheard == [3, 4, 5]                  # the genuine dongle's acks, seen by the clone
            wire.send(car.dev, [clone.odometer(1)])
            assert wire.acks[car.dev].get(timeout=10) == Ack(5, (Rejection(4, "fork"),), 0)
            assert [f["seq"] for f in forks(db, car)] == [3, 4]
            assert backend.counted("rejected", "fork", 2)
            assert record_rows(db, car) == [(1, "accepted", None), (2, "accepted", None),
                                            (3, "accepted", None), (4, "rejected", "chain_break"),
                                            (5, "accepted", None)]
        finally:
            wire.close()

"""Attack: publishing on another device's topic, through a real mosquitto and the backend's
ingest. An enrolled device puts its own genuine record, then its enrolment, on its neighbour's
topic (``odo/v1/<neighbour>/…``), as if it could write into that chain or take that id: the
record is refused as ``dev_mismatch`` in the neighbour's ack and kept under that topic, the
enrolment is refused, and both devices' own records still go through."""

from __future__ import annotations

from typing import Any

from backend.db import Database
from protocol import topics
from protocol.messages import Ack, Rejection
from sim.devices import Dongle, enroll
from tests.attacks.support import live, rejections
from tests.backend_helpers import snapshot
from tests.rules_support import Wire


def test_another_devices_topic(db_url: str, db: Database, rules: Any) -> None:
    neighbour, intruder = Dongle(), Dongle()
    enroll(db, neighbour)
    enroll(db, intruder)
    with live(db_url, rules) as backend:
        wire = Wire(backend.broker, [neighbour.dev, intruder.dev])
        try:
            wire.send(neighbour.dev, [neighbour.odometer(1)])
            assert wire.acks[neighbour.dev].get(timeout=10).through == 1
            before = snapshot(db)

            own = intruder.odometer(1)
            wire.send(neighbour.dev, [own])
            assert wire.acks[neighbour.dev].get(timeout=10) == Ack(1, (Rejection(1, "dev_mismatch"),), 0)
            assert snapshot(db) == before
            assert rejections(db, neighbour) == [{"seq": 1, "reason": "dev_mismatch", "body": own.jws}]
            assert backend.counted("rejected", "dev_mismatch")

            wire.client.publish(topics.enroll(neighbour.dev), intruder.enroll_message(), qos=1
                                ).wait_for_publish(5)
            assert backend.refused("enroll", "dev_mismatch")
            assert snapshot(db) == before
            key = db.one("SELECT pub FROM devices WHERE dev = ?", (neighbour.dev,))
            assert key is not None and bytes(key["pub"]) == neighbour.key.public.raw
            assert db.one("SELECT dev FROM devices WHERE pub = ?", (intruder.key.public.raw,)) == {
                "dev": intruder.dev}

            # each device's own records, on its own topic, go through
            wire.send(neighbour.dev, [neighbour.odometer(1)])
            assert wire.acks[neighbour.dev].get(timeout=10) == Ack(2, (), 0)
            wire.send(intruder.dev, [own])
            assert wire.acks[intruder.dev].get(timeout=10) == Ack(1, (), 0)
        finally:
            wire.close()

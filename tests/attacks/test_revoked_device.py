"""Attack: a dongle that goes on sending after an operator revoked it (stolen, or sold with the
car), through a real mosquitto and the backend's ingest. The device is told it is revoked; its
records are refused (``revoked_device``) in its ack and kept for operators; enrolling again with
the fleet token does not bring it back; another car's dongle goes on as before."""

from __future__ import annotations

import queue
from typing import Any

from backend.db import Database
from backend.records import devices
from protocol import topics
from protocol.messages import Ack, Rejection
from sim.devices import Dongle, enroll
from sim.mqtt_device import MqttDevice
from tests.attacks.support import NOW, live, rejections
from tests.backend_helpers import snapshot
from tests.rules_support import Wire

REVOKED = ("rejected", "revoked by an operator")


def told(agent: MqttDevice, answer: tuple[str, str | None], timeout: float = 10) -> bool:
    """Whether ``answer`` comes on the device's enrolled topic within ``timeout`` (answers before it,
    such as its approval published again, are passed over)."""
    try:
        while agent.answers.get(timeout=timeout) != answer:
            pass
    except queue.Empty:
        return False
    return True


def test_revoked_device(db_url: str, db: Database, rules: Any) -> None:
    car, other = Dongle(), Dongle()
    enroll(db, other)
    with live(db_url, rules) as backend, MqttDevice(car, backend.broker.host, backend.broker.port) as agent:
        assert agent.enroll() == ("approved", None)
        assert agent.send([car.odometer(1)]).through == 1
        devices.revoke(db, car.dev, NOW + 1, "cli:ops")
        assert told(agent, REVOKED)
        before = snapshot(db)

        sent = car.confirmation("2026-W39")
        assert agent.send([sent]) == Ack(1, (Rejection(2, "revoked_device"),), 0)
        assert snapshot(db) == before
        assert rejections(db, car) == [{"seq": 2, "reason": "revoked_device", "body": sent.jws}]
        assert backend.counted("rejected", "revoked_device")

        # the fleet token that let it in does not let it back
        agent.client.publish(topics.enroll(car.dev), car.enroll_message(), qos=1).wait_for_publish(5)
        assert told(agent, REVOKED)
        assert db.one("SELECT status FROM devices WHERE dev = ?", (car.dev,)) == {"status": "revoked"}
        assert snapshot(db) == before

        wire = Wire(backend.broker, [other.dev])
        try:
            wire.send(other.dev, [other.odometer(1), other.confirmation("2026-W39")])
            assert wire.acks[other.dev].get(timeout=10) == Ack(2, (), 10_000)
        finally:
            wire.close()

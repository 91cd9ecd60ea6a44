"""Attack: joining the backend's share group. A device certificate, and the read-only ``odo-ops``
one, subscribe to ``$share/odo-backend/odo/v1/+/records`` (and the group's other channels) on the
shipped broker configuration, over TLS, while ``odo-backend run`` ingests: had the broker let them
in, it would hand them their turn of the records, which its read check then drops. The broker
refuses each subscription (odo_doors), the intruders get no message, and the backend acknowledges
every one of another device's batches, each published once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from protocol import topics
from protocol.identity import SigningKey
from sim.devices import Dongle, batch
from tests.secure_broker import Client, SecureBroker, acked_through, backend_over_tls, enrol, start_secure

DEVICE_KEY = SigningKey.generate()
INTRUDER = SigningKey.generate().public.id
BATCHES = 30


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    s = start_secure(tmp_path_factory.mktemp("share-group"), DEVICE_KEY.public.id, INTRUDER)
    yield s
    s.broker.stop()


def test_share_group_join(db_url: str, secure: SecureBroker, tmp_path: Path) -> None:
    dongle = Dongle(key=DEVICE_KEY)              # its chain starts again in each database
    be = backend_over_tls(secure, tmp_path, db_url)
    intruders = [Client(secure, INTRUDER), Client(secure, INTRUDER, protocol=mqtt.MQTTv311, client_id="x"),
                 Client(secure, "odo-ops", service=True), Client(secure, "odo-ops")]
    try:
        for intruder in intruders:
            assert intruder.start(), f"{intruder.name} could not connect (CONNACK {intruder.connack})"
            shares = [topics.shared(ch) for ch in ("records", "status", "enroll", "claim")]
            refused = intruder.subscribe(*shares, "$share/odo-backend/#")
            assert [rc.is_failure for rc in refused] == [True] * 5, (intruder.name, refused)
        with Client(secure, dongle.dev) as device:
            enrol(device, dongle)
            for _ in range(BATCHES):          # each batch once: a turn taken by an intruder would be a gap
                assert device.publish(topics.records(dongle.dev), batch(dongle.odometer(1))).value == 0
            assert acked_through(device, dongle.dev, BATCHES) == BATCHES
        for intruder in intruders:
            assert intruder.drain() == [], f"{intruder.name} was delivered the backend's messages"
        assert "session taken over" not in be.log.read_text()
    finally:
        for intruder in intruders:
            intruder.stop()
        assert be.stop() == 0

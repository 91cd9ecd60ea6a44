"""Attack: taking over the backend's MQTT session with its (guessable) client id,
``odo-backend-<hostname>``. On the shipped broker configuration, over TLS, while ``odo-backend run``
ingests: a device certificate and the ``odo-ops`` one are refused that id on the services' port
(CONNACK "Not authorized") and renamed to their own CN on the devices' port, so the backend keeps
its session. A takeover forced anyway, by a second client with the backend's own certificate and
id, is an alarm (an ERROR naming the id and reason 142, ``odo_mqtt_session_taken_over_total``)
but not an exit: the backend reconnects with backoff and acknowledges again once the impostor
has gone."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.config import default_client_id
from protocol import topics
from protocol.identity import SigningKey
from sim.devices import Dongle, batch
from tests.backend_process import metrics_value
from tests.secure_broker import (
    NOT_AUTHORIZED,
    Client,
    SecureBroker,
    acked_through,
    backend_over_tls,
    enrol,
    start_secure,
)

DEVICE_KEY = SigningKey.generate()
OTHER = SigningKey.generate().public.id


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    s = start_secure(tmp_path_factory.mktemp("takeover"), DEVICE_KEY.public.id, OTHER)
    yield s
    s.broker.stop()


def wait_for_line(path: Path, *parts: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in path.read_text().splitlines():
            if all(p in line for p in parts):
                return line
        time.sleep(0.05)
    raise AssertionError(f"no log line with {parts} in:\n{path.read_text()}")


def test_client_id_takeover(db_url: str, secure: SecureBroker, tmp_path: Path) -> None:
    client_id = default_client_id()                       # what an attacker would guess
    dongle = Dongle(key=DEVICE_KEY)
    be = backend_over_tls(secure, tmp_path, db_url)       # no --client-id: the default one
    try:
        with Client(secure, dongle.dev) as device:
            enrol(device, dongle)
            assert device.publish(topics.records(dongle.dev), batch(dongle.odometer(1))).value == 0
            assert acked_through(device, dongle.dev, 1) == 1

            for cert, service in [("odo-ops", True), (OTHER, True), ("odo-ops", False), (OTHER, False)]:
                impostor = Client(secure, cert, service=service, client_id=client_id)
                try:
                    if service:
                        assert not impostor.start(), f"{cert} connected to the services' port as {client_id}"
                        assert impostor.connack is not None and impostor.connack.value == NOT_AUTHORIZED
                    else:                                  # renamed to its CN: a session of its own
                        assert impostor.start()
                finally:
                    impostor.stop()
            assert device.publish(topics.records(dongle.dev), batch(dongle.odometer(1))).value == 0
            assert acked_through(device, dongle.dev, 2) == 2
            assert "session taken over" not in be.log.read_text()

            # Forced anyway: the backend's own certificate and client id, from somewhere else.
            impostor = Client(secure, "odo-backend", service=True, client_id=client_id)
            try:
                assert impostor.start()
                # mosquitto 2.0.11 closes the older connection without DISCONNECT 142 (2.0.15 sends it):
                # the backend takes its session back, the impostor (reconnecting too) takes it again...
                alarm = wait_for_line(be.log, " ERROR ", "session taken over", repr(client_id))
            finally:
                impostor.stop()
            assert "reconnecting in" in alarm and "give each backend process its own client_id" in alarm
            assert be.process.poll() is None, "odo-backend stopped on a taken-over session"
            assert metrics_value(be.get("/metrics").text, "odo_mqtt_session_taken_over_total") >= 1
            # Back in its session, it acks again: the device sends its batch until acked, as agents do.
            third = batch(dongle.odometer(1))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                device.publish(topics.records(dongle.dev), third)
                if acked_through(device, dongle.dev, 3, timeout=1.0) == 3:
                    break
            else:
                raise AssertionError(f"no ack after the impostor left:\n{be.log.read_text()}")
            assert "connected to" in be.log.read_text().split(alarm)[1]
            assert be.get("/healthz").status_code == 200
    finally:
        assert be.stop() == 0

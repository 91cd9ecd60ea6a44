"""``odo-backend run`` over mqtts://, against the shipped broker configuration and ACL."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol import messages, topics
from sim.broker import quiet_broker
from sim.devices import Dongle, batch
from sim.processes import free_port
from tests.backend_process import start_backend
from tests.secure_broker import DEPLOY, FLEET_CA, Client, Pki, SecureBroker, broker_conf, ok

DEVICE = Dongle()


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    base = tmp_path_factory.mktemp("backend-tls")
    d = base / "pki"
    ok(FLEET_CA, "dev-setup", d, "localhost,127.0.0.1", DEVICE.dev)
    shutil.copy(DEPLOY / "acl", d / "acl")
    device_port, service_port = free_port(), free_port()
    broker = quiet_broker(extra_conf=broker_conf(Pki(d, d / "ca", d), device_port, service_port),
                          port=device_port, anonymous=False)
    yield SecureBroker(broker, device_port, service_port, Pki(d, d / "ca", d))
    broker.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_backend_ingests_over_tls_within_the_acl(db_url: str, secure: SecureBroker,
                                                     tmp_path: Path) -> None:
    d = secure.pki.dir
    be = start_backend(tmp_path, db_url, f"mqtts://127.0.0.1:{secure.service_port}",
                       "--tls-ca", str(d / "ca.crt"), "--tls-cert", str(d / "odo-backend.crt"),
                       "--tls-key", str(d / "odo-backend.key"), "--client-id", "odo-backend-tls-test")
    try:
        with Client(secure, DEVICE.dev) as device:
            device.subscribe(topics.ack(DEVICE.dev), topics.enrolled(DEVICE.dev))
            answer = None
            for _ in range(30):                           # until the backend has subscribed
                device.publish(topics.enroll(DEVICE.dev), DEVICE.enroll_message())
                try:
                    answer = device.next(timeout=0.5)
                    break
                except Exception:  # noqa: BLE001 - queue.Empty: not subscribed yet
                    continue
            assert answer == (topics.enrolled(DEVICE.dev), messages.encode_enrolled("approved"))
            device.publish(topics.records(DEVICE.dev), batch(DEVICE.odometer(1), DEVICE.odometer(1)))
            topic, body = device.next()
            assert topic == topics.ack(DEVICE.dev) and messages.decode_ack(body).through == 2
    finally:
        assert be.stop() == 0
    assert "connected to mqtts://127.0.0.1" in be.log.read_text()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_certificate_the_broker_does_not_trust_is_a_failure_to_connect(db_url: str, secure: SecureBroker,
                                                                         tmp_path: Path) -> None:
    other = tmp_path / "other"
    ok(FLEET_CA, "dev-setup", other, "localhost,127.0.0.1")
    be = start_backend(tmp_path, db_url, f"mqtts://127.0.0.1:{secure.service_port}",
                       "--tls-ca", str(secure.pki.dir / "ca.crt"),
                       "--tls-cert", str(other / "odo-backend.crt"),
                       "--tls-key", str(other / "odo-backend.key"))
    try:
        deadline = time.monotonic() + 10
        while "before accepting it" not in be.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert be.get("/healthz").status_code == 200          # HTTP serves while the ingest retries
    finally:
        assert be.stop() == 0
    log = be.log.read_text()
    assert "the broker at mqtts://127.0.0.1" in log and "before accepting it" in log
    assert "connected to" not in log

"""``odo-backend run`` as a process against a real mosquitto, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.db import Database
from backend.records import devices
from protocol import topics
from protocol.messages import Ack, Rejection
from sim.broker import Broker, quiet_broker
from sim.devices import T0, Dongle, batch
from sim.mqtt_device import MqttDevice
from tests.backend_process import ROOT, as_json, metrics_value, start_backend


@pytest.fixture
def broker() -> Iterator[Broker]:
    """A broker per test: a stopped backend's MQTT session would otherwise stay in the share
    group for its expiry, and take its turn of the next test's messages."""
    b = quiet_broker()
    yield b
    b.stop()


def _client_id() -> str:
    return f"odo-backend-test-{uuid.uuid4().hex[:8]}"


def _until(check: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_enrol_send_and_get_acks(db_url: str, broker: Broker, tmp_path: Path) -> None:
    be = start_backend(tmp_path, db_url, broker.url, "--client-id", _client_id())
    try:
        d = Dongle()
        with MqttDevice(d, broker.host, broker.port) as agent:
            assert agent.enroll() == ("approved", None)
            recs = [d.odometer(1) for _ in range(5)] + [d.confirmation("2026-W39")]
            ack = agent.send(recs)
            assert ack == Ack(6, (), 10_000)
            assert agent.send(recs) == ack                       # redelivered: a no-op, no second credit
            agent.status(t=T0, backlog=3, last_seq=6, obd="connected", version="test")
            _until(lambda: as_json(be.get("/api/devices"))[0]["backlog"] == 3)
        _until(lambda: not as_json(be.get("/api/devices"))[0]["online"])   # the client went away
        listed = as_json(be.get("/api/devices"))
        assert listed[0]["dev"] == d.dev and listed[0]["last_seq"] == 6

        # a device nobody approved yet: refused, then approved by an operator in another process
        u = Dongle()
        with MqttDevice(u, broker.host, broker.port) as agent:
            first = u.odometer(1)
            assert agent.send([first]) == Ack(0, (Rejection(1, "unknown_device"),), None)
            status, reason = agent.enroll(token=None)
            assert status == "pending" and reason
            other = Database.open(db_url)
            devices.approve(other, u.dev, time.time_ns() // 1_000_000, "cli:test")
            other.close()
            assert agent.answers.get(timeout=5) == ("approved", None)
            assert agent.send([first]) == Ack(1, (), 0)
        text = be.get("/metrics").text
        assert metrics_value(text, 'odo_records_total{status="accepted"') == 7
        assert metrics_value(text, 'odo_records_total{status="duplicate"') == 6
        assert metrics_value(text, 'odo_records_total{status="rejected",reason="unknown_device"}') == 1
        assert metrics_value(text, "odo_ingest_seconds_count") == 4
    finally:
        assert be.stop() == 0
    db = Database.open(db_url)
    assert db.one("SELECT COUNT(*) AS n FROM records") == {"n": 7}     # durable, as acknowledged
    assert db.one("SELECT COUNT(*) AS n FROM transfers") == {"n": 1}
    db.close()


def test_a_restart_gets_what_was_sent_while_it_was_down(db_url: str, broker: Broker, tmp_path: Path) -> None:
    client_id = _client_id()
    be = start_backend(tmp_path, db_url, broker.url, "--client-id", client_id)
    d = Dongle()
    with MqttDevice(d, broker.host, broker.port) as agent:
        assert agent.enroll()[0] == "approved"
        assert agent.send([d.odometer(1)]).through == 1
        assert be.stop(signal.SIGINT) == 0
        # sent once, while no backend runs: the broker keeps it in the backend's session
        agent.client.publish(topics.records(d.dev), batch(d.odometer(1)), qos=1).wait_for_publish(5)
        be = start_backend(tmp_path, db_url, broker.url, "--client-id", client_id, name="again")
        try:
            assert agent.acks.get(timeout=10).through == 2
        finally:
            assert be.stop() == 0
    assert "session resumed" in be.log.read_text()


def test_a_broker_refusing_the_backend_stops_it_with_78(db_url: str, tmp_path: Path) -> None:
    closed = quiet_broker(anonymous=False)
    try:
        be = start_backend(tmp_path, db_url, closed.url, wait=False)
        be.process.wait(20)
        assert be.process.returncode == 78
        assert "refused the backend" in be.log.read_text()
    finally:
        closed.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_two_processes_with_one_client_id_are_told_why(db_url: str, broker: Broker, tmp_path: Path) -> None:
    client_id = _client_id()
    first = start_backend(tmp_path, db_url, broker.url, "--client-id", client_id, name="first")
    second = start_backend(tmp_path, db_url, broker.url, "--client-id", client_id, name="second")
    try:
        _until(lambda: any("give each backend process its own client_id" in b.log.read_text()
                           for b in (first, second)), timeout=20)
    finally:
        assert first.stop() == 0 and second.stop() == 0


def test_bad_configuration_exits_78_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "backend.toml"
    cfg.write_text(f'db = "sqlite:///{tmp_path}/b.db"\nbroker = "mqtt://127.0.0.1:1"\nhttp = "somewhere"\n'
                   f'rules = "{tmp_path}/rules.toml"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("ODO_")}
    done = subprocess.run([sys.executable, "-m", "backend.cli", "run", "--config", str(cfg)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 78 and f"{cfg}: http" in done.stderr
    assert not (tmp_path / "b.db").exists()


def test_the_vehicle_checks_through_the_running_backend(db_url: str, broker: Broker, tmp_path: Path) -> None:
    """Future-dated, poison and second-dongle records through odo-backend run: each is decided,
    the genuine records beside them are acknowledged within seconds."""
    import json

    from common.clock import now_ms
    from protocol import b64
    from protocol.records import iso_week

    be = start_backend(tmp_path, db_url, broker.url, "--client-id", _client_id())
    try:
        d = Dongle(t=now_ms() - 3_600_000)
        with MqttDevice(d, broker.host, broker.port) as agent:
            assert agent.enroll() == ("approved", None)
            good = d.odometer(1)
            p = {"v": 1, **d.payload("odometer", {"odo_m": d.odo_m, "src": "obd"}, dt_ms=0), "seq": 2**63}
            header = b64.encode(json.dumps({"alg": "Ed25519", "kid": d.dev}).encode())
            signing_input = f"{header}.{b64.encode(json.dumps(p).encode())}"
            poison = f"{signing_input}.{b64.encode(d.key.sign(signing_input.encode('ascii')))}"
            ahead = d.confirmation(iso_week(d.t + 8 * 86_400_000), dt_ms=8 * 86_400_000)
            d.t -= 8 * 86_400_000 - 60_000
            after = d.odometer(1)
            started = time.monotonic()
            ack = agent.send([good, poison, ahead, after])
            assert time.monotonic() - started < 5
            assert ack.through == 3 and [r.reason for r in ack.rejected] == ["bad_format", "clock_ahead"]
            assert ack.balance == 0                                  # a week ahead earns nothing
        # a second dongle in the same car: its fleet token does not approve it, an operator must
        second = Dongle(vin=d.vin, t=now_ms() - 60_000)
        with MqttDevice(second, broker.host, broker.port) as agent:
            status, reason = agent.enroll()
            assert status == "pending" and d.vin in (reason or "")
        listed = {x["dev"]: x for x in as_json(be.get("/api/devices"))}
        assert listed[second.dev]["status"] == "pending" and listed[d.dev]["status"] == "approved"
    finally:
        be.stop()

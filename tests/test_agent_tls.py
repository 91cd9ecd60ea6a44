"""The agent over TLS, against the shipped broker configuration and ACL (deploy/mosquitto/)."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import identity
from agent.buffer import Outbox
from agent.clock import Clock
from agent.config import load
from agent.recorder import Recorder
from agent.sync import Syncer, SyncSettings
from sim.broker import quiet_broker
from sim.processes import free_port
from tests.agent_helpers import Backend, odo, wait_for
from tests.fakes import FakeReading
from tests.secure_broker import DEPLOY, FLEET_CA, Pki, SecureBroker, broker_conf, ok


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SecureBroker, Path, str]]:
    """A device made by `odo-agent init`, its broker certificate from the fleet CA, and the broker."""
    base = tmp_path_factory.mktemp("tls")
    state = base / "state"
    res = odo("init", "--state-dir", str(state), "--obd-port", "/dev/ttyUSB9", "--broker", "mqtt://unused:1")
    assert res.returncode == 0, res.stderr
    dev = res.stdout.strip()
    d = base / "pki"
    ok(FLEET_CA, "dev-setup", d, "localhost,127.0.0.1", dev)
    ok(FLEET_CA, "dev-setup", base / "other", "localhost,127.0.0.1", dev)
    shutil.copy(DEPLOY / "acl", d / "acl")
    pki = Pki(d, d / "ca", base / "other")
    device_port, service_port = free_port(), free_port()
    broker = quiet_broker(extra_conf=broker_conf(pki, device_port, service_port), port=device_port,
                          anonymous=False)
    yield SecureBroker(broker, device_port, service_port, pki), state, dev
    broker.stop()


def env_for(secure: SecureBroker, dev: str, ca: Path | None = None) -> dict[str, str]:
    d = secure.pki.dir
    return {"ODO_BROKER": f"mqtts://127.0.0.1:{secure.device_port}", "ODO_TLS_CA": str(ca or d / "ca.crt"),
            "ODO_TLS_CERT": str(d / f"{dev}.crt"), "ODO_TLS_KEY": str(d / f"{dev}.key")}


def backend(secure: SecureBroker, state: Path, **kw: object) -> Backend:
    d = secure.pki.dir
    return Backend(secure.broker, identity.load(state).public, port=secure.service_port,
                   tls=(d / "ca.crt", d / "odo-backend.crt", d / "odo-backend.key"), **kw)  # type: ignore[arg-type]


def test_enroll_and_sync_over_tls_within_the_acl(fleet: tuple[SecureBroker, Path, str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    secure, state, dev = fleet
    be = backend(secure, state, answers=(("approved", None),))
    try:
        res = odo("enroll", "--state-dir", str(state), "--wait", "10", env=env_for(secure, dev))
        assert res.returncode == 0 and "approved" in res.stdout, res.stderr
        for name, value in env_for(secure, dev).items():
            monkeypatch.setenv(name, value)
        cfg = load({"state_dir": str(state)})
        assert cfg.broker is not None and cfg.broker.tls and cfg.broker.tls_cert is not None
        box = Outbox.open(cfg.db_path)
        rec = Recorder(box, identity.load(state), clock=Clock("synced"), boot="tls")
        assert rec.record([FakeReading("odometer", {"odo_m": 5, "src": "obd"})] * 3)
        syncer = Syncer(cfg.broker, dev, box, settings=SyncSettings(resend_after_s=1))
        stop = threading.Event()
        thread = threading.Thread(target=syncer.run, args=(stop,))
        thread.start()
        try:
            assert wait_for(lambda: box.backlog() == 0, timeout=10)
            assert be.through == 3 and be.statuses and be.statuses[-1]["online"] is True
        finally:
            stop.set()
            thread.join(10)
    finally:
        be.close()


def test_a_broker_certificate_from_another_ca_is_refused(fleet: tuple[SecureBroker, Path, str]) -> None:
    secure, state, dev = fleet
    res = odo("enroll", "--state-dir", str(state), "--wait", "1",
              env=env_for(secure, dev, ca=secure.pki.other / "ca.crt"))
    assert res.returncode == 1 and "cannot reach the broker" in res.stderr
    assert "CERTIFICATE" in res.stderr.upper()

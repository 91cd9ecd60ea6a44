"""``odo-agent`` as a user runs it: subprocesses, a real mosquitto, a simulated car."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import identity
from agent.buffer import Outbox
from protocol import records
from sim.broker import Broker, quiet_broker
from tests.agent_helpers import ODO_AGENT, Backend, odo, wait_for


def status(state: Path) -> dict[str, Any]:
    res = odo("status", "--state-dir", str(state), "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    b = quiet_broker()
    yield b
    b.stop()


def init(tmp: Path, broker: Broker, port: str = "/dev/ttyUSB9") -> tuple[Path, str]:
    state = tmp / "state"
    res = odo("init", "--state-dir", str(state), "--obd-port", port, "--broker", broker.url,
              "--fleet-token", "fleet-tok")
    assert res.returncode == 0, res.stderr
    return state, res.stdout.strip()


def test_enroll_waits_for_the_backend_and_says_how_it_went(tmp_path: Path, broker: Broker) -> None:
    state, dev = init(tmp_path, broker)
    pub = identity.load(state).public
    # nobody answers
    res = odo("enroll", "--state-dir", str(state), "--wait", "0.5")
    assert res.returncode == 3 and "no answer" in res.stdout
    # pending: exit 3 after the wait, and the state remembers
    backend = Backend(broker, pub, answers=(("pending", None),))
    t0 = time.monotonic()
    res = odo("enroll", "--state-dir", str(state), "--wait", "1.5")
    assert res.returncode == 3 and "pending" in res.stdout, res.stderr
    assert time.monotonic() - t0 >= 1.5
    assert status(state)["enrolled"] == "pending"
    e, token = backend.enrollments[-1]
    assert e.dev == dev and token == "fleet-tok" and e.vin is None
    assert "fleet-tok" not in e.jws and "fleet_token" not in str(e)     # beside the signed enrolment
    backend.close()
    # rejected: exit 1 with the reason
    backend = Backend(broker, pub, answers=(("rejected", "unknown fleet token"),))
    res = odo("enroll", "--state-dir", str(state), "--wait", "5")
    assert res.returncode == 1 and "unknown fleet token" in res.stderr
    backend.close()
    # approved after a pending answer: exit 0 as soon as approved
    backend = Backend(broker, pub, answers=(("approved", None),))
    res = odo("enroll", "--state-dir", str(state), "--wait", "10")
    assert res.returncode == 0 and "approved" in res.stdout, res.stderr
    assert status(state)["enrolled"] == "approved"
    backend.close()


def test_enroll_beside_a_running_daemon_goes_through_the_daemon(tmp_path: Path, broker: Broker) -> None:
    from agent import daemon
    from agent.cli import enroll_message
    from agent.sync import Syncer
    from common.transport import BrokerConfig

    state, dev = init(tmp_path, broker)
    key = identity.load(state)
    held = daemon.lock(state)                 # this test process is "the daemon"
    assert held is not None
    box = Outbox.open(state / "outbox.db")
    syncer = Syncer(BrokerConfig(broker.host, broker.port), dev, box,
                    enrollment=lambda token: enroll_message(key, "WF0XXXGCDX1234567", token))
    stop = threading.Event()
    thread = threading.Thread(target=syncer.run, args=(stop,))
    thread.start()
    backend = Backend(broker, key.public, answers=(("approved", None),))
    try:
        assert wait_for(lambda: syncer.state == "online")
        res = odo("enroll", "--state-dir", str(state), "--wait", "10", "--fleet-token", "new-token")
        assert res.returncode == 0 and "approved" in res.stdout, res.stderr
        # before it, the daemon may have sent its own on connect, while not approved (no token here)
        got = [(e.vin, token) for e, token in backend.enrollments]
        assert got[-1] == ("WF0XXXGCDX1234567", "new-token")
        assert set(got[:-1]) <= {("WF0XXXGCDX1234567", None)}
        assert box.state("enroll_request") is None
        assert syncer.state == "online"       # its connection was never taken over
        res = odo("run", "--state-dir", str(state))
        assert res.returncode == 1 and "another `odo-agent run`" in res.stderr
    finally:
        stop.set()
        thread.join(10)
        backend.close()
        held.close()


def test_confirm_interactively_and_with_flags(tmp_path: Path, broker: Broker) -> None:
    state, _ = init(tmp_path, broker)
    box = Outbox.open(state / "outbox.db")
    box.set_state({"live": {"odo_m": 10_000_000, "src": "derived", "obd": "connected", "t": 1}})
    # the driver types the dashboard figure, which is far from the device's: a warning, then yes
    res = odo("confirm", "--state-dir", str(state), stdin="12345.6\ny\n")
    assert res.returncode == 0, res.stderr
    assert "Device odometer:   10,000.0 km (derived)" in res.stdout
    assert "Last confirmed:    never" in res.stdout
    assert "differs from the device's 10,000.0 km by 2,345.6 km" in res.stdout
    rec = records.verify(box.latest("confirmation").jws, identity.load(state).public)  # type: ignore[union-attr]
    assert dict(rec.fields) == {"odo_m": 12_345_600, "device_odo_m": 10_000_000, "week": rec.fields["week"]}
    # Enter accepts the device's figure; answering no records nothing
    res = odo("confirm", "--state-dir", str(state), stdin="\nn\n")
    assert res.returncode == 1 and box.tip()[0] == 1
    assert "Last confirmed:    12,345.6 km" in res.stdout and "already confirmed" in res.stdout
    # --yes without --km confirms the device's own figure
    res = odo("confirm", "--state-dir", str(state), "--yes")
    assert res.returncode == 0 and box.latest("confirmation").odo_m == 10_000_000  # type: ignore[union-attr]
    missing = str(tmp_path / "c.toml")
    res = odo("confirm", "--km", "9000", "--yes", "--config", missing, env={"ODO_STATE_DIR": str(state)})
    assert res.returncode == 2 and "c.toml does not exist" in res.stderr


def test_remind_marks_the_week_due_until_confirmed(tmp_path: Path, broker: Broker) -> None:
    state, _ = init(tmp_path, broker)
    res = odo("remind", "--state-dir", str(state))
    assert res.returncode == 0 and "confirmation due" in res.stdout
    box = Outbox.open(state / "outbox.db")
    assert box.state("confirmation_due")["week"] == status(state)["week"]
    assert status(state)["confirmation_due"] is True
    assert odo("confirm", "--state-dir", str(state), "--km", "100", "--yes").returncode == 0
    assert status(state)["confirmation_due"] is False and box.state("confirmation_due") is None
    res = odo("remind", "--state-dir", str(state))
    assert res.returncode == 0 and "already confirmed" in res.stdout


def test_status_in_words(tmp_path: Path, broker: Broker) -> None:
    state, dev = init(tmp_path, broker)
    res = odo("status", "--state-dir", str(state))
    assert res.returncode == 0
    assert dev in res.stdout and "0 waiting to sync" in res.stdout and "confirmation due" in res.stdout
    keys = {"dev", "vin", "last_seq", "synced_through", "backlog", "odo_m", "obd", "balance", "src", "trip",
            "last_ack_t", "clock", "confirmation_due", "enrolled"}
    assert keys <= set(status(state))


def test_run_reads_a_simulated_car_syncs_and_stops_on_sigterm(tmp_path: Path, broker: Broker) -> None:
    from sim.car import SimCar
    from sim.profile import Profile

    profile = Profile(vin="WF0XXXGCDX1234567", start_odo_km=54_321.0, time_scale=20.0, park_s=0)
    with SimCar(profile, tmp_path / "car") as car:
        assert car.port is not None
        state, dev = init(tmp_path, broker, car.port)
        backend = Backend(broker, identity.load(state).public)
        log = open(tmp_path / "run.log", "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([ODO_AGENT, "run", "--state-dir", str(state)], stdout=log, stderr=log,
                                env={**os.environ, "ODO_CLOCK": "synced"})
        try:
            assert wait_for(lambda: backend.through >= 4, timeout=30), (tmp_path / "run.log").read_text()
            s = status(state)
            assert s["vin"] == profile.vin and s["obd"] == "connected"
            assert s["odo_m"] is not None and s["odo_m"] >= 54_321_000 and s["src"] == "obd"
            assert s["synced_through"] >= 4 and s["balance"] is not None
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
            backend.close()
    assert backend.statuses and backend.statuses[-1] == {"online": False}
    kinds = [r.kind for r in Outbox.open(state / "outbox.db").records()]
    assert "odometer" in kinds

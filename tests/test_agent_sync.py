"""The sync loop against a real mosquitto and a small stand-in for the backend."""

from __future__ import annotations

import getpass
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.buffer import Outbox
from agent.clock import Clock, boot_id, mono_ms
from agent.recorder import Recorder
from agent.sync import Syncer, SyncSettings
from agent.window import SendWindow
from common.transport import BrokerConfig
from protocol.identity import SigningKey
from sim.broker import Broker, quiet_broker
from sim.processes import free_port
from tests.agent_helpers import Backend, wait_for
from tests.fakes import FakeReading, Ticker

ODO = FakeReading("odometer", {"odo_m": 1000, "src": "obd"})
FAST = SyncSettings(resend_after_s=0.5, max_resend_after_s=2.0, status_every_s=0.05, backoff_base_s=0.1,
                    backoff_cap_s=0.5, connect_timeout_s=3.0)


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    b = quiet_broker()
    yield b
    b.stop()


class Agent:
    def __init__(self, tmp: Path, broker: Broker, *, version: str = "5", password: str | None = None,
                 user: str | None = None) -> None:
        self.key = SigningKey.generate()
        self.outbox = Outbox.open(tmp / f"{self.key.public.id}.db")
        self.recorder = Recorder(self.outbox, self.key, clock=Clock("synced"), boot=boot_id())
        cfg = BrokerConfig(broker.host, broker.port, mqtt_version=version, username=user, password=password)
        self.syncer = Syncer(cfg, self.key.public.id, self.outbox, obd_state=lambda: "connected",
                             settings=FAST, boot=boot_id())
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.syncer.run, args=(self.stop,), daemon=True)

    def start(self) -> Agent:
        self.thread.start()
        return self

    def record(self, n: int) -> None:
        for _ in range(n):
            assert self.recorder.record([ODO])

    def close(self) -> None:
        self.stop.set()
        if self.thread.ident is not None:
            self.thread.join(10)
            assert not self.thread.is_alive()


@pytest.fixture
def agent(tmp_path: Path, broker: Broker) -> Iterator[Agent]:
    a = Agent(tmp_path, broker)
    yield a
    a.close()


def test_records_are_marked_synced_only_when_acked(agent: Agent, broker: Broker) -> None:
    backend = Backend(broker, agent.key.public)
    backend.acking = False
    agent.record(3)
    agent.start()
    assert wait_for(lambda: sorted(set(backend.received)) == [1, 2, 3])
    time.sleep(0.3)
    assert agent.outbox.backlog() == 3                 # delivered, but not acknowledged
    assert wait_for(lambda: len(backend.received) >= 6)  # so sent again after resend_after_s
    backend.acking = True
    assert wait_for(lambda: agent.outbox.backlog() == 0)
    assert agent.outbox.counts().synced_through == 3
    assert agent.outbox.state("ack")["balance"] == 300
    # each batch says when it was sent, on the clock its records carry (docs/protocol.md §4.2)
    assert all(boot == boot_id() for boot, _ in backend.clocks)
    monos = [mono for _, mono in backend.clocks]
    assert all(isinstance(m, int) for m in monos) and monos == sorted(monos)
    assert all(m is not None and m <= mono_ms() for m in monos)
    backend.close()


def test_a_dropped_ack_is_recovered_by_resending_from_through_plus_one(agent: Agent, broker: Broker) -> None:
    backend = Backend(broker, agent.key.public)
    agent.start()
    agent.record(4)
    assert wait_for(lambda: agent.outbox.backlog() == 0)
    backend.drop_acks = 1
    t0 = time.monotonic()
    assert agent.recorder.record([ODO] * 3)  # one append, so one batch
    assert wait_for(lambda: agent.outbox.backlog() == 0)
    assert time.monotonic() - t0 >= FAST.resend_after_s * 0.9
    assert backend.received.count(5) == 2 and backend.received.count(1) == 1  # resent from through + 1
    assert backend.through == 7
    backend.close()


def test_status_is_retained_and_goes_offline_on_stop(agent: Agent, broker: Broker) -> None:
    backend = Backend(broker, agent.key.public)
    agent.record(2)
    agent.start()
    assert wait_for(lambda: any(s.get("online") and s.get("backlog") == 0 for s in backend.statuses))
    first = backend.statuses[0]
    assert first["online"] is True and first["last_seq"] == 2 and first["obd"] == "connected"
    assert isinstance(first["version"], str) and isinstance(first["t"], int)
    agent.close()
    assert wait_for(lambda: backend.statuses[-1] == {"online": False})
    backend.close()


def test_unknown_device_records_wait_and_go_after_approval(agent: Agent, broker: Broker) -> None:
    backend = Backend(broker, agent.key.public, approved=False)
    agent.start()
    agent.record(3)
    assert wait_for(lambda: agent.outbox.state("last_rejection") is not None)
    assert agent.outbox.backlog() == 3 and agent.outbox.get(1).rejected is None  # type: ignore[union-attr]
    assert agent.outbox.state("last_rejection")["reason"] == "unknown_device"
    # approval resends at once, without waiting out the (growing) resend delay
    time.sleep(1.2)
    backend.approve()
    assert wait_for(lambda: agent.outbox.backlog() == 0, timeout=1.5)
    assert agent.outbox.state("enrollment")["status"] == "approved"
    backend.close()


def test_mqtt_311_works_too(tmp_path: Path, broker: Broker) -> None:
    a = Agent(tmp_path, broker, version="3.1.1")
    backend = Backend(broker, a.key.public)
    a.record(5)
    a.start()
    assert wait_for(lambda: a.outbox.backlog() == 0)
    a.close()
    backend.close()


def test_reconnects_with_backoff_after_the_broker_restarts(tmp_path: Path) -> None:
    port = free_port()
    own = quiet_broker(port=port)
    a = Agent(tmp_path, own)
    backend = Backend(own, a.key.public)
    try:
        a.start()
        a.record(2)
        assert wait_for(lambda: a.outbox.backlog() == 0)
        own.stop()
        assert wait_for(lambda: a.syncer.state == "offline")
        a.record(3)                       # recorded while the broker is down
        time.sleep(1.0)                   # a few failed reconnects
        assert a.outbox.backlog() == 3
        own = quiet_broker(port=port)
        assert wait_for(lambda: a.outbox.backlog() == 0, timeout=10)
        assert backend.through == 5
    finally:
        a.close()
        backend.close()
        own.stop()


@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_an_authorisation_refusal_stops_retrying(tmp_path: Path, version: str) -> None:
    pwfile = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), "dongle", "right"], check=True,
                   capture_output=True)
    conf = f"password_file {pwfile}\n"
    if os.geteuid() == 0:  # as root, mosquitto would drop to user mosquitto and not read the file
        conf += f"user {getpass.getuser()}\n"
    own = quiet_broker(extra_conf=conf, anonymous=False)
    a = Agent(tmp_path, own, version=version, user="dongle", password="wrong")
    try:
        a.start()
        a.thread.join(5)
        assert not a.thread.is_alive()
        assert a.syncer.state == "auth_refused"
        assert a.outbox.state("sync")["state"] == "auth_refused"  # for odo-agent status
        assert a.syncer.refusal and ("Not authorized" in a.syncer.refusal or "password" in a.syncer.refusal)
    finally:
        a.close()
        own.stop()


# -- the send window, with a clock that moves only when told ----------------------------------------

def test_send_window_resends_from_through_plus_one_and_backs_off() -> None:
    tick = Ticker()
    w = SendWindow(SyncSettings(resend_after_s=10, max_resend_after_s=40, window_records=1000), tick())
    w.restart(first_unsynced=1, tip=0, acked=0, now=tick())
    w.sent(500, tick())
    w.sent(1000, tick())
    assert w.room() == 0 and w.outstanding
    w.on_ack(400, tick())
    assert w.room() == 400 and w.next_seq == 1001
    tick.advance(9.5)
    assert not w.timed_out(tick())
    tick.advance(0.5)
    assert w.timed_out(tick()) and w.next_seq == 401
    assert w.resend_delay() == 20
    w.sent(1000, tick())
    tick.advance(20)
    assert w.timed_out(tick()) and w.resend_delay() == 40
    w.sent(1000, tick())
    tick.advance(40)
    assert w.timed_out(tick()) and w.resend_delay() == 40   # capped
    w.on_ack(1000, tick())
    assert not w.outstanding and w.resend_delay() == 10 and not w.timed_out(tick() + 100)


def test_a_bad_tls_file_is_retried_not_a_crash(tmp_path: Path, broker: Broker) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    box = Outbox.open(tmp_path / "o.db")
    cfg = BrokerConfig(broker.host, broker.port, tls=True, tls_ca=bad)
    syncer = Syncer(cfg, "ab" * 16, box, settings=FAST)
    stop = threading.Event()
    thread = threading.Thread(target=syncer.run, args=(stop,))
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive() and syncer.state == "offline"
    stop.set()
    thread.join(5)
    assert not thread.is_alive()

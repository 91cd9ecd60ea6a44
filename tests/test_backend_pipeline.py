"""The ingest's pipeline (backend/records/ingest.py): paho's thread routes, workers handle.

One device's messages keep their order whatever the interleaving with others; a message is
PUBACKed only after its transaction has ended, on the connection it came on; a full queue holds
paho's thread and the broker's window holds the rest, so memory stays bounded; a backend killed
before its commit gets the message again from the broker when its session resumes. On SQLite and
PostgreSQL.
"""

from __future__ import annotations

import argparse
import logging
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from backend import config
from backend.db import Database
from backend.errors import ConfigError
from backend.locks import LOCK_WAIT_MS, device_lock_key, lock_device
from backend.metrics import Registry
from backend.records import ingest as ingest_module
from backend.records import store
from backend.records.ingest import QUEUE_PER_WORKER, Ingest
from common.transport import BrokerConfig
from protocol import messages, topics
from sim.broker import Broker, quiet_broker
from sim.devices import FLEET_TOKEN, T0, Dongle, batch, enroll
from sim.mqtt_device import MqttDevice
from tests.backend_helpers import Unacked
from tests.backend_process import metrics_value, start_backend

NOW = T0 + 86_400_000
PER_BATCH = 4


class FakeClient:
    """Stands in for paho's client: keeps what the ingest publishes and PUBACKs, in order."""

    def __init__(self, on_ack: Callable[[int], None] | None = None) -> None:
        self.events: list[tuple[str, Any]] = []
        self.lock = threading.Lock()
        self.on_ack = on_ack
        self.all_acked = threading.Condition(self.lock)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        with self.lock:
            self.events.append(("publish", (topic, payload)))

    def ack(self, mid: int, qos: int) -> None:
        if self.on_ack is not None:
            self.on_ack(mid)
        with self.lock:
            self.events.append(("puback", mid))
            self.all_acked.notify_all()

    def subscribe(self, *args: Any) -> None:
        pass

    def reconnect_delay_set(self, min_delay: int = 1, max_delay: int = 120) -> None:
        pass

    def disconnect(self) -> None:
        with self.lock:
            self.events.append(("disconnect", None))

    def loop_stop(self) -> None:
        pass

    def pubacks(self) -> list[int]:
        with self.lock:
            return [mid for kind, mid in self.events if kind == "puback"]

    def wait_pubacks(self, n: int, timeout: float = 20) -> list[int]:
        with self.all_acked:
            if not self.all_acked.wait_for(lambda: sum(k == "puback" for k, _ in self.events) >= n, timeout):
                raise AssertionError(f"{sum(k == 'puback' for k, _ in self.events)} PUBACKs, not {n}")
        return self.pubacks()

    def acks_to(self, dev: str) -> list[messages.Ack]:
        with self.lock:
            published = [v for k, v in self.events if k == "publish"]
        return [messages.decode_ack(body) for topic, body in published if topic == topics.ack(dev)]


def message(dev: str, channel: str, body: bytes, mid: int) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(mid=mid, topic=f"odo/v1/{dev}/{channel}".encode())
    msg.payload, msg.qos = body, 1
    return msg


def deliver(ingest: Ingest, msg: mqtt.MQTTMessage) -> None:
    """What paho's network thread does with a PUBLISH it receives."""
    ingest._on_message(ingest.client, None, msg)


def held_until(release: threading.Event, handle: Callable[[str, bytes], store.BatchResult],
               started: threading.Event | None = None) -> Callable[[str, bytes], store.BatchResult]:
    """``handle``, once ``release`` is set: a database that does not answer meanwhile."""
    def slow(dev: str, body: bytes) -> store.BatchResult:
        if started is not None:
            started.set()
        release.wait(10)
        return handle(dev, body)
    return slow


def make_ingest(db: Database, rules: Any, client: FakeClient, workers: int) -> Ingest:
    ingest = Ingest(db, rules, BrokerConfig("127.0.0.1", 1883), registry=Registry(), clock=lambda: NOW,
                    workers=workers)
    ingest.client = client  # type: ignore[assignment]
    ingest.start_workers()
    return ingest


def spread_fleet(db: Database, ingest: Ingest, per_worker: int) -> list[Dongle]:
    """Enrolled devices, ``per_worker`` of them for each of the ingest's workers."""
    fleet = [Dongle() for _ in range(ingest.workers * per_worker)]
    for d in fleet:
        enroll(db, d)
    return fleet


def committed_through(url: str, dev: str) -> int:
    """What another connection sees committed for ``dev``."""
    other = Database.open(url)
    try:
        row = other.one("SELECT through FROM devices WHERE dev = ?", (dev,))
        return int(row["through"]) if row else -1
    finally:
        other.close()


def test_each_devices_batches_keep_their_order_and_are_pubacked_after_their_commit(
        db: Database, rules: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    handled_by: dict[str, set[str]] = {}
    expected: dict[int, tuple[str, int]] = {}          # mid -> (dev, its batch's last seq)
    seen_at_puback: dict[int, int] = {}

    def on_ack(mid: int) -> None:                       # in the worker, before the PUBACK goes
        seen_at_puback[mid] = committed_through(db.url, expected[mid][0])

    client = FakeClient(on_ack)
    ingest = make_ingest(db, rules, client, workers=3)
    fleet = spread_fleet(db, ingest, per_worker=2)
    real_handle = ingest.handle

    active: set[str] = set()
    overlaps: list[str] = []
    guard = threading.Lock()

    def handle(item: ingest_module.Received) -> None:
        with guard:
            handled_by.setdefault(item.dev, set()).add(threading.current_thread().name)
            if item.dev in active:
                overlaps.append(item.dev)
            active.add(item.dev)
        time.sleep(0.002)                 # long enough for another worker to take the device, if it could
        try:
            real_handle(item)
        finally:
            with guard:
                active.discard(item.dev)

    monkeypatch.setattr(ingest, "handle", handle)
    plans = {d.dev: [batch(*(d.odometer(1) for _ in range(PER_BATCH))) for _ in range(5)] for d in fleet}
    # one arrival order of them all: each device's batches in its order, devices interleaved at random
    pending = {dev: list(bodies) for dev, bodies in plans.items()}
    rng, mid = random.Random(20261102), 0
    try:
        while pending:
            dev = rng.choice(sorted(pending))
            mid += 1
            expected[mid] = (dev, PER_BATCH * (len(plans[dev]) - len(pending[dev]) + 1))
            deliver(ingest, message(dev, "records", pending[dev].pop(0), mid))
            if not pending[dev]:
                del pending[dev]
        acked = client.wait_pubacks(mid)
    finally:
        ingest.stop()
    assert sorted(acked) == list(range(1, mid + 1))                      # each once
    assert seen_at_puback == {m: through for m, (_, through) in expected.items()}
    for d in fleet:
        assert [a.through for a in client.acks_to(d.dev)] == [4, 8, 12, 16, 20]
        assert all(not a.rejected for a in client.acks_to(d.dev))
        rows = db.query("SELECT seq, status FROM records WHERE dev = ? ORDER BY seq", (d.dev,))
        assert [(r["seq"], r["status"]) for r in rows] == [(n, "accepted") for n in range(1, 21)]
    assert overlaps == []                                  # a device in one worker's hands at a time
    assert len(set().union(*handled_by.values())) == 3                   # and all of them at work
    # each device's ack goes out before its message's PUBACK
    with client.lock:
        events = list(client.events)
    for m, (dev, through) in expected.items():
        ack_at = next(i for i, (k, v) in enumerate(events) if k == "publish" and v[0] == topics.ack(dev)
                      and messages.decode_ack(v[1]).through == through)
        assert ack_at < events.index(("puback", m))


def test_a_failing_handler_is_logged_and_pubacked_after_its_rollback(
        db: Database, rules: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    d = Dongle()
    enroll(db, d)

    def boom(db_: Database, *args: Any) -> store.BatchResult:
        with db_.write() as tx:
            tx.execute("UPDATE devices SET through = 99 WHERE dev = ?", (d.dev,))
            raise RuntimeError("the handler broke")

    monkeypatch.setattr(store, "process_batch", boom)
    seen: list[int] = []
    client = FakeClient(lambda mid: seen.append(committed_through(db.url, d.dev)))
    ingest = make_ingest(db, rules, client, workers=2)
    try:
        with caplog.at_level(logging.ERROR, logger=ingest_module.__name__):
            deliver(ingest, message(d.dev, "records", batch(d.odometer(1)), 5))
            assert client.wait_pubacks(1) == [5]
    finally:
        ingest.stop()
    assert seen == [0]                                   # PUBACKed once rolled back
    assert client.acks_to(d.dev) == []                   # no ack to the device: it sends again
    failed = [r for r in caplog.records if "failed to handle a records message" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is not None
    assert metrics_value(ingest.registry.exposition().decode(), "odo_ingest_errors_total") == 1


def test_a_message_of_an_earlier_connection_is_not_pubacked_on_the_next(
        db: Database, rules: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    d = Dongle()
    enroll(db, d)
    release = threading.Event()
    client = FakeClient()
    ingest = make_ingest(db, rules, client, workers=2)
    monkeypatch.setattr(ingest, "handle_records", held_until(release, ingest.handle_records))
    body = batch(d.odometer(1), d.odometer(1))
    try:
        deliver(ingest, message(d.dev, "records", body, 7))
        time.sleep(0.2)                                              # in hand, in its transaction
        ingest._on_disconnect(ingest.client, None, mqtt.DisconnectFlags(False),
                              ReasonCode(PacketTypes.DISCONNECT, identifier=0), None)
        ingest._on_connect(ingest.client, None, mqtt.ConnectFlags(True),
                           ReasonCode(PacketTypes.CONNACK, identifier=0), None)
        # the broker sends it again on the resumed session, under the same packet id
        deliver(ingest, message(d.dev, "records", body, 7))
        release.set()
        assert client.wait_pubacks(1) == [7]
        time.sleep(0.2)
        assert client.pubacks() == [7]                  # only the copy of this connection
        assert [a.through for a in client.acks_to(d.dev)] == [2, 2]
    finally:
        release.set()
        ingest.stop()


def test_a_full_queue_holds_the_network_thread(db: Database, rules: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Back-pressure: a slow database fills the worker's queue, then paho's thread waits."""
    release = threading.Event()
    client = FakeClient()
    ingest = make_ingest(db, rules, client, workers=2)
    fleet = spread_fleet(db, ingest, per_worker=1)
    monkeypatch.setattr(ingest, "handle_records", held_until(release, ingest.handle_records))
    bodies = {d.dev: [batch(d.odometer(1)) for _ in range(12)] for d in fleet}
    routed: list[int] = []

    def network_thread() -> None:
        mid = 0
        for i in range(12):
            for d in fleet:
                mid += 1
                deliver(ingest, message(d.dev, "records", bodies[d.dev][i], mid))
                routed.append(mid)

    feeder = threading.Thread(target=network_thread)
    try:
        feeder.start()
        time.sleep(0.6)
        assert feeder.is_alive()                                  # waiting for room
        # one in hand per worker, the queue full, and the next one waiting in paho's thread
        assert len(routed) == ingest.workers * (QUEUE_PER_WORKER + 1) < 24
        assert ingest.queued() == ingest.workers * QUEUE_PER_WORKER
        assert client.pubacks() == []
        release.set()
        feeder.join(10)
        assert not feeder.is_alive()
        assert sorted(client.wait_pubacks(24)) == list(range(1, 25))
    finally:
        release.set()
        ingest.stop()
    for d in fleet:
        assert [a.through for a in client.acks_to(d.dev)] == list(range(1, 13))


def test_stop_finishes_the_message_in_hand_and_leaves_the_queued_ones_unacknowledged(
        db: Database, rules: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    d = Dongle()
    enroll(db, d)
    release, started = threading.Event(), threading.Event()
    client = FakeClient()
    ingest = make_ingest(db, rules, client, workers=2)
    monkeypatch.setattr(ingest, "handle_records", held_until(release, ingest.handle_records, started))
    for mid in range(1, 5):
        deliver(ingest, message(d.dev, "records", batch(d.odometer(1)), mid))
    assert started.wait(5)
    stopping = threading.Thread(target=ingest.stop)
    stopping.start()
    time.sleep(0.3)
    assert stopping.is_alive() and client.pubacks() == []          # waits for the message in hand
    release.set()
    stopping.join(10)
    assert not stopping.is_alive()
    with client.lock:
        kinds = [(k, v if k == "puback" else None) for k, v in client.events]
    assert kinds == [("publish", None), ("puback", 1), ("disconnect", None)]
    assert committed_through(db.url, d.dev) == 1
    # what arrives while stopping is left to the broker too
    deliver(ingest, message(d.dev, "records", batch(d.odometer(1)), 9))
    assert client.pubacks() == [1]


def test_writers_of_one_process_overlap_on_postgresql_and_take_turns_on_sqlite(db: Database) -> None:
    inside, most = 0, 0
    lock = threading.Lock()

    def writer() -> None:
        nonlocal inside, most
        try:
            with db.write() as tx:
                tx.execute("SELECT 1")
                with lock:
                    inside += 1
                    most = max(most, inside)
                time.sleep(0.3)
                with lock:
                    inside -= 1
        finally:
            db.close()

    threads = [threading.Thread(target=writer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert most == (3 if db.dialect == "postgresql" else 1)


def test_workers_setting(rules: Any) -> None:
    def run_config(**kw: Any) -> config.RunConfig:
        args = argparse.Namespace(db="sqlite:///tmp/x.db", broker="mqtt://h:1883", http="127.0.0.1:8",
                                  rules="r.toml", config=None, **kw)
        return config.run_config(config.settings(args, environ={}))

    assert run_config().workers is None
    assert run_config(workers=3).workers == 3
    for bad in (0, 33):
        with pytest.raises(ConfigError, match="--workers.*1 to 32"):
            run_config(workers=bad)
    with pytest.raises(ValueError, match="workers: 0, must be 1 to 32"):
        Ingest(Database.open("sqlite:///:memory:"), rules, BrokerConfig("h", 1883), workers=0)
    assert 2 <= ingest_module.default_workers() <= 4


# -- against a real mosquitto ----------------------------------------------------------------------

@pytest.fixture
def own_broker() -> Iterator[Broker]:
    b = quiet_broker()
    yield b
    b.stop()


def test_the_broker_sends_no_more_than_the_queues_hold(db: Database, rules: Any, own_broker: Broker,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory stays bounded: the CONNECT's Receive Maximum is what the workers hold, so the broker
    stops sending once they are full (the rest waits at the broker), and with the devices spread
    over the workers paho's thread does not have to wait. (Once PUBACKs flow, mosquitto 2.0 may
    let one more through: the full queue's wait in paho's thread bounds the memory then.)"""
    ingest = Ingest(db, rules, BrokerConfig(own_broker.host, own_broker.port,
                                            client_id=f"odo-backend-test-{uuid.uuid4().hex[:8]}"),
                    registry=Registry(), clock=lambda: NOW, workers=2)
    fleet = spread_fleet(db, ingest, per_worker=1)
    release = threading.Event()
    unacked = Unacked(ingest)
    monkeypatch.setattr(ingest, "handle_records", held_until(release, ingest.handle_records))
    plans = {d.dev: [d.odometer(1) for _ in range(20)] for d in fleet}
    ingest.start()
    try:
        assert ingest.subscribed.wait(10)
        devices = [MqttDevice(d, own_broker.host, own_broker.port).__enter__() for d in fleet]
        for i in range(20):                 # the broker gets them in turn, one device then the other
            for device in devices:
                dev = device.device.dev
                device.client.publish(topics.records(dev), batch(plans[dev][i]), qos=1).wait_for_publish(5)
        time.sleep(1.0)
        with unacked.lock:
            assert unacked.most == ingest.receive_maximum == 2 * (QUEUE_PER_WORKER + 1)
        release.set()
        for device in devices:
            assert [device.acks.get(timeout=10).through for _ in range(20)] == list(range(1, 21))
            device.__exit__()
    finally:
        release.set()
        ingest.stop()


def wait_for_the_database(db: Database, dev: str) -> None:
    """Until the backend waits for the device's lock (PostgreSQL; it waits at most
    ``LOCK_WAIT_MS``), or a moment (SQLite, where it waits for the file's lock for 30 s)."""
    if db.dialect != "postgresql":
        time.sleep(1.0)
        return
    key = device_lock_key(dev)
    watcher = Database.open(db.url)
    try:
        deadline = time.monotonic() + LOCK_WAIT_MS / 1000
        while time.monotonic() < deadline:
            if watcher.one("SELECT 1 AS waiting FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                           "AND classid = ? AND objid = ?", (key >> 32, key & 0xFFFF_FFFF)):
                return
            time.sleep(0.02)
        raise AssertionError("the backend never waited for the device's lock")
    finally:
        watcher.close()


def test_a_backend_killed_before_its_commit_gets_the_message_again(db_url: str, own_broker: Broker,
                                                                   tmp_path: Path) -> None:
    """The PUBACK follows the commit: kill -9 the backend while a batch waits for the database,
    and the broker delivers it again to the restarted backend (its session resumed); the device
    gets its ack without sending anything again."""
    client_id = f"odo-backend-test-{uuid.uuid4().hex[:8]}"
    be = start_backend(tmp_path, db_url, own_broker.url, "--client-id", client_id)
    blocker = Database.open(db_url)
    d = Dongle()
    recs = [d.odometer(1) for _ in range(3)]
    try:
        with MqttDevice(d, own_broker.host, own_broker.port) as device:
            assert device.enroll(FLEET_TOKEN) == ("approved", None)
            held = blocker.write()           # the device's lock (PostgreSQL), the file's (SQLite)
            lock_device(blocker, held.__enter__(), d.dev)
            try:
                device.client.publish(topics.records(d.dev), batch(*recs), qos=1).wait_for_publish(5)
                wait_for_the_database(blocker, d.dev)           # received, in its transaction
                be.stop(signal.SIGKILL)
            finally:
                held.__exit__(None, None, None)
            assert committed_through(db_url, d.dev) == 0
            be = start_backend(tmp_path, db_url, own_broker.url, "--client-id", client_id, name="again")
            assert device.acks.get(timeout=20) == messages.Ack(3, (), 0)
        assert committed_through(db_url, d.dev) == 3
    finally:
        blocker.close()
        assert be.stop() == 0

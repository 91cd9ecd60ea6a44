"""Backpressure and full disks on the backend (backend/records/ingest.py), on real parts: mosquitto,
SQLite and PostgreSQL.

A slow database (a trigger that sleeps in every insert into ``records``) under a flood from a
publisher of its own: the ingest's queues and the messages it holds unacknowledged stay within
their bounds, its memory does not grow with the flood, and every ack a device receives counts
only what is committed at that moment. A full disk (:mod:`tests.disk_support`: a small tmpfs
under the database as root, with a PostgreSQL tablespace on it; SQLite's page limit otherwise):
the ingest acks nothing it did not store, ``/healthz`` answers 503 "storage unavailable" and
``odo_storage_failing`` is 1, and once there is space again the same process stores and acks.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import queue
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from backend import metrics, storage
from backend.db import Database, Tx
from backend.errors import DatabaseError, IntegrityError
from backend.metrics import Registry
from backend.records.ingest import QUEUE_PER_WORKER, Ingest
from backend.web.app import create_app
from backend.web.context import AppContext
from common.transport import BrokerConfig
from protocol import messages, topics
from sim.broker import Broker, quiet_broker
from sim.devices import T0, Dongle, batch, enroll
from sim.mqtt_device import MqttDevice
from tests.agent_helpers import wait_for
from tests.backend_helpers import Unacked
from tests.backend_process import metrics_value
from tests.conftest import PG_URL
from tests.disk_support import PageLimit, SmallDisk, small_disk, tmpfs_available

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent
NOW = T0 + 30 * 86_400_000
WORKERS = 2
DEVICES_PER_WORKER = 2
BATCHES = 80
WARM_BATCHES = 4
PER_BATCH = 20
SLOW_S = 0.03                    # each batch's insert into records, on top of its own time


@pytest.fixture
def own_broker() -> Iterator[Broker]:
    b = quiet_broker()
    yield b
    b.stop()


def slow_down(db: Database) -> None:
    """Every batch's insert into ``records`` takes about ``SLOW_S`` longer, inside its transaction."""
    with db.write() as tx:
        if db.dialect == "postgresql":
            tx.execute("CREATE FUNCTION odo_test_slow() RETURNS trigger LANGUAGE plpgsql AS "
                       f"$$ BEGIN PERFORM pg_sleep({SLOW_S}); RETURN NULL; END $$")
            tx.execute("CREATE TRIGGER odo_test_slow AFTER INSERT ON records FOR EACH STATEMENT "
                       "EXECUTE FUNCTION odo_test_slow()")
            return
        # SQLite has no sleep: the trigger makes it count through a cross join instead
        tx.execute("CREATE TABLE odo_test_pad (n INTEGER)")
        tx.execute("INSERT INTO odo_test_pad (n) SELECT value FROM json_each(?)", (str(list(range(60))),))
        tx.execute(f"CREATE TRIGGER odo_test_slow AFTER INSERT ON records WHEN NEW.seq % {PER_BATCH} = 0 "
                   "BEGIN SELECT COUNT(*) FROM odo_test_pad a, odo_test_pad b, odo_test_pad c "
                   "WHERE a.n + b.n + c.n < 0; END")


def flood(lines: Path, broker: Broker) -> subprocess.Popen[bytes]:
    """Publish ``lines`` (:mod:`tests.flood`) from a process of its own."""
    return subprocess.Popen([sys.executable, "-m", "tests.flood", str(lines), broker.host, str(broker.port)],
                            cwd=ROOT)


def spread_fleet(db: Database, ingest: Ingest) -> list[Dongle]:
    fleet = [Dongle() for _ in range(ingest.workers * DEVICES_PER_WORKER)]
    for d in fleet:
        enroll(db, d)
    return fleet


class AckWatcher:
    """Subscribed to every device's ack beside the devices: for each one, what the database had
    committed for its device when it came (read on a connection of its own)."""

    def __init__(self, broker: Broker, url: str) -> None:
        self.db = Database.open(url)
        self.seen: list[tuple[str, int, int, int]] = []     # (dev, ack's through, committed, rows)
        self.errors: list[str] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watcher-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_disconnect = lambda *a: self.db.close()     # the connection of paho's thread
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(topics.ack("+"), qos=1)
        self.client.loop_start()
        assert subscribed.wait(5)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            dev = msg.topic.split("/")[2]
            ack = messages.decode_ack(bytes(msg.payload))
            row = self.db.one("SELECT through FROM devices WHERE dev = ?", (dev,))
            rows = self.db.one("SELECT COUNT(*) AS n FROM records WHERE dev = ? AND seq <= ?",
                               (dev, ack.through))
            self.seen.append((dev, ack.through, int(row["through"]) if row else -1,
                              int(rows["n"]) if rows else -1))
        except Exception as exc:  # noqa: BLE001 - reported by the test, not lost in paho's thread
            self.errors.append(repr(exc))

    def last(self, dev: str) -> int:
        return max((through for d, through, _, _ in self.seen if d == dev), default=0)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_slow_database_under_a_flood_keeps_memory_bounded_and_acks_honest(
        db: Database, rules: Any, own_broker: Broker, tmp_path: Path) -> None:
    slow_down(db)
    registry = Registry()
    ingest = Ingest(Database.open(db.url), rules, BrokerConfig(
        own_broker.host, own_broker.port, client_id=f"odo-backend-test-{uuid.uuid4().hex[:8]}"),
        registry=registry, clock=lambda: NOW, workers=WORKERS)
    fleet = spread_fleet(db, ingest)
    # a few batches first, for the ingest to load what it keeps (modules, caches); then the flood
    published = {"warm": 0, "flood": 0}
    for name, batches in (("warm", WARM_BATCHES), ("flood", BATCHES - WARM_BATCHES)):
        with open(tmp_path / f"{name}.txt", "w") as out:
            for _ in range(batches):
                for d in fleet:
                    body = batch(*(d.odometer(1) for _ in range(PER_BATCH)))
                    published[name] += len(body)
                    out.write(f"{topics.records(d.dev)} {base64.b64encode(body).decode()}\n")
    most_queued, most_live = 0, 0
    unacked = Unacked(ingest)
    watcher = AckWatcher(own_broker, db.url)
    # Every Python allocation is traced, where received messages live; SQLite's and libpq's own
    # caches (C memory, growing with the database) are not, so the process's RSS would say little.
    tracemalloc.start()
    ingest.start()
    publisher: subprocess.Popen[bytes] | None = None
    try:
        assert ingest.subscribed.wait(10)
        assert flood(tmp_path / "warm.txt", own_broker).wait(30) == 0
        assert wait_for(lambda: all(watcher.last(d.dev) == PER_BATCH * WARM_BATCHES for d in fleet), 30)
        gc.collect()
        warm = tracemalloc.get_traced_memory()[0]
        publisher = flood(tmp_path / "flood.txt", own_broker)
        sampled = time.monotonic()
        last = PER_BATCH * BATCHES
        deadline = time.monotonic() + 120
        while not all(watcher.last(d.dev) == last for d in fleet) and time.monotonic() < deadline:
            queued = ingest.queued()
            exposed = metrics_value(registry.exposition().decode(), "odo_ingest_queued")
            assert queued <= WORKERS * QUEUE_PER_WORKER and exposed <= WORKERS * QUEUE_PER_WORKER
            most_queued = max(most_queued, queued)
            if time.monotonic() - sampled >= 1.0:     # what is alive, garbage collected
                gc.collect()
                most_live = max(most_live, tracemalloc.get_traced_memory()[0] - warm)
                sampled = time.monotonic()
            time.sleep(0.05)
        assert publisher.wait(30) == 0
    finally:
        tracemalloc.stop()
        if publisher is not None and publisher.poll() is None:
            publisher.kill()
            publisher.wait()
        ingest.stop()
        watcher.close()
    assert [watcher.last(d.dev) for d in fleet] == [PER_BATCH * BATCHES] * len(fleet)
    # the database was the bottleneck: the queues filled, and the broker's window held the rest
    assert most_queued >= WORKERS * QUEUE_PER_WORKER - 1
    assert unacked.most <= ingest.receive_maximum + 1            # mosquitto may let one more through
    # memory does not follow the flood: while it went through, the process held less than half of
    # it beyond what it held before (its working set and bounded caches such as the statements';
    # an ingest that took in what the broker offered would hold the whole flood at once)
    assert published["flood"] > 3 * 2**20
    print(f"flood of {published['flood']} bytes; at most {most_queued} queued and {unacked.most} "
          f"unacknowledged; at most {most_live} bytes more allocated")
    assert 0 < most_live < published["flood"] / 2, (most_live, published)
    # every ack counted only what was committed when it came: through rows, all there
    assert watcher.errors == []
    assert len(watcher.seen) >= BATCHES * len(fleet)
    assert all(through <= committed and rows == through for _, through, committed, rows in watcher.seen)
    for d in fleet:
        stored = db.query("SELECT seq FROM records WHERE dev = ? ORDER BY seq", (d.dev,))
        assert [r["seq"] for r in stored] == list(range(1, PER_BATCH * BATCHES + 1))


# -- a full disk ---------------------------------------------------------------------------------

class LimitedDatabase(Database):
    """SQLite under :class:`PageLimit`: each write transaction's connection gets the current limit."""

    page_limit: PageLimit

    @contextmanager
    def write(self) -> Iterator[Tx]:
        self.page_limit.limit(self._conn())
        with super().write() as tx:
            yield tx


@contextmanager
def tablespace_on(disk: SmallDisk, url: str) -> Iterator[None]:
    """The tables and indexes of ``url``'s schema moved to a tablespace on ``disk``."""
    name = f"odo_test_{uuid.uuid4().hex[:10]}"
    schema = url.rsplit("schema=", 1)[1]
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE TABLESPACE {name} LOCATION '{disk.path}'")
        try:
            for (table,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,)):
                conn.execute(f'ALTER TABLE "{schema}"."{table}" SET TABLESPACE {name}')
            for (index,) in conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = %s", (schema,)):
                conn.execute(f'ALTER INDEX "{schema}"."{index}" SET TABLESPACE {name}')
            yield
        finally:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            conn.execute(f"DROP TABLESPACE IF EXISTS {name}")


@contextmanager
def full_disk_database(db_url: str, tmp_path: Path) -> Iterator[tuple[Database, SmallDisk | PageLimit]]:
    """A migrated database of ``db_url``'s kind on a disk that can be filled."""
    if db_url.startswith("sqlite"):
        with small_disk(tmp_path / "disk") as disk:
            url = f"sqlite:///{disk.path}/backend.db"
            if isinstance(disk, PageLimit):
                db: Database = LimitedDatabase(url, "sqlite", str(disk.path / "backend.db"), None)
                db.page_limit = disk  # type: ignore[attr-defined]
            else:
                db = Database.open(url)
            db.migrate()
            yield db, disk
        return
    if not tmpfs_available():
        pytest.skip("a tablespace on a small filesystem needs root to mount it")
    # the server's own user must reach the mount: not under the tests' private temporary directory
    mount = Path(tempfile.mkdtemp(prefix="odo-test-tablespace-"))
    try:
        with small_disk(mount, owner="postgres") as disk:
            assert isinstance(disk, SmallDisk)
            db = Database.open(db_url)
            db.migrate()
            with tablespace_on(disk, db_url):
                yield db, disk
            db.close()
    finally:
        with contextlib.suppress(OSError):
            mount.rmdir()


def healthz(client: TestClient) -> tuple[int, dict[str, Any]]:
    response = client.get("/healthz")
    return response.status_code, response.json()


def test_a_full_disk_stops_the_acks_says_so_and_resumes_without_a_restart(
        db_url: str, rules: Any, own_broker: Broker, tmp_path: Path) -> None:
    with full_disk_database(db_url, tmp_path) as (db, disk):
        ingest = Ingest(db, rules, BrokerConfig(own_broker.host, own_broker.port,
                                                client_id=f"odo-backend-test-{uuid.uuid4().hex[:8]}"),
                        registry=metrics.REGISTRY, clock=lambda: NOW, workers=WORKERS)
        d = Dongle()
        enroll(db, d)
        app = TestClient(create_app(AppContext(db=Database.open(db.url), rules=rules)))
        watcher = AckWatcher(own_broker, db.url)
        ingest.start()
        try:
            assert ingest.subscribed.wait(10)
            with MqttDevice(d, own_broker.host, own_broker.port) as device:
                assert device.send([d.odometer(1) for _ in range(20)]).through == 20
                assert healthz(app) == (200, {"status": "ok"})
                disk.fill()
                # batches until one is not stored (the database may still have room for a few)
                unacked: list[bytes] = []
                for _ in range(200):
                    body = batch(*(d.odometer(1) for _ in range(50)))
                    device.client.publish(topics.records(d.dev), body, qos=1)
                    try:
                        device.acks.get(timeout=3)
                    except queue.Empty:
                        unacked.append(body)
                        break
                assert unacked, "the disk never filled up"
                code, answer = healthz(app)
                assert code == 503
                assert answer["error"].startswith("storage unavailable: database or disk is full")
                exposed = metrics.REGISTRY.exposition().decode()
                assert metrics_value(exposed, "odo_storage_failing") == 1
                stored = int(db.one("SELECT through FROM devices WHERE dev = ?", (d.dev,))["through"])  # type: ignore[index]
                # the agent sends it again after a while; still nothing stored, nothing acked
                device.client.publish(topics.records(d.dev), unacked[0], qos=1)
                with pytest.raises(queue.Empty):
                    device.acks.get(timeout=2)
                assert healthz(app)[0] == 503
                # space again: the same process stores and acks, and says it is healthy
                disk.free()
                device.client.publish(topics.records(d.dev), unacked[0], qos=1)
                assert device.acks.get(timeout=10).through == stored + 50
                assert healthz(app) == (200, {"status": "ok"})
                assert metrics_value(metrics.REGISTRY.exposition().decode(), "odo_storage_failing") == 0
                assert device.send([d.odometer(1)]).through == stored + 51
        finally:
            ingest.stop()
            watcher.close()
            metrics.REGISTRY.storage_works()
            app.close()
        assert watcher.errors == []
        assert all(through <= committed and rows == through for _, through, committed, rows in watcher.seen)
        rows = db.query("SELECT seq FROM records WHERE dev = ? ORDER BY seq", (d.dev,))
        assert [r["seq"] for r in rows] == list(range(1, stored + 52))
        db.close()


def test_what_counts_as_storage_that_cannot_store(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "x.db")
    conn.execute("CREATE TABLE t (x BLOB)")
    conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
    caught: dict[str, BaseException] = {}
    for name, sql in (("full", "INSERT INTO t VALUES (randomblob(100000))"), ("typo", "SELECT * FROM nope")):
        try:
            conn.execute(sql)
        except sqlite3.Error as exc:
            caught[name] = exc
    conn.close()
    assert storage.failure(caught["full"]) == "database or disk is full"
    assert storage.failure(caught["typo"]) is None
    assert storage.failure(psycopg.errors.DiskFull()) == "database or disk is full"
    assert storage.failure(psycopg.errors.UniqueViolation()) is None
    assert storage.failure(psycopg.errors.LockNotAvailable()) is None
    lost = psycopg.OperationalError("the connection is lost")
    assert storage.failure(lost) == "the database connection failed"
    refused = DatabaseError("cannot connect to PostgreSQL: refused")
    assert storage.failure(refused) == "cannot connect to the database"
    assert storage.failure(IntegrityError("UNIQUE constraint failed")) is None
    assert storage.failure(ValueError("a bug")) is None

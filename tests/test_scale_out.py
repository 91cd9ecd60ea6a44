"""Backends that scale out: no lock shared by every device, so a process stopped in the middle
of a transaction holds up the one device it was handling, never the others."""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from backend.db import Database
from backend.errors import LockTimeout
from backend.locks import LOCK_WAIT_MS, lock_device
from backend.records import store
from backend.transparency import translog
from protocol import merkle, topics
from protocol.records import Record
from sim.broker import quiet_broker
from sim.devices import T0, Dongle, batch, enroll
from sim.mqtt_device import MqttDevice
from tests.backend_process import start_backend

NOW = T0 + 3_600_000


class Frozen:
    """Another process's transaction that took a lock and then stopped (SIGSTOP), until released."""

    def __init__(self, db_url: str, take: Any) -> None:
        self.db_url, self.take = db_url, take
        self.holding, self.released = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        other = Database.open(self.db_url)
        try:
            with other.write() as tx:
                self.take(other, tx)
                self.holding.set()
                self.released.wait(30)
        finally:
            other.close()

    def __enter__(self) -> Frozen:
        self.thread.start()
        assert self.holding.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.released.set()
        self.thread.join()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)   # SQLite has one writer at a time
def test_a_device_held_by_a_stopped_process_holds_up_that_device_only(db_url: str, db: Database,
                                                                       rules: Any) -> None:
    held, free = Dongle(), Dongle()
    enroll(db, held)
    enroll(db, free)
    first = held.odometer(1)
    with Frozen(db_url, lambda other, tx: lock_device(other, tx, held.dev)):
        started = time.monotonic()
        with pytest.raises(LockTimeout, match="held by another process"):
            store.process_batch(db, rules, held.dev, batch(first), NOW)
        waited = time.monotonic() - started
        assert LOCK_WAIT_MS / 1000 * 0.9 <= waited < LOCK_WAIT_MS / 1000 + 3
        assert db.query("SELECT seq FROM records WHERE dev = ?", (held.dev,)) == []   # nothing stored
        # another device goes through at once, while the first is held
        started = time.monotonic()
        for _ in range(5):
            ack = store.process_batch(db, rules, free.dev, batch(free.odometer(1)), NOW).ack
        assert ack.through == 5 and time.monotonic() - started < 2
    # released: the device sends its batch again, and it is taken
    assert store.process_batch(db, rules, held.dev, batch(first), NOW).ack.through == 1


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_stopped_sequencer_delays_the_tree_not_the_acks(db_url: str, db: Database, rules: Any) -> None:
    devices = [Dongle() for _ in range(3)]
    for d in devices:
        enroll(db, d)
    with Frozen(db_url, lambda other, tx: translog.lock(tx, translog.LOCK)):
        started = time.monotonic()
        for d in devices:
            for _ in range(3):
                assert store.process_batch(db, rules, d.dev, batch(d.odometer(1)), NOW).ack.rejected == ()
        assert time.monotonic() - started < 3
        assert translog.integrate(db).size is None              # the stopped one still holds the log
        with db.read() as tx:
            assert translog.queued(tx) >= 9
    size = translog.integrate_all(db)
    with db.read() as tx:
        rows = tx.query("SELECT entry FROM translog ORDER BY idx")
        leaves = [merkle.leaf_hash(bytes(r["entry"])) for r in rows]
        assert len(leaves) == size and translog.root(tx) == merkle.root(leaves)
        assert translog.queued(tx) == 0


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_one_of_two_backends_stopped_mid_load_does_not_stop_the_other(db_url: str, tmp_path: Path) -> None:
    """SIGSTOP one ``odo-backend run`` of two while devices send: the other goes on
    acknowledging the devices' records (those the stopped one holds wait for it)."""
    broker = quiet_broker()
    run = uuid.uuid4().hex[:6]
    backends = [start_backend(tmp_path, db_url, broker.url, "--client-id", f"odo-backend-{name}-{run}",
                              name=name) for name in ("one", "two")]
    fleet = [Dongle() for _ in range(8)]
    progress: dict[str, list[tuple[float, int]]] = {d.dev: [] for d in fleet}
    stop = threading.Event()

    def drive(agent: MqttDevice) -> None:
        through, recs = 0, list[Record]()
        while not stop.is_set():
            if not recs:                     # the last batch was acknowledged: sign the next one
                recs = [agent.device.odometer(1) for _ in range(5)]
            agent.client.publish(topics.records(agent.device.dev), batch(*recs), qos=1)
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                try:
                    ack = agent.acks.get(timeout=0.05)
                except queue.Empty:
                    continue
                if ack.through > through:
                    through = ack.through
                    progress[agent.device.dev].append((time.monotonic(), through))
                if through >= recs[-1].seq:
                    recs = []
                    break

    agents = [MqttDevice(d, broker.host, broker.port).__enter__() for d in fleet]
    try:
        for agent in agents:
            assert agent.enroll()[0] == "approved"
        threads = [threading.Thread(target=drive, args=(a,)) for a in agents]
        for t in threads:
            t.start()
        time.sleep(3)
        os.kill(backends[0].process.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        time.sleep(8)
        thawed_at = time.monotonic()
        os.kill(backends[0].process.pid, signal.SIGCONT)
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join()
    finally:
        for agent in agents:
            agent.__exit__()
        for b in backends:
            os.kill(b.process.pid, signal.SIGCONT)
            b.stop()
        broker.stop()
    moving = [dev for dev, acks in progress.items() if any(frozen_at + 2.5 < t < thawed_at for t, _ in acks)]
    assert len(moving) >= len(fleet) - 1, {dev: len(a) for dev, a in progress.items()}
    # and nothing was lost or doubled: each device's records are one unbroken chain
    db = Database.open(db_url)
    try:
        for d in fleet:
            seqs = [int(r["seq"]) for r in db.query("SELECT seq FROM records WHERE dev = ? AND status = "
                                                    "'accepted' ORDER BY seq", (d.dev,))]
            assert seqs == list(range(1, len(seqs) + 1))
        size = translog.integrate_all(db)
        with db.read() as tx:
            rows = tx.query("SELECT entry FROM translog ORDER BY idx")
            assert len(rows) == size and translog.root(tx) == merkle.root([merkle.leaf_hash(bytes(r["entry"]))
                                                                           for r in rows])
    finally:
        db.close()

"""Backends that scale out: no lock shared by every device, so a process stopped in the middle
of a transaction holds up the one device it was handling, never the others."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from backend.db import Database
from backend.errors import LockTimeout
from backend.locks import LOCK_WAIT_MS, lock_device
from backend.records import store
from backend.transparency import translog
from protocol import merkle
from sim.devices import T0, Dongle, batch, enroll

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

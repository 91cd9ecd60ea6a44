"""Ingest processes (``backend.records.processes``): a batch stored by a worker's process comes
out as it would from the worker thread itself, and a process that dies, is told to stop by a
signal, or fails a batch never loses or changes what was stored."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from backend import storage
from backend.db import Database
from backend.errors import LockTimeout, StorageUnavailable
from backend.ledger import contracts
from backend.ledger.contracts import LiveBook
from backend.records import processes, store
from backend.records.evidence import DEFAULT_LIMITS
from backend.records.processes import BatchFailed, BatchProcess, Failure, Setup
from sim.devices import Dongle, batch, enroll, load_test_rules

NOW = 1_800_000_000_000


def _state(db: Database) -> dict[str, Any]:
    return {
        "records": [tuple(r.values()) for r in db.query(
            "SELECT dev, seq, id, status, reason, t_est, base_odo_m FROM records ORDER BY dev, seq")],
        "transfers": sorted(tuple(r.values()) for r in db.query(
            "SELECT key, to_account, amount, rules_sha256 FROM transfers")),
        "devices": [tuple(r.values())
                    for r in db.query("SELECT dev, through, head_id FROM devices ORDER BY dev")],
    }


def _chain(d: Dongle, n: int) -> list[Any]:
    out = []
    for i in range(n):
        out.append(d.trip(3, minutes=5) if i % 7 == 6 else d.odometer(1))
    out.append(d.odometer(400, dt_ms=1000))               # implausible: rejected, takes its seq
    return out


@pytest.fixture
def twin(db_url: str, tmp_path: Path) -> Any:
    """Two fresh databases of the same kind with the same device enrolled in each."""
    d = Dongle()
    dbs = []
    for n in range(2):
        url = (db_url.replace("backend.db", f"backend{n}.db") if db_url.startswith("sqlite")
               else f"{db_url}{n}")
        db = Database.open(url)
        db.migrate()
        enroll(db, d)
        dbs.append(db)
    yield d, dbs
    for db in dbs:
        db.close()
    if not db_url.startswith("sqlite"):
        import psycopg

        base, _, schema = db_url.partition("?schema=")
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}1" CASCADE')


def _live(db: Database, tmp_path: Path) -> LiveBook:
    """The test rules, published: the book a running backend (and its processes) reads."""
    contracts.publish(db, load_test_rules(tmp_path), NOW - 10_000_000, require_effective_from=False)
    return LiveBook(db)


def _enrolled(db: Database, tmp_path: Path, n: int) -> tuple[Dongle, list[Any], BatchProcess]:
    """A device enrolled in ``db``, its chain of ``n`` + 1 records, and a process to store them."""
    rules = _live(db, tmp_path)
    d = Dongle()
    enroll(db, d)
    return d, _chain(d, n), BatchProcess(Setup.of(db, rules, DEFAULT_LIMITS), "test-ingest")


def test_a_batch_stored_by_a_process_is_stored_as_by_the_thread(twin: Any, tmp_path: Path) -> None:
    d, (here, there) = twin
    rules = _live(here, tmp_path)
    theirs_rules = _live(there, tmp_path)
    chain = _chain(d, 30)
    bodies = [batch(*chain[i:i + 8]) for i in range(0, len(chain), 8)]
    bodies.append(bodies[1])                                  # a replay
    bodies.append(b'{"v":1,"records":[')                      # malformed
    child = BatchProcess(Setup.of(there, theirs_rules, DEFAULT_LIMITS), "test-ingest")
    try:
        for body in bodies:
            mine = store.process_batch(here, rules, d.dev, body, NOW)
            theirs = child.process(d.dev, body, NOW)
            assert theirs == mine
        assert child.pid is not None and child.pid != os.getpid()
    finally:
        child.close()
    assert _state(there) == _state(here)
    assert _state(here)["transfers"], "the chain credits"


def test_the_process_reads_the_database_rule_book(db: Database, tmp_path: Path) -> None:
    """A running backend's rules (a LiveBook) are the database's in the process too."""
    rules = load_test_rules(tmp_path)
    live = _live(db, tmp_path)
    d = Dongle()
    enroll(db, d)
    setup = Setup.of(db, live, DEFAULT_LIMITS)
    child = BatchProcess(setup, "test-ingest")
    try:
        result = child.process(d.dev, batch(*_chain(d, 10)), NOW)
    finally:
        child.close()
    assert result.ack.through == 11
    shas = {r["rules_sha256"] for r in db.query("SELECT rules_sha256 FROM transfers")}
    assert shas == {contracts.sha256_of(rules)}


def test_a_process_that_dies_fails_its_batch_and_another_takes_the_next(
        db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processes, "RESTART_S", 60.0)
    d, chain, child = _enrolled(db, tmp_path, 20)
    try:
        assert child.process(d.dev, batch(*chain[:5]), NOW).ack.through == 5
        first = child.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        time.sleep(0.1)
        with pytest.raises(BatchFailed, match="the ingest process failed"):
            child.process(d.dev, batch(*chain[5:10]), NOW)
        before = _state(db)
        assert before["devices"][0][1] == 5                       # nothing of the failed batch
        # Within RESTART_S of the last start, no process is started: the thread stores the batch.
        assert child.process(d.dev, batch(*chain[5:10]), NOW).ack.through == 10
        assert child.pid is None
        monkeypatch.setattr(processes, "RESTART_S", 0.0)
        assert child.process(d.dev, batch(*chain[10:]), NOW).ack.through == len(chain)
        assert child.pid not in (None, first)
    finally:
        child.close()
    assert [r[1] for r in _state(db)["records"]] == list(range(1, len(chain) + 1))


def test_sigterm_and_sigint_do_not_stop_a_process_its_parent_stops_it(db: Database, tmp_path: Path) -> None:
    """systemd and a terminal signal the whole group: the process answers what it has, and stops
    when its parent closes its pipe."""
    d, chain, child = _enrolled(db, tmp_path, 6)
    child.process(d.dev, batch(*chain[:3]), NOW)
    pid = child.pid
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGINT)
    time.sleep(0.2)
    assert child.process(d.dev, batch(*chain[3:]), NOW).ack.through == len(chain)
    assert child.pid == pid
    child.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_failures_in_the_process_are_raised_as_in_the_thread() -> None:
    assert isinstance(Failure("lock_timeout", "device x is locked").exception(), LockTimeout)
    full = Failure("storage", "disk full", "database or disk is full").exception()
    assert isinstance(full, StorageUnavailable)
    assert storage.failure(full) == "database or disk is full"
    other = Failure("error", "KeyError: 'x'").exception()
    assert isinstance(other, BatchFailed) and storage.failure(other) is None


def test_a_batch_that_fails_in_the_process_is_answered_and_the_process_goes_on(
        db: Database, tmp_path: Path) -> None:
    """A batch whose storing raises (here: a device row the schema refuses) is a Failure, the
    process keeps serving; the stored rows are untouched."""
    d, chain, child = _enrolled(db, tmp_path, 6)
    try:
        child.process(d.dev, batch(*chain[:3]), NOW)
        before = _state(db)
        pid = child.pid
        with pytest.raises(BatchFailed, match="OverflowError|TypeError|DataError|NumericValue|out of range"):
            child.process(d.dev, batch(*chain[3:]), 2**70)        # a clock no column can hold
        assert _state(db) == before
        assert child.pid == pid                                   # the same process goes on
        assert child.process(d.dev, batch(*chain[3:]), NOW).ack.through == len(chain)
    finally:
        child.close()


def test_batches_of_several_devices_stored_together_as_each_alone(twin: Any, tmp_path: Path) -> None:
    """``process_many``: on SQLite one transaction for all; each batch comes out as it would
    alone, and one that fails (a clock no column can hold) fails alone."""
    d, (here, there) = twin
    others = [Dongle() for _ in range(3)]
    for o in others:
        enroll(here, o)
        enroll(there, o)
    rules, theirs_rules = _live(here, tmp_path), _live(there, tmp_path)
    chains = {x.dev: _chain(x, 12) for x in (d, *others)}
    rounds = [[(dev, batch(*recs[i:i + 4]), NOW) for dev, recs in chains.items()] for i in range(0, 13, 4)]
    rounds[1][2] = (rounds[1][2][0], rounds[1][2][1], 2**70)
    child = BatchProcess(Setup.of(there, theirs_rules, DEFAULT_LIMITS), "test-ingest")
    try:
        for group in rounds:
            theirs = child.process_many(group)
            assert len(theirs) == len(group)
            for (dev, body, now), answer in zip(group, theirs, strict=True):
                if now == 2**70:
                    assert isinstance(answer, BatchFailed)
                    with pytest.raises(Exception):              # noqa: B017 - whichever the database raises
                        store.process_batch(here, rules, dev, body, now)
                    continue
                assert answer == store.process_batch(here, rules, dev, body, now)
    finally:
        child.close()
    assert _state(there) == _state(here)
    assert len(_state(here)["records"]) > 40

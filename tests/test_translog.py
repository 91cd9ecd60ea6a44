from __future__ import annotations

import threading
import time

import pytest

from backend.db import Database, Tx
from backend.transparency import translog
from protocol import checkpoint, merkle
from tests.ledger_support import open_db


def _append(db: Database, n: int, start: int = 0) -> int:
    """Store ``n`` entries and have the sequencer integrate them; the log's size after."""
    with db.write() as tx:
        for i in range(start, start + n):
            translog.append(tx, "record", f"r{i}", b"entry %d" % i)
    return translog.integrate_all(db)


def test_roots_and_proofs_match_the_reference(db_url: str) -> None:
    db = open_db(db_url)
    entries = [b"entry %d" % i for i in range(37)]
    leaves = [merkle.leaf_hash(e) for e in entries]
    with db.read() as tx:
        assert translog.root(tx) == merkle.EMPTY_ROOT
    for i, e in enumerate(entries):
        with db.write() as tx:
            translog.append(tx, "record", f"r{i}", e)
        if i % 5 == 0 or i == len(entries) - 1:      # integrated in batches of several sizes
            translog.integrate_all(db)
            with db.read() as tx:
                assert translog.root(tx) == merkle.root(leaves[:i + 1])
    with db.read() as tx:
        for size in (1, 2, 3, 8, 13, 32, 37):
            proofs = translog.inclusion_proofs(tx, range(size), size)
            for i, proof in enumerate(proofs):
                assert proof == merkle.inclusion_proof(i, leaves[:size])
                assert merkle.root_from_inclusion(i, size, leaves[i], proof) == merkle.root(leaves[:size])
        for old in (1, 5, 16, 36, 37):
            proof = translog.consistency_proof(tx, old, 37)
            assert proof == merkle.consistency_proof(old, leaves)
            assert merkle.verify_consistency(old, 37, merkle.root(leaves[:old]), merkle.root(leaves), proof)
        assert translog.leaf_index(tx, "r12") == 12 and translog.leaf_index(tx, "nope") is None
        with pytest.raises(ValueError, match="outside"):
            translog.inclusion_proofs(tx, [37], 37)
    db.close()


def test_an_entry_is_logged_once_and_never_changes(db_url: str) -> None:
    db = open_db(db_url)
    _append(db, 3)
    with db.write() as tx:
        translog.append(tx, "record", "r1", b"entry 1")          # again: a no-op
        translog.append(tx, "record", "r3", b"entry 3")          # stored, not yet integrated
        translog.append(tx, "record", "r3", b"entry 3")
    for ref in ("r1", "r3"):
        with pytest.raises(translog.TranslogError, match="other content"), db.write() as tx:
            translog.append(tx, "record", ref, b"changed")
    with pytest.raises(ValueError, match="entry kind"), db.write() as tx:
        translog.append(tx, "device", "d1", b"x")
    assert translog.integrate_all(db) == 4
    with db.read() as tx:
        assert translog.leaf_index(tx, "r1") == 1 and translog.leaf_index(tx, "r3") == 3
    db.close()


def test_checkpoints_are_signed_and_reused_until_the_log_grows(db_url: str) -> None:
    db = open_db(db_url)
    empty = translog.checkpoint(db, 1000)
    assert empty["size"] == 0 and empty["root"] == merkle.EMPTY_ROOT.hex()
    _append(db, 5)
    first = translog.checkpoint(db, 2000)
    assert first["size"] == 5 and first["t"] == 2000 and first["cosignatures"] == 0
    assert translog.checkpoint(db, 3000) == first           # unchanged: the same signed checkpoint
    assert translog.latest_checkpoint(db) == first
    verifier = translog.verifier(db)
    cp = checkpoint.open_note(first["note"], verifier)
    assert cp.size == 5 and cp.root.hex() == first["root"] and cp.origin == first["origin"] == verifier.name
    _append(db, 2, start=5)
    second = translog.checkpoint(db, 4000)
    assert second["size"] == 7
    with db.read() as tx:
        proof = translog.consistency_proof(tx, 5, 7)
    new = checkpoint.open_note(second["note"], verifier)
    assert merkle.verify_consistency(5, 7, cp.root, new.root, proof)
    db.close()
    # the key and the origin are kept in the database: a new process signs with the same ones
    again = Database.open(db_url)
    assert translog.verifier(again) == verifier
    again.close()


def test_two_writers_never_share_an_index(db_url: str) -> None:
    """Two connections (as two backend processes would have) append at once."""
    open_db(db_url).close()
    errors: list[BaseException] = []

    def writer(name: str) -> None:
        db = Database.open(db_url)
        try:
            for i in range(25):
                with db.write() as tx:
                    translog.append(tx, "transfer", f"{name}-{i}", f"{name} {i}".encode())
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            db.close()

    def sequencer() -> None:
        db = Database.open(db_url)
        try:
            while not done.is_set():
                translog.integrate(db)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            db.close()

    done = threading.Event()
    threads = [threading.Thread(target=writer, args=(n,)) for n in ("a", "b", "c")]
    sequencers = [threading.Thread(target=sequencer) for _ in range(2)]   # two processes' sequencers
    for t in (*threads, *sequencers):
        t.start()
    for t in threads:
        t.join()
    done.set()
    for t in sequencers:
        t.join()
    assert not errors
    db = Database.open(db_url)
    assert translog.integrate_all(db) == 75
    rows = db.query("SELECT idx, entry FROM translog ORDER BY idx")
    assert [r["idx"] for r in rows] == list(range(75))
    with db.read() as tx:
        assert translog.root(tx) == merkle.root([merkle.leaf_hash(bytes(r["entry"])) for r in rows])
    db.close()


def test_a_sequencer_that_dies_mid_batch_loses_nothing(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    db = open_db(db_url)
    _append(db, 3)
    with db.write() as tx:
        for i in range(3, 10):
            translog.append(tx, "record", f"r{i}", b"entry %d" % i)
    real = translog.insert_many

    def dies(tx: object, table: str, *args: object) -> None:
        if table == "translog_nodes":
            raise RuntimeError("killed mid-batch")
        real(tx, table, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(translog, "insert_many", dies)
    with pytest.raises(RuntimeError, match="killed"):
        translog.integrate(db)
    monkeypatch.setattr(translog, "insert_many", real)
    with db.read() as tx:
        assert translog.size(tx) == 3 and translog.queued(tx) == 7
    assert translog.integrate_all(db) == 10
    with db.read() as tx:
        assert translog.root(tx) == merkle.root([merkle.leaf_hash(b"entry %d" % i) for i in range(10)])
        assert translog.queued(tx) == 0
    db.close()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)     # SQLite has one writer at a time
def test_storing_an_entry_waits_for_no_sequencer(db_url: str) -> None:
    """A sequencer stopped in the middle of its transaction (holding the log's lock) does not
    stop writers from storing entries: ingest takes no lock that every device shares."""
    db = open_db(db_url)
    holding, release = threading.Event(), threading.Event()

    def frozen_sequencer() -> None:
        other = Database.open(db_url)
        try:
            with other.write() as tx:
                translog.lock(tx, translog.LOCK)
                holding.set()
                release.wait(20)
        finally:
            other.close()

    t = threading.Thread(target=frozen_sequencer)
    t.start()
    try:
        assert holding.wait(10)
        started = time.monotonic()
        with db.write() as tx:
            translog.append(tx, "record", "while-frozen", b"stored at once")
        assert time.monotonic() - started < 2
        assert translog.integrate(db).size is None          # the other sequencer holds the lock
    finally:
        release.set()
        t.join()
    assert translog.integrate_all(db) == 1
    db.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)      # planned outside the lock on SQLite only
def test_a_plan_made_before_another_sequencer_ran_is_made_again(db_url: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    db, other = open_db(db_url), Database.open(db_url)
    _append(db, 5)
    with db.write() as tx:
        for i in range(5, 12):
            translog.append(tx, "record", f"r{i}", b"entry %d" % i)
    real_plan = translog._plan
    plans: list[int] = []

    def plan_then_race(tx: Tx, limit: int, at: int) -> translog._Plan:
        made = real_plan(tx, limit, at)
        plans.append(made.size)
        if len(plans) == 1:                 # another process's sequencer integrates some meanwhile
            translog.integrate(other, limit=3)
        return made

    monkeypatch.setattr(translog, "_plan", plan_then_race)
    done = translog.integrate(db)
    monkeypatch.setattr(translog, "_plan", real_plan)
    # ours (5), the other's (5, used), ours again inside the transaction: the tree had grown to 8
    assert plans == [5, 5, 8]
    assert done.entries == 4 and done.size == 12
    with db.read() as tx:
        assert translog.queued(tx) == 0
        assert translog.root(tx) == merkle.root([merkle.leaf_hash(b"entry %d" % i) for i in range(12)])
        assert [translog.leaf_index(tx, f"r{i}") for i in range(12)] == list(range(12))
    other.close()
    db.close()

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from agent.buffer import Outbox
from agent.clock import Clock
from agent.errors import StorageError
from agent.recorder import Recorder
from protocol import records
from protocol.identity import SigningKey
from protocol.messages import Ack, Rejection
from protocol.records import GENESIS
from tests.fakes import FakeReading, counter

ODO = FakeReading("odometer", {"odo_m": 1000, "src": "obd"})


def _recorder(path: Path, key: SigningKey, **kw: object) -> Recorder:
    return Recorder(Outbox.open(path), key, clock=Clock("synced"), boot="b1", wall=counter(), **kw)  # type: ignore[arg-type]


def _chain_ok(box: Outbox, key: SigningKey) -> list[int]:
    prev = GENESIS
    seqs = []
    for row in box.records(limit=100_000):
        rec = records.verify(row.jws, key.public)
        assert rec.seq == row.seq and rec.prev == prev and rec.id == row.id
        prev = rec.id
        seqs.append(rec.seq)
    return seqs


def test_append_signs_a_gap_free_chain_and_saves_state_in_the_same_transaction(tmp_path: Path) -> None:
    key = SigningKey.generate()
    rec = _recorder(tmp_path / "o.db", key)
    out = rec.record([ODO, FakeReading("trip", {"start_t": 1, "end_t": 2, "start_odo_m": 0, "end_odo_m": 1000,
                                                "max_kph": 50, "src": "obd"})], {"vehicle": {"x": 1}})
    assert [r.seq for r in out] == [1, 2]
    assert rec.outbox.state("vehicle") == {"x": 1}
    assert rec.outbox.tip() == (2, out[1].id)
    assert _chain_ok(rec.outbox, key) == [1, 2]
    assert rec.outbox.get(2).odo_m == 1000  # type: ignore[union-attr]


def test_a_builder_that_fails_changes_nothing(tmp_path: Path) -> None:
    key = SigningKey.generate()
    rec = _recorder(tmp_path / "o.db", key)
    rec.record([ODO], {"vehicle": {"n": 1}})

    def boom(seq: int, prev: str) -> records.Record:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        rec.outbox.append([rec._builder(rec.stamp("odometer", ODO.fields)), boom], {"vehicle": {"n": 2}})  # type: ignore[arg-type]
    assert rec.outbox.tip()[0] == 1 and rec.outbox.state("vehicle") == {"n": 1}
    assert rec.record([ODO])[0].seq == 2


def _append_many(path: str, pem: bytes, n: int) -> None:
    key = SigningKey.from_pem(pem)
    rec = Recorder(Outbox.open(Path(path)), key, clock=Clock("synced"), boot="b2")
    for _ in range(n):
        assert rec.record([ODO])


def test_two_processes_appending_keep_seqs_unique_and_gap_free(tmp_path: Path) -> None:
    key = SigningKey.generate()
    path = tmp_path / "o.db"
    Outbox.open(path).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(path), key.to_pem(), 150)) for _ in range(2)]
    for p in procs:
        p.start()
    _append_many(str(path), key.to_pem(), 100)  # and this process too
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    box = Outbox.open(path)
    assert _chain_ok(box, key) == list(range(1, 401))


def test_records_are_synced_only_when_an_ack_covers_them(tmp_path: Path) -> None:
    rec = _recorder(tmp_path / "o.db", SigningKey.generate())
    for _ in range(5):
        rec.record([ODO])
    box = rec.outbox
    assert box.backlog() == 5 and box.first_unsynced() == 1
    out = box.apply_ack(Ack(3, (Rejection(2, "odometer_rollback"),), 1500), 42)
    assert out.through == 3 and out.newly_synced == 3 and out.pending == ()
    assert [r.synced for r in box.records()] == [True, True, True, False, False]
    assert box.get(2).rejected == "odometer_rollback" and box.get(1).rejected is None  # type: ignore[union-attr]
    assert box.get(1).acked_at == 42  # type: ignore[union-attr]
    assert box.state("ack") == {"through": 3, "t": 42, "balance": 1500}
    assert box.first_unsynced() == 4 and box.counts().synced_through == 3
    # an older ack never moves `through` back
    box.apply_ack(Ack(1), 50)
    assert box.counts().synced_through == 3


def test_a_rejection_that_does_not_take_the_seq_leaves_the_record_to_be_sent_again(tmp_path: Path) -> None:
    rec = _recorder(tmp_path / "o.db", SigningKey.generate())
    rec.record([ODO, ODO])
    out = rec.outbox.apply_ack(Ack(0, (Rejection(1, "unknown_device"), Rejection(2, "unknown_device"))), 7)
    assert out.newly_synced == 0 and len(out.pending) == 2
    assert rec.outbox.backlog() == 2 and rec.outbox.get(1).rejected is None  # type: ignore[union-attr]
    assert rec.outbox.state("last_rejection") == {"seq": 2, "reason": "unknown_device", "t": 7}
    rec.outbox.apply_ack(Ack(2), 8)
    assert rec.outbox.backlog() == 0 and rec.outbox.state("last_rejection") is None


def test_prune_deletes_only_synced_records_and_the_chain_goes_on(tmp_path: Path) -> None:
    key = SigningKey.generate()
    rec = _recorder(tmp_path / "o.db", key)
    rec.record([ODO] * 10)
    box = rec.outbox
    box.apply_ack(Ack(4), 1_000)
    box.apply_ack(Ack(6), 9_000)
    # retention: synced before 5_000 go
    assert box.prune(10_000, retention_ms=5_000, max_records=100) == (4, 0)
    assert [r.seq for r in box.records()] == list(range(5, 11))
    # over the cap: the oldest synced go, never an unsynced one
    assert box.prune(10_000, retention_ms=10**9, max_records=2) == (0, 2)
    assert [r.seq for r in box.records()] == list(range(7, 11))
    box.apply_ack(Ack(10), 20_000)
    tip_id = box.tip()[1]
    assert box.prune(10**9, retention_ms=1, max_records=100) == (4, 0)
    assert box.records() == []
    (new,) = rec.record([ODO])
    assert new.seq == 11 and new.prev == tip_id


def test_migrations_run_once(tmp_path: Path) -> None:
    Outbox.open(tmp_path / "o.db").close()
    box = Outbox.open(tmp_path / "o.db")
    assert box._read("SELECT COUNT(*) FROM migrations")[0][0] == 1
    assert box._read("PRAGMA journal_mode")[0][0] == "wal"
    assert box._read("PRAGMA synchronous")[0][0] == 2  # FULL


def test_a_full_disk_is_an_error_state_and_nothing_is_lost(tmp_path: Path) -> None:
    key = SigningKey.generate()
    rec = _recorder(tmp_path / "o.db", key)
    rec.record([ODO])
    box = rec.outbox
    pages = box._read("PRAGMA page_count")[0][0]
    box._conn.execute(f"PRAGMA max_page_count = {pages}")  # the "disk" is now full
    big = FakeReading("event", {"event": "note", "detail": "x" * 20_000})
    assert rec.record([big, ODO]) == []
    assert rec.error is not None and "full" in rec.error and rec.held == 2
    with pytest.raises(StorageError):
        box.set_state({"y": "z" * 50_000})
    assert box.tip()[0] == 1 and _chain_ok(box, key) == [1]
    box._conn.execute("PRAGMA max_page_count = 1000000")  # space again
    out = rec.record([ODO])
    assert [r.seq for r in out] == [2, 3, 4] and rec.error is None and rec.held == 0
    assert [r.kind for r in out] == ["event", "odometer", "odometer"]
    assert _chain_ok(box, key) == [1, 2, 3, 4]

"""A batch's records are credited and checked as if each came alone: credits planned in the
batch and written at once (``rewards.Pending``), and trips checked against the vehicle's readings
read once per batch (``store._Window``)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from backend.db import Database, insert_many
from backend.ledger.audit import audit
from backend.records import store
from backend.records.store import TRIP_BEFORE_SQL, _Window
from protocol.records import Record
from sim.devices import Dongle, batch, enroll, load_test_rules

NOW = 1_800_000_000_000


def _chain(d: Dongle, n: int, seed: int) -> list[Record]:
    rnd = random.Random(seed)
    out: list[Record] = []
    for i in range(n):
        pick = rnd.random()
        if pick < 0.3:
            out.append(d.trip(rnd.choice([0.5, 3, 12, 40]), minutes=rnd.choice([5, 30, 90])))
        elif pick < 0.36:
            out.append(d.confirmation(f"2026-W{39 + i // 40:02d}"))
        elif pick < 0.4:
            out.append(d.odometer(300, dt_ms=1000))                    # implausible: rejected
            d.odo_m -= 300_000
        else:
            out.append(d.odometer(rnd.choice([0.2, 1, 8]), dt_ms=rnd.choice([10_000, 600_000, 3_600_000])))
    return out


def _outcome(db: Database) -> dict[str, Any]:
    transfers = {(r["key"], r["to_account"], r["amount"], r["rules_sha256"])
                 for r in db.query("SELECT key, to_account, amount, rules_sha256 FROM transfers")}
    recs = [(r["seq"], r["status"], r["reason"], r["base_odo_m"])
            for r in db.query("SELECT seq, status, reason, base_odo_m FROM records ORDER BY seq")]
    logged = {str(r["ref"])
              for r in db.query("SELECT ref FROM translog_queue UNION SELECT ref FROM translog")}
    return {"transfers": transfers, "records": recs, "logged": logged}


def _run(url: str, tmp: Path, d: Dongle, chain: list[Record], size: int) -> dict[str, Any]:
    db = Database.open(url)
    db.migrate()
    enroll(db, d)
    rules = load_test_rules(tmp)
    for i in range(0, len(chain), size):
        store.process_batch(db, rules, d.dev, batch(*chain[i:i + size]), NOW)
    out = _outcome(db)
    out["audit"] = audit(db, rules)
    db.close()
    return out


def test_a_batch_credits_and_checks_as_records_one_by_one(db_url: str, tmp_path: Path) -> None:
    d = Dongle()
    chain = _chain(d, 160, seed=7)
    together = _run(db_url, tmp_path, Dongle(key=d.key, vin=d.vin), chain, 160)
    url_alone = db_url.replace("backend.db", "alone.db") if db_url.startswith("sqlite") else \
        db_url.replace("schema=", "schema=alone_")
    alone = _run(url_alone, tmp_path, Dongle(key=d.key, vin=d.vin), chain, 1)
    assert together["records"] == alone["records"]
    assert together["transfers"] == alone["transfers"]
    assert together["logged"] == alone["logged"]
    assert together["audit"] == [] and alone["audit"] == []
    statuses = {s for _, s, _, _ in together["records"]}
    assert statuses == {"accepted", "rejected"}                       # both kinds were exercised
    keys = [k for k, *_ in together["transfers"]]
    assert any(k.startswith("reward:distance:") for k in keys)
    assert any(k.startswith("reward:weekly-confirmation:") for k in keys)
    assert set(keys) <= together["logged"]                    # every credit is in the log
    # the weekly cap holds inside one batch
    weeks: dict[str, int] = {}
    db = Database.open(db_url)
    for r in db.query("SELECT week, amount FROM transfers WHERE rule_id = 'distance'"):
        weeks[r["week"]] = weeks.get(r["week"], 0) + int(r["amount"])
    db.close()
    assert weeks and max(weeks.values()) <= 5000
    if db_url.startswith("postgresql"):
        from tests.conftest import _drop_schema
        _drop_schema(url_alone.rsplit("schema=", 1)[1])


def test_the_window_reads_what_each_trip_would_read(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    db = Database.open(db_url)
    db.migrate()
    d = Dongle()
    enroll(db, d)
    rnd = random.Random(3)
    vin = "WVWZZZ1JZ99999999"
    rows = []
    for seq in range(1, 400):
        t = rnd.randrange(0, 100_000)
        kind = rnd.choice(["odometer", "odometer", "trip", "confirmation"])
        status = rnd.choice(["accepted", "accepted", "rejected"])
        rows.append((d.dev, seq, f"{seq:064x}", "x", kind, t, t, "synced", "b", 0, vin,
                     rnd.randrange(1000, 2000), "obd", status, None, 0, None))
    with db.write() as tx:
        insert_many(tx, "records", store._RECORD_COLUMNS, rows)
    with db.read() as tx:
        for _ in range(60):
            lo = rnd.randrange(0, 90_000)
            hi = lo + rnd.randrange(0, 30_000)
            window = _Window.read(tx, vin, lo, hi)
            assert window is not None
            for _ in range(5):
                start = rnd.randrange(lo, hi + 1)
                end = rnd.randrange(start, hi + 1)
                before = tx.scalar(TRIP_BEFORE_SQL, (vin, start))
                during = tx.one("SELECT MIN(odo_m) AS lo, MAX(odo_m) AS hi FROM records WHERE vin = ? "
                                "AND t_est >= ? AND t_est <= ? AND status = 'accepted' AND kind = 'odometer' "
                                "AND odo_m IS NOT NULL", (vin, start, end))
                assert during is not None
                expected = (before, during["lo"], during["hi"])
                got = window.context(start, end)
                # ties in time may make the 50 latest differ, never the highest of a strictly rising
                # series: compare on the times that are distinct
                assert got[1:] == expected[1:]
                assert got[0] is not None and expected[0] is not None and got[0] >= expected[0]
    with db.read() as tx:                # too many readings in between: each trip reads its own
        assert _Window.read(tx, vin, 0, 10**9) is not None
        monkeypatch.setattr(store, "WINDOW_ROWS", 10)
        assert _Window.read(tx, vin, 0, 10**9) is None
    db.close()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)    # SQLite: one process, in turn
def test_a_batch_that_overtook_its_predecessor_waits_for_its_commit(db_url: str, tmp_path: Path) -> None:
    """Round robin gives a device's next batch to another process while one stores the batch
    before it: the second waits for that commit instead of answering a gap."""
    import threading
    import time

    db, other = Database.open(db_url), Database.open(db_url)
    db.migrate()
    rules = load_test_rules(tmp_path)
    d = Dongle()
    enroll(db, d)
    first, second, third = ([d.odometer(1) for _ in range(5)] for _ in range(3))
    now = 1_790_100_000_000
    assert store.process_batch(db, rules, d.dev, batch(*first), now).ack.through == 5
    late: list[int] = []

    def predecessor() -> None:           # another process, a little behind
        time.sleep(0.1)
        late.append(store.process_batch(other, rules, d.dev, batch(*second), now + 50).ack.through)
        other.close()                    # this thread's connection

    t = threading.Thread(target=predecessor)
    t.start()
    started = time.monotonic()
    ack = store.process_batch(db, rules, d.dev, batch(*third), now + 60).ack
    waited = time.monotonic() - started
    t.join(10)
    assert late == [10] and ack.through == 15 and not ack.rejected
    assert 0.08 < waited < store.PREDECESSOR_WAIT_S + 0.5
    # a real gap (the batch before never comes): answered once the wait is over, the gap kept
    gap = [d.odometer(1) for _ in range(10)][5:]
    started = time.monotonic()
    assert store.process_batch(db, rules, d.dev, batch(*gap), now + 70).ack.through == 15
    assert time.monotonic() - started < store.PREDECESSOR_WAIT_S + 0.5
    # from a device not heard from for a while: at once
    assert not store.await_predecessor(db, d.dev, 99, now + 3_600_000)
    db.close()

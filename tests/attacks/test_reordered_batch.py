"""Attack: a batch whose records come out of order (shuffled on the way, or by an agent that
would have a later reading judged first). Nothing is stored out of its place in the chain: what
does not follow the head is left unacknowledged, and sent again it is accepted in seq order."""

from __future__ import annotations

from typing import Any

from backend.db import Database
from sim.devices import Dongle, enroll
from tests.attacks.support import Target, added, device_row, record_rows
from tests.backend_helpers import snapshot


def test_reordered_batch(db: Database, rules: Any) -> None:
    backend = Target(db, rules)
    car = Dongle()
    enroll(db, car)
    r1, r2, r3, r4 = (car.odometer(1) for _ in range(4))
    confirmed = car.confirmation("2026-W39")
    before = snapshot(db)

    ack = backend.send(car, confirmed, r3, r1, r4, r2)

    # r1 and r2 follow the head in turn; the confirmation (seq 5), r3 and r4 came too early
    assert ack.through == 2 and ack.rejected == () and ack.balance == 0
    assert record_rows(db, car) == [(1, "accepted", None), (2, "accepted", None)]
    assert device_row(db, car)["head_id"] == r2.id
    assert backend.counted("gap") == 3 and backend.counted("accepted") == 2
    grown = added(before, snapshot(db))
    assert grown["translog_queue"] == [{"ref": r1.id}, {"ref": r2.id}] and "transfers" not in grown

    # sent again, still shuffled, then the rest: each record is taken only at its place
    assert backend.send(car, r4, r3).through == 3
    ack = backend.send(car, confirmed, r4)
    assert ack.through == 4 and ack.balance == 0
    ack = backend.send(car, confirmed)
    assert ack.through == 5 and ack.balance == 10_000
    stored = db.query("SELECT seq, id FROM records WHERE dev = ? ORDER BY seq", (car.dev,))
    assert [r["id"] for r in stored] == [r.id for r in (r1, r2, r3, r4, confirmed)]
    assert [t["amount"] for t in added(before, snapshot(db))["transfers"]] == [10_000]

"""Attack: a captured record replayed to be credited again. The weekly confirmation that earned
10 tokens is sent again as it was, then renumbered to the next seq and chained to the head, as
if it were new: the first is a no-op (same seq, same record), the second breaks the signature.
Neither takes a seq nor earns, and the device's own next record is accepted."""

from __future__ import annotations

from typing import Any

from backend.db import Database
from protocol.messages import Ack
from sim.devices import Dongle, enroll
from tests.attacks.support import Target, added, altered, reasons, rejections
from tests.backend_helpers import snapshot


def test_replay_under_another_seq(db: Database, rules: Any) -> None:
    backend = Target(db, rules)
    car = Dongle()
    enroll(db, car)
    confirmed = car.confirmation("2026-W39")
    reading = car.odometer(1)
    assert backend.send(car, confirmed, reading).balance == 10_000
    before = snapshot(db)

    # as captured: the seq is its own and already taken by this very record
    again = backend.send(car, confirmed)
    assert again.through == 2 and again.rejected == () and again.balance == 10_000
    assert backend.counted("duplicate") == 1

    # renumbered to seq 3 and chained to the head: the signature covers seq and prev
    moved = altered(confirmed, seq=3, prev=reading.id)
    ack = backend.send(car, moved)
    assert ack.through == 2 and reasons(ack) == [(3, "bad_signature")] and ack.balance == 10_000
    assert rejections(db, car) == [{"seq": 3, "reason": "bad_signature", "body": moved}]
    assert backend.counted("rejected", "bad_signature") == 1
    assert snapshot(db) == before and added(before, snapshot(db)) == {}      # one credit, still

    # the device's own seq 3 takes the place the replay asked for
    own = car.odometer(1)
    assert backend.send(car, own) == Ack(3, (), 10_000)
    assert db.one("SELECT id FROM records WHERE seq = 3") == {"id": own.id}

"""The ledger side behind the real ingest path (``backend.records.store.process_batch``): what ingest
credits, the audit recomputes to the same result, and the certificate of the car verifies."""

from __future__ import annotations

from backend.ledger import accounts, assignments, audit
from backend.records import devices
from backend.records.store import process_batch
from backend.transparency import certificate, translog
from protocol import certificate as pc
from protocol import messages
from protocol.records import Record
from tests.ledger_support import DAY, MONDAY, WEEK, Car, make_rules, open_db

RULES = make_rules()


def _send(car: Car, recs: list[Record], now_ms: int) -> messages.Ack:
    body = messages.encode_batch([r.jws for r in recs])
    return process_batch(car.db, RULES, car.dev, body, now_ms).ack


def test_ingest_credits_what_the_audit_recomputes(db_url: str) -> None:
    db = open_db(db_url)
    car = Car(db)
    first = [car.odometer(MONDAY)]
    for week in range(5):
        first.append(car.trip(MONDAY + week * WEEK + DAY, 150_000))
        first.append(car.confirm(MONDAY + week * WEEK + DAY + 60_000))
    ack = _send(car, first, MONDAY + 5 * WEEK)
    assert ack.through == len(first) and not ack.rejected
    # weekly 5 × 10 tokens, one streak of 4 weeks, distance 1.5 tokens a week
    assert ack.balance == 5 * 10000 + 20000 + 5 * 1500
    again = _send(car, first, MONDAY + 5 * WEEK + 1)          # redelivered: nothing credited twice
    assert again.balance == ack.balance

    assignments.add_driver(db, "alice", None, 1)
    moved = assignments.assign(db, "alice", car.vin or "", MONDAY + 3 * WEEK, MONDAY + 5 * WEEK)
    assert len(moved) == 2 + 2 + 1                           # weeks 3 and 4: weekly + trip; the streak
    rollback = car.sign("odometer", MONDAY + 5 * WEEK + DAY, odo_m=car.odo_m - 10_000, src="obd")
    car.odo_m += 1000
    later = [rollback, car.confirm(MONDAY + 5 * WEEK + 2 * DAY, odo_m=car.odo_m, device_odo_m=car.odo_m)]
    ack = _send(car, later, MONDAY + 6 * WEEK)
    assert [r.reason for r in ack.rejected] == ["odometer_rollback"] and ack.through == len(first) + 2
    # the rollback flags the device: the confirmation after it is accepted, but its reward is held
    held = 2 * 10000 + 20000 + 2 * 1500
    with db.read() as tx:
        assert accounts.balance(tx, "driver:alice") == ack.balance == held
    assert devices.get_device(db, car.dev)["held_since"] == MONDAY + 6 * WEEK
    assert audit.audit(db, RULES) == []
    # an operator looks into it and clears the flag: what was held is credited, once
    devices.clear(db, RULES, car.dev, MONDAY + 6 * WEEK + 1, "test")
    devices_row = devices.get_device(db, car.dev)
    assert devices_row["held_since"] is None
    with db.read() as tx:
        assert accounts.balance(tx, "driver:alice") == held + 10000
    assert audit.audit(db, RULES) == []

    cert = certificate.build(db, car.vin or "", MONDAY + 6 * WEEK)
    proven = pc.verify(pc.encode(cert), translog.public_key(db))
    assert len(proven.records) == len(first) + 1
    gaps = [(g.first_seq, g.notes) for g in proven.gaps]
    assert gaps == [(len(first) + 1, ("rejected: odometer_rollback",))]
    db.close()

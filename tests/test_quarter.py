"""A quarter of a small fleet, end to end through the real ingest (mosquitto, ``Ingest``, the
database): three drivers share four cars for 13 weeks, with a swap of two cars in week 5, a pool
car claimed with a pairing code in week 9, a rules change that takes effect in week 7 (published
in week 6), a batch delivered twice, and the backend restarted while it credits. The balances are
those of the table below, worked out by hand, and ``rewards audit`` is clean. On SQLite and
PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from backend import cli as backend_cli
from backend.db import Database
from backend.ledger import accounts, assignments, audit, claims, contracts
from backend.ledger.rules import load_rules
from protocol.records import Record, iso_week
from sim.broker import Broker, quiet_broker
from tests.ledger_support import DAY, MONDAY, WEEK, Car, open_db
from tests.rules_support import SimClock, Wire, client_id, rules_toml, start_ingest, write

Q0 = MONDAY                                   # Monday 2026-01-05 10:00 UTC, week 0 (2026-W02)
WEEKS = 13
CHANGE = 7                                    # v2 is in force from Monday of week 7
V1 = rules_toml("q1-v1", Q0 - 2 * WEEK)       # weekly 10 tokens, 10/km capped at 5 a week, streak 20
V2 = rules_toml("q1-v2", Q0 + CHANGE * WEEK, weekly=12000, per_km=20, cap=8000, streak=30000)

#: Each car's week: trips (km) on Tuesday, a confirmation on Wednesday (except C in week 2).
TRIPS_KM = {("B", 3): [150, 150, 150, 150], ("C", 10): [150, 150, 150]}
NO_CONFIRMATION = {("C", 2)}

#: Worked out by hand, in milli-tokens. v1 (weeks 0-6): weekly 10000, 10 per km (100 km: 1000)
#: capped at 5000 a week, a streak of 4 confirmed weeks 20000; v2 (weeks 7-12): weekly 12000,
#: 20 per km (100 km: 2000) capped at 8000, streak 30000. A streak is decided by the version in
#: force at the confirmation that closes it.
#:
#:  car  weeks  to                 weekly             distance                    streaks          total
#:  A    0-4    alice      5 x 10000 =  50000   5 x 1000 =  5000              W3 (v1) 20000      75000
#:  A    5-12   bob        2 x 10000 + 6 x 12000 = 92000   2 x 1000 + 6 x 2000 = 14000
#:                                                                   W7, W11 (v2) 2 x 30000   166000
#:  B    0-4    bob        5 x 10000 =  50000   4 x 1000 + 5000 (week 3: 4 x 150 km,
#:                                              1500+1500+1500+500, capped) = 9000
#:                                                                            W3 (v1) 20000      79000
#:  B    5-12   alice      as A 5-12                                                            166000
#:  C    0-12   carol      weeks 0,1,3-6: 6 x 10000 + 6 x 12000 = 132000
#:                         7 x 1000 + 5 x 2000 + 8000 (week 10: 3 x 150 km, 3000+3000+2000) = 25000
#:                         the run 3-6 closes W6 (v1) 20000, 7-10 closes W10 (v2) 30000            207000
#:  D    0-8    unassigned 7 x 10000 + 2 x 12000 = 94000   7 x 1000 + 2 x 2000 = 11000
#:                                                             W3 (v1) 20000, W7 (v2) 30000   155000
#:  D    9-12   carol      4 x 12000 = 48000   4 x 2000 = 8000                W11 (v2) 30000     86000
TABLE = [("A", "alice", 50000 + 5000 + 20000), ("A", "bob", 92000 + 14000 + 60000),
         ("B", "bob", 50000 + 9000 + 20000), ("B", "alice", 92000 + 14000 + 60000),
         ("C", "carol", 132000 + 25000 + 20000 + 30000),
         ("D", None, 94000 + 11000 + 20000 + 30000), ("D", "carol", 48000 + 8000 + 30000)]
BALANCES = {"alice": 241000, "bob": 245000, "carol": 293000, None: 155000}


@pytest.fixture
def own_broker() -> Iterator[Broker]:
    b = quiet_broker()
    yield b
    b.stop()


def test_the_table_adds_up() -> None:
    for who, total in BALANCES.items():
        assert sum(amount for _, driver, amount in TABLE if driver == who) == total


def _week(car: Car, name: str, w: int) -> list[Record]:
    monday = Q0 + w * WEEK
    recs = [car.trip(monday + DAY + i * 4 * 3600_000, km * 1000)
            for i, km in enumerate(TRIPS_KM.get((name, w), [100]))]
    if (name, w) not in NO_CONFIRMATION:
        recs.append(car.confirm(monday + 2 * DAY))
    return recs


class Fleet:
    """The four cars on the wire, sent to as their agents do: again until acknowledged."""

    def __init__(self, db: Database, broker: Broker) -> None:
        self.cars = {name: Car(db) for name in "ABCD"}
        self.wire = Wire(broker, [c.dev for c in self.cars.values()])
        self.pending: dict[str, list[Record]] = {}

    def send(self, name: str, recs: list[Record]) -> None:
        self.pending[name] = recs
        self.wire.send(self.cars[name].dev, recs)

    def settle(self) -> None:
        """Wait for every car's acknowledgement, sending again what gets none (as an agent does)."""
        for name, recs in self.pending.items():
            dev = self.cars[name].dev
            for _ in range(4):
                if self.wire.wait_through(dev, recs[-1].seq, timeout=5):
                    break
                self.wire.send(dev, recs)
            else:
                pytest.fail(f"car {name}: seq {recs[-1].seq} never acknowledged")
        self.pending = {}


def test_a_quarter_of_three_drivers_and_four_cars(db_url: str, tmp_path: Path, own_broker: Broker,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    db = open_db(db_url)
    assert contracts.publish(db, load_rules(write(tmp_path / "v1.toml", V1)), Q0 - 3 * WEEK).new
    fleet = Fleet(db, own_broker)
    cars = fleet.cars
    for driver in ("alice", "bob", "carol"):
        assignments.add_driver(db, driver, None, Q0 - 3 * WEEK)
    for driver, name in (("alice", "A"), ("bob", "B"), ("carol", "C")):
        assignments.assign(db, driver, cars[name].vin or "", Q0 - 2 * DAY, Q0 - 2 * DAY)
    clock = SimClock(Q0 - DAY + 3600_000)
    cid = client_id()
    ingest, _ = start_ingest(db_url, own_broker, clock, cid)
    try:
        for name, car in cars.items():                       # each car's first reading: trips earn from it
            fleet.send(name, [car.odometer(Q0 - DAY)])
        fleet.settle()
        for w in range(WEEKS):
            clock.now = Q0 + w * WEEK
            if w == 5:                                       # alice and bob swap cars A and B
                assignments.assign(db, "bob", cars["A"].vin or "", clock.now, clock.now)
                assignments.assign(db, "alice", cars["B"].vin or "", clock.now, clock.now)
            if w == 9:                                       # carol claims the pool car D at the dongle
                code = claims.pairing_code(db, "carol", clock.now)
                assert claims.claim(db, cars["D"].dev, code, clock.now).created
            clock.now = Q0 + w * WEEK + 4 * DAY              # received on Friday
            batches = {name: _week(car, name, w) for name, car in cars.items()}
            for name, recs in batches.items():
                fleet.send(name, recs)
                if w == 4:                                   # redelivered: the same batch twice
                    fleet.wire.send(cars[name].dev, recs)
            if w == 8:                                       # restarted while it credits
                ingest.stop()
                ingest, _ = start_ingest(db_url, own_broker, clock, cid)
            fleet.settle()
            if w == CHANGE - 1:                              # v2 published on Friday of week 6
                clock.now += 3600_000
                with pytest.raises(contracts.PublishError, match="later than every accepted reading"):
                    contracts.publish(db, load_rules(write(tmp_path / "early.toml",
                                                           rules_toml("q1-v2", Q0 + 6 * WEEK))), clock.now)
                assert contracts.publish(db, load_rules(write(tmp_path / "v2.toml", V2)), clock.now).new
    finally:
        fleet.wire.close()
        ingest.stop()

    with db.read() as tx:
        pool = f"unassigned:{cars['D'].dev}"
        got = {who: accounts.balance(tx, accounts.driver_account(who) if who else pool) for who in BALANCES}
        issuer = accounts.balance(tx, accounts.ISSUER)
        rows = tx.query("SELECT key, week, rules_version, rules_sha256 FROM transfers "
                        "WHERE key LIKE 'reward:%'")
    assert got == BALANCES
    assert issuer == -sum(BALANCES.values())
    book = contracts.load_book(db)
    change = iso_week(Q0 + CHANGE * WEEK)
    for r in rows:
        want = book.versions[1] if r["week"] >= change else book.versions[0]
        assert (r["rules_version"], r["rules_sha256"]) == (want.name, want.sha256), r["key"]
    assert audit.audit(db) == []
    assert backend_cli.main(["rewards", "audit", "--db", db_url]) == 0
    assert "every credit matches" in capsys.readouterr().out
    db.close()

"""Cars that sign records, and a minimal stand-in for the ingest path, for the ledger's tests.

``Car.accept`` stores a record the way ingest does for an accepted one (row in
``records``, leaf in the log, rewards credited) in one transaction, without MQTT.
"""

from __future__ import annotations

import datetime
from typing import Any

from backend.db import Database
from backend.ledger import rewards
from backend.ledger.accounts import Transfer
from backend.ledger.rules import Rules, parse
from backend.locks import lock_device, lock_vehicles
from backend.records import device_log
from backend.records.store import TRIP_BEFORE_SQL
from backend.transparency import translog
from protocol import messages, records
from protocol.identity import SigningKey
from protocol.records import GENESIS, Record
from sim.devices import fresh_vin

FRESH = "fresh"       # Car(db): a VIN of its own

#: Monday 2026-01-05 10:00 UTC, in ISO week 2026-W02.
MONDAY = int(datetime.datetime(2026, 1, 5, 10, 0, tzinfo=datetime.UTC).timestamp() * 1000)
DAY = 24 * 3600 * 1000
WEEK = 7 * DAY

RULES_DOC: dict[str, Any] = {
    "version": "test-1",
    "max_speed_kph": 250,
    "rule": [
        {"id": "weekly-confirmation", "on": "confirmation", "per": "week", "milli_tokens": 10000,
         "tolerance_m": 2000},
        {"id": "distance", "on": "trip", "milli_tokens_per_km": 10, "cap_milli_tokens_per_week": 5000},
        {"id": "streak", "on": "confirmation", "every_weeks": 4, "milli_tokens": 20000},
    ],
    "catalogue": [{"item": "tyre-voucher", "milli_tokens": 500000},
                  {"item": "car-wash", "milli_tokens": 30000}],
}


def make_rules() -> Rules:
    return parse(RULES_DOC, "test rules")


def open_db(url: str) -> Database:
    db = Database.open(url)
    db.migrate()
    return db


class Car:
    """One dongle in one car: it signs a chain of records and can have them accepted."""

    def __init__(self, db: Database, vin: str | None = FRESH, *, fleet_token: str | None = None,
                 register: bool = True) -> None:
        # ``fleet_token`` is what the device sent beside its enrolment: as the backend, this never
        # stores it (the signed enrolment does not hold it).
        del fleet_token
        self.db = db
        self.vin = fresh_vin() if vin == FRESH else vin
        self.key = SigningKey.generate()
        self.dev = self.key.public.id
        self.seq = 0
        self.prev = GENESIS
        self.odo_m = 10_000_000
        if register:
            enrol = messages.sign_enrollment(self.key, self.vin, MONDAY - WEEK)
            with db.write() as tx:      # enrolled and approved, and logged, as the backend does
                tx.execute("INSERT INTO devices (dev, pub, vin, status, enrollment, enrolled_at, decided_at, "
                           "decided_by, approved_at) VALUES (?, ?, ?, 'approved', ?, ?, ?, 'fleet-token', ?)",
                           (self.dev, self.key.public.raw, self.vin, enrol, MONDAY - WEEK,
                            MONDAY - WEEK + 1000, MONDAY - WEEK + 1000))
                device_log.log_enrolment(tx, messages.verify_enrollment(enrol), MONDAY - WEEK)
                device_log.log_decision(tx, "approve", self.dev, self.vin, "fleet-token",
                                        MONDAY - WEEK + 1000)

    @property
    def device(self) -> dict[str, Any]:
        row = self.db.one("SELECT * FROM devices WHERE dev = ?", (self.dev,))
        return row if row is not None else {"dev": self.dev, "vin": self.vin}

    def sign(self, kind: str, t: int, *, clock: str = "synced", vin: Any = "car", prev: str | None = None,
             **fields: Any) -> Record:
        self.seq += 1
        payload = {"dev": self.dev, "seq": self.seq, "prev": self.prev if prev is None else prev,
                   "kind": kind, "t": t, "clock": clock, "boot": f"b{t // DAY}", "mono_ms": t % DAY,
                   "vin": self.vin if vin == "car" else vin, **fields}
        record = records.sign(self.key, payload)
        self.prev = record.id
        return record

    def odometer(self, t: int, odo_m: int | None = None, src: str = "obd", **kw: Any) -> Record:
        self.odo_m = self.odo_m if odo_m is None else odo_m
        return self.sign("odometer", t, odo_m=self.odo_m, src=src, **kw)

    def trip(self, t: int, metres: int, **kw: Any) -> Record:
        start = self.odo_m
        self.odo_m += metres
        return self.sign("trip", t, start_t=t - 3_600_000, end_t=t, start_odo_m=start, end_odo_m=self.odo_m,
                         max_kph=90, src="obd", **kw)

    def confirm(self, t: int, *, week: str | None = None, odo_m: int | None = None,
                device_odo_m: Any = "same", **kw: Any) -> Record:
        figure = self.odo_m if odo_m is None else odo_m
        return self.sign("confirmation", t, odo_m=figure,
                         device_odo_m=self.odo_m if device_odo_m == "same" else device_odo_m,
                         week=week or records.iso_week(t), **kw)

    def store(self, record: Record, *, status: str = "accepted", reason: str | None = None,
              t_est: int | None = None, rules: Rules | None = None,
              now_ms: int | None = None) -> list[Transfer]:
        """Store ``record`` as ingest would (under the device's and the vehicle's locks);
        accepted ones are logged and credited."""
        with self.db.write() as tx:
            lock_device(self.db, tx, record.dev)
            lock_vehicles(self.db, tx, [v for v in (record.vin, self.vin) if v is not None])
            base = None
            if record.kind == "trip" and record.vin is not None:     # as ingest finds it
                base = tx.scalar(TRIP_BEFORE_SQL, (record.vin, int(record.fields["start_t"])))
            tx.execute(
                "INSERT INTO records (dev, seq, id, jws, kind, t, t_est, clock, boot, mono_ms, vin, odo_m, "
                "src, status, reason, received_at, base_odo_m) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.dev, record.seq, record.id, record.jws, record.kind, record.t,
                 record.t if t_est is None else t_est, record.clock, record.boot, record.mono_ms, record.vin,
                 record.odo_m, record.fields.get("src"), status, reason, record.t, base))
            tx.execute("UPDATE devices SET through = ?, head_id = ? WHERE dev = ?",
                       (record.seq, record.id, record.dev))
            if status != "accepted":
                return []
            translog.append(tx, "record", record.id, record.jws.encode("ascii"))
            device = tx.one("SELECT * FROM devices WHERE dev = ?", (record.dev,)) or {"vin": self.vin}
            return rewards.credit(tx, rules or make_rules(), record, device,
                                  record.t if now_ms is None else now_ms)

    def redeliver(self, record: Record, rules: Rules | None = None) -> list[Transfer]:
        """What crediting the same record again gives (ingest treats it as a no-op; keys must too)."""
        device = self.device
        with self.db.write() as tx:
            return rewards.credit(tx, rules or make_rules(), record, device, record.t)

"""A small fleet written straight into the backend's tables, for the dashboard's tests.

Records are really signed (``protocol.records.sign``) and chained; rows are written
as the ingest would store them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from backend.db import Database
from protocol import messages, records
from protocol.identity import SigningKey

DAY = 86_400_000
NOW = 1_795_000_000_000          # 2026-11-18T…Z, fixed so pages are reproducible
PASSWORD = "correct horse battery"


@dataclass
class SeededDevice:
    key: SigningKey
    vin: str | None
    records: list[records.Record] = field(default_factory=list)

    @property
    def dev(self) -> str:
        return self.key.public.id


def add_device(db: Database, vin: str | None, status: str, *, enrolled_at: int,
               flagged_vin: str | None = None, online: bool = False, last_seen: int | None = None,
               status_msg: dict[str, Any] | None = None) -> SeededDevice:
    key = SigningKey.generate()
    enrolment = messages.sign_enrollment(key, vin, enrolled_at)
    with db.write() as tx:
        tx.execute(
            "INSERT INTO devices (dev, pub, vin, status, enrollment, enrolled_at, flagged_vin, last_seen, "
            "status_json, online) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key.public.id, key.public.raw, vin, status, enrolment, enrolled_at, flagged_vin, last_seen,
             json.dumps(status_msg) if status_msg is not None else None, 1 if online else 0))
    return SeededDevice(key, vin)


def add_record(db: Database, device: SeededDevice, kind: str, t: int, *, status: str = "accepted",
               reason: str | None = None, clock: str = "synced", t_est: int | None = None,
               **fields: Any) -> records.Record:
    seq = len(device.records) + 1
    prev = device.records[-1].id if device.records else records.GENESIS
    rec = records.sign(device.key, {
        "dev": device.dev, "seq": seq, "prev": prev, "kind": kind, "t": t, "clock": clock,
        "boot": "boot-1", "mono_ms": seq * 1000, "vin": device.vin, **fields,
    })
    device.records.append(rec)
    with db.write() as tx:
        tx.execute(
            "INSERT INTO records (dev, seq, id, jws, kind, t, t_est, clock, boot, mono_ms, vin, odo_m, src, "
            "status, reason, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (rec.dev, rec.seq, rec.id, rec.jws, rec.kind, rec.t, t if t_est is None else t_est, rec.clock,
             rec.boot, rec.mono_ms, rec.vin, rec.odo_m, fields.get("src"), status, reason,
             (t if t_est is None else t_est) + 5000))
        tx.execute("UPDATE devices SET through = ?, head_id = ? WHERE dev = ?", (seq, rec.id, rec.dev))
    return rec


@dataclass
class Fleet:
    good: SeededDevice
    pending: SeededDevice
    flagged: SeededDevice
    clockless: SeededDevice


def seed(db: Database, now: int = NOW) -> Fleet:
    """Four devices: a healthy one with a driver, a pending enrolment never seen,
    one whose VIN changed with rejections and a fork, and one without a synced clock."""
    db.migrate()
    good = add_device(db, "WVWZZZ1JZXW000001", "approved", enrolled_at=now - 40 * DAY, online=True,
                      last_seen=now - 60_000, status_msg={"online": True, "backlog": 0, "obd": "connected",
                                                         "version": "0.1.0"})
    odo = 41_200_000
    for day in range(30, 0, -1):
        odo += 37_400 + day * 100
        add_record(db, good, "odometer", now - day * DAY, odo_m=odo, src="obd" if day % 2 else "derived")
        if day % 7 == 0:
            add_record(db, good, "confirmation", now - day * DAY + 3_600_000, odo_m=odo + 400,
                       device_odo_m=odo, week=records.iso_week(now - day * DAY))
    add_record(db, good, "trip", now - 3_600_000, start_t=now - 7_200_000, end_t=now - 3_600_000,
               start_odo_m=odo, end_odo_m=odo + 52_300, max_kph=118, src="obd")
    add_record(db, good, "event", now - 1_800_000, event="adapter_lost", detail={"note": "<b>unplugged</b>"})

    pending = add_device(db, "WBA00000000000002", "pending", enrolled_at=now - 3_600_000)

    flagged = add_device(db, "VF1AAAAA555000003", "approved", enrolled_at=now - 90 * DAY,
                         flagged_vin="ZFA31200000000004", online=False, last_seen=now - 2 * DAY,
                         status_msg={"online": False, "backlog": 12})
    add_record(db, flagged, "odometer", now - 5 * DAY, odo_m=120_000_000, src="obd")
    add_record(db, flagged, "odometer", now - 4 * DAY, odo_m=119_000_000, src="obd", status="rejected",
               reason="odometer_rollback")
    with db.write() as tx:
        tx.execute("INSERT INTO rejections (dev, seq, reason, detail, body, received_at) "
                   "VALUES (?, ?, ?, ?, ?, ?)",
                   (flagged.dev, 3, "vin_mismatch", "record VIN ZFA31200000000004 <> VF1AAAAA555000003",
                    "{}", now - 2 * DAY))
        tx.execute("INSERT INTO forks (dev, seq, record_id, jws, received_at) VALUES (?, ?, ?, ?, ?)",
                   (flagged.dev, 2, "f" * 64, "x.y.z", now - 3 * DAY))

    clockless = add_device(db, None, "approved", enrolled_at=now - 10 * DAY, online=True,
                           last_seen=now - 5000, status_msg={"online": True, "backlog": 3})
    add_record(db, clockless, "odometer", 12_345, clock="unsynced", t_est=now - 20_000, odo_m=7_000_000,
               src="obd")

    with db.write() as tx:
        tx.execute("INSERT INTO drivers (id, name, created_at) VALUES (?, ?, ?)",
                   ("alice", "Alice <script>alert(1)</script>", now - 50 * DAY))
        tx.execute("INSERT INTO drivers (id, name, created_at) VALUES (?, ?, ?)",
                   ("bob", None, now - 50 * DAY))
        assign = ("INSERT INTO assignments (driver_id, vin, valid_from, valid_to, created_at) "
                  "VALUES (?, ?, ?, ?, ?)")
        tx.execute(assign, ("bob", good.vin, now - 60 * DAY, now - 45 * DAY, now - 60 * DAY))
        tx.execute(assign, ("alice", good.vin, now - 45 * DAY, None, now - 45 * DAY))
        for i, week_rec in enumerate(r for r in good.records if r.kind == "confirmation"):
            week = week_rec.fields["week"]
            tx.execute("INSERT INTO transfers (key, from_account, to_account, amount, rule_id, "
                       "rules_version, dev, record_id, week, created_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (f"reward:weekly-confirmation:{good.dev}:{week}", "issuer", "driver:alice", 10_000,
                        "weekly-confirmation", "acme-2026-11", good.dev, week_rec.id, week, now - DAY + i))
        tx.execute("INSERT INTO transfers (key, from_account, to_account, amount, created_at, memo) "
                   "VALUES (?, ?, ?, ?, ?, ?)", ("redeem:1", "driver:alice", "redeemed:tyre-voucher", 2_500,
                                                 now - 1000, "test redemption"))
    return Fleet(good, pending, flagged, clockless)

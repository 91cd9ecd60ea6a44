"""Drivers and the periods they are assigned to vehicles (docs/DESIGN.md §5).

One driver, one wallet (``driver:<id>``) across every vehicle. A reward goes to
the driver assigned to the vehicle when the reading was taken; rewards credited
to ``unassigned:<dev>`` before anyone was assigned move to the driver when an
assignment covering their reading time is made (key ``reassign:<original key>``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from backend.db import Database, Tx
from backend.errors import AssignmentError
from backend.ledger import accounts
from backend.ledger.rewards import Assignment, reading_time
from backend.locks import lock_vehicles
from protocol.identity import VIN_RE

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Driver:
    id: str
    name: str | None
    created_at: int


def add_driver(db: Database, driver_id: str, name: str | None, now_ms: int) -> Driver:
    if not isinstance(driver_id, str) or not accounts.DRIVER_ID.fullmatch(driver_id):
        raise AssignmentError(f"driver id {driver_id!r}: 1 to 64 letters, digits, '_', '.', '@' or '-', "
                              "starting with a letter or digit")
    with db.write() as tx:
        if tx.one("SELECT id FROM drivers WHERE id = ?", (driver_id,)):
            raise AssignmentError(f"driver {driver_id!r} already exists")
        tx.execute("INSERT INTO drivers (id, name, created_at) VALUES (?, ?, ?)", (driver_id, name, now_ms))
    log.info("added driver %s", driver_id)
    return Driver(driver_id, name, now_ms)


def load(tx: Tx) -> list[Assignment]:
    return [Assignment(str(r["driver_id"]), str(r["vin"]), int(r["valid_from"]),
                       None if r["valid_to"] is None else int(r["valid_to"]))
            for r in tx.query("SELECT * FROM assignments ORDER BY vin, valid_from, id")]


def assign(db: Database, driver_id: str, vin: str, valid_from: int, now_ms: int) -> list[accounts.Transfer]:
    """Assign ``driver_id`` to ``vin`` from ``valid_from`` on; close the VIN's open assignment then.

    Returns the transfers that moved unassigned rewards to the driver.
    """
    with db.write() as tx:
        moved = assign_in(db, tx, driver_id, vin, valid_from, now_ms)
    log.info("assigned %s to %s from %d; moved %d unassigned rewards", driver_id, vin, valid_from, len(moved))
    return moved


def assign_in(db: Database, tx: Tx, driver_id: str, vin: str, valid_from: int,
              now_ms: int) -> list[accounts.Transfer]:
    """:func:`assign` inside the caller's write transaction (a claim marks its code used in it)."""
    if not VIN_RE.fullmatch(vin):
        raise AssignmentError(f"VIN {vin!r}: not a VIN (17 characters of A-H, J-N, P, R-Z and 0-9)")
    # The vehicle's lock, which every crediting transaction of the vehicle holds: a reward
    # credited by another process either sees this assignment, or is committed before it
    # and moved below.
    lock_vehicles(db, tx, [vin])
    if not tx.one("SELECT id FROM drivers WHERE id = ?", (driver_id,)):
        raise AssignmentError(f"no driver {driver_id!r} (add it: odo-backend drivers add {driver_id})")
    later = tx.one("SELECT driver_id, valid_from FROM assignments WHERE vin = ? AND valid_from >= ? "
                   "ORDER BY valid_from DESC LIMIT 1", (vin, valid_from))
    if later is not None:
        since = int(later["valid_from"])
        raise AssignmentError(f"{vin} is assigned to {later['driver_id']} from {since} ms on; "
                              "--from must be later than that")
    tx.execute("UPDATE assignments SET valid_to = ? WHERE vin = ? AND valid_to IS NULL",
               (valid_from, vin))
    tx.execute("INSERT INTO assignments (driver_id, vin, valid_from, valid_to, created_at) "
               "VALUES (?, ?, ?, NULL, ?)", (driver_id, vin, valid_from, now_ms))
    return _move_unassigned(tx, driver_id, vin, valid_from, now_ms)


def _move_unassigned(tx: Tx, driver_id: str, vin: str, valid_from: int,
                     now_ms: int) -> list[accounts.Transfer]:
    rows = tx.query(
        "SELECT t.*, r.t AS r_t, r.t_est AS r_t_est, r.clock AS r_clock, r.vin AS r_vin, d.vin AS d_vin "
        "FROM transfers t JOIN records r ON r.id = t.record_id LEFT JOIN devices d ON d.dev = t.dev "
        "WHERE t.from_account = ? AND t.to_account LIKE 'unassigned:%' AND (r.vin = ? OR r.vin IS NULL) "
        "ORDER BY t.id", (accounts.ISSUER, vin))
    moved = []
    for row in rows:
        if (row["r_vin"] or row["d_vin"]) != vin:
            continue
        if reading_time(row["r_clock"], int(row["r_t"]), row["r_t_est"]) < valid_from:
            continue
        original = accounts.Transfer.from_row(row)
        made = accounts.transfer(
            tx, key=f"reassign:{original.key}", from_account=original.to_account,
            to_account=accounts.driver_account(driver_id), amount=original.amount, now_ms=now_ms,
            rule_id=original.rule_id, rules_version=original.rules_version, dev=original.dev,
            record_id=original.record_id, week=original.week, memo=f"assigned to {driver_id}: {original.key}")
        if made is not None:
            moved.append(made)
    return moved


def drivers(db: Database, now_ms: int) -> list[dict[str, Any]]:
    """Every driver, with balance and assignments (``current`` marks those in force now)."""
    with db.read() as tx:
        out = []
        for d in tx.query("SELECT * FROM drivers ORDER BY id"):
            rows = tx.query("SELECT vin, valid_from, valid_to FROM assignments WHERE driver_id = ? "
                            "ORDER BY valid_from", (d["id"],))
            out.append({
                "id": d["id"], "name": d["name"], "account": accounts.driver_account(d["id"]),
                "balance": accounts.balance(tx, accounts.driver_account(d["id"])),
                "assignments": [{"vin": r["vin"], "from": int(r["valid_from"]),
                                 "to": None if r["valid_to"] is None else int(r["valid_to"]),
                                 "current": int(r["valid_from"]) <= now_ms
                                 and (r["valid_to"] is None or now_ms < int(r["valid_to"]))} for r in rows],
            })
    return out

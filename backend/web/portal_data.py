"""What a driver's portal pages show, read from the ledger: only the signed-in driver's own
account (``driver:<id>``), never another's; none of it writes.

- The balance: the driver's one wallet, across every vehicle they have driven.
- The weeks confirmed: the ISO weeks for which a confirmation of theirs earned a reward; the
  streak is the run of such weeks up to this week (or the last one, while this week is open).
- Credits by rule and by vehicle (the reading's VIN, else the VIN its device is approved for,
  else the device), and the latest redemptions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backend.db import Database, Tx
from backend.ledger import accounts
from backend.ledger.rewards import previous_week
from protocol.identity import VIN_RE
from protocol.records import iso_week

#: How many redemptions and weeks a page lists (the totals count all).
LIST_LIMIT = 50


@dataclass(frozen=True)
class Group:
    label: str
    credits: int
    total: int             # milli-tokens


@dataclass(frozen=True)
class Redemption:
    item: str
    amount: int
    created_at: int


@dataclass(frozen=True)
class Vehicle:
    vin: str
    valid_from: int
    valid_to: int | None
    current: bool


@dataclass(frozen=True)
class Overview:
    driver_id: str
    name: str | None
    balance: int
    weeks: list[str]            # newest first, at most LIST_LIMIT
    weeks_total: int
    streak: int
    by_rule: list[Group]
    by_vehicle: list[Group]
    redemptions: list[Redemption]
    vehicles: list[Vehicle]


def streak(weeks: set[str], now_ms: int) -> int:
    """Consecutive confirmed weeks ending this week, or last week while this one is not confirmed."""
    week = iso_week(now_ms)
    if week not in weeks:
        week = previous_week(week)
    count = 0
    while week in weeks:
        count += 1
        week = previous_week(week)
    return count


def _vehicle_label(key: str | None) -> str:
    if key is None:
        return "other"
    return key if VIN_RE.fullmatch(key) else f"a car without a VIN (device {key[:12]}…)"


def _groups(rows: list[dict[str, Any]], label: Any) -> list[Group]:
    return [Group(label(r["k"]), int(r["n"]), int(r["total"])) for r in rows]


def _confirmed_weeks(tx: Tx, account: str) -> set[str]:
    rows = tx.query("SELECT DISTINCT t.week FROM transfers t JOIN records r ON r.id = t.record_id "
                    "WHERE t.to_account = ? AND t.rule_id IS NOT NULL AND t.week IS NOT NULL "
                    "AND r.kind = 'confirmation'", (account,))
    return {str(r["week"]) for r in rows}


def overview(db: Database, driver_id: str, now_ms: int) -> Overview | None:
    """The driver's page; None when there is no such driver."""
    account = accounts.driver_account(driver_id)
    with db.read() as tx:
        driver = tx.one("SELECT id, name FROM drivers WHERE id = ?", (driver_id,))
        if driver is None:
            return None
        weeks = _confirmed_weeks(tx, account)
        by_rule = tx.query("SELECT rule_id AS k, COUNT(*) AS n, SUM(amount) AS total FROM transfers "
                           "WHERE to_account = ? AND rule_id IS NOT NULL GROUP BY rule_id ORDER BY rule_id",
                           (account,))
        by_vehicle = tx.query(
            "SELECT COALESCE(r.vin, d.vin, t.dev) AS k, COUNT(*) AS n, SUM(t.amount) AS total "
            "FROM transfers t LEFT JOIN records r ON r.id = t.record_id LEFT JOIN devices d ON d.dev = t.dev "
            "WHERE t.to_account = ? AND t.rule_id IS NOT NULL GROUP BY COALESCE(r.vin, d.vin, t.dev) "
            "ORDER BY 3 DESC", (account,))
        spent = tx.query("SELECT to_account, amount, created_at FROM transfers WHERE from_account = ? "
                         "AND to_account LIKE 'redeemed:%' ORDER BY id DESC LIMIT ?", (account, LIST_LIMIT))
        driven = tx.query("SELECT vin, valid_from, valid_to FROM assignments WHERE driver_id = ? "
                          "ORDER BY valid_from DESC", (driver_id,))
        balance = accounts.balance(tx, account)
    vehicles = []
    for a in driven:
        start, end = int(a["valid_from"]), None if a["valid_to"] is None else int(a["valid_to"])
        vehicles.append(Vehicle(str(a["vin"]), start, end, start <= now_ms and (end is None or now_ms < end)))
    return Overview(
        driver_id=driver_id, name=driver["name"], balance=balance,
        weeks=sorted(weeks, reverse=True)[:LIST_LIMIT], weeks_total=len(weeks), streak=streak(weeks, now_ms),
        by_rule=_groups(by_rule, str), by_vehicle=_groups(by_vehicle, _vehicle_label),
        redemptions=[Redemption(str(r["to_account"]).partition(":")[2], int(r["amount"]),
                                int(r["created_at"])) for r in spent],
        vehicles=vehicles)


def balance(db: Database, driver_id: str) -> int:
    with db.read() as tx:
        return accounts.balance(tx, accounts.driver_account(driver_id))


def receipt(db: Database, driver_id: str, idempotency_key: str) -> Redemption | None:
    """The driver's redemption made with ``idempotency_key``; None for any other key (or driver)."""
    with db.read() as tx:
        made = accounts.by_key(tx, f"redeem:{accounts.driver_account(driver_id)}:{idempotency_key}")
    if made is None or made.from_account != accounts.driver_account(driver_id):
        return None
    return Redemption(made.to_account.partition(":")[2], made.amount, made.created_at)

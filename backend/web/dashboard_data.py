"""What the dashboard's pages show, read from the backend's tables.

Each function takes the database and returns frozen values for one page; none of
them writes. The signed payload of a record is read from its stored JWS (verbatim,
as signed) where a page needs a field that has no column (a confirmation's week, an
event's name).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from backend.db import Database, Row, Tx
from backend.ledger import accounts, assignments, contracts
from backend.records import evidence
from backend.records.devices import int_or_none, status_of
from common import units
from protocol import canonical, jws

log = logging.getLogger(__name__)

PAGE_SIZE = 50
SECTION_LIMIT = 50
CHART_MAX_RECORDS = 5000


def payload_of(compact: str) -> dict[str, Any]:
    """The signed JSON payload of a stored JWS; empty when it cannot be read."""
    try:
        return canonical.loads_object(jws.split(compact).payload)
    except Exception:  # noqa: BLE001 - stored evidence may be malformed; show what can be shown
        return {}


@dataclass(frozen=True)
class Page:
    number: int
    size: int
    total: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.size))

    @property
    def offset(self) -> int:
        return (self.number - 1) * self.size

    @property
    def has_prev(self) -> bool:
        return self.number > 1

    @property
    def has_next(self) -> bool:
        return self.number < self.pages


def page_of(number: int, total: int, size: int = PAGE_SIZE) -> Page:
    pages = max(1, -(-total // size))
    return Page(min(max(1, number), pages), size, total)


# -- fleet --------------------------------------------------------------------

@dataclass(frozen=True)
class FleetRow:
    dev: str
    vin: str | None
    flagged_vin: str | None
    status: str
    driver: str | None
    online: bool
    last_seen: int | None
    backlog: int | None
    odo_m: int | None
    odo_src: str | None
    odo_t: int | None
    last_week: str | None
    accepted: int
    rejected: int
    unsequenced: int
    forks: int
    problems: tuple[str, ...] = field(default=())


def _counts(tx: Tx, sql: str) -> dict[str, int]:
    return {r["dev"]: int(r["n"]) for r in tx.query(sql)}


def _latest_per_device(tx: Tx, where: str, params: tuple[Any, ...] = ()) -> dict[str, Row]:
    rows = tx.query(
        "SELECT * FROM (SELECT dev, seq, kind, odo_m, src, t_est, jws, "
        "ROW_NUMBER() OVER (PARTITION BY dev ORDER BY seq DESC) AS rn "
        f"FROM records WHERE {where}) latest WHERE rn = 1", params)
    return {r["dev"]: r for r in rows}


def current_drivers(tx: Tx, now_ms: int) -> dict[str, str]:
    """VIN -> the driver assigned to it now (the latest assignment that has begun), for every
    VIN at once; :func:`backend.ledger.accounts.assigned_driver` answers for one."""
    rows = tx.query(
        "SELECT a.vin, a.driver_id, d.name FROM assignments a JOIN drivers d ON d.id = a.driver_id "
        "WHERE a.valid_from <= ? AND (a.valid_to IS NULL OR a.valid_to > ?) "
        "ORDER BY a.valid_from, a.id", (now_ms, now_ms))
    return {r["vin"]: r["driver_id"] for r in rows}


def problems_of(row: FleetRow) -> tuple[str, ...]:
    found = []
    if row.flagged_vin:
        found.append("VIN changed")
    if row.status == "pending":
        found.append("pending")
    if row.status == "revoked":
        found.append("revoked")
    if row.forks:
        found.append("fork")
    if row.rejected:
        found.append("rejected records")
    if not row.online and (row.backlog or 0) > 0:
        found.append("offline with backlog")
    return tuple(found)


def fleet(db: Database, now_ms: int) -> list[FleetRow]:
    """One row per device, problems first."""
    with db.read() as tx:
        devices = tx.query("SELECT dev, vin, flagged_vin, status, online, last_seen, status_json "
                           "FROM devices")
        by_status = "SELECT dev, COUNT(*) AS n FROM records WHERE status = '{}' GROUP BY dev"
        accepted = _counts(tx, by_status.format("accepted"))
        rejected = _counts(tx, by_status.format("rejected"))
        unsequenced = _counts(tx, "SELECT dev, COUNT(*) AS n FROM rejections GROUP BY dev")
        forks = _counts(tx, "SELECT dev, COUNT(*) AS n FROM forks GROUP BY dev")
        odo = _latest_per_device(tx, "status = 'accepted' AND odo_m IS NOT NULL")
        confirmed = _latest_per_device(tx, "status = 'accepted' AND kind = 'confirmation'")
        drivers = current_drivers(tx, now_ms)
    out = []
    for d in devices:
        dev = d["dev"]
        last = odo.get(dev)
        conf = confirmed.get(dev)
        week = payload_of(conf["jws"]).get("week") if conf else None
        row = FleetRow(
            dev=dev, vin=d["vin"], flagged_vin=d["flagged_vin"], status=d["status"],
            driver=drivers.get(d["vin"]) if d["vin"] else None, online=bool(d["online"]),
            last_seen=d["last_seen"] or None,
            backlog=int_or_none(status_of(d["status_json"]).get("backlog")),
            odo_m=last["odo_m"] if last else None,
            odo_src=(last["src"] or last["kind"]) if last else None,
            odo_t=last["t_est"] if last else None,
            last_week=week if isinstance(week, str) else None,
            accepted=accepted.get(dev, 0), rejected=rejected.get(dev, 0),
            unsequenced=unsequenced.get(dev, 0), forks=forks.get(dev, 0),
        )
        out.append(FleetRow(**{**row.__dict__, "problems": problems_of(row)}))
    out.sort(key=lambda r: (not r.problems, -len(r.problems), r.vin or "~", r.dev))
    return out


# -- one device ---------------------------------------------------------------

@dataclass(frozen=True)
class RecordRow:
    seq: int
    id: str
    kind: str
    t: int
    t_est: int
    estimated: bool
    odo_m: int | None
    src: str | None
    status: str
    reason: str | None
    received_at: int
    detail: str


@dataclass(frozen=True)
class ChartPoint:
    t: int
    odo_m: int
    kind: str
    status: str
    estimated: bool


@dataclass(frozen=True)
class DeviceView:
    device: Mapping[str, Any]
    enrolment: Mapping[str, Any]
    status: Mapping[str, Any]
    fleet_token_label: str | None
    driver: str | None
    counts: Mapping[str, int]
    records: tuple[RecordRow, ...]
    page: Page
    chart: tuple[ChartPoint, ...]
    rejections: tuple[Mapping[str, Any], ...]
    forks: tuple[Mapping[str, Any], ...]
    events: tuple[Mapping[str, Any], ...]
    unit: str = "km"               # the device's display unit, else the fleet's

    def distance(self, metres: int | None) -> str:
        """Metres in the page's unit, cut to its tenth as an odometer shows it: ``7,671.2 mi``."""
        return units.show(metres, self.unit, floor=True, unknown="–")


def _detail(kind: str, p: Mapping[str, Any]) -> str:
    if kind == "trip" and isinstance(p.get("end_odo_m"), int) and isinstance(p.get("start_odo_m"), int):
        metres = p["end_odo_m"] - p["start_odo_m"]
        return f"{metres // 1000}.{metres % 1000 // 100} km, max {p.get('max_kph')} km/h"
    if kind == "confirmation":
        dev_odo = p.get("device_odo_m")
        device = f"{dev_odo // 1000:,} km" if isinstance(dev_odo, int) else "none"
        return f"week {p.get('week')}, device said {device}"
    if kind == "event":
        return str(p.get("event", ""))
    return ""


def _record_row(r: Row) -> RecordRow:
    return RecordRow(
        seq=int(r["seq"]), id=r["id"], kind=r["kind"], t=int(r["t"]), t_est=int(r["t_est"]),
        estimated=r["clock"] != "synced", odo_m=r["odo_m"], src=r["src"], status=r["status"],
        reason=r["reason"], received_at=int(r["received_at"]),
        detail=_detail(r["kind"], payload_of(r["jws"])),
    )


def _chart_points(rows: list[Row]) -> tuple[ChartPoint, ...]:
    return tuple(ChartPoint(int(r["t_est"]), int(r["odo_m"]), r["kind"], r["status"], r["clock"] != "synced")
                 for r in reversed(rows))


def device_view(db: Database, dev: str, page_number: int, now_ms: int,
                default_unit: str = "km") -> DeviceView | None:
    with db.read() as tx:
        device = tx.one("SELECT * FROM devices WHERE dev = ?", (dev,))
        if device is None:
            return None
        label = None
        if device["fleet_token_id"] is not None:
            label = tx.scalar("SELECT label FROM fleet_tokens WHERE id = ?", (device["fleet_token_id"],))
        counts = {r["status"]: int(r["n"]) for r in tx.query(
            "SELECT status, COUNT(*) AS n FROM records WHERE dev = ? GROUP BY status", (dev,))}
        counts["unsequenced"] = int(tx.scalar("SELECT COUNT(*) FROM rejections WHERE dev = ?", (dev,)) or 0)
        kept = evidence.budget(tx, dev)
        counts["evidence_kept_bytes"], counts["evidence_dropped"] = kept["kept_bytes"], kept["dropped"]
        counts["forks"] = int(tx.scalar("SELECT COUNT(*) FROM forks WHERE dev = ?", (dev,)) or 0)
        counts["events"] = int(tx.scalar(
            "SELECT COUNT(*) FROM records WHERE dev = ? AND kind = 'event'", (dev,)) or 0)
        total = counts.get("accepted", 0) + counts.get("rejected", 0)
        page = page_of(page_number, total)
        records = tx.query(
            "SELECT seq, id, kind, t, t_est, clock, odo_m, src, status, reason, received_at, jws "
            "FROM records WHERE dev = ? ORDER BY seq DESC LIMIT ? OFFSET ?", (dev, page.size, page.offset))
        chart = tx.query(
            "SELECT t_est, odo_m, kind, status, clock FROM records WHERE dev = ? AND odo_m IS NOT NULL "
            "ORDER BY seq DESC LIMIT ?", (dev, CHART_MAX_RECORDS))
        rejections = tx.query(
            "SELECT id, seq, reason, detail, received_at FROM rejections WHERE dev = ? "
            "ORDER BY id DESC LIMIT ?", (dev, SECTION_LIMIT))
        forks = tx.query("SELECT seq, record_id, received_at FROM forks WHERE dev = ? "
                         "ORDER BY id DESC LIMIT ?", (dev, SECTION_LIMIT))
        events = tx.query(
            "SELECT seq, t, t_est, clock, status, reason, jws FROM records WHERE dev = ? AND kind = 'event' "
            "ORDER BY seq DESC LIMIT ?", (dev, SECTION_LIMIT))
        driver = accounts.assigned_driver(tx, device["vin"], now_ms)
    enrolment = payload_of(device["enrollment"])
    if enrolment.get("fleet_token") is not None:
        enrolment["fleet_token"] = "(given, not shown)"
    event_rows = []
    for e in events:
        p = payload_of(e["jws"])
        detail = p.get("detail")
        event_rows.append({
            "seq": e["seq"], "t_est": e["t_est"], "estimated": e["clock"] != "synced", "status": e["status"],
            "reason": e["reason"], "event": p.get("event", ""),
            "detail": "" if detail is None else detail if isinstance(detail, str) else json.dumps(detail),
        })
    dev_row = {k: v for k, v in device.items() if k not in ("pub", "enrollment")}
    pub = device["pub"]
    dev_row["pub_hex"] = bytes(pub).hex() if pub is not None else ""
    return DeviceView(
        device=dev_row, enrolment=enrolment, status=status_of(device["status_json"]),
        fleet_token_label=label, driver=driver, counts=counts,
        records=tuple(_record_row(r) for r in records), page=page, chart=_chart_points(chart),
        rejections=tuple(rejections), forks=tuple(forks), events=tuple(event_rows),
        unit=device["display_unit"] or default_unit,
    )


# -- enrolments, drivers, ledger ------------------------------------------------

def enrolment_queue(db: Database) -> list[Row]:
    """Devices waiting for an operator: pending enrolments and VINs that changed, each with the
    vehicle's active device when it has one (approving then means replacing it)."""
    return db.query(
        "SELECT d.dev, d.vin, d.flagged_vin, d.status, d.enrolled_at, d.last_seen, d.online, "
        "t.label AS fleet_token_label, (SELECT a.dev FROM devices a WHERE a.status = 'approved' "
        "AND a.dev <> d.dev AND a.vin = COALESCE(d.flagged_vin, d.vin) ORDER BY a.dev LIMIT 1) "
        "AS active_device "
        "FROM devices d LEFT JOIN fleet_tokens t ON t.id = d.fleet_token_id "
        "WHERE d.status = 'pending' OR d.flagged_vin IS NOT NULL ORDER BY d.enrolled_at, d.dev")


def drivers(db: Database, now_ms: int) -> list[dict[str, Any]]:
    """Every driver with balance and assignments (newest first), each linked to the device
    approved for its VIN."""
    people = assignments.drivers(db, now_ms)
    vins = {r["vin"]: r["dev"] for r in db.query("SELECT vin, dev FROM devices WHERE vin IS NOT NULL")}
    return [{**p, "assignments": [{**a, "dev": vins.get(a["vin"])} for a in reversed(p["assignments"])]}
            for p in people]


TRANSFER_COLUMNS = ("id, key, from_account, to_account, amount, rule_id, rules_version, dev, record_id, "
                    "week, memo, created_at")


def latest_transfers(db: Database, page_number: int) -> tuple[list[Row], Page]:
    with db.read() as tx:
        page = page_of(page_number, int(tx.scalar("SELECT COUNT(*) FROM transfers") or 0))
        rows = tx.query(f"SELECT {TRANSFER_COLUMNS} FROM transfers ORDER BY id DESC LIMIT ? OFFSET ?",
                        (page.size, page.offset))
    return rows, page


def wallet(db: Database, account: str, page_number: int) -> tuple[int, list[Row], Page]:
    """An account's balance and its transfers, newest first."""
    with db.read() as tx:
        total = int(tx.scalar("SELECT COUNT(*) FROM transfers WHERE to_account = ? OR from_account = ?",
                              (account, account)) or 0)
        page = page_of(page_number, total)
        rows = tx.query(f"SELECT {TRANSFER_COLUMNS} FROM transfers WHERE to_account = ? OR from_account = ? "
                        "ORDER BY id DESC LIMIT ? OFFSET ?", (account, account, page.size, page.offset))
        balance = accounts.balance(tx, account)
    return balance, rows, page


def rules_versions(db: Database, now_ms: int) -> list[dict[str, Any]]:
    """The published rules versions, by effective_from (:func:`backend.ledger.contracts.versions`)."""
    return contracts.versions(db, now_ms)

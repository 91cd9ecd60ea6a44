"""Finding the events the webhooks are told about, in what the backend already records.

Nothing is added to the ingest's path: :class:`Watcher` reads the tables the ingest and the
ledger write anyway, each from a cursor of its own (table ``webhook_cursors``), and stores each
event it finds once (table ``webhook_events``, keyed by the event's id) with one delivery per
webhook subscribed to it (``webhook_deliveries``):

=================  =============================================  ======================================
event              found in                                       id
=================  =============================================  ======================================
fork               ``forks`` (a second record for a taken seq)    ``fork:<record id>``
rollback           ``devices.held_at`` (an odometer rollback)     ``rollback:<dev>:<held_at>``
vin_change         ``devices.flagged_vin`` (``vin_mismatch``)     ``vin_change:<dev>:<vin>:<approved>``
vin_change         accepted ``vin_changed`` event records         ``vin_change:<record id>``
redemption         transfers to ``redeemed:<item>``               ``redemption:<transfer key>``
device_silent      ``devices.last_seen`` + ``silent_hours``       ``device_silent:<dev>:<last_seen>``
week_unconfirmed   assignments without a confirmation of a week   ``week_unconfirmed:<vin>:<week>``
=================  =============================================  ======================================

(``<approved>`` is the time of the device's last approval, 0 if none: a VIN flagged again after
an operator approved the previous change is a new event.) A ``vin_changed`` record is an event
only when no ``vin_mismatch`` event of that device and VIN was raised first.

Each scan looks again at the last :data:`LAG_MS` before its cursor, since rows are dated when
their transaction starts, not when it commits; what it has stored already is skipped, so a scan
made twice, after a restart, or by two processes at once stores nothing new. A cursor never
reaches back more than :data:`CATCHUP_MS`: the first scan, or one after a long stop, looks at
the last week only.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from backend.db import Database, Row, Tx
from backend.notify.config import NotifyConfig
from protocol import canonical, jws

log = logging.getLogger(__name__)

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
WEEK_MS = 7 * DAY_MS
#: How far before its cursor each scan looks again.
LAG_MS = 120_000
#: How far back a cursor reaches at most (the first scan, or after a long stop).
CATCHUP_MS = WEEK_MS
#: The most events of one source a scan stores; the rest wait for the next scan.
SCAN_LIMIT = 500
#: Event records are read in windows of at most this long, at most :data:`EVENT_WINDOWS` a scan.
EVENT_WINDOW_MS = 10 * 60_000
EVENT_WINDOWS = 144

_HELD_SEQ = re.compile(r"odometer_rollback at seq ([0-9]{1,18})\b")


@dataclass(frozen=True)
class Event:
    key: str                    # the event's id, unique
    event: str                  # one of backend.notify.config.EVENTS
    at: int                     # when it happened, Unix ms
    data: dict[str, Any]

    def body(self) -> str:
        """The JSON body POSTed for it: ``{"id","event","at","data"}``, keys sorted."""
        return json.dumps({"id": self.key, "event": self.event, "at": self.at, "data": self.data},
                          sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Found:
    """What one source found in a window, and how far its cursor may move."""

    events: list[Event]
    upto: int


def _payload(compact: str) -> dict[str, Any]:
    try:
        return canonical.loads_object(jws.split(compact).payload)
    except Exception:  # noqa: BLE001 - stored evidence may be malformed: it is then no event
        return {}


def _upto(rows: list[Row], column: str, end: int) -> int:
    """The cursor after a scan: its end, or the last row's time when the scan was cut short."""
    return int(rows[-1][column]) if len(rows) >= SCAN_LIMIT else end


# -- the sources ------------------------------------------------------------------------------

def forks(tx: Tx, start: int, end: int, cfg: NotifyConfig) -> Found:
    rows = tx.query(
        "SELECT f.dev, f.seq, f.record_id, f.received_at, d.vin, "
        "(SELECT r.id FROM records r WHERE r.dev = f.dev AND r.seq = f.seq) AS stored_id "
        "FROM forks f LEFT JOIN devices d ON d.dev = f.dev WHERE f.received_at > ? AND f.received_at <= ? "
        "AND NOT EXISTS (SELECT 1 FROM webhook_events e WHERE e.key = 'fork:' || f.record_id) "
        "ORDER BY f.received_at, f.id LIMIT ?", (start, end, SCAN_LIMIT))
    return Found([Event(f"fork:{r['record_id']}", "fork", int(r["received_at"]), {
        "dev": r["dev"], "vin": r["vin"], "seq": int(r["seq"]), "record_id": r["record_id"],
        "stored_id": r["stored_id"]}) for r in rows], _upto(rows, "received_at", end))


def rollbacks(tx: Tx, start: int, end: int, cfg: NotifyConfig) -> Found:
    rows = tx.query(
        "SELECT d.dev, d.vin, d.held_at, d.held_reason FROM devices d WHERE d.held_at > ? AND d.held_at <= ? "
        "AND d.held_reason LIKE 'odometer_rollback%' "
        "AND NOT EXISTS (SELECT 1 FROM webhook_events e "
        "WHERE e.key = 'rollback:' || d.dev || ':' || CAST(d.held_at AS TEXT)) "
        "ORDER BY d.held_at, d.dev LIMIT ?", (start, end, SCAN_LIMIT))
    events = []
    for r in rows:
        reason = str(r["held_reason"] or "")
        seq = _HELD_SEQ.search(reason)
        record = None if seq is None else tx.one(
            "SELECT seq, id, odo_m FROM records WHERE dev = ? AND seq = ?", (r["dev"], int(seq.group(1))))
        top = None if r["vin"] is None else tx.one(
            "SELECT top_odo_m FROM vehicles WHERE vin = ?", (r["vin"],))
        events.append(Event(f"rollback:{r['dev']}:{int(r['held_at'])}", "rollback", int(r["held_at"]), {
            "dev": r["dev"], "vin": r["vin"], "held_at": int(r["held_at"]), "reason": reason,
            "seq": None if record is None else int(record["seq"]),
            "record_id": None if record is None else record["id"],
            "odo_m": None if record is None or record["odo_m"] is None else int(record["odo_m"]),
            "vehicle_top_odo_m": None if top is None else int(top["top_odo_m"]),
        }))
    return Found(events, _upto(rows, "held_at", end))


_FLAGGED_SQL = (
    "SELECT * FROM (SELECT d.dev, d.vin, d.flagged_vin, COALESCE((SELECT MAX(l.at) FROM device_log l "
    "WHERE l.dev = d.dev AND l.kind = 'decision' AND l.action = 'approve'), 0) AS approved, "
    "(SELECT MAX(j.received_at) FROM rejections j WHERE j.dev = d.dev AND j.reason = 'vin_mismatch') AS seen "
    "FROM devices d WHERE d.flagged_vin IS NOT NULL) f WHERE NOT EXISTS (SELECT 1 FROM webhook_events e "
    "WHERE e.key = 'vin_change:' || f.dev || ':' || f.flagged_vin || ':' || CAST(f.approved AS TEXT)) "
    "ORDER BY f.dev LIMIT ?")


def vin_mismatches(tx: Tx, start: int, end: int, cfg: NotifyConfig) -> Found:
    """Devices flagged with a VIN other than the one approved (no time window: few are flagged)."""
    rows = tx.query(_FLAGGED_SQL, (SCAN_LIMIT,))
    return Found([Event(f"vin_change:{r['dev']}:{r['flagged_vin']}:{int(r['approved'])}", "vin_change",
                        end if r["seen"] is None else int(r["seen"]), {
                            "dev": r["dev"], "vin": r["vin"], "new_vin": r["flagged_vin"],
                            "source": "vin_mismatch"}) for r in rows], end)


def vin_events(tx: Tx, start: int, end: int, cfg: NotifyConfig) -> Found:
    """Accepted ``vin_changed`` event records, read in windows (their name is in the payload only)."""
    events: list[Event] = []
    upto = start
    for _ in range(EVENT_WINDOWS):
        if upto >= end:
            break
        stop = min(end, upto + EVENT_WINDOW_MS)
        rows = tx.query("SELECT dev, seq, id, vin, jws, received_at FROM records WHERE kind = 'event' "
                        "AND received_at > ? AND received_at <= ? AND status = 'accepted' "
                        "ORDER BY received_at",
                        (upto, stop))
        for r in rows:
            payload = _payload(str(r["jws"]))
            if payload.get("event") != "vin_changed":
                continue
            detail = payload.get("detail")
            detail = detail if isinstance(detail, dict) else {}
            to = detail.get("to") if isinstance(detail.get("to"), str) else r["vin"]
            prefix = f"vin_change:{r['dev']}:{to}"
            flagged = tx.one("SELECT 1 AS x FROM webhook_events WHERE key > ? AND key < ? LIMIT 1",
                             (prefix + ":", prefix + ";"))
            if flagged is None:
                events.append(Event(f"vin_change:{r['id']}", "vin_change", int(r["received_at"]), {
                    "dev": r["dev"], "vin": r["vin"], "new_vin": to,
                    "old_vin": detail.get("from") if isinstance(detail.get("from"), str) else None,
                    "seq": int(r["seq"]), "record_id": r["id"], "source": "device_event"}))
        upto = stop
    return Found(events, upto)


def redemptions(tx: Tx, start: int, end: int, cfg: NotifyConfig) -> Found:
    rows = tx.query(
        "SELECT t.key, t.from_account, t.to_account, t.amount, t.created_at FROM transfers t "
        "WHERE t.to_account >= 'redeemed:' AND t.to_account < 'redeemed;' "
        "AND t.created_at > ? AND t.created_at <= ? "
        "AND NOT EXISTS (SELECT 1 FROM webhook_events e WHERE e.key = 'redemption:' || t.key) "
        "ORDER BY t.created_at, t.id LIMIT ?", (start, end, SCAN_LIMIT))
    events = []
    for r in rows:
        account = str(r["from_account"])
        events.append(Event(f"redemption:{r['key']}", "redemption", int(r["created_at"]), {
            "account": account, "driver": account.split(":", 1)[1] if account.startswith("driver:") else None,
            "item": str(r["to_account"]).split(":", 1)[1], "milli_tokens": int(r["amount"]),
            "transfer_key": r["key"]}))
    return Found(events, _upto(rows, "created_at", end))


def silent_devices(tx: Tx, start: int, end: int, cfg: NotifyConfig) -> Found:
    """Approved devices whose silence reached ``silent_hours`` in the window (times: when it did)."""
    after = cfg.silent_hours * HOUR_MS
    rows = tx.query(
        "SELECT d.dev, d.vin, d.last_seen FROM devices d WHERE d.status = 'approved' "
        "AND d.last_seen > ? AND d.last_seen <= ? AND NOT EXISTS (SELECT 1 FROM webhook_events e "
        "WHERE e.key = 'device_silent:' || d.dev || ':' || CAST(d.last_seen AS TEXT)) "
        "ORDER BY d.last_seen, d.dev LIMIT ?", (start - after, end - after, SCAN_LIMIT))
    events = [Event(f"device_silent:{r['dev']}:{int(r['last_seen'])}", "device_silent",
                    int(r["last_seen"]) + after, {
                        "dev": r["dev"], "vin": r["vin"], "last_seen": int(r["last_seen"]),
                        "silent_hours": cfg.silent_hours}) for r in rows]
    upto = int(rows[-1]["last_seen"]) + after if len(rows) >= SCAN_LIMIT else end
    return Found(events, upto)


def week_bounds(monday: datetime.date) -> tuple[str, int, int]:
    """The ISO week starting on ``monday``: its name and its start and end (Unix ms, UTC)."""
    year, week, _ = monday.isocalendar()
    midnight = datetime.datetime(monday.year, monday.month, monday.day, tzinfo=datetime.UTC)
    begin = int(midnight.timestamp()) * 1000
    return f"{year:04d}-W{week:02d}", begin, begin + WEEK_MS


def weeks_due(start: int, end: int, grace_ms: int) -> list[tuple[str, int, int]]:
    """The ISO weeks whose end plus the grace falls in (start, end]."""
    first = datetime.datetime.fromtimestamp((start - grace_ms) // 1000, tz=datetime.UTC).date()
    monday = first - datetime.timedelta(days=first.weekday() + 7)
    due: list[tuple[str, int, int]] = []
    while True:
        name, begin, stop = week_bounds(monday)
        if stop + grace_ms > end:
            return due
        if stop + grace_ms > start:
            due.append((name, begin, stop))
        monday += datetime.timedelta(days=7)


def _confirmed(tx: Tx, vin: str, week: str, begin: int, stop: int) -> bool:
    """An accepted confirmation of ``week`` for the vehicle (made that week or the next)."""
    rows = tx.query("SELECT jws FROM records WHERE vin = ? AND t_est >= ? AND t_est < ? "
                    "AND kind = 'confirmation' AND status = 'accepted'",
                    (vin, begin - DAY_MS, stop + WEEK_MS))
    return any(_payload(str(r["jws"])).get("week") == week for r in rows)


def unconfirmed_weeks(tx: Tx, start: int, end: int, cfg: NotifyConfig) -> Found:
    grace = cfg.confirmation_grace_hours * HOUR_MS
    events = []
    for week, begin, stop in weeks_due(start, end, grace):
        rows = tx.query("SELECT vin, driver_id FROM assignments WHERE valid_from < ? "
                        "AND (valid_to IS NULL OR valid_to > ?) ORDER BY vin, driver_id", (stop, begin))
        drivers: dict[str, list[str]] = {}
        for r in rows:
            names = drivers.setdefault(str(r["vin"]), [])
            if r["driver_id"] not in names:
                names.append(str(r["driver_id"]))
        for vin, names in drivers.items():
            key = f"week_unconfirmed:{vin}:{week}"
            if tx.one("SELECT 1 AS x FROM webhook_events WHERE key = ?", (key,)) is not None:
                continue
            if not _confirmed(tx, vin, week, begin, stop):
                events.append(Event(key, "week_unconfirmed", stop + grace, {
                    "vin": vin, "week": week, "drivers": names, "week_start": begin, "week_end": stop,
                    "grace_hours": cfg.confirmation_grace_hours}))
    return Found(events, end)


Source = Callable[[Tx, int, int, NotifyConfig], Found]

#: Each source: its cursor's name, the event it raises, and how it looks.
SOURCES: tuple[tuple[str, str, Source], ...] = (
    ("fork", "fork", forks),
    ("rollback", "rollback", rollbacks),
    ("vin_mismatch", "vin_change", vin_mismatches),
    ("vin_event", "vin_change", vin_events),
    ("redemption", "redemption", redemptions),
    ("device_silent", "device_silent", silent_devices),
    ("week_unconfirmed", "week_unconfirmed", unconfirmed_weeks),
)


class Watcher:
    """Finds the events some configured webhook subscribes to and stores them, with their deliveries."""

    def __init__(self, db: Database, cfg: NotifyConfig, clock: Callable[[], int]) -> None:
        self.db = db
        self.cfg = cfg
        self.clock = clock

    def scan(self) -> list[Event]:
        """Look at every source once; return the events stored now (none already stored)."""
        wanted = self.cfg.wanted()
        stored: list[Event] = []
        for source, event, find in SOURCES:
            if event not in wanted:
                continue
            now = self.clock()
            with self.db.read() as tx:
                cursor = tx.scalar("SELECT at FROM webhook_cursors WHERE source = ?", (source,))
                start = now - CATCHUP_MS if cursor is None else max(int(cursor) - LAG_MS, now - CATCHUP_MS)
                found = find(tx, start, now, self.cfg)
            stored += self.store(source, found.events, found.upto, now)
        return stored

    def store(self, source: str, events: Iterable[Event], upto: int, now: int) -> list[Event]:
        """Store the events not stored yet, each with a delivery per subscribed webhook, and move
        the source's cursor on to ``upto`` (never back)."""
        new = []
        with self.db.write() as tx:
            for ev in sorted(events, key=lambda e: e.key):      # one order for every process: no deadlock
                if not tx.insert_ignore("webhook_events", {"key": ev.key, "event": ev.event, "at": ev.at,
                                                           "body": ev.body(), "detected_at": now}, ("key",)):
                    continue
                new.append(ev)
                for hook in self.cfg.webhooks:
                    if ev.event in hook.events:
                        tx.insert_ignore("webhook_deliveries", {
                            "event_key": ev.key, "webhook": hook.url, "status": "pending", "attempts": 0,
                            "next_at": now, "created_at": now, "updated_at": now}, ("event_key", "webhook"))
            if not tx.insert_ignore("webhook_cursors", {"source": source, "at": upto}, ("source",)):
                tx.execute("UPDATE webhook_cursors SET at = ? WHERE source = ? AND at < ?",
                           (upto, source, upto))
        for ev in new:
            log.info("webhook event %s", ev.key)
        return new

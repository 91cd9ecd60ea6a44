"""Devices as operators see them: queries, approve and revoke, and the agents' status messages.

Shared by the ``odo-backend devices`` commands and the HTTP API. Rows come back as plain
JSON-ready dicts::

    {"dev", "vin", "status", "last_seq", "last_seen", "odo_m", "accepted", "rejected",
     "backlog", "online", "flagged_vin", "held_since", "held_reason"}

A device is ``pending``, ``approved``, ``revoked`` or ``retired`` (replaced by another dongle in
the same vehicle: a vehicle has one active device). A device whose reading went below its
vehicle's highest is *held* (``held_since``): its rewards wait until an operator clears it.
Each decision (approve, retire, revoke, clear) is an entry of the transparency log, appended in
the transaction that makes it (:mod:`backend.records.device_log`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from backend.db import Database, Row, Tx
from backend.errors import DeviceInputError, UnknownDevice
from backend.ledger import rewards
from backend.ledger.contracts import Source, published_or
from backend.locks import lock_device, lock_vehicles
from backend.metrics import FleetFigures
from backend.records import device_log
from protocol import b64, canonical, jws, messages
from protocol.errors import BadFormat
from protocol.identity import DEV_RE, VIN_RE, VerifyKey
from protocol.records import verify as verify_record

log = logging.getLogger(__name__)

MAX_RECORDS_PAGE = 5000
RECORD_FIELDS = ("seq", "id", "kind", "t", "t_est", "clock", "odo_m", "vin", "status", "reason")


def status_of(status_json: str | None) -> dict[str, Any]:
    """A device's last retained status message, as a dict (empty if none or unreadable)."""
    if not status_json:
        return {}
    try:
        obj = json.loads(status_json)
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


def int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


_SUMMARY_SQL = (
    "SELECT d.*, (SELECT r.odo_m FROM records r WHERE r.dev = d.dev AND r.status = 'accepted' "
    "AND r.odo_m IS NOT NULL ORDER BY r.seq DESC LIMIT 1) AS odo_m FROM devices d")


def _summary(row: Row, rejected: int) -> dict[str, Any]:
    through = int(row["through"])
    return {
        "dev": row["dev"], "vin": row["vin"], "status": row["status"], "last_seq": through,
        "last_seen": row["last_seen"], "odo_m": row["odo_m"], "accepted": through - rejected,
        "rejected": rejected, "backlog": int_or_none(status_of(row["status_json"]).get("backlog")),
        "online": bool(row["online"]), "flagged_vin": row["flagged_vin"],
        "held_since": row["held_at"], "held_reason": row["held_reason"],
    }


def list_devices(db: Database) -> list[dict[str, Any]]:
    with db.read() as tx:
        rows = tx.query(_SUMMARY_SQL + " ORDER BY d.dev")
        rejected = {r["dev"]: int(r["n"]) for r in tx.query(
            "SELECT dev, COUNT(*) AS n FROM records WHERE status = 'rejected' GROUP BY dev")}
    return [_summary(r, rejected.get(r["dev"], 0)) for r in rows]


def _check_dev(dev: str) -> None:
    if not DEV_RE.fullmatch(dev):
        raise UnknownDevice(f"no device {dev!r} (a device id is 32 lowercase hex characters)")


def _check_by(by: str) -> None:
    if not isinstance(by, str) or not device_log.BY_RE.fullmatch(by):
        raise DeviceInputError("who decides must be named in 1 to 200 characters, none of them a control "
                               "character")


def _one(tx: Tx, dev: str) -> dict[str, Any]:
    row = tx.one(_SUMMARY_SQL + " WHERE d.dev = ?", (dev,))
    if row is None:
        raise UnknownDevice(f"no device {dev}")
    rejected = int(tx.scalar("SELECT COUNT(*) AS n FROM records WHERE dev = ? AND status = 'rejected'",
                             (dev,)))
    out = _summary(row, rejected)
    try:
        payload = canonical.loads_object(jws.split(row["enrollment"]).payload, "enrolment")
    except BadFormat:
        payload = {}
    out["pub"] = b64.encode(bytes(row["pub"]))
    out["enrollment"] = {
        "vin": payload.get("vin"), "t": payload.get("t"),
        # Whether a fleet token approved it: a stored token is named, the configured one decided it.
        "fleet_token_approved": row["fleet_token_id"] is not None or row["decided_by"] == "fleet-token",
        "fleet_token_id": row["fleet_token_id"], "enrolled_at": row["enrolled_at"],
        "decided_at": row["decided_at"], "decided_by": row["decided_by"],
    }
    out["status_message"] = status_of(row["status_json"]) or None
    return out


def get_device(db: Database, dev: str) -> dict[str, Any]:
    """One device, plus ``pub`` (base64url), its enrolment (whether a fleet token approved it) and
    last status."""
    _check_dev(dev)
    with db.read() as tx:
        return _one(tx, dev)


def records(db: Database, dev: str, after_seq: int = 0, limit: int = 500) -> list[dict[str, Any]]:
    """The device's stored records with ``seq > after_seq``, ascending, at most ``limit``."""
    _check_dev(dev)
    if after_seq < 0:
        raise DeviceInputError("after_seq: must be 0 or more")
    if not 1 <= limit <= MAX_RECORDS_PAGE:
        raise DeviceInputError(f"limit: must be 1 to {MAX_RECORDS_PAGE}")
    with db.read() as tx:
        if tx.one("SELECT dev FROM devices WHERE dev = ?", (dev,)) is None:
            raise UnknownDevice(f"no device {dev}")
        rows = tx.query(f"SELECT {', '.join(RECORD_FIELDS)} FROM records "
                        "WHERE dev = ? AND seq > ? ORDER BY seq LIMIT ?", (dev, after_seq, limit))
    return [{k: r[k] for k in RECORD_FIELDS} for r in rows]


def active_device(tx: Tx, vin: str, other_than: str) -> str | None:
    """The approved device of the vehicle ``vin`` other than ``other_than``, if there is one:
    a vehicle has one rewarding dongle at a time."""
    row = tx.one("SELECT dev FROM devices WHERE vin = ? AND status = 'approved' AND dev <> ? ORDER BY dev "
                 "LIMIT 1", (vin, other_than))
    return None if row is None else str(row["dev"])


def approve(db: Database, dev: str, now_ms: int, by: str, vin: str | None = None, *,
            replace: bool = False) -> dict[str, Any]:
    """Approve a device. A device flagged for reading another VIN is approved for that VIN (or
    for ``vin`` when given), so that its waiting records are accepted when the agent resends.

    A vehicle has one active device: when another one is approved for the VIN, the approval is
    refused, naming it, unless ``replace`` retires it (its history is kept; its new records are
    refused as ``revoked_device``).

    Each decision is logged (:mod:`backend.records.device_log`): a ``retire`` of the replaced
    device, and the ``approve`` naming the VIN and the device it ``replaces``."""
    _check_dev(dev)
    _check_by(by)
    if vin is not None and not VIN_RE.fullmatch(vin):
        raise DeviceInputError(f"--vin: {vin!r} is not a VIN (17 characters of A-H, J-N, P, R-Z and 0-9)")
    with db.write() as tx:
        lock_device(db, tx, dev)
        row = tx.one("SELECT vin, flagged_vin, status FROM devices WHERE dev = ?", (dev,))
        if row is None:
            raise UnknownDevice(f"no device {dev}")
        new_vin = vin or row["flagged_vin"] or row["vin"]
        retired = None
        if new_vin is not None:
            lock_vehicles(db, tx, [new_vin])
            active = active_device(tx, new_vin, dev)
            if active is not None and not replace:
                raise DeviceInputError(f"VIN {new_vin} already has an active device, {active}: approve with "
                                       "--replace to retire it (its history is kept)")
            if active is not None:
                tx.execute("UPDATE devices SET status = 'retired', retired_at = ?, decided_at = ?, "
                           "decided_by = ? WHERE dev = ?", (now_ms, now_ms, by, active))
                device_log.log_decision(tx, "retire", active, new_vin, by, now_ms)
                retired = active
                log.info("%s retired by %s: replaced by %s in VIN %s", active, by, dev, new_vin)
        tx.execute("UPDATE devices SET status = 'approved', vin = ?, flagged_vin = NULL, decided_at = ?, "
                   "decided_by = ?, approved_at = COALESCE(approved_at, ?) WHERE dev = ?",
                   (new_vin, now_ms, by, now_ms, dev))
        device_log.log_decision(tx, "approve", dev, new_vin, by, now_ms, replaces=retired)
        log.info("%s approved by %s%s", dev, by, f" for VIN {new_vin}" if new_vin != row["vin"] else "")
        return _one(tx, dev)


def clear(db: Database, rules: Source, dev: str, now_ms: int, by: str) -> dict[str, Any]:
    """Clear a device's flag (a rollback that an operator has looked into): the rewards held
    since it was flagged are credited now, in seq order, and its readings earn again, by the
    rule book published in the database (``rules`` only when none was published). The
    ``clear`` decision is logged, and the rules it credits by if they are not yet."""
    _check_dev(dev)
    _check_by(by)
    with db.write() as tx:
        lock_device(db, tx, dev)
        row = tx.one("SELECT * FROM devices WHERE dev = ?", (dev,))
        if row is None:
            raise UnknownDevice(f"no device {dev}")
        if row["held_at"] is None:
            raise DeviceInputError(f"device {dev} is not flagged")
        if row["vin"] is not None:
            lock_vehicles(db, tx, [row["vin"]])
        tx.execute("UPDATE devices SET held_at = NULL, held_reason = NULL, decided_at = ?, decided_by = ? "
                   "WHERE dev = ?", (now_ms, by, dev))
        book = published_or(tx, rules)
        if not book.published:             # published versions were logged when published
            for version in book.versions:
                device_log.log_rules_of(tx, version.rules, now_ms)
        device_log.log_decision(tx, "clear", dev, row["vin"], by, now_ms)
        device = {**row, "held_at": None, "held_reason": None}
        held = tx.query("SELECT jws FROM records WHERE dev = ? AND status = 'accepted' AND received_at >= ? "
                        "ORDER BY seq", (dev, row["held_at"]))
        key = VerifyKey(bytes(row["pub"]))
        credited = 0
        for r in held:
            credited += sum(t.amount for t in rewards.credit(tx, book, verify_record(str(r["jws"]), key),
                                                              device, now_ms))
        log.info("%s cleared by %s (was: %s); %d held record(s) credited %d milli-tokens", dev, by,
                 row["held_reason"], len(held), credited)
        return _one(tx, dev)


def revoke(db: Database, dev: str, now_ms: int, by: str) -> dict[str, Any]:
    """Revoke a device: its records are refused (``revoked_device``) from now on. The decision
    is logged with the VIN the device is approved for."""
    _check_dev(dev)
    _check_by(by)
    with db.write() as tx:
        lock_device(db, tx, dev)
        row = tx.one("SELECT vin FROM devices WHERE dev = ?", (dev,))
        if row is None:
            raise UnknownDevice(f"no device {dev}")
        tx.execute("UPDATE devices SET status = 'revoked', decided_at = ?, decided_by = ? WHERE dev = ?",
                   (now_ms, by, dev))
        device_log.log_decision(tx, "revoke", dev, row["vin"], by, now_ms)
        log.info("%s revoked by %s", dev, by)
        return _one(tx, dev)


def update_status(db: Database, dev: str, body: bytes, now_ms: int) -> bool:
    """Keep an agent's last status message; False when it is malformed or the device unknown."""
    try:
        status = messages.decode_status(body)
    except BadFormat as exc:
        log.info("%s: ignored a malformed status message: %s", dev, exc)
        return False
    with db.write() as tx:
        row = tx.one("SELECT status_json FROM devices WHERE dev = ?", (dev,))
        if row is None:
            return False
        if not status["online"]:
            # The will message says only that the agent went away: keep what it said before.
            status = {**status_of(row["status_json"]), **status}
        tx.execute("UPDATE devices SET status_json = ?, online = ?, last_seen = ? WHERE dev = ?",
                   (json.dumps(status, separators=(",", ":")), 1 if status["online"] else 0, now_ms, dev))
    return True


def fleet_gauges(db: Database) -> FleetFigures:
    """Devices online, the total backlog the agents last reported, devices held, and the
    refused messages kept and dropped."""
    with db.read() as tx:
        online = int(tx.scalar("SELECT COUNT(*) AS n FROM devices WHERE online = 1"))
        held = int(tx.scalar("SELECT COUNT(*) AS n FROM devices WHERE held_at IS NOT NULL"))
        backlog = 0
        for row in tx.query("SELECT status_json FROM devices WHERE status_json IS NOT NULL"):
            backlog += int_or_none(status_of(row["status_json"]).get("backlog")) or 0
        kept = tx.one("SELECT COALESCE(SUM(kept), 0) AS kept, COALESCE(SUM(dropped), 0) AS dropped "
                      "FROM evidence_budget")
        entries = int(tx.scalar("SELECT COALESCE(MAX(idx) + 1, 0) AS n FROM translog"))
        queued = int(tx.scalar("SELECT COUNT(*) AS n FROM translog_queue"))
        latest = int(tx.scalar("SELECT COALESCE(MAX(size), 0) AS n FROM log_checkpoints"))
        witnessed = tx.one("SELECT MIN(size) AS low, COUNT(*) AS n, SUM(CASE WHEN last_error IS NULL "
                           "THEN 0 ELSE 1 END) AS failing FROM log_witnesses")
    assert kept is not None and witnessed is not None
    lag = 0 if not witnessed["n"] else max(0, latest - int(witnessed["low"]))
    return FleetFigures(online, backlog, held, int(kept["kept"]), int(kept["dropped"]), entries, queued, lag,
                        int(witnessed["failing"] or 0))

"""Enrolment (docs/protocol.md §4.5) and fleet tokens.

A device publishes its self-signed enrolment on ``odo/v1/<dev>/enroll``, with its fleet token
beside it (``{"enrolment", "fleet_token"}``, :func:`protocol.messages.decode_enroll`). A new
device is approved at once when its fleet token matches the configured one or a stored one (kept
only as a SHA-256 hash, with an expiry and a use count), and is otherwise pending until an
operator approves it; the token itself is never stored. A known device gets its current status
back: a dev id is bound to the key that first enrolled it, and another key can never take it
over. Every answer goes out on ``odo/v1/<dev>/enrolled``, retained, and operators' later
decisions are published again (:func:`decided_since`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass

from backend.db import Database, Row, Tx
from backend.locks import lock_device, lock_vehicles
from backend.records import device_log
from backend.records.devices import active_device
from protocol import messages
from protocol.errors import BadFormat, BadSignature

log = logging.getLogger(__name__)

WATERMARK = "ingest.decisions_published_through"


@dataclass(frozen=True)
class Answer:
    """What ``odo/v1/<dev>/enrolled`` says."""

    dev: str
    status: str                 # approved | pending | rejected
    reason: str | None = None

    def encode(self) -> bytes:
        return messages.encode_enrolled(self.status, self.reason)


def answer_for(row: Row) -> Answer:
    """A stored device's status, as the device is told it."""
    status = row["status"]
    if status == "approved":
        return Answer(row["dev"], "approved", None)
    if status == "pending":
        return Answer(row["dev"], "pending", "waiting for an operator to approve this device")
    return Answer(row["dev"], "rejected", f"{status} by an operator")


# -- fleet tokens ----------------------------------------------------------------------------

@dataclass(frozen=True)
class FleetToken:
    id: int
    label: str
    expires_at: int | None
    max_uses: int | None
    uses: int
    created_at: int

    def usable(self, now_ms: int) -> bool:
        return ((self.expires_at is None or now_ms < self.expires_at)
                and (self.max_uses is None or self.uses < self.max_uses))


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def add_token(db: Database, label: str, now_ms: int, expires_at: int | None = None,
              max_uses: int | None = None) -> tuple[str, FleetToken]:
    """Make a new fleet token; return it (shown once, never stored) and its stored row."""
    label = label.strip()
    if not label or len(label) > 200:
        raise ValueError("--label: 1 to 200 characters")
    if max_uses is not None and max_uses < 1:
        raise ValueError("--max-uses: must be at least 1")
    if expires_at is not None and expires_at <= now_ms:
        raise ValueError("--expires: must be in the future")
    token = "odo-ft-" + secrets.token_urlsafe(24)
    with db.write() as tx:
        tx.execute("INSERT INTO fleet_tokens (token_hash, label, expires_at, max_uses, uses, created_at) "
                   "VALUES (?, ?, ?, ?, 0, ?)", (token_hash(token), label, expires_at, max_uses, now_ms))
        row = tx.one("SELECT * FROM fleet_tokens WHERE token_hash = ?", (token_hash(token),))
    assert row is not None
    return token, _token(row)


def _token(row: Row) -> FleetToken:
    return FleetToken(int(row["id"]), row["label"], row["expires_at"], row["max_uses"], int(row["uses"]),
                      int(row["created_at"]))


def list_tokens(db: Database) -> list[FleetToken]:
    return [_token(r) for r in db.query("SELECT * FROM fleet_tokens ORDER BY id")]


def _use_stored_token(tx: Tx, token: str, now_ms: int) -> int | None:
    """Count one use of a stored token; its id, or None when unknown, expired or used up."""
    wanted = token_hash(token)
    row = tx.one("SELECT * FROM fleet_tokens WHERE token_hash = ?", (wanted,))
    if row is None or not hmac.compare_digest(row["token_hash"], wanted) or not _token(row).usable(now_ms):
        return None
    changed = tx.execute("UPDATE fleet_tokens SET uses = uses + 1 WHERE id = ? "
                         "AND (max_uses IS NULL OR uses < max_uses)", (row["id"],))
    return int(row["id"]) if changed == 1 else None


def _token_approves(tx: Tx, token: str | None, configured: str | None,
                    now_ms: int) -> tuple[bool, int | None]:
    if not token:
        return False, None
    if configured and hmac.compare_digest(token.encode("utf-8"), configured.encode("utf-8")):
        return True, None
    stored = _use_stored_token(tx, token, now_ms)
    return stored is not None, stored


# -- enrolment -------------------------------------------------------------------------------

def handle(db: Database, topic_dev: str, body: bytes, now_ms: int, fleet_token: str | None) -> Answer:
    """Decide one enrolment message published on ``topic_dev``'s topic.

    The fleet token travels beside the signed enrolment and is only compared (the configured
    one in constant time, stored ones by their hash): it is never stored nor logged. A refused
    message leaves nothing behind. A new device, and each new signed enrolment of a pending one,
    is logged (:mod:`backend.records.device_log`), and so is an approval by a token."""
    try:
        enrollment, given = messages.decode_enroll(body)
        if enrollment.dev != topic_dev:
            raise BadFormat(f"enroll: the enrolment of {enrollment.dev} was published on {topic_dev}'s topic")
    except (BadFormat, BadSignature) as exc:
        log.warning("%s: refused enrolment: %s", topic_dev, exc)
        row = db.one("SELECT dev, status FROM devices WHERE dev = ?", (topic_dev,))
        return answer_for(row) if row is not None else Answer(topic_dev, "rejected", str(exc))
    dev = enrollment.dev
    with db.write() as tx:
        lock_device(db, tx, dev)
        row = tx.one("SELECT dev, status, pub FROM devices WHERE dev = ?", (dev,))
        if row is not None and bytes(row["pub"]) != enrollment.pub.raw:
            log.error("%s: an enrolment with another key than the enrolled one; refused", dev)
            return Answer(dev, "rejected", "this device id is enrolled with another key")
        approve, token_id = (False, None)
        active = None
        if row is None or row["status"] == "pending":
            if enrollment.vin is not None:
                # A fleet token approves a device at once only for a vehicle with no active device:
                # a second dongle in the same car waits for an operator (``approve --replace``).
                lock_vehicles(db, tx, [enrollment.vin])
                active = active_device(tx, enrollment.vin, dev)
            if active is None:
                approve, token_id = _token_approves(tx, given, fleet_token, now_ms)
        status = "approved" if approve else "pending"
        decided = (now_ms, "fleet-token", now_ms) if approve else (None, None, None)
        if row is None:
            tx.execute("INSERT INTO devices (dev, pub, vin, status, enrollment, fleet_token_id, enrolled_at, "
                       "decided_at, decided_by, approved_at, last_seen) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (dev, enrollment.pub.raw, enrollment.vin, status, enrollment.jws, token_id, now_ms,
                        *decided, now_ms))
            device_log.log_enrolment(tx, enrollment, now_ms)
            log.info("%s: enrolled (VIN %s): %s", dev, enrollment.vin, status)
        elif row["status"] == "pending":
            # Still undecided: keep the newest enrolment, so the operator sees the VIN it reads now.
            tx.execute("UPDATE devices SET vin = ?, status = ?, enrollment = ?, fleet_token_id = ?, "
                       "decided_at = ?, decided_by = ?, approved_at = ?, last_seen = ? WHERE dev = ?",
                       (enrollment.vin, status, enrollment.jws, token_id, *decided, now_ms, dev))
            device_log.log_enrolment(tx, enrollment, now_ms)
            if approve:
                log.info("%s: approved by its fleet token on enrolling again", dev)
        else:
            tx.execute("UPDATE devices SET last_seen = ? WHERE dev = ?", (now_ms, dev))
        if approve:
            device_log.log_decision(tx, "approve", dev, enrollment.vin, "fleet-token", now_ms)
        current = tx.one("SELECT dev, status FROM devices WHERE dev = ?", (dev,))
    assert current is not None
    answer = answer_for(current)
    if answer.status == "pending" and active is not None:
        return Answer(dev, "pending", f"VIN {enrollment.vin} already has an active device; waiting for an "
                                      "operator to replace it")
    if answer.status == "pending" and given:
        return Answer(dev, "pending", "fleet token unknown, expired or used up; waiting for an operator")
    return answer


def decided_since(db: Database, since_ms: int) -> list[tuple[Answer, int]]:
    """Devices decided at or after ``since_ms`` (by operators, or by a token), oldest first."""
    rows = db.query("SELECT dev, status, decided_at FROM devices WHERE decided_at >= ? ORDER BY decided_at",
                    (since_ms,))
    return [(answer_for(r), int(r["decided_at"])) for r in rows]


def load_watermark(db: Database) -> int:
    value = db.one("SELECT value FROM settings WHERE name = ?", (WATERMARK,))
    return int(value["value"]) if value is not None and str(value["value"]).isdigit() else 0


def save_watermark(db: Database, ms: int) -> None:
    """Remember that decisions up to ``ms`` were published (never moving it back)."""
    with db.write() as tx:
        if not tx.insert_ignore("settings", {"name": WATERMARK, "value": str(ms)}, ("name",)):
            old = str(tx.scalar("SELECT value FROM settings WHERE name = ?", (WATERMARK,)))
            if not old.isdigit() or int(old) < ms:
                tx.execute("UPDATE settings SET value = ? WHERE name = ?", (str(ms), WATERMARK))

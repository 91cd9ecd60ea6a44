"""Drivers claiming the vehicle they are in, with a one-time pairing code (docs/DESIGN.md §5).

The driver's portal shows a code from :func:`pairing_code`; the driver types it on the dongle's
own page; the dongle sends it signed with its key (:func:`protocol.messages.sign_claim`) and
:func:`claim` assigns that driver to the device's VIN from the backend's receipt time on.

- A code is :data:`protocol.messages.CLAIM_CODE_LEN` characters of a 30-letter alphabet
  (about 39 bits), kept only as a SHA-256 hash, good for :data:`CODE_TTL_MS` and once; a new
  code of a driver ends the driver's unused ones. A device that sends
  :data:`MAX_FAILURES` wrong, expired or used codes within :data:`FAILURE_WINDOW_MS` is
  refused without its code being looked at until that window is over.
- Overlap: a vehicle is another driver's while an assignment or claim of it has started and
  not ended (``valid_to`` unset or later than now), or one is set to start later. A claim of
  such a vehicle is refused (:class:`ClaimConflict`) and its code stays unused: that claim or
  assignment must end first (:func:`end`, ``odo-backend drivers end``). A pool car is thus
  handed on by ending the running claim, never taken over by the next driver's code. A claim
  by the driver who has the vehicle already uses the code and changes nothing.
- Exactly once: the same code from the same device again reports the first result and does
  nothing new (``repeat``); from another device it is :class:`UsedCode`.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import secrets
from dataclasses import asdict, dataclass
from typing import Any

from backend.db import Database, Row, Tx
from backend.errors import (
    AssignmentError,
    ClaimConflict,
    ClaimDeviceError,
    ClaimError,
    ExpiredCode,
    TooManyClaims,
    UnknownCode,
    UsedCode,
)
from backend.ledger import accounts, assignments
from backend.ledger.rewards import reading_time
from backend.locks import lock_vehicles
from protocol.identity import DEV_RE, VIN_RE
from protocol.messages import CLAIM_CODE_ALPHABET, CLAIM_CODE_LEN, normalise_claim_code

log = logging.getLogger(__name__)

CODE_TTL_MS = 15 * 60 * 1000
MAX_FAILURES = 5
FAILURE_WINDOW_MS = 15 * 60 * 1000
_HASH_PREFIX = b"odoledger pairing code\n"


def iso_ms(t_ms: int) -> str:
    return datetime.datetime.fromtimestamp(t_ms / 1000, tz=datetime.UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Claimed:
    """What a claim did: ``driver_id`` drives ``vin`` from ``valid_from`` on. ``created`` is
    False when that driver had the vehicle already; ``repeat`` is True for the same claim again
    (nothing was done); ``moved`` counts unassigned rewards that went to the driver."""

    driver_id: str
    vin: str
    dev: str
    valid_from: int
    created: bool
    repeat: bool = False
    moved: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Ended:
    """An assignment or claim of ``vin`` by ``driver_id`` ended at ``valid_to`` (``changed`` is
    False when it had ended then already)."""

    driver_id: str
    vin: str
    valid_from: int
    valid_to: int
    changed: bool


def code_hash(code: str) -> str:
    return hashlib.sha256(_HASH_PREFIX + code.encode("ascii")).hexdigest()


def _new_code() -> str:
    return "".join(secrets.choice(CLAIM_CODE_ALPHABET) for _ in range(CLAIM_CODE_LEN))


def pairing_code(db: Database, driver_id: str, now_ms: int) -> str:
    """A new one-time code for ``driver_id`` (shown as ``ABCD-EFGH``; case, spaces and dashes
    do not matter when it is typed), good until ``now_ms`` + :data:`CODE_TTL_MS`; the driver's
    earlier unused codes end now."""
    if not isinstance(driver_id, str) or not accounts.DRIVER_ID.fullmatch(driver_id):
        raise ClaimError(f"driver id {driver_id!r}: not a driver id")
    with db.write() as tx:
        if not tx.one("SELECT id FROM drivers WHERE id = ?", (driver_id,)):
            raise ClaimError(f"no driver {driver_id!r}")
        tx.execute("UPDATE claim_codes SET expires_at = ? WHERE driver_id = ? AND used_at IS NULL "
                   "AND expires_at > ?", (now_ms, driver_id, now_ms))
        for _ in range(8):
            code = _new_code()
            if tx.insert_ignore("claim_codes", {"code_hash": code_hash(code), "driver_id": driver_id,
                                                "created_at": now_ms, "expires_at": now_ms + CODE_TTL_MS},
                                ("code_hash",)):
                break
        else:
            raise ClaimError("no unused pairing code could be drawn; try again")
    log.info("pairing code for %s, good until %s", driver_id, iso_ms(now_ms + CODE_TTL_MS))
    return f"{code[:4]}-{code[4:]}"


def claim(db: Database, dev: str, code: str, now_ms: int) -> Claimed:
    """Assign the driver of ``code`` to the VIN of the approved device ``dev`` from ``now_ms``
    (the backend's receipt time) on, and use the code up. Raises a :class:`ClaimError`."""
    if not isinstance(dev, str) or not DEV_RE.fullmatch(dev):
        raise ClaimDeviceError(f"device id {dev!r}: not 32 hex characters")
    normal = normalise_claim_code(code)
    with db.write() as tx:
        device = tx.one("SELECT status, vin FROM devices WHERE dev = ?", (dev,))
        if device is None or device["status"] != "approved":
            raise ClaimDeviceError(f"device {dev} is {'unknown' if device is None else device['status']}: "
                                   "only an approved device claims its vehicle")
        vin = device["vin"]
        if vin is None or not VIN_RE.fullmatch(str(vin)):
            raise ClaimDeviceError(f"device {dev} is approved for no VIN: it has no vehicle to claim")
        outcome = _claim_in(db, tx, dev, str(vin), normal, now_ms)
    if isinstance(outcome, ClaimError):
        log.warning("%s: claim refused: %s", dev, outcome)
        raise outcome
    log.info("%s: %s claims %s from %s%s", dev, outcome.driver_id, outcome.vin, iso_ms(outcome.valid_from),
             " (again: nothing new)" if outcome.repeat else "")
    return outcome


def _claim_in(db: Database, tx: Tx, dev: str, vin: str, code: str | None,
              now_ms: int) -> Claimed | ClaimError:
    """The claim in ``tx``; a wrong code is counted against the device (committed) and
    returned, a vehicle taken is raised (nothing is kept)."""
    failures = tx.one("SELECT window_start, failures FROM claim_failures WHERE dev = ?", (dev,))
    in_window = failures is not None and now_ms < int(failures["window_start"]) + FAILURE_WINDOW_MS
    if failures is not None and in_window and int(failures["failures"]) >= MAX_FAILURES:
        until = int(failures["window_start"]) + FAILURE_WINDOW_MS
        return TooManyClaims(f"device {dev} sent {MAX_FAILURES} wrong pairing codes in "
                             f"{FAILURE_WINDOW_MS // 60000} minutes: no claim before {iso_ms(until)}")
    row = None if code is None else tx.one("SELECT * FROM claim_codes WHERE code_hash = ?",
                                           (code_hash(code),))
    if row is not None and row["used_by"] == dev:
        return _repeat(row, dev)
    refusal: ClaimError | None = None
    if row is None:
        refusal = UnknownCode(f"device {dev}: no such pairing code (the driver's portal shows "
                              f"{CLAIM_CODE_LEN} characters of {CLAIM_CODE_ALPHABET})")
    elif row["used_by"] is not None:
        refusal = UsedCode(f"device {dev}: the pairing code was used at {iso_ms(int(row['used_at']))} "
                           "by another device; ask the portal for a new one")
    elif now_ms >= int(row["expires_at"]):
        refusal = ExpiredCode(f"device {dev}: the pairing code ended at {iso_ms(int(row['expires_at']))}; "
                              "ask the portal for a new one")
    if refusal is not None:
        _count_failure(tx, dev, now_ms, failures is not None, in_window)
        return refusal
    assert row is not None
    driver_id = str(row["driver_id"])
    if tx.execute("UPDATE claim_codes SET used_at = ?, used_by = ? WHERE id = ? AND used_by IS NULL",
                  (now_ms, dev, row["id"])) != 1:
        return UsedCode(f"device {dev}: the pairing code was used by another device just now")
    lock_vehicles(db, tx, [vin])
    current = _holder(tx, vin, now_ms)
    if current is not None and str(current["driver_id"]) != driver_id:
        raise ClaimConflict(_taken(vin, current))
    if current is not None:
        valid_from, created, moved = int(current["valid_from"]), False, 0
    else:
        try:
            moved = len(assignments.assign_in(db, tx, driver_id, vin, now_ms, now_ms))
        except AssignmentError as exc:
            raise ClaimConflict(f"{vin}: {exc}") from None
        valid_from, created = now_ms, True
    tx.execute("UPDATE claim_codes SET vin = ?, valid_from = ?, created = ? WHERE id = ?",
               (vin, valid_from, 1 if created else 0, row["id"]))
    return Claimed(driver_id, vin, dev, valid_from, created, False, moved)


def _repeat(row: Row, dev: str) -> Claimed:
    return Claimed(str(row["driver_id"]), str(row["vin"]), dev, int(row["valid_from"]),
                   bool(row["created"]), True, 0)


def _count_failure(tx: Tx, dev: str, now_ms: int, known: bool, in_window: bool) -> None:
    if not known:
        tx.execute("INSERT INTO claim_failures (dev, window_start, failures) VALUES (?, ?, 1)", (dev, now_ms))
    elif in_window:
        tx.execute("UPDATE claim_failures SET failures = failures + 1 WHERE dev = ?", (dev,))
    else:
        tx.execute("UPDATE claim_failures SET window_start = ?, failures = 1 WHERE dev = ?", (now_ms, dev))


def _holder(tx: Tx, vin: str, now_ms: int) -> Row | None:
    """The assignment of ``vin`` running at ``now_ms`` or starting later (the latest-starting)."""
    return tx.one("SELECT driver_id, valid_from, valid_to FROM assignments WHERE vin = ? "
                  "AND (valid_to IS NULL OR valid_to > ?) ORDER BY valid_from DESC, id DESC LIMIT 1",
                  (vin, now_ms))


def _taken(vin: str, row: Row) -> str:
    who, since = str(row["driver_id"]), iso_ms(int(row["valid_from"]))
    until = "" if row["valid_to"] is None else f" until {iso_ms(int(row['valid_to']))}"
    return (f"{vin} is {who}'s from {since}{until}: that claim or assignment must end first "
            f"(odo-backend drivers end {who} --vin {vin})")


def end(db: Database, driver_id: str, vin: str, at_ms: int, now_ms: int) -> Ended:
    """End the assignment or claim of ``vin`` by ``driver_id`` running at ``at_ms`` (now, or
    earlier when no reward of a reading since then is the driver's already); ending one that
    ended at ``at_ms`` already changes nothing."""
    if not isinstance(driver_id, str) or not accounts.DRIVER_ID.fullmatch(driver_id):
        raise AssignmentError(f"driver id {driver_id!r}: not a driver id")
    if not VIN_RE.fullmatch(vin):
        raise AssignmentError(f"VIN {vin!r}: not a VIN (17 characters of A-H, J-N, P, R-Z and 0-9)")
    if at_ms > now_ms:
        raise AssignmentError(f"{iso_ms(at_ms)} is later than now: an assignment ends now or earlier")
    with db.write() as tx:
        lock_vehicles(db, tx, [vin])
        row = tx.one("SELECT id, valid_from, valid_to FROM assignments WHERE driver_id = ? AND vin = ? "
                     "AND valid_from < ? AND (valid_to IS NULL OR valid_to > ?) "
                     "ORDER BY valid_from DESC LIMIT 1", (driver_id, vin, at_ms, at_ms))
        if row is None:
            done = tx.one("SELECT valid_from, valid_to FROM assignments WHERE driver_id = ? AND vin = ? "
                          "AND valid_to = ? ORDER BY valid_from DESC LIMIT 1", (driver_id, vin, at_ms))
            if done is not None:
                return Ended(driver_id, vin, int(done["valid_from"]), at_ms, False)
            raise AssignmentError(f"{driver_id} is not assigned to {vin} at {iso_ms(at_ms)}")
        later = _credited_since(tx, driver_id, vin, at_ms)
        if later is not None:
            raise AssignmentError(f"a reward for a reading of {vin} at {iso_ms(later)} is {driver_id}'s "
                                  "already: the assignment ends at that time or later")
        tx.execute("UPDATE assignments SET valid_to = ? WHERE id = ?", (at_ms, row["id"]))
    log.info("%s's assignment to %s ended at %s", driver_id, vin, iso_ms(at_ms))
    return Ended(driver_id, vin, int(row["valid_from"]), at_ms, True)


def _credited_since(tx: Tx, driver_id: str, vin: str, at_ms: int) -> int | None:
    """The latest reading time at or after ``at_ms`` of a reward of ``vin`` that is the driver's."""
    rows = tx.query(
        "SELECT r.t, r.t_est, r.clock FROM transfers t JOIN records r ON r.id = t.record_id "
        "LEFT JOIN devices d ON d.dev = t.dev WHERE t.to_account = ? "
        "AND (r.vin = ? OR (r.vin IS NULL AND d.vin = ?))",
        (accounts.driver_account(driver_id), vin, vin))
    times = [reading_time(r["clock"], int(r["t"]), r["t_est"]) for r in rows]
    later = [t for t in times if t >= at_ms]
    return max(later) if later else None

"""The ``claim`` topic (docs/protocol.md §4.7): a device's signed claim of its vehicle for a
driver, checked and handed to :func:`backend.ledger.claims.claim`.

A claim on ``odo/v1/<dev>/claim`` counts only when it is signed by the key ``dev`` was
approved with, names ``dev`` as its device, and its time ``t`` is within
:data:`CLAIM_SKEW_MS` of the backend's clock (the assignment starts at the backend's receipt
time, never at ``t``). Every claim is answered on the device's ``enrolled`` topic, not retained,
as ``{"claim": {"id", "status", "reason", "driver", "vin", "from"}}``
(:func:`protocol.messages.encode_claim_result`): ``id`` is the SHA-256 hex of the message, so
that the agent knows which of its claims the answer is about.
"""

from __future__ import annotations

import hashlib
import logging

from backend.db import Database
from backend.errors import ClaimError
from backend.ledger import claims
from protocol import messages
from protocol.errors import BadFormat, BadSignature
from protocol.identity import VerifyKey

log = logging.getLogger(__name__)

#: How far a claim's own time may be from the backend's clock, either way.
CLAIM_SKEW_MS = 24 * 60 * 60 * 1000


def _refused(cid: str, dev: str, reason: str, why: object) -> messages.ClaimResult:
    log.warning("%s: claim refused (%s): %s", dev, reason, why)
    return messages.ClaimResult(cid, "refused", reason)


def handle(db: Database, topic_dev: str, body: bytes, now_ms: int) -> messages.ClaimResult:
    """Decide one ``claim`` message published on ``topic_dev``'s topic at ``now_ms``; the
    answer to publish on its ``enrolled`` topic. A refused claim changes nothing but the
    device's count of wrong codes (:mod:`backend.ledger.claims`)."""
    cid = hashlib.sha256(body).hexdigest()
    try:
        kid = messages.claim_kid(body)
        if kid != topic_dev:
            raise BadFormat(f"claim: signed by {kid}, published on {topic_dev}'s topic")
        row = db.one("SELECT pub, status FROM devices WHERE dev = ?", (topic_dev,))
        if row is None or row["status"] != "approved":
            state = "unknown" if row is None else row["status"]
            return _refused(cid, topic_dev, "device_not_approved", f"the device is {state}")
        claim = messages.verify_claim(body, VerifyKey(bytes(row["pub"])))
    except BadFormat as exc:
        return _refused(cid, topic_dev, "bad_format", exc)
    except BadSignature:
        return _refused(cid, topic_dev, "bad_signature", "not signed by the device's key")
    if abs(claim.t - now_ms) > CLAIM_SKEW_MS:
        return _refused(cid, topic_dev, "clock_off", f"its time {claim.t} ms is more than "
                        f"{CLAIM_SKEW_MS // 3_600_000} h from the backend's {now_ms} ms")
    try:
        done = claims.claim(db, topic_dev, claim.code, now_ms)
    except ClaimError as exc:
        return messages.ClaimResult(cid, "refused", exc.reason)
    return messages.ClaimResult(cid, "claimed", None, done.driver_id, done.vin, done.valid_from)

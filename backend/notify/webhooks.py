"""Delivering the events: signed HTTP POSTs, retried with backoff, each attempt recorded.

Each delivery (a row of ``webhook_deliveries``) is claimed by one process at a time with a lease
(``lease_until``, ``lease_owner``; on PostgreSQL the claim skips rows another claim has locked,
``FOR UPDATE SKIP LOCKED``), POSTed outside any transaction, and its outcome written back by the
lease's owner: a 2xx ends it (``delivered``); anything else (another status, no answer within
the bounds, a refused connection) is retried after ``Retry.delay`` (exponential, with jitter)
until ``max_attempts`` tries or ``max_age_ms`` have gone (``failed``). A process that stops in
the middle of an attempt leaves its lease to expire, and the delivery is tried again: delivery
is at least once, and receivers deduplicate on the event id.

Every request carries (the scheme a receiver checks, README "Webhooks")::

    Content-Type: application/json
    Odo-Webhook-Id: <the event id, e.g. fork:<record id>>
    Odo-Webhook-Event: <the event>
    Odo-Webhook-Timestamp: <Unix seconds of this attempt>
    Odo-Webhook-Signature: sha256=<hex of HMAC-SHA256(secret, "<timestamp>.<body>")>

The body is the same bytes on every attempt; the timestamp and signature are made anew.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import logging
import random
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from backend.db import Database, Row

log = logging.getLogger(__name__)

HEADER_ID = "Odo-Webhook-Id"
HEADER_EVENT = "Odo-Webhook-Event"
HEADER_TIMESTAMP = "Odo-Webhook-Timestamp"
HEADER_SIGNATURE = "Odo-Webhook-Signature"
#: Connecting, and each read or write, waits at most this long.
TIMEOUT_S = 10.0
#: One attempt takes at most this long, however slowly the receiver answers.
DEADLINE_S = 15.0
#: A claim holds a delivery this long: more than an attempt can take.
LEASE_MS = 60_000
#: The most read of a receiver's answer (kept, cut short, as the error of a non-2xx).
MAX_ANSWER_BYTES = 4096
MAX_ERROR_CHARS = 300
#: A receiver should refuse a request whose timestamp is further than this from its clock.
TOLERANCE_S = 300


@dataclass(frozen=True)
class Retry:
    """When a delivery is tried again: after ``base_ms`` × 2^(n−1), at most ``max_ms``, with
    "equal jitter" (a random time in the upper half), until ``max_attempts`` tries or
    ``max_age_ms`` since the event was found."""

    base_ms: int = 10_000
    max_ms: int = 3_600_000
    max_attempts: int = 12
    max_age_ms: int = 86_400_000

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> int:
        full: int = min(self.max_ms, self.base_ms * 2 ** min(attempt - 1, 40))
        return full - full // 2 + int(full // 2 * rand())


DEFAULT_RETRY = Retry()


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The value of :data:`HEADER_SIGNATURE`: ``sha256=`` and the hex HMAC of ``<timestamp>.<body>``."""
    return "sha256=" + hmac.new(secret, b"%d." % timestamp + body, hashlib.sha256).hexdigest()


def verify(secret: bytes, headers: Mapping[str, str], body: bytes, now_s: int,
           tolerance_s: int = TOLERANCE_S) -> bool:
    """What a receiver does: the timestamp is recent and the signature is the body's."""
    stamp = headers.get(HEADER_TIMESTAMP, "")
    if not stamp.isdigit() or len(stamp) > 12 or abs(now_s - int(stamp)) > tolerance_s:
        return False
    return hmac.compare_digest(signature(secret, int(stamp), body), headers.get(HEADER_SIGNATURE, ""))


@dataclass(frozen=True)
class Outcome:
    code: int | None            # the HTTP status, None when there was no answer
    error: str | None           # None for a 2xx

    @property
    def ok(self) -> bool:
        return self.code is not None and 200 <= self.code < 300


def abort_connection(conn: http.client.HTTPConnection) -> None:
    """Cut a request short: the blocked read or write in the other thread fails at once."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def post(url: str, body: bytes, headers: Mapping[str, str], *, timeout_s: float = TIMEOUT_S,
         deadline_s: float = DEADLINE_S,
         on_connection: Callable[[http.client.HTTPConnection | None], None] | None = None) -> Outcome:
    """POST ``body`` to ``url``; redirects are not followed (a 3xx is a failure)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(host, parts.port, timeout=timeout_s,
                                           context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(host, parts.port, timeout=timeout_s)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    timer = threading.Timer(deadline_s, abort_connection, (conn,))
    timer.daemon = True
    if on_connection is not None:
        on_connection(conn)
    timer.start()
    try:
        conn.request("POST", target, body=body, headers=dict(headers))
        response = conn.getresponse()
        answer = response.read(MAX_ANSWER_BYTES)
        code = int(response.status)
    except (OSError, http.client.HTTPException) as exc:
        late = "" if timer.is_alive() else f" (no answer within {deadline_s:g} s)"
        return Outcome(None, f"{type(exc).__name__}: {exc}{late}"[:MAX_ERROR_CHARS])
    finally:
        timer.cancel()
        if on_connection is not None:
            on_connection(None)
        conn.close()
    if 200 <= code < 300:
        return Outcome(code, None)
    said = answer.decode("utf-8", "replace").strip()
    return Outcome(code, f"HTTP {code}{': ' + said if said else ''}"[:MAX_ERROR_CHARS])


def request_headers(secret: bytes, event_key: str, event: str, body: bytes, now_s: int) -> dict[str, str]:
    return {"Content-Type": "application/json", "User-Agent": "odoledger-webhooks/1",
            HEADER_ID: event_key, HEADER_EVENT: event, HEADER_TIMESTAMP: str(now_s),
            HEADER_SIGNATURE: signature(secret, now_s, body)}


# -- claiming and recording ---------------------------------------------------------------------

@dataclass(frozen=True)
class Claimed:
    id: int
    event_key: str
    event: str
    body: str
    attempts: int               # made before this one
    created_at: int


def claim(db: Database, webhook: str, owner: str, now: int, lease_ms: int = LEASE_MS) -> Claimed | None:
    """The next due delivery to ``webhook``, leased to ``owner`` until ``now + lease_ms``."""
    skip = " FOR UPDATE OF d SKIP LOCKED" if db.dialect == "postgresql" else ""
    with db.write() as tx:
        row = tx.one(
            "SELECT d.id, d.event_key, d.attempts, d.created_at, e.event, e.body FROM webhook_deliveries d "
            "JOIN webhook_events e ON e.key = d.event_key WHERE d.webhook = ? AND d.status = 'pending' "
            "AND d.next_at <= ? AND (d.lease_until IS NULL OR d.lease_until <= ?) "
            f"ORDER BY d.next_at, d.id LIMIT 1{skip}", (webhook, now, now))
        if row is None:
            return None
        tx.execute("UPDATE webhook_deliveries SET lease_until = ?, lease_owner = ? WHERE id = ?",
                   (now + lease_ms, owner, row["id"]))
    return Claimed(int(row["id"]), str(row["event_key"]), str(row["event"]), str(row["body"]),
                   int(row["attempts"]), int(row["created_at"]))


def record(db: Database, claimed: Claimed, owner: str, outcome: Outcome, now: int, retry: Retry,
           rand: Callable[[], float] = random.random) -> str | None:
    """Write an attempt's outcome; return the delivery's status now (None: the lease was lost)."""
    n = claimed.attempts + 1
    next_at: int | None = None
    if outcome.ok:
        status = "delivered"
    else:
        wait = retry.delay(n, rand)
        if n >= retry.max_attempts or now + wait - claimed.created_at > retry.max_age_ms:
            status = "failed"
        else:
            status, next_at = "pending", now + wait
    with db.write() as tx:
        changed = tx.execute(
            "UPDATE webhook_deliveries SET status = ?, attempts = ?, next_at = ?, lease_until = NULL, "
            "lease_owner = NULL, last_code = ?, last_error = ?, updated_at = ? "
            "WHERE id = ? AND lease_owner = ?",
            (status, n, next_at, outcome.code, outcome.error, now, claimed.id, owner))
        if not changed:
            log.warning("webhook delivery %s: its lease ran out before the attempt ended", claimed.event_key)
            return None
        tx.insert_ignore("webhook_attempts", {"delivery_id": claimed.id, "n": n, "at": now,
                                              "code": outcome.code, "error": outcome.error,
                                              "next_at": next_at}, ("delivery_id", "n"))
    return status


def release(db: Database, claimed: Claimed, owner: str) -> None:
    """Give a claimed delivery back untried (the process is stopping)."""
    with db.write() as tx:
        tx.execute("UPDATE webhook_deliveries SET lease_until = NULL, lease_owner = NULL "
                   "WHERE id = ? AND lease_owner = ?", (claimed.id, owner))


def shown_url(url: str) -> str:
    """A webhook's URL as pages show it: without its query (it may hold a token)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(query="", fragment=""))


def recent(db: Database, limit: int = 100) -> list[dict[str, Any]]:
    """The latest deliveries, most recently changed first, for the dashboard."""
    rows: list[Row] = db.query(
        "SELECT d.id, d.event_key, e.event, d.webhook, d.status, d.attempts, d.next_at, d.last_code, "
        "d.last_error, d.created_at, d.updated_at FROM webhook_deliveries d "
        "JOIN webhook_events e ON e.key = d.event_key ORDER BY d.updated_at DESC, d.id DESC LIMIT ?",
        (max(1, min(int(limit), 1000)),))
    return [{**r, "webhook": shown_url(str(r["webhook"]))} for r in rows]

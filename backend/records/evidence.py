"""Refused messages kept for operators, within a budget.

A record that does not take a seq (``bad_format``, ``bad_signature``, ``unknown_device`` …) is
kept in ``rejections`` so that an operator can see what was sent. Anyone who can publish can
send such messages, so what is kept is bounded: each enrolled device has a budget of messages
and bytes, and every topic that names no enrolled device shares one global budget. Past its
budget a refusal is still answered and counted (``dropped``), but its body is not stored.
The same content refused twice for the same reason is kept once.
"""

from __future__ import annotations

from dataclasses import dataclass

from backend.db import Tx

#: The longest body kept of one refused record (a record is at most 64 KiB).
MAX_LOGGED_BODY = 64 * 1024
#: The budget bucket shared by every topic that names no enrolled device.
UNKNOWN = "*unknown*"


@dataclass(frozen=True)
class EvidenceLimits:
    """How much refused content is kept: per enrolled device, and for all unknown ones together."""

    per_device: int = 1_000
    per_device_bytes: int = 4 * 1024 * 1024
    unknown: int = 10_000
    unknown_bytes: int = 32 * 1024 * 1024

    def of(self, bucket: str) -> tuple[int, int]:
        if bucket == UNKNOWN:
            return self.unknown, self.unknown_bytes
        return self.per_device, self.per_device_bytes


DEFAULT_LIMITS = EvidenceLimits()


def keep(tx: Tx, dev: str, known: bool, seq: int | None, reason: str, detail: str, body: str,
         now_ms: int, limits: EvidenceLimits = DEFAULT_LIMITS) -> bool:
    """Keep a refused record for operators, once per device, reason and content, while the
    bucket (``dev``, or :data:`UNKNOWN` for a device that never enrolled) has room; return
    whether it was stored. The caller holds the device's lock."""
    body = body[:MAX_LOGGED_BODY]
    if tx.one("SELECT 1 AS x FROM rejections WHERE dev = ? AND reason = ? AND body = ?",
              (dev, reason, body)) is not None:
        return False
    bucket = dev if known else UNKNOWN
    tx.insert_ignore("evidence_budget", {"bucket": bucket, "kept": 0, "kept_bytes": 0, "dropped": 0},
                     ["bucket"])
    row = tx.one("SELECT kept, kept_bytes FROM evidence_budget WHERE bucket = ?", (bucket,))
    assert row is not None
    size = len(body.encode("utf-8")) + len(detail.encode("utf-8"))
    most, most_bytes = limits.of(bucket)
    if int(row["kept"]) + 1 > most or int(row["kept_bytes"]) + size > most_bytes:
        tx.execute("UPDATE evidence_budget SET dropped = dropped + 1 WHERE bucket = ?", (bucket,))
        return False
    tx.execute("UPDATE evidence_budget SET kept = kept + 1, kept_bytes = kept_bytes + ? WHERE bucket = ?",
               (size, bucket))
    tx.execute("INSERT INTO rejections (dev, seq, reason, detail, body, received_at) "
               "VALUES (?, ?, ?, ?, ?, ?)", (dev, seq, reason, detail, body, now_ms))
    return True


def budget(tx: Tx, bucket: str) -> dict[str, int]:
    """What a bucket holds: ``kept``, ``kept_bytes`` and ``dropped``."""
    row = tx.one("SELECT kept, kept_bytes, dropped FROM evidence_budget WHERE bucket = ?", (bucket,))
    if row is None:
        return {"kept": 0, "kept_bytes": 0, "dropped": 0}
    return {k: int(row[k]) for k in ("kept", "kept_bytes", "dropped")}

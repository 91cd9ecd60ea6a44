"""What only the backend's tests need beside :mod:`sim.devices` (the signed-record fixtures):
a snapshot of everything the ingest may change."""

from __future__ import annotations

from typing import Any

from backend.db import Database


def snapshot(db: Database) -> dict[str, Any]:
    """Everything the ingest may change, for "nothing stored changed" assertions."""
    return {
        "records": db.query("SELECT dev, seq, id, status, reason, t_est FROM records ORDER BY dev, seq"),
        "devices": db.query("SELECT dev, status, vin, flagged_vin, through, head_id FROM devices "
                            "ORDER BY dev"),
        "forks": db.query("SELECT dev, seq, record_id FROM forks ORDER BY id"),
        "transfers": db.query("SELECT key, amount, to_account FROM transfers ORDER BY id"),
        "translog": db.query("SELECT idx, ref FROM translog ORDER BY idx"),
        "translog_queue": db.query("SELECT ref FROM translog_queue ORDER BY id"),
    }

"""What only the backend's tests need beside :mod:`sim.devices` (the signed-record fixtures):
a snapshot of everything the ingest may change, and a count of the messages it holds unacked."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from backend.db import Database

if TYPE_CHECKING:
    from backend.records.ingest import Ingest


class Unacked:
    """Counts the messages an ingest has received and not yet PUBACKed (``now``), and the most
    at once (``most``), by wrapping its client's ``on_message`` and ``ack``."""

    def __init__(self, ingest: Ingest) -> None:
        self.lock = threading.Lock()
        self.now = self.most = 0
        real_on_message, real_ack = ingest._on_message, ingest.client.ack

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            with self.lock:
                self.now += 1
                self.most = max(self.most, self.now)
            real_on_message(client, userdata, msg)

        def ack(mid: int, qos: int) -> Any:
            with self.lock:
                self.now -= 1
            return real_ack(mid, qos)

        ingest.client.on_message = on_message
        ingest.client.ack = ack  # type: ignore[method-assign]


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

"""Outbox retention: how long synced records stay on the device.

Synced records are deleted once they are ``retention_days`` old (counted from the ack that
synced them), and earlier, oldest first, while the outbox holds more than ``max_records``; an
unsynced record never is (:meth:`agent.buffer.Outbox.prune` says why). The daemon's OBD loop
calls :meth:`Retention.tick` after every sample; it prunes at most every ``PRUNE_EVERY_S``,
and records a ``buffer_pruned`` event when the cap forced synced records out early. What to do
when the *unsynced* backlog alone is too big is the recorder's admission policy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from agent.errors import StorageError
from agent.recorder import Recorder
from common.clock import now_ms

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 600.0
DAY_MS = 86_400_000


class Retention:
    def __init__(self, recorder: Recorder, *, retention_days: int, max_records: int,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.recorder = recorder
        self.outbox = recorder.outbox
        self.retention_ms = retention_days * DAY_MS
        self.max_records = max_records
        self._mono = monotonic
        self._pruned_at = -PRUNE_EVERY_S

    def tick(self) -> None:
        """Prune when ``PRUNE_EVERY_S`` have passed since the last time (at once the first time)."""
        if self._mono() - self._pruned_at < PRUNE_EVERY_S:
            return
        self._pruned_at = self._mono()
        try:
            expired, over = self.outbox.prune(now_ms(), retention_ms=self.retention_ms,
                                              max_records=self.max_records)
        except StorageError as exc:
            log.error("cannot prune the outbox: %s", exc)
            return
        if expired:
            log.info("deleted %d synced records older than the retention period", expired)
        if over:
            log.warning("outbox over %d records: deleted the %d oldest synced records",
                        self.max_records, over)
            self.recorder.event("buffer_pruned", {"deleted_synced": over, "max_records": self.max_records})

"""The log's sequencer: integrates stored entries into the Merkle tree, in batches, off the
ingest's path (docs/log.md, "Merge delay").

Ingest stores each entry in the transaction that accepts it (``translog.append``), taking no
lock that other devices share; every ``odo-backend run`` process runs a :class:`Sequencer`,
and the one that takes the log's advisory lock for a batch integrates it while the others find
the lock taken and wait for the next tick. A process that dies mid-batch rolls its transaction
back: the entries stay stored, and the next sequencer integrates them. The delay from storing
to integrating is observed in ``odo_log_merge_delay_seconds``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from backend import metrics
from backend.db import Database
from backend.transparency import translog

log = logging.getLogger(__name__)

#: How often an idle sequencer looks for stored entries.
INTERVAL_MS = 100


class Sequencer:
    """Integrate stored entries every ``interval_ms`` (at once again after a full batch), in a
    thread of its own, until :meth:`stop`."""

    def __init__(self, db: Database, clock: Callable[[], int], interval_ms: int = INTERVAL_MS,
                 registry: metrics.Registry = metrics.REGISTRY) -> None:
        self.db = db
        self.clock = clock
        self.interval_ms = interval_ms
        self.registry = registry
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sequencer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def once(self) -> int:
        """One batch; the entries integrated."""
        done = translog.integrate(self.db, self.clock())
        for delay in done.delays_ms:
            self.registry.observe_merge_delay(delay / 1000)
        if done.entries:
            log.debug("integrated %d entries; the log holds %s", done.entries, done.size)
        return done.entries

    def _loop(self) -> None:
        wait = 0.0
        while not self._stop.wait(wait):
            try:
                full = self.once() >= translog.INTEGRATE_BATCH
            except Exception:   # noqa: BLE001 - a database hiccup must not end the sequencing
                log.exception("integrating stored entries into the log failed; trying again")
                full = False
                self.db.close()      # a fresh connection next time; a healthy one is kept
            wait = 0.0 if full else self.interval_ms / 1000
        self.db.close()              # this thread's connection

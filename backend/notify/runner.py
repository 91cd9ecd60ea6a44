"""The webhooks in ``odo-backend run``: one thread that watches for events, one per webhook that
delivers them, so that a slow or dead receiver holds up only its own deliveries.

Several backend processes may run it on one database: each event is stored once, and each
delivery is claimed by one of them at a time (:mod:`backend.notify.webhooks`). :meth:`Notifier.stop`
ends the threads; an attempt in flight is cut short and its delivery given back, to be tried
again at the next start (or by another process).
"""

from __future__ import annotations

import http.client
import logging
import os
import random
import socket
import threading
import uuid
from collections.abc import Callable

from backend.db import Database
from backend.notify import webhooks
from backend.notify.config import NotifyConfig, Webhook
from backend.notify.events import Watcher

log = logging.getLogger(__name__)

#: How often the watcher looks for events.
WATCH_INTERVAL_MS = 10_000
#: How often an idle deliverer looks for due deliveries (it is woken after each watch, too).
POLL_MS = 2_000


def owner_id() -> str:
    """This process's name on the leases it takes."""
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Deliverer:
    """Delivers the due events of one webhook, one at a time."""

    def __init__(self, db: Database, hook: Webhook, clock: Callable[[], int], owner: str,
                 retry: webhooks.Retry = webhooks.DEFAULT_RETRY, rand: Callable[[], float] = random.random,
                 timeout_s: float = webhooks.TIMEOUT_S, deadline_s: float = webhooks.DEADLINE_S) -> None:
        self.db, self.hook, self.clock, self.owner = db, hook, clock, owner
        self.retry, self.rand = retry, rand
        self.timeout_s, self.deadline_s = timeout_s, deadline_s
        self.stopping = threading.Event()
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    def _track(self, conn: http.client.HTTPConnection | None) -> None:
        with self._lock:
            self._conn = conn
        if conn is not None and self.stopping.is_set():
            webhooks.abort_connection(conn)

    def abort(self) -> None:
        """Stop: cut short the attempt in flight, if any."""
        self.stopping.set()
        with self._lock:
            if self._conn is not None:
                webhooks.abort_connection(self._conn)

    def once(self) -> str | None:
        """Try the next due delivery; return its status after the attempt, None if none was due."""
        claimed = webhooks.claim(self.db, self.hook.url, self.owner, self.clock())
        if claimed is None:
            return None
        body = claimed.body.encode("utf-8")
        headers = webhooks.request_headers(self.hook.secret, claimed.event_key, claimed.event, body,
                                           self.clock() // 1000)
        outcome = webhooks.post(self.hook.url, body, headers, timeout_s=self.timeout_s,
                                deadline_s=self.deadline_s, on_connection=self._track)
        if self.stopping.is_set() and not outcome.ok:
            webhooks.release(self.db, claimed, self.owner)
            return "pending"
        status = webhooks.record(self.db, claimed, self.owner, outcome, self.clock(), self.retry, self.rand)
        where = webhooks.shown_url(self.hook.url)
        if status == "failed":
            log.warning("webhook %s: giving up on %s after %d attempts: %s", where, claimed.event_key,
                        claimed.attempts + 1, outcome.error)
        elif status == "pending":
            log.info("webhook %s: %s not delivered (%s); trying again later", where, claimed.event_key,
                     outcome.error)
        return status


class Notifier:
    """The watcher and the deliverers, in threads of their own, until :meth:`stop`."""

    def __init__(self, db: Database, cfg: NotifyConfig, clock: Callable[[], int], *,
                 interval_ms: int = WATCH_INTERVAL_MS, poll_ms: int = POLL_MS,
                 retry: webhooks.Retry = webhooks.DEFAULT_RETRY) -> None:
        self.db, self.cfg = db, cfg
        self.watcher = Watcher(db, cfg, clock)
        owner = owner_id()
        self.deliverers = [Deliverer(db, hook, clock, owner, retry) for hook in cfg.webhooks]
        self.interval_ms, self.poll_ms = interval_ms, poll_ms
        self._stop = threading.Event()
        self._wake = [threading.Event() for _ in self.deliverers]
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the threads (none when no webhook is configured)."""
        if not self.deliverers:
            return
        self._threads = [threading.Thread(target=self._watch, name="webhook-watcher", daemon=True)]
        pairs = zip(self.deliverers, self._wake, strict=True)
        self._threads += [threading.Thread(target=self._deliver, args=(d, w), name=f"webhook-{n}",
                                           daemon=True) for n, (d, w) in enumerate(pairs, start=1)]
        for thread in self._threads:
            thread.start()
        log.info("webhooks: %d receiver(s), events %s", len(self.deliverers),
                 ", ".join(sorted(self.cfg.wanted())))

    def stop(self) -> None:
        self._stop.set()
        for deliverer, wake in zip(self.deliverers, self._wake, strict=True):
            deliverer.abort()
            wake.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def _watch(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    if self.watcher.scan():
                        for wake in self._wake:
                            wake.set()
                except Exception:   # noqa: BLE001 - a database hiccup must not end the watching
                    log.exception("looking for webhook events failed; trying again")
                    self.db.close()
                self._stop.wait(self.interval_ms / 1000)
        finally:
            self.db.close()

    def _deliver(self, deliverer: Deliverer, wake: threading.Event) -> None:
        try:
            while not self._stop.is_set():
                try:
                    if deliverer.once() is not None:
                        continue
                except Exception:   # noqa: BLE001 - nor must it end the deliveries
                    log.exception("delivering to webhook %s failed; trying again",
                                  webhooks.shown_url(deliverer.hook.url))
                    self.db.close()
                wake.wait(self.poll_ms / 1000)
                wake.clear()
        finally:
            self.db.close()

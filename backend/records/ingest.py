"""MQTT ingest: the one module of the backend that talks to the broker (paho).

The backend subscribes through shared subscriptions (``$share/odo-backend/odo/v1/+/records``,
and the same for ``enroll`` and ``status``) at QoS 1 over MQTT 5, so that several backend
processes split the load.

The pipeline: paho's network thread only routes each message to one of a few worker threads
(``workers``, by default two to four after the CPU count), always the same one for one device
(a hash of its id), so that a device's messages are handled in the order they came. A worker
verifies and stores the message (a batch in one transaction), publishes the device's ack after
the commit, and only then sends the message's PUBACK (paho's ``manual_ack``): a message the
backend received but did not commit is sent again by the broker when the session resumes. While
one worker checks signatures (the cryptography libraries release the GIL), another can be in
its transaction. Each worker holds at most ``QUEUE_PER_WORKER`` messages besides the one in hand;
when its queue is full the network thread waits, the broker's window fills (the CONNECT's
Receive Maximum is what all the queues hold) and the broker stops sending: a slow database
slows the ingest down, it never fills the memory. A message whose handler fails is logged with
the traceback and PUBACKed all the same once its transaction has rolled back: left to the broker,
it would come back only at the next reconnection, and fail again if it is the message's fault;
the device sends again what it has no ack for. A PUBACK is sent only on the connection the
message came on (after a reconnection the broker sends it again, under the same packet id,
which a late PUBACK would wrongly acknowledge).

Sessions: the client id is stable per host (``odo-backend-<hostname>`` unless ``client_id`` is
configured), with ``clean_start`` off and a session expiry (five minutes by default), so that a
restarted backend resumes its session and receives the messages the broker queued for it
meanwhile, and those it had received without acknowledging them. The broker keeps giving a
disconnected member of the group its share until the session expires, which is why the expiry
is short and why the id must not change on every start (a per-process id would strand that
share). Nothing depends on those queued messages being delivered: an agent sends again whatever
has not been acknowledged. Two processes on one host need distinct ``client_id`` values: a
process whose session is taken over by another with its id stops with a clear error when the
broker says so (MQTT 5 reason 142), and logs one when the broker only keeps closing its
connections.

Stopping: messages still queued are dropped without a PUBACK (the broker keeps them for the
session), the workers finish the one in hand (ack and PUBACK included), then the client
disconnects.

Operators' decisions (approve/revoke, made in any process: the CLI, the API, the dashboard)
are published, retained, on ``odo/v1/<dev>/enrolled`` by a poll of ``devices.decided_at``
once a second; a restarted backend publishes again those of the last minutes.
"""

from __future__ import annotations

import logging
import os
import queue
import ssl
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from backend.config import MAX_WORKERS
from backend.db import Database
from backend.errors import LockTimeout
from backend.ledger.rules import Rules
from backend.metrics import REGISTRY, Registry
from backend.records import devices, enrollment, store
from backend.records.evidence import DEFAULT_LIMITS, EvidenceLimits
from common.clock import now_ms
from common.transport import BrokerConfig
from protocol import messages, topics
from protocol.errors import BadFormat

log = logging.getLogger(__name__)

CHANNELS = ("records", "enroll", "status")
#: CONNACK / DISCONNECT reasons that retrying cannot fix.
FATAL_CONNACK = {"Bad user name or password", "Not authorized", "Client identifier not valid", "Banned"}
SESSION_TAKEN_OVER = 142
SHORT_LIVED_S = 2.0
SHORT_LIVED_ALARM = 3
DECISION_POLL_S = 1.0
DECISION_SKEW_MS = 10 * 60 * 1000
#: Messages waiting for each worker besides the one it handles.
QUEUE_PER_WORKER = 4
#: How often the network thread, waiting for room in a full queue, looks whether the ingest stops.
ROUTE_POLL_S = 0.2
#: After a device's lock timed out (another process holds it), its messages are left for its agent
#: to send again for this long, rather than each one waiting out the lock in a worker.
HELD_DEVICE_S = 5

#: How long ``stop()`` waits for the workers to finish the messages in hand.
STOP_WAIT_S = 30.0


def default_workers() -> int:
    """Two to four workers, after the CPU count: signature checks run in parallel (the
    libraries release the GIL), and one worker's checks overlap another's transaction."""
    return max(2, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class Received:
    """A message as routed to a worker: what to handle, and how to PUBACK it."""

    dev: str
    channel: str
    body: bytes
    mid: int
    qos: int
    connection: int            # which connection it came on (see ``Ingest._connection``)


class Ingest:
    """Subscribe, verify and store, acknowledge. ``start()`` returns at once; ``stop()`` joins."""

    def __init__(self, db: Database, rules: Rules, broker: BrokerConfig, fleet_token: str | None = None, *,
                 registry: Registry = REGISTRY, clock: Callable[[], int] = now_ms,
                 on_fatal: Callable[[str], None] | None = None,
                 evidence: EvidenceLimits = DEFAULT_LIMITS, workers: int | None = None) -> None:
        workers = default_workers() if workers is None else workers
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers: {workers}, must be 1 to {MAX_WORKERS}")
        self.db, self.rules, self.broker, self._fleet_token = db, rules, broker, fleet_token
        self.evidence = evidence
        self.registry, self.clock, self.on_fatal = registry, clock, on_fatal
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.fatal: str | None = None
        self._stop = threading.Event()
        self._published: dict[str, int] = {}
        self._watermark = 0
        self._housekeeper: threading.Thread | None = None
        self._connected_at: float | None = None
        self._short_lived = 0
        self.workers = workers
        self._inboxes = [queue.Queue[Received | None](maxsize=QUEUE_PER_WORKER) for _ in range(workers)]
        self._threads: list[threading.Thread] = []
        # Counts connections and disconnections: a PUBACK goes only on the connection its
        # message came on. Changed by the network thread, read by the workers, under the lock.
        self._connection = 0
        self._connection_lock = threading.Lock()
        self._dropped = 0
        self._held: dict[str, float] = {}     # device -> until when its lock is not waited for (monotonic)
        self.client = self._make_client()

    # -- connection ----------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        b = self.broker
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=b.client_id or "odo-backend",
                             protocol=mqtt.MQTTv5, manual_ack=True)
        if log.isEnabledFor(logging.DEBUG):       # paho's own log is for debugging only
            client.enable_logger(logging.getLogger(__name__ + ".paho"))
        if b.username is not None:
            client.username_pw_set(b.username, b.password)
        if b.tls:
            client.tls_set(ca_certs=str(b.tls_ca) if b.tls_ca else None,
                           certfile=str(b.tls_cert) if b.tls_cert else None,
                           keyfile=str(b.tls_key) if b.tls_key else None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    @property
    def receive_maximum(self) -> int:
        """How many unacknowledged messages the broker may send: what the workers hold."""
        return self.workers * (QUEUE_PER_WORKER + 1)

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.broker.session_expiry_s
        props.ReceiveMaximum = self.receive_maximum
        self._watermark = enrollment.load_watermark(self.db)
        self.start_workers()
        log.info("connecting to %s as %s, %d workers", self.broker.display, self.broker.client_id,
                 self.workers)
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=30, clean_start=False,
                                  properties=props)
        self.client.loop_start()
        self._housekeeper = threading.Thread(target=self._housekeeping, name="odo-decisions", daemon=True)
        self._housekeeper.start()

    def start_workers(self) -> None:
        """Start the worker threads; ``start()`` does, before it connects."""
        for i, inbox in enumerate(self._inboxes):
            thread = threading.Thread(target=self._work, args=(inbox,), name=f"odo-ingest-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Drop the queued messages (not PUBACKed: the broker keeps them for the session), let
        the workers finish the one in hand, then disconnect."""
        self._stop.set()
        for inbox in self._inboxes:
            self._close(inbox)
        deadline = time.monotonic() + STOP_WAIT_S
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("%s still handles a message after %.0f s; stopping without it (its message is "
                            "not acknowledged)", thread.name, STOP_WAIT_S)
        if self._dropped:
            log.info("left %d received messages unacknowledged: the broker sends them again when the "
                     "session resumes", self._dropped)
        self.client.disconnect()
        self.client.loop_stop()
        if self._housekeeper is not None:
            self._housekeeper.join(5)
        self.db.close()

    def _close(self, inbox: queue.Queue[Received | None]) -> None:
        """Empty a worker's queue and put the end mark in it (room is made for it even if the
        network thread puts one last message in meanwhile)."""
        while True:
            try:
                while True:
                    if inbox.get_nowait() is not None:
                        self._count_dropped()
            except queue.Empty:
                pass
            try:
                inbox.put_nowait(None)
                return
            except queue.Full:
                continue

    def _count_dropped(self) -> None:
        with self._connection_lock:
            self._dropped += 1

    def _fail(self, message: str) -> None:
        if self.fatal is None:
            self.fatal = message
            log.error("%s", message)
            self._stop.set()
            self.client.disconnect()
            if self.on_fatal is not None:
                self.on_fatal(message)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                    reason: ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            name = reason.getName()
            if name in FATAL_CONNACK:
                self._fail(f"the broker at {self.broker.display} refused the backend: {name} "
                           "(check the user and password in --broker, and the broker's ACL)")
            else:
                log.warning("the broker at %s refused the connection: %s; retrying",
                            self.broker.display, name)
            return
        log.info("connected to %s (session %s)", self.broker.display,
                 "resumed" if flags.session_present else "new")
        self._next_connection()
        self._connected_at = time.monotonic()
        self.connected.set()
        client.subscribe([(topics.shared(ch), SubscribeOptions(qos=1)) for ch in CHANNELS])

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        log.warning("cannot connect to the broker at %s (unreachable, or TLS refused); retrying",
                    self.broker.display)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode],
                      properties: Properties | None) -> None:
        refused = [r.getName() for r in reasons if r.is_failure]
        if refused:
            self._fail(f"the broker refused the backend's subscriptions: {', '.join(refused)} "
                       f"(its ACL must let this user read {topics.shared('+')})")
            return
        self.subscribed.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                       reason: ReasonCode, properties: Properties | None) -> None:
        self._next_connection()
        self.connected.clear()
        self.subscribed.clear()
        if self._stop.is_set():
            return
        clash = (f"another process connected with this backend's MQTT client id {self.broker.client_id!r}: "
                 "give each backend process its own client_id")
        if reason.value == SESSION_TAKEN_OVER:
            self._fail(clash)
            return
        if self._connected_at is None:
            log.warning("the broker at %s closed the connection before accepting it (%s): does it trust "
                        "the backend's certificate? retrying", self.broker.display, reason.getName())
        else:
            log.warning("lost the broker at %s (%s); reconnecting", self.broker.display, reason.getName())
        # Brokers that do not say "session taken over" just close the connection of the older
        # client: connections that keep ending at once are the sign of it.
        lasted = time.monotonic() - self._connected_at if self._connected_at is not None else None
        self._short_lived = self._short_lived + 1 if lasted is not None and lasted < SHORT_LIVED_S else 0
        self._connected_at = None
        if self._short_lived == SHORT_LIVED_ALARM:
            log.error("the broker closed the last %d connections at once; probably %s",
                      SHORT_LIVED_ALARM, clash)

    def _next_connection(self) -> None:
        with self._connection_lock:
            self._connection += 1

    # -- messages ------------------------------------------------------------------------------

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """In paho's network thread: route the message to its device's worker, waiting while
        that worker's queue is full."""
        try:
            dev, channel = topics.parse(msg.topic)
        except (BadFormat, UnicodeDecodeError) as exc:
            log.warning("ignored a message: %s", exc)
            client.ack(msg.mid, msg.qos)             # nothing will ever be done with it
            return
        item = Received(dev, channel, bytes(msg.payload), msg.mid, msg.qos, self._connection)
        inbox = self._inboxes[self.worker_of(dev)]
        while not self._stop.is_set():
            try:
                inbox.put(item, timeout=ROUTE_POLL_S)
                return
            except queue.Full:
                continue
        self._count_dropped()                        # stopping: not PUBACKed, the broker keeps it

    def worker_of(self, dev: str) -> int:
        """The worker that handles every message of ``dev`` (a CRC-32 of its id)."""
        return zlib.crc32(dev.encode()) % self.workers

    def _work(self, inbox: queue.Queue[Received | None]) -> None:
        try:
            while (item := inbox.get()) is not None:
                if self._stop.is_set():
                    self._count_dropped()            # stopping: not PUBACKed, the broker keeps it
                    continue
                try:
                    self.handle(item)
                except Exception:  # noqa: BLE001 - the worker must outlive any one message
                    log.exception("%s: could not PUBACK a %s message", item.dev, item.channel)
        finally:
            self.db.close()                          # this thread's connection

    def handle(self, item: Received) -> None:
        """Handle one message (commit, then the device's ack), then PUBACK it. A handler that
        fails is logged; its message is PUBACKed too, as sending it again would fail again (the
        device sends again what it has no ack for)."""
        held_until = self._held.get(item.dev)
        if held_until is not None and time.monotonic() >= held_until:
            del self._held[item.dev]          # one device is always handled by the same worker
        elif held_until is not None:
            # Its lock timed out a moment ago: waiting for it again would hold up this worker's
            # other devices too. The agent sends again what has no ack.
            self._puback(item)
            return
        try:
            if item.channel == "records":
                self.handle_records(item.dev, item.body)
            elif item.channel == "enroll":
                self.handle_enroll(item.dev, item.body)
            elif item.channel == "status":
                devices.update_status(self.db, item.dev, item.body, self.clock())
        except LockTimeout as exc:
            # Another process holds this device (stopped mid-transaction?): its agent sends again.
            self._held[item.dev] = time.monotonic() + HELD_DEVICE_S
            log.warning("%s: %s message left for the device to send again, and its messages for %d s: %s",
                        item.dev, item.channel, HELD_DEVICE_S, exc)
        except Exception:  # noqa: BLE001 - one bad message must not stop the ingest; the agent resends
            self.registry.count_error()
            log.exception("%s: failed to handle a %s message; not acknowledged to the device",
                          item.dev, item.channel)
        self._puback(item)

    def _puback(self, item: Received) -> None:
        with self._connection_lock:
            if item.connection != self._connection:
                # The broker sends it again on the new connection, under the same packet id:
                # that copy's PUBACK is the one to send.
                log.debug("%s: message %d came on an earlier connection: no PUBACK", item.dev, item.mid)
                return
            self.client.ack(item.mid, item.qos)

    def handle_records(self, dev: str, body: bytes) -> store.BatchResult:
        started = time.perf_counter()
        result = store.process_batch(self.db, self.rules, dev, body, self.clock(), self.evidence)
        self.client.publish(topics.ack(dev), messages.encode_ack(result.ack), qos=1)
        self.registry.observe_batch(time.perf_counter() - started)
        self.registry.count_records(result.outcomes)
        return result

    def handle_enroll(self, dev: str, body: bytes) -> enrollment.Answer:
        answer = enrollment.handle(self.db, dev, body, self.clock(), self._fleet_token)
        self.publish_answer(answer)
        return answer

    def publish_answer(self, answer: enrollment.Answer) -> None:
        self.client.publish(topics.enrolled(answer.dev), answer.encode(), qos=1, retain=True)

    # -- operators' decisions ------------------------------------------------------------------

    def _housekeeping(self) -> None:
        while not self._stop.wait(DECISION_POLL_S):
            if not self.subscribed.is_set():
                continue
            try:
                self.publish_decisions()
            except Exception:  # noqa: BLE001 - a database hiccup: try again at the next poll
                log.exception("could not publish operators' decisions; trying again")
        self.db.close()                            # this thread's connection

    def publish_decisions(self) -> int:
        """Publish decisions made since the last poll (by any process); return how many.

        Decisions are looked for from ``DECISION_SKEW_MS`` before the newest one published, so
        that one made on a host whose clock is a little behind is not missed."""
        sent = 0
        newest = self._watermark
        for answer, decided_at in enrollment.decided_since(self.db, self._watermark - DECISION_SKEW_MS):
            if self._published.get(answer.dev) == decided_at:
                continue
            self.publish_answer(answer)
            self._published[answer.dev] = decided_at
            newest = max(newest, decided_at)
            sent += 1
        if newest > self._watermark:
            enrollment.save_watermark(self.db, newest)
            self._watermark = newest
            self._published = {d: t for d, t in self._published.items() if t >= newest - DECISION_SKEW_MS}
        return sent

"""MQTT ingest: the one module of the backend that talks to the broker (paho).

The backend subscribes through shared subscriptions (``$share/odo-backend/odo/v1/+/records``,
and the same for ``enroll``, ``status`` and ``claim``) at QoS 1 over MQTT 5, so that several backend
processes split the load.

The pipeline: paho's network thread only queues each message after its device's others
(:mod:`backend.records.dispatch`); a few worker threads (``workers``, by default two to four
after the CPU count) take them, one message of a device at a time, so that a device's messages
are handled in the order they came, and any idle worker takes the next device that has one. A
worker verifies and stores the message (a batch in one transaction; with ``processes``, as
``odo-backend run`` has it, a batch of records is verified and stored by the worker's own
process, :mod:`backend.records.processes`, so that batches are checked on every core, not one
thread at a time under the GIL; on SQLite, whose commits take turns, a worker takes the small
messages of up to ``GROUP_MOST`` devices in line at once, and its process stores them in one
transaction of one commit), publishes the device's ack
after the commit, and only then sends the message's PUBACK (paho's ``manual_ack``): a message
the backend received but did not commit is sent again by the broker when the session resumes.
At most ``QUEUE_PER_WORKER`` messages a worker wait besides those in hand;
the CONNECT's Receive Maximum is what the workers hold and what waits, so the broker stops
sending when that is full (and the network thread would wait if it did not): a slow database
slows the ingest down, it never fills the memory. A message whose handler fails is logged with
the traceback and PUBACKed all the same once its transaction has rolled back: left to the broker,
it would come back only at the next reconnection, and fail again if it is the message's fault;
the device sends again what it has no ack for. A PUBACK is sent only on the connection the
message came on (after a reconnection the broker sends it again, under the same packet id,
which a late PUBACK would wrongly acknowledge). What the ingest publishes (acks, answers) waits
in paho for the broker's PUBACK, at most ``OUT_QUEUE`` messages: past that an ack is not sent,
and its device sends its batch again. ``odo_ingest_queued`` is what the queues hold.

A database that cannot store (a full disk, an I/O error, a lost connection:
:func:`backend.storage.failure`) is not the message's fault: its transaction rolled back, no ack
goes to the device (whose ``through`` only ever counts what is committed), the message is
PUBACKed like any that failed (the agent sends it again) and the thread's connection is closed
(the next message opens a fresh one). ``odo_storage_failing`` and ``/healthz`` (503, "storage
unavailable") say so from that write until a known device's batch is stored again, without a
restart.

Every message refused whole (a batch over its limits or malformed, an enrolment, status or claim
that is refused, a topic that names no device) is counted in ``odo_messages_refused_total`` by
topic and reason, beside the per-record outcomes of ``odo_records_total``.

Sessions: the client id is stable per host (``odo-backend-<hostname>`` unless ``client_id`` is
configured), with ``clean_start`` off and a session expiry (five minutes by default), so that a
restarted backend resumes its session and receives the messages the broker queued for it
meanwhile, and those it had received without acknowledging them. The broker keeps giving a
disconnected member of the group its share until the session expires, which is why the expiry
is short and why the id must not change on every start (a per-process id would strand that
share). Nothing depends on those queued messages being delivered: an agent sends again whatever
has not been acknowledged. Two processes on one host need distinct ``client_id`` values. A
process whose session is taken over by another client with its id (MQTT 5 reason 142) never
stops for it: it logs an ERROR naming the client id, counts ``odo_mqtt_session_taken_over_total``
and reconnects after an exponential backoff with jitter (``RETRY_MIN_S`` doubling up to
``RETRY_MAX_S``, reset once a connection has lasted ``RETRY_MAX_S``), so that it gets its session
back when the impostor leaves; it logs one too when the broker only keeps closing its
connections. A CONNACK that refuses the backend is retried the same way, except those in
``FATAL_CONNACK`` (its credentials, client id or certificate are refused: retrying cannot help),
which stop the process with exit status 78.

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
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from backend import storage
from backend.config import MAX_WORKERS
from backend.db import Database
from backend.errors import LockTimeout
from backend.ledger.contracts import LiveBook, Source
from backend.metrics import REGISTRY, Registry
from backend.records import claims_mqtt, devices, enrollment, store
from backend.records.dispatch import Dispatcher
from backend.records.evidence import DEFAULT_LIMITS, EvidenceLimits
from backend.records.processes import BatchProcess, Setup
from common.clock import now_ms
from common.transport import BrokerConfig
from protocol import messages, topics
from protocol.errors import BadFormat, BadSignature

log = logging.getLogger(__name__)

CHANNELS = ("records", "enroll", "status", "claim")
#: CONNACK / DISCONNECT reasons that retrying cannot fix.
FATAL_CONNACK = {"Bad user name or password", "Not authorized", "Client identifier not valid", "Banned"}
SESSION_TAKEN_OVER = 142
#: Waits before reconnecting after a takeover or a refusal: from RETRY_MIN_S, doubled each time
#: up to RETRY_MAX_S, each drawn between half and all of that (jitter).
RETRY_MIN_S = 1.0
RETRY_MAX_S = 60.0
SHORT_LIVED_S = 2.0
SHORT_LIVED_ALARM = 3
DECISION_POLL_S = 1.0
DECISION_SKEW_MS = 10 * 60 * 1000
#: Small messages stored together by a worker's process on SQLite: at most this many, of at most
#: this many bytes in all (a message past that is stored alone).
GROUP_MOST = 16
GROUP_BYTES = 64 * 1024
#: Messages waiting for each worker besides the one it handles.
QUEUE_PER_WORKER = 4
#: How often the network thread, waiting for room in a full queue, looks whether the ingest stops.
ROUTE_POLL_S = 0.2
#: After a device's lock timed out (another process holds it), its messages are left for its agent
#: to send again for this long, rather than each one waiting out the lock in a worker.
HELD_DEVICE_S = 5

#: Messages the ingest publishes that paho holds until the broker's PUBACK (past this, not sent).
OUT_QUEUE = 1000

#: How long ``stop()`` waits for the workers to finish the messages in hand.
STOP_WAIT_S = 30.0


def default_workers() -> int:
    """Two to four workers, after the CPU count: each worker's process checks signatures on a
    core of its own, and one worker's checks overlap another's transaction."""
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


def enrolment_refusal(dev: str, body: bytes) -> str | None:
    """Why :func:`enrollment.handle` refused an ``enroll`` message published on ``dev``'s topic
    (for the metrics), or None when it did not: the message is read again to name the reason."""
    try:
        enrolment, _ = messages.decode_enroll(body)
    except messages.TooLarge:
        return "too_large"
    except BadFormat:
        return "bad_format"
    except BadSignature:
        return "bad_signature"
    return "dev_mismatch" if enrolment.dev != dev else None


def status_refusal(body: bytes) -> str:
    """Why a ``status`` message that was not kept was refused: malformed, or of no device."""
    try:
        messages.decode_status(body)
    except BadFormat:
        return "bad_format"
    return "unknown_device"


class Ingest:
    """Subscribe, verify and store, acknowledge. ``start()`` returns at once; ``stop()`` joins."""

    def __init__(self, db: Database, rules: Source, broker: BrokerConfig, fleet_token: str | None = None, *,
                 registry: Registry = REGISTRY, clock: Callable[[], int] = now_ms,
                 on_fatal: Callable[[str], None] | None = None,
                 evidence: EvidenceLimits = DEFAULT_LIMITS, workers: int | None = None,
                 processes: bool = False) -> None:
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
        self._retries = 0                     # takeovers and refusals in a row: the backoff's exponent
        self.workers = workers
        # Each worker thread's ingest process (processes=True with the database's rule book), set
        # by _work in its thread.
        self._setup = Setup.of(db, rules, evidence) if processes and isinstance(rules, LiveBook) else None
        self._local = threading.local()
        self._dispatch = Dispatcher[Received](workers * QUEUE_PER_WORKER)
        self._threads: list[threading.Thread] = []
        # Counts connections and disconnections: a PUBACK goes only on the connection its
        # message came on. Changed by the network thread, read by the workers, under the lock.
        self._connection = 0
        self._connection_lock = threading.Lock()
        self._dropped = 0
        self._held: dict[str, float] = {}     # device -> until when its lock is not waited for (monotonic)
        self.client = self._make_client()
        registry.watch_queue(self.queued)

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
        client.max_queued_messages_set(OUT_QUEUE)
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
        for i in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"odo-ingest-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Drop the queued messages (not PUBACKed: the broker keeps them for the session), let
        the workers finish the one in hand, then disconnect."""
        self._stop.set()
        for _ in range(self._dispatch.close()):
            self._count_dropped()
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
                           "(check the user and password in --broker, the client id: a broker that binds "
                           "it to the certificate takes only odo-backend-<suffix> from odo-backend, "
                           "and the broker's ACL)")
            else:
                log.warning("the broker at %s refused the connection: %s; retrying in %.1f s",
                            self.broker.display, name, self._back_off())
            return
        log.info("connected to %s (session %s)", self.broker.display,
                 "resumed" if flags.session_present else "new")
        client.reconnect_delay_set(min_delay=1, max_delay=30)  # a lost connection: paho's own backoff
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
        client_id = self.broker.client_id or "odo-backend"
        clash = ("reconnecting in %.1f s to take it back; give each backend process its own client_id, "
                 "and if none of yours has it, someone else holds the backend's certificate")
        lasted = time.monotonic() - self._connected_at if self._connected_at is not None else None
        self._connected_at = None
        if lasted is not None and lasted >= RETRY_MAX_S:
            self._retries = 0
        if reason.value == SESSION_TAKEN_OVER:
            self.registry.count_session_taken_over()
            log.error("session taken over: another client connected to %s with this backend's MQTT client id "
                      "%r (reason %d %s); " + clash, self.broker.display, client_id, SESSION_TAKEN_OVER,
                      reason.getName(), self._back_off())
            return
        if lasted is None:
            log.warning("the broker at %s closed the connection before accepting it (%s): does it trust "
                        "the backend's certificate? retrying", self.broker.display, reason.getName())
        else:
            log.warning("lost the broker at %s (%s); reconnecting", self.broker.display, reason.getName())
        # Brokers that do not say "session taken over" (mosquitto before 2.0.15) just close the
        # connection of the older client: connections that keep ending at once are the sign of it.
        self._short_lived = self._short_lived + 1 if lasted is not None and lasted < SHORT_LIVED_S else 0
        if self._short_lived >= SHORT_LIVED_ALARM:
            self.registry.count_session_taken_over()
            log.error("session taken over, probably: the broker at %s closed the last %d connections of MQTT "
                      "client id %r at once, as it does when another client connects with that id; " + clash,
                      self.broker.display, self._short_lived, client_id, self._back_off())

    def _back_off(self) -> float:
        """Make paho wait before its next attempt, exponentially longer for each takeover or
        refusal in a row, with jitter; the wait, in seconds."""
        ceiling = min(RETRY_MAX_S, RETRY_MIN_S * 2 ** min(self._retries, 16))
        self._retries += 1
        wait = random.uniform(ceiling / 2, ceiling)
        self.client.reconnect_delay_set(min_delay=wait, max_delay=wait)  # type: ignore[arg-type]  # floats work
        return wait

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
            self.registry.count_refused("unknown", "bad_topic")
            client.ack(msg.mid, msg.qos)             # nothing will ever be done with it
            return
        item = Received(dev, channel, bytes(msg.payload), msg.mid, msg.qos, self._connection)
        if not self._dispatch.put(dev, item, self._stop.is_set, ROUTE_POLL_S):
            self._count_dropped()                    # stopping: not PUBACKed, the broker keeps it

    def queued(self) -> int:
        """Messages waiting for a worker (besides the ones in hand)."""
        return self._dispatch.queued()

    def _work(self) -> None:
        child = None
        if self._setup is not None:
            child = self._local.child = BatchProcess(self._setup, threading.current_thread().name)
        # On SQLite, whose commits take turns, small messages of several devices are stored
        # together by the worker's process: one commit for all of them.
        most = GROUP_MOST if child is not None and self.db.dialect == "sqlite" else 1
        try:
            while group := self._dispatch.take_many(most, lambda item: len(item.body), GROUP_BYTES):
                try:
                    answers = self._store_together(child, [item for _, item in group])
                except Exception:  # noqa: BLE001 - then each is handled alone (storing again finds duplicates)
                    log.exception("could not store %d messages together; handling each alone", len(group))
                    answers = {}
                for n, (dev, item) in enumerate(group):
                    try:
                        if self._stop.is_set() and n not in answers:
                            self._count_dropped()    # stopping: not PUBACKed, the broker keeps it
                            continue
                        if n in answers:
                            self.handle(item, answers[n])
                        else:
                            self.handle(item)
                    except Exception:  # noqa: BLE001 - the worker must outlive any one message
                        log.exception("%s: could not PUBACK a %s message", item.dev, item.channel)
                    finally:
                        self._dispatch.done(dev)
        finally:
            if child is not None:
                child.close()
            self.db.close()                          # this thread's connection

    def _store_together(self, child: BatchProcess | None,
                        items: list[Received]) -> dict[int, store.BatchResult | Exception]:
        """The ``records`` messages among ``items``, when there are several, stored together by
        ``child``: what came of each, by its place in ``items``."""
        places = [n for n, item in enumerate(items) if item.channel == "records"]
        if child is None or len(places) < 2 or self._stop.is_set():
            return {}
        started, now = time.perf_counter(), self.clock()
        done = child.process_many([(items[n].dev, items[n].body, now) for n in places])
        for _ in places:                          # each waited for the whole group
            self.registry.observe_batch(time.perf_counter() - started)
        return dict(zip(places, done, strict=True))

    def handle(self, item: Received, stored: store.BatchResult | Exception | None = None) -> None:
        """Handle one message (commit, then the device's ack), then PUBACK it. A handler that
        fails is logged; its message is PUBACKed too, as sending it again would fail again (the
        device sends again what it has no ack for). ``stored``: what came of a batch of records
        already stored together with others (:meth:`_store_together`)."""
        held_until = self._held.get(item.dev)
        if held_until is not None and time.monotonic() >= held_until:
            del self._held[item.dev]          # a device is in one worker's hands at a time
        elif held_until is not None:
            # Its lock timed out a moment ago: waiting for it again would hold up this worker's
            # other devices too. The agent sends again what has no ack.
            self._puback(item)
            return
        try:
            if item.channel == "records":
                result = (self.handle_records(item.dev, item.body) if stored is None
                          else self.handle_records(item.dev, item.body, stored))
                if result.stored and self.registry.storage_works():
                    log.warning("the database stores again: acknowledging messages again")
            elif item.channel == "enroll":
                self.handle_enroll(item.dev, item.body)
            elif item.channel == "status":
                if not devices.update_status(self.db, item.dev, item.body, self.clock()):
                    self.registry.count_refused("status", status_refusal(item.body))
            elif item.channel == "claim":
                self.handle_claim(item.dev, item.body)
        except LockTimeout as exc:
            # Another process holds this device (stopped mid-transaction?): its agent sends again.
            self._held[item.dev] = time.monotonic() + HELD_DEVICE_S
            log.warning("%s: %s message left for the device to send again, and its messages for %d s: %s",
                        item.dev, item.channel, HELD_DEVICE_S, exc)
        except Exception as exc:  # noqa: BLE001 - one bad message must not stop the ingest; the agent resends
            self.registry.count_error()
            unavailable = storage.failure(exc)
            if unavailable is None:
                log.exception("%s: failed to handle a %s message; not acknowledged to the device",
                              item.dev, item.channel)
            else:
                self._storage_failed(item, unavailable)
        self._puback(item)

    def _storage_failed(self, item: Received, reason: str) -> None:
        """The database could not store: say so (once, until it stores again), and drop this
        thread's connection, which a failed commit may have left inside its transaction."""
        if self.registry.storage_failed(reason):
            log.error("storage unavailable: %s; acknowledging nothing until the database stores again "
                      "(agents send again what has no ack)", reason)
        else:
            log.debug("%s: %s message not stored: %s", item.dev, item.channel, reason)
        try:
            self.db.close()
        except Exception as exc:  # noqa: BLE001 - a broken connection may not even close cleanly
            log.debug("closing the database connection: %s", exc)

    def _puback(self, item: Received) -> None:
        with self._connection_lock:
            if item.connection != self._connection:
                # The broker sends it again on the new connection, under the same packet id:
                # that copy's PUBACK is the one to send.
                log.debug("%s: message %d came on an earlier connection: no PUBACK", item.dev, item.mid)
                return
            self.client.ack(item.mid, item.qos)

    def handle_records(self, dev: str, body: bytes,
                       stored: store.BatchResult | Exception | None = None) -> store.BatchResult:
        started = time.perf_counter()
        child: BatchProcess | None = getattr(self._local, "child", None)
        if isinstance(stored, Exception):
            raise stored
        if stored is not None:
            result = stored
        elif child is not None:
            result = child.process(dev, body, self.clock())
        else:
            result = store.process_batch(self.db, self.rules, dev, body, self.clock(), self.evidence)
        self.client.publish(topics.ack(dev), messages.encode_ack(result.ack), qos=1)
        if stored is None:
            self.registry.observe_batch(time.perf_counter() - started)
        self.registry.count_records(result.outcomes)
        if result.refused is not None:
            self.registry.count_refused("records", result.refused)
        return result

    def handle_enroll(self, dev: str, body: bytes) -> enrollment.Answer:
        answer = enrollment.handle(self.db, dev, body, self.clock(), self._fleet_token)
        self.publish_answer(answer)
        refused = enrolment_refusal(dev, body)
        if refused is not None:
            self.registry.count_refused("enroll", refused)
        return answer

    def handle_claim(self, dev: str, body: bytes) -> messages.ClaimResult:
        """A claim of the device's vehicle; answered on its ``enrolled`` topic, not retained
        (the retained enrolment answer stays)."""
        result = claims_mqtt.handle(self.db, dev, body, self.clock())
        self.client.publish(topics.enrolled(dev), messages.encode_claim_result(result), qos=1)
        if result.status == "refused":
            self.registry.count_refused("claim", result.reason or "refused")
        return result

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

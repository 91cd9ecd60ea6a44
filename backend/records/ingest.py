"""MQTT ingest: the one module of the backend that talks to the broker (paho).

The backend subscribes through shared subscriptions (``$share/odo-backend/odo/v1/+/records``,
and the same for ``enroll`` and ``status``) at QoS 1 over MQTT 5, so that several backend
processes split the load. Each message is handled in paho's network thread, and paho sends its
PUBACK only after the handler returns, that is after the batch is committed; the ack to the
device is published after the commit too.

Sessions: the client id is stable per host (``odo-backend-<hostname>`` unless ``client_id``
is configured), with ``clean_start`` off and a session expiry (five minutes by default), so
that a restarted backend resumes its session and receives the messages the broker queued for
it meanwhile. The broker keeps giving a disconnected member of the group its share until the
session expires, which is why the expiry is short and why the id must not change on every
start (a per-process id would strand that share). Nothing depends on those queued messages
being delivered: an agent sends again whatever has not been acknowledged. Two processes on one
host need distinct ``client_id`` values: a process whose session is taken over by another
with its id stops with a clear error when the broker says so (MQTT 5 reason 142), and logs
one when the broker only keeps closing its connections.

Operators' decisions (approve/revoke, made in any process: the CLI, the API, the dashboard)
are published, retained, on ``odo/v1/<dev>/enrolled`` by a poll of ``devices.decided_at``
once a second; a restarted backend publishes again those of the last minutes.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from backend.db import Database
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




class Ingest:
    """Subscribe, verify and store, acknowledge. ``start()`` returns at once; ``stop()`` joins."""

    def __init__(self, db: Database, rules: Rules, broker: BrokerConfig, fleet_token: str | None = None, *,
                 registry: Registry = REGISTRY, clock: Callable[[], int] = now_ms,
                 on_fatal: Callable[[str], None] | None = None,
                 evidence: EvidenceLimits = DEFAULT_LIMITS) -> None:
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
        self.client = self._make_client()

    # -- connection ----------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        b = self.broker
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=b.client_id or "odo-backend",
                             protocol=mqtt.MQTTv5)
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

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.broker.session_expiry_s
        self._watermark = enrollment.load_watermark(self.db)
        log.info("connecting to %s as %s", self.broker.display, self.broker.client_id)
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=30, clean_start=False,
                                  properties=props)
        self.client.loop_start()
        self._housekeeper = threading.Thread(target=self._housekeeping, name="odo-decisions", daemon=True)
        self._housekeeper.start()

    def stop(self) -> None:
        self._stop.set()
        self.client.disconnect()
        self.client.loop_stop()
        if self._housekeeper is not None:
            self._housekeeper.join(5)
        self.db.close()

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

    # -- messages ------------------------------------------------------------------------------

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            dev, channel = topics.parse(msg.topic)
        except BadFormat as exc:
            log.warning("ignored a message: %s", exc)
            return
        body = bytes(msg.payload)
        try:
            if channel == "records":
                self.handle_records(dev, body)
            elif channel == "enroll":
                self.handle_enroll(dev, body)
            elif channel == "status":
                devices.update_status(self.db, dev, body, self.clock())
        except Exception:  # noqa: BLE001 - one bad message must not stop the ingest; the agent resends
            self.registry.count_error()
            log.exception("%s: failed to handle a %s message; not acknowledged", dev, channel)

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

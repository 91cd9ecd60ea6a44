"""MQTT sync (docs/protocol.md §4): the only agent module that imports paho.

"Sent" means acknowledged: records leave the unsynced backlog only when an
ack's ``through`` covers them. The loop publishes unsynced records in batches
(ascending seq, ≤500 records and ≤256 KiB) at QoS 1, up to a window ahead of
the last ack. When ``through`` makes no progress for ``resend_after_s`` while
records are outstanding, it goes back and sends again from the first unsynced
record (``through + 1``); each fruitless round doubles that wait (up to
``max_resend_after_s``), so a device the backend does not know yet
(``unknown_device``: ``through`` does not move) is not hammering the broker
while it waits for approval. An ``approved`` enrolment resends at once.

Beside records, the session carries the retained status (built by
:mod:`agent.status`) and the enrolment (decided by :mod:`agent.enrol`: sent on
connect until approved, on request of ``odo-agent enroll``, and by
:func:`enroll` on a connection of its own); acks are applied to the outbox by
:meth:`agent.buffer.Outbox.apply_ack`, and the connection state is kept for
``odo-agent status`` (:data:`agent.state.SYNC`). A claim of the car that the driver's page
left is published on ``claim``, and its answer (on ``enrolled``) kept (:mod:`agent.claim`).

Reconnects use jittered, capped exponential backoff. A CONNACK refusing the
credentials ("not authorized", "bad user name or password") stops the loop for
good (:class:`agent.errors.AuthRefused`): retrying cannot help, and the log says so.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from agent.backoff import Backoff
from agent.buffer import Outbox
from agent.claim import Claimer
from agent.clock import mono_ms
from agent.enrol import AnswerWait, Enroller, EnrollResult, Publish
from agent.errors import AuthRefused, StorageError, Unreachable
from agent.state import SYNC, Connection
from agent.status import StatusReport
from agent.window import SendWindow
from common.clock import now_ms
from common.transport import BrokerConfig
from protocol import messages, topics
from protocol.errors import BadFormat
from protocol.identity import SigningKey

log = logging.getLogger(__name__)

AUTH_REFUSALS = frozenset({"Not authorized", "Bad user name or password"})


def nodelay(client: mqtt.Client) -> None:
    """Send small packets (a batch of one record, a PUBACK) at once, not after Nagle's delay."""
    sock = client.socket()
    if sock is not None and hasattr(sock, "setsockopt"):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


@dataclass(frozen=True)
class SyncSettings:
    resend_after_s: float = 10.0
    max_resend_after_s: float = 300.0
    window_records: int = 2000
    status_every_s: float = 2.0
    connect_timeout_s: float = 10.0
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0


def make_client(broker: BrokerConfig, dev: str) -> mqtt.Client:
    proto = mqtt.MQTTv5 if broker.mqtt_version == "5" else mqtt.MQTTv311
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=dev, protocol=proto)
    client.enable_logger(logging.getLogger(__name__ + ".paho"))
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls:
        client.tls_set(
            ca_certs=str(broker.tls_ca) if broker.tls_ca else None,
            certfile=str(broker.tls_cert) if broker.tls_cert else None,
            keyfile=str(broker.tls_key) if broker.tls_key else None,
        )
    client.will_set(topics.status(dev), messages.OFFLINE, qos=1, retain=True)
    return client


def _connect(client: mqtt.Client, broker: BrokerConfig) -> None:
    try:
        if broker.mqtt_version == "5":
            client.connect(broker.host, broker.port, broker.keepalive_s, clean_start=True)
        else:
            client.connect(broker.host, broker.port, broker.keepalive_s)
    except (OSError, ValueError) as exc:
        raise Unreachable(f"cannot reach the broker at {broker.display}: {exc}") from None


def _close(client: mqtt.Client) -> None:
    if client.socket() is not None:
        client.disconnect()  # sends DISCONNECT at once and closes the socket
    if client.socket() is not None:
        client.loop(timeout=0.05)


class Syncer:
    """Runs the sync loop in the calling thread until ``stop`` is set or the broker
    refuses the credentials. ``obd_state`` gives the adapter's state for status, and
    ``error`` the agent's error state (e.g. a full disk), if any.

    The connection state is also kept in the outbox (``sync``) for ``odo-agent status``.
    ``enrollment(fleet_token)`` makes an enroll message (the enrolment signed now, with the
    daemon's own token beside it when None), published on connect until approved and when
    ``odo-agent enroll`` asks the running daemon to (:class:`agent.enrol.Enroller`)."""

    def __init__(
        self, broker: BrokerConfig, dev: str, outbox: Outbox, *,
        obd_state: Callable[[], str] = lambda: "unknown", error: Callable[[], str | None] = lambda: None,
        enrollment: Callable[[str | None], str] | None = None, settings: SyncSettings | None = None,
        monotonic: Callable[[], float] = time.monotonic, boot: str | None = None,
    ) -> None:
        self.broker = broker
        self.boot = boot               # with mono_ms(), the clock each batch says it was sent at
        self.dev = dev
        self.outbox = outbox
        self.enroller = Enroller(outbox, enrollment)
        self.claimer = Claimer(outbox)
        self.settings = settings or SyncSettings()
        self.status = StatusReport(outbox, obd_state=obd_state, error=error,
                                   every_s=self.settings.status_every_s)
        self._mono = monotonic
        self.window = SendWindow(self.settings, monotonic())
        self._state = "offline"        # offline | online | auth_refused
        self.refusal: str | None = None
        self._connected = False

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        if value == self._state:
            return
        self._state = value
        try:
            SYNC.put(self.outbox, Connection(value, self.refusal, now_ms()))
        except StorageError as exc:
            log.error("sync: %s", exc)

    # -- the loop -------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        backoff = Backoff(self.settings.backoff_base_s, self.settings.backoff_cap_s)
        while not stop.is_set():
            try:
                was_online = self._session(stop)
            except AuthRefused as exc:
                self.refusal = str(exc)
                self.state = "auth_refused"
                log.error("%s; not retrying: fix the broker credentials or ACL and restart", exc)
                return
            except Unreachable as exc:
                log.warning("%s", exc)
                was_online = False
            self.state = "offline"
            if stop.is_set():
                break
            if was_online:
                backoff.reset()
            delay = backoff.next()
            log.info("reconnecting to %s in %.1f s", self.broker.display, delay)
            stop.wait(delay)

    def _session(self, stop: threading.Event) -> bool:
        """One connection, until it drops or ``stop``; True if it got online."""
        try:
            client = make_client(self.broker, self.dev)
        except (OSError, ValueError) as exc:  # e.g. a TLS file that is not a certificate
            raise Unreachable(f"cannot set up the connection to {self.broker.display}: {exc}") from None
        self._connected = False
        refused: list[str] = []
        client.on_connect = lambda c, u, f, rc, p: self._on_connect(c, rc, refused)
        client.on_message = lambda c, u, m: self._on_message(m)
        _connect(client, self.broker)
        started = self._mono()
        online = False
        try:
            while not stop.is_set():
                rc = client.loop(timeout=0.1)
                if refused:
                    name = refused[0]
                    if name in AUTH_REFUSALS:
                        raise AuthRefused(f"the broker at {self.broker.display} refused this device: {name}")
                    raise Unreachable(f"the broker at {self.broker.display} refused the connection: {name}")
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    if online:
                        log.warning("lost the connection to %s (%s)", self.broker.display,
                                    mqtt.error_string(rc))
                    return online
                if not self._connected:
                    if self._mono() - started > self.settings.connect_timeout_s:
                        raise Unreachable(f"no CONNACK from {self.broker.display}")
                    continue
                online = True
                self._pump(client)
            if self._connected:
                self._go_offline(client)
            return online
        finally:
            self._connected = False
            _close(client)

    def _on_connect(self, client: mqtt.Client, rc: Any, refused: list[str]) -> None:
        if rc.is_failure:
            refused.append(rc.getName())
            return
        log.info("connected to %s as %s", self.broker.display, self.dev)
        nodelay(client)
        client.subscribe([(topics.ack(self.dev), 1), (topics.enrolled(self.dev), 1)])
        self._connected = True
        self.state = "online"
        self.status.reset()
        try:
            counts = self.outbox.counts()
            first = self.outbox.first_unsynced()
            self.enroller.on_connect(self._enroll_publisher(client))
            self.claimer.on_connect()
        except StorageError as exc:
            log.error("sync: %s", exc)
            self.window.resend_now(self._mono())
            return
        self.window.restart(first, counts.last_seq, counts.synced_through, self._mono())

    def _enroll_publisher(self, client: mqtt.Client) -> Publish:
        def publish(body: str) -> None:
            client.publish(topics.enroll(self.dev), body, qos=1)
        return publish

    def _publish_claim(self, client: mqtt.Client, body: str) -> None:
        client.publish(topics.claim(self.dev), body, qos=1)

    def _go_offline(self, client: mqtt.Client) -> None:
        info = client.publish(topics.status(self.dev), messages.OFFLINE, qos=1, retain=True)
        deadline = self._mono() + 2
        while not info.is_published() and self._mono() < deadline:
            if client.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break

    # -- sending --------------------------------------------------------------------------------

    def _pump(self, client: mqtt.Client) -> None:
        now = self._mono()
        try:
            if self.window.timed_out(now):
                log.info("no ack progress past seq %d; sending again from %d (next try in %.0f s)",
                         self.window.acked, self.window.next_seq, self.window.resend_delay())
            self._send(client, now)
            status = self.status.due(now)
            if status is not None:
                client.publish(topics.status(self.dev), status, qos=1, retain=True)
            self.enroller.serve(self._enroll_publisher(client), now)
            self.claimer.serve(lambda body: self._publish_claim(client, body), now)
        except StorageError as exc:
            log.error("sync: %s", exc)

    def _send(self, client: mqtt.Client, now: float) -> None:
        room = self.window.room()
        if room <= 0:
            return
        rows = self.outbox.pending(self.window.next_seq, min(room, messages.MAX_BATCH_RECORDS))
        batch: list[str] = []
        last = 0
        for seq, jws in rows:
            if batch and (seq != last + 1 or not messages.batch_fits([*batch, jws])):
                break
            batch.append(jws)
            last = seq
        if not batch:
            return
        body = messages.encode_batch(batch, boot=self.boot, mono_ms=None if self.boot is None else mono_ms())
        client.publish(topics.records(self.dev), body, qos=1)
        log.debug("published seqs %d..%d", rows[0][0], last)
        self.window.sent(last, now)

    # -- receiving ------------------------------------------------------------------------------

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        try:
            if msg.topic == topics.ack(self.dev):
                self._on_ack(messages.decode_ack(bytes(msg.payload)))
            elif msg.topic == topics.enrolled(self.dev) and messages.is_claim_result(bytes(msg.payload)):
                self.claimer.on_result(messages.decode_claim_result(bytes(msg.payload)))
            elif msg.topic == topics.enrolled(self.dev):
                if self.enroller.on_answer(*messages.decode_enrolled(bytes(msg.payload))):
                    self.window.resend_now(self._mono())
        except BadFormat as exc:
            log.warning("ignoring a malformed message on %s: %s", msg.topic, exc)
        except StorageError as exc:
            log.error("sync: %s", exc)

    def _on_ack(self, ack: messages.Ack) -> None:
        outcome = self.outbox.apply_ack(ack, now_ms())
        self.window.on_ack(outcome.through, self._mono())
        for rej in outcome.pending:
            log.warning("backend did not take seq %s: %s (it stays in the outbox and is sent again)",
                        rej.seq, rej.reason)
        if outcome.newly_synced:
            log.debug("ack through %d: %d records synced", outcome.through, outcome.newly_synced)


# -- enrolment on a connection of its own ---------------------------------------------------------

def enroll(
    broker: BrokerConfig, key: SigningKey, *, vin: str | None, fleet_token: str | None, wait_s: float,
    republish_s: float = 10.0,
) -> EnrollResult:
    """Publish the signed enrolment, the fleet token beside it, and wait for the backend's answer,
    as :class:`agent.enrol.AnswerWait` decides. Raises :class:`AuthRefused` or :class:`Unreachable`,
    and :class:`ValueError` for a malformed token (before connecting)."""
    messages.check_fleet_token(fleet_token)
    dev = key.public.id
    client = make_client(broker, dev)
    refused: list[str] = []
    subscribed = threading.Event()

    def on_connect(c: mqtt.Client, u: object, f: object, rc: Any, p: object) -> None:
        if rc.is_failure:
            refused.append(rc.getName())
        else:
            c.subscribe(topics.enrolled(dev), qos=1)

    def on_message(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        if messages.is_claim_result(bytes(m.payload)):
            return                               # the daemon's business, not this enrolment's
        try:
            status, reason = messages.decode_enrolled(bytes(m.payload))
        except BadFormat as exc:
            log.warning("ignoring a malformed enrolment answer: %s", exc)
            return
        wait.answer(status, reason, retained=bool(m.retain))

    client.on_connect = on_connect
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    _connect(client, broker)
    start = time.monotonic()
    wait = AnswerWait(wait_s, republish_s, start)
    try:
        while True:
            now = time.monotonic()
            if client.loop(timeout=0.1) != MQTTErrorCode.MQTT_ERR_SUCCESS and not refused:
                raise Unreachable(f"lost the connection to {broker.display}")
            if refused:
                if refused[0] in AUTH_REFUSALS:
                    raise AuthRefused(f"the broker at {broker.display} refused this device: {refused[0]}")
                raise Unreachable(f"the broker at {broker.display} refused the connection: {refused[0]}")
            if not subscribed.is_set():
                if now - start > 10:
                    raise Unreachable(f"no answer from the broker at {broker.display}")
                continue
            if wait.publish_due(now):
                body = messages.encode_enroll(messages.sign_enrollment(key, vin, now_ms()), fleet_token)
                client.publish(topics.enroll(dev), body, qos=1)
                wait.published(now)
            result = wait.result(now)
            if result is not None:
                return result
    finally:
        _close(client)

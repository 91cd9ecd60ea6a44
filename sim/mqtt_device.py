"""A simulated device's MQTT side, as the agent would do it: enrol, send batches, read acks.

    with MqttDevice(Dongle(), broker.host, broker.port) as device:
        device.enroll()                       # ("approved", None) with the fleet token
        ack = device.send([device.device.odometer(1)])

:class:`MqttFleet` is one connection that speaks for many devices at once (a load generator):
it publishes their enrolments and batches and hands every ack to a callback, with the
monotonic time it came.

    with MqttFleet(broker.host, broker.port, on_ack=lambda dev, ack, at: ...) as fleet:
        fleet.enroll(dongles)
        fleet.publish(dongle.dev, batch(*records))

For the backend's tests and the benchmarks, against a real ``odo-backend run``.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from protocol import messages, topics
from protocol.errors import BadFormat
from protocol.records import Record
from sim.devices import FLEET_TOKEN, Dongle


@dataclass
class MqttDevice:
    """Connects as the device (client id = its id), subscribed to its ack and enrolled topics."""

    device: Dongle
    host: str
    port: int
    acks: queue.Queue[messages.Ack] = field(default_factory=queue.Queue)
    answers: queue.Queue[tuple[str, str | None]] = field(default_factory=queue.Queue)
    client: Any = None

    def __enter__(self) -> MqttDevice:
        dev = self.device.dev
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=dev, protocol=mqtt.MQTTv5)
        subscribed = queue.Queue[bool]()

        def on_message(client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
            if msg.topic == topics.ack(dev):
                self.acks.put(messages.decode_ack(bytes(msg.payload)))
            elif msg.topic == topics.enrolled(dev):
                self.answers.put(messages.decode_enrolled(bytes(msg.payload)))

        c.on_message = on_message
        c.on_connect = lambda client, *a: client.subscribe([(topics.ack(dev), 1), (topics.enrolled(dev), 1)])
        c.on_subscribe = lambda *a: subscribed.put(True)
        c.connect(self.host, self.port)
        c.loop_start()
        subscribed.get(timeout=5)
        self.client = c
        return self

    def __exit__(self, *exc: object) -> None:
        # as the agent does on a clean stop (the will covers the other cases)
        self.client.publish(topics.status(self.device.dev), messages.OFFLINE, qos=1,
                            retain=True).wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()

    def enroll(self, token: str | None = FLEET_TOKEN, timeout: float = 15) -> tuple[str, str | None]:
        """Publish the enrolment until an answer comes (the backend may still be subscribing)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.client.publish(topics.enroll(self.device.dev), self.device.enroll_message(token), qos=1)
            try:
                return self.answers.get(timeout=0.5)
            except queue.Empty:
                continue
        raise TimeoutError("no answer to the enrolment")

    def send(self, records: list[Record | str], timeout: float = 10) -> messages.Ack:
        """Publish ``records`` (or raw JWS texts) as one batch; the next ack (queue.Empty after
        ``timeout``)."""
        texts = [r.jws if isinstance(r, Record) else r for r in records]
        self.client.publish(topics.records(self.device.dev), messages.encode_batch(texts), qos=1)
        return self.acks.get(timeout=timeout)

    def status(self, **fields: Any) -> None:
        """Publish a retained status message with ``fields``."""
        self.client.publish(topics.status(self.device.dev), messages.encode_status(**fields), qos=1,
                            retain=True).wait_for_publish(5)


AckHandler = Callable[[str, messages.Ack, float], None]
"""Called in paho's network thread with (device id, ack, ``time.monotonic()`` when it came)."""


@dataclass
class MqttFleet:
    """One MQTT 5 connection publishing for many devices, subscribed (QoS 1) to every device's
    ack and enrolment answer; an ack goes to ``on_ack``, an answer to :attr:`answers`.

    With ``nodelay`` (the default) its socket has ``TCP_NODELAY``: one connection carrying the
    messages of many devices should not hold one back until the broker has acknowledged the
    last at the TCP level (Nagle's algorithm against delayed ACKs: up to 40 ms a message)."""

    host: str
    port: int
    client_id: str = "odo-sim-fleet"
    on_ack: AckHandler | None = None
    answers: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    malformed: int = 0                         # acks or answers that did not decode
    nodelay: bool = True
    client: Any = None
    _answered: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def __enter__(self) -> MqttFleet:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        subscribed = queue.Queue[bool]()

        def on_message(client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
            at = time.monotonic()
            try:
                dev, channel = topics.parse(msg.topic)
                if channel == "ack":
                    ack = messages.decode_ack(bytes(msg.payload))
                    if self.on_ack is not None:
                        self.on_ack(dev, ack, at)
                elif channel == "enrolled":
                    answer = messages.decode_enrolled(bytes(msg.payload))
                    with self._answered:
                        self.answers[dev] = answer
                        self._answered.notify_all()
            except BadFormat:
                self.malformed += 1

        c.on_message = on_message
        c.on_connect = lambda client, *a: client.subscribe(
            [(f"{topics.PREFIX}/+/ack", 1), (f"{topics.PREFIX}/+/enrolled", 1)])
        c.on_subscribe = lambda *a: subscribed.put(True)
        c.connect(self.host, self.port)
        sock = c.socket()
        if self.nodelay and isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.loop_start()
        try:
            subscribed.get(timeout=5)
        except queue.Empty:
            c.loop_stop()
            raise TimeoutError(f"no SUBACK from the broker at {self.host}:{self.port} within 5 s") from None
        self.client = c
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def enroll(self, devices: Sequence[Dongle], token: str | None = FLEET_TOKEN,
               timeout: float = 60) -> dict[str, tuple[str, str | None]]:
        """Publish every device's enrolment, again every 2 s for those not answered yet (the
        backend may still be subscribing); the answers, once every device has one."""
        deadline = time.monotonic() + timeout
        waiting = {d.dev: d for d in devices}
        while True:
            with self._answered:
                waiting = {dev: d for dev, d in waiting.items() if dev not in self.answers}
            if not waiting:
                return {d.dev: self.answers[d.dev] for d in devices}
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(waiting)} of {len(devices)} enrolments unanswered after "
                                   f"{timeout:.0f} s")
            for dev, d in waiting.items():
                self.client.publish(topics.enroll(dev), d.enroll_message(token), qos=1)
            with self._answered:
                self._answered.wait_for(partial(set(waiting).issubset, self.answers.keys()), timeout=2)

    def publish(self, dev: str, body: bytes) -> None:
        """Publish a records message (QoS 1) on ``dev``'s topic."""
        self.client.publish(topics.records(dev), body, qos=1)

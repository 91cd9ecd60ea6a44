"""A simulated device's MQTT side, as the agent would do it: enrol, send batches, read acks.

    with MqttDevice(Dongle(), broker.host, broker.port) as device:
        device.enroll()                       # ("approved", None) with the fleet token
        ack = device.send([device.device.odometer(1)])

For the backend's tests and the benchmarks, against a real ``odo-backend run``.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from protocol import messages, topics
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

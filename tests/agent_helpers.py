"""Helpers for the agent's tests on real parts (the mosquitto is :mod:`sim.broker`'s): the
``odo-agent`` command, waiting for a condition, and a small stand-in for the backend (verifies
each record, takes only the next expected seq, acknowledges ``through``, answers enrolments)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from protocol import messages, records, topics
from protocol.identity import VerifyKey
from protocol.messages import Ack, Rejection
from protocol.records import GENESIS
from sim.broker import Broker

ODO_AGENT = str(Path(sys.executable).parent / "odo-agent")


def odo(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([ODO_AGENT, *args], input=stdin, capture_output=True, text=True, timeout=timeout,
                          env=full_env, check=False)


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


class Backend:
    """Verifies each record, takes only the next expected seq, acks ``through``."""

    def __init__(self, broker: Broker, pub: VerifyKey, *, approved: bool = True,
                 answers: tuple[tuple[str, str | None], ...] = (), port: int | None = None,
                 tls: tuple[Path, Path, Path] | None = None) -> None:
        self.dev = pub.id
        self.pub = pub
        self.approved = approved
        self.answers = list(answers)        # what to answer each enrolment, in turn
        self.enrollments: list[tuple[messages.Enrollment, str | None]] = []   # and the token beside it
        self.acking = True
        self.drop_acks = 0
        self.through = 0
        self.head = GENESIS
        self.received: list[int] = []
        self.clocks: list[tuple[str | None, int | None]] = []   # each batch's boot and mono_ms
        self.statuses: list[dict[str, object]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"odo-backend-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]  # paho takes seconds as floats
        if tls is not None:  # (CA, certificate, key)
            self.client.tls_set(ca_certs=str(tls[0]), certfile=str(tls[1]), keyfile=str(tls[2]))
        self.client.connect(broker.host, port or broker.port)
        self.client.loop_start()
        assert wait_for(lambda: self.client.is_connected())

    def _on_connect(self, c: mqtt.Client, *_: object) -> None:
        c.subscribe([(topics.topic(self.dev, ch), 1) for ch in ("records", "status", "enroll")])

    def _on_message(self, c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        if m.topic == topics.status(self.dev):
            self.statuses.append(messages.decode_status(bytes(m.payload)))
            return
        if m.topic == topics.enroll(self.dev):
            self.enrollments.append(messages.decode_enroll(bytes(m.payload)))
            if self.answers:
                status, reason = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
                c.publish(topics.enrolled(self.dev), messages.encode_enrolled(status, reason), qos=1)
            return
        rejected = []
        sent = messages.decode_batch(bytes(m.payload))
        self.clocks.append((sent.boot, sent.mono_ms))
        for jws in sent.records:
            assert isinstance(jws, str)
            rec = records.verify(jws, self.pub)
            self.received.append(rec.seq)
            if not self.approved:
                rejected.append(Rejection(rec.seq, "unknown_device"))
            elif rec.seq == self.through + 1 and rec.prev == self.head:
                self.through, self.head = rec.seq, rec.id
        if self.drop_acks:
            self.drop_acks -= 1
            return
        if self.acking:
            ack = Ack(self.through, tuple(rejected), self.through * 100 if self.approved else None)
            c.publish(topics.ack(self.dev), messages.encode_ack(ack), qos=1)

    def approve(self) -> None:
        self.approved = True
        self.client.publish(topics.enrolled(self.dev), messages.encode_enrolled("approved"), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()



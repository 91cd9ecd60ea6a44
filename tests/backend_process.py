"""``odo-backend run`` as a real process, and test devices that talk MQTT to it."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from protocol import messages, topics
from protocol.records import Record
from tests.backend_helpers import FLEET_TOKEN, Dongle, write_rules
from tests.mqtt_broker import free_port

ROOT = Path(__file__).resolve().parent.parent
API_TOKEN = "api-token-for-tests"


@dataclass
class Backend:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=5)

    def wait_healthy(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"odo-backend exited with {self.process.returncode}:\n"
                                     f"{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"odo-backend did not answer /healthz:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"odo-backend did not stop on {sig}:\n{self.log.read_text()}") from None
        return int(self.process.returncode)


def start_backend(tmp_path: Path, db_url: str, broker_url: str, *extra: str, name: str = "backend",
                  wait: bool = True) -> Backend:
    port = free_port()
    log = tmp_path / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ODO_")}
    argv = [sys.executable, "-m", "backend.cli", "--log-level", "info", "run", "--db", db_url,
            "--broker", broker_url, "--http", f"127.0.0.1:{port}", "--rules", str(write_rules(tmp_path)),
            "--fleet-token", FLEET_TOKEN, "--api-token", API_TOKEN, *extra]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    backend = Backend(proc, port, log)
    if wait:
        backend.wait_healthy()
    return backend


@dataclass
class Agent:
    """A device's MQTT side, as the agent would do it: enrol, send batches, read acks."""

    device: Dongle
    host: str
    port: int
    acks: queue.Queue[messages.Ack] = field(default_factory=queue.Queue)
    answers: queue.Queue[tuple[str, str | None]] = field(default_factory=queue.Queue)
    client: Any = None

    def __enter__(self) -> Agent:
        dev = self.device.dev
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=dev, protocol=mqtt.MQTTv5)
        subscribed = queue.Queue[bool]()

        def on_message(client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
            if msg.topic == topics.ack(dev):
                self.acks.put(messages.decode_ack(msg.payload))
            elif msg.topic == topics.enrolled(dev):
                self.answers.put(messages.decode_enrolled(msg.payload))

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
        raise AssertionError("no answer to the enrolment")

    def send(self, records: list[Record], timeout: float = 10) -> messages.Ack:
        self.client.publish(topics.records(self.device.dev), messages.encode_batch([r.jws for r in records]),
                            qos=1)
        return self.acks.get(timeout=timeout)

    def status(self, **fields: Any) -> None:
        self.client.publish(topics.status(self.device.dev), messages.encode_status(**fields), qos=1,
                            retain=True).wait_for_publish(5)


def metrics_value(text: str, line_start: str) -> int:
    """The sum of the samples whose line starts with ``line_start``."""
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith(line_start))


def as_json(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return json.loads(response.text)

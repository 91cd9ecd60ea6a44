"""Rules files with an ``effective_from``, a simulated clock, and cars that publish their records to
a real broker for a real :class:`backend.records.ingest.Ingest`, for the tests of rules versions."""

from __future__ import annotations

import datetime
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from backend.db import Database
from backend.ledger.contracts import LiveBook
from backend.metrics import Registry
from backend.records.ingest import Ingest
from common.transport import BrokerConfig
from protocol import messages, topics
from protocol.records import Record
from sim.broker import Broker


def iso(ms: int) -> str:
    """A TOML offset datetime for ``ms``."""
    return datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rules_toml(version: str, effective_from: int | None, *, weekly: int = 10000, per_km: int = 10,
               cap: int = 5000, streak: int = 20000, every: int = 4, extra: str = "") -> str:
    start = "" if effective_from is None else f"effective_from = {iso(effective_from)}\n"
    return (f'version = "{version}"\n{start}max_speed_kph = 250\n{extra}\n'
            '[[rule]]\nid = "weekly-confirmation"\non = "confirmation"\nper = "week"\n'
            f"milli_tokens = {weekly}\ntolerance_m = 2000\n\n"
            f'[[rule]]\nid = "distance"\non = "trip"\nmilli_tokens_per_km = {per_km}\n'
            f"cap_milli_tokens_per_week = {cap}\n\n"
            f'[[rule]]\nid = "streak"\non = "confirmation"\nevery_weeks = {every}\n'
            f"milli_tokens = {streak}\n\n"
            '[[catalogue]]\nitem = "car-wash"\nmilli_tokens = 30000\n')


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


class SimClock:
    """The backend's clock in a simulated time: set by the test, read by the ingest."""

    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def start_ingest(db_url: str, broker: Broker, clock: SimClock, client_id: str,
                 live: LiveBook | None = None) -> tuple[Ingest, LiveBook]:
    """A fresh ingest (its own database handle, as a fresh process has) with the database's
    rule book, subscribed."""
    db = Database.open(db_url)
    book = live if live is not None else LiveBook(db)
    ingest = Ingest(db, book, BrokerConfig(broker.host, broker.port, client_id=client_id),
                    registry=Registry(), clock=clock, workers=2)
    ingest.start()
    assert ingest.subscribed.wait(10), "the ingest did not subscribe"
    return ingest, book


def client_id() -> str:
    return f"odo-backend-test-{uuid.uuid4().hex[:8]}"


class Wire:
    """Publishes records messages on devices' topics, as their agents do, and collects the acks."""

    def __init__(self, broker: Broker, devs: list[str]) -> None:
        self.acks: dict[str, queue.Queue[messages.Ack]] = {d: queue.Queue() for d in devs}
        self.through: dict[str, int] = dict.fromkeys(devs, 0)
        self._lock = threading.Lock()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"agents-{uuid.uuid4().hex[:8]}",
                        protocol=mqtt.MQTTv5)
        subscribed = queue.Queue[bool]()

        def on_message(client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
            dev = msg.topic.split("/")[2]
            ack = messages.decode_ack(bytes(msg.payload))
            with self._lock:
                self.through[dev] = max(self.through[dev], ack.through)
            self.acks[dev].put(ack)

        c.on_message = on_message
        c.on_subscribe = lambda *a: subscribed.put(True)
        c.connect(broker.host, broker.port)
        c.loop_start()
        c.subscribe([(topics.ack(d), 1) for d in devs])
        subscribed.get(timeout=5)
        self.client = c

    def send(self, dev: str, recs: list[Record]) -> None:
        body = messages.encode_batch([r.jws for r in recs])
        self.client.publish(topics.records(dev), body, qos=1).wait_for_publish(5)

    def wait_through(self, dev: str, seq: int, timeout: float = 15) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.through[dev] >= seq:
                    return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

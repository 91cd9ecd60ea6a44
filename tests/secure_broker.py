"""A mosquitto running deploy/mosquitto/'s configuration, and a TLS paho client that records
what the broker answers: the tools of tests/test_broker_security.py."""

from __future__ import annotations

import getpass
import os
import queue
import signal
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from sim.broker import Broker

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "mosquitto"
FLEET_CA = DEPLOY / "fleet-ca"
WAIT = 5.0


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=30)


def ok(*args: str | Path) -> None:
    res = run(*args)
    assert res.returncode == 0, f"{args}: {res.stderr}"


@dataclass(frozen=True)
class Pki:
    dir: Path    # what /etc/mosquitto/odoledger/ holds, plus <name>.crt/.key per client
    ca: Path     # the CA directory
    other: Path  # another CA's dev PKI: its certificates must not get in


@dataclass(frozen=True)
class SecureBroker:
    broker: Broker
    device_port: int
    service_port: int
    pki: Pki

    def reload(self) -> None:
        self.broker.process.send_signal(signal.SIGHUP)


def broker_conf(pki: Pki, device_port: int, service_port: int) -> str:
    """The shipped configuration with this test's paths and ports, and nothing else changed."""
    conf = (DEPLOY / "odoledger.conf").read_text()
    for old, new in [("/etc/mosquitto/odoledger/", f"{pki.dir}/"),
                     ("listener 8883\n", f"listener {device_port} 127.0.0.1\n"),
                     ("listener 8884 127.0.0.1\n", f"listener {service_port} 127.0.0.1\n")]:
        assert old in conf, f"odoledger.conf no longer has {old!r}: update this test"
        conf = conf.replace(old, new)
    if os.geteuid() == 0:  # as root, mosquitto would drop to user mosquitto and not read the keys
        conf += f"user {getpass.getuser()}\n"
    return conf


class Client:
    """A paho client over TLS that records what the broker tells it."""

    def __init__(self, secure: SecureBroker, name: str | None, *, service: bool = False,
                 client_id: str | None = None, protocol: int = mqtt.MQTTv5, pki_dir: Path | None = None,
                 tls: bool = True, will: tuple[str, bytes] | None = None) -> None:
        self.name = name
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.pubacks: dict[int, ReasonCode] = {}
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.connack: ReasonCode | None = None
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self._acked = threading.Condition()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or name or "anonymous",
                             protocol=protocol)
        if tls:
            d = pki_dir or secure.pki.dir
            cert = (d / f"{name}.crt", d / f"{name}.key") if name else (None, None)
            self.c.tls_set(ca_certs=str(secure.pki.dir / "ca.crt"), certfile=cert[0] and str(cert[0]),
                           keyfile=cert[1] and str(cert[1]))
        if will:
            self.c.will_set(will[0], will[1], qos=1, retain=True)
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = lambda c, u, f, rc, p: self.disconnected.set()
        self.c.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.c.on_publish = self._on_publish
        self.c.on_subscribe = self._on_subscribe
        self.port = secure.service_port if service else secure.device_port

    def _on_connect(self, c: mqtt.Client, u: object, f: object, rc: ReasonCode, p: object) -> None:
        self.connack = rc
        if not rc.is_failure:
            self.connected.set()
        else:
            self.disconnected.set()

    def _on_publish(self, c: mqtt.Client, u: object, mid: int, rc: ReasonCode, p: object) -> None:
        with self._acked:
            self.pubacks[mid] = rc
            self._acked.notify_all()

    def _on_subscribe(self, c: mqtt.Client, u: object, mid: int, rcs: list[ReasonCode], p: object) -> None:
        with self._acked:
            self.subacks[mid] = rcs
            self._acked.notify_all()

    def start(self) -> bool:
        """Connect; True once the broker accepted the session (CONNACK success)."""
        try:
            self.c.connect("127.0.0.1", self.port, keepalive=30)
        except (OSError, ssl.SSLError):
            return False
        self.c.loop_start()
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.connected.wait(0.05):
                return True
            if self.disconnected.is_set():
                return False
        return False

    def __enter__(self) -> Client:
        assert self.start(), f"{self.name} could not connect (CONNACK {self.connack})"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()

    def subscribe(self, *filters: str) -> list[ReasonCode]:
        _, mid = self.c.subscribe([(f, 1) for f in filters])
        with self._acked:
            assert self._acked.wait_for(lambda: mid in self.subacks, WAIT), "no SUBACK"
            return self.subacks[mid]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK's reason code."""
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        with self._acked:
            assert self._acked.wait_for(lambda: info.mid in self.pubacks, WAIT), f"no PUBACK for {topic}"
            return self.pubacks[info.mid]

    def next(self, timeout: float = WAIT) -> tuple[str, bytes]:
        return self.messages.get(timeout=timeout)

    def drain(self) -> list[tuple[str, bytes]]:
        out = []
        while not self.messages.empty():
            out.append(self.messages.get_nowait())
        return out


def backend(secure: SecureBroker, client_id: str = "odo-backend-1") -> Client:
    return Client(secure, "odo-backend", service=True, client_id=client_id)

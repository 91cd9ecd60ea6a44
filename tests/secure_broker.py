"""A mosquitto running deploy/mosquitto/'s configuration (its plugin built from the shipped
source), and a TLS paho client that records what the broker answers: the tools of
tests/test_broker_security.py, the TLS tests and tests/attacks/."""

from __future__ import annotations

import functools
import getpass
import os
import queue
import signal
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from protocol import messages, topics
from sim.broker import Broker, quiet_broker
from sim.devices import Dongle
from sim.processes import free_port
from tests.backend_process import Backend, start_backend

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "mosquitto"
FLEET_CA = DEPLOY / "fleet-ca"
PLUGIN = "/usr/local/lib/odoledger/odo_doors.so"
WAIT = 5.0
NOT_AUTHORIZED = 135


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


@functools.cache
def doors_plugin() -> Path:
    """The broker's plugin, built once per test run by deploy/mosquitto/'s Makefile."""
    out = Path(tempfile.mkdtemp(prefix="odo-doors-"))
    res = subprocess.run(["make", "-s", "-C", str(DEPLOY), f"OUT={out}"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, f"building odo_doors.so failed (scripts/deps.sh installs what it needs):\n" \
                                f"{res.stdout}{res.stderr}"
    return out / "odo_doors.so"


def broker_conf(pki: Pki, device_port: int, service_port: int) -> str:
    """The shipped configuration with this test's paths and ports, and nothing else changed."""
    conf = (DEPLOY / "odoledger.conf").read_text()
    for old, new in [("/etc/mosquitto/odoledger/", f"{pki.dir}/"), (PLUGIN, str(doors_plugin())),
                     ("listener 8883\n", f"listener {device_port} 127.0.0.1\n"),
                     ("listener 8884 127.0.0.1\n", f"listener {service_port} 127.0.0.1\n")]:
        assert old in conf, f"odoledger.conf no longer has {old!r}: update this test"
        conf = conf.replace(old, new)
    if os.geteuid() == 0:  # as root, mosquitto would drop to user mosquitto and not read the keys
        conf += f"user {getpass.getuser()}\n"
    return conf


def start_secure(base: Path, *devs: str) -> SecureBroker:
    """A dev PKI in ``base`` (the backend, ``odo-ops`` and one certificate per device id) and a
    broker on the shipped configuration; stop it with ``.broker.stop()``."""
    d = base / "pki"
    ok(FLEET_CA, "dev-setup", d, "localhost,127.0.0.1", *devs)
    (d / "acl").write_text((DEPLOY / "acl").read_text())
    pki = Pki(d, d / "ca", d)
    device_port, service_port = free_port(), free_port()
    broker = quiet_broker(extra_conf=broker_conf(pki, device_port, service_port), port=device_port,
                          anonymous=False)
    return SecureBroker(broker, device_port, service_port, pki)


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


def backend_over_tls(secure: SecureBroker, tmp_path: Path, db_url: str, *extra: str) -> Backend:
    d = secure.pki.dir
    return start_backend(tmp_path, db_url, f"mqtts://127.0.0.1:{secure.service_port}",
                         "--tls-ca", str(d / "ca.crt"), "--tls-cert", str(d / "odo-backend.crt"),
                         "--tls-key", str(d / "odo-backend.key"), *extra)


def enrol(device: Client, dongle: Dongle) -> None:
    """Enrol until the backend, once subscribed, answers "approved"."""
    device.subscribe(topics.ack(dongle.dev), topics.enrolled(dongle.dev))
    for _ in range(40):
        device.publish(topics.enroll(dongle.dev), dongle.enroll_message())
        try:
            answer = device.next(timeout=0.5)
        except Exception:  # noqa: BLE001 - queue.Empty: the backend has not subscribed yet
            continue
        assert answer == (topics.enrolled(dongle.dev), messages.encode_enrolled("approved"))
        return
    raise AssertionError("the backend never answered the enrolment")


def acked_through(device: Client, dev: str, want: int, timeout: float = 15.0) -> int:
    """The highest ``through`` acked to ``dev`` until it reaches ``want`` or nothing comes for ``timeout``."""
    through = 0
    while through < want:
        try:
            topic, body = device.next(timeout=timeout)
        except Exception:  # noqa: BLE001 - queue.Empty: no more acks
            break
        if topic == topics.ack(dev):
            through = max(through, messages.decode_ack(body).through)
    return through

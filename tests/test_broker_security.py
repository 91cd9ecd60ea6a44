"""The production broker configuration (deploy/mosquitto/) on a real mosquitto, over TLS.

The shipped ``odoledger.conf`` and ``acl`` run with only their paths and ports substituted; the
certificates come from the shipped ``fleet-ca`` and provisioning scripts.
"""

from __future__ import annotations

import shutil
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from protocol import topics
from protocol.identity import SigningKey
from sim.broker import start_broker
from sim.processes import free_port
from tests.secure_broker import (
    DEPLOY,
    FLEET_CA,
    NOT_AUTHORIZED,
    ROOT,
    WAIT,
    Client,
    Pki,
    SecureBroker,
    backend,
    broker_conf,
    ok,
    run,
)


def new_dev() -> str:
    return SigningKey.generate().public.id


A, B, C, D, E = (new_dev() for _ in range(5))  # C: revoked before start; D: via CSR; E: revoked later


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    d, other = base / "broker", base / "other"
    ok(FLEET_CA, "dev-setup", d, "localhost,127.0.0.1", A, B, C, E)
    ok(FLEET_CA, "dev-setup", other, "localhost,127.0.0.1", A)
    # D the way a dongle gets its credentials: key and CSR on the dongle, signed by the fleet.
    dongle = base / "dongle"
    ok(ROOT / "scripts" / "device-csr", "--dev", D, "--dir", dongle)
    ok(ROOT / "scripts" / "provision-device", "--ca-dir", d / "ca", "--csr", dongle / "client.csr",
       "--out-dir", dongle)
    shutil.copy(dongle / "client.key", d / f"{D}.key")
    shutil.copy(dongle / "client.crt", d / f"{D}.crt")
    ok(FLEET_CA, "revoke", d / "ca", C)
    shutil.copy(d / "ca" / "crl.pem", d / "crl.pem")
    return Pki(d, d / "ca", other)


@pytest.fixture(scope="module")
def secure(pki: Pki) -> Iterator[SecureBroker]:
    shutil.copy(DEPLOY / "acl", pki.dir / "acl")
    device_port, service_port = free_port(), free_port()
    with warnings.catch_warnings():  # start_broker leaves its log file to the garbage collector
        warnings.simplefilter("ignore", ResourceWarning)
        broker = start_broker(broker_conf(pki, device_port, service_port), port=device_port,
                              anonymous=False)
    yield SecureBroker(broker, device_port, service_port, pki)
    broker.stop()


def test_device_records_reach_the_backend_through_its_shared_subscription(secure: SecureBroker) -> None:
    with backend(secure) as be, Client(secure, A) as a:
        granted = be.subscribe(topics.shared("records"), topics.shared("status"), topics.shared("enroll"))
        assert [rc.value for rc in granted] == [1, 1, 1]
        for channel in ("records", "status", "enroll"):
            rc = a.publish(topics.topic(A, channel), b'{"from": "A"}')
            assert rc.value == 0, f"{channel}: {rc}"
            assert be.next() == (topics.topic(A, channel), b'{"from": "A"}')


@pytest.mark.parametrize("protocol", [mqtt.MQTTv5, mqtt.MQTTv311], ids=["mqtt5", "mqtt311"])
def test_a_device_cannot_publish_on_another_devices_topics(secure: SecureBroker, protocol: int) -> None:
    with backend(secure) as be, Client(secure, A, protocol=protocol) as a, Client(secure, B) as b:
        be.subscribe(topics.shared("records"), topics.shared("status"), topics.shared("enroll"))
        b.subscribe(topics.ack(B), topics.enrolled(B))
        forged = [topics.topic(B, ch) for ch in ("records", "status", "enroll", "ack", "enrolled")]
        forged += [topics.records("c" * 32), "odo/v1/records", "elsewhere", "$SYS/broker/x"]
        for topic in forged:
            rc = a.publish(topic, b"forged")
            if protocol == mqtt.MQTTv5:  # MQTT 3.1.1 has no reason code: the PUBACK says nothing
                assert rc.value == NOT_AUTHORIZED, f"{topic}: {rc}"
        # Markers after the denials: whatever the broker let through would have arrived first.
        assert b.publish(topics.records(B), b"marker").value == 0
        assert be.next() == (topics.records(B), b"marker")
        assert be.publish(topics.ack(B), b"real ack").value == 0
        assert b.next() == (topics.ack(B), b"real ack")
        assert be.drain() == [] and b.drain() == []


def test_a_device_cannot_read_another_devices_acks(secure: SecureBroker) -> None:
    with backend(secure) as be, Client(secure, A) as a, Client(secure, B) as b:
        assert [rc.value for rc in b.subscribe(topics.ack(B), topics.enrolled(B))] == [1, 1]
        # odo_doors refuses at SUBSCRIBE what the ACL would not deliver; the read check stays behind it.
        wide = [topics.ack(B), topics.enrolled(B), "odo/v1/+/ack", "odo/v1/#", "#", "+/+/+/ack",
                topics.records(A), f"$share/odo-backend/{topics.ack(B)}", f"$share/{A}/{topics.ack(B)}"]
        assert [rc.value for rc in a.subscribe(*wide)] == [NOT_AUTHORIZED] * len(wide)
        assert [rc.value for rc in a.subscribe(topics.ack(A), topics.enrolled(A))] == [1, 1]
        for topic in (topics.ack(B), topics.enrolled(B)):
            assert be.publish(topic, b"for B").value == 0
            assert b.next() == (topic, b"for B")
        # A's own ack, published after: A's subscriptions do work, and nothing came before it.
        assert be.publish(topics.ack(A), b"for A").value == 0
        assert a.next() == (topics.ack(A), b"for A")
        time.sleep(0.1)
        assert a.drain() == []


def test_the_largest_batch_passes_and_an_oversized_packet_is_refused(secure: SecureBroker) -> None:
    """docs/protocol.md §4.2 allows a records body of 256 KiB; the broker's max_packet_size must let it by."""
    body = b"x" * (256 * 1024)
    with backend(secure) as be, Client(secure, A) as a:
        be.subscribe(topics.shared("records"))
        assert a.publish(topics.records(A), body).value == 0
        assert be.next() == (topics.records(A), body)
        big = Client(secure, B, protocol=mqtt.MQTTv311)  # told no limit: the broker must enforce it
        assert big.start()
        big.c.publish(topics.records(B), b"x" * (300 * 1024), qos=1)
        assert big.disconnected.wait(WAIT), "a packet over max_packet_size did not end the session"
        big.c.loop_stop()
        assert be.drain() == []


def test_the_backend_account_answers_devices_but_cannot_speak_for_them(secure: SecureBroker) -> None:
    with backend(secure) as be, Client(secure, A) as a:
        a.subscribe(topics.ack(A), topics.enrolled(A))
        be.subscribe(topics.shared("records"), topics.shared("status"))
        assert be.publish(topics.enrolled(A), b'{"status": "approved"}').value == 0
        assert a.next() == (topics.enrolled(A), b'{"status": "approved"}')
        assert be.publish(topics.records(A), b"forged").value == NOT_AUTHORIZED
        assert be.publish(topics.status(A), b"forged").value == NOT_AUTHORIZED
        assert a.publish(topics.records(A), b"genuine").value == 0
        assert be.next() == (topics.records(A), b"genuine")
        assert be.drain() == []


def test_a_client_id_cannot_take_over_another_devices_session(secure: SecureBroker) -> None:
    with backend(secure) as be, Client(secure, A) as a:
        a.subscribe(topics.ack(A))
        with Client(secure, B, client_id=A):  # the device port renames it to its own CN
            assert not a.disconnected.wait(0.5), "A was disconnected by a client claiming its id"
            assert be.publish(topics.ack(A), b"still here").value == 0
            assert a.next() == (topics.ack(A), b"still here")


@pytest.mark.parametrize(("cert", "client_id", "accepted"), [
    ("odo-backend", "odo-backend", True),
    ("odo-backend", "odo-backend-host1.example_2:b", True),
    ("odo-backend", "odo-backend-", False),
    ("odo-backend", "odo-backendx", False),
    ("odo-backend", "backend-1", False),
    ("odo-backend", "odo-ops", False),
    ("odo-ops", "odo-ops", True),
    ("odo-ops", "odo-backend-1", False),
    ("odo-ops", "odo-backend", False),
    ("odo-ops", "odo-ops-1", False),
    ("A", "A", True),
    ("A", "odo-backend-1", False),
    ("A", "B", False),
])
def test_client_ids_on_the_services_port_are_the_certificates_own(secure: SecureBroker, cert: str,
                                                                    client_id: str, accepted: bool) -> None:
    names = {"A": A, "B": B}
    client = Client(secure, names.get(cert, cert), service=True, client_id=names.get(client_id, client_id))
    try:
        assert client.start() == accepted, f"{cert} as {client_id!r}: CONNACK {client.connack}"
        if not accepted:
            assert client.connack is not None and client.connack.value == NOT_AUTHORIZED
    finally:
        client.stop()


@pytest.mark.parametrize("protocol", [mqtt.MQTTv5, mqtt.MQTTv311], ids=["mqtt5", "mqtt311"])
def test_nobody_takes_the_backends_session(secure: SecureBroker, protocol: int) -> None:
    with backend(secure) as be, Client(secure, A) as a:
        be.subscribe(topics.shared("records"))
        impostors = [Client(secure, "odo-ops", service=True, client_id="odo-backend-1", protocol=protocol),
                     Client(secure, B, service=True, client_id="odo-backend-1", protocol=protocol),
                     # on the devices' port, renamed to odo-ops and to B:
                     Client(secure, "odo-ops", client_id="odo-backend-1", protocol=protocol),
                     Client(secure, B, client_id="odo-backend-1", protocol=protocol)]
        # A user name the client sends does not count either: the certificate names it.
        impostors[0].c.username_pw_set("odo-backend")
        try:
            for impostor in impostors:
                impostor.start()
            assert not be.disconnected.wait(0.5), "the backend lost its session to an impostor"
            assert a.publish(topics.records(A), b"still the backend's").value == 0
            assert be.next() == (topics.records(A), b"still the backend's")
        finally:
            for impostor in impostors:
                impostor.stop()


def test_ops_reads_statuses_but_never_the_backends_share(secure: SecureBroker) -> None:
    with backend(secure) as be, Client(secure, "odo-ops", service=True) as ops, Client(secure, A) as a:
        assert [rc.value for rc in be.subscribe(topics.shared("status"))] == [1]
        denied = [topics.shared("status"), topics.shared("records"), "$share/odo-backend/#",
                  "odo/v1/+/records", "odo/v1/#", "#", topics.ack(A)]
        assert [rc.value for rc in ops.subscribe(*denied)] == [NOT_AUTHORIZED] * len(denied)
        granted = ops.subscribe("odo/v1/+/status", topics.status(A), "$SYS/broker/uptime",
                                "$share/odo-ops/odo/v1/+/status")
        assert [rc.value for rc in granted] == [1, 1, 1, 1]
        for i in range(4):
            assert a.publish(topics.status(A), b"%d" % i).value == 0
        assert sorted(be.next()[1] for _ in range(4)) == [b"0", b"1", b"2", b"3"]  # every one
        time.sleep(0.2)
        assert {m for m in ops.drain() if m[0] == topics.status(A)} == {(topics.status(A), b"%d" % i)
                                                                        for i in range(4)}


def test_a_will_may_only_announce_the_devices_own_status(secure: SecureBroker) -> None:
    with backend(secure) as be:
        be.subscribe(topics.status(A), topics.status(B))
        be.drain()
        a = Client(secure, A, will=(topics.status(A), b'{"online": false}'))
        assert a.start()
        a.c.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"))
        a.c.loop_stop()
        assert be.next() == (topics.status(A), b'{"online": false}')
        # A will on another device's status is accepted at CONNECT but never published.
        forger = Client(secure, A, will=(topics.status(B), b'{"online": false}'))
        assert forger.start()
        forger.c.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"))
        forger.c.loop_stop()
        with Client(secure, B) as b:
            assert b.publish(topics.status(B), b"marker").value == 0
            assert be.next() == (topics.status(B), b"marker")
        assert be.drain() == []


@pytest.mark.parametrize("who", ["no-certificate", "other-ca", "revoked"])
def test_clients_without_a_valid_certificate_are_refused(secure: SecureBroker, who: str) -> None:
    client = {
        "no-certificate": lambda: Client(secure, None),
        "other-ca": lambda: Client(secure, A, pki_dir=secure.pki.other),
        "revoked": lambda: Client(secure, C),
    }[who]()
    try:
        assert not client.start(), f"{who}: the broker accepted the connection"
    finally:
        client.c.loop_stop()


def test_a_certificate_provisioned_from_the_dongles_csr_connects(secure: SecureBroker) -> None:
    with backend(secure) as be, Client(secure, D) as d:
        be.subscribe(topics.shared("records"))
        assert d.publish(topics.records(D), b"hello").value == 0
        assert be.next() == (topics.records(D), b"hello")


def test_revocation_takes_effect_when_the_broker_reloads(secure: SecureBroker) -> None:
    with Client(secure, E):
        pass
    ok(FLEET_CA, "revoke", secure.pki.ca, E)
    shutil.copy(secure.pki.ca / "crl.pem", secure.pki.dir / "crl.pem")
    secure.reload()
    deadline = time.monotonic() + WAIT
    while True:
        client = Client(secure, E)
        refused = not client.start()
        client.stop()
        if refused or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert refused, "a revoked certificate still connects after the reload"
    with Client(secure, A):  # everyone else still gets in
        pass


@pytest.mark.parametrize("service", [False, True], ids=["device-port", "service-port"])
def test_plaintext_is_refused_on_the_tls_ports(secure: SecureBroker, service: bool) -> None:
    port = secure.service_port if service else secure.device_port
    client = Client(secure, A, tls=False, service=service)
    try:
        assert not client.start(), "a plaintext MQTT client got a CONNACK"
    finally:
        client.c.loop_stop()
    # The same at the byte level: a bare MQTT 3.1.1 CONNECT gets no CONNACK (0x20), only a close.
    connect = bytes([0x10, 13, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 30, 0, 1]) + b"p"
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        s.sendall(connect)
        try:
            reply = s.recv(16)
        except ConnectionResetError:
            reply = b""
    assert not reply.startswith(b"\x20"), f"plaintext CONNECT answered with {reply!r}"


def test_a_device_cannot_join_the_backends_share_group(secure: SecureBroker) -> None:
    with backend(secure) as be, Client(secure, A) as a, Client(secure, B) as b:
        be.subscribe(topics.shared("records"))
        assert [rc.value for rc in a.subscribe(topics.shared("records"))] == [NOT_AUTHORIZED]
        for i in range(6):
            assert b.publish(topics.records(B), b"%d" % i).value == 0
        got = []
        try:
            while len(got) < 6:
                got.append(be.next(timeout=1.0))
        finally:
            # What is proven either way: the intruder reads nothing.
            assert a.drain() == []
        assert len(got) == 6


def test_device_port_settings_are_those_the_tests_ran() -> None:
    """The shipped file keeps what the tests above rely on; no plaintext listener sneaks in."""
    conf = (DEPLOY / "odoledger.conf").read_text()
    lines = [ln.split("#")[0].strip() for ln in conf.splitlines()]
    lines = [ln for ln in lines if ln]
    blocks: list[list[str]] = []
    for ln in lines:
        if ln.startswith("listener "):
            blocks.append([ln])
        elif blocks:
            blocks[-1].append(ln)
        else:
            assert not ln.startswith(("port ", "bind_address")), ln
    assert "allow_anonymous false" in lines and "per_listener_settings false" in lines
    assert [b[0] for b in blocks] == ["listener 8883", "listener 8884 127.0.0.1"]
    for block in blocks:
        for needed in ("cafile", "certfile", "keyfile", "crlfile"):
            assert any(ln.startswith(needed + " ") for ln in block), (block[0], needed)
        assert "require_certificate true" in block
    # Devices: named and renamed by mosquitto itself. Services: named by odo_doors, which checks the
    # client id; use_identity_as_username there would skip that check (mosquitto would not ask it).
    assert "use_identity_as_username true" in blocks[0] and "use_username_as_clientid true" in blocks[0]
    assert not any(ln.startswith(("use_identity_as_username", "use_subject_as_username", "use_username_as"))
                   for ln in blocks[1])
    assert "plugin /usr/local/lib/odoledger/odo_doors.so" in lines
    assert "plugin_opt_acl_file /etc/mosquitto/odoledger/acl" in lines
    assert "acl_file /etc/mosquitto/odoledger/acl" in lines
    assert "plugin_opt_suffixed_ids odo-backend" in lines
    assert not any(ln.startswith(("password_file", "psk_file", "auth_plugin")) for ln in lines)


def test_fleet_ca_refuses_what_would_blur_devices_and_services(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    ok(FLEET_CA, "init", ca)
    # A device CSR whose CN is not a device id (here: the backend's name) is not signed.
    key, csr = tmp_path / "x.key", tmp_path / "x.csr"
    ok("openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
       "-keyout", key, "-out", csr, "-subj", "/CN=odo-backend")
    res = run(FLEET_CA, "sign", ca, csr, tmp_path / "x.crt")
    assert res.returncode == 2 and "CN must be the device id" in res.stderr
    assert not (tmp_path / "x.crt").exists()
    # A service account may not take a device's name, nor the backend's client ids, nor a device
    # id a second certificate.
    res = run(FLEET_CA, "client", ca, tmp_path / "svc", A)
    assert res.returncode == 2 and "service account name" in res.stderr
    res = run(FLEET_CA, "client", ca, tmp_path / "svc", "odo-backend-host1")
    assert res.returncode == 2 and "the backend's client ids" in res.stderr
    assert not (tmp_path / "svc.crt").exists()
    ok(FLEET_CA, "device", ca, tmp_path / "dev", A)
    ok("openssl", "req", "-new", "-key", tmp_path / "dev.key", "-subj", f"/CN={A}", "-out", csr)
    res = run(FLEET_CA, "sign", ca, csr, tmp_path / "again.crt")
    assert res.returncode == 2 and "already has a valid certificate" in res.stderr
    ok(FLEET_CA, "sign", ca, csr, tmp_path / "again.crt", "--renew")
    assert run(FLEET_CA, "list", ca).stdout.count(A) == 2
    # Refusing to replace a CA: its key signs every certificate in the fleet.
    res = run(FLEET_CA, "init", ca)
    assert res.returncode == 2 and "refusing to replace a CA" in res.stderr

"""The HTTP API through Starlette's TestClient, on SQLite and PostgreSQL."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.parser import text_string_to_metric_families
from starlette.routing import Mount, Route

from backend import metrics
from backend.db import Database
from backend.ledger import assignments
from backend.metrics import FleetFigures, Registry
from backend.records import devices, store
from backend.records import ingest as ingest_module
from backend.records.ingest import Ingest
from backend.web import api
from backend.web.app import create_app
from backend.web.context import AppContext
from protocol import b64, messages
from sim.devices import FLEET_TOKEN, T0, VIN, Dongle, batch, enroll

with warnings.catch_warnings():
    # Starlette asks for the httpx2 package; plain httpx is what the project installs.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

TOKEN = "api-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NOW = T0 + 86_400_000


@pytest.fixture
def client(db: Database, rules: Any) -> Iterator[TestClient]:
    ctx = AppContext(db=db, rules=rules, api_token=TOKEN, clock=lambda: NOW)
    with TestClient(create_app(ctx)) as c:
        yield c


@pytest.fixture
def device(db: Database, rules: Any) -> Dongle:
    """An approved device with 3 accepted records and one confirmation credited to driver alice."""
    d = Dongle(vin=VIN)
    enroll(db, d)
    assignments.add_driver(db, "alice", "Alice", T0)
    assignments.assign(db, "alice", VIN, T0, T0)
    body = batch(d.odometer(1), d.odometer(1), d.confirmation("2026-W39"))
    ack = store.process_batch(db, rules, d.dev, body, NOW).ack
    assert ack.through == 3 and ack.balance == 10_000
    return d


def test_every_api_path_needs_the_token(client: TestClient, device: Dongle) -> None:
    paths = ["/api/devices", f"/api/devices/{device.dev}", f"/api/devices/{device.dev}/records",
             "/api/wallets/driver:alice", "/api/checkpoint", "/api/openapi.json", "/api/no-such-path"]
    for path in paths:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = client.get(path, headers=headers)
            assert r.status_code == 401, path
            assert "error" in r.json() and r.headers["www-authenticate"].startswith("Bearer")
    for path in (f"/api/devices/{device.dev}/revoke", "/api/wallets/driver:alice/redeem"):
        assert client.post(path).status_code == 401
    assert client.get("/api/devices", headers=AUTH).status_code == 200
    assert client.get("/api/devices", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
    assert client.get("/api/no-such-path", headers=AUTH).status_code == 404
    assert client.get("/api/no-such-path", headers=AUTH).json() == {"error": "no such path /api/no-such-path"}
    # the device was not revoked by the refused POST
    assert client.get(f"/api/devices/{device.dev}", headers=AUTH).json()["status"] == "approved"


def test_no_token_configured_means_open(db: Database, rules: Any) -> None:
    with TestClient(create_app(AppContext(db=db, rules=rules))) as c:
        assert c.get("/api/devices").json() == []


def test_devices(client: TestClient, device: Dongle) -> None:
    listed = client.get("/api/devices", headers=AUTH).json()
    assert listed == [{"dev": device.dev, "vin": VIN, "status": "approved", "last_seq": 3, "last_seen": NOW,
                       "odo_m": device.odo_m, "accepted": 3, "rejected": 0, "backlog": None, "online": False,
                       "flagged_vin": None, "held_since": None, "held_reason": None}]
    one = client.get(f"/api/devices/{device.dev}", headers=AUTH).json()
    assert b64.decode(one["pub"]) == device.key.public.raw
    assert one["enrollment"]["vin"] == VIN and one["enrollment"]["fleet_token_approved"] is True
    assert FLEET_TOKEN not in str(one)                         # the token itself is never shown
    assert client.get(f"/api/devices/{'0' * 32}", headers=AUTH).status_code == 404
    assert client.get("/api/devices/nonsense", headers=AUTH).status_code == 404


def test_records_are_paginated(client: TestClient, device: Dongle) -> None:
    url = f"/api/devices/{device.dev}/records"
    rows = client.get(url, headers=AUTH).json()
    assert [r["seq"] for r in rows] == [1, 2, 3]
    assert set(rows[0]) >= {"seq", "id", "kind", "t", "odo_m", "status", "reason"}
    assert rows[2]["kind"] == "confirmation" and rows[0]["status"] == "accepted"
    page = client.get(url, params={"after_seq": 1, "limit": 1}, headers=AUTH).json()
    assert [r["seq"] for r in page] == [2]
    for params in ({"limit": 0}, {"limit": 5001}, {"after_seq": -1}, {"after_seq": "x"}):
        r = client.get(url, params=params, headers=AUTH)
        assert r.status_code == 400 and next(iter(params)) in r.json()["error"]


def test_approve_and_revoke(client: TestClient, device: Dongle) -> None:
    base = f"/api/devices/{device.dev}"
    assert client.post(f"{base}/revoke", headers=AUTH).json()["status"] == "revoked"
    r = client.post(f"{base}/approve", headers=AUTH, json={"vin": "not a vin!"})
    assert r.status_code == 400 and "vin" in r.json()["error"]
    assert client.post(f"{base}/approve", headers={**AUTH, "Content-Type": "application/json"},
                       content=b"[1,").status_code == 400
    assert client.get(base, headers=AUTH).json()["status"] == "revoked"          # unchanged by bad input
    assert client.post(f"{base}/approve", headers=AUTH).json()["status"] == "approved"
    approved = client.post(f"{base}/approve", headers=AUTH, json={"vin": "WBA12345678901234"}).json()
    assert approved["vin"] == "WBA12345678901234" and approved["enrollment"]["decided_by"] == "api"
    assert client.post(f"/api/devices/{'0' * 32}/revoke", headers=AUTH).status_code == 404
    assert client.get(f"{base}/revoke", headers=AUTH).status_code == 405


def test_wallet_and_redeem(client: TestClient, device: Dongle) -> None:
    wallet = client.get("/api/wallets/driver:alice", headers=AUTH).json()
    assert wallet["account"] == "driver:alice" and wallet["balance"] == 10_000
    assert len(wallet["transfers"]) == 1
    assert client.get(f"/api/wallets/unassigned:{device.dev}", headers=AUTH).json()["balance"] == 0
    assert client.get("/api/wallets/driver:nobody", headers=AUTH).status_code == 404
    url = "/api/wallets/driver:alice/redeem"
    first = client.post(url, headers=AUTH, json={"item": "tyre-voucher", "idempotency_key": "k1"})
    assert first.status_code == 200 and first.json()["amount"] == 5000
    again = client.post(url, headers=AUTH, json={"item": "tyre-voucher", "idempotency_key": "k1"})
    assert again.status_code == 200 and again.json() == first.json()
    conflict = client.post(url, headers=AUTH, json={"item": "car-wash", "idempotency_key": "k1"})
    assert conflict.status_code == 409 and "k1" in conflict.json()["error"]
    second = client.post(url, headers=AUTH, json={"item": "tyre-voucher", "idempotency_key": "k2"})
    assert second.status_code == 200
    broke = client.post(url, headers=AUTH, json={"item": "tyre-voucher", "idempotency_key": "k3"})
    assert broke.status_code == 409
    assert client.post(url, headers=AUTH, json={"item": "yacht", "idempotency_key": "k4"}).status_code == 404
    assert client.post("/api/wallets/driver:nobody/redeem", headers=AUTH,
                       json={"item": "car-wash", "idempotency_key": "k5"}).status_code == 404
    for body in (b"", b"not json", b"[]", b'{"item": "car-wash"}', b'{"item": 1, "idempotency_key": "k"}',
                 b'{"item": "car-wash", "idempotency_key": "k", "extra": 1}',
                 b'{"item": "car-wash", "idempotency_key": "has space"}'):
        r = client.post(url, headers={**AUTH, "Content-Type": "application/json"}, content=body)
        assert r.status_code == 400, body
        assert r.json()["error"]
    assert client.get("/api/wallets/driver:alice", headers=AUTH).json()["balance"] == 0


def test_checkpoint(client: TestClient, device: Dongle) -> None:
    cp = client.get("/api/checkpoint", headers=AUTH).json()
    assert cp["size"] >= 4 and len(cp["root"]) == 64   # 3 records, 1 transfer, and the device's entries
    assert cp["note"].startswith(f"{cp['origin']}\n{cp['size']}\n") and cp["cosignatures"] == 0


def test_openapi_documents_every_route(client: TestClient, db: Database, rules: Any) -> None:
    doc = client.get("/api/openapi.json", headers=AUTH).json()
    assert doc["openapi"].startswith("3.1")
    mount = api.routes(AppContext(db=db, rules=rules))[0]
    assert isinstance(mount, Mount)
    for route in mount.routes:
        assert isinstance(route, Route)
        methods = (route.methods or set()) - {"HEAD"}
        assert {m.lower() for m in methods} <= set(doc["paths"]["/api" + route.path]), route.path
    assert "/metrics" in doc["paths"] and "/healthz" in doc["paths"]


def test_metrics_and_health(client: TestClient, device: Dongle) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/metrics")
    assert r.headers["content-type"] == CONTENT_TYPE_PLAIN_0_0_4
    for line in ("# TYPE odo_records_total counter", "# TYPE odo_ingest_seconds histogram",
                 "odo_devices_online 0.0", "odo_backlog_total 0.0"):
        assert line in r.text.splitlines()


def test_metrics_text_format() -> None:
    registry = Registry(buckets=(0.01, 0.1), fleet=lambda: FleetFigures(3, 12))
    registry.count_records([("accepted", ""), ("accepted", ""), ("rejected", 'odd"reason')])
    registry.observe_batch(0.05)
    registry.observe_batch(0.5)
    text = registry.exposition().decode()
    lines = text.splitlines()
    assert 'odo_records_total{reason="",status="accepted"} 2.0' in lines
    assert 'odo_records_total{reason="odd\\"reason",status="rejected"} 1.0' in lines
    assert "odo_ingest_errors_total 0.0" in lines
    assert ['odo_ingest_seconds_bucket{le="0.01"} 0.0', 'odo_ingest_seconds_bucket{le="0.1"} 1.0',
            'odo_ingest_seconds_bucket{le="+Inf"} 2.0', "odo_ingest_seconds_count 2.0",
            "odo_ingest_seconds_sum 0.55"] == [x for x in lines if x.startswith("odo_ingest_seconds")]
    assert "odo_devices_online 3.0" in lines and "odo_backlog_total 12.0" in lines
    assert "_total_total" not in text and "_created" not in text
    assert registry.records("accepted") == 2 and registry.records("rejected", 'odd"reason') == 1
    assert "odo_devices_online" not in Registry().exposition().decode()    # no database, no gauges


class _AckSink:
    """Stands in for the ingest's MQTT client: keeps the acks instead of publishing them."""

    def __init__(self) -> None:
        self.published: list[str] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        self.published.append(topic)


def test_metrics_scrape_parses_after_an_ingest(db: Database, rules: Any, device: Dongle,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry(buckets=(0.01, 0.1))
    monkeypatch.setattr(metrics, "REGISTRY", registry)             # the app and the ingest use this one
    ingest = Ingest(db, rules, ingest_module.BrokerConfig("localhost", 1883), registry=registry,
                    clock=lambda: NOW)
    ingest.client = _AckSink()  # type: ignore[assignment]
    stranger = Dongle()                                           # never enrolled
    body = batch(device.odometer(1), device.odometer(1))
    assert ingest.handle_records(device.dev, body).ack.through == 5
    ingest.handle_records(device.dev, body)                       # redelivered: two duplicates
    first = ingest.handle_records(stranger.dev, batch(stranger.odometer(1)))
    assert first.ack.through == 0
    devices.update_status(db, device.dev, messages.encode_status(backlog=4), NOW)

    with TestClient(create_app(AppContext(db=db, rules=rules, clock=lambda: NOW))) as c:
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"] == CONTENT_TYPE_PLAIN_0_0_4
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    types = {name: f.type for name, f in families.items()}         # the parser drops counters' _total
    assert types == {"odo_records": "counter", "odo_messages_refused": "counter",
                     "odo_ingest_errors": "counter", "odo_mqtt_session_taken_over": "counter",
                     "odo_ingest_queued": "gauge", "odo_storage_failing": "gauge",
                     "odo_ingest_seconds": "histogram", "odo_devices_online": "gauge",
                     "odo_backlog_total": "gauge", "odo_devices_held": "gauge", "odo_evidence_kept": "gauge",
                     "odo_evidence_dropped": "gauge", "odo_log_entries": "gauge",
                     "odo_log_merge_delay_seconds": "histogram", "odo_log_queued": "gauge",
                     "odo_log_witness_lag": "gauge", "odo_log_witnesses_failing": "gauge"}

    def samples(family: str) -> list[tuple[str, float]]:
        return [(s.name, s.value) for s in families[family].samples]

    records = {(s.labels["status"], s.labels["reason"]): s.value for s in families["odo_records"].samples}
    assert {s.name for s in families["odo_records"].samples} == {"odo_records_total"}
    assert records == {("accepted", ""): 2.0, ("duplicate", ""): 2.0, ("rejected", "unknown_device"): 1.0}
    assert samples("odo_ingest_errors") == [("odo_ingest_errors_total", 0.0)]

    seconds = {(s.name, s.labels.get("le")): s.value for s in families["odo_ingest_seconds"].samples}
    assert set(seconds) == {("odo_ingest_seconds_bucket", "0.01"), ("odo_ingest_seconds_bucket", "0.1"),
                            ("odo_ingest_seconds_bucket", "+Inf"), ("odo_ingest_seconds_count", None),
                            ("odo_ingest_seconds_sum", None)}
    assert seconds[("odo_ingest_seconds_bucket", "+Inf")] == seconds[("odo_ingest_seconds_count", None)]
    assert seconds[("odo_ingest_seconds_count", None)] == 3.0                       # three batches
    assert seconds[("odo_ingest_seconds_sum", None)] > 0

    assert samples("odo_devices_online") == [("odo_devices_online", 1.0)]     # read from the database
    assert samples("odo_backlog_total") == [("odo_backlog_total", 4.0)]
    assert samples("odo_devices_held") == [("odo_devices_held", 0.0)]
    assert samples("odo_evidence_kept") == [("odo_evidence_kept", 1.0)]      # the unknown device's record
    assert samples("odo_evidence_dropped") == [("odo_evidence_dropped", 0.0)]
    assert "_total_total" not in r.text and "_created" not in r.text


def test_an_unexpected_failure_is_a_json_500(db: Database, rules: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(db: Database) -> list[dict[str, Any]]:
        raise RuntimeError("the disk is on fire")

    monkeypatch.setattr("backend.records.devices.list_devices", broken)
    with TestClient(create_app(AppContext(db=db, rules=rules)), raise_server_exceptions=False) as c:
        r = c.get("/api/devices")
    assert r.status_code == 500 and "internal error" in r.json()["error"]
    assert "fire" not in r.text

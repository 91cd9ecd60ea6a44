"""Two ``odo-backend run`` processes on one PostgreSQL share the load through the shared
subscription: every record stored once, in seq order, without gaps, credited once."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.db import Database
from backend.transparency import translog
from protocol import topics
from protocol.records import Record, iso_week
from sim.broker import Broker, quiet_broker
from sim.devices import Dongle, batch
from sim.mqtt_device import MqttDevice
from tests.backend_process import metrics_value, start_backend

DEVICES = 8
RECORDS = 60
BATCH = 10
SIX_HOURS = 6 * 3_600_000


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = quiet_broker()
    yield b
    b.stop()


def _records(d: Dongle) -> list[Record]:
    """Odometer readings six hours apart, with a confirmation now and then (several a week)."""
    out = []
    for i in range(RECORDS):
        if i % 7 == 6:
            out.append(d.confirmation(iso_week(d.t + SIX_HOURS), dt_ms=SIX_HOURS))
        else:
            out.append(d.odometer(1, dt_ms=SIX_HOURS))
    return out


def _drive(agent: MqttDevice, recs: list[Record], errors: list[str]) -> None:
    """Send from ``through + 1`` on, every batch twice (at-least-once delivery), until all is acked."""
    through, deadline = 0, time.monotonic() + 60
    while through < len(recs) and time.monotonic() < deadline:
        chunk = recs[through:through + BATCH]
        for _ in range(2):
            agent.client.publish(topics.records(agent.device.dev), batch(*chunk), qos=1)
        waited = time.monotonic() + 1.0
        while time.monotonic() < waited:
            try:
                ack = agent.acks.get(timeout=0.1)
            except Exception:  # noqa: BLE001 - queue.Empty
                continue
            if ack.rejected:
                errors.append(f"{agent.device.dev}: {ack.rejected}")
            if ack.through > through:
                through = ack.through
                break
    if through < len(recs):
        errors.append(f"{agent.device.dev}: acknowledged through {through} only")


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_two_backends_share_the_load(db_url: str, broker: Broker, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:6]
    backends = [start_backend(tmp_path, db_url, broker.url, "--client-id", f"odo-backend-{name}-{run}",
                              name=name) for name in ("one", "two")]
    fleet = [Dongle() for _ in range(DEVICES)]
    plans = {d.dev: _records(d) for d in fleet}
    errors: list[str] = []
    try:
        agents = [MqttDevice(d, broker.host, broker.port).__enter__() for d in fleet]
        try:
            for agent in agents:
                assert agent.enroll()[0] == "approved"
            started = time.monotonic()
            threads = [threading.Thread(target=_drive, args=(a, plans[a.device.dev], errors)) for a in agents]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - started
        finally:
            for agent in agents:
                agent.__exit__()
        assert errors == []
        scraped = [b.get("/metrics").text for b in backends]
        shares = [metrics_value(text, 'odo_records_total{status="accepted"') for text in scraped]
        replays = sum(metrics_value(text, 'odo_records_total{status="duplicate"') for text in scraped)
    finally:
        for b in backends:
            assert b.stop() == 0
    assert sum(shares) == DEVICES * RECORDS and min(shares) > 0, shares
    print(f"\n{DEVICES * RECORDS} records (each sent twice) from {DEVICES} devices in {elapsed:.2f} s; "
          f"accepted by each process: {shares}; replays seen: {replays}")

    db = Database.open(db_url)
    try:
        for d in fleet:
            rows = db.query("SELECT seq, id, status FROM records WHERE dev = ? ORDER BY seq", (d.dev,))
            assert [(r["seq"], r["id"], r["status"]) for r in rows] == [
                (r.seq, r.id, "accepted") for r in plans[d.dev]]
            assert db.one("SELECT through, head_id FROM devices WHERE dev = ?", (d.dev,)) == {
                "through": RECORDS, "head_id": plans[d.dev][-1].id}
        weeks = {(r.dev, r.fields["week"]) for recs in plans.values() for r in recs
                 if r.kind == "confirmation"}
        credits = db.query("SELECT dev, week FROM transfers WHERE rule_id = 'weekly-confirmation'")
        assert sorted((c["dev"], c["week"]) for c in credits) == sorted(weeks)
        translog.integrate_all(db)          # what the sequencers have not integrated yet
        logged = db.query("SELECT idx, ref FROM translog WHERE entry_kind = 'record'")
        assert len(logged) == DEVICES * RECORDS == len({r["ref"] for r in logged})
        assert db.one("SELECT COUNT(*) AS n FROM translog WHERE entry_kind IN ('record', 'transfer')") == {
            "n": DEVICES * RECORDS + len(weeks)}
        # beside them, each device's enrolment and approval, and the rules: every index taken once
        kinds = {r["entry_kind"]: int(r["n"]) for r in db.query(
            "SELECT entry_kind, COUNT(*) AS n FROM translog GROUP BY entry_kind")}
        assert kinds == {"record": DEVICES * RECORDS, "transfer": len(weeks), "enrolment": DEVICES,
                         "decision": DEVICES, "rules": 1}
        total = sum(kinds.values())
        assert db.one("SELECT COUNT(*) AS n, MAX(idx) AS top FROM translog") == {"n": total, "top": total - 1}
    finally:
        db.close()

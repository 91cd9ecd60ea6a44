"""The store's decisions on real signed records, on SQLite and PostgreSQL (no broker)."""

from __future__ import annotations

from typing import Any

from backend.db import Database
from backend.metrics import FleetFigures
from backend.records import devices, store
from backend.transparency import translog
from protocol import b64, messages
from protocol.identity import SigningKey
from protocol.messages import Ack, Rejection
from sim.devices import OTHER_VIN, T0, Dongle, batch, enroll, fresh_vin
from tests.backend_helpers import snapshot

NOW = T0 + 86_400_000


def ingest(db: Database, rules: Any, dev: str, body: bytes, now: int = NOW) -> Ack:
    return store.process_batch(db, rules, dev, body, now).ack


def test_a_chain_is_accepted_logged_and_acknowledged(db: Database, rules: Any) -> None:
    d = Dongle()
    enroll(db, d)
    recs = [d.odometer(1), d.odometer(2), d.confirmation("2026-W39")]
    ack = ingest(db, rules, d.dev, batch(*recs))
    assert ack == Ack(3, (), 10_000)
    rows = db.query("SELECT seq, id, status, reason FROM records ORDER BY seq")
    assert [(r["seq"], r["id"], r["status"], r["reason"]) for r in rows] == [
        (r.seq, r.id, "accepted", None) for r in recs]
    translog.integrate_all(db)
    logged = db.query("SELECT ref FROM translog WHERE entry_kind = 'record' ORDER BY idx")
    assert [r["ref"] for r in logged] == [r.id for r in recs]
    assert db.one("SELECT through, head_id FROM devices") == {"through": 3, "head_id": recs[-1].id}


def test_forged_record_is_refused_and_changes_nothing(db: Database, rules: Any) -> None:
    d = Dongle()
    enroll(db, d)
    ingest(db, rules, d.dev, batch(d.odometer(1)))
    before = snapshot(db)
    payload = d.payload("odometer", {"odo_m": 99_000_000, "src": "obd"}, seq=2)
    forged = d.forged(payload, SigningKey.generate())
    ack = ingest(db, rules, d.dev, batch(forged))
    assert ack.through == 1 and ack.rejected == (Rejection(2, "bad_signature"),)
    assert snapshot(db) == before
    logged = db.query("SELECT seq, reason, body FROM rejections")
    assert logged == [{"seq": 2, "reason": "bad_signature", "body": forged}]
    # the genuine seq 2 is still accepted afterwards
    assert ingest(db, rules, d.dev, batch(d.odometer(1))).through == 2


def test_tampered_record_is_refused(db: Database, rules: Any) -> None:
    d = Dongle()
    enroll(db, d)
    genuine = d.odometer(1, advance=False)
    head, body, sig = genuine.jws.split(".")
    payload = b64.decode(body).replace(b'"odo_m":5', b'"odo_m":9')
    assert payload != b64.decode(body)
    tampered = ".".join([head, b64.encode(payload), sig])
    flipped = genuine.jws[:-5] + ("A" if genuine.jws[-5] != "A" else "B") + genuine.jws[-4:]
    before = snapshot(db)
    ack = ingest(db, rules, d.dev, batch(tampered, flipped))
    assert ack.through == 0
    assert ack.rejected[0] == Rejection(1, "bad_signature")
    assert ack.rejected[1].reason in ("bad_signature", "bad_format")
    assert snapshot(db) == before
    assert ingest(db, rules, d.dev, batch(genuine)).through == 1


def test_record_on_another_devices_topic_is_refused(db: Database, rules: Any) -> None:
    a, b = Dongle(), Dongle(vin=fresh_vin())
    enroll(db, a)
    enroll(db, b)
    before = snapshot(db)
    ack = ingest(db, rules, b.dev, batch(a.odometer(1)))
    assert ack == Ack(0, (Rejection(1, "dev_mismatch"),), 0)
    assert snapshot(db) == before


def test_replay_is_a_no_op_and_never_credits_twice(db: Database, rules: Any) -> None:
    d = Dongle()
    enroll(db, d)
    body = batch(d.odometer(1), d.confirmation("2026-W39"))
    first = ingest(db, rules, d.dev, body)
    before = snapshot(db)
    assert ingest(db, rules, d.dev, body) == first == Ack(2, (), 10_000)
    assert snapshot(db) == before
    assert len(before["transfers"]) == 1


def test_fork_is_kept_as_evidence_and_reported(db: Database, rules: Any) -> None:
    d = Dongle()
    enroll(db, d)
    first = d.odometer(1)
    second = d.odometer(1)
    ingest(db, rules, d.dev, batch(first, second))
    before = snapshot(db)
    other = d.sign(d.payload("odometer", {"odo_m": d.odo_m + 5, "src": "obd"}, seq=2, prev=first.id),
                   advance=False)
    ack = ingest(db, rules, d.dev, batch(other))
    assert ack == Ack(2, (Rejection(2, "fork"),), 0)
    after = snapshot(db)
    assert after["forks"] == [{"dev": d.dev, "seq": 2, "record_id": other.id}]
    del after["forks"], before["forks"]
    assert after == before
    assert ingest(db, rules, d.dev, batch(other)).rejected == (Rejection(2, "fork"),)
    assert len(snapshot(db)["forks"]) == 1


def test_chain_break_takes_its_seq_and_the_chain_goes_on_from_it(db: Database, rules: Any) -> None:
    d = Dongle()
    enroll(db, d)
    ingest(db, rules, d.dev, batch(d.odometer(1)))
    broken = d.sign(d.payload("odometer", {"odo_m": d.odo_m + 1000, "src": "obd"}, prev="ab" * 32))
    after = d.odometer(2)
    ack = ingest(db, rules, d.dev, batch(broken, after))
    assert ack == Ack(3, (Rejection(2, "chain_break"),), 0)
    rows = db.query("SELECT seq, status, reason FROM records ORDER BY seq")
    assert rows[1] == {"seq": 2, "status": "rejected", "reason": "chain_break"}
    assert rows[2] == {"seq": 3, "status": "accepted", "reason": None}
    # only accepted records enter the transparency log
    translog.integrate_all(db)
    assert broken.id not in {r["ref"] for r in db.query("SELECT ref FROM translog")}
    # a resent rejected record is a no-op that reports its verdict again
    assert ingest(db, rules, d.dev, batch(broken)).rejected == (Rejection(2, "chain_break"),)


def test_odometer_rollback_is_rejected(db: Database, rules: Any) -> None:
    d = Dongle()
    enroll(db, d)
    ingest(db, rules, d.dev, batch(d.odometer(10)))
    ack = ingest(db, rules, d.dev, batch(d.odometer(-5)))
    assert ack == Ack(2, (Rejection(2, "odometer_rollback"),), 0)
    # the next reading is measured against the last accepted one, not the rejected one
    ack = ingest(db, rules, d.dev, batch(d.odometer(6)))
    assert ack == Ack(3, (), 0)


def test_small_step_back_of_a_derived_figure_is_not_a_rollback(db: Database, rules: Any) -> None:
    d = Dongle()
    enroll(db, d)
    ingest(db, rules, d.dev, batch(d.odometer(3, src="derived")))
    assert ingest(db, rules, d.dev, batch(d.odometer(-1.5, src="derived"))) == Ack(2, (), 0)


def test_implausible_distance_is_rejected(db: Database, rules: Any) -> None:
    d = Dongle()
    enroll(db, d)
    ingest(db, rules, d.dev, batch(d.odometer(1)))
    fast = d.odometer(100, dt_ms=60_000)                    # 100 km in one minute
    ack = ingest(db, rules, d.dev, batch(fast))
    assert ack == Ack(2, (Rejection(2, "implausible_distance"),), 0)
    assert db.one("SELECT status, reason FROM records WHERE seq = 2") == {
        "status": "rejected", "reason": "implausible_distance"}


def test_unsynced_clocks_across_boots_are_not_judged_for_speed(db: Database, rules: Any) -> None:
    d = Dongle()
    enroll(db, d)
    ingest(db, rules, d.dev, batch(d.odometer(1, clock="unsynced")))
    d.boot, d.mono, d.t = "boot-2", 5_000, T0          # rebooted, clock back at its default
    assert ingest(db, rules, d.dev, batch(d.odometer(80, clock="unsynced"))) == Ack(2, (), 0)


def test_vin_mismatch_waits_then_is_accepted_after_approval(db: Database, rules: Any) -> None:
    d = Dongle()
    enroll(db, d)
    ingest(db, rules, d.dev, batch(d.odometer(1)))
    before = snapshot(db)
    moved = [d.odometer(1, vin=OTHER_VIN), d.odometer(1, vin=OTHER_VIN)]
    ack = ingest(db, rules, d.dev, batch(*moved))
    assert ack == Ack(1, (Rejection(2, "vin_mismatch"),), 0)
    after = snapshot(db)
    assert after["devices"][0]["flagged_vin"] == OTHER_VIN
    assert after["records"] == before["records"] and after["translog"] == before["translog"]
    devices.approve(db, d.dev, NOW, "test")
    assert db.one("SELECT vin, flagged_vin FROM devices") == {"vin": OTHER_VIN, "flagged_vin": None}
    assert ingest(db, rules, d.dev, batch(*moved)) == Ack(3, (), 0)


def test_unknown_device_then_approved_gets_the_same_records_accepted(db: Database, rules: Any) -> None:
    d = Dongle()
    recs = [d.odometer(1), d.odometer(1)]
    before = snapshot(db)
    ack = ingest(db, rules, d.dev, batch(*recs))
    assert ack == Ack(0, (Rejection(1, "unknown_device"), Rejection(2, "unknown_device")), None)
    assert snapshot(db) == before
    enroll(db, d, approved=False)                           # pending is not approved
    assert ingest(db, rules, d.dev, batch(*recs)).rejected[0] == Rejection(1, "unknown_device")
    devices.approve(db, d.dev, NOW, "test")
    assert ingest(db, rules, d.dev, batch(*recs)) == Ack(2, (), 0)


def test_revoked_device_is_refused(db: Database, rules: Any) -> None:
    d = Dongle()
    enroll(db, d)
    devices.revoke(db, d.dev, NOW, "test")
    before = snapshot(db)
    assert ingest(db, rules, d.dev, batch(d.odometer(1))) == Ack(0, (Rejection(1, "revoked_device"),), 0)
    assert snapshot(db) == before


def test_gap_is_not_acknowledged(db: Database, rules: Any) -> None:
    d = Dongle()
    enroll(db, d)
    first, second, third = d.odometer(1), d.odometer(1), d.odometer(1)
    assert ingest(db, rules, d.dev, batch(first, third)) == Ack(1, (), 0)
    assert db.one("SELECT COUNT(*) AS n FROM records") == {"n": 1}
    assert ingest(db, rules, d.dev, batch(second, third)) == Ack(3, (), 0)


def test_malformed_batch_and_records(db: Database, rules: Any) -> None:
    d = Dongle()
    enroll(db, d)
    before = snapshot(db)
    assert ingest(db, rules, d.dev, b"{not json") == Ack(0, (Rejection(None, "bad_format"),), 0)
    assert ingest(db, rules, d.dev, batch("not-a-jws")) == Ack(0, (Rejection(None, "bad_format"),), 0)
    assert snapshot(db) == before
    assert db.one("SELECT COUNT(*) AS n FROM rejections WHERE reason = 'bad_format'") == {"n": 2}
    # the same refusal again is not logged twice
    ingest(db, rules, d.dev, batch("not-a-jws"))
    assert db.one("SELECT COUNT(*) AS n FROM rejections WHERE reason = 'bad_format'") == {"n": 2}


def test_unsynced_times_are_estimated_never_1970(db: Database, rules: Any) -> None:
    d = Dongle()
    enroll(db, d)
    d.t = 0                                                  # a Pi without RTC
    early = d.odometer(1, clock="unsynced", dt_ms=1_000)
    later_t = T0 + 3_600_000
    d.t = later_t - 60_000                                   # the clock syncs one minute later
    synced = d.odometer(1, clock="synced")
    ingest(db, rules, d.dev, batch(early, synced))
    rows = {r["seq"]: r["t_est"] for r in db.query("SELECT seq, t_est FROM records")}
    assert rows[2] == later_t
    assert rows[1] == later_t - 60_000                       # anchored on the synced record, by mono_ms
    # unsynced, no anchor, but the batch tells the device's monotonic clock now
    d.boot, d.mono, d.t = "boot-2", 1_000, 0
    lone = d.odometer(1, clock="unsynced")
    ingest(db, rules, d.dev, batch(lone, boot="boot-2", mono_ms=d.mono + 30_000))
    assert db.one("SELECT t_est FROM records WHERE seq = 3") == {"t_est": NOW - 30_000}
    # nothing at all to go by: the arrival time
    d.boot, d.t = "boot-3", 5
    ingest(db, rules, d.dev, batch(d.odometer(1, clock="unsynced")))
    assert db.one("SELECT t_est FROM records WHERE seq = 4") == {"t_est": NOW}


def test_status_messages_are_kept(db: Database, rules: Any) -> None:
    d = Dongle()
    enroll(db, d)
    assert devices.update_status(db, d.dev, messages.encode_status(t=T0, backlog=7, last_seq=9), NOW)
    assert devices.list_devices(db)[0]["backlog"] == 7 and devices.list_devices(db)[0]["online"]
    assert devices.update_status(db, d.dev, messages.OFFLINE, NOW + 1)
    row = devices.list_devices(db)[0]
    assert (row["online"], row["backlog"], row["last_seen"]) == (False, 7, NOW + 1)
    assert devices.fleet_gauges(db) == FleetFigures(0, 7, log_queued=2)    # its enrolment and approval
    assert not devices.update_status(db, Dongle().dev, messages.encode_status(), NOW)
    assert not devices.update_status(db, d.dev, b'{"online": "yes"}', NOW)


def test_duplicates_and_forks_within_one_batch(db: Database, rules: Any) -> None:
    d = Dongle()
    enroll(db, d)
    first = d.odometer(1)
    old = d.odometer(1)
    ingest(db, rules, d.dev, batch(first, old))
    third = d.odometer(1)
    twin = d.sign(d.payload("odometer", {"odo_m": d.odo_m + 7, "src": "obd"}, seq=3, prev=old.id),
                  advance=False)
    ack = ingest(db, rules, d.dev, batch(first, old, third, third, twin, old))
    assert ack == Ack(3, (Rejection(3, "fork"),), 0)
    assert [r["seq"] for r in db.query("SELECT seq FROM records ORDER BY seq")] == [1, 2, 3]
    assert db.query("SELECT seq, record_id FROM forks") == [{"seq": 3, "record_id": twin.id}]

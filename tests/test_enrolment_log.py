"""Enrolments without secrets, and every enrolment and decision on a device as an entry of the
transparency log (on SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from backend.db import Database
from backend.errors import DeviceInputError
from backend.ledger.rules import load_rules
from backend.records import device_log, devices, enrollment, store
from backend.transparency import translog
from protocol import b64, canonical, jws, messages
from sim.devices import FLEET_TOKEN, RULES, T0, Dongle, batch, enroll, fresh_vin

NOW = T0 + 1000
SECRET = "fleet-token-that-must-never-be-stored"
TABLES = ("devices", "records", "rejections", "evidence_budget", "settings", "translog", "translog_queue",
          "device_log",
          "fleet_tokens", "forks", "transfers")


def handle(db: Database, d: Dongle, token: str | None, configured: str | None = FLEET_TOKEN, *,
           now: int = NOW, t: int = T0) -> enrollment.Answer:
    return enrollment.handle(db, d.dev, d.enroll_message(token, t), now, configured)


def everything(db: Database) -> dict[str, list[dict[str, Any]]]:
    return {table: db.query(f"SELECT * FROM {table}") for table in TABLES}


def leaves(db: Database) -> list[dict[str, Any]]:
    """Every entry of the log (once the sequencer has integrated what is stored), parsed when
    it is a JSON entry."""
    translog.integrate_all(db)
    out = []
    for row in db.query("SELECT idx, entry_kind, entry FROM translog ORDER BY idx"):
        data = bytes(row["entry"])
        if row["entry_kind"] in ("enrolment", "decision", "rules"):
            obj = json.loads(data)
            assert canonical.dumps(obj) == data                       # canonical JSON, as the spec says
            out.append({"idx": row["idx"], "kind": row["entry_kind"], **obj})
        else:
            out.append({"idx": row["idx"], "kind": row["entry_kind"]})
    return out


def decisions(db: Database, since: int = 0) -> list[dict[str, Any]]:
    return [e for e in leaves(db) if e["kind"] == "decision" and e["idx"] >= since]


def _index(db: Database, ref: str | None) -> int:
    """The leaf index of the entry stored under ``ref`` (integrated first)."""
    assert ref is not None
    translog.integrate_all(db)
    with db.read() as tx:
        idx = translog.leaf_index(tx, ref)
    assert idx is not None
    return idx


def size(db: Database) -> int:
    translog.integrate_all(db)
    with db.read() as tx:
        return translog.size(tx)


def old_form(d: Dongle, token: str) -> str:
    """An enrolment signed the old way, with the fleet token inside the signed payload."""
    payload = {"v": 1, "dev": d.dev, "pub": b64.encode(d.key.public.raw), "vin": d.vin,
               "fleet_token": token, "t": T0}
    return jws.sign(canonical.dumps(payload), d.key, d.dev)


def sqlite_bytes(db_url: str) -> bytes:
    path = Path(db_url.removeprefix("sqlite:///"))
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


# -- the message and what is stored ----------------------------------------------------------

def test_the_old_form_is_refused_with_its_reason_and_leaves_no_trace(
        db: Database, db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    d = Dongle()
    before = everything(db)
    bare = old_form(d, SECRET).encode("ascii")
    wrapped = messages.encode_enroll(old_form(d, SECRET), SECRET)
    for body in (bare, wrapped, messages.sign_enrollment(d.key, d.vin, T0).encode("ascii")):
        answer = enrollment.handle(db, d.dev, body, NOW, SECRET)
        assert answer.status == "rejected" and "old form" in (answer.reason or ""), answer
        assert '"fleet_token"' in (answer.reason or "") and SECRET not in (answer.reason or "")
    assert everything(db) == before                   # no device, no evidence, no leaf, no setting
    assert SECRET not in caplog.text
    if db_url.startswith("sqlite"):
        assert SECRET.encode() not in sqlite_bytes(db_url)


def test_a_refused_enrolment_that_holds_a_token_leaves_no_trace(db: Database, db_url: str,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    d, other = Dongle(), Dongle()
    token, _ = enrollment.add_token(db, "workshop", NOW)
    before = everything(db)
    refused = [
        messages.encode_enroll(other.enrollment(), token),                 # on another device's topic
        messages.encode_enroll(d.enrollment()[:-4] + "AAAA", token),       # a broken signature
        json.dumps({"enrolment": d.enrollment(), "fleet_token": token, "x": 1}).encode(),
        json.dumps({"enrolment": "garbage", "fleet_token": token}).encode(),
    ]
    for body in refused:
        assert enrollment.handle(db, d.dev, body, NOW, SECRET).status == "rejected"
    assert everything(db) == before
    assert token not in caplog.text and SECRET not in caplog.text
    if db_url.startswith("sqlite"):
        assert token.encode() not in sqlite_bytes(db_url)


def test_the_stored_enrolment_holds_no_token(db: Database, db_url: str) -> None:
    stored_token, _ = enrollment.add_token(db, "workshop", NOW)
    approved, by_stored, pending = Dongle(), Dongle(), Dongle()
    assert handle(db, approved, SECRET, configured=SECRET).status == "approved"
    assert handle(db, by_stored, stored_token, configured=SECRET).status == "approved"
    assert handle(db, pending, "a-wrong-token-of-some-length", configured=SECRET).status == "pending"
    for d in (approved, by_stored, pending):
        row = db.one("SELECT enrollment FROM devices WHERE dev = ?", (d.dev,))
        assert row is not None and row["enrollment"] == d.enrollment()
        payload = json.loads(b64.decode(row["enrollment"].split(".")[1]))
        assert set(payload) == {"v", "dev", "pub", "vin", "t"}
    dumped = json.dumps(everything(db), default=lambda v: bytes(v).hex())
    for secret in (SECRET, stored_token, "a-wrong-token-of-some-length"):
        assert secret not in dumped
        if db_url.startswith("sqlite"):
            assert secret.encode() not in sqlite_bytes(db_url)
    shown = [devices.get_device(db, d.dev)["enrollment"]["fleet_token_approved"]
             for d in (approved, by_stored, pending)]
    assert shown == [True, True, False]


# -- log entries -----------------------------------------------------------------------------

def test_an_enrolment_is_logged_once_and_an_approval_by_token_is_a_decision(db: Database) -> None:
    d = Dongle()
    assert handle(db, d, FLEET_TOKEN).status == "approved"
    got = leaves(db)
    assert got == [
        {"idx": 0, "kind": "enrolment", "entry": "enrolment", "enrolment": d.enrollment(), "at": NOW},
        {"idx": 1, "kind": "decision", "entry": "decision", "action": "approve", "dev": d.dev, "vin": d.vin,
         "by": "fleet-token", "at": NOW, "replaces": None},
    ]
    assert FLEET_TOKEN not in json.dumps(got)
    # the same message again, later, and a new enrolment of the approved device: no new leaf
    assert handle(db, d, FLEET_TOKEN, now=NOW + 5).status == "approved"
    assert handle(db, d, FLEET_TOKEN, now=NOW + 6, t=T0 + 6).status == "approved"
    assert size(db) == 2


def test_a_pending_device_logs_each_new_enrolment_once(db: Database) -> None:
    d = Dongle()
    assert handle(db, d, None).status == "pending"
    assert handle(db, d, None, now=NOW + 1).status == "pending"           # a replay: the same leaf
    assert size(db) == 1
    assert handle(db, d, None, now=NOW + 2, t=T0 + 2).status == "pending"  # a new signed enrolment
    got = leaves(db)
    assert [(e["kind"], e["at"]) for e in got] == [("enrolment", NOW), ("enrolment", NOW + 2)]
    assert got[1]["enrolment"] == d.enrollment(T0 + 2)
    again = messages.verify_enrollment(d.enrollment(T0 + 2))
    assert db.one("SELECT COUNT(*) AS n FROM device_log") == {"n": 2}
    with db.write() as tx:
        ref = device_log.log_enrolment(tx, again, NOW + 99)
    with db.read() as tx:
        assert translog.leaf_index(tx, ref) == 1
    assert size(db) == 2 and db.one("SELECT COUNT(*) AS n FROM device_log") == {"n": 2}


def test_every_decision_path_appends_one_decision_entry(db: Database, rules: Any) -> None:
    first = Dongle()
    enroll(db, first)                                                     # approve by fleet-token
    assert [(e["action"], e["by"]) for e in decisions(db)] == [("approve", "fleet-token")]
    store.process_batch(db, rules, first.dev, batch(first.odometer(2)), NOW)
    # a second dongle of the same car waits; approve --replace retires the first
    second = Dongle(vin=first.vin, odo_m=1_000_000)
    enroll(db, second, approved=False)
    mark = size(db)
    devices.approve(db, second.dev, NOW + 10, "operator:ann", replace=True)
    assert decisions(db, mark) == [
        {"idx": mark, "kind": "decision", "entry": "decision", "action": "retire", "dev": first.dev,
         "vin": first.vin, "by": "operator:ann", "at": NOW + 10, "replaces": None},
        {"idx": mark + 1, "kind": "decision", "entry": "decision", "action": "approve", "dev": second.dev,
         "vin": first.vin, "by": "operator:ann", "at": NOW + 10, "replaces": first.dev},
    ]
    # a rollback holds the second; clearing it is a decision (and logs the rules credited by)
    store.process_batch(db, rules, second.dev, batch(second.odometer(1)), NOW + 20)
    assert devices.get_device(db, second.dev)["held_since"] is not None
    mark = size(db)
    devices.clear(db, rules, second.dev, NOW + 30, "cli:root")
    assert [(e["action"], e["dev"], e["vin"], e["by"], e["at"]) for e in decisions(db, mark)] == [
        ("clear", second.dev, first.vin, "cli:root", NOW + 30)]
    mark = size(db)
    devices.revoke(db, second.dev, NOW + 40, "api")
    assert [(e["action"], e["dev"], e["vin"], e["by"], e["at"], e["replaces"]) for e in decisions(db, mark)] \
        == [("revoke", second.dev, first.vin, "api", NOW + 40, None)]
    # a plain approve of a pending device without a VIN
    loose = Dongle(vin=None)
    enroll(db, loose, approved=False)
    mark = size(db)
    devices.approve(db, loose.dev, NOW + 50, "operator:bo")
    assert [(e["action"], e["dev"], e["vin"], e["replaces"]) for e in decisions(db, mark)] == [
        ("approve", loose.dev, None, None)]
    # the index names each one
    kinds = db.query("SELECT d.kind, d.action FROM device_log d JOIN translog t ON t.ref = d.ref "
                     "WHERE d.dev = ? ORDER BY t.idx", (second.dev,))
    assert [(r["kind"], r["action"]) for r in kinds] == [
        ("enrolment", None), ("decision", "approve"), ("decision", "clear"), ("decision", "revoke")]


def test_a_refused_decision_logs_nothing(db: Database) -> None:
    d = Dongle()
    enroll(db, d, approved=False)
    mark = size(db)
    with pytest.raises(DeviceInputError, match="1 to 200 characters"):
        devices.approve(db, d.dev, NOW, "x" * 201)
    with pytest.raises(DeviceInputError, match="control character"):
        devices.revoke(db, d.dev, NOW, "ann\nroot")
    other = Dongle(vin=d.vin)
    enroll(db, other)                                                     # the vehicle's active device
    mark = size(db)
    with pytest.raises(DeviceInputError, match=other.dev):
        devices.approve(db, d.dev, NOW, "ann")
    assert size(db) == mark and db.one("SELECT status FROM devices WHERE dev = ?", (d.dev,)) == {
        "status": "pending"}
    with db.write() as tx, pytest.raises(ValueError, match="action"):
        device_log.log_decision(tx, "delete", d.dev, None, "ann", NOW)


def test_entries_for_vin_cover_every_device_the_vehicle_has_had(db: Database, rules: Any) -> None:
    vin, elsewhere = fresh_vin(), fresh_vin()
    first = Dongle(vin=vin)
    enroll(db, first)
    store.process_batch(db, rules, first.dev, batch(first.odometer(2)), NOW)
    # a replacement dongle
    second = Dongle(vin=vin)
    enroll(db, second, approved=False)
    devices.approve(db, second.dev, NOW + 1, "ann", replace=True)
    # a dongle enrolled in another car, flagged when it read this VIN, then approved for it
    moved = Dongle(vin=elsewhere)
    enroll(db, moved)
    store.process_batch(db, rules, moved.dev, batch(moved.odometer(1, vin=vin)), NOW + 2)
    assert devices.get_device(db, moved.dev)["flagged_vin"] == vin
    devices.revoke(db, second.dev, NOW + 3, "ann")
    devices.approve(db, moved.dev, NOW + 4, "ann")
    # a dongle enrolled with no VIN that signed an accepted record about this one
    loose = Dongle(vin=None, odo_m=60_000_000)
    enroll(db, loose, approved=False)
    devices.revoke(db, moved.dev, NOW + 5, "ann")
    devices.approve(db, loose.dev, NOW + 6, "ann")
    ack = store.process_batch(db, rules, loose.dev, batch(loose.odometer(1, vin=vin)), NOW + 7).ack
    assert ack.through == 1 and ack.rejected == ()
    assert db.one("SELECT COUNT(*) AS n FROM device_log WHERE dev = ? AND vin IS NOT NULL", (loose.dev,)) == {
        "n": 0}                                                           # only its record names the VIN
    # another car's dongle, and one that never came near this VIN
    stranger = Dongle(vin=elsewhere)
    enroll(db, stranger, approved=False)
    devices.approve(db, stranger.dev, NOW + 8, "ann")
    translog.integrate_all(db)
    with db.read() as tx:
        got = device_log.entries_for_vin(tx, vin)
        theirs = device_log.entries_for_vin(tx, elsewhere)
    by_dev: dict[str, list[int]] = {}
    for e in leaves(db):
        if e["kind"] in ("enrolment", "decision"):
            dev = e.get("dev") or messages.verify_enrollment(e["enrolment"]).dev
            by_dev.setdefault(dev, []).append(e["idx"])
    assert got == sorted(i for d in (first, second, moved, loose) for i in by_dev[d.dev])
    assert not set(got) & set(by_dev[stranger.dev])
    assert theirs == sorted(by_dev[moved.dev] + by_dev[stranger.dev])   # it enrolled there
    with db.read() as tx:
        assert device_log.entries_for_vin(tx, fresh_vin()) == []
        with pytest.raises(ValueError, match="not a VIN"):
            device_log.entries_for_vin(tx, "nope")


def test_a_rules_version_is_logged_once(db: Database, tmp_path: Path) -> None:
    rules = load_rules(_write(tmp_path / "a.toml", RULES))
    assert rules.text == RULES
    with db.write() as tx:
        first = device_log.log_rules_of(tx, rules, NOW)
        assert device_log.log_rules_of(tx, rules, NOW + 1) == first
    with db.write() as tx:                                               # as a later run of the backend
        assert device_log.log_rules_of(tx, load_rules(tmp_path / "a.toml"), NOW + 2) == first
    entry = [e for e in leaves(db) if e["kind"] == "rules"]
    assert entry == [{"idx": _index(db, first), "kind": "rules", "entry": "rules", "version": "test-2026",
                      "sha256": hashlib.sha256((tmp_path / "a.toml").read_bytes()).hexdigest(),
                      "text": RULES, "at": NOW}]
    # the same version with another file is another entry; one too large keeps no text
    edited = RULES + "# edited\n"
    huge = RULES + "#" + "x" * 70_000 + "\n"
    with db.write() as tx:
        second = device_log.log_rules(tx, "test-2026", edited, NOW + 3)
        third = device_log.log_rules(tx, "test-2026", huge, NOW + 4)
        assert device_log.log_rules(tx, "test-2026", huge, NOW + 5) == third
    got = {e["idx"]: e for e in leaves(db)}
    second, third = _index(db, second), _index(db, third)
    assert got[second]["text"] == edited and "text" not in got[third]
    assert got[third]["sha256"] == hashlib.sha256(huge.encode()).hexdigest()
    # rules that were not read from a file are not logged
    from backend.ledger.rules import Rules

    with db.write() as tx:
        assert device_log.log_rules_of(tx, Rules("v1", 100, (), {}), NOW) is None
    assert size(db) == 3


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path

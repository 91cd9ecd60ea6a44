"""Enrolment decisions and fleet tokens, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from backend.config import parse_time
from backend.db import Database
from backend.errors import UsageError
from backend.records import devices, enrollment
from backend.records.enrollment import Answer
from protocol import messages
from protocol.identity import SigningKey
from sim.devices import FLEET_TOKEN, T0, VIN, Dongle, fresh_vin

NOW = T0 + 1000


def handle(db: Database, d: Dongle, token: str | None, configured: str | None = FLEET_TOKEN,
           now: int = NOW) -> Answer:
    return enrollment.handle(db, d.dev, d.enroll_message(token), now, configured)


def test_configured_token_approves_at_once(db: Database) -> None:
    d = Dongle(vin=VIN)
    assert handle(db, d, FLEET_TOKEN) == Answer(d.dev, "approved", None)
    row = db.one("SELECT status, vin, pub, decided_by FROM devices WHERE dev = ?", (d.dev,))
    assert row is not None and row["status"] == "approved" and row["vin"] == VIN
    assert bytes(row["pub"]) == d.key.public.raw and row["decided_by"] == "fleet-token"
    assert messages.decode_enrolled(Answer(d.dev, "approved").encode()) == ("approved", None)


def test_without_a_valid_token_the_device_waits_for_an_operator(db: Database) -> None:
    d, e = Dongle(), Dongle()
    assert handle(db, d, None).status == "pending"
    wrong = handle(db, e, "not-the-token")
    assert wrong.status == "pending" and "fleet token" in (wrong.reason or "")
    assert handle(db, d, None, configured=None).status == "pending"
    devices.approve(db, d.dev, NOW + 5, "cli:test")
    assert handle(db, d, None) == Answer(d.dev, "approved", None)
    decided = enrollment.decided_since(db, NOW)
    assert [(a.dev, a.status, t) for a, t in decided] == [(d.dev, "approved", NOW + 5)]


def test_pending_device_enrolling_again_with_a_token_is_approved(db: Database) -> None:
    d = Dongle()
    assert handle(db, d, None).status == "pending"
    assert handle(db, d, FLEET_TOKEN).status == "approved"


def test_known_device_gets_its_status_back(db: Database) -> None:
    d = Dongle()
    handle(db, d, FLEET_TOKEN)
    devices.revoke(db, d.dev, NOW, "cli:test")
    answer = handle(db, d, FLEET_TOKEN)
    assert answer.status == "rejected" and "revoked" in (answer.reason or "")
    assert db.one("SELECT status FROM devices") == {"status": "revoked"}


def test_stored_tokens_hash_expiry_and_uses(db: Database) -> None:
    token, row = enrollment.add_token(db, "workshop A", NOW, expires_at=NOW + 60_000, max_uses=2)
    assert row.uses == 0 and row.max_uses == 2
    stored = db.query("SELECT token_hash FROM fleet_tokens")
    assert stored == [{"token_hash": enrollment.token_hash(token)}] and token not in str(stored)
    first, second, third = (Dongle(vin=fresh_vin()) for _ in range(3))
    assert handle(db, first, token, configured=None).status == "approved"
    assert handle(db, second, token, configured=None).status == "approved"
    assert handle(db, third, token, configured=None).status == "pending"          # used up
    assert enrollment.list_tokens(db)[0].uses == 2
    late_token, _ = enrollment.add_token(db, "workshop B", NOW, expires_at=NOW + 10)
    expired = handle(db, Dongle(vin=fresh_vin()), late_token, configured=None, now=NOW + 10)
    assert expired.status == "pending"
    used = db.one("SELECT fleet_token_id FROM devices WHERE dev = ?", (first.dev,))
    assert used == {"fleet_token_id": row.id}


def test_bad_token_input_is_refused(db: Database) -> None:
    for kwargs, text in (({"max_uses": 0}, "--max-uses"), ({"expires_at": NOW - 1}, "--expires")):
        with pytest.raises(ValueError, match=text):
            enrollment.add_token(db, "x", NOW, **kwargs)
    with pytest.raises(ValueError, match="--label"):
        enrollment.add_token(db, "  ", NOW)
    assert parse_time("2026-12-31", "--expires") == 1_798_675_200_000
    assert parse_time("2026-12-31T01:00:00+01:00", "--expires") == 1_798_675_200_000
    with pytest.raises(UsageError, match="ISO 8601"):
        parse_time("next tuesday", "--expires")


def test_forged_or_misplaced_enrolments_are_rejected(db: Database) -> None:
    a, b = Dongle(), Dongle()
    # b's enrolment published on a's topic
    answer = enrollment.handle(db, a.dev, b.enroll_message(), NOW, FLEET_TOKEN)
    assert answer.dev == a.dev and answer.status == "rejected"
    # a tampered enrolment (signature no longer matches)
    head, body, sig = a.enrollment().split(".")
    tampered = messages.encode_enroll(".".join([head, body, sig[:-2] + ("AA" if sig[-2:] != "AA" else "BA")]),
                                      FLEET_TOKEN)
    assert enrollment.handle(db, a.dev, tampered, NOW, FLEET_TOKEN).status == "rejected"
    assert enrollment.handle(db, a.dev, b"garbage", NOW, FLEET_TOKEN).status == "rejected"
    assert db.query("SELECT dev FROM devices") == []
    # once a is enrolled, a bad message on its topic returns its status and changes nothing
    handle(db, a, FLEET_TOKEN)
    assert enrollment.handle(db, a.dev, b"garbage", NOW, FLEET_TOKEN) == Answer(a.dev, "approved", None)


def test_another_key_never_takes_over_a_device_id(db: Database) -> None:
    d = Dongle()
    handle(db, d, FLEET_TOKEN)
    other = SigningKey.generate().public.raw
    with db.write() as tx:               # as if another key had enrolled under this id first
        tx.execute("UPDATE devices SET pub = ? WHERE dev = ?", (other, d.dev))
    answer = handle(db, d, FLEET_TOKEN)
    assert answer.status == "rejected" and "another key" in (answer.reason or "")
    assert bytes(db.one("SELECT pub FROM devices")["pub"]) == other  # type: ignore[index]


def test_watermark_only_moves_forward(db: Database) -> None:
    assert enrollment.load_watermark(db) == 0
    enrollment.save_watermark(db, 500)
    enrollment.save_watermark(db, 400)
    assert enrollment.load_watermark(db) == 500

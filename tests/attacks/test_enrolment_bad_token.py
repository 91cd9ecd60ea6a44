"""Attack: enrolling a dongle of one's own with a fleet token that should not let it in: a wrong
one, one past its expiry, one already used as often as it may be. None approves: the device
waits for an operator, told why without the token being echoed, the enrolment is kept (and
logged) for the operator to judge, and its records are refused. A good token beside it still
approves its device at once."""

from __future__ import annotations

from typing import Any

import pytest

from backend.db import Database
from backend.records import enrollment
from sim.devices import Dongle
from tests.attacks.support import NOW, Target, added, reasons
from tests.backend_helpers import snapshot

HOUR = 3_600_000


def enrol(db: Database, device: Dongle, token: str | None, now: int = NOW) -> enrollment.Answer:
    """``device``'s enrolment message with ``token`` beside it, as the ingest hands it over (no
    fleet token is configured: only the stored ones approve)."""
    return enrollment.handle(db, device.dev, device.enroll_message(token), now, None)


def token_named(db: Database, label: str) -> str:
    """The token of a kind of bad: wrong (never made), expired, used up."""
    if label == "wrong":
        enrollment.add_token(db, "workshop", NOW)
        return "odo-ft-" + "x" * 32
    if label == "expired":
        return enrollment.add_token(db, "workshop", NOW - 2 * HOUR, expires_at=NOW - HOUR)[0]
    token, _ = enrollment.add_token(db, "workshop", NOW - HOUR, max_uses=1)
    assert enrol(db, Dongle(), token, NOW - HOUR).status == "approved"       # its one use
    return token


@pytest.mark.parametrize("label", ["wrong", "expired", "used-up"])
def test_enrolment_with_a_bad_token(db: Database, rules: Any, label: str) -> None:
    backend = Target(db, rules)
    token = token_named(db, label)
    uses = [t.uses for t in enrollment.list_tokens(db)]
    intruder = Dongle()
    before = snapshot(db)

    answer = enrol(db, intruder, token)

    assert answer.status == "pending"
    assert answer.reason == "fleet token unknown, expired or used up; waiting for an operator"
    assert token not in str(db.query("SELECT * FROM devices")) + str(db.query("SELECT * FROM device_log"))
    assert [t.uses for t in enrollment.list_tokens(db)] == uses               # no use counted
    assert db.one("SELECT status, decided_by FROM devices WHERE dev = ?", (intruder.dev,)) == {
        "status": "pending", "decided_by": None}
    grown = added(before, snapshot(db))
    assert set(grown) == {"translog_queue"} and len(grown["translog_queue"]) == 1    # its enrolment, logged

    # what it sends is refused, and a second try with the same token changes nothing
    ack = backend.send(intruder, intruder.odometer(1))
    assert ack.through == 0 and reasons(ack) == [(1, "unknown_device")]
    waiting = snapshot(db)
    assert enrol(db, intruder, token).status == "pending"
    assert snapshot(db) == waiting

    # a device of the fleet with a good token is approved meanwhile
    good, _ = enrollment.add_token(db, "fitter", NOW)
    assert enrol(db, Dongle(), good).status == "approved"

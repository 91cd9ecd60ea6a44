"""Attack: a dongle moved to another car (or made to read another VIN) to earn in that car's
name. Its records that read another VIN than the one it is approved for are not stored: the
device is flagged with the VIN it now reads, the first of them is kept for operators, and an
operator cannot approve it there while that car has its own dongle, which goes on earning."""

from __future__ import annotations

from typing import Any

import pytest

from backend.db import Database
from backend.errors import DeviceInputError
from backend.records import devices
from sim.devices import Dongle, enroll
from tests.attacks.support import NOW, Target, added, device_row, reasons, rejections
from tests.backend_helpers import snapshot


def test_vin_swap(db: Database, rules: Any) -> None:
    backend = Target(db, rules)
    mine, theirs = Dongle(), Dongle()
    enroll(db, mine)
    enroll(db, theirs)
    assert backend.send(mine, mine.odometer(1)).through == 1
    before = snapshot(db)

    home = mine.vin
    mine.vin = theirs.vin                                         # now plugged into their car
    moved = [mine.odometer(1), mine.confirmation("2026-W39")]
    ack = backend.send(mine, *moved)

    assert ack.through == 1 and reasons(ack) == [(2, "vin_mismatch")] and ack.balance == 0
    flagged = device_row(db, mine)
    assert (flagged["vin"], flagged["flagged_vin"], flagged["through"]) == (home, theirs.vin, 1)
    assert added(before, snapshot(db)) == {}                      # nothing stored, logged or credited
    kept = rejections(db, mine)
    assert [(r["seq"], r["reason"], r["body"]) for r in kept] == [(2, "vin_mismatch", moved[0].jws)]
    assert backend.counted("rejected", "vin_mismatch") == 1
    assert devices.get_device(db, mine.dev)["flagged_vin"] == theirs.vin

    # approving it for the car it reads now would take that car from its own dongle: refused
    with pytest.raises(DeviceInputError, match=theirs.dev):
        devices.approve(db, mine.dev, NOW, "cli:ops")
    assert device_row(db, mine)["status"] == "approved" and device_row(db, mine)["vin"] == home

    # their car's own dongle earns its week as if nothing had happened
    assert backend.send(theirs, theirs.odometer(1), theirs.confirmation("2026-W39")).balance == 10_000

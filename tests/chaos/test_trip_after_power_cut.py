"""A trip the agent closes only when it starts again after a power cut (agent/trips.py: a restored
trip whose last "on" sample is older than the off debounce ended while the agent was away, as the
chaos week's agents, killed at random, often do) is signed long after its ``end_t``. The backend
judges it against the vehicle's readings over the trip's own times, not over the same span ending
when it was signed, which would count the trip's own readings as taken before it: a genuine trip
refused as ``trip_mismatch``, its distance never credited."""

from __future__ import annotations

from typing import Any

import pytest

from backend.db import Database
from backend.ledger import audit
from backend.records import store
from sim.devices import Dongle, batch, enroll

MINUTE = 60_000


@pytest.mark.parametrize("signed_after_ms", [30_000, 6 * 3_600_000])    # the off debounce; the next morning
def test_a_trip_signed_after_a_power_cut_is_judged_over_its_own_times(db: Database, rules: Any,
                                                                       signed_after_ms: int) -> None:
    d = Dongle()
    enroll(db, d)
    start_t, start_odo = d.t + MINUTE, d.odo_m
    drive = [d.odometer(0), *(d.odometer(2) for _ in range(5))]         # 10 km in 5 minutes, one a minute
    end_t, end_odo = d.t, d.odo_m
    fields = {"start_t": start_t, "end_t": end_t, "start_odo_m": start_odo, "end_odo_m": end_odo,
              "max_kph": 120, "src": "obd"}
    trip = d.sign(d.payload("trip", fields, dt_ms=signed_after_ms))
    now = d.t + MINUTE
    ack = store.process_batch(db, rules, d.dev, batch(*drive, trip), now).ack
    assert ack.through == 7 and [(r.seq, r.reason) for r in ack.rejected] == []
    credited = db.query("SELECT amount FROM transfers WHERE key = ?", (f"reward:distance:{d.vin}:{trip.id}",))
    assert credited == [{"amount": 100}]                                  # 10 km × 10 milli-tokens
    assert audit.audit(db, rules) == []
    # a trip that does disagree with the readings over its times is refused all the same
    d.t = end_t + MINUTE
    late = {"start_t": start_t, "end_t": end_t, "start_odo_m": start_odo - 5_000, "end_odo_m": end_odo,
            "max_kph": 120, "src": "obd"}
    ack = store.process_batch(db, rules, d.dev, batch(d.sign(d.payload("trip", late, dt_ms=signed_after_ms))),
                              now + MINUTE).ack
    assert [(r.seq, r.reason) for r in ack.rejected] == [(8, "trip_mismatch")]

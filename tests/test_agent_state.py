"""The outbox's state table through agent.state: what earlier versions stored reads, and writes
back byte for byte."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from agent import state
from agent.buffer import Outbox
from protocol.records import GENESIS

#: Values as the agent wrote them before agent.state existed (the dicts its modules built).
LEGACY: dict[str, object] = {
    "tip": {"seq": 7, "id": "ab" * 32},
    "ack": {"through": 5, "t": 1700000000000, "balance": 1500},
    "last_rejection": {"seq": 6, "reason": "unknown_device", "t": 1700000000001},
    "vin": "WVWZZZ1JZXW000001",
    "vehicle": {"v": 1, "adapter": "up", "odo_anchor_m": 10_000_000, "ign_on": 1, "trip_start_t": None},
    "live": {"odo_m": 10_000_500, "src": "obd", "ignition": True,
             "trip": {"start_t": 1, "start_odo_m": 10_000_000, "distance_m": 500, "max_kph": 50},
             "obd": "connected", "error": None, "t": 1700000000002},
    "clock_synced_boot": "0123456789abcdef",
    "confirm_applied": 4,
    "confirmed": {"odo_m": 12_345_600, "device_odo_m": 12_345_000, "week": "2026-W47", "t": 3},
    "confirmation_due": {"week": "2026-W48", "t": 4},
    "enrollment": {"status": "pending", "reason": None, "t": 5},
    "enroll_request": {"t": 6, "fleet_token": "secret"},
    "sync": {"state": "auth_refused", "refusal": "Not authorized", "t": 7},
    "claim_request": {"id": "cd" * 32, "jws": "a.b.c", "t": 8},
    "claim_answer": {"id": "cd" * 32, "status": "claimed", "reason": None, "driver": "alice",
                     "vin": "WVWZZZ1JZXW000001", "valid_from": 9, "t": 10},
}
KEYS = [state.TIP, state.ACK, state.LAST_REJECTION, state.VIN, state.VEHICLE, state.LIVE,
        state.CLOCK_SYNCED_BOOT, state.CONFIRM_APPLIED, state.CONFIRMED, state.CONFIRMATION_DUE,
        state.ENROLLMENT, state.ENROLL_REQUEST, state.SYNC, state.CLAIM_REQUEST, state.CLAIM_ANSWER]


def raw(path: Path) -> dict[str, str]:
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT key, value FROM state").fetchall())


def test_every_key_is_named_once() -> None:
    assert state.NAMES == set(LEGACY) == {k.name for k in KEYS}


def test_stored_values_read_and_write_back_byte_for_byte(tmp_path: Path) -> None:
    box = Outbox.open(tmp_path / "outbox.db")
    box.set_state(LEGACY)
    before = raw(tmp_path / "outbox.db")
    values = [(key, key.get(box)) for key in KEYS]
    for key, _ in values:
        box.set_state({key.name: None})
    for key, value in values:
        key.put(box, value)  # type: ignore[arg-type]
    assert raw(tmp_path / "outbox.db") == before
    assert state.LIVE.get(box) == state.Live(10_000_500, "obd", True, LEGACY["live"]["trip"],  # type: ignore[index]
                                             "connected", None, 1700000000002)
    assert box.tip() == (7, "ab" * 32) and box.counts().synced_through == 5
    assert "secret" not in repr(state.ENROLL_REQUEST.get(box))


def test_missing_keys_read_as_their_defaults(tmp_path: Path) -> None:
    box = Outbox.open(tmp_path / "outbox.db")
    assert state.TIP.get(box) == state.Tip(0, GENESIS)
    assert state.CONFIRM_APPLIED.get(box) == 0
    assert all(key.get(box) is None for key in KEYS if key not in (state.TIP, state.CONFIRM_APPLIED))
    box.set_state({"live": {"odo_m": 1, "obd": "connected", "t": 1}})  # written by hand (tests, older agents)
    live = state.LIVE.get(box)
    assert live is not None and live.odo_m == 1 and live.src is None and live.ignition is False

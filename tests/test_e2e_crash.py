"""The agent killed with SIGKILL mid-trip, again and again, and the broker and backend going
away for a while: the backend ends up with every record once, in seq order, all accepted,
and the agent's outbox tip is what the backend holds."""

from __future__ import annotations

import random
import time
from typing import Any

from agent.buffer import Outbox
from sim.stack import Car, CarSpec, Stack
from tests.e2e_support import wait_until

#: a record a second while moving, so that every short run has something to lose
SETTINGS = ('clock = "synced"\nresend_after_s = 1.0\n\n'
            "[vehicle]\nrecord_every_ms = 1000\nignition_on_debounce_ms = 0\n\n"
            "[power]\non_poll_s = 0.5\noff_poll_s = 0.5\n")
KILLS = 20


def _outbox_ids(car: Car) -> dict[int, str]:
    outbox = Outbox.open(car.state_dir / "outbox.db")
    try:
        return {r.seq: r.id for r in outbox.records(0, limit=1_000_000)}
    finally:
        outbox.close()


def _check_complete(stack: Stack, car: Car) -> list[dict[str, Any]]:
    """Run the agent until the backend holds every record its outbox held; check the chain.

    The simulated car keeps driving, so the agent may sign another record between the
    backlog reaching 0 and its stop: every record present at a stop must reach the backend
    on the next run, with the same id, in seq order."""
    if car.agent is None:
        stack.start_agent(car)
    wait_until("the backlog sent", lambda: stack.status(car)["backlog"] == 0, timeout=40)
    stack.stop_agent(car)
    held = _outbox_ids(car)
    assert sorted(held) == list(range(1, len(held) + 1)), "a gap in the agent's own outbox"
    stack.start_agent(car)
    recs: list[dict[str, Any]] = wait_until(
        f"the backend to hold seq {len(held)}",
        lambda: (r := stack.api(f"/api/devices/{car.dev}/records")) and len(r) >= len(held) and r,
        timeout=40)
    stack.stop_agent(car)
    seqs = [r["seq"] for r in recs]
    assert seqs == list(range(1, len(recs) + 1)), "a gap or a duplicate in the backend's chain"
    assert len({r["id"] for r in recs}) == len(recs)
    assert [(r["seq"], r["reason"]) for r in recs if r["status"] != "accepted"] == []
    assert {r["seq"]: r["id"] for r in recs if r["seq"] in held} == held
    now = _outbox_ids(car)
    assert {seq: now[seq] for seq in held} == held, "the outbox changed a record it had already signed"
    device = next(d for d in stack.api("/api/devices") if d["dev"] == car.dev)
    assert device["rejected"] == 0 and device["accepted"] >= len(held)
    return recs


def _adapter_opens(car: Car) -> int:
    log = car.state_dir.parent / "logs" / f"agent-{car.name}.log"
    return log.read_text().count("OBD adapter open") if log.exists() else 0


def test_agent_killed_mid_trip_twenty_times(stack: Stack) -> None:
    rng = random.Random(20261122)
    # a serial adapter: the emulator's TCP server sometimes stays silent to a new client
    # after the old one was killed mid-query, which no real serial line does
    car = stack.add_car(CarSpec("WP0ZZZ99ZTS390021", 61_000.0, transport="pty"), settings=SETTINGS)
    stack.start_agent(car)
    assert stack.enroll(car).returncode == 0
    tips = []
    for _ in range(KILLS):
        stack.stop_agent(car, kill=True)
        tips.append(stack.status(car)["last_seq"])
        opened = _adapter_opens(car)
        stack.start_agent(car)
        # the 1-3 s of recording start once the adapter is open (the start itself takes ~1-2 s)
        wait_until("the adapter open", lambda n=opened: _adapter_opens(car) > n, timeout=20, every=0.05)
        time.sleep(rng.uniform(1.0, 3.0))
    stack.stop_agent(car, kill=True)
    assert tips[-1] > tips[0] + KILLS / 2, f"too few records written between kills: {tips}"
    recs = _check_complete(stack, car)
    assert len(recs) >= tips[-1]


def test_broker_and_backend_down_for_a_while(stack: Stack) -> None:
    car = stack.add_car(CarSpec("WVWZZZ1JZXW000022", 72_000.0), settings=SETTINGS)
    stack.start_agent(car)
    assert stack.enroll(car).returncode == 0
    time.sleep(2)
    stack.stop_broker()                       # the network goes away: records pile up on the agent
    wait_until("records waiting on the agent", lambda: stack.status(car)["backlog"] >= 3, timeout=30)
    stack.stop_agent(car, kill=True)          # and the power is cut meanwhile
    stack.start_agent(car)
    time.sleep(2)
    stack.start_broker()                      # back on the same port
    stack.stop_backend()                      # but the backend is down for a while
    time.sleep(4)
    stack.start_backend()
    _check_complete(stack, car)

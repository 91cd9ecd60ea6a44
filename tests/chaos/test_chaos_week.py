"""A simulated week of faults on real processes, and nothing lost, doubled or rewritten.

Five cars (ELM327 emulators whose days are compressed: each drive and park takes seconds, so a
week of seven passes in about a minute), each with its ``odo-agent``, send through mosquitto to
two ``odo-backend run`` processes sharing one PostgreSQL database. At seeded random moments
(the seed is printed; ``ODO_CHAOS_SEED`` replays the schedule): the agents are SIGKILLed and
restarted, mosquitto is killed or stopped and started again on its port (no persistent store:
the sessions and messages in flight go with it), a backend is SIGKILLed inside a write
transaction (seen in ``pg_stat_activity``) and started again while the other carries on, and
the holder of the log's sequencer lock is SIGKILLed while it integrates queued entries. The
drivers confirm their mileage twice in the week.

Then the cars park for good, the agents drain their outboxes, and:

- every record each agent signed (its outbox) is in the backend once, under its seq, with its
  id and bytes, accepted, its signature and its link to the one before holding, and nothing else
  is there (no gap, no duplicate, no fork);
- every reward is credited once (one transfer per key, one weekly credit per vehicle and week
  confirmed, one distance credit per trip at most), and ``odo-backend rewards audit`` finds no
  difference;
- every checkpoint the backends stored or served during the run is a prefix of the final tree
  (a consistency proof from the log's HTTP tiles), the final tree is the hash of the entries it
  serves, and every record and transfer is in it once (with an inclusion proof for each record).

``ODO_CHAOS_LONG=1`` runs a longer week: more cars, longer days, more faults.
"""

from __future__ import annotations

import os
import random
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from backend.db import Database
from backend.ledger.accounts import Transfer
from backend.transparency import translog
from protocol import BadFormat, checkpoint, merkle, records
from protocol.identity import VerifyKey
from protocol.records import GENESIS
from sim.stack import Car, CarSpec, Stack
from tests.chaos.chaos_support import Chaos, Counts, HttpLog, Plan, outbox_progress, outbox_records
from tests.e2e_support import left_running, wait_until

CI = Plan(cars=5, days=7, drive_s=5.0, park_s=2.5, agent_kills=55, broker_restarts=11, backend_kills=10,
          sequencer_kills=2)
LONG = Plan(cars=10, days=7, drive_s=25.0, park_s=5.0, agent_kills=300, broker_restarts=40, backend_kills=40,
            sequencer_kills=6, confirmations_per_car=3)
#: a record a second while moving; a trip ends a second after the engine stops
SETTINGS = ('clock = "synced"\nresend_after_s = 1.0\n\n'
            "[vehicle]\nrecord_every_ms = 1000\nignition_on_debounce_ms = 0\n"
            "ignition_off_debounce_ms = 1000\n\n"
            "[power]\non_poll_s = 0.5\noff_poll_s = 0.5\n")
WEEKLY, DISTANCE = "weekly-confirmation", "distance"


def _plan() -> Plan:
    return LONG if os.environ.get("ODO_CHAOS_LONG", "") not in ("", "0") else CI


def _seed() -> int:
    given = os.environ.get("ODO_CHAOS_SEED", "")
    return int(given) if given.isdigit() else random.SystemRandom().randrange(1, 10**9)


def _scalar(db: Database, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> Any:
    row = db.one(sql, params)
    assert row is not None
    return next(iter(row.values()))


def _held(db: Database, car: Car) -> int:
    return int(_scalar(db, "SELECT COALESCE(MAX(seq), 0) AS n FROM records WHERE dev = ?", (car.dev,)))


def _holds(db: Database, car: Car, seq: int) -> Callable[[], bool]:
    return lambda: _held(db, car) >= seq


def _drain(stack: Stack, db: Database, counts: Counts) -> None:
    """Park the cars for good (their emulators stop: the agents sign nothing new), let the agents
    send what they hold, then stop them; an agent whose outbox holds more than the backend then is
    started once more until it does."""
    for car in stack.cars:
        assert car.sim is not None
        stack.stop_process(car.sim)

    def delivered(car: Car) -> bool:
        tip, unsynced = outbox_progress(car)
        return unsynced == 0 and _held(db, car) >= tip

    wait_until(f"every outbox delivered ({counts})", lambda: all(delivered(c) for c in stack.cars),
               timeout=120, every=0.5)
    for car in stack.cars:
        for _ in range(3):
            stack.stop_agent(car)
            tip = outbox_progress(car)[0]
            if _held(db, car) >= tip:
                break
            stack.start_agent(car)
            wait_until(f"{car.name}'s seq {tip} in the backend ({counts})", _holds(db, car, tip), timeout=60)
        else:
            raise AssertionError(f"{car.name}'s agent signs again each time it starts ({counts})")


def _check_records(db: Database, car: Car, counts: Counts) -> list[dict[str, Any]]:
    """The backend holds exactly what the car's agent signed; the accepted rows, by seq."""
    signed = outbox_records(car)
    assert [s.seq for s in signed] == list(range(1, len(signed) + 1)), \
        f"{car.name}: a gap in the agent's own outbox ({counts})"
    rows = db.query("SELECT seq, id, jws, kind, status, reason FROM records WHERE dev = ? ORDER BY seq",
                    (car.dev,))
    seqs = [int(r["seq"]) for r in rows]
    assert seqs == list(range(1, len(rows) + 1)), \
        f"{car.name}: a gap or a duplicate in the backend's chain {seqs} ({counts})"
    lost = [s.seq for s in signed if s.seq > len(rows)]
    assert not lost, f"{car.name}: signed records missing from the backend: seqs {lost} ({counts})"
    assert len(rows) == len(signed), f"{car.name}: the backend holds {len(rows)} records, the agent signed " \
                                     f"{len(signed)} ({counts})"
    differ = [s.seq for s, r in zip(signed, rows, strict=True) if (s.id, s.jws) != (r["id"], r["jws"])]
    assert not differ, f"{car.name}: records stored with another id or other bytes: seqs {differ} ({counts})"
    refused = [(r["seq"], r["status"], r["reason"]) for r in rows if r["status"] != "accepted"]
    assert not refused, f"{car.name}: records not accepted: {refused} ({counts})"
    pub = _scalar(db, "SELECT pub FROM devices WHERE dev = ?", (car.dev,))
    key = VerifyKey(bytes(pub))
    prev = GENESIS
    for r in rows:
        rec = records.verify(str(r["jws"]), key)
        assert (rec.seq, rec.id, rec.prev) == (r["seq"], r["id"], prev), \
            f"{car.name}: the chain breaks at seq {r['seq']} ({counts})"
        prev = rec.id
    forks = _scalar(db, "SELECT COUNT(*) AS n FROM forks WHERE dev = ?", (car.dev,))
    assert forks == 0, f"{car.name}: {forks} record(s) signed again under a seq already used ({counts})"
    return rows


def _check_rewards(stack: Stack, db: Database, counts: Counts) -> None:
    transfers = db.query("SELECT * FROM transfers ORDER BY id")
    keys = Counter(str(t["key"]) for t in transfers)
    assert [k for k, n in keys.items() if n > 1] == [], f"transfer keys used twice ({counts})"
    rewards = [t for t in transfers if str(t["key"]).startswith("reward:")]
    counts.rewards = len(rewards)
    weekly = Counter((str(t["key"]).split(":")[2], t["week"]) for t in rewards if t["rule_id"] == WEEKLY)
    assert [k for k, n in weekly.items() if n > 1] == [], f"a week credited twice: {weekly} ({counts})"
    confirmed = {(str(r["vin"]), _payload(str(r["jws"]))["week"]) for r in db.query(
        "SELECT vin, jws FROM records WHERE kind = 'confirmation' AND status = 'accepted'")}
    assert set(weekly) == confirmed, \
        f"weeks confirmed {sorted(confirmed)}, credited {sorted(weekly)} ({counts})"
    trips = {str(r["id"]) for r in db.query(
        "SELECT id FROM records WHERE kind = 'trip' AND status = 'accepted'")}
    per_trip = Counter(str(t["record_id"]) for t in rewards if t["rule_id"] == DISTANCE)
    assert [k for k, n in per_trip.items() if n > 1 or k not in trips] == [], \
        f"distance credited twice, or for no accepted trip ({counts})"
    done = stack.backend_cli("rewards", "audit", timeout=120)
    assert done.returncode == 0, f"rewards audit: {done.stdout}{done.stderr} ({counts})"


def _payload(compact: str) -> dict[str, Any]:
    return records.read_payload(records.open_unverified(compact))


def _check_log(stack: Stack, db: Database, served: list[bytes], counts: Counts) -> None:
    def settled() -> bool:
        with db.read() as tx:
            queued, size = translog.queued(tx), translog.size(tx)
        latest = db.one("SELECT MAX(size) AS n FROM log_checkpoints")
        return queued == 0 and latest is not None and latest["n"] == size

    wait_until(f"every entry integrated and checkpointed ({counts})", settled, timeout=60)
    log = HttpLog(stack.api_url)
    verifier = translog.verifier(db)
    latest = checkpoint.open_note(log.checkpoint(), verifier)
    counts.log_size = latest.size
    tree = log.tree(latest.size)
    entries = log.entries(latest.size)
    assert merkle.root([merkle.leaf_hash(e) for e in entries]) == tree.root() == latest.root, \
        f"the log's entries, tiles and checkpoint disagree ({counts})"
    at = {e: i for i, e in enumerate(entries)}
    assert len(at) == len(entries), f"an entry twice in the log ({counts})"
    stored = db.query("SELECT size, root, note FROM log_checkpoints ORDER BY size")
    notes = [(str(r["note"]).encode(), bytes(r["root"])) for r in stored] + [(n, None) for n in served]
    for note, root in notes:
        old = checkpoint.open_note(note, verifier)
        assert root is None or old.root == root, f"checkpoint {old.size}: its note and row differ ({counts})"
        assert old.size <= latest.size, \
            f"a checkpoint of {old.size} entries beyond the log's {latest.size} ({counts})"
        proof = tree.consistency_proof(old.size) if 0 < old.size < latest.size else []
        try:
            checkpoint.verify_consistency(old, latest, proof)
        except BadFormat as exc:
            raise AssertionError(f"the checkpoint of {old.size} entries is not a prefix of the log: {exc} "
                                 f"({counts})") from None
        counts.checkpoints_verified += 1
        counts.checkpoints_served += root is None
    for r in db.query("SELECT id, jws FROM records WHERE status = 'accepted' ORDER BY dev, seq"):
        entry = str(r["jws"]).encode("ascii")
        assert entry in at, f"record {r['id']} is not in the log ({counts})"
        try:
            checkpoint.verify_inclusion(latest, at[entry], entry, tree.inclusion_proof(at[entry]))
        except BadFormat as exc:
            raise AssertionError(f"record {r['id']}: {exc} ({counts})") from None
    for t in db.query("SELECT * FROM transfers"):
        assert Transfer.from_row(t).entry() in at, f"transfer {t['key']} is not in the log ({counts})"


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)   # the production database
def test_a_week_of_kills_and_restarts_loses_and_doubles_nothing(db_url: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    plan = _plan()
    counts = Counts(_seed())
    with capsys.disabled():
        print(f"\nchaos: seed {counts.seed} (ODO_CHAOS_SEED={counts.seed} replays the schedule), {plan}")
    db = Database.open(db_url)
    try:
        with Stack(tmp_path / "stack", db_url=db_url, agent_settings=SETTINGS) as stack:
            stack.start_broker()
            stack.start_backend()
            chaos = Chaos(stack, plan, counts, db_url, second_id=f"odo-backend-chaos-{uuid.uuid4().hex[:8]}")
            chaos.start_second()
            for n in range(plan.cars):
                spec = CarSpec(f"WP0ZZZ99ZTS{n + 1:06d}", 20_000.0 + 1_000 * n, drive_s=plan.drive_s,
                               park_s=plan.park_s, transport="pty")
                car = stack.add_car(spec)
                stack.start_agent(car)
            devs = [car.dev for car in stack.cars]
            wait_until("every device approved", lambda: _scalar(
                db, f"SELECT COUNT(*) AS n FROM devices WHERE status = 'approved' AND dev IN "
                f"({', '.join('?' for _ in devs)})", devs) == len(devs), timeout=60)
            chaos.run()
            _drain(stack, db, counts)
            for car in stack.cars:
                counts.records += len(_check_records(db, car, counts))
            _check_rewards(stack, db, counts)
            _check_log(stack, db, chaos.served, counts)
            assert counts.agent_kills >= 50 and counts.broker_restarts >= 10, str(counts)
            assert counts.backend_kills >= 10 and counts.sequencer_kills >= 1, str(counts)
            assert counts.confirmations >= plan.cars and counts.rewards >= plan.cars, str(counts)
        with capsys.disabled():
            print(f"chaos: {counts}")
    finally:
        db.close()
    assert left_running(tmp_path) == []

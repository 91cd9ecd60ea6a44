from __future__ import annotations

import copy
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import backend.cli as backend_cli
from backend.db import Database
from backend.ledger import accounts, assignments, audit, rewards
from backend.ledger.rules import parse
from protocol.records import iso_week
from tests.ledger_support import DAY, MONDAY, RULES_DOC, WEEK, Car, make_rules, open_db

RULES = make_rules()


def _balance(db: Database, account: str) -> int:
    with db.read() as tx:
        return accounts.balance(tx, account)


def _keys(db: Database) -> list[str]:
    return [r["key"] for r in db.query("SELECT key FROM transfers ORDER BY id")]


def test_weekly_confirmation_once_per_week(db_url: str) -> None:
    db = open_db(db_url)
    car = Car(db)
    first = car.confirm(MONDAY)
    made = car.store(first)
    assert [(t.key, t.amount, t.to_account, t.rules_version, t.week) for t in made] == [
        (f"reward:weekly-confirmation:{car.vin}:2026-W02", 10000, f"unassigned:{car.dev}", "test-1",
         "2026-W02")]
    assert car.redeliver(first) == []                       # redelivered: no second credit
    assert car.store(car.confirm(MONDAY + 2 * DAY)) == []    # a second confirmation that week
    assert _balance(db, f"unassigned:{car.dev}") == 10000
    assert len(car.store(car.confirm(MONDAY + WEEK))) == 1   # the next week earns again
    assert _balance(db, f"unassigned:{car.dev}") == 20000
    db.close()


def test_confirmation_week_must_match_its_time(db_url: str) -> None:
    db = open_db(db_url)
    car = Car(db)
    assert car.store(car.confirm(MONDAY, week="2026-W05")) == []         # three weeks ahead
    late = car.store(car.confirm(MONDAY + 2 * DAY, week="2026-W01"))      # last week's, a day late: fine
    assert [t.week for t in late] == ["2026-W01"]
    db.close()


def test_tolerance_between_the_driver_and_the_device(db_url: str) -> None:
    db = open_db(db_url)
    car = Car(db)
    assert car.store(car.confirm(MONDAY, odo_m=car.odo_m + 2001)) == []
    assert car.store(car.confirm(MONDAY + DAY, odo_m=car.odo_m - 2001)) == []
    assert len(car.store(car.confirm(MONDAY + 2 * DAY, odo_m=car.odo_m - 2000))) == 1
    other = Car(db)                       # no device figure: nothing to compare with
    assert len(other.store(other.confirm(MONDAY, odo_m=123, device_odo_m=None))) == 1
    db.close()


def test_distance_is_floored_and_capped_per_week(db_url: str) -> None:
    db = open_db(db_url)
    car = Car(db)
    assert car.store(car.trip(MONDAY - 3 * 3600_000, 5000)) == []   # no reading before it: its claim alone
    car.store(car.odometer(MONDAY - 2 * 3600_000))
    assert [t.amount for t in car.store(car.trip(MONDAY, 1999))] == [19]           # 1.999 km × 10
    assert [t.amount for t in car.store(car.trip(MONDAY + 3600_000, 300_000))] == [3000]
    capped = car.store(car.trip(MONDAY + 2 * 3600_000, 300_000))
    assert [t.amount for t in capped] == [5000 - 19 - 3000] and "capped" in (capped[0].memo or "")
    assert car.store(car.trip(MONDAY + 3 * 3600_000, 300_000)) == []               # cap reached
    assert [t.amount for t in car.store(car.trip(MONDAY + WEEK, 100_000))] == [1000]  # a new week
    other = Car(db)                                                               # the cap is per vehicle
    other.store(other.odometer(MONDAY - 2 * 3600_000))
    assert [t.amount for t in other.store(other.trip(MONDAY, 100_000))] == [1000]
    trip = car.trip(MONDAY + WEEK + 1, 1000)
    car.store(trip)
    assert car.redeliver(trip) == []
    assert _balance(db, f"unassigned:{car.dev}") == 5000 + 1000 + 10
    db.close()


def test_streak_for_each_run_of_consecutive_weeks(db_url: str) -> None:
    db = open_db(db_url)
    car = Car(db)
    streaks = []
    for week in (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12):      # a gap at week 8
        made = car.store(car.confirm(MONDAY + week * WEEK))
        streaks += [t.week for t in made if t.rule_id == "streak"]
    assert streaks == [iso_week(MONDAY + 3 * WEEK), iso_week(MONDAY + 7 * WEEK), iso_week(MONDAY + 12 * WEEK)]
    assert _balance(db, f"unassigned:{car.dev}") == 12 * 10000 + 3 * 20000
    db.close()


def test_the_assigned_driver_gets_the_reward(db_url: str) -> None:
    db = open_db(db_url)
    car = Car(db)
    assignments.add_driver(db, "alice", "Alice", 1)
    assert assignments.assign(db, "alice", car.vin or "", MONDAY, 1) == []
    before = car.store(car.confirm(MONDAY - DAY))
    after = car.store(car.confirm(MONDAY + WEEK))
    assert before[0].to_account == f"unassigned:{car.dev}"
    assert after[0].to_account == "driver:alice"
    # unsynced clock: the backend's estimate decides, not the device's 1970
    late = car.confirm(5000, clock="unsynced", week=iso_week(MONDAY + 2 * WEEK))
    assert car.store(late, t_est=MONDAY + 2 * WEEK)[0].to_account == "driver:alice"
    db.close()


def test_assignment_moves_unassigned_rewards(db_url: str) -> None:
    db = open_db(db_url)
    car = Car(db)
    other = Car(db, vin="WBA0THER000000002")
    early = car.store(car.confirm(MONDAY))                     # before the assignment's start
    waiting = car.store(car.confirm(MONDAY + WEEK)) + car.store(car.trip(MONDAY + WEEK + 1, 50_000))
    elsewhere = other.store(other.confirm(MONDAY + WEEK))
    assignments.add_driver(db, "alice", None, 1)
    moved = assignments.assign(db, "alice", car.vin or "", MONDAY + WEEK - DAY, MONDAY + 3 * WEEK)
    assert sorted(t.key for t in moved) == sorted(f"reassign:{t.key}" for t in waiting)
    assert all(t.from_account == f"unassigned:{car.dev}" and t.to_account == "driver:alice" for t in moved)
    assert _balance(db, "driver:alice") == 10000 + 500
    assert _balance(db, f"unassigned:{car.dev}") == early[0].amount
    assert _balance(db, f"unassigned:{other.dev}") == elsewhere[0].amount
    # a later driver of the same car: the earlier assignment ends, and nothing is moved twice
    assignments.add_driver(db, "bob", None, 1)
    assert assignments.assign(db, "bob", car.vin or "", MONDAY + 2 * WEEK, MONDAY + 3 * WEEK) == []
    assert car.store(car.confirm(MONDAY + 2 * WEEK + DAY))[0].to_account == "driver:bob"
    with pytest.raises(assignments.AssignmentError, match="--from must be later"):
        assignments.assign(db, "alice", car.vin or "", MONDAY + 2 * WEEK, MONDAY + 3 * WEEK)
    with pytest.raises(assignments.AssignmentError, match="no driver 'carol'"):
        assignments.assign(db, "carol", car.vin or "", MONDAY + 3 * WEEK, MONDAY + 3 * WEEK)
    listed = {d["id"]: d for d in assignments.drivers(db, MONDAY + 3 * WEEK)}
    assert listed["alice"]["assignments"][0]["to"] == MONDAY + 2 * WEEK
    assert listed["bob"]["assignments"][0]["current"] is True
    assert audit.audit(db, RULES) == []
    db.close()


def test_audit_finds_tampering(db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = open_db(db_url)
    car = Car(db)
    car.store(car.odometer(MONDAY - 2 * 3_600_000))
    for week in range(5):
        car.store(car.confirm(MONDAY + week * WEEK))
        car.store(car.trip(MONDAY + week * WEEK + 1, 80_000))
    assignments.add_driver(db, "alice", None, 1)
    assignments.assign(db, "alice", car.vin or "", MONDAY + 2 * WEEK, MONDAY + 6 * WEEK)
    assert audit.audit(db, RULES) == []
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text(RULES_TOML)
    argv = ["rewards", "audit", "--db", db_url, "--rules", str(rules_file)]
    assert backend_cli.main(argv) == 0
    assert "every credit matches" in capsys.readouterr().out
    key = f"reward:distance:{car.vin}:"
    with db.write() as tx:
        tx.execute("UPDATE transfers SET amount = amount + 1 WHERE key LIKE ? AND week = ?",
                   (key + "%", iso_week(MONDAY)))
    problems = audit.audit(db, RULES)
    assert any(p.startswith(f"differs: {key}") and "amount is 801, expected 800" in p for p in problems)
    assert any(p.startswith("log: transfer reward:distance") for p in problems)
    assert backend_cli.main(argv) == 1
    assert "difference(s)" in capsys.readouterr().out
    db.close()


def test_audit_finds_missing_extra_and_misdirected_credits(db_url: str) -> None:
    db = open_db(db_url)
    car = Car(db)
    car.store(car.confirm(MONDAY))
    car.store(car.confirm(MONDAY + WEEK))
    with db.write() as tx:
        accounts.transfer(tx, key=f"reward:weekly-confirmation:{car.vin}:2025-W40", from_account="issuer",
                        to_account="driver:mallory", amount=10000, now_ms=1, rule_id="weekly-confirmation",
                        dev=car.dev, week="2025-W40", rules_version="test-1")
        tx.execute("DELETE FROM transfers WHERE key = ?", (f"reward:weekly-confirmation:{car.vin}:2026-W02",))
        tx.execute("UPDATE transfers SET to_account = 'driver:mallory' WHERE key = ?",
                   (f"reward:weekly-confirmation:{car.vin}:2026-W03",))
    problems = audit.audit(db, RULES)
    assert any(p.startswith("missing: ") and "2026-W02" in p for p in problems)
    assert any(p.startswith("unexpected: ") and "2025-W40" in p for p in problems)
    assert any("2026-W03: went to driver:mallory" in p for p in problems)
    # another rules version: every credit made under the old one is named
    doc = copy.deepcopy(RULES_DOC)
    doc["version"] = "test-2"
    assert any("rules version is test-1, expected test-2" in p for p in audit.audit(db, parse(doc)))
    db.close()


RULES_TOML = """
version = "test-1"
max_speed_kph = 250
[[rule]]
id = "weekly-confirmation"
on = "confirmation"
per = "week"
milli_tokens = 10000
tolerance_m = 2000
[[rule]]
id = "distance"
on = "trip"
milli_tokens_per_km = 10
cap_milli_tokens_per_week = 5000
[[rule]]
id = "streak"
on = "confirmation"
every_weeks = 4
milli_tokens = 20000
[[catalogue]]
item = "tyre-voucher"
milli_tokens = 500000
[[catalogue]]
item = "car-wash"
milli_tokens = 30000
"""


def test_rules_toml_matches_the_test_rules() -> None:
    import tomllib

    assert parse(tomllib.loads(RULES_TOML)) == parse(RULES_DOC)


# -- properties of the pure decisions ---------------------------------------------------------

def _pure_car() -> Car:
    car = Car(None, register=False)  # type: ignore[arg-type]
    return car


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.sampled_from(["confirm", "trip"]), st.integers(0, 400_000)),
                min_size=1, max_size=40))
def test_recomputed_rewards_keep_the_rules(events: list[tuple[int, str, int]]) -> None:
    car = _pure_car()
    readings = []
    for i, (week, kind, metres) in enumerate(sorted(events)):
        t = MONDAY + week * WEEK + i * 60_000
        record = car.confirm(t) if kind == "confirm" else car.trip(t, metres)
        readings.append(rewards.Reading(record, t, car.vin))
    expected = rewards.recompute(RULES, readings, [])
    per_week: dict[tuple[str, str], int] = {}
    for e in expected.values():
        per_week[(e.credit.rule_id, e.credit.week)] = per_week.get((e.credit.rule_id, e.credit.week), 0) + \
            e.credit.amount
        assert e.to_account == f"unassigned:{car.dev}" and e.credit.amount > 0
    confirmed = sorted({w for w, k, _ in events if k == "confirm"})
    for (rule_id, _week), total in per_week.items():
        assert total <= {"weekly-confirmation": 10000, "distance": 5000, "streak": 20000}[rule_id]
    assert sum(1 for e in expected.values() if e.credit.rule_id == "weekly-confirmation") == len(confirmed)
    runs, run = 0, 0
    for i, w in enumerate(confirmed):
        run = run + 1 if i and w == confirmed[i - 1] + 1 else 1
        if run == 4:
            runs, run = runs + 1, 0
    assert sum(1 for e in expected.values() if e.credit.rule_id == "streak") == runs
    # the same records recomputed again give the same credits (nothing depends on order of calls)
    assert rewards.recompute(RULES, list(reversed(readings)), []) == expected


def test_an_assignment_made_while_rewards_are_credited_misses_none(db_url: str) -> None:
    """Ingest (one connection) credits while an operator assigns the car (another connection):
    every reward for a reading after the assignment's start ends with the driver."""
    import threading

    db = open_db(db_url)
    car = Car(db)
    recs = [car.odometer(MONDAY - 2 * 3_600_000)]
    recs += [car.trip(MONDAY + i * 3_600_000, 10_000) for i in range(40)]
    operator = Database.open(db_url)
    assignments.add_driver(operator, "alice", None, 1)
    started = threading.Event()

    def assign() -> None:
        started.wait()
        try:
            assignments.assign(operator, "alice", car.vin or "", MONDAY - DAY, MONDAY)
        finally:
            operator.close()                                # this thread's connection

    thread = threading.Thread(target=assign)
    thread.start()
    for i, record in enumerate(recs):
        car.store(record)
        if i == 5:
            started.set()
    thread.join()
    operator.close()
    assert _balance(db, f"unassigned:{car.dev}") == 0
    assert _balance(db, "driver:alice") == 40 * 100          # 40 trips of 10 km
    assert audit.audit(db, RULES) == []
    db.close()


def test_a_weekly_rule_on_odometer_readings() -> None:
    doc = copy.deepcopy(RULES_DOC)
    doc["rule"] = [{"id": "connected", "on": "odometer", "per": "week", "milli_tokens": 500}]
    rules = parse(doc)
    car = _pure_car()
    readings = [rewards.Reading(car.odometer(t), t, car.vin)
                for t in (MONDAY, MONDAY + DAY, MONDAY + WEEK, MONDAY + 3 * WEEK)]
    readings.append(rewards.Reading(car.confirm(MONDAY + 4 * WEEK), MONDAY + 4 * WEEK, car.vin))
    expected = rewards.recompute(rules, readings, [])
    assert sorted(e.credit.week for e in expected.values()) == ["2026-W02", "2026-W03", "2026-W05"]
    assert {e.credit.amount for e in expected.values()} == {500}

"""Rules as versioned, published contracts (backend/ledger/contracts.py): publishing validates and
is idempotent; each credit is decided by the version in force at its reading time and names it;
the audit stays clean across rule changes; an unpublished edit changes nothing; a running ingest
sees a version published meanwhile. On SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backend import cli as backend_cli
from backend import service
from backend.db import Database
from backend.errors import ConfigError, RulesError
from backend.ledger import accounts, audit, contracts
from backend.ledger.rules import load_rules, loads
from backend.records.store import process_batch
from backend.web import auth
from protocol import messages
from protocol.records import Record
from sim.broker import Broker, quiet_broker
from tests.ledger_support import DAY, MONDAY, WEEK, Car, open_db
from tests.rules_support import SimClock, Wire, client_id, iso, rules_toml, start_ingest, write

V1_FROM = MONDAY - 4 * WEEK


@pytest.fixture
def own_broker() -> Iterator[Broker]:
    b = quiet_broker()
    yield b
    b.stop()


def _publish(db: Database, tmp_path: Path, text: str, now_ms: int) -> contracts.Published:
    path = write(tmp_path / f"rules-{hashlib.sha256(text.encode()).hexdigest()[:8]}.toml", text)
    return contracts.publish(db, load_rules(path), now_ms)


def _send(car: Car, recs: list[Record], now_ms: int) -> messages.Ack:
    """Through the ingest's storing path, with the database's rule book (as a running backend)."""
    return process_batch(car.db, contracts.load_book(car.db), car.dev,
                         messages.encode_batch([r.jws for r in recs]), now_ms).ack


def _week(car: Car, week: int) -> None:
    monday = MONDAY + week * WEEK
    _send(car, [car.trip(monday + DAY, 100_000), car.confirm(monday + 2 * DAY)], monday + 3 * DAY)


def _rewards(db: Database) -> dict[str, dict[str, Any]]:
    return {str(r["key"]): r for r in db.query("SELECT * FROM transfers WHERE key LIKE 'reward:%'")}


# -- effective_from ------------------------------------------------------------------------------

@pytest.mark.parametrize("value, message", [
    ("2027-01-01T00:00:00", "has no offset"),
    ("2027-01-01", "is a date or a time alone"),
    ("10:00:00", "is a date or a time alone"),
    ('"2027-01-01T00:00:00Z"', "not a string"),
    ("1969-12-31T23:59:59Z", "before 1970"),
    ("2027-01-01T00:00:00.0001Z", "finer than a millisecond"),
    ("20270101", "must be a datetime with an offset"),
])
def test_effective_from_must_be_a_datetime_with_an_offset(value: str, message: str) -> None:
    text = rules_toml("v1", None).replace("max_speed_kph", f"effective_from = {value}\nmax_speed_kph", 1)
    with pytest.raises(RulesError, match=f"effective_from: .*{message}"):
        loads(text, "r.toml")


def test_effective_from_is_read_as_unix_milliseconds() -> None:
    text = rules_toml("v1", None).replace("max_speed_kph", "effective_from = 2027-01-01T01:00:00+01:00\n"
                                                           "max_speed_kph", 1)
    assert loads(text).effective_from == 1798761600000          # 2027-01-01T00:00:00Z
    assert loads(rules_toml("v1", None)).effective_from is None  # still loadable without it


# -- publishing ----------------------------------------------------------------------------------

def test_publish_validates_refuses_rewriting_history_and_is_idempotent(
        db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def publish(path: Path) -> tuple[int, str]:
        status = backend_cli.main(["rules", "publish", str(path), "--db", db_url])
        out = capsys.readouterr()
        return status, out.out + out.err

    bad = write(tmp_path / "bad.toml", rules_toml("v1", V1_FROM).replace("milli_tokens_per_km = 10",
                                                                         "milli_tokens_per_km = 1.5"))
    status, said = publish(bad)
    assert status == 78 and "rule[1] (distance): milli_tokens_per_km: must be an integer, not a float" in said
    status, said = publish(write(tmp_path / "none.toml", rules_toml("v1", None)))
    assert status == 78 and "effective_from: missing" in said
    assert publish(tmp_path / "absent.toml")[0] == 2

    first = write(tmp_path / "v1.toml", rules_toml("v1", V1_FROM))
    digest = hashlib.sha256(first.read_bytes()).hexdigest()
    assert publish(first) == (0, f"published rules v1 (sha256 {digest}): in force from {iso(V1_FROM)}\n")
    status, said = publish(first)
    assert status == 0 and "were published already" in said and "nothing new" in said

    status, said = publish(write(tmp_path / "v1b.toml", rules_toml("v1", V1_FROM + WEEK, weekly=20000)))
    assert status == 78 and "version: 'v1' is already published with other content" in said
    now = int(time.time() * 1000)
    status, said = publish(write(tmp_path / "early.toml", rules_toml("v2", V1_FROM)))
    assert status == 78 and "must be later than that of every published version" in said
    later = now + 3600_000 - now % 1000
    second = write(tmp_path / "v2.toml", rules_toml("v2", later, weekly=15000))
    assert publish(second)[0] == 0

    assert backend_cli.main(["rules", "list", "--db", db_url, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(v["version"], v["effective_from"], v["sha256"], v["in_force"], v["upcoming"])
            for v in listed] == [
        ("v1", V1_FROM, digest, True, False),
        ("v2", later, hashlib.sha256(second.read_bytes()).hexdigest(), False, True)]
    assert all(v["published_at"] >= now - 60_000 for v in listed)
    assert backend_cli.main(["rules", "list", "--db", db_url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].endswith("in force") and lines[1].endswith("upcoming")
    db = open_db(db_url)
    try:
        logged = {str(r["ref"]): json.loads(bytes(r["entry"])) for table in ("translog", "translog_queue")
                  for r in db.query(f"SELECT ref, entry FROM {table} WHERE entry_kind = 'rules'")}
        assert set(logged) == {f"rules:{v['version']}:{v['sha256']}" for v in listed}
        assert logged[f"rules:v2:{listed[1]['sha256']}"]["text"] == second.read_text()
    finally:
        db.close()


def test_the_first_version_must_cover_the_readings_already_credited(db_url: str, tmp_path: Path) -> None:
    db = open_db(db_url)
    car = Car(db)
    car.store(car.confirm(MONDAY))                           # credited before any version was published
    with pytest.raises(contracts.PublishError, match="the first version must cover"):
        _publish(db, tmp_path, rules_toml("v1", MONDAY + 1000), MONDAY + DAY)
    legacy = load_rules(write(tmp_path / "legacy.toml", rules_toml("v1", None)))
    assert service._rule_book(db, legacy).book().versions[0].effective_from == 0   # run --rules FILE
    # a second file without effective_from cannot follow it
    with pytest.raises(ConfigError, match="effective_from: 1970-01-01T00:00:00Z must be later"):
        service._rule_book(db, load_rules(write(tmp_path / "v2.toml", rules_toml("v2", None))))
    assert [v.name for v in service._rule_book(db, None).book().versions] == ["v1"]
    db.close()


def test_run_without_rules_needs_a_published_version(db: Database) -> None:
    with pytest.raises(ConfigError, match="no rules version published"):
        service._rule_book(db, None)


# -- crediting -----------------------------------------------------------------------------------

def test_credits_across_a_version_change_use_its_name_and_hash(db_url: str, tmp_path: Path) -> None:
    db = open_db(db_url)
    v1 = _publish(db, tmp_path, rules_toml("v1", V1_FROM), MONDAY - 5 * WEEK).version
    car = Car(db)
    _send(car, [car.odometer(MONDAY - DAY)], MONDAY)
    for week in range(2):
        _week(car, week)
    with pytest.raises(contracts.PublishError, match="later than every accepted reading"):
        _publish(db, tmp_path, rules_toml("v2", MONDAY + WEEK), MONDAY + 2 * WEEK)
    v2 = _publish(db, tmp_path, rules_toml("v2", MONDAY + 3 * WEEK, weekly=15000, per_km=20),
                  MONDAY + 2 * WEEK).version
    for week in range(2, 5):
        _week(car, week)
    got = _rewards(db)
    weeks = {(r["rule_id"], r["week"]): (r["amount"], r["rules_version"], r["rules_sha256"])
             for r in got.values()}
    assert weeks[("weekly-confirmation", "2026-W04")] == (10000, "v1", v1.sha256)      # week 2: v1
    assert weeks[("weekly-confirmation", "2026-W05")] == (15000, "v2", v2.sha256)      # week 3: v2
    assert weeks[("distance", "2026-W04")] == (1000, "v1", v1.sha256)
    assert weeks[("distance", "2026-W06")] == (2000, "v2", v2.sha256)
    assert weeks[("streak", "2026-W05")] == (20000, "v2", v2.sha256)     # the run of weeks 0-3 closes in v2
    assert audit.audit(db) == []
    key = next(k for k, r in got.items() if r["rules_version"] == "v2")
    with db.write() as tx:
        tx.execute("UPDATE transfers SET rules_sha256 = ? WHERE key = ?", (v1.sha256, key))
    assert any(p.startswith(f"differs: {key}: rules sha256 is {v1.sha256}") for p in audit.audit(db))
    with db.write() as tx:
        tx.execute("UPDATE transfers SET rules_sha256 = NULL, rules_version = 'v1' WHERE key = ?", (key,))
    problems = audit.audit(db)
    assert any(f"{key}: rules version is v1, expected v2" in p for p in problems)
    assert any(f"{key}: no rules sha256" in p for p in problems)
    db.close()


def test_audit_is_clean_after_several_rule_changes(db_url: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    db = open_db(db_url)
    _publish(db, tmp_path, rules_toml("v1", V1_FROM), MONDAY - 5 * WEEK)
    changes = [(2, rules_toml("v2", MONDAY + 2 * WEEK, weekly=12000, every=3, streak=5000)),
               (4, rules_toml("v3", MONDAY + 4 * WEEK, per_km=30, cap=2500,
                              extra="reward_backfill_days = 0\nmax_clock_ahead_ms = 1000")),
               (6, rules_toml("v4", MONDAY + 6 * WEEK + 3 * DAY, weekly=8000, every=2, streak=1000))]
    cars = [Car(db), Car(db)]
    for car in cars:
        _send(car, [car.odometer(MONDAY - DAY)], MONDAY - DAY)
    for week in range(8):
        for start, text in changes:
            if start == week:
                _publish(db, tmp_path, text, MONDAY + week * WEEK - DAY)
        for i, car in enumerate(cars):
            recs = [car.trip(MONDAY + week * WEEK + DAY, 150_000 + i * 100_000)]
            if (week, i) != (3, 1):
                recs.append(car.confirm(MONDAY + week * WEEK + 4 * DAY))
            ack = _send(car, recs, MONDAY + week * WEEK + 5 * DAY)
            assert not ack.rejected
    versions = {r["rules_version"] for r in _rewards(db).values()}
    assert versions == {"v1", "v2", "v3", "v4"}
    assert audit.audit(db) == []
    # a file that was never published, given to the audit: noted, and the audit is the book's
    other = write(tmp_path / "other.toml", rules_toml("v9", None, weekly=1))
    assert backend_cli.main(["rewards", "audit", "--db", db_url, "--rules", str(other)]) == 0
    out = capsys.readouterr()
    assert "(version v9) is not published" in out.err
    assert "audit with rules v1, v2, v3, v4: every credit matches" in out.out
    assert backend_cli.main(["rewards", "audit", "--db", db_url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "differences": [],
                                                   "rules_versions": ["v1", "v2", "v3", "v4"]}
    with db.write() as tx:
        tx.execute("UPDATE transfers SET amount = amount + 1 WHERE rules_version = 'v3' "
                   "AND rule_id = 'distance'")
    assert backend_cli.main(["rewards", "audit", "--db", db_url]) == 1
    assert "amount is 2501, expected 2500" in capsys.readouterr().out
    db.close()


def test_changing_the_file_without_publishing_changes_no_credit(db_url: str, tmp_path: Path) -> None:
    db = open_db(db_url)
    path = write(tmp_path / "rules.toml", rules_toml("v1", V1_FROM))
    service._rule_book(db, load_rules(path))                    # run --rules FILE publishes it
    car = Car(db)
    _send(car, [car.odometer(MONDAY - DAY)], MONDAY)
    _send(car, [car.trip(MONDAY + DAY, 100_000), car.confirm(MONDAY + 2 * DAY)], MONDAY + 3 * DAY)
    before = _rewards(db)
    write(path, rules_toml("v1", V1_FROM, weekly=99000, per_km=99))   # edited, same version, not published
    _send(car, [car.trip(MONDAY + WEEK + DAY, 100_000), car.confirm(MONDAY + WEEK + 2 * DAY)],
          MONDAY + WEEK + 3 * DAY)
    after = _rewards(db)
    assert {k: after[k] for k in before} == before
    assert {r["amount"] for k, r in after.items() if k not in before} == {10000, 1000}
    with pytest.raises(ConfigError, match="'v1' is already published with other content"):
        service._rule_book(db, load_rules(path))                # and run --rules refuses it
    assert audit.audit(db) == []
    db.close()


def test_the_live_book_looks_for_new_versions_at_most_every_reload_s(db_url: str, tmp_path: Path) -> None:
    db = open_db(db_url)
    _publish(db, tmp_path, rules_toml("v1", V1_FROM), MONDAY)
    seconds = [100.0]
    live = contracts.LiveBook(db, reload_s=2.0, clock=lambda: seconds[0])
    queries: list[str] = []
    real_one = db.one

    def one(sql: str, params: Any = ()) -> Any:
        queries.append(sql)
        return real_one(sql, params)

    db.one = one  # type: ignore[method-assign]
    _publish(db, tmp_path, rules_toml("v2", MONDAY + WEEK), MONDAY)
    seconds[0] += 1.9
    assert [v.name for v in live.book().versions] == ["v1"] and queries == []
    seconds[0] += 0.2
    assert [v.name for v in live.book().versions] == ["v1", "v2"] and len(queries) == 1
    assert live.book().versions[1].effective_from == MONDAY + WEEK and len(queries) == 1
    db.close()


def test_a_version_may_start_in_the_past_until_a_reading_of_its_time_is_accepted(
        db_url: str, tmp_path: Path) -> None:
    """A contract signed late: its effective_from may lie before now, as long as no reading of
    its time was accepted yet; a batch of a running backend (a live book not reloaded since)
    credits by it at once, as the audit recomputes."""
    db = open_db(db_url)
    _publish(db, tmp_path, rules_toml("v1", V1_FROM), MONDAY)
    live = contracts.LiveBook(db, reload_s=3600.0)
    car = Car(db)
    now = MONDAY + 5 * WEEK
    process_batch(db, live, car.dev, messages.encode_batch([car.confirm(MONDAY + 2 * DAY).jws]), now)
    late = _publish(db, tmp_path, rules_toml("v2", MONDAY + 2 * WEEK, weekly=15000), now).version
    assert late.effective_from < now
    process_batch(db, live, car.dev, messages.encode_batch([car.confirm(MONDAY + 3 * WEEK).jws]), now)
    weekly = sorted((r["week"], r["amount"], r["rules_version"]) for r in _rewards(db).values()
                    if r["rule_id"] == "weekly-confirmation")
    assert weekly == [("2026-W02", 10000, "v1"), ("2026-W05", 15000, "v2")]
    with pytest.raises(contracts.PublishError, match="later than every accepted reading"):
        _publish(db, tmp_path, rules_toml("v3", MONDAY + 3 * WEEK - DAY), now)
    assert audit.audit(db) == []
    db.close()


def test_a_running_ingest_picks_up_a_newly_published_version(db_url: str, tmp_path: Path,
                                                             own_broker: Broker) -> None:
    db = open_db(db_url)
    _publish(db, tmp_path, rules_toml("v1", V1_FROM), MONDAY - 5 * WEEK)
    car = Car(db)
    clock = SimClock(MONDAY + 3 * DAY)
    ingest, _ = start_ingest(db_url, own_broker, clock, client_id())
    wire = Wire(own_broker, [car.dev])
    try:
        wire.send(car.dev, [car.odometer(MONDAY - DAY), car.confirm(MONDAY + 2 * DAY)])
        assert wire.wait_through(car.dev, 2)
        v2 = _publish(db, tmp_path, rules_toml("v2", MONDAY + WEEK, weekly=15000), clock.now).version
        clock.now = MONDAY + WEEK + 3 * DAY            # the next batch credits by v2 at once
        wire.send(car.dev, [car.confirm(MONDAY + WEEK + 2 * DAY)])
        assert wire.wait_through(car.dev, 3)
    finally:
        wire.close()
        ingest.stop()
    weekly = {r["week"]: (r["amount"], r["rules_version"], r["rules_sha256"]) for r in _rewards(db).values()}
    assert weekly == {"2026-W02": (10000, "v1", contracts.load_book(db).versions[0].sha256),
                      "2026-W03": (15000, "v2", v2.sha256)}
    with db.read() as tx:
        assert accounts.balance(tx, f"unassigned:{car.dev}") == 25000
    assert audit.audit(db) == []
    db.close()


def test_the_dashboard_lists_the_versions(db: Database, tmp_path: Path) -> None:
    from tests.test_dashboard import CSRF_RE, TestClient, make_app  # its TestClient, not collected here

    first = _publish(db, tmp_path, rules_toml("v1", V1_FROM), MONDAY - 5 * WEEK).version
    second = _publish(db, tmp_path, rules_toml("v2", MONDAY + WEEK), MONDAY).version
    auth.add_operator(db, "op", "correct horse battery", MONDAY)
    with TestClient(make_app(db, SimClock(MONDAY + DAY))) as client:       # type: ignore[arg-type]
        assert client.get("/rules", follow_redirects=False).headers["location"] == "/login?next=%2Frules"
        token = CSRF_RE.search(client.get("/login").text)
        assert token
        client.post("/login", data={"username": "op", "password": "correct horse battery",
                                    "csrf": token.group(1), "next": "/rules"})
        html = client.get("/rules").text
    assert 'href="/rules" aria-current="page"' in html
    rows = html.split("<tbody>")[1].split("</tr>")
    assert "v1" in rows[0] and "in force" in rows[0] and str(first.sha256) in rows[0]
    assert "2025-12-08T10:00:00Z" in rows[0] and "2025-12-01T10:00:00Z" in rows[0]   # from, published
    assert "v2" in rows[1] and "upcoming" in rows[1] and str(second.sha256) in rows[1]
    assert "2026-01-12T10:00:00Z" in rows[1]

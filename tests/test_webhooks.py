"""Webhooks end to end on SQLite and PostgreSQL: events made by the real ingest and ledger, found by
the watcher, POSTed to a real HTTP receiver on a loopback port, signed, retried, recorded, once."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import re
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import backend.cli as backend_cli
from backend.db import Database
from backend.errors import ConfigError
from backend.ledger import accounts, assignments
from backend.notify import webhooks
from backend.notify.config import EVENTS, NotifyConfig, Webhook, parse_webhooks
from backend.notify.events import HOUR_MS, Watcher
from backend.notify.runner import Deliverer, Notifier
from backend.records import store
from sim.devices import T0, Dongle, batch, enroll, fresh_vin
from tests.conftest import PG_URL, _drop_schema

SECRET = b"a-webhook-secret-of-some-length"
DAY = 24 * HOUR_MS
#: When the events happen (T0 is a Monday, 2026-09-21): the ingest of most devices, the redemption.
BUSY = T0 + 7 * DAY
#: When the watcher looks: after ISO week 2026-W39 (T0 to T0 + 7 d) and its grace of an hour.
LATER = BUSY + 2 * HOUR_MS


# -- a real receiver ------------------------------------------------------------------------------

@dataclass
class Receiver:
    url: str = ""
    fail_first: int = 0                 # answer 500 to this many requests, then 204
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(body) for _, body in self.got]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(min(length, 1 << 20))
            with state.lock:
                state.got.append(({k: v for k, v in self.headers.items()}, body))
                failing = len(state.got) <= state.fail_first
            self.send_response(500 if failing else 204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/odo?token=abc"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@dataclass
class Clock:
    now: int = LATER

    def __call__(self) -> int:
        return self.now


def config(url: str, events: frozenset[str] = frozenset(EVENTS)) -> NotifyConfig:
    return NotifyConfig((Webhook(url, SECRET, events),), silent_hours=24, confirmation_grace_hours=1)


# -- the six events, made by the backend itself ----------------------------------------------------

@dataclass
class Made:
    fork: str                  # the forking record's id
    rollback: str              # the held device
    vin_change: str            # the device that reads another VIN
    silent: str                # the device not seen since T0 + 1 d
    redemption: str            # the transfer key
    unconfirmed_vin: str       # assigned in W39, never confirmed


def make_events(db: Database, rules: Any) -> Made:
    # a fork: a second record for seq 2
    forked = Dongle()
    enroll(db, forked)
    first, second = forked.odometer(1), forked.odometer(1)
    store.process_batch(db, rules, forked.dev, batch(first, second), BUSY)
    other = forked.sign(forked.payload("odometer", {"odo_m": forked.odo_m + 5, "src": "obd"}, seq=2,
                                       prev=first.id), advance=False)
    store.process_batch(db, rules, forked.dev, batch(other), BUSY)
    # a rollback: the odometer goes back 3 km; the device is held
    rolled = Dongle()
    enroll(db, rolled)
    store.process_batch(db, rules, rolled.dev, batch(rolled.odometer(5), rolled.odometer(-3)), BUSY)
    # a VIN change: the dongle is now in another car
    moved = Dongle()
    enroll(db, moved)
    store.process_batch(db, rules, moved.dev, batch(moved.odometer(1), moved.odometer(1, vin=fresh_vin())),
                        BUSY)
    # a silent device: last seen at T0 + 1 d, silent for 24 h at T0 + 2 d
    silent = Dongle()
    enroll(db, silent)
    store.process_batch(db, rules, silent.dev, batch(silent.odometer(1)), T0 + DAY)
    # a redemption: alice drives a car, confirms W39 (10 tokens) and spends 1 on a car wash
    driven = Dongle(vin=fresh_vin())
    enroll(db, driven)
    assert driven.vin is not None
    assignments.add_driver(db, "alice", None, T0)
    assignments.assign(db, "alice", driven.vin, T0 - DAY, T0)
    store.process_batch(db, rules, driven.dev, batch(driven.odometer(1), driven.confirmation("2026-W39")),
                        BUSY)
    transfer = accounts.redeem(db, rules, "driver:alice", "car-wash", "order-1", BUSY)
    # an unconfirmed week: bob drives a car that never confirms W39
    quiet = Dongle()
    enroll(db, quiet)
    store.process_batch(db, rules, quiet.dev, batch(quiet.odometer(1)), BUSY)
    assert quiet.vin is not None
    assignments.add_driver(db, "bob", None, T0)
    assignments.assign(db, "bob", quiet.vin, T0 - DAY, T0)
    return Made(other.id, rolled.dev, moved.dev, silent.dev, transfer.key, quiet.vin)


def deliver_all(deliverer: Deliverer) -> int:
    n = 0
    while deliverer.once() is not None:
        n += 1
        assert n < 100
    return n


def test_each_event_is_delivered_once_and_signed(db: Database, rules: Any, receiver: Receiver) -> None:
    made = make_events(db, rules)
    clock = Clock()
    cfg = config(receiver.url)
    found = Watcher(db, cfg, clock).scan()
    by_event = {e.event: [x.key for x in found if x.event == e.event] for e in found}
    assert by_event == {
        "fork": [f"fork:{made.fork}"],
        "rollback": [k for k in by_event["rollback"] if k.startswith(f"rollback:{made.rollback}:")],
        "vin_change": [k for k in by_event["vin_change"] if k.startswith(f"vin_change:{made.vin_change}:")],
        "device_silent": [f"device_silent:{made.silent}:{T0 + DAY}"],
        "redemption": [f"redemption:{made.redemption}"],
        "week_unconfirmed": [f"week_unconfirmed:{made.unconfirmed_vin}:2026-W39"],
    }
    assert all(len(keys) == 1 for keys in by_event.values())

    deliverer = Deliverer(db, cfg.webhooks[0], clock, "test-owner")
    assert deliver_all(deliverer) == 6
    got = receiver.got
    assert len(got) == 6
    now_s = clock() // 1000
    for headers, body in got:
        assert webhooks.verify(SECRET, headers, body, now_s), headers
        assert not webhooks.verify(b"another-secret-of-length", headers, body, now_s)
        assert not webhooks.verify(SECRET, headers, body + b" ", now_s)
        sent = json.loads(body)
        assert set(sent) == {"id", "event", "at", "data"}
        assert headers[webhooks.HEADER_ID] == sent["id"] and headers[webhooks.HEADER_EVENT] == sent["event"]
        assert headers["Content-Type"] == "application/json"
    assert sorted(b["event"] for b in receiver.bodies()) == sorted(EVENTS)
    bodies = {b["event"]: b for b in receiver.bodies()}
    assert bodies["redemption"]["data"] == {"account": "driver:alice", "driver": "alice", "item": "car-wash",
                                            "milli_tokens": 1000, "transfer_key": made.redemption}
    assert bodies["rollback"]["data"]["odo_m"] == Dongle().odo_m + 2000
    assert bodies["device_silent"]["at"] == T0 + 2 * DAY
    assert bodies["week_unconfirmed"]["data"]["drivers"] == ["bob"]
    assert bodies["vin_change"]["data"]["source"] == "vin_mismatch"
    # the signature is over "<timestamp>.<body>", as the README says a receiver checks it
    headers, body = got[0]
    stamp = headers[webhooks.HEADER_TIMESTAMP]
    assert headers[webhooks.HEADER_SIGNATURE] == "sha256=" + hmac.new(
        SECRET, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()

    rows = db.query("SELECT status, attempts, last_code FROM webhook_deliveries")
    assert rows == [{"status": "delivered", "attempts": 1, "last_code": 204}] * 6
    # the same scan again, later, and after a restart: nothing new
    clock.now += 60_000
    assert Watcher(db, cfg, clock).scan() == []
    again = Database.open(db.url)
    try:
        assert Watcher(again, cfg, clock).scan() == []
        assert deliver_all(Deliverer(again, cfg.webhooks[0], clock, "another-owner")) == 0
    finally:
        again.close()
    assert len(receiver.got) == 6
    assert db.one("SELECT COUNT(*) AS n FROM webhook_events") == {"n": 6}


def test_a_webhook_gets_only_the_events_it_subscribes_to(db: Database, rules: Any,
                                                         receiver: Receiver) -> None:
    make_events(db, rules)
    cfg = NotifyConfig((Webhook(receiver.url, SECRET, frozenset({"fork", "redemption"})),
                        Webhook(receiver.url + "&other=1", SECRET, frozenset({"fork"}))), 24, 1)
    found = Watcher(db, cfg, Clock()).scan()
    assert sorted(e.event for e in found) == ["fork", "redemption"]    # the others are not looked for
    rows = db.query("SELECT e.event, d.webhook FROM webhook_deliveries d "
                    "JOIN webhook_events e ON e.key = d.event_key ORDER BY e.event, d.webhook")
    assert [(r["event"], r["webhook"]) for r in rows] == [
        ("fork", receiver.url), ("fork", receiver.url + "&other=1"), ("redemption", receiver.url)]


def test_a_failing_receiver_gets_it_again_with_backoff(db: Database, rules: Any, receiver: Receiver) -> None:
    make_events(db, rules)
    receiver.fail_first = 2
    clock = Clock()
    cfg = config(receiver.url, frozenset({"redemption"}))
    [event] = Watcher(db, cfg, clock).scan()
    retry = webhooks.Retry(base_ms=10_000, max_ms=600_000, max_attempts=5)
    deliverer = Deliverer(db, cfg.webhooks[0], clock, "owner", retry)
    assert deliverer.once() == "pending"
    assert deliverer.once() is None                  # not before its next try
    for expected in ("pending", "delivered"):
        row = db.one("SELECT next_at FROM webhook_deliveries")
        assert row is not None
        clock.now = int(row["next_at"])
        assert deliverer.once() == expected
    assert deliverer.once() is None
    assert [json.loads(b)["id"] for _, b in receiver.got] == [event.key] * 3
    assert len({b for _, b in receiver.got}) == 1    # the same body each time, signed anew
    attempts = db.query("SELECT n, at, code, error, next_at FROM webhook_attempts ORDER BY n")
    assert [(a["n"], a["code"]) for a in attempts] == [(1, 500), (2, 500), (3, 204)]
    assert attempts[0]["error"] == "HTTP 500" and attempts[2]["error"] is None
    waits = [a["next_at"] - a["at"] for a in attempts[:2]]
    assert 5_000 <= waits[0] <= 10_000 and 10_000 <= waits[1] <= 20_000, waits
    assert attempts[2]["next_at"] is None
    assert db.one("SELECT status, attempts, last_code, lease_owner FROM webhook_deliveries") == {
        "status": "delivered", "attempts": 3, "last_code": 204, "lease_owner": None}


def test_a_dead_receiver_is_given_up_after_its_tries(db: Database, rules: Any) -> None:
    make_events(db, rules)
    clock = Clock()
    cfg = config("http://127.0.0.1:9/nobody", frozenset({"fork"}))   # the discard port: refused
    Watcher(db, cfg, clock).scan()
    deliverer = Deliverer(db, cfg.webhooks[0], clock, "owner", webhooks.Retry(base_ms=1000, max_attempts=3))
    statuses = []
    for _ in range(3):
        statuses.append(deliverer.once())
        clock.now += 10_000
    assert statuses == ["pending", "pending", "failed"]
    row = db.one("SELECT status, attempts, last_code, last_error, next_at FROM webhook_deliveries")
    assert row is not None and row["status"] == "failed" and row["attempts"] == 3
    assert row["last_code"] is None and "Connection" in row["last_error"] and row["next_at"] is None
    assert deliverer.once() is None


def test_a_slow_receiver_is_cut_short(db: Database, rules: Any) -> None:
    listener = socket.create_server(("127.0.0.1", 0))      # accepts, never answers
    try:
        make_events(db, rules)
        clock = Clock()
        cfg = config(f"http://127.0.0.1:{listener.getsockname()[1]}/", frozenset({"fork"}))
        Watcher(db, cfg, clock).scan()
        deliverer = Deliverer(db, cfg.webhooks[0], clock, "owner", timeout_s=5, deadline_s=0.5)
        began = time.monotonic()
        assert deliverer.once() == "pending"
        assert time.monotonic() - began < 3
        row = db.one("SELECT last_error FROM webhook_deliveries")
        assert row is not None and "within 0.5 s" in row["last_error"]
    finally:
        listener.close()


# -- configuration ------------------------------------------------------------------------------

def test_the_webhook_tables_are_checked(tmp_path: Path) -> None:
    good = parse_webhooks([{"url": "https://h.example/x", "secret": "s" * 16, "events": ["fork"]},
                           {"url": "http://[::1]:8080/y?k=v", "secret": "t" * 16}], "f: webhook")
    assert good[0].events == frozenset({"fork"}) and good[1].events == frozenset(EVENTS)
    secret_file = tmp_path / "secret"
    secret_file.write_text("  from-a-file-secret\n")
    [hook] = parse_webhooks([{"url": "https://h.example/", "secret_file": str(secret_file)}], "f: webhook")
    assert hook.secret == b"from-a-file-secret"
    bad = {
        "webhook[1].events": {"url": "https://h.example/", "secret": "s" * 16, "events": ["forks"]},
        "webhook[1].url": {"url": "ftp://h.example/", "secret": "s" * 16},
        "webhook[1].secret": {"url": "https://h.example/", "secret": "short"},
        "webhook[1].secret_file": {"url": "https://h.example/", "secret_file": str(tmp_path / "none")},
        "webhook[1].retries": {"url": "https://h.example/", "secret": "s" * 16, "retries": 3},
    }
    for name, table in bad.items():
        with pytest.raises(ConfigError) as caught:
            parse_webhooks([table], "f: webhook")
        assert caught.value.key == f"f: {name}" and caught.value.status == 78, caught.value
    with pytest.raises(ConfigError, match=r"webhook\[1\]\.url: 'https://user:pw@h.example/'"):
        parse_webhooks([{"url": "https://user:pw@h.example/", "secret": "s" * 16}], "webhook")
    with pytest.raises(ConfigError, match=r"webhook\[1\]\.url: .{1,40} characters"):
        parse_webhooks([{"url": "https://h.example/" + "x" * 1000, "secret": "s" * 16}], "webhook")
    with pytest.raises(ConfigError, match=r"webhook\[2\]\.url: .* given twice"):
        parse_webhooks([{"url": "https://h.example/", "secret": "s" * 16}] * 2, "webhook")


def test_a_bad_webhook_config_stops_run_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("ODO_DB", "ODO_BROKER", "ODO_HTTP", "ODO_RULES", "ODO_CONFIG", "ODO_WEBHOOK"):
        monkeypatch.delenv(key, raising=False)
    path = tmp_path / "backend.toml"
    base = (f'db = "sqlite:///{tmp_path}/b.db"\nbroker = "mqtt://127.0.0.1:1"\nhttp = "127.0.0.1:8080"\n'
            f'rules = "{tmp_path}/rules.toml"\n')
    cases = {
        '[[webhook]]\nurl = "https://h.example/"\nsecret = "0123456789abcdef"\nevents = ["fork", "forks"]\n':
            (f"{path}: webhook[1].events", "'forks'"),
        'silent_hours = 0\n': (f"{path}: silent_hours", "1 to 8760"),
        'confirmation_grace_hours = "2"\n': (f"{path}: confirmation_grace_hours", "an integer"),
        'webhook = "https://h.example/"\n': (f"{path}: webhook", "[[webhook]]"),
    }
    for text, (key, detail) in cases.items():
        path.write_text(base + text)
        assert backend_cli.main(["run", "--config", str(path)]) == 78, text
        err = capsys.readouterr().err
        assert f"odo-backend: {key}: " in err and detail in err, err
    monkeypatch.setenv("ODO_WEBHOOK", "https://h.example/")
    path.write_text(base)
    assert backend_cli.main(["run", "--config", str(path)]) == 78
    assert "ODO_WEBHOOK: is set only in the --config file" in capsys.readouterr().err


# -- several processes on one PostgreSQL database --------------------------------------------------

@pytest.fixture
def pg_url() -> Iterator[str]:
    schema = f"odo_test_{uuid.uuid4().hex[:12]}"
    sep = "&" if "?" in PG_URL else "?"
    yield f"{PG_URL}{sep}schema={schema}"
    _drop_schema(schema)


def test_two_backends_on_one_postgresql_deliver_once(pg_url: str, rules: Any, receiver: Receiver) -> None:
    first, second = Database.open(pg_url), Database.open(pg_url)
    first.migrate()
    made = make_events(first, rules)
    assert made.fork
    clock = Clock()
    cfg = config(receiver.url)
    # two watchers at once
    barrier = threading.Barrier(2)
    found: list[int] = []

    def scan(db: Database) -> None:
        barrier.wait()
        found.append(len(Watcher(db, cfg, clock).scan()))
        db.close()

    threads = [threading.Thread(target=scan, args=(db,)) for db in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sum(found) == 6, found
    # and two whole notifiers, each with its watcher and deliverer, as two `odo-backend run` would
    notifiers = [Notifier(db, cfg, clock, interval_ms=50, poll_ms=20) for db in (first, second)]
    for n in notifiers:
        n.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            row = first.one("SELECT COUNT(*) AS n FROM webhook_deliveries WHERE status = 'delivered'")
            if row is not None and row["n"] == 6:
                break
            time.sleep(0.05)
        time.sleep(0.3)                       # time for a second delivery, if one were to come
    finally:
        for n in notifiers:
            n.stop()
    ids = [b["id"] for b in receiver.bodies()]
    assert len(ids) == 6 and len(set(ids)) == 6, ids
    first.close()
    second.close()


# -- the dashboard -----------------------------------------------------------------------------

def test_the_dashboard_shows_recent_deliveries(db: Database, rules: Any, receiver: Receiver) -> None:
    from backend.web import auth
    from backend.web.app import create_app
    from backend.web.context import AppContext

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
        from starlette.testclient import TestClient

    make_events(db, rules)
    receiver.fail_first = 1
    clock = Clock()
    cfg = config(receiver.url, frozenset({"fork", "redemption"}))
    Watcher(db, cfg, clock).scan()
    deliver_all(Deliverer(db, cfg.webhooks[0], clock, "owner"))
    auth.add_operator(db, "op", "correct horse battery", clock())
    with TestClient(create_app(AppContext(db=db, clock=clock))) as client:
        assert client.get("/webhooks", follow_redirects=False).status_code == 303
        page = client.get("/login")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token
        client.post("/login", data={"username": "op", "password": "correct horse battery",
                                    "csrf": token.group(1), "next": "/"})
        page = client.get("/webhooks")
    assert page.status_code == 200
    assert "token=abc" not in page.text                      # the URL's query is not shown
    assert receiver.url.split("?")[0] in page.text
    assert page.text.count("<tr") == 3                       # a header and two deliveries
    assert "HTTP 500" in page.text and "delivered" in page.text and "pending" in page.text

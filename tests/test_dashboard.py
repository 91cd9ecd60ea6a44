"""The operator dashboard through HTTP: login, sessions, CSRF, approve, and what each page shows.

Runs against SQLite and PostgreSQL (``db_url``), on a small fleet seeded straight into
the tables with really signed records (tests/dashboard_seed.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from starlette.applications import Starlette

import backend.cli as backend_cli
from backend.cli import operators as cli_operators
from backend.db import Database
from backend.errors import AuthError, UsageError
from backend.web import auth
from backend.web.app import create_app
from backend.web.context import AppContext
from tests import dashboard_seed as seed

#: A date of the Unix epoch, as the pages write dates: what an unsynced clock must never show.
EPOCH_DATE = re.compile(r"\b1970-[01][0-9]-[0-3][0-9]")

with warnings.catch_warnings():
    # Starlette asks for the httpx2 package; plain httpx is what the project installs.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

PAGES = ("/", "/enrolments", "/drivers", "/ledger", "/wallets/driver:alice", "/devices/{dev}",
         "/devices/{dev}?page=2")
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class Clock:
    now: int = seed.NOW

    def __call__(self) -> int:
        return self.now


@dataclass
class Site:
    db: Database
    fleet: seed.Fleet
    clock: Clock
    client: TestClient

    def login(self, username: str = "op", password: str = seed.PASSWORD, next_path: str = "/") -> object:
        page = self.client.get("/login")
        token = CSRF_RE.search(page.text)
        assert token, page.text
        return self.client.post("/login", data={"username": username, "password": password,
                                                "csrf": token.group(1), "next": next_path},
                                follow_redirects=False)

    def csrf(self, path: str = "/") -> str:
        match = CSRF_RE.search(self.client.get(path).text)
        assert match
        return match.group(1)

    def device(self, dev: str) -> dict[str, object]:
        row = self.db.one("SELECT status, vin, flagged_vin, decided_by FROM devices WHERE dev = ?", (dev,))
        assert row is not None
        return row


def make_app(db: Database, clock: Clock, secure: bool = False) -> Starlette:
    """The whole backend app, as ``odo-backend run`` serves it."""
    return create_app(AppContext(db=db, clock=clock, secure_cookies=secure))


@pytest.fixture
def site(db_url: str) -> Iterator[Site]:
    db = Database.open(db_url)
    fleet = seed.seed(db)
    auth.add_operator(db, "op", seed.PASSWORD, seed.NOW)
    clock = Clock()
    with TestClient(make_app(db, clock)) as client:
        yield Site(db, fleet, clock, client)
    db.close()


def test_every_page_redirects_to_login_when_logged_out(site: Site) -> None:
    for path in PAGES:
        r = site.client.get(path.format(dev=site.fleet.good.dev), follow_redirects=False)
        assert r.status_code == 303, path
        assert r.headers["location"].startswith("/login"), path
    r = site.client.get("/ledger", follow_redirects=False)
    assert r.headers["location"] == "/login?next=%2Fledger"
    r = site.client.post(f"/devices/{site.fleet.pending.dev}/approve", data={"csrf": "x"},
                         follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert site.device(site.fleet.pending.dev)["status"] == "pending"
    assert site.client.get("/static/style.css").status_code == 200


def test_bad_password_refused_and_login_works(site: Site) -> None:
    r = site.login(password="not the password")
    assert r.status_code == 401
    assert "Wrong username or password" in r.text
    assert auth.COOKIE not in r.cookies
    r = site.login(username="nobody")
    assert r.status_code == 401
    assert site.client.get("/", follow_redirects=False).status_code == 303

    r = site.login(next_path="/drivers")
    assert r.status_code == 303 and r.headers["location"] == "/drivers"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie
    token = r.cookies[auth.COOKIE]
    stored = site.db.query("SELECT token_hash, username, expires_at FROM sessions")
    assert stored == [{"token_hash": hashlib.sha256(token.encode()).hexdigest(), "username": "op",
                       "expires_at": seed.NOW + auth.SESSION_TTL_MS}]
    page = site.client.get("/drivers")
    assert page.status_code == 200 and "alice" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'none'")


def test_login_refuses_foreign_redirect_and_missing_form_token(site: Site) -> None:
    r = site.client.post("/login", data={"username": "op", "password": seed.PASSWORD}, follow_redirects=False)
    assert r.status_code == 403
    assert site.db.query("SELECT * FROM sessions") == []
    r = site.login(next_path="//evil.example/")
    assert r.status_code == 303 and r.headers["location"] == "/"


def test_logout_and_expiry_end_the_session(site: Site) -> None:
    token = site.login().cookies[auth.COOKIE]   # type: ignore[attr-defined]
    r = site.client.post("/logout", data={"csrf": site.csrf()}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert site.db.query("SELECT * FROM sessions") == []
    site.client.cookies.set(auth.COOKIE, token)     # a copied cookie is no longer good
    assert site.client.get("/", follow_redirects=False).status_code == 303

    site.client.cookies.clear()
    site.login()
    assert site.client.get("/", follow_redirects=False).status_code == 200
    site.clock.now += auth.SESSION_TTL_MS
    assert site.client.get("/", follow_redirects=False).status_code == 303


def test_post_without_csrf_token_is_refused(site: Site) -> None:
    site.login()
    dev = site.fleet.pending.dev
    for data in ({}, {"csrf": ""}, {"csrf": "0" * 64}):
        r = site.client.post(f"/devices/{dev}/approve", data=data, follow_redirects=False)
        assert r.status_code == 403, data
    assert site.client.post("/logout", follow_redirects=False).status_code == 403
    assert site.device(dev)["status"] == "pending"
    assert site.client.get("/", follow_redirects=False).status_code == 200


def test_approve_and_revoke_via_the_pages(site: Site) -> None:
    site.login()
    dev = site.fleet.pending.dev
    page = site.client.get("/enrolments")
    assert dev in page.text and site.fleet.flagged.dev in page.text
    form = {"csrf": site.csrf("/enrolments"), "back": "/enrolments"}
    r = site.client.post(f"/devices/{dev}/approve", data=form, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/enrolments?done=approved"
    assert site.device(dev) == {"status": "approved", "vin": "WBA00000000000002", "flagged_vin": None,
                                "decided_by": "op"}
    assert dev not in site.client.get("/enrolments").text

    flagged = site.fleet.flagged.dev
    r = site.client.post(f"/devices/{flagged}/approve", data={"csrf": site.csrf()})
    assert r.status_code == 200 and "Device approved." in r.text
    assert site.device(flagged)["vin"] == "ZFA31200000000004"
    assert site.device(flagged)["flagged_vin"] is None

    r = site.client.post(f"/devices/{dev}/revoke", data={"csrf": site.csrf()})
    assert r.status_code == 200 and "Device revoked." in r.text
    assert site.device(dev)["status"] == "revoked"
    r = site.client.post("/devices/" + "0" * 32 + "/approve", data={"csrf": site.csrf()})
    assert r.status_code == 404


def test_fleet_page_shows_each_device_problems_first(site: Site) -> None:
    site.login()
    html = site.client.get("/").text
    f = site.fleet
    order = [html.index(f"/devices/{d.dev}") for d in (f.flagged, f.pending, f.good, f.clockless)]
    assert order == sorted(order), "devices with problems come first"
    assert not EPOCH_DATE.search(html)     # no time shown as 1970 (a CSRF token may hold "1970")
    good_row = html[html.index(f"/devices/{f.good.dev}"):]
    good_row = good_row[:good_row.index("</tr>")]
    assert "alice" in good_row and "online" in good_row and "2026-W46" in good_row
    assert "42,420.8 km" in good_row and "36" in good_row
    pending_row = html[html.index(f"/devices/{f.pending.dev}"):]
    assert "<time>never</time>" in pending_row[:pending_row.index("</tr>")]
    flagged_row = html[html.index(f"/devices/{f.flagged.dev}"):]
    flagged_row = flagged_row[:flagged_row.index("</tr>")]
    for text in ("now reads ZFA31200000000004", "offline with backlog", "rejected records", ">12<", "fork"):
        assert text in flagged_row, text


def test_device_page_shows_chart_records_rejections_forks_events(site: Site) -> None:
    site.login()
    f = site.fleet
    html = site.client.get(f"/devices/{f.good.dev}").text
    assert html.count('class="m-confirmation"') == 4
    assert "<polyline" in html and 'class="odo"' in html
    assert "adapter_lost" in html and "&lt;b&gt;unplugged&lt;/b&gt;" in html and "<b>unplugged" not in html
    assert "fleet-secret-token" not in html
    assert "week 2026-W" in html and "52.3 km, max 118 km/h" in html
    assert "Approve" not in html and "Revoke" in html

    html = site.client.get(f"/devices/{f.flagged.dev}").text
    assert "odometer_rollback" in html and "vin_mismatch" in html and "f" * 64 in html
    assert 'class="m-rejected"' in html and "Approve" in html

    html = site.client.get(f"/devices/{f.clockless.dev}").text
    assert 'class="est"' in html and not EPOCH_DATE.search(html)

    html = site.client.get(f"/devices/{f.pending.dev}").text
    assert "No odometer readings yet" in html and "never" in html
    assert site.client.get("/devices/<script>").status_code == 404


def test_records_are_paginated(site: Site) -> None:
    site.login()
    good = site.fleet.good
    for i in range(30):
        seed.add_record(site.db, good, "odometer", seed.NOW + i * 1000, odo_m=43_000_000 + i * 100, src="obd")
    first = site.client.get(f"/devices/{good.dev}").text
    second = site.client.get(f"/devices/{good.dev}?page=2").text
    assert "page 1 of 2 (66 in all)" in first and "page 2 of 2" in second
    def seqs(html: str) -> set[str]:
        records = html[html.index('id="records"'):html.index('id="events"')]
        return set(re.findall(r'data-label="Seq" class="num">(\d+)<', records))

    assert seqs(first).isdisjoint(seqs(second))
    assert "66" in seqs(first) and "1" in seqs(second)
    assert "page 2 of 2" in site.client.get(f"/devices/{good.dev}?page=99").text


def test_drivers_wallets_and_ledger(site: Site) -> None:
    site.login()
    html = site.client.get("/drivers").text
    assert "Alice &lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>" not in html
    assert "37.500" in html and "current" in html and "bob" in html
    html = site.client.get("/wallets/driver:alice").text
    assert "<strong>37.500</strong>" in html and "reward:weekly-confirmation:" in html
    assert "test redemption" in html
    assert "<strong>0.000</strong>" in site.client.get("/wallets/driver:nobody").text
    html = site.client.get("/ledger").text
    assert html.count('data-label="#"') == 5 and "redeemed:tyre-voucher" in html


def test_secure_cookie_behind_tls(db_url: str) -> None:
    db = Database.open(db_url)
    db.migrate()
    auth.add_operator(db, "op", seed.PASSWORD, seed.NOW)
    with TestClient(make_app(db, Clock(), secure=True), base_url="https://testserver") as client:
        page = client.get("/login")
        token = CSRF_RE.search(page.text)
        assert token
        r = client.post("/login", data={"username": "op", "password": seed.PASSWORD, "csrf": token.group(1)},
                        follow_redirects=False)
        assert r.status_code == 303 and "Secure" in r.headers["set-cookie"]
    db.close()


def test_login_is_rate_limited_per_address(site: Site) -> None:
    for _ in range(10):
        assert site.login(password="wrong password!").status_code == 401   # type: ignore[attr-defined]
    r = site.login()
    assert r.status_code == 429 and "Too many failed attempts" in r.text  # type: ignore[attr-defined]
    site.clock.now += 15 * 60 * 1000 + 1
    assert site.login().status_code == 303   # type: ignore[attr-defined]


def test_limiter_counts_per_name_and_forgets() -> None:
    limiter = auth.LoginLimiter(max_failures=2, window_ms=1000, max_names=3)
    limiter.failed("a", 0)
    assert limiter.retry_after_ms("a", 0) == 0
    limiter.failed("A", 100)
    assert limiter.retry_after_ms("a", 200) == 800
    assert limiter.retry_after_ms("b", 200) == 0
    assert limiter.retry_after_ms("a", 1001) == 0
    for name in "cdefg":
        limiter.failed(name, 2000)
    assert len(limiter._failures) <= 3


def test_passwords_are_salted_scrypt(db_url: str) -> None:
    db = Database.open(db_url)
    db.migrate()
    auth.add_operator(db, "one", seed.PASSWORD, 1)
    auth.add_operator(db, "two", seed.PASSWORD, 2)
    hashes = [r["password_hash"] for r in db.query("SELECT password_hash FROM operators ORDER BY username")]
    assert all(h.startswith("scrypt$15$8$1$") for h in hashes) and hashes[0] != hashes[1]
    assert seed.PASSWORD not in "".join(hashes)
    assert auth.check_password(db, "one", seed.PASSWORD)
    assert not auth.check_password(db, "one", seed.PASSWORD + "x")
    assert not auth.check_password(db, "three", seed.PASSWORD)
    with pytest.raises(AuthError, match="already exists"):
        auth.add_operator(db, "one", "another password", 3)
    with pytest.raises(AuthError, match="at least"):
        auth.add_operator(db, "four", "short", 3)
    with pytest.raises(AuthError, match="username"):
        auth.add_operator(db, "no spaces", seed.PASSWORD, 3)
    assert db.one("SELECT password_hash FROM operators WHERE username = 'one'") == {
        "password_hash": hashes[0]}
    db.close()


def test_operators_cli(db_url: str, monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture[str]) -> None:
    def run(*argv: str, stdin: str = "") -> int:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        return backend_cli.main(list(argv))

    assert run("operators", "add", "carol", "--db", db_url, stdin=seed.PASSWORD + "\n") == 0
    assert "operator carol added" in capsys.readouterr().out
    assert run("operators", "add", "carol", "--db", db_url, stdin="other password\n") == 2
    assert "already exists" in capsys.readouterr().err
    assert run("operators", "add", "dave", "--db", db_url, stdin="short\n") == 2
    assert run("operators", "add", "dave", "--db", db_url) == 2
    assert "no password on stdin" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run("operators", "add", "dave", "--password", "x", "--db", db_url)
    assert exc.value.code == 2
    capsys.readouterr()
    monkeypatch.setenv("ODO_DB", db_url)
    assert run("operators", "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [o["username"] for o in listed] == ["carol"] and listed[0]["sessions"] == 0
    db = Database.open(db_url)
    assert auth.check_password(db, "carol", seed.PASSWORD)
    assert run("operators", "passwd", "carol", "--db", db_url, stdin="a new password\n") == 0
    assert auth.check_password(db, "carol", "a new password")
    assert not auth.check_password(db, "carol", seed.PASSWORD)
    db.close()
    assert run("operators", "list", "--db", "mysql://x") == 2
    assert "unsupported scheme" in capsys.readouterr().err
    monkeypatch.delenv("ODO_DB")
    assert run("operators", "list") == 2
    assert "--db: is required" in capsys.readouterr().err


def test_read_password_from_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    answers = iter(["secret one", "secret one", "secret one", "secret two"])
    assert cli_operators.read_password(Tty(), lambda _: next(answers)) == "secret one"
    with pytest.raises(UsageError, match="did not match"):
        cli_operators.read_password(Tty(), lambda _: next(answers))

"""The drivers' portal through HTTP: one-time codes and passwords, sessions kept apart from the
operators', CSRF, what a driver sees (only their own), redemption once per key, the pairing code,
and the ``drivers login-code|password`` commands.

Runs against SQLite and PostgreSQL (``db_url``), on the dashboard's seeded fleet
(tests/dashboard_seed.py: alice drives its good car and has four confirmed weeks).
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import backend.cli as backend_cli
from backend.db import Database
from backend.errors import AuthError
from backend.ledger import accounts, claims
from backend.ledger.rules import Rules, parse
from backend.web import auth, portal_auth, portal_data
from backend.web.app import create_app
from backend.web.context import AppContext
from backend.web.render import iso
from protocol.messages import normalise_claim_code
from protocol.records import iso_week
from tests import dashboard_seed as seed
from tests.test_dashboard import CSRF_RE, Clock, TestClient

KEY_RE = re.compile(r'name="item" value="([^"]+)">\s*<input type="hidden" name="key" value="([^"]+)"')
CODE_RE = re.compile(r"[23456789A-HJ-NP-Z]{4}-[23456789A-HJ-NP-Z]{4}")
ALICE_BALANCE = 4 * 10_000 - 2_500          # four weekly credits, one redemption (the seed)
BOB_CREDIT = 7_777

RULES: Rules = parse({
    "version": "acme-2026-11", "max_speed_kph": 250,
    "rule": [{"id": "weekly-confirmation", "on": "confirmation", "per": "week", "milli_tokens": 10_000}],
    "catalogue": [{"item": "car-wash", "milli_tokens": 2_000},
                  {"item": "tyre-voucher", "milli_tokens": 30_000},
                  {"item": "new-car", "milli_tokens": 10**9}],
})


@dataclass
class Portal:
    db: Database
    clock: Clock
    app: Any
    client: TestClient

    def code(self, driver: str = "alice", ttl_ms: int = portal_auth.DEFAULT_CODE_TTL_MS) -> str:
        return portal_auth.issue_login_code(self.db, driver, self.clock.now, ttl_ms).code

    def login(self, driver: str = "alice", code: str | None = None, password: str | None = None,
              client: TestClient | None = None) -> Any:
        c = client or self.client
        page = c.get("/driver/login")
        token = CSRF_RE.search(page.text)
        assert token, page.text
        data = {"driver": driver, "csrf": token.group(1), "next": "/driver/"}
        data.update({"code": code} if code is not None else {"password": password or ""})
        return c.post("/driver/login", data=data, follow_redirects=False)

    def csrf(self, path: str = "/driver/", client: TestClient | None = None) -> str:
        match = CSRF_RE.search((client or self.client).get(path).text)
        assert match
        return match.group(1)

    def redemptions(self, driver: str) -> list[dict[str, Any]]:
        return self.db.query("SELECT key, to_account, amount FROM transfers WHERE from_account = ? "
                             "ORDER BY id", (accounts.driver_account(driver),))

    def balance(self, driver: str) -> int:
        return portal_data.balance(self.db, driver)


@pytest.fixture
def site(db_url: str) -> Iterator[Portal]:
    db = Database.open(db_url)
    seed.seed(db)
    auth.add_operator(db, "op", seed.PASSWORD, seed.NOW)
    with db.write() as tx:
        accounts.transfer(tx, key="reward:bonus:bob", from_account=accounts.ISSUER, to_account="driver:bob",
                          amount=BOB_CREDIT, now_ms=seed.NOW, rule_id="bonus", week=iso_week(seed.NOW))
    clock = Clock()
    app = create_app(AppContext(db=db, clock=clock, rules=RULES))
    with TestClient(app) as client:
        yield Portal(db, clock, app, client)
    db.close()


def other_client(site: Portal) -> TestClient:
    return TestClient(site.app)


def test_a_one_time_code_signs_in_once(site: Portal) -> None:
    r = site.client.get("/driver/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/driver/login"
    code = site.code()
    r = site.login(code=code.lower().replace("-", " "))     # case, spaces and dashes do not matter
    assert r.status_code == 303 and r.headers["location"] == "/driver/"
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("odo_driver_session="))
    assert "; Path=/driver;" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    token = r.cookies[portal_auth.DRIVERS.cookie]
    assert site.db.query("SELECT token_hash, driver_id FROM driver_sessions") == [
        {"token_hash": hashlib.sha256(token.encode()).hexdigest(), "driver_id": "alice"}]
    home = site.client.get("/driver/")
    assert home.status_code == 200
    assert f"<strong>{ALICE_BALANCE // 1000}.{ALICE_BALANCE % 1000:03d}</strong>" in home.text
    assert "Alice &lt;script&gt;" in home.text                   # the name, escaped
    assert home.headers["content-security-policy"].startswith("default-src 'none'")

    site.client.cookies.clear()
    r = site.login(code=code)
    assert r.status_code == 401 and "already used" in r.text
    assert portal_auth.DRIVERS.cookie not in r.cookies
    stored = site.db.query("SELECT code_hash, driver_id, used_at FROM driver_login_codes")
    assert stored == [{"code_hash": hashlib.sha256(
        f"odo-driver-login-code:alice:{code.replace('-', '')}".encode()).hexdigest(),
        "driver_id": "alice", "used_at": seed.NOW}]


def test_codes_expire_belong_to_one_driver_and_a_new_one_replaces_the_unused(site: Portal) -> None:
    short = site.code(ttl_ms=60_000)
    site.clock.now += 60_000
    r = site.login(code=short)
    assert r.status_code == 401 and "expired" in r.text
    code = site.code()
    assert site.login("bob", code=code).status_code == 401              # alice's code, bob's ID
    assert "Wrong driver ID or code" in site.login(code="ZZZZ-ZZZZ").text
    assert "Wrong driver ID or code" in site.login(code="not a code at all").text
    newer = site.code()
    assert "Wrong driver ID or code" in site.login(code=code).text       # replaced before it was used
    assert site.login(code=newer).status_code == 303
    with pytest.raises(AuthError, match="no driver"):
        site.code("nobody")
    with pytest.raises(AuthError, match="minutes"):
        portal_auth.issue_login_code(site.db, "alice", seed.NOW, portal_auth.MAX_CODE_TTL_MS + 1)


def test_passwords(site: Portal) -> None:
    assert site.login(password=seed.PASSWORD).status_code == 401      # none set yet
    portal_auth.set_driver_password(site.db, "alice", seed.PASSWORD, seed.NOW)
    stored = site.db.one("SELECT password_hash FROM driver_passwords WHERE driver_id = 'alice'")
    assert stored and stored["password_hash"].startswith("scrypt$")
    assert seed.PASSWORD not in stored["password_hash"]
    r = site.login(password="not the password")
    assert r.status_code == 401 and "Wrong driver ID or password" in r.text
    assert site.login("bob", password=seed.PASSWORD).status_code == 401
    assert site.login(password=seed.PASSWORD).status_code == 303
    assert site.client.get("/driver/", follow_redirects=False).status_code == 200
    portal_auth.set_driver_password(site.db, "alice", "another good password", seed.NOW)
    assert site.client.get("/driver/", follow_redirects=False).status_code == 303   # sessions ended
    assert site.login(password=seed.PASSWORD).status_code == 401
    assert site.login(password="another good password").status_code == 303
    with pytest.raises(AuthError, match="at least"):
        portal_auth.set_driver_password(site.db, "alice", "short", seed.NOW)
    with pytest.raises(AuthError, match="no driver"):
        portal_auth.set_driver_password(site.db, "nobody", seed.PASSWORD, seed.NOW)


def test_login_is_throttled_per_address(site: Portal) -> None:
    code = site.code()
    for _ in range(10):
        assert site.login(code="ZZZZ-ZZZZ").status_code == 401
    r = site.login(code=code)
    assert r.status_code == 429 and "Too many failed attempts from your address" in r.text
    assert site.login("bob", code="ZZZZ-ZZZZ").status_code == 429       # nor another name from there
    assert site.db.query("SELECT used_at FROM driver_login_codes WHERE driver_id = 'alice'") == [
        {"used_at": None}]
    site.clock.now += 15 * 60 * 1000 + 1
    assert site.login(code=code).status_code == 303


def test_login_form_needs_its_token_and_goes_nowhere_else(site: Portal) -> None:
    r = site.client.post("/driver/login", data={"driver": "alice", "code": site.code()},
                         follow_redirects=False)
    assert r.status_code == 403 and site.db.query("SELECT * FROM driver_sessions") == []
    page = site.client.get("/driver/login")
    token = CSRF_RE.search(page.text)
    assert token
    r = site.client.post("/driver/login", data={"driver": "alice", "code": site.code(),
                                                "csrf": token.group(1), "next": "/drivers"},
                         follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/driver/"     # never out of the portal


def test_a_driver_sees_only_their_own_data(site: Portal) -> None:
    assert site.login(code=site.code()).status_code == 303
    bob = other_client(site)
    assert site.login("bob", code=site.code("bob"), client=bob).status_code == 303
    alice_home, bob_home = site.client.get("/driver/").text, bob.get("/driver/").text
    assert "7.777" in bob_home and "37.500" not in bob_home and "tyre-voucher" not in bob_home
    assert "WVWZZZ1JZXW000001" in bob_home              # bob drove the good car before alice
    assert "37.500" in alice_home and "7.777" not in alice_home and "bonus" not in alice_home
    for path in ("/driver/alice", "/driver/?driver=alice",
                 "/driver/redeem?driver=alice&account=driver:alice"):
        r = bob.get(path)
        assert "37.500" not in r.text and "Alice" not in r.text, path

    # bob's form, with alice's name wherever a form might take one: bob's account or nothing
    csrf = site.csrf(client=bob)
    for i, extra in enumerate(({"driver": "alice"}, {"account": "driver:alice"}, {"driver_id": "alice"})):
        r = bob.post("/driver/redeem", data={"csrf": csrf, "item": "car-wash", "key": f"bob-{i}", **extra},
                     follow_redirects=False)
        assert r.status_code == 303
    assert site.balance("alice") == ALICE_BALANCE
    assert site.balance("bob") == BOB_CREDIT - 3 * 2_000
    assert len(site.redemptions("bob")) == 3 and len(site.redemptions("alice")) == 1

    # a receipt is shown only for the driver's own key
    alice_key = "alice-key-1"
    r = site.client.post("/driver/redeem", data={"csrf": site.csrf(), "item": "car-wash", "key": alice_key},
                         follow_redirects=False)
    assert r.headers["location"] == f"/driver/redeem?receipt={alice_key}"
    assert "Redeemed car-wash" in site.client.get(r.headers["location"]).text
    assert "Redeemed" not in bob.get(r.headers["location"]).text
    # alice's session's CSRF token is no good in bob's session
    r = bob.post("/driver/redeem", data={"csrf": site.csrf(), "item": "car-wash", "key": "x1"},
                 follow_redirects=False)
    assert r.status_code == 403
    bob.close()


def test_operator_and_driver_sessions_stay_apart(site: Portal) -> None:
    op = other_client(site)
    page = op.get("/login")
    token = CSRF_RE.search(page.text)
    assert token
    r = op.post("/login", data={"username": "op", "password": seed.PASSWORD, "csrf": token.group(1)},
                follow_redirects=False)
    op_token = r.cookies[auth.COOKIE]
    assert op.get("/drivers", follow_redirects=False).status_code == 200
    r = op.get("/driver/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/driver/login"
    assert op.post("/driver/pairing", data={"csrf": auth.csrf_token(op_token)},
                   follow_redirects=False).headers["location"] == "/driver/login"

    r = site.login(code=site.code())
    driver_token = r.cookies[portal_auth.DRIVERS.cookie]
    for path in ("/", "/drivers", "/wallets/driver:alice", "/ledger"):
        r = site.client.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login"), path
    # a token moved to the other realm's cookie is nobody there
    swapped = TestClient(site.app)
    swapped.cookies.set(auth.COOKIE, driver_token)
    assert swapped.get("/drivers", follow_redirects=False).status_code == 303
    swapped.cookies.clear()
    swapped.cookies.set(portal_auth.DRIVERS.cookie, op_token)
    assert swapped.get("/driver/", follow_redirects=False).status_code == 303
    assert auth.csrf_token(driver_token) != auth.csrf_token(driver_token, portal_auth.DRIVERS)
    swapped.close()
    op.close()


def test_posts_without_the_csrf_token_are_refused(site: Portal) -> None:
    site.login(code=site.code())
    for data in ({}, {"csrf": ""}, {"csrf": "0" * 64}):
        r = site.client.post("/driver/redeem", data={"item": "car-wash", "key": "k1", **data},
                             follow_redirects=False)
        assert r.status_code == 403 and "security token" in r.text
        assert site.client.post("/driver/pairing", data=data, follow_redirects=False).status_code == 403
        assert site.client.post("/driver/logout", data=data, follow_redirects=False).status_code == 403
    assert len(site.redemptions("alice")) == 1
    assert site.db.query("SELECT * FROM claim_codes") == []
    assert site.client.get("/driver/", follow_redirects=False).status_code == 200
    r = site.client.post("/driver/logout", data={"csrf": site.csrf()}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/driver/login"
    assert site.db.query("SELECT * FROM driver_sessions") == []
    assert site.client.get("/driver/", follow_redirects=False).status_code == 303


def test_redeeming_twice_with_one_form_redeems_once(site: Portal) -> None:
    site.login(code=site.code())
    page = site.client.get("/driver/redeem").text
    forms = dict(KEY_RE.findall(page))
    assert list(forms) == ["car-wash", "tyre-voucher", "new-car"]       # cheapest first
    assert "acme-2026-11" in page and page.count("disabled") == 1         # the new car is out of reach
    data = {"csrf": site.csrf(), "item": "car-wash", "key": forms["car-wash"]}
    first = site.client.post("/driver/redeem", data=data, follow_redirects=False)
    again = site.client.post("/driver/redeem", data=data, follow_redirects=False)
    assert first.status_code == again.status_code == 303
    assert first.headers["location"] == again.headers["location"]
    assert site.balance("alice") == ALICE_BALANCE - 2_000
    assert [r["to_account"] for r in site.redemptions("alice")] == [
        "redeemed:tyre-voucher", "redeemed:car-wash"]
    receipt = site.client.get(first.headers["location"]).text
    assert "Redeemed car-wash for 2.000 tokens." in receipt

    r = site.client.post("/driver/redeem", data={**data, "item": "tyre-voucher"}, follow_redirects=False)
    assert r.status_code == 409 and "already used for another item" in r.text
    r = site.client.post("/driver/redeem", data={**data, "item": "tyre-voucher", "key": "k2"})
    assert r.status_code == 200 and "Redeemed tyre-voucher" in r.text
    r = site.client.post("/driver/redeem", data={**data, "item": "new-car", "key": "k3"})
    assert r.status_code == 409 and "Not enough tokens for new-car" in r.text
    r = site.client.post("/driver/redeem", data={**data, "item": "yacht", "key": "k4"})
    assert r.status_code == 404 and "not in the catalogue" in r.text
    r = site.client.post("/driver/redeem", data={**data, "item": "car-wash", "key": "with space"})
    assert r.status_code == 400
    r = site.client.post("/driver/redeem", data={**data, "item": "car-wash", "key": "k" * 5000})
    assert r.status_code == 400
    assert site.balance("alice") == ALICE_BALANCE - 2_000 - 30_000


def test_home_shows_weeks_streak_and_credits(site: Portal) -> None:
    site.login(code=site.code())
    view = portal_data.overview(site.db, "alice", seed.NOW)
    assert view is not None
    weeks = sorted({iso_week(seed.NOW - d * seed.DAY + 3_600_000) for d in (7, 14, 21, 28)}, reverse=True)
    assert view.weeks == weeks and view.weeks_total == 4 and view.streak == 4
    assert [(g.label, g.credits, g.total) for g in view.by_rule] == [("weekly-confirmation", 4, 40_000)]
    assert [(g.label, g.credits, g.total) for g in view.by_vehicle] == [("WVWZZZ1JZXW000001", 4, 40_000)]
    assert [(r.item, r.amount) for r in view.redemptions] == [("tyre-voucher", 2_500)]
    html = site.client.get("/driver/").text
    assert all(w in html for w in weeks) and '<dd id="streak">4 weeks</dd>' in html
    assert "weekly-confirmation" in html and "40.000" in html and "tyre-voucher" in html
    assert portal_data.streak(set(weeks), seed.NOW + 14 * seed.DAY) == 0     # a week missed: no streak
    assert portal_data.streak(set(weeks[1:]), seed.NOW) == 0


def test_the_pairing_code_claims_a_car(site: Portal) -> None:
    site.login(code=site.code())
    home = site.client.get("/driver/").text
    assert "Claim a car" in home and "Get a pairing code" in home
    r = site.client.post("/driver/pairing", data={"csrf": site.csrf()})
    assert r.status_code == 200
    shown = CODE_RE.search(r.text.split('id="pairing-code"')[1])
    assert shown
    assert "Type this code on the car's driver page" in r.text
    assert f"<time>{iso(seed.NOW + claims.CODE_TTL_MS)}</time>" in r.text
    normal = normalise_claim_code(shown.group(0))
    assert normal is not None
    assert site.db.query("SELECT driver_id, expires_at FROM claim_codes WHERE code_hash = ?",
                         (claims.code_hash(normal),)) == [{"driver_id": "alice",
                                                           "expires_at": seed.NOW + claims.CODE_TTL_MS}]


def test_drivers_cli_login_code_and_password(db_url: str, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    def run(*argv: str, stdin: str = "") -> int:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        try:
            return backend_cli.main(list(argv))
        except SystemExit as exc:
            return int(exc.code or 0)

    assert run("drivers", "add", "carol", "--db", db_url) == 0
    capsys.readouterr()
    assert run("drivers", "login-code", "carol", "--db", db_url, "--ttl", "5") == 0
    out, err = capsys.readouterr()
    code = out.strip()
    assert CODE_RE.fullmatch(code), out
    assert "good once until" in err and "/driver/login" in err
    db = Database.open(db_url)
    row = db.one("SELECT created_at, expires_at FROM driver_login_codes WHERE driver_id = 'carol'")
    assert row and row["expires_at"] - row["created_at"] == 5 * 60_000
    assert code.replace("-", "") not in str(db.query("SELECT * FROM driver_login_codes"))
    assert portal_auth.use_login_code(db, "carol", code, row["created_at"] + 1) is None
    assert portal_auth.use_login_code(db, "carol", code, row["created_at"] + 2) == portal_auth.USED_CODE

    for ttl in ("0", "10081", "-1", "x", "9" * 30):
        assert run("drivers", "login-code", "carol", "--db", db_url, "--ttl", ttl) == 2, ttl
        assert "--ttl" in capsys.readouterr().err
    assert run("drivers", "login-code", "nobody", "--db", db_url) == 2
    assert "no driver 'nobody'" in capsys.readouterr().err

    assert run("drivers", "password", "carol", "--db", db_url, stdin=seed.PASSWORD + "\n") == 0
    assert "portal password of driver carol set" in capsys.readouterr().out
    assert portal_auth.check_driver_password(db, "carol", seed.PASSWORD)
    assert run("drivers", "password", "carol", "--db", db_url, stdin="short\n") == 2
    assert "at least" in capsys.readouterr().err
    assert run("drivers", "password", "carol", "--db", db_url) == 2
    assert "no password on stdin" in capsys.readouterr().err
    assert run("drivers", "password", "nobody", "--db", db_url, stdin=seed.PASSWORD + "\n") == 2
    assert run("drivers", "password", "carol", "--password", "x", "--db", db_url) == 2
    assert portal_auth.check_driver_password(db, "carol", seed.PASSWORD)
    db.close()

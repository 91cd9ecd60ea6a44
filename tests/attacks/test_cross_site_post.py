"""Attack: a web page the operator or a driver visits while signed in (or any page, while the API
is open on 127.0.0.1) makes their browser POST to the backend: ``fetch(url, {method: "POST",
mode: "no-cors", credentials: "include", body: "..."})``, which a browser sends as ``text/plain``
with the page's ``Origin`` and ``Sec-Fetch-Site: cross-site``, without asking first. Approving a
pending device and redeeming a driver's tokens that way are refused, through the JSON API and
through the dashboard's and portal's forms, and nothing in the database changes."""

from __future__ import annotations

import re
from typing import Any

import pytest

from backend.db import Database
from backend.ledger import accounts
from backend.ledger.rules import Rules, parse
from backend.web import auth, portal_auth
from backend.web.app import create_app
from backend.web.context import AppContext
from tests import dashboard_seed as seed
from tests.test_dashboard import CSRF_RE, Clock, TestClient

EVIL = "https://evil.example"
#: What a browser adds to a page's ``no-cors`` POST to another site.
NO_CORS = {"Origin": EVIL, "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors",
           "Content-Type": "text/plain;charset=UTF-8"}
RULES: Rules = parse({
    "version": "attack-2026-11", "max_speed_kph": 250,
    "rule": [{"id": "weekly-confirmation", "on": "confirmation", "per": "week", "milli_tokens": 10_000}],
    "catalogue": [{"item": "car-wash", "milli_tokens": 2_000}],
})


def whole_database(db: Database) -> dict[str, list[str]]:
    """Every row of every table, to compare before and after."""
    if db.dialect == "sqlite":
        names = [r["name"] for r in db.query("SELECT name FROM sqlite_master WHERE type = 'table' "
                                             "AND name NOT LIKE 'sqlite_%'")]
    else:
        names = [r["table_name"] for r in db.query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
            "AND table_type = 'BASE TABLE'")]
    assert "devices" in names and "transfers" in names
    return {name: sorted(repr(sorted(row.items())) for row in db.query(f"SELECT * FROM {name}"))
            for name in sorted(names)}


def sign_in(client: TestClient, path: str, data: dict[str, str]) -> None:
    token = CSRF_RE.search(client.get(path).text)
    assert token
    r = client.post(path, data={**data, "csrf": token.group(1)}, follow_redirects=False)
    assert r.status_code == 303, r.text


def test_cross_site_post(db_url: str) -> None:
    db = Database.open(db_url)
    fleet = seed.seed(db)
    auth.add_operator(db, "op", seed.PASSWORD, seed.NOW)
    portal_auth.set_driver_password(db, "alice", seed.PASSWORD, seed.NOW)
    pending = fleet.pending.dev
    assert db.one("SELECT status FROM devices WHERE dev = ?", (pending,)) == {"status": "pending"}
    assert accounts.wallet(db, "driver:alice")["balance"] > 2_000
    # no API credential at all: the API is open, as it was on 127.0.0.1 with no --api-token
    app = create_app(AppContext(db=db, clock=Clock(), rules=RULES))
    with TestClient(app, base_url="http://127.0.0.1:8080") as browser:
        sign_in(browser, "/login", {"username": "op", "password": seed.PASSWORD})
        sign_in(browser, "/driver/login", {"driver": "alice", "password": seed.PASSWORD})
        dashboard_csrf = CSRF_RE.search(browser.get("/").text)
        portal_csrf = CSRF_RE.search(browser.get("/driver/redeem").text)
        assert dashboard_csrf and portal_csrf
        before = whole_database(db)

        attempts: list[tuple[str, dict[str, str], Any]] = [
            (f"/api/devices/{pending}/approve", NO_CORS, '{"vin": "WVWZZZ1JZXW000099"}'),
            (f"/api/devices/{pending}/approve", NO_CORS, ""),
            ("/api/wallets/driver:alice/redeem", NO_CORS,
             '{"item": "car-wash", "idempotency_key": "evil-1"}'),
            # as a form: the browser's other type it sends without asking, the stolen CSRF token too
            (f"/devices/{pending}/approve", {**NO_CORS, "Content-Type": "application/x-www-form-urlencoded"},
             f"csrf={dashboard_csrf.group(1)}"),
            ("/driver/redeem", {**NO_CORS, "Content-Type": "application/x-www-form-urlencoded"},
             f"csrf={portal_csrf.group(1)}&item=car-wash&key=evil-2"),
            # a browser that sends no Sec-Fetch-Site: the Origin alone is enough
            ("/api/wallets/driver:alice/redeem", {"Origin": EVIL, "Content-Type": "application/json"},
             '{"item": "car-wash", "idempotency_key": "evil-3"}'),
            # one that sends no Origin on a no-cors POST: text/plain is not JSON
            ("/api/wallets/driver:alice/redeem", {"Content-Type": "text/plain;charset=UTF-8"},
             '{"item": "car-wash", "idempotency_key": "evil-4"}'),
            ("/api/wallets/driver:alice/redeem", {"Origin": "null", "Content-Type": "application/json"},
             '{"item": "car-wash", "idempotency_key": "evil-5"}'),
        ]
        for path, headers, body in attempts:
            r = browser.post(path, headers=headers, content=body, follow_redirects=False)
            expected = 415 if "Origin" not in headers else 403
            assert r.status_code == expected, (path, headers, r.status_code, r.text)
            if path.startswith("/api/"):
                assert re.search(r"cross-(origin|site)|Content-Type", r.json()["error"]), r.text
        assert whole_database(db) == before

        # the same requests from the server's own pages go through: the refusals were the doors'
        own = {"Origin": "http://127.0.0.1:8080", "Sec-Fetch-Site": "same-origin",
               "Content-Type": "application/json"}
        r = browser.post("/api/wallets/driver:alice/redeem", headers=own,
                         content='{"item": "car-wash", "idempotency_key": "own-1"}')
        assert r.status_code == 200, r.text
        assert browser.post(f"/api/devices/{pending}/approve", headers=own).status_code == 200
    assert db.one("SELECT status FROM devices WHERE dev = ?", (pending,)) == {"status": "approved"}
    db.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_bearer_client_without_origin_is_not_a_browser(db_url: str) -> None:
    """curl and scripts send no Origin: their POSTs with a token and JSON are served."""
    db = Database.open(db_url)
    fleet = seed.seed(db)
    app = create_app(AppContext(db=db, clock=Clock(), rules=RULES, api_token="operator-token-0123456789"))
    with TestClient(app) as curl:
        r = curl.post(f"/api/devices/{fleet.pending.dev}/approve",
                      headers={"Authorization": "Bearer operator-token-0123456789"})
        assert r.status_code == 200, r.text
    db.close()

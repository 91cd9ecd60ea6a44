"""Roles and scoped API tokens, on SQLite and PostgreSQL: every route of the mounted ``/api`` app
walked with every kind of caller, the table that declares them, and ``odo-backend api-tokens``."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from backend.cli import main
from backend.db import Database
from backend.ledger import accounts, assignments
from backend.records import store
from backend.web import api_tokens, roles
from backend.web.app import create_app
from backend.web.context import AppContext
from sim.devices import T0, VIN, Dongle, batch, enroll
from tests.backend_helpers import snapshot

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

SETTING = "api-token-setting-for-tests"      # the api_token setting
NOW = T0 + 86_400_000
OPERATORS = ("operator", "setting")
REFUSED = ("none", "unknown", "expired", "revoked")
#: Every kind of caller, those refused first, so that each route's allowed calls come last.
CALLERS = (*REFUSED, "driver:bob", "driver:alice", "partner", *OPERATORS)

#: What this test expects of each method and path, written apart from backend.web.roles:
#: "driver" is any driver, "own" the driver the path names.
_OPERATOR = frozenset({"operator"})
_EVERY_ROLE = frozenset({"operator", "partner", "driver"})
_OWN = frozenset({"operator", "partner", "own"})
EXPECTED: dict[tuple[str, str], frozenset[str]] = {
    ("GET", "/api/devices"): _OPERATOR,
    ("GET", "/api/devices/{dev}"): _OPERATOR,
    ("GET", "/api/devices/{dev}/records"): _OPERATOR,
    ("POST", "/api/devices/{dev}/approve"): _OPERATOR,
    ("POST", "/api/devices/{dev}/revoke"): _OPERATOR,
    ("POST", "/api/devices/{dev}/clear"): _OPERATOR,
    ("GET", "/api/vehicles/{vin}/mileage"): _OPERATOR,
    ("GET", "/api/catalogue"): _EVERY_ROLE,
    ("GET", "/api/drivers/{id}"): _OWN,
    ("GET", "/api/wallets/{account}"): _OWN,
    ("POST", "/api/wallets/{account}/redeem"): _OWN,
    ("GET", "/api/checkpoint"): _OPERATOR,
    ("GET", "/api/openapi.json"): _EVERY_ROLE,
}
#: The query a route needs to answer 2xx.
QUERY: dict[tuple[str, str], dict[str, str]] = {
    ("GET", "/api/vehicles/{vin}/mileage"): {"from": "2026-09-01", "to": "2026-10-01"},
}


@dataclass
class World:
    db: Database
    client: TestClient
    app: Starlette
    dev: str
    bearer: dict[str, str | None]          # caller -> its bearer token (None: no Authorization)

    def headers(self, caller: str) -> dict[str, str]:
        token = self.bearer[caller]
        return {} if token is None else {"Authorization": f"Bearer {token}"}


def api_mount(app: Starlette) -> Mount:
    return next(r for r in app.routes if isinstance(r, Mount) and r.path == "/api")


def api_routes(app: Starlette) -> Iterator[tuple[str, str, Route]]:
    """(method, path template, route) of every route of the mounted /api app, HEAD left out."""
    mount = api_mount(app)
    for route in mount.routes:
        assert isinstance(route, Route), route
        for method in sorted((route.methods or set()) - {"HEAD"}):
            yield method, mount.path + route.path, route


def undeclared(app: Starlette) -> list[tuple[str, str]]:
    return [(m, p) for m, p, _ in api_routes(app) if roles.access(m, p) is None]


def make_token(db: Database, name: str, role: str, driver: str | None = None,
               expires_at: int | None = None, now_ms: int = T0) -> str:
    return api_tokens.add(db, name, role, driver, expires_at, now_ms)[0]


def balance(db: Database, account: str) -> int:
    with db.read() as tx:
        return accounts.balance(tx, account)


def flag(db: Database, dev: str) -> None:
    with db.write() as tx:
        tx.execute("UPDATE devices SET held_at = ?, held_reason = 'rollback' WHERE dev = ?", (NOW, dev))


@pytest.fixture
def world(db: Database, rules: Any, request: pytest.FixtureRequest) -> Iterator[World]:
    """Alice drives the device's vehicle (10 tokens earned), Bob has 10 tokens too; a token of each
    kind, and the api_token setting unless the test is parametrised with ``configured`` False."""
    d = Dongle(vin=VIN)
    enroll(db, d)
    for driver in ("alice", "bob"):
        assignments.add_driver(db, driver, driver.title(), T0)
    assignments.assign(db, "alice", VIN, T0, T0)
    assert store.process_batch(db, rules, d.dev, batch(d.odometer(1), d.confirmation("2026-W39")),
                               NOW).ack.balance == 10_000
    with db.write() as tx:
        accounts.transfer(tx, key="test:bob", from_account=accounts.ISSUER, to_account="driver:bob",
                          amount=10_000, now_ms=NOW)
    configured = getattr(request, "param", True)
    bearer: dict[str, str | None] = {
        "operator": make_token(db, "ops", "operator"),
        "setting": SETTING,
        "partner": make_token(db, "shop-north", "partner"),
        "driver:alice": make_token(db, "alice-app", "driver", "alice"),
        "driver:bob": make_token(db, "bob-app", "driver", "bob"),
        "expired": make_token(db, "old", "operator", expires_at=NOW - 1, now_ms=NOW - 2),
        "revoked": make_token(db, "gone", "operator"),
        "unknown": "odo-at-" + "x" * 43,
        "none": None,
    }
    api_tokens.revoke(db, "gone", T0 + 1)
    if not configured:
        bearer["unknown"], bearer["setting"] = SETTING, None
    app = create_app(AppContext(db=db, rules=rules, api_token=SETTING if configured else None,
                                clock=lambda: NOW))
    with TestClient(app) as client:
        yield World(db, client, app, d.dev, bearer)


def path_for(template: str, values: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: values[m.group(1)], template)


def targets(template: str, dev: str) -> list[tuple[str | None, dict[str, str]]]:
    """The driver each call is about (None: no driver) and the path parameters for it."""
    base = {"dev": dev, "vin": VIN}
    if "{account}" in template or "{id}" in template:
        return [(who, {**base, "account": f"driver:{who}", "id": who}) for who in ("alice", "bob")]
    return [(None, base)]


def allowed(caller: str, expected: frozenset[str], about: str | None) -> bool:
    if caller in OPERATORS:
        return True
    if caller == "partner":
        return "partner" in expected
    if caller.startswith("driver:"):
        return "driver" in expected or ("own" in expected and caller == f"driver:{about}")
    return False


@pytest.mark.parametrize("world", [True, False], indirect=True, ids=["with-setting", "tokens-only"])
def test_every_route_with_every_caller(world: World) -> None:
    walked = 0
    keys = 0
    for method, template, _ in api_routes(world.app):
        assert (method, template) in roles.ACCESS, f"{method} {template}: not declared in backend.web.roles"
        assert (method, template) in EXPECTED, f"{method} {template}: this test does not know the route"
        for about, values in targets(template, world.dev):
            path = path_for(template, values)
            for caller in CALLERS:
                if template.endswith("/clear"):
                    flag(world.db, world.dev)
                body = None
                if template.endswith("/redeem"):
                    keys += 1
                    body = {"item": "car-wash", "idempotency_key": f"walk-{keys}"}
                before = snapshot(world.db)
                r = world.client.request(method, path, headers=world.headers(caller), json=body,
                                         params=QUERY.get((method, template)))
                who = f"{caller} {method} {path}"
                if world.bearer[caller] is None or caller in REFUSED:
                    assert r.status_code == 401, who
                    assert r.headers["www-authenticate"].startswith("Bearer"), who
                elif allowed(caller, EXPECTED[method, template], about):
                    assert 200 <= r.status_code < 300, f"{who}: {r.status_code} {r.text}"
                else:
                    assert r.status_code == 403, f"{who}: {r.status_code} {r.text}"
                assert "error" in r.json() or r.status_code < 300, who
                if r.status_code >= 300:
                    assert snapshot(world.db) == before, f"{who} was refused but changed what is stored"
                if template.startswith("/api/devices") and r.status_code < 300:
                    assert caller in OPERATORS, f"{who}: only an operator touches the devices"
                walked += 1
    assert walked >= 13 * len(CALLERS)
    # each wallet paid for the allowed redemptions only: the operators, the partner, its own driver
    paid = 3 + (world.bearer["setting"] is not None)
    assert balance(world.db, "driver:alice") == balance(world.db, "driver:bob") == 10_000 - paid * 1000


def test_a_driver_sees_and_spends_only_their_own_wallet(world: World) -> None:
    alice, bob = world.headers("driver:alice"), world.headers("driver:bob")
    assert world.client.get("/api/wallets/driver:alice", headers=alice).json()["balance"] == 10_000
    mine = world.client.get("/api/drivers/alice", headers=alice).json()
    assert mine["id"] == "alice" and mine["name"] == "Alice" and mine["balance"] == 10_000
    assert len(mine["transfers"]) == 1 and mine["transfers"][0]["delta"] == 10_000
    for path in ("/api/wallets/driver:bob", "/api/drivers/bob", f"/api/wallets/unassigned:{world.dev}",
                 "/api/wallets/issuer", "/api/drivers/nobody", "/api/wallets/driver:nobody"):
        r = world.client.get(path, headers=alice)
        assert r.status_code == 403 and "driver:alice may not" in r.json()["error"], path
    body = {"item": "car-wash", "idempotency_key": "k1"}
    r = world.client.post("/api/wallets/driver:bob/redeem", headers=alice, json=body)
    assert r.status_code == 403
    assert world.client.post("/api/wallets/driver:alice/redeem", headers=bob, json=body).status_code == 403
    assert balance(world.db, "driver:bob") == 10_000 and balance(world.db, "driver:alice") == 10_000
    made = world.client.post("/api/wallets/driver:alice/redeem", headers=alice, json=body)
    assert made.status_code == 200 and made.json()["from_account"] == "driver:alice"
    assert world.client.get("/api/drivers/alice", headers=alice).json()["balance"] == 9_000
    # the percent-encoded path names the same account, and is judged as such
    assert world.client.get("/api/wallets/driver%3Abob", headers=alice).status_code == 403
    assert world.client.get("/api/wallets/driver%3Aalice", headers=alice).status_code == 200


def test_a_partner_redeems_for_any_driver_but_never_touches_a_device(world: World) -> None:
    partner = world.headers("partner")
    for driver in ("alice", "bob"):
        r = world.client.post(f"/api/wallets/driver:{driver}/redeem", headers=partner,
                              json={"item": "tyre-voucher", "idempotency_key": "order-1"})
        assert r.status_code == 200 and r.json()["amount"] == 5000
        assert world.client.get(f"/api/drivers/{driver}", headers=partner).json()["balance"] == 5000
    assert world.client.get(f"/api/wallets/unassigned:{world.dev}", headers=partner).status_code == 200
    catalogue = world.client.get("/api/catalogue", headers=partner).json()
    assert catalogue["rules_version"] == "test-2026"
    assert catalogue["items"] == [{"item": "car-wash", "milli_tokens": 1000},
                                  {"item": "tyre-voucher", "milli_tokens": 5000}]
    flag(world.db, world.dev)
    for action in ("approve", "revoke", "clear"):
        r = world.client.post(f"/api/devices/{world.dev}/{action}", headers=partner)
        assert r.status_code == 403 and "partner may not" in r.json()["error"], action
    for path in ("/api/devices", f"/api/devices/{world.dev}", f"/api/devices/{world.dev}/records",
                 "/api/checkpoint"):
        assert world.client.get(path, headers=partner).status_code == 403, path
    row = world.db.one("SELECT status, held_at FROM devices WHERE dev = ?", (world.dev,))
    assert row is not None and row["status"] == "approved" and row["held_at"] == NOW


def test_who_decided_is_the_tokens_name(world: World) -> None:
    r = world.client.post(f"/api/devices/{world.dev}/revoke", headers=world.headers("operator"))
    assert r.status_code == 200 and r.json()["enrollment"]["decided_by"] == "api:ops"
    r = world.client.post(f"/api/devices/{world.dev}/approve", headers=world.headers("setting"))
    assert r.status_code == 200 and r.json()["enrollment"]["decided_by"] == "api"


def test_unknown_paths_methods_and_drivers(world: World) -> None:
    for caller in REFUSED:
        assert world.client.get("/api/no-such-path", headers=world.headers(caller)).status_code == 401
    for caller in ("operator", "partner", "driver:alice"):
        r = world.client.get("/api/no-such-path", headers=world.headers(caller))
        assert r.status_code == 404 and r.json() == {"error": "no such path /api/no-such-path"}
    ops = world.headers("operator")
    assert world.client.get("/api/drivers/nobody", headers=ops).status_code == 404
    assert world.client.get("/api/drivers/bad%20id!", headers=ops).status_code == 404
    assert world.client.get("/api/catalogue", headers=ops).status_code == 200
    assert world.client.post("/api/catalogue", headers=ops).status_code == 405
    assert world.client.post("/api/catalogue").status_code == 401
    assert world.client.head("/api/catalogue", headers=world.headers("driver:bob")).status_code == 200


def test_refusals_say_why(world: World) -> None:
    answers = {caller: world.client.get("/api/catalogue", headers=world.headers(caller)).json()["error"]
               for caller in REFUSED}
    assert answers["none"].startswith("missing Authorization: Bearer")
    assert answers["unknown"].startswith("unknown bearer token")
    assert answers["expired"].startswith("the API token old is expired")
    assert answers["revoked"].startswith("the API token gone is revoked")
    for header in ("Basic b3BzOnB3", "Bearer", "Bearer " + "a" * 5000, world.bearer["partner"] or ""):
        assert world.client.get("/api/catalogue", headers={"Authorization": header}).status_code == 401
    r = world.client.get("/api/catalogue", headers={"Authorization": f"bearer  {world.bearer['partner']} "})
    assert r.status_code == 200


def test_revoked_and_expired_tokens_stop_at_once(db: Database, rules: Any) -> None:
    clock = [NOW]
    with TestClient(create_app(AppContext(db=db, rules=rules, clock=lambda: clock[0]))) as client:
        assert client.get("/api/devices").status_code == 200          # no credential: open, as before
        assert client.get("/api/checkpoint").status_code == 200
        token = make_token(db, "short", "partner", expires_at=NOW + 1000, now_ms=NOW)
        auth = {"Authorization": f"Bearer {token}"}
        assert client.get("/api/catalogue").status_code == 401         # a token exists: closed now
        assert client.get("/api/catalogue", headers=auth).status_code == 200
        clock[0] = NOW + 1000
        assert client.get("/api/catalogue", headers=auth).status_code == 401
        other = make_token(db, "other", "operator", now_ms=clock[0])
        auth = {"Authorization": f"Bearer {other}"}
        assert client.get("/api/devices", headers=auth).status_code == 200
        assert api_tokens.revoke(db, "other", clock[0])[1] is True
        assert client.get("/api/devices", headers=auth).status_code == 401
        assert client.get("/api/devices").status_code == 401           # every token revoked: still closed


def test_a_route_without_a_declaration_is_refused_to_everyone(world: World,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert undeclared(world.app) == []
    ops = world.headers("operator")
    assert world.client.get("/api/catalogue", headers=ops).status_code == 200
    table = {k: v for k, v in roles.ACCESS.items() if k != ("GET", "/api/catalogue")}
    monkeypatch.setattr(roles, "ACCESS", MappingProxyType(table))
    assert undeclared(world.app) == [("GET", "/api/catalogue")]
    for caller in (*OPERATORS, "partner", "driver:alice"):
        r = world.client.get("/api/catalogue", headers=world.headers(caller))
        assert r.status_code == 403 and "open to no role" in r.json()["error"], caller


def test_the_declarations_and_the_openapi_document_agree(world: World) -> None:
    doc = world.client.get("/api/openapi.json", headers=world.headers("driver:bob")).json()
    assert "bearer" in doc["components"]["securitySchemes"]
    for method, template, _ in api_routes(world.app):
        op = doc["paths"][template][method.lower()]
        declared = roles.ACCESS[method, template]
        assert op["security"] == [{"bearer": [r for r in roles.ROLES if r in declared.roles]}], template
        assert "403" in op["responses"] and "401" in op["responses"], template
        assert (op.get("x-driver-parameter") is None) == (declared.own is None), template
    assert doc["paths"]["/api/wallets/{account}"]["get"]["x-driver-parameter"] == {
        "name": "account", "value": "driver:{id}"}
    assert doc["paths"]["/api/devices"]["get"]["security"] == [{"bearer": ["operator"]}]
    assert doc["paths"]["/metrics"]["get"]["security"] == []


# -- odo-backend api-tokens ------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ODO_DB", "ODO_CONFIG", "ODO_API_TOKEN", "ODO_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        status = main(list(argv))
    except SystemExit as exc:                 # argparse
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


def listed(capsys: pytest.CaptureFixture[str], db_url: str) -> list[dict[str, Any]]:
    status, out, _ = run(capsys, "api-tokens", "list", "--db", db_url, "--json")
    assert status == 0
    rows = json.loads(out)
    assert isinstance(rows, list)
    return rows


def test_api_tokens_commands(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "api-tokens", "list", "--db", db_url)[1].startswith("no API tokens")
    status, out, err = run(capsys, "api-tokens", "add", "shop-north", "--role", "partner",
                           "--expires", "2099-01-01", "--db", db_url)
    token = out.strip()
    assert status == 0 and token.startswith("odo-at-") and out == token + "\n" and "only this once" in err
    assert run(capsys, "drivers", "add", "alice", "--db", db_url)[0] == 0
    status, out, _ = run(capsys, "api-tokens", "add", "alice-app", "--role", "driver", "--driver", "alice",
                         "--db", db_url)
    alice_token = out.strip()
    assert status == 0 and alice_token != token
    rows = listed(capsys, db_url)
    assert [(r["name"], r["role"], r["state"]) for r in rows] == [("alice-app", "driver:alice", "active"),
                                                                  ("shop-north", "partner", "active")]
    assert rows[1]["expires_at"] == 4_070_908_800_000 and rows[0]["expires_at"] is None
    text = run(capsys, "api-tokens", "list", "--db", db_url)[1]
    assert "shop-north\tpartner\texpires 2099-01-01T00:00:00Z" in text
    for shown in (text, json.dumps(rows)):
        assert token not in shown and alice_token not in shown and token[7:20] not in shown
    db = Database.open(db_url)
    try:
        stored = db.query("SELECT token_hash FROM api_tokens")
        assert token not in str(stored) and {r["token_hash"] for r in stored} == {
            api_tokens.token_hash(token), api_tokens.token_hash(alice_token)}
        assert api_tokens.authenticate(db, alice_token, None, NOW) == api_tokens.Principal(
            "driver", "alice", "alice-app")
        status, out, _ = run(capsys, "api-tokens", "revoke", "shop-north", "--db", db_url)
        assert status == 0 and "revoked" in out
        assert api_tokens.authenticate(db, token, None, NOW) == api_tokens.Refusal(
            "the API token shop-north is revoked")
    finally:
        db.close()
    status, out, _ = run(capsys, "api-tokens", "revoke", "shop-north", "--db", db_url)
    assert status == 0 and "already revoked" in out
    assert [r["state"] for r in listed(capsys, db_url)] == ["active", "revoked"]
    status, out, _ = run(capsys, "api-tokens", "add", "shop-north", "--role", "operator", "--db", db_url)
    assert status == 0                                   # a revoked token's name may be used again
    assert sorted((r["name"], r["state"]) for r in listed(capsys, db_url)) == [
        ("alice-app", "active"), ("shop-north", "active"), ("shop-north", "revoked")]


@pytest.mark.parametrize("argv, message", [
    (("add", "x", "--role", "admin"), "invalid choice"),
    (("add", "x"), "--role"),
    (("add", "x", "--role", "driver"), "--driver: required"),
    (("add", "x", "--role", "driver", "--driver", "nobody"), "no driver 'nobody'"),
    (("add", "x", "--role", "driver", "--driver", "bad id!"), "not a driver id"),
    (("add", "x", "--role", "partner", "--driver", "alice"), "--driver: only with --role driver"),
    (("add", "x", "--role", "operator", "--expires", "soon"), "--expires"),
    (("add", "x", "--role", "operator", "--expires", "2001-01-01"), "in the future"),
    (("add", "bad name!", "--role", "operator"), "name 'bad name!'"),
    (("add", "-x", "--role", "operator"), ""),
    (("add", "alice-app", "--role", "operator"), "named 'alice-app' exists"),
    (("revoke", "nobody"), "no API token named 'nobody'"),
    (("revoke", "bad name!"), "not an API token's name"),
])
def test_api_tokens_bad_input_exits_2(db_url: str, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...],
                                      message: str) -> None:
    assert run(capsys, "drivers", "add", "alice", "--db", db_url)[0] == 0
    assert run(capsys, "api-tokens", "add", "alice-app", "--role", "driver", "--driver", "alice",
               "--db", db_url)[0] == 0
    before = listed(capsys, db_url)
    status, out, err = run(capsys, "api-tokens", *argv, "--db", db_url)
    assert status == 2 and message in err and out == "", (status, out, err)
    assert listed(capsys, db_url) == before

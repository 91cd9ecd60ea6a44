"""The HTTP server's doors (docs/DESIGN.md §7): ``odo-backend run`` does not start with the API
open unless told to, JSON bodies must say they are JSON, cross-site state-changing requests are
refused, logins are throttled per address and per name with the password checks in a pool of
their own, cookies are Secure off loopback, and ``/metrics`` is not served to just anyone."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

import backend.cli as backend_cli
from backend import config, service
from backend.db import Database
from backend.web import auth, portal_auth
from backend.web.app import create_app
from backend.web.auth import Busy, LoginThrottle, PasswordPool, client_key
from backend.web.context import AppContext
from sim.broker import Broker
from sim.devices import write_rules
from sim.processes import free_port
from tests import dashboard_seed as seed
from tests.backend_process import ROOT, Backend
from tests.test_dashboard import CSRF_RE, Clock, TestClient

TOKEN = "api-token-of-the-door-tests"
METRICS_TOKEN = "metrics-token-of-the-door-tests"
MIN = 60_000


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ODO_")}


def run_argv(tmp_path: Path, db_url: str, broker_url: str = "mqtt://127.0.0.1:1", *extra: str,
             port: int | None = None) -> list[str]:
    return [sys.executable, "-m", "backend.cli", "--log-level", "info", "run", "--db", db_url,
            "--broker", broker_url, "--http", f"127.0.0.1:{port or free_port()}",
            "--rules", str(write_rules(tmp_path)), *extra]


def start(tmp_path: Path, db_url: str, broker: Broker, *extra: str, name: str = "backend") -> Backend:
    port = free_port()
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(run_argv(tmp_path, db_url, broker.url, *extra, port=port), cwd=ROOT,
                                env=_env(), stdout=out, stderr=subprocess.STDOUT)
    backend = Backend(proc, port, log)
    backend.wait_healthy()
    return backend


def secret_file(tmp_path: Path, name: str, value: str) -> str:
    path = tmp_path / name
    path.write_text(value + "\n")
    path.chmod(0o600)
    return str(path)


# -- starting without credentials --------------------------------------------------------------

def test_run_refuses_to_start_without_api_credentials(tmp_path: Path, db_url: str) -> None:
    done = subprocess.run(run_argv(tmp_path, db_url), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 78, done.stderr
    assert "odo-backend: api_token: no API credential" in done.stderr
    for advice in ("odo-backend api-tokens add", "--api-token-file", "--insecure-no-auth"):
        assert advice in done.stderr, done.stderr


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_insecure_no_auth_only_as_the_flag(tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("ODO_")]:
        monkeypatch.delenv(key)
    argv = run_argv(tmp_path, db_url)[5:]
    monkeypatch.setenv("ODO_INSECURE_NO_AUTH", "1")
    assert backend_cli.main(argv) == 78
    assert "ODO_INSECURE_NO_AUTH: is taken only as the command-line flag" in capsys.readouterr().err


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_secret_files_are_checked_before_starting(tmp_path: Path, db_url: str,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("ODO_")]:
        monkeypatch.delenv(key)
    base = run_argv(tmp_path, db_url)[5:]
    good = secret_file(tmp_path, "token", TOKEN)
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "spaced").write_text("two words\n")
    cases = [
        (["--api-token", TOKEN, "--api-token-file", good], "--api-token-file: api_token is given too"),
        (["--api-token-file", str(tmp_path / "missing")], "--api-token-file: "),
        (["--api-token-file", str(tmp_path / "empty")], "is empty"),
        (["--api-token-file", str(tmp_path / "spaced")], "without spaces"),
        (["--fleet-token-file", str(tmp_path / "empty")], "--fleet-token-file: "),
        (["--metrics-token-file", str(tmp_path / "empty")], "--metrics-token-file: "),
        (["--allowed-origin", "https://shop.example/path"], "--allowed-origin: "),
        (["--metrics-listen", base[base.index("--http") + 1]], "--metrics-listen: "),
    ]
    for extra, message in cases:
        assert backend_cli.main([*base, *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "b.db").exists()


def test_insecure_no_auth_starts_open_and_says_so(tmp_path: Path, db_url: str, broker: Broker) -> None:
    metrics_port = free_port()
    be = start(tmp_path, db_url, broker, "--insecure-no-auth",
               "--metrics-listen", f"127.0.0.1:{metrics_port}",
               "--metrics-token-file", secret_file(tmp_path, "metrics", METRICS_TOKEN))
    try:
        assert "INSECURE: --insecure-no-auth and no API credential" in be.log.read_text()
        assert httpx.get(be.url + "/api/devices", timeout=5).status_code == 200
        # /metrics is on its own listener, behind its token
        r = httpx.get(be.url + "/metrics", timeout=5)
        assert r.status_code == 404 and "metrics listener" in r.json()["error"]
        mine = f"http://127.0.0.1:{metrics_port}/metrics"
        assert httpx.get(mine, timeout=5).status_code == 401
        r = httpx.get(mine, headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=5)
        assert r.status_code == 200 and "odo_records" in r.text
        assert httpx.get(f"http://127.0.0.1:{metrics_port}/api/devices", timeout=5).status_code == 404
    finally:
        assert be.stop() == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_token_file_or_a_stored_token_is_a_credential(tmp_path: Path, db_url: str, broker: Broker) -> None:
    be = start(tmp_path, db_url, broker, "--api-token-file", secret_file(tmp_path, "api", TOKEN),
               "--fleet-token-file", secret_file(tmp_path, "fleet", "fleet-token-of-the-door-tests"))
    try:
        assert TOKEN not in " ".join(be.process.args)                        # type: ignore[arg-type]
        assert httpx.get(be.url + "/api/devices", timeout=5).status_code == 401
        assert httpx.get(be.url + "/api/devices", headers={"Authorization": f"Bearer {TOKEN}"},
                         timeout=5).status_code == 200
        assert "INSECURE" not in be.log.read_text()
    finally:
        assert be.stop() == 0
    made = subprocess.run([sys.executable, "-m", "backend.cli", "api-tokens", "add", "ops",
                           "--role", "operator", "--db", db_url],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    stored = made.stdout.strip().split()[-1]
    assert stored.startswith("odo-at-")
    be = start(tmp_path, db_url, broker, name="second")
    try:
        assert httpx.get(be.url + "/api/devices", timeout=5).status_code == 401
        assert httpx.get(be.url + "/api/devices", headers={"Authorization": f"Bearer {stored}"},
                         timeout=5).status_code == 200
    finally:
        assert be.stop() == 0


# -- content type and origin -------------------------------------------------------------------

@pytest.fixture
def api(db_url: str) -> Iterator[tuple[TestClient, Database, seed.Fleet]]:
    db = Database.open(db_url)
    fleet = seed.seed(db)
    app = create_app(AppContext(db=db, clock=Clock(), api_token=TOKEN),
                     allowed_origins=("https://console.example.net",))
    with TestClient(app, base_url="http://odo.example:8080") as client:
        client.headers["Authorization"] = f"Bearer {TOKEN}"
        yield client, db, fleet
    db.close()


def test_json_bodies_must_say_json(api: tuple[TestClient, Database, seed.Fleet]) -> None:
    client, db, fleet = api
    url = f"/api/devices/{fleet.pending.dev}/approve"
    for content_type in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x", "application/jsonx", None):
        headers = {} if content_type is None else {"Content-Type": content_type}
        r = client.post(url, headers=headers, content=b"{}")
        assert r.status_code == 415, content_type
        assert "Content-Type: application/json" in r.json()["error"]
    assert client.post(url, headers={"Content-Type": "text/plain"}).status_code == 415   # even empty
    assert db.one("SELECT status FROM devices WHERE dev = ?", (fleet.pending.dev,)) == {"status": "pending"}
    r = client.post(url, headers={"Content-Type": "Application/JSON; charset=utf-8"}, content=b"{}")
    assert r.status_code == 200, r.text
    assert client.post(f"/api/devices/{fleet.pending.dev}/revoke").status_code == 200   # no body, no type
    assert client.get("/api/devices", headers={"Content-Type": "text/plain"}).status_code == 200


def test_cross_origin_writes_are_refused(api: tuple[TestClient, Database, seed.Fleet]) -> None:
    client, db, fleet = api
    url = f"/api/devices/{fleet.pending.dev}/revoke"
    refused = [{"Origin": "https://evil.example"}, {"Origin": "http://odo.example:8081"},
               {"Origin": "https://odo.example:8080"}, {"Origin": "null"}, {"Origin": "garbage"},
               {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
               {"Origin": "http://odo.example:8080", "Sec-Fetch-Site": "cross-site"}]
    for headers in refused:
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            r = client.request(method, url, headers=headers)
            assert r.status_code == 403, (method, headers)
        assert "refused" in r.json()["error"]
    assert db.one("SELECT status FROM devices WHERE dev = ?", (fleet.pending.dev,)) == {"status": "pending"}
    # reads are not refused: they change nothing
    assert client.get("/api/devices", headers={"Origin": "https://evil.example"}).status_code == 200
    for headers in ({"Origin": "http://odo.example:8080", "Sec-Fetch-Site": "same-origin"},
                    {"Origin": "HTTP://ODO.EXAMPLE:8080"}, {"Sec-Fetch-Site": "none"},
                    {"Origin": "https://console.example.net", "Sec-Fetch-Site": "cross-site"}, {}):
        assert client.post(url, headers=headers).status_code == 200, headers
    # the server's own origin with its default port left out, on both sides
    with TestClient(client.app, base_url="https://odo.example") as tls:
        tls.headers["Authorization"] = f"Bearer {TOKEN}"
        assert tls.post(url, headers={"Origin": "https://odo.example:443"}).status_code == 200
        assert tls.post(url, headers={"Origin": "http://odo.example"}).status_code == 403


def test_forms_refuse_another_origin_too(db_url: str) -> None:
    db = Database.open(db_url)
    seed.seed(db)
    auth.add_operator(db, "op", seed.PASSWORD, seed.NOW)
    with TestClient(create_app(AppContext(db=db, clock=Clock()))) as client:
        token = CSRF_RE.search(client.get("/login").text)
        assert token
        data = {"username": "op", "password": seed.PASSWORD, "csrf": token.group(1)}
        r = client.post("/login", data=data, headers={"Origin": "https://evil.example"},
                        follow_redirects=False)
        assert r.status_code == 403 and auth.COOKIE not in r.cookies
        r = client.post("/login", data=data, headers={"Origin": "http://testserver"}, follow_redirects=False)
        assert r.status_code == 303 and auth.COOKIE in r.cookies
    db.close()


# -- login throttling --------------------------------------------------------------------------

class Site:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.clock = Clock()
        self.app = create_app(AppContext(db=db, clock=self.clock))

    def client(self, address: str) -> TestClient:
        return TestClient(self.app, client=(address, 40000))

    def login(self, client: TestClient, password: str, username: str = "op") -> httpx.Response:
        token = CSRF_RE.search(client.get("/login").text)
        assert token
        form = {"username": username, "password": password, "csrf": token.group(1)}
        return client.post("/login", data=form, follow_redirects=False)


@pytest.fixture
def site(db_url: str) -> Iterator[Site]:
    db = Database.open(db_url)
    db.migrate()
    auth.add_operator(db, "op", seed.PASSWORD, seed.NOW)
    yield Site(db)
    db.close()


def test_a_spray_from_one_address_neither_guesses_on_nor_locks_the_operator_out(site: Site) -> None:
    with site.client("198.51.100.7") as attacker, site.client("203.0.113.20") as operator:
        for i in range(10):
            assert site.login(attacker, f"guess number {i}").status_code == 401
        r = site.login(attacker, seed.PASSWORD)                    # even the right one: no more tries
        assert r.status_code == 429 and "from your address" in r.text
        assert int(r.headers["Retry-After"]) > 0
        assert site.login(attacker, "guess", username="someone-else").status_code == 429
        r = site.login(operator, seed.PASSWORD)
        assert r.status_code == 303 and auth.COOKIE in r.cookies
        site.clock.now += 15 * MIN + 1
        assert site.login(attacker, "guess after the window").status_code == 401


def test_an_ipv6_host_counts_as_its_64(site: Site) -> None:
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1" and client_key(None) == "unknown"
    for i in range(10):
        with site.client(f"2001:db8:1:2::{i + 1:x}") as c:
            assert site.login(c, f"guess {i}").status_code == 401
    with site.client("2001:db8:1:2::ff") as same_64, site.client("2001:db8:1:3::1") as next_64:
        assert site.login(same_64, seed.PASSWORD).status_code == 429
        assert site.login(next_64, seed.PASSWORD).status_code == 303


def test_the_per_name_limit_only_slows_guessing_from_many_addresses() -> None:
    throttle = LoginThrottle(per_address=3, address_window_ms=10 * MIN, per_name=5, name_window_ms=60 * MIN)
    for i in range(5):                                        # five addresses, one guess each at "op"
        assert throttle.check(f"192.0.2.{i}", "op", "username", 0) is None
        throttle.failed(f"192.0.2.{i}", "op", 0)
    refused = throttle.check("192.0.2.0", "op", "username", 1)           # a guesser again
    assert refused is not None and "for this username" in refused.message
    assert refused.retry_after_ms == 60 * MIN - 1
    assert throttle.check("192.0.2.0", "another", "username", 1) is None  # its other names: its own budget
    assert throttle.check("203.0.113.9", "op", "username", 1) is None     # the owner, from where they are
    throttle.failed("203.0.113.9", "op", 2)                               # a typo: now slowed as well
    assert throttle.check("203.0.113.9", "op", "username", 3) is not None
    assert throttle.check("203.0.113.9", "op", "username", 60 * MIN + 3) is None


def test_throttle_memory_is_bounded() -> None:
    throttle = LoginThrottle(per_address=3, per_name=5, max_keys=100)
    for i in range(5_000):
        throttle.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", f"name-{i}", i)
        throttle.failed("192.0.2.1", "op", i)
    for limiter in (throttle.by_address, throttle.by_name):
        assert len(limiter._failures) <= 100
        assert all(len(times) <= limiter.max_failures for times in limiter._failures.values())
    assert throttle.check("192.0.2.1", "x", "username", 5_000) is not None    # the busy key is kept


def test_the_portal_is_throttled_per_address_too(db_url: str) -> None:
    db = Database.open(db_url)
    seed.seed(db)
    portal_auth.set_driver_password(db, "alice", seed.PASSWORD, seed.NOW)
    app = create_app(AppContext(db=db, clock=Clock()))

    def login(client: TestClient, password: str) -> httpx.Response:
        token = CSRF_RE.search(client.get("/driver/login").text)
        assert token
        form = {"driver": "alice", "password": password, "csrf": token.group(1)}
        return client.post("/driver/login", data=form, follow_redirects=False)

    with TestClient(app, client=("198.51.100.7", 1)) as attacker, \
            TestClient(app, client=("203.0.113.5", 1)) as me:
        for i in range(10):
            assert login(attacker, f"guess number {i}").status_code == 401
        assert login(attacker, seed.PASSWORD).status_code == 429
        assert login(me, seed.PASSWORD).status_code == 303
    db.close()


def test_passwords_are_checked_in_their_own_bounded_pool(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    real = auth.verify_password

    def verify(stored: str | None, password: str) -> bool:
        threads.append(threading.current_thread().name)
        return real(stored, password)

    monkeypatch.setattr(auth, "verify_password", verify)
    with site.client("192.0.2.50") as c:
        assert site.login(c, seed.PASSWORD).status_code == 303
    assert threads and all(name.startswith("odo-password") for name in threads)
    assert auth.PASSWORDS.workers <= 4


def test_a_full_password_pool_answers_at_once(db_url: str) -> None:
    pool = PasswordPool(workers=1, queue=1)
    release = threading.Event()
    db = Database.open(db_url)

    def slow(db: Database) -> int:
        release.wait(10)
        return 1

    async def three() -> list[Any]:
        first = asyncio.ensure_future(pool.call(db, slow))
        second = asyncio.ensure_future(pool.call(db, slow))
        await asyncio.sleep(0.05)
        try:
            await pool.call(db, slow)
        except Busy:
            busy = True
        else:
            busy = False
        release.set()
        return [busy, await first, await second, await pool.call(db, lambda db: 2)]

    assert asyncio.run(three()) == [True, 1, 1, 2]
    db.close()


def test_a_busy_pool_is_a_503_with_retry_after(site: Site) -> None:
    pool = PasswordPool(workers=1, queue=0)
    release = threading.Event()

    def blocked(db: Database, name: str, form: Any, now_ms: int) -> tuple[str, int] | None:
        release.wait(10)
        return None

    ctx = AppContext(db=site.db, clock=site.clock)
    app = Starlette(routes=auth.login_routes(ctx, auth.OPERATORS, blocked, pool=pool))

    async def two() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            page = await c.get("/login")
            token = CSRF_RE.search(page.text)
            assert token
            data = {"username": "op", "password": "x", "csrf": token.group(1)}
            first = asyncio.ensure_future(c.post("/login", data=data))
            await asyncio.sleep(0.2)
            second = await c.post("/login", data=data)
            release.set()
            return [await first, second]

    first, second = asyncio.run(two())
    assert first.status_code == 303
    assert second.status_code == 503 and second.headers["Retry-After"] == "5" and "busy" in second.text


# -- cookies -----------------------------------------------------------------------------------

def run_config(tmp_path: Path, http: str, **more: Any) -> config.RunConfig:
    args = argparse.Namespace(db=f"sqlite:///{tmp_path}/c.db", broker="mqtt://127.0.0.1:1", http=http,
                              rules=None, api_token=TOKEN, config=None, **more)
    return config.run_config(config.settings(args, environ={}))


def test_secure_cookies_unless_loopback(tmp_path: Path) -> None:
    for http, secure in (("127.0.0.1:8080", False), ("[::1]:8080", False), ("localhost:8080", False),
                         ("0.0.0.0:8080", True), ("192.168.1.10:8080", True), ("[::]:8080", True)):
        assert run_config(tmp_path, http).secure_cookies is secure, http
    toml = tmp_path / "backend.toml"
    toml.write_text("secure_cookies = false\n")
    args = argparse.Namespace(db=f"sqlite:///{tmp_path}/c.db", broker="mqtt://127.0.0.1:1",
                              http="0.0.0.0:8080", rules=None, api_token=TOKEN, config=str(toml))
    assert config.run_config(config.settings(args, environ={})).secure_cookies is False
    assert config.run_config(config.settings(args, environ={"ODO_SECURE_COOKIES": "true"})).secure_cookies


@pytest.mark.parametrize("http", ["127.0.0.1:8080", "0.0.0.0:8080"])
def test_cookie_attributes(tmp_path: Path, db_url: str, http: str) -> None:
    cfg = run_config(tmp_path, http)
    db = Database.open(db_url)
    seed.seed(db)
    auth.add_operator(db, "op", seed.PASSWORD, seed.NOW)
    portal_auth.set_driver_password(db, "alice", seed.PASSWORD, seed.NOW)
    app = create_app(AppContext(db=db, clock=Clock(), secure_cookies=cfg.secure_cookies))
    cookies: dict[str, str] = {}
    with TestClient(app, base_url="https://testserver") as client:
        for path, data in (("/login", {"username": "op"}), ("/driver/login", {"driver": "alice"})):
            page = client.get(path)
            for c in page.headers.get_list("set-cookie"):
                cookies[c.split("=", 1)[0]] = c
            token = CSRF_RE.search(page.text)
            assert token
            r = client.post(path, data={**data, "password": seed.PASSWORD, "csrf": token.group(1)},
                            follow_redirects=False)
            assert r.status_code == 303
            for c in r.headers.get_list("set-cookie"):
                if "Max-Age=0" not in c and "expires=Thu, 01 Jan 1970" not in c:
                    cookies[c.split("=", 1)[0]] = c
    assert set(cookies) == {auth.COOKIE, auth.LOGIN_COOKIE, portal_auth.DRIVERS.cookie,
                            portal_auth.DRIVERS.login_cookie}
    for cookie in cookies.values():
        attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
        assert {"httponly", "samesite", "path"} <= attributes, cookie
        assert "samesite=strict" in cookie.lower(), cookie
        assert ("secure" in attributes) is (not http.startswith("127.")), (http, cookie)
    db.close()


# -- /metrics ----------------------------------------------------------------------------------

def metrics_status(cfg: config.RunConfig, db: Database, headers: dict[str, str] | None = None) -> int:
    main, own = service._metrics_doors(cfg)
    with TestClient(create_app(AppContext(db=db), metrics_door=main)) as client:
        return client.get("/metrics", headers=headers or {}).status_code


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_metrics_are_not_served_to_anyone(tmp_path: Path, db: Database) -> None:
    assert metrics_status(run_config(tmp_path, "127.0.0.1:8080"), db) == 200
    assert metrics_status(run_config(tmp_path, "0.0.0.0:8080"), db) == 404
    with_token = run_config(tmp_path, "0.0.0.0:8080",
                            metrics_token_file=secret_file(tmp_path, "metrics", METRICS_TOKEN))
    assert with_token.metrics_token == METRICS_TOKEN and "metrics-token" not in repr(with_token)
    assert metrics_status(with_token, db) == 401
    assert metrics_status(with_token, db, {"Authorization": "Bearer wrong"}) == 401
    assert metrics_status(with_token, db, {"Authorization": f"Bearer {METRICS_TOKEN}"}) == 200
    elsewhere = run_config(tmp_path, "127.0.0.1:8080", metrics_listen="127.0.0.1:9100")
    assert elsewhere.metrics_listen == ("127.0.0.1", 9100)
    assert metrics_status(elsewhere, db) == 404

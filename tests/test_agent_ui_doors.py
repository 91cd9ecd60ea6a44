"""The driver's page's doors: where it listens (loopback by default, the hotspot's interface, every
address only when told), the PIN (made by ``init``, kept hashed, ``pin set`` / ``pin reset``), the
sign-in session it needs for everything but the sign-in form, wrong PINs throttled per address,
and the page's confirmations limited to one a week plus quick corrections."""

from __future__ import annotations

import datetime
import http.client
import json
import logging
import re
import stat
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent import identity, page_limits, pin, ui
from agent.buffer import Outbox
from agent.config import load
from agent.errors import ConfigError
from protocol import records
from sim.processes import free_port
from tests.agent_helpers import odo
from tests.page_support import PIN, init, set_pin, sign_in, sign_in_response, ui_process

DAY_MS = 86_400_000
MINUTE_MS = 60_000
T0 = int(datetime.datetime(2026, 3, 2, 8, tzinfo=datetime.UTC).timestamp()) * 1000   # a Monday morning


@dataclass
class Client:
    """Raw HTTP to an in-process page, from a loopback address of its own (127.0.0.x)."""

    port: int
    source: str = "127.0.0.1"
    cookie: str = ""

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, form: dict[str, str] | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10, source_address=(self.source, 0))
        h = {"Cookie": self.cookie} if self.cookie else {}
        if form is not None:
            h |= {"Content-Type": "application/x-www-form-urlencoded", "Origin": self.origin}
        body = urllib.parse.urlencode(form or {}).encode()
        conn.request(method, path, body=body, headers={**h, **(headers or {})})
        resp = conn.getresponse()
        out = resp.status, dict(resp.getheaders()), resp.read().decode()
        conn.close()
        return out

    def token(self) -> str:
        form = self.request("GET", "/" if self.cookie else "/signin")[2]
        m = re.search(r'name="token" value="([^"]+)"', form)
        assert m
        return m.group(1)

    def try_pin(self, code: str) -> tuple[int, dict[str, str], str]:
        return self.request("POST", "/signin", {"pin": code, "token": self.token()})

    def confirm(self, km: str, **extra: str) -> int:
        return self.request("POST", "/confirm", {"km": km, "token": self.token(), **extra})[0]


@dataclass
class Page:
    state: Path
    outbox: Outbox
    app: ui.App
    port: int

    def client(self, source: str = "127.0.0.1", signed_in: bool = False) -> Client:
        c = Client(self.port, source)
        if signed_in:
            c.cookie = sign_in("127.0.0.1", self.port)
        return c

    def confirmations(self) -> list[int]:
        return [r.odo_m for r in self.outbox.records() if r.kind == "confirmation"]


def _state(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    identity.create(state)
    set_pin(state)
    return state


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    state = _state(tmp_path)
    cfg = load({"state_dir": str(state), "clock": "synced"}, {})
    outbox = Outbox.open(cfg.db_path)
    outbox.set_state({"live": {"odo_m": 45_000_000, "src": "obd", "obd": "connected", "t": 1}})
    server = ui.make_server(cfg, identity.load(state), outbox, f"127.0.0.1:{free_port()}")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield Page(state, outbox, server.RequestHandlerClass.app, server.server_address[1])  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()
    outbox.close()


# -- where it listens ----------------------------------------------------------------------------------

def test_the_page_listens_on_loopback_by_default(tmp_path: Path) -> None:
    cfg = load({"state_dir": str(tmp_path)}, {})
    assert cfg.ui_listen == "127.0.0.1:8080" and cfg.ui_interface is None
    assert ui.listen_address(cfg) == ("127.0.0.1", 8080)
    assert ui.listen_address(cfg, "0.0.0.0:9000") == ("0.0.0.0", 9000)          # --listen wins
    state = _state(tmp_path)
    port = free_port()
    (state / "agent.toml").write_text(f'ui_listen = "127.0.0.1:{port}"\n')
    with ui_process(state, tmp_path / "ui.log", port, listen=False):
        pass
    assert f"driver's page on http://127.0.0.1:{port}/" in (tmp_path / "ui.log").read_text()


def test_the_interface_form_listens_on_its_ipv4_address(tmp_path: Path) -> None:
    cfg = load({"state_dir": str(tmp_path)}, {"ODO_UI_INTERFACE": "lo", "ODO_UI_LISTEN": "127.0.0.1:8123"})
    assert ui.listen_address(cfg) == ("127.0.0.1", 8123)
    assert ui.listen_address(cfg, "127.0.0.1:9001") == ("127.0.0.1", 9001)   # --listen overrides it
    state = _state(tmp_path)
    port = free_port()
    (state / "agent.toml").write_text(f'ui_interface = "lo"\nui_listen = "0.0.0.0:{port}"\n')
    with ui_process(state, tmp_path / "ui.log", port, listen=False):
        assert sign_in("127.0.0.1", port).startswith(f"{pin.COOKIE}=")
    text = (tmp_path / "ui.log").read_text()
    assert f"driver's page on http://127.0.0.1:{port}/" in text and "every address" not in text


def _without_ipv4() -> list[str]:
    """This machine's interfaces that have no IPv4 address (``ip -j addr``)."""
    done = subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, timeout=10, check=True)
    return [i["ifname"] for i in json.loads(done.stdout)
            if not any(a.get("family") == "inet" for a in i.get("addr_info", []))]


def test_an_interface_without_an_address_is_named_and_the_page_does_not_start(tmp_path: Path) -> None:
    with pytest.raises(ui.ListenError, match="there is no network interface 'nosuch0'"):
        ui.interface_address("nosuch0")
    for name in _without_ipv4():
        with pytest.raises(ui.ListenError, match=f"{re.escape(name)} has no IPv4 address"):
            ui.interface_address(name)
    state = _state(tmp_path)
    (state / "agent.toml").write_text('ui_interface = "nosuch0"\n')
    res = odo("ui", "--state-dir", str(state), timeout=20)
    assert res.returncode == 1 and "ui_interface: there is no network interface 'nosuch0'" in res.stderr
    with pytest.raises(ConfigError, match="ui_interface: must be a network interface's name"):
        load({"state_dir": str(tmp_path)}, {"ODO_UI_INTERFACE": "wlan0; rm -rf /"})


def test_every_address_only_when_given_and_with_a_warning(tmp_path: Path, caplog: Any) -> None:
    state = _state(tmp_path)
    cfg = load({"state_dir": str(state)}, {})
    outbox = Outbox.open(cfg.db_path)
    with caplog.at_level(logging.WARNING, logger="agent.ui"):
        server = ui.make_server(cfg, identity.load(state), outbox, f"0.0.0.0:{free_port()}")
    server.server_close()
    outbox.close()
    assert any("listens on every address (0.0.0.0)" in r.getMessage() for r in caplog.records)


# -- the PIN -------------------------------------------------------------------------------------------

def test_init_prints_a_pin_and_keeps_only_its_salted_hash_0600(tmp_path: Path) -> None:
    state = tmp_path / "state"
    code = init(state)
    assert re.fullmatch(r"[0-9]{8}", code)
    stored = pin.path(state)
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    text = stored.read_text()
    assert code not in text and json.loads(text)["kdf"] == "scrypt"
    kept = pin.load(state)
    assert kept.matches(code) and not kept.matches(str((int(code) + 1) % 10**8).zfill(8))
    assert not kept.matches(code + " ") and not kept.matches("")
    other = tmp_path / "other"
    init(other)
    assert pin.load(other).salt != kept.salt                               # a salt of its own


def test_pin_reset_and_set_replace_it_and_sign_everyone_out(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = init(state)
    session = pin.load(state).cookie()
    res = odo("pin", "reset", "--state-dir", str(state))
    assert res.returncode == 0 and "dongle's label" in res.stderr
    second = res.stdout.strip()
    assert re.fullmatch(r"[0-9]{8}", second) and pin.load(state).matches(second)
    assert first == second or not pin.load(state).matches(first)
    assert not pin.load(state).session_ok(session)                 # a new session key
    res = odo("pin", "set", "--state-dir", str(state), stdin="1357924680\n")
    assert res.returncode == 0, res.stderr
    assert pin.load(state).matches("1357924680") and not pin.load(state).matches(second)
    before = pin.path(state).read_bytes()
    for bad in ("12345", "12ab5678", "1" * 13, ""):
        res = odo("pin", "set", "--state-dir", str(state), stdin=bad + "\n")
        assert res.returncode == 2 and "6 to 12 digits" in res.stderr, bad
    assert pin.path(state).read_bytes() == before
    res = odo("pin", "reset", "--state-dir", str(tmp_path / "nothing"))
    assert res.returncode == 78 and "odo-agent init" in res.stderr


def test_without_a_pin_the_page_does_not_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    identity.create(state)
    res = odo("ui", "--state-dir", str(state), "--listen", f"127.0.0.1:{free_port()}", timeout=20)
    assert res.returncode == 78 and "odo-agent pin reset" in res.stderr


# -- the session ------------------------------------------------------------------------------------

def test_nothing_is_shown_without_a_session(page: Page) -> None:
    c = page.client()
    status, headers, body = c.request("GET", "/")
    assert status == 303 and headers["Location"] == "/signin" and "45,000" not in body
    assert c.request("GET", "/status.json")[0] == 401
    status, _, body = c.request("GET", "/signin")
    assert status == 200 and 'id="pin"' in body and "45,000" not in body and "token" in body


@pytest.mark.parametrize("path", ["/confirm", "/claim"])
def test_every_signing_path_needs_a_session(page: Page, path: str) -> None:
    c = page.client()
    form = {"km": "45000.0", "code": "ABCD-EFGH", "token": c.token()}
    status, _, body = c.request("POST", path, form)
    assert status == 401 and "sign in first" in body
    assert page.outbox.records() == [] and page.outbox.state("claim_request") is None
    c.cookie = sign_in("127.0.0.1", page.port)
    assert c.request("POST", path, {**form, "token": c.token()})[0] == 303
    assert len(page.outbox.records()) == (1 if path == "/confirm" else 0)


def test_the_session_cookie_is_httponly_strict_and_short(page: Page) -> None:
    status, headers, _ = sign_in_response("127.0.0.1", page.port)
    assert status == 303
    attrs = [a.strip() for a in headers["Set-Cookie"].split(";")]
    assert attrs[0].startswith(f"{pin.COOKIE}=")
    assert {"HttpOnly", "SameSite=Strict", "Path=/", f"Max-Age={12 * 3600}"} <= set(attrs)
    kept = pin.load(page.state)
    value = attrs[0].split("=", 1)[1]
    assert kept.session_ok(value)
    expiry = int(value.split(".")[0])
    assert not kept.session_ok(value, now_s=expiry)                           # expired
    assert not kept.session_ok(kept.cookie(now_s=expiry + 3600))              # too far ahead of the clock
    assert not kept.session_ok(value[:-2] + ("AA" if value[-2:] != "AA" else "BB"))
    c = page.client()
    c.cookie = f"{pin.COOKIE}={value}"
    assert c.request("GET", "/")[0] == 200
    c.cookie = f"{pin.COOKIE}={kept.cookie(now_s=expiry - 2 * 12 * 3600)}"   # signed, but expired
    assert c.request("GET", "/")[0] == 303


def test_wrong_pins_are_throttled_per_address(page: Page) -> None:
    mallory, driver = page.client("127.0.0.2"), page.client("127.0.0.3")
    for _ in range(page_limits.MAX_TRIES):
        status, _, body = mallory.try_pin("00000000")
        assert status == 401 and 'id="signin-error"' in body and "Wrong PIN" in body
    status, headers, body = mallory.try_pin(PIN)                              # even the right one
    assert status == 429 and int(headers["Retry-After"]) > 0 and "Too many wrong PINs" in body
    assert "Set-Cookie" not in headers
    status, headers, _ = driver.try_pin(PIN)                                  # another address: in
    assert status == 303 and headers["Set-Cookie"].startswith(pin.COOKIE)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_the_lock_out_doubles_and_the_memory_is_bounded() -> None:
    clock = FakeClock()
    door = page_limits.SignInThrottle(clock)
    for lock_s in (300, 600, 1200, 2400, 3600, 3600):
        for _ in range(page_limits.MAX_TRIES):
            assert door.begin("a") is None
            door.failed("a")
        assert door.begin("a") == pytest.approx(lock_s)
        clock.t += lock_s - 1
        assert door.begin("a") == pytest.approx(1)
        clock.t += 1
    assert door.begin("a") is None
    door.succeeded("a")                                     # a right PIN forgets the address
    assert len(door) == 0
    for i in range(page_limits.MAX_CLIENTS):
        assert door.begin(f"10.0.0.{i}") is None
    assert door.begin("10.0.1.1") == page_limits.WINDOW_S     # full of addresses in their window
    assert len(door) == page_limits.MAX_CLIENTS
    clock.t += page_limits.WINDOW_S
    assert door.begin("10.0.1.1") is None                   # an idle one is forgotten for it
    assert len(door) == page_limits.MAX_CLIENTS


def test_concurrent_tries_are_counted_before_the_pin_is_checked() -> None:
    door = page_limits.SignInThrottle(FakeClock())
    results = [door.begin("a") for _ in range(page_limits.MAX_TRIES + 3)]
    assert results[: page_limits.MAX_TRIES] == [None] * page_limits.MAX_TRIES
    assert all(r is not None for r in results[page_limits.MAX_TRIES:])


# -- the page's confirmations ---------------------------------------------------------------------------

def test_one_confirmation_a_week_from_the_page_and_quick_corrections(page: Page) -> None:
    now = [T0]
    page.app.now_ms = lambda: now[0]
    c = page.client(signed_in=True)
    assert c.confirm("45000.1") == 303
    now[0] += 4 * MINUTE_MS
    assert c.confirm("45000.2") == 303                       # a typo, corrected
    assert c.confirm("45000.3") == 303
    assert c.confirm("45000.4") == 429                       # corrections used up
    now[0] += 7 * MINUTE_MS
    status, _, body = c.request("POST", "/confirm", {"km": "45000.5", "token": c.token()})
    assert status == 429 and 'id="limit"' in body and "odo-agent confirm" in body
    assert page.confirmations() == [45_000_100, 45_000_200, 45_000_300]
    # a new session does not buy more, nor does a new process of the page
    assert page.client(signed_in=True).confirm("45000.6") == 429
    assert page_limits.ConfirmationAllowance(page.state).take(records.iso_week(now[0]), now[0]) is False
    now[0] = T0 + 7 * DAY_MS                                 # next week
    assert records.iso_week(now[0]) != records.iso_week(T0)
    assert c.confirm("45100.0", force="1") == 303
    assert page.confirmations()[-1] == 45_100_000
    assert stat.S_IMODE((page.state / page_limits.ALLOWANCE_FILE).stat().st_mode) == 0o600
    # a figure asked again (too far from the device's) takes no slot
    assert c.confirm("99999.0") == 200 and len(page.confirmations()) == 4


def test_odo_agent_confirm_on_the_dongle_is_not_limited(page: Page) -> None:
    c = page.client(signed_in=True)
    page.app.now_ms = lambda: T0
    assert c.confirm("45000.1") == 303
    page.app.now_ms = lambda: T0 + 20 * MINUTE_MS            # the corrections' time is over
    assert c.confirm("45000.2") == 429
    for km in ("45000.3", "45000.4"):
        res = odo("confirm", "--state-dir", str(page.state), "--km", km, "--yes")
        assert res.returncode == 0, res.stderr
    assert page.confirmations() == [45_000_100, 45_000_300, 45_000_400]

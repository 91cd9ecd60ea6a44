"""The driver's page: the form's guards over raw HTTP, and the page on a phone in Chromium."""

from __future__ import annotations

import http.client
import json
import re
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent import identity, ui
from agent.buffer import Outbox
from agent.config import load
from agent.state import VIN
from protocol import b64
from protocol.messages import Ack, Rejection
from sim.processes import free_port
from tests.page_support import set_pin, sign_in, sign_in_browser

CHROMIUM = Path("/usr/bin/chromium")
INSTALL = "sudo apt-get update && sudo apt-get install -y chromium   (or: sudo make deps)"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
CAR_VIN = "WVWZZZ1JZXW000001"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@dataclass
class Page:
    host: str
    port: int
    outbox: Outbox
    cookie: str = ""          # the session, once signed in

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    def request(self, method: str, path: str, body: str = "", headers: dict[str, str] | None = None
                ) -> tuple[int, dict[str, str], str]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
        conn.request(method, path, body=body.encode(), headers={"Cookie": self.cookie, **(headers or {})})
        resp = conn.getresponse()
        out = resp.status, dict(resp.getheaders()), resp.read().decode()
        conn.close()
        return out

    def token(self) -> str:
        _, _, body = self.request("GET", "/")
        m = re.search(r'name="token" value="([^"]+)"', body)
        assert m
        return m.group(1)

    def post(self, km: str, *, origin: str | None = "", token: str | None = None, extra: str = "",
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        form = urllib.parse.urlencode({"km": km, "token": self.token() if token is None else token}) + extra
        h = {"Content-Type": "application/x-www-form-urlencoded"}
        if origin is not None:
            h["Origin"] = origin or self.origin
        h.update(headers or {})
        return self.request("POST", "/confirm", form, h)


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    state = tmp_path / "state"
    key = identity.create(state)
    set_pin(state)
    cfg = load({"state_dir": str(state), "clock": "synced"}, {})
    outbox = Outbox.open(cfg.db_path)
    outbox.set_state({"live": {"odo_m": 45_000_000, "src": "obd", "obd": "connected", "t": 1}})
    outbox.apply_ack(Ack(0, (), 12_500), 1)
    VIN.put(outbox, CAR_VIN)                  # the car this dongle last read a VIN from
    server = ui.make_server(cfg, key, outbox, f"127.0.0.1:{free_port()}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    yield Page("127.0.0.1", port, outbox, sign_in("127.0.0.1", port))
    server.shutdown()
    server.server_close()


def test_the_page_shows_the_figures_and_the_due_banner(page: Page) -> None:
    status, headers, body = page.request("GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "45,000.0 km" in body and "12.500 tokens" in body and 'id="due"' in body
    assert 'value="45000.0"' in body and "frame-ancestors 'none'" in headers["Content-Security-Policy"]


def test_a_same_origin_post_with_the_token_records_a_confirmation(page: Page) -> None:
    status, headers, _ = page.post("45001.2")
    assert status == 303 and headers["Location"] == "/?ok=1"
    row = page.outbox.latest("confirmation")
    assert row is not None and row.odo_m == 45_001_200
    # signed like `odo-agent confirm` signs it: with the car's VIN, so the backend checks it and
    # the vehicle's certificate carries it
    signed = json.loads(b64.decode(row.jws.split(".")[1]))
    assert signed["vin"] == CAR_VIN and signed["kind"] == "confirmation" and signed["odo_m"] == 45_001_200
    _, _, body = page.request("GET", "/?ok=1")
    assert 'id="ok"' in body and 'id="due"' not in body and "45,001.2 km (week" in body
    page.outbox.apply_ack(Ack(row.seq, (Rejection(row.seq, "implausible_distance"),)), 2)
    assert "not accepted: implausible distance" in page.request("GET", "/")[2]


@pytest.mark.parametrize(("kw", "status"), [
    ({"origin": "http://evil.example"}, 403),
    ({"origin": None}, 403),                                        # neither Origin nor Referer
    ({"origin": None, "headers": {"Referer": "http://evil.example/x"}}, 403),
    ({"token": "forged"}, 403),
    ({"headers": {"Sec-Fetch-Site": "cross-site"}}, 403),
    ({"headers": {"Host": "rebound.example:8080"}}, 421),            # DNS rebinding
    ({"headers": {"Content-Type": "text/plain"}}, 415),
])
def test_the_form_refuses_what_is_not_this_page(page: Page, kw: dict[str, Any], status: int) -> None:
    assert page.post("45001.2", **kw)[0] == status
    assert page.outbox.latest("confirmation") is None


def test_a_referer_from_this_page_is_enough_without_origin(page: Page) -> None:
    assert page.post("45001.2", origin=None, headers={"Referer": page.origin + "/"})[0] == 303


def test_a_bad_figure_is_a_400_and_a_far_one_asks_again(page: Page) -> None:
    status, _, body = page.post("45,001")
    assert status == 400 and "give whole kilometres" in body
    status, _, body = page.post("50000")
    assert status == 200 and 'id="warn"' in body and "Confirm anyway" in body
    assert page.outbox.latest("confirmation") is None
    assert page.post("50000", extra="&force=1")[0] == 303
    assert page.outbox.latest("confirmation").odo_m == 50_000_000  # type: ignore[union-attr]


def test_status_json(page: Page) -> None:
    status, _, body = page.request("GET", "/status.json")
    assert status == 200 and '"odo_m": 45000000' in body


def test_confirm_on_a_phone_in_chromium(page: Page, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.fail(f"Chromium is not installed at {CHROMIUM}; install it with: {INSTALL}")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=ARGS,
            viewport={"width": 360, "height": 740}, is_mobile=True, has_touch=True, timeout=30_000)
        try:
            tab = context.pages[0] if context.pages else context.new_page()
            tab.set_default_timeout(10_000)
            sign_in_browser(tab, page.origin)
            assert "week" in tab.inner_text("#due")
            assert tab.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            tab.screenshot(path=str(ARTIFACTS / "agent-ui-phone.png"), full_page=True)
            tab.fill("#km", "45000.4")
            tab.click("button[type=submit]")
            tab.wait_for_selector("#ok")
            assert tab.query_selector("#due") is None
            assert "45,000.4 km" in tab.inner_text("#confirmed")
        finally:
            context.close()
    assert page.outbox.latest("confirmation").odo_m == 45_000_400  # type: ignore[union-attr]

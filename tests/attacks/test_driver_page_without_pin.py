"""Attack: the driver's page without its PIN. A neighbour on the car's hotspot, who does not have the
PIN on the dongle's label, posts a confirmation (which would re-anchor a derived odometer) and a
claim of the car to ``odo-agent ui``: with no session cookie, a forged one, one signed with another
key, an expired one, and one from before the PIN was reset; then tries to guess the PIN. Nothing
is signed: the outbox holds exactly what it held, and the page's log keeps each refusal."""

from __future__ import annotations

import http.client
import re
import urllib.parse
from pathlib import Path

from agent import pin
from agent.buffer import Outbox
from agent.page_limits import MAX_TRIES
from tests.agent_helpers import odo
from tests.page_support import init, sign_in, sign_in_response, ui_process


def request(url: str, method: str, path: str, form: dict[str, str] | None = None,
            cookie: str | None = None) -> tuple[int, str]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Origin": url} if form else {}
    if cookie is not None:
        headers["Cookie"] = f"{pin.COOKIE}={cookie}"
    conn.request(method, path, body=urllib.parse.urlencode(form or {}).encode(), headers=headers)
    resp = conn.getresponse()
    out = resp.status, resp.read().decode()
    conn.close()
    return out


def outbox_of(state: Path) -> tuple[list[tuple[int, str]], object, object]:
    box = Outbox.open(state / "outbox.db")
    try:
        return ([(r.seq, r.jws) for r in box.records()], box.state("claim_request"), box.state("confirmed"))
    finally:
        box.close()


def test_driver_page_without_pin(tmp_path: Path) -> None:
    state = tmp_path / "state"
    label_pin = init(state)
    box = Outbox.open(state / "outbox.db")
    box.set_state({"live": {"odo_m": 45_000_000, "src": "obd", "obd": "connected", "t": 1}})
    box.close()
    log = tmp_path / "ui.log"
    with ui_process(state, log) as (_, url):
        port = int(url.rsplit(":", 1)[1])
        stale = sign_in("127.0.0.1", port, label_pin).split("=", 1)[1]    # the driver's, before a reset
        res = odo("pin", "reset", "--state-dir", str(state))
        assert res.returncode == 0, res.stderr
        expiry = int(stale.split(".")[0])
        cookies = {
            "none": None,
            "forged": f"{expiry}.{'A' * 22}.{'B' * 43}",
            "garbage": "x" * 5000,
            "another key": pin.Pin(b"s" * 16, b"h" * 32, 2**13, 8, 1, b"k" * 32).cookie(),
            "expired": pin.load(state).cookie(now_s=expiry - 2 * pin.SESSION_S),
            "before the reset": stale,
        }
        before = outbox_of(state)
        # the form token, which the sign-in form shows anyone: it is not what guards the forms
        token = re.findall(r'name="token" value="([^"]+)"', request(url, "GET", "/signin")[1])[0]
        for name, cookie in cookies.items():
            for path, form in (("/confirm", {"km": "45000.0"}), ("/confirm", {"km": "40000.0", "force": "1"}),
                               ("/claim", {"code": "ABCD-EFGH"})):
                status, body = request(url, "POST", path, {**form, "token": token}, cookie)
                assert status == 401 and "sign in first" in body, (name, path, status, body)
        status, body = request(url, "GET", "/", cookie=stale)
        assert status == 303 and "45,000" not in body                        # nor is anything shown
        # nor can the PIN on the label be guessed
        for guess in range(MAX_TRIES):
            status, _, _ = sign_in_response("127.0.0.1", port, f"{guess:08d}")
            assert status == 401
        status, headers, _ = sign_in_response("127.0.0.1", port, res.stdout.strip())
        assert status == 429 and "Set-Cookie" not in headers
        assert outbox_of(state) == before
        assert not (state / "ui-confirmations.json").exists()
    text = log.read_text()
    assert text.count("refused POST /confirm: sign in first") == 2 * len(cookies)
    assert text.count("refused POST /claim: sign in first") == len(cookies)
    assert text.count("wrong PIN from 127.0.0.1") == MAX_TRIES and "too many wrong PINs" in text

"""Miles: the exact conversion, ``odo-agent confirm --miles``, ``display_unit`` in the agent's
config, and the driver's page in miles (a real server, and the form in headless Chromium)."""

from __future__ import annotations

import http.client
import json
import re
import threading
import urllib.parse
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import pytest

from agent import identity, ui
from agent.buffer import Outbox
from agent.config import load
from common import units
from protocol import b64, records
from sim.processes import free_port
from tests.agent_helpers import odo
from tests.page_support import set_pin, sign_in, sign_in_browser

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
DEVICE_M = 19_868_317            # 12,345.6 mi (12,345.6 × 1609.344 = 19,868,317.2864 m)


# -- the conversion ------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "unit", "metres"), [
    ("1", "mi", 1609),                 # 1609.344
    ("0.5", "mi", 805),                # 804.672
    ("0.001", "mi", 2),                # 1.609344
    ("12345.6", "mi", 19_868_317),     # 19,868,317.2864
    ("7671.2", "mi", 12_345_600),      # 12,345,599.6928: up
    ("9999999.999", "mi", 16_093_439_998),
    ("0", "mi", 0),
    (" 12345.6 ", "km", 12_345_600),
    ("12345.678", "km", 12_345_678),
])
def test_a_typed_figure_is_exact_whole_metres(text: str, unit: str, metres: int) -> None:
    assert units.parse(text, unit) == metres
    exact = Fraction(text.strip()) * (Fraction(1_609_344, 1000) if unit == "mi" else 1000)
    assert abs(exact - metres) <= Fraction(1, 2)


def test_halves_round_up_and_there_is_never_a_float() -> None:
    assert units.to_metres(Fraction(1, 2), "km") == 500
    assert units.to_metres(Fraction(5, 1_609_344), "mi") == 0           # 0.005 m
    assert units.to_metres(Fraction(500, 1_609_344), "mi") == 1         # 0.5 m: up
    assert units.to_metres(Fraction(-500, 1_609_344), "mi") == -1       # away from zero
    # a float would lose this: 0.1 + 0.2 of a mile
    assert units.parse("0.3", "mi") == 483 == round(Fraction(3, 10) * Fraction(1_609_344, 1000))


@pytest.mark.parametrize("text", ["", "1,000", "1e3", "12.3456", "-1", "+1", "12345678", "1.", ".5",
                                  "١٢٣", "12 345", "nan", "inf", "1" * 40])
def test_a_malformed_figure_is_refused_saying_what_to_give(text: str) -> None:
    with pytest.raises(ValueError, match="give whole miles"):
        units.parse(text, "mi")


def test_figures_shown_in_each_unit() -> None:
    assert units.show(DEVICE_M, "mi") == "12,345.6 mi"
    assert units.show(45_000_049, "km") == "45,000.0 km" and units.show(45_000_050, "km") == "45,000.1 km"
    assert units.show(1_609_343, "mi", floor=True) == "999.9 mi"
    assert units.show(1_609_344, "mi") == "1,000.0 mi"
    assert units.show(None, "mi") == "unknown"
    assert units.decimal_text(1_609, "mi") == "1.000" and units.decimal_text(1_611, "mi") == "1.001"
    assert units.decimal_text(-2, "km") == "-0.002"
    assert units.input_text(DEVICE_M, "mi") == "12345.6"
    with pytest.raises(ValueError, match="must be km or mi"):
        units.check_unit("miles")


# -- the agent's config and odo-agent confirm -----------------------------------------------------

def _state(tmp_path: Path, odo_m: int = DEVICE_M, unit: str | None = "mi") -> Path:
    state = tmp_path / "state"
    identity.create(state)
    conf = 'clock = "synced"\n' + (f'display_unit = "{unit}"\n' if unit else "")
    (state / "agent.toml").write_text(conf)
    box = Outbox.open(state / "outbox.db")
    box.set_state({"live": {"odo_m": odo_m, "src": "obd", "obd": "connected", "t": 1}})
    box.close()
    return state


def _confirmed(state: Path) -> dict[str, object]:
    box = Outbox.open(state / "outbox.db")
    try:
        row = box.latest("confirmation")
        assert row is not None
        rec = records.verify(row.jws, identity.load(state).public)
        return dict(rec.fields)
    finally:
        box.close()


def test_display_unit_is_validated_and_defaults_to_km(tmp_path: Path) -> None:
    assert load({"state_dir": str(tmp_path)}, {}).display_unit == "km"
    assert load({"state_dir": str(tmp_path)}, {"ODO_DISPLAY_UNIT": "mi"}).display_unit == "mi"
    state = _state(tmp_path, unit="miles")
    res = odo("status", "--state-dir", str(state))
    assert res.returncode == 78 and "display_unit: must be one of km, mi" in res.stderr
    assert "in the config file" in res.stderr
    res = odo("status", "--state-dir", str(state), env={"ODO_DISPLAY_UNIT": "furlongs"})
    assert res.returncode == 78 and "display_unit" in res.stderr


def test_confirm_miles_signs_whole_metres_within_the_tolerance(tmp_path: Path) -> None:
    state = _state(tmp_path)
    res = odo("confirm", "--state-dir", str(state), "--miles", "12345.6", "--yes")
    assert res.returncode == 0, res.stderr
    assert "confirmed 12,345.6 mi" in res.stdout and f"{DEVICE_M} m" in res.stdout
    assert "differs" not in res.stderr                     # the exact figure is within 2 km, as miles
    fields = _confirmed(state)
    assert fields["odo_m"] == DEVICE_M and fields["device_odo_m"] == DEVICE_M
    assert isinstance(fields["odo_m"], int)


def test_a_figure_in_miles_read_as_km_would_miss_the_tolerance(tmp_path: Path) -> None:
    state = _state(tmp_path)
    res = odo("confirm", "--state-dir", str(state), "--km", "12345.6", "--yes")
    assert res.returncode == 0 and "differs from the device's" in res.stderr
    assert _confirmed(state)["odo_m"] == 12_345_600
    # 2 km is 1.24 mi: 12,347 mi is 2,253 m off the device's figure, and warned about, in miles
    res = odo("confirm", "--state-dir", str(state), "--miles", "12347", "--yes")
    assert res.returncode == 0 and "differs from the device's 12,345.6 mi by more than 1.2 mi" in res.stderr


def test_km_and_miles_go_one_at_a_time_and_bad_ones_are_usage_errors(tmp_path: Path) -> None:
    state = _state(tmp_path)
    res = odo("confirm", "--state-dir", str(state), "--km", "1", "--miles", "1", "--yes")
    assert res.returncode == 2 and "not allowed with argument" in res.stderr
    for bad in ("12,345", "1e4", "12345.6789", "x" * 100):
        res = odo("confirm", "--state-dir", str(state), "--miles", bad, "--yes")
        assert res.returncode == 2 and "give whole miles" in res.stderr, bad
    box = Outbox.open(state / "outbox.db")
    assert box.latest("confirmation") is None
    box.close()


def test_confirm_asks_in_the_configured_unit(tmp_path: Path) -> None:
    state = _state(tmp_path)
    res = odo("confirm", "--state-dir", str(state), stdin="12,345\n12345.7\ny\n")
    assert res.returncode == 0, res.stderr
    assert "Device odometer:   12,345.6 mi" in res.stdout
    assert "Dashboard odometer in mi [Enter = 12,345.6 mi]" in res.stdout
    assert "give whole miles" in res.stdout and "Confirm 12,345.7 mi?" in res.stdout
    assert _confirmed(state)["odo_m"] == units.parse("12345.7", "mi") == 19_868_478


# -- the driver's page in miles ---------------------------------------------------------------------

class MilesPage:
    def __init__(self, state: Path) -> None:
        cfg = load({"state_dir": str(state)}, {})
        assert cfg.display_unit == "mi"
        self.outbox = Outbox.open(cfg.db_path)
        self.server = ui.make_server(cfg, identity.load(state), self.outbox, f"127.0.0.1:{free_port()}")
        self.port = self.server.server_address[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.cookie = sign_in("127.0.0.1", self.port)

    def request(self, method: str, path: str, body: str = "",
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        conn.request(method, path, body=body.encode(), headers={"Cookie": self.cookie, **(headers or {})})
        resp = conn.getresponse()
        out = resp.status, dict(resp.getheaders()), resp.read().decode()
        conn.close()
        return out

    def post(self, fields: dict[str, str]) -> tuple[int, dict[str, str], str]:
        body = self.request("GET", "/")[2]
        token = re.search(r'name="token" value="([^"]+)"', body)
        assert token
        form = urllib.parse.urlencode({**fields, "token": token.group(1)})
        return self.request("POST", "/confirm", form, {"Content-Type": "application/x-www-form-urlencoded",
                                                       "Origin": self.origin})


@pytest.fixture
def miles_page(tmp_path: Path) -> Iterator[MilesPage]:
    state = _state(tmp_path)
    set_pin(state)
    page = MilesPage(state)
    yield page
    page.server.shutdown()
    page.server.server_close()
    page.outbox.close()


def test_the_page_shows_and_takes_miles(miles_page: MilesPage) -> None:
    status, _, body = miles_page.request("GET", "/")
    assert status == 200 and '<div class="big" id="odo">12,345.6 mi</div>' in body
    assert "Dashboard odometer (mi)" in body and 'name="mi"' in body and 'value="12345.6"' in body
    assert " km" not in body
    # a figure in km's field is not taken for miles
    assert miles_page.post({"km": "12345.6"})[0] == 400
    assert miles_page.post({"mi": "12,345"})[0] == 400
    status, _, body = miles_page.post({"mi": "12347"})
    assert status == 200 and 'id="warn"' in body and "by 1.4 mi" in body     # 2,253 m off: asks again
    assert miles_page.outbox.latest("confirmation") is None
    status, headers, _ = miles_page.post({"mi": "12345.6"})
    assert status == 303 and headers["Location"] == "/?ok=1"
    row = miles_page.outbox.latest("confirmation")
    assert row is not None and row.odo_m == DEVICE_M
    signed = json.loads(b64.decode(row.jws.split(".")[1]))
    assert signed["odo_m"] == DEVICE_M and signed["device_odo_m"] == DEVICE_M
    assert "12,345.6 mi (week" in miles_page.request("GET", "/")[2]


def test_confirm_in_miles_in_chromium(miles_page: MilesPage, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.fail(f"Chromium is not installed at {CHROMIUM} (sudo make deps)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=ARGS,
            viewport={"width": 360, "height": 740}, is_mobile=True, has_touch=True, timeout=30_000)
        try:
            tab = context.pages[0] if context.pages else context.new_page()
            tab.set_default_timeout(10_000)
            sign_in_browser(tab, miles_page.origin)
            assert tab.inner_text("label[for=mi]") == "Dashboard odometer (mi)"
            tab.fill("#mi", "12345.8")
            tab.click("button[type=submit]")
            tab.wait_for_selector("#ok")
            assert "12,345.8 mi" in tab.inner_text("#confirmed")
        finally:
            context.close()
    assert miles_page.outbox.latest("confirmation").odo_m == 19_868_639  # type: ignore[union-attr]

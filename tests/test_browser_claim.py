"""Claiming a car on the dongle's own page, in a real headless Chromium on a phone's viewport
(tests/browser_support.py), against the whole system on real parts (tests/claim_support.py):
the driver types the portal's code, the backend assigns the driver, the page says so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backend.ledger import claims
from common.clock import now_ms
from tests import browser_support
from tests.browser_support import PHONE, shot
from tests.claim_support import VIN, claim_stack
from tests.e2e_support import left_running
from tests.page_support import sign_in_browser

playwright, browser_for = browser_support.playwright, browser_support.browser_for     # the fixtures


def test_driver_claims_the_car_on_the_dongles_page(tmp_path: Path, browser_for: Any) -> None:
    with claim_stack(tmp_path / "stack") as cs:
        b = browser_for(PHONE, mobile=True)
        page = b.page
        sign_in_browser(page, cs.ui_url, cs.ui_pin)
        assert page.locator("#claim-status").count() == 0
        page.fill("#code", "not a code")
        page.click("#claim")
        assert "8 letters and digits" in page.inner_text("#claim-error")
        refused = "Failed to load resource: the server responded with a status of 400 (Bad Request)"
        assert b.errors == [refused]
        b.errors.clear()
        code = claims.pairing_code(cs.db, "alice", now_ms())
        page.fill("#code", " " + code.lower().replace("-", " "))     # as a person may type it
        shot(page, "agent-claim-typed")
        page.click("#claim")
        page.wait_for_url(cs.ui_url + "/?claim=1")
        page.locator("#claim-status", has_text="alice's").wait_for(timeout=30_000)   # the page refreshes
        assert page.inner_text("#claim-status").startswith("This car is alice's from ")
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        shot(page, "agent-claim-claimed")
        rows = cs.db.query("SELECT driver_id, valid_to FROM assignments WHERE vin = ?", (VIN,))
        assert rows == [{"driver_id": "alice", "valid_to": None}]
        assert page.locator("meta[http-equiv=refresh]").count() == 0          # no refresh once answered
        assert b.errors == [], b.errors
    assert left_running(tmp_path / "stack") == []

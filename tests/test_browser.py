"""The dashboard in a real headless Chromium (Debian's ``chromium``), driven by Playwright
(tests/browser_support.py: the app under uvicorn, the browser, screenshots in ``test-artifacts/``).
Chromium missing is a failure, never a skip.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from backend.db import Database
from backend.web import auth
from backend.web.app import create_app
from backend.web.context import AppContext
from tests import browser_support
from tests import dashboard_seed as seed
from tests.browser_support import ARTIFACTS, PHONE, serve, shot

playwright, browser_for = browser_support.playwright, browser_support.browser_for     # the fixtures

#: A date of the Unix epoch, as the pages write dates: what an unsynced clock must never show.
EPOCH_DATE = re.compile(r"\b1970-[01][0-9]-[0-3][0-9]")


@dataclass
class Served:
    url: str
    db: Database
    fleet: seed.Fleet


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    db = Database.open(f"sqlite:///{tmp_path_factory.mktemp('browser')}/backend.db")
    fleet = seed.seed(db)
    auth.add_operator(db, "op", seed.PASSWORD, seed.NOW)
    with serve(create_app(AppContext(db=db, clock=lambda: seed.NOW))) as url:
        yield Served(url, db, fleet)
    db.close()


def sign_in(page: Any, url: str) -> None:
    page.goto(url + "/")
    assert page.url.startswith(url + "/login"), "logged out, the fleet page sends to the login"
    page.fill("input[name=username]", "op")
    page.fill("input[name=password]", seed.PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(url + "/")


def status_of(db: Database, dev: str) -> dict[str, Any]:
    row = db.one("SELECT status, vin, flagged_vin, decided_by FROM devices WHERE dev = ?", (dev,))
    assert row is not None
    return row


def test_operator_approves_a_pending_enrolment_on_a_desktop(served: Served, browser_for: Any) -> None:
    b = browser_for({"width": 1280, "height": 900})
    page, fleet = b.page, served.fleet
    page.goto(served.url + "/enrolments")
    shot(page, "desktop-login")
    page.fill("input[name=username]", "op")
    page.fill("input[name=password]", "wrong password")
    page.click("button[type=submit]")
    assert "Wrong username or password" in page.inner_text(".error")
    assert b.errors == ["Failed to load resource: the server responded with a status of 401 (Unauthorized)"]
    b.errors.clear()
    sign_in(page, served.url)

    rows = page.locator("table.fleet tbody tr")
    assert rows.count() == 4
    assert fleet.flagged.vin in rows.nth(0).inner_text()     # problems first
    assert "never" in rows.nth(1).inner_text()               # the pending device was never seen
    assert not EPOCH_DATE.search(page.content())
    shot(page, "desktop-fleet")

    page.click(f"a[href='/devices/{fleet.good.dev}']")
    assert page.locator("svg circle.m-confirmation").count() == 4
    box = page.locator("figure.chart svg").bounding_box()
    assert box and box["width"] > 600 and box["height"] > 150
    shot(page, "desktop-device-good")

    page.goto(served.url + "/")
    page.click(f"a[href='/devices/{fleet.pending.dev}']")
    assert page.locator("h1 .badge").inner_text() == "pending"
    page.click("button.approve")
    page.wait_for_url(f"{served.url}/devices/{fleet.pending.dev}?done=approved")
    assert page.inner_text(".notice") == "Device approved."
    assert page.locator("h1 .badge").inner_text() == "approved"
    assert page.locator("button.approve").count() == 0
    assert status_of(served.db, fleet.pending.dev)["status"] == "approved"
    shot(page, "desktop-device-approved")

    page.goto(served.url + "/ledger")
    assert page.locator("table tbody tr").count() == 5
    shot(page, "desktop-ledger")
    assert b.errors == [], b.errors


def test_operator_on_a_phone(served: Served, browser_for: Any) -> None:
    b = browser_for(PHONE, mobile=True)
    page, fleet = b.page, served.fleet
    sign_in(page, served.url)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the fleet page scrolls sideways on a phone ({width}px)"
    assert page.locator("table.fleet thead").is_hidden()     # rows become labelled cards
    first = page.locator("table.fleet tbody tr").first.bounding_box()
    assert first and first["width"] <= PHONE["width"]
    shot(page, "phone-fleet")

    page.click("a[href='/enrolments']")
    assert page.locator("table tbody tr").count() >= 1
    shot(page, "phone-enrolments")

    page.goto(f"{served.url}/devices/{fleet.flagged.dev}")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    assert "odometer_rollback" in page.content()
    shot(page, "phone-device-flagged")
    page.goto(f"{served.url}/devices/{fleet.good.dev}")
    page.locator("figure.chart").screenshot(path=str(ARTIFACTS / "phone-chart.png"))
    page.goto(f"{served.url}/devices/{fleet.flagged.dev}")
    page.click("button.approve")
    page.wait_for_url(f"{served.url}/devices/{fleet.flagged.dev}?done=approved")
    assert page.locator("h1").inner_text().startswith("ZFA31200000000004")
    assert status_of(served.db, fleet.flagged.dev)["vin"] == "ZFA31200000000004"
    shot(page, "phone-device-approved")
    shot(page, "phone-device-approved-top", full_page=False)

    page.goto(served.url + "/drivers")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    shot(page, "phone-drivers")
    page.click("button.link")            # sign out
    page.wait_for_url(served.url + "/login")
    page.goto(served.url + "/drivers")
    assert page.url.startswith(served.url + "/login")
    assert b.errors == [], b.errors

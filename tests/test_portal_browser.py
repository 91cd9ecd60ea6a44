"""The drivers' portal in a real headless Chromium on a phone's viewport (tests/browser_support.py):
a used or expired code refused, a sign-in with a one-time code, the balance, weeks and credits, one
redemption however often its form is sent, a pairing code, and signing out. Chromium missing is a
failure, never a skip.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from backend.db import Database
from backend.web import portal_auth
from backend.web.app import create_app
from backend.web.context import AppContext
from tests import browser_support
from tests import dashboard_seed as seed
from tests.browser_support import PHONE, serve, shot
from tests.test_portal import ALICE_BALANCE, CODE_RE, RULES

playwright, browser_for = browser_support.playwright, browser_support.browser_for     # the fixtures

HOUR = 3_600_000
REFUSED = "Failed to load resource: the server responded with a status of 401 (Unauthorized)"


@dataclass
class Served:
    url: str
    db: Database


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    db = Database.open(f"sqlite:///{tmp_path_factory.mktemp('portal')}/backend.db")
    seed.seed(db)
    with serve(create_app(AppContext(db=db, rules=RULES, clock=lambda: seed.NOW))) as url:
        yield Served(url, db)
    db.close()


def no_sideways_scroll(page: Any, what: str) -> None:
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"{what} scrolls sideways on a phone ({width}px)"


def sign_in_with(page: Any, driver: str, code: str) -> None:
    form = page.locator("form.code-login")
    form.locator("input[name=driver]").fill(driver)
    form.locator("input[name=code]").fill(code)
    form.locator("button[type=submit]").click()


def redemptions(db: Database) -> list[str]:
    return [r["to_account"] for r in db.query(
        "SELECT to_account FROM transfers WHERE from_account = 'driver:alice' ORDER BY id")]


def test_driver_on_a_phone(served: Served, browser_for: Any) -> None:
    used = portal_auth.issue_login_code(served.db, "alice", seed.NOW - HOUR).code
    assert portal_auth.use_login_code(served.db, "alice", used, seed.NOW - HOUR + 1) is None
    expired = portal_auth.issue_login_code(served.db, "alice", seed.NOW - 2 * HOUR, HOUR).code
    b = browser_for(PHONE, mobile=True)
    page = b.page

    page.goto(served.url + "/driver/")
    assert page.url == served.url + "/driver/login"
    no_sideways_scroll(page, "the login page")
    shot(page, "portal-phone-login")
    sign_in_with(page, "alice", used)
    assert "already used" in page.inner_text(".error")
    sign_in_with(page, "alice", expired)
    assert "expired" in page.inner_text(".error")
    shot(page, "portal-phone-login-refused")
    assert b.errors == [REFUSED, REFUSED]
    b.errors.clear()

    code = portal_auth.issue_login_code(served.db, "alice", seed.NOW).code
    sign_in_with(page, "alice", code.lower())
    page.wait_for_url(served.url + "/driver/")
    assert page.inner_text("#balance").split()[0] == f"{ALICE_BALANCE // 1000}.{ALICE_BALANCE % 1000:03d}"
    assert page.inner_text("#weeks") == "4" and page.inner_text("#streak") == "4 weeks"
    assert page.locator("ul.chips li").count() == 4
    credits = page.locator("table.groups").first
    assert "weekly-confirmation" in credits.inner_text() and "40.000" in credits.inner_text()
    assert credits.locator("thead").is_hidden()               # rows become labelled cards
    assert "WVWZZZ1JZXW000001" in page.locator("table.groups").nth(1).inner_text()
    assert "tyre-voucher" in page.inner_text("table.redemptions")
    no_sideways_scroll(page, "the home page")
    shot(page, "portal-phone-home")

    page.click("a[href='/driver/redeem']")
    form = page.locator("form:has(input[name=item][value=car-wash])")
    fields = {name: form.locator(f"input[name={name}]").get_attribute("value")
              for name in ("csrf", "item", "key")}
    posts: list[str] = []
    page.on("request", lambda req: posts.append(req.url) if req.method == "POST" else None)
    form.locator("button").dblclick()
    page.wait_for_url(f"{served.url}/driver/redeem?receipt={fields['key']}")
    assert posts and page.inner_text(".notice") == "Redeemed car-wash for 2.000 tokens."
    again = page.context.request.post(served.url + "/driver/redeem", form=fields, max_redirects=0)
    assert again.status == 303 and again.headers["location"].endswith(f"receipt={fields['key']}")
    assert redemptions(served.db) == ["redeemed:tyre-voucher", "redeemed:car-wash"]
    assert page.locator("button[disabled]").count() == 1        # the new car costs too much
    no_sideways_scroll(page, "the redeem page")
    shot(page, "portal-phone-redeemed")

    page.click("a[href='/driver/']")
    assert page.inner_text("#balance").split()[0] == f"{(ALICE_BALANCE - 2_000) // 1000}.500"
    page.click("#claim button")
    shown = page.inner_text("#pairing-code")
    assert CODE_RE.fullmatch(shown), shown
    claim = page.inner_text("#claim")
    assert "Type this code on the car's driver page" in claim and "T" in claim.split("until")[1]
    no_sideways_scroll(page, "the pairing code")
    shot(page, "portal-phone-pairing", full_page=False)

    page.click("button.link")            # sign out
    page.wait_for_url(served.url + "/driver/login")
    page.goto(served.url + "/driver/redeem")
    assert page.url.startswith(served.url + "/driver/login")
    sign_in_with(page, "alice", code)
    assert "already used" in page.inner_text(".error")
    assert b.errors == [REFUSED], b.errors

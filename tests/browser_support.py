"""What the browser tests share: the app under uvicorn on a free loopback port, a real headless
Chromium (Debian's ``chromium``) driven by Playwright, and screenshots in ``test-artifacts/``
(git-ignored). Chromium missing is a failure, never a skip.

A test module uses the fixtures ``playwright`` and ``browser_for`` by binding them to its own names.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette

from sim.processes import free_port

CHROMIUM = Path("/usr/bin/chromium")
INSTALL = "sudo apt-get update && sudo apt-get install -y chromium chromium-driver   (or: sudo make deps)"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
PHONE = {"width": 390, "height": 844}


@contextmanager
def serve(app: Starlette) -> Iterator[str]:
    """Serve ``app`` under uvicorn on a free loopback port; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off", ws="none"))
    thread = threading.Thread(target=server.run, name="dashboard-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(f"Chromium is not installed at {CHROMIUM}; install it with: {INSTALL}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing; install the dev extra: pip install -e '.[dev]'")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        yield p


@dataclass
class Browser:
    context: Any
    page: Any
    errors: list[str]


@pytest.fixture
def browser_for(playwright: Any, tmp_path: Path) -> Iterator[Any]:
    """Open a fresh Chromium profile at a viewport size; closed after the test."""
    opened: list[Any] = []

    def open_browser(viewport: dict[str, int], mobile: bool = False) -> Browser:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / f"profile-{len(opened)}"), executable_path=str(CHROMIUM), headless=True,
            args=ARGS, viewport=viewport, is_mobile=mobile, has_touch=mobile, timeout=30_000)
        opened.append(context)
        context.set_default_timeout(10_000)
        page = context.pages[0] if context.pages else context.new_page()
        errors: list[str] = []
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        return Browser(context, page, errors)

    yield open_browser
    for context in opened:
        context.close()


def shot(page: Any, name: str, full_page: bool = True) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full_page)

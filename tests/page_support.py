"""What the tests of the driver's page (``odo-agent ui``) share: a state directory made by
``odo-agent init`` and the PIN it printed, or a PIN given to one; ``odo-agent ui`` as a process;
and signing in to the page, over raw HTTP or in a browser."""

from __future__ import annotations

import http.client
import re
import subprocess
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent import pin
from sim.processes import ROOT, Proc, child_env, command, free_port, wait_port
from tests.agent_helpers import odo

PIN = "24681357"


def set_pin(state: Path, code: str = PIN) -> str:
    """Give ``state`` the PIN ``code`` (as ``odo-agent pin set`` does); the PIN."""
    pin.store(state, code)
    return code


def init(state: Path) -> str:
    """``odo-agent init`` a state directory; the PIN it printed for the label."""
    res = odo("init", "--state-dir", str(state), "--obd-port", "/dev/ttyUSB9", "--broker", "mqtt://unused:1")
    assert res.returncode == 0, res.stderr
    m = re.search(r"^driver's page PIN: ([0-9]{8}) ", res.stderr, flags=re.M)
    assert m, res.stderr
    return m.group(1)


@contextmanager
def ui_process(state: Path, log: Path, port: int | None = None, *, listen: bool = True
               ) -> Iterator[tuple[Proc, str]]:
    """``odo-agent ui`` of ``state``, with ``--listen 127.0.0.1:PORT`` (a free port unless given) or,
    without ``listen``, where its config says (which must be on 127.0.0.1:``port``): the process
    and its URL, once it listens. Stopped on leaving."""
    port = port or free_port()
    argv = [*command("odo-agent", "agent.cli"), "ui", "--state-dir", str(state)]
    argv += ["--listen", f"127.0.0.1:{port}"] if listen else []
    with open(log, "ab") as out:
        popen = subprocess.Popen(argv, cwd=ROOT, env=child_env(), stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=out, start_new_session=True)
    proc = Proc("ui", popen, log)
    try:
        wait_port(proc, port)
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def sign_in_response(host: str, port: int, code: str = PIN) -> tuple[int, dict[str, str], str]:
    """Load the sign-in form and post ``code`` with its token; the answer (status, headers, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", "/signin")
        resp = conn.getresponse()
        form = resp.read().decode()
        token = re.search(r'name="token" value="([^"]+)"', form)
        assert resp.status == 200 and token, form
        body = urllib.parse.urlencode({"pin": code, "token": token.group(1)})
        conn.request("POST", "/signin", body=body.encode(), headers={
            "Content-Type": "application/x-www-form-urlencoded", "Origin": f"http://{host}:{port}"})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode()
    finally:
        conn.close()


def sign_in(host: str, port: int, code: str = PIN) -> str:
    """Sign in with ``code``; the ``Cookie`` header value that carries the session."""
    status, headers, body = sign_in_response(host, port, code)
    assert status == 303 and headers["Location"] == "/", (status, body)
    return headers["Set-Cookie"].split(";", 1)[0]


def sign_in_browser(tab: Any, origin: str, code: str = PIN) -> None:
    """In a Playwright page: open the page, which asks for the PIN, and sign in."""
    tab.goto(origin + "/")
    tab.wait_for_url(origin + "/signin")
    tab.fill("#pin", code)
    tab.click("#signin")
    tab.wait_for_url(origin + "/")

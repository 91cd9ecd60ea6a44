"""``odo-agent ui``: the driver's page, for a phone on the dongle's hotspot.

Standard library only (``http.server``). One page: the device's odometer, the
last confirmed figure and the distance since, the ISO week, the balance from
the last ack, a banner when this week's confirmation is due, and a form to
confirm the dashboard figure.

The form is a POST guarded three ways: the ``Host`` header must name this
device (an IP address, ``localhost`` or its hostname: this defeats DNS
rebinding, where a foreign page's own origin resolves to the dongle); the
request must come from this page's origin (``Origin``, else ``Referer``, and
``Sec-Fetch-Site`` when sent); and it must carry this process's form token.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import json
import logging
import secrets
import signal
import socket
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agent import summary as summ
from agent.buffer import Outbox
from agent.clock import Clock, boot_id
from agent.config import AgentConfig
from agent.errors import StorageError
from agent.recorder import Recorder
from agent.state import VIN
from common.transport import parse_listen
from protocol.identity import SigningKey

log = logging.getLogger(__name__)

MAX_BODY = 4096

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Odometer</title>
<style>
body{{font-family:system-ui,sans-serif;margin:0;padding:1rem;max-width:32rem;margin:auto;line-height:1.4}}
h1{{font-size:1.3rem}} .big{{font-size:2.2rem;font-weight:700}}
.banner{{background:#ffe08a;padding:.8rem;border-radius:.5rem;margin:.8rem 0}}
.ok{{background:#c8f0c8;padding:.8rem;border-radius:.5rem}}
.err{{background:#f6c4c4;padding:.8rem;border-radius:.5rem}}
dl{{display:grid;grid-template-columns:auto 1fr;gap:.3rem 1rem}} dt{{color:#555}} dd{{margin:0}}
input[type=text]{{font-size:1.5rem;width:100%;box-sizing:border-box;padding:.5rem}}
button{{font-size:1.3rem;width:100%;padding:.8rem;margin-top:.6rem;border-radius:.5rem}}
</style></head><body>
<h1>Odometer</h1>
{message}{banner}
<div class="big" id="odo">{odo}</div>
<dl>
<dt>Last confirmed</dt><dd id="confirmed">{confirmed}</dd>
<dt>Since then</dt><dd id="since">{since}</dd>
<dt>Week</dt><dd id="week">{week}</dd>
<dt>Balance</dt><dd id="balance">{balance}</dd>
<dt>Sync</dt><dd>{sync}</dd>
</dl>
<form method="post" action="/confirm">
<label for="km">Dashboard odometer (km)</label>
<input type="text" id="km" name="km" inputmode="decimal" autocomplete="off" value="{km_value}" required>
<input type="hidden" name="token" value="{token}">{force}
<button type="submit">{button}</button>
</form>
</body></html>
"""


def _host_ok(host: str | None) -> bool:
    """Whether a ``Host`` header names this device rather than some foreign domain."""
    if not host:
        return False
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]").lower()
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    own = socket.gethostname().lower()
    return name in ("localhost", own, f"{own}.local")


class App:
    """What the handler needs: the outbox, a recorder for confirmations, the form token."""

    def __init__(self, cfg: AgentConfig, key: SigningKey, outbox: Outbox) -> None:
        self.cfg = cfg
        self.dev = key.public.id
        self.outbox = outbox
        self.clock = Clock(cfg.clock)
        self.recorder = Recorder(outbox, key, clock=self.clock, boot=boot_id(),
                                 max_records=cfg.max_records, vin=VIN.get(outbox))
        self.token = secrets.token_urlsafe(24)
        self.lock = threading.Lock()

    def summary(self) -> summ.Summary:
        return summ.read(self.outbox, self.dev, self.clock)

    def page(self, message: str = "", km_value: str | None = None, force: bool = False) -> str:
        s = self.summary()
        banner = ""
        if s.confirmation_due:
            banner = ('<div class="banner" id="due">Please confirm your dashboard odometer '
                      f"for week {s.week}.</div>")
        confirmed = (f"{summ.km(s.confirmed.odo_m)} (week {html.escape(s.confirmed.week)})"
                     if s.confirmed else "never")
        if s.confirmation_rejected:
            confirmed += f" — not accepted: {html.escape(s.confirmation_rejected.replace('_', ' '))}"
        if km_value is None:
            km_value = f"{(s.odo_m + 50) // 100 / 10:.1f}" if s.odo_m is not None else ""
        return PAGE.format(
            message=message, banner=banner, odo=summ.km(s.odo_m), confirmed=confirmed,
            since=summ.km(s.since_confirmed_m), week=html.escape(s.week), balance=summ.tokens(s.balance),
            sync=f"{s.backlog} waiting" if s.backlog else "up to date", km_value=html.escape(km_value),
            token=html.escape(self.token),
            force='<input type="hidden" name="force" value="1">' if force else "",
            button="Confirm anyway" if force else "Confirm",
        )

    def confirm(self, km_text: str, force: bool) -> tuple[int, str]:
        """Record a confirmation; (HTTP status, page)."""
        try:
            odo = summ.parse_km(km_text)
        except ValueError as exc:
            return 400, self.page(f'<p class="err">{html.escape(str(exc))}</p>', km_text)
        with self.lock:
            device = self.summary().odo_m
            if device is not None and abs(odo - device) > self.cfg.tolerance_m and not force:
                warn = (f'<p class="err" id="warn">{summ.km(odo)} differs from the device\'s '
                        f"{summ.km(device)} by {summ.km(abs(odo - device))}. "
                        "Check the figure, or confirm it anyway.</p>")
                return 200, self.page(warn, km_text, force=True)
            self.recorder.vin = VIN.get(self.outbox)   # the car the daemon last read, now
            try:
                rec = self.recorder.confirm(odo, device)
            except StorageError as exc:
                log.error("confirmation not recorded: %s", exc)
                failed = '<p class="err">Could not save the confirmation; try again.</p>'
                return 503, self.page(failed, km_text)
        log.info("driver confirmed %d m (seq %d) from the page", odo, rec.seq)
        return 303, ""


class Handler(BaseHTTPRequestHandler):
    server_version = "odo-agent"
    app: App  # set on the subclass made by make_server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, body: str, ctype: str = "text/html; charset=utf-8",
              headers: dict[str, str] | None = None) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; "
                         "form-action 'self'; frame-ancestors 'none'")
        self.send_header("Referrer-Policy", "same-origin")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _refuse(self, status: int, why: str) -> None:
        log.warning("refused %s %s: %s", self.command, self.path, why)
        self._send(status, f"{why}\n", "text/plain; charset=utf-8")

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if not _host_ok(self.headers.get("Host")):
            return self._refuse(HTTPStatus.MISDIRECTED_REQUEST, "unexpected Host header")
        path = urllib.parse.urlsplit(self.path).path
        if path == "/":
            msg = '<p class="ok" id="ok">Thank you: confirmation recorded.</p>' if "ok=1" in self.path else ""
            return self._send(200, self.app.page(msg))
        if path == "/status.json":
            return self._send(200, json.dumps(self.app.summary().as_json()), "application/json")
        return self._refuse(404, "not found")

    def _same_origin(self) -> bool:
        host = self.headers.get("Host", "")
        origin = self.headers.get("Origin")
        site = self.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            return False
        if origin is not None:
            return origin == f"http://{host}"
        referer = self.headers.get("Referer")
        return referer is not None and referer.startswith(f"http://{host}/")

    def do_POST(self) -> None:  # noqa: N802
        if not _host_ok(self.headers.get("Host")):
            return self._refuse(HTTPStatus.MISDIRECTED_REQUEST, "unexpected Host header")
        if urllib.parse.urlsplit(self.path).path != "/confirm":
            return self._refuse(404, "not found")
        if not self._same_origin():
            return self._refuse(403, "cross-origin request refused")
        if self.headers.get_content_type() != "application/x-www-form-urlencoded":
            return self._refuse(415, "expected a form (application/x-www-form-urlencoded)")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._refuse(411, "Content-Length required")
        if not 0 <= length <= MAX_BODY:
            return self._refuse(413, "form too large")
        form = urllib.parse.parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
        token = form.get("token", [""])[0]
        if not hmac.compare_digest(token.encode(), self.app.token.encode()):
            return self._refuse(403, "stale form: reload the page")
        status, body = self.app.confirm(form.get("km", [""])[0], form.get("force", [""])[0] == "1")
        if status == 303:
            return self._send(303, "", headers={"Location": "/?ok=1"})
        return self._send(status, body)


def make_server(
    cfg: AgentConfig, key: SigningKey, outbox: Outbox, listen: str | None = None
) -> ThreadingHTTPServer:
    host, port = parse_listen(listen or cfg.ui_listen)
    handler = type("BoundHandler", (Handler,), {"app": App(cfg, key, outbox)})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve(cfg: AgentConfig, key: SigningKey, outbox: Outbox) -> int:
    server = make_server(cfg, key, outbox)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, name="ui", daemon=True)
    thread.start()
    log.info("driver's page on http://%s:%d/", *server.server_address[:2])
    stop.wait()
    server.shutdown()
    server.server_close()
    return 0

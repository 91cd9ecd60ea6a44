"""``odo-agent ui``: the driver's page, for a phone on the dongle's hotspot.

Standard library only (``http.server``). One page: the device's odometer, the
last confirmed figure and the distance since, the ISO week, the balance from
the last ack, a banner when this week's confirmation is due, and a form to
confirm the dashboard figure. Distances are shown and typed in the config's
``display_unit`` (km or mi; the form's field is named by it); a figure in miles
is stored as whole metres (:mod:`common.units`).

A second form claims the car for a driver: the pairing code the driver's portal
shows is signed with the device key and left for the daemon to send
(:mod:`agent.claim`); the page shows the backend's answer when it comes.

Each form is a POST guarded three ways: the ``Host`` header must name this
device (an IP address, ``localhost`` or its hostname: this defeats DNS
rebinding, where a foreign page's own origin resolves to the dongle); the
request must come from this page's origin (``Origin``, else ``Referer``, and
``Sec-Fetch-Site`` when sent); and it must carry this process's form token.

Nothing but the sign-in form is shown, and nothing is signed, without a session: the PIN on
the dongle's label, typed into ``/signin``, sets an ``HttpOnly``, ``SameSite=Strict`` cookie
good for 12 hours (:mod:`agent.pin`). Wrong PINs are throttled per client address, and the
page signs at most one confirmation a week plus quick corrections (:mod:`agent.page_limits`).

It listens on loopback (``ui_listen``, ``127.0.0.1:8080``) unless told otherwise: on the
hotspot's address with ``ui_interface`` (its IPv4 address read when the page starts), or
wherever ``--listen`` says; every address (``0.0.0.0``) only when given, with a warning.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import hmac
import html
import http.cookies
import ipaddress
import json
import logging
import math
import secrets
import signal
import socket
import struct
import threading
import urllib.parse
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agent import claim as claiming
from agent import pin as pins
from agent import summary as summ
from agent.buffer import Outbox
from agent.clock import Clock, boot_id
from agent.config import AgentConfig
from agent.errors import AgentError, StorageError
from agent.page_limits import CORRECTION_S, ConfirmationAllowance, SignInThrottle
from agent.recorder import Recorder
from agent.state import VIN
from common import units
from common.clock import now_ms
from common.transport import parse_listen
from protocol import messages, records
from protocol.identity import SigningKey

log = logging.getLogger(__name__)

MAX_BODY = 4096

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">{refresh}
<title>Odometer</title>
<style>
body{{font-family:system-ui,sans-serif;margin:0;padding:1rem;max-width:32rem;margin:auto;line-height:1.4}}
h1{{font-size:1.3rem}} .big{{font-size:2.2rem;font-weight:700}}
.banner{{background:#ffe08a;padding:.8rem;border-radius:.5rem;margin:.8rem 0}}
.ok{{background:#c8f0c8;padding:.8rem;border-radius:.5rem}}
.err{{background:#f6c4c4;padding:.8rem;border-radius:.5rem}}
dl{{display:grid;grid-template-columns:auto 1fr;gap:.3rem 1rem}} dt{{color:#555}} dd{{margin:0}}
input[type=text],input[type=password]{{font-size:1.5rem;width:100%;box-sizing:border-box;padding:.5rem}}
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
<label for="{unit}">Dashboard odometer ({unit})</label>
<input type="text" id="{unit}" name="{unit}" inputmode="decimal" autocomplete="off"
 value="{km_value}" required>
<input type="hidden" name="token" value="{token}">{force}
<button type="submit">{button}</button>
</form>
<h2>Claim this car</h2>
{claim_status}
<form method="post" action="/claim">
<label for="code">Pairing code from the driver's portal</label>
<input type="text" id="code" name="code" autocomplete="off" autocapitalize="characters"
 spellcheck="false" maxlength="{code_max}" value="{code_value}" required>
<input type="hidden" name="token" value="{token}">
<button type="submit" id="claim">Claim this car</button>
</form>
</body></html>
"""

SIGNIN = PAGE[:PAGE.index("<h1>")] + """<h1>Odometer</h1>
{message}
<form method="post" action="/signin">
<label for="pin">PIN (on the dongle's label)</label>
<input type="password" id="pin" name="pin" inputmode="numeric" autocomplete="current-password"
 maxlength="12" required autofocus>
<input type="hidden" name="token" value="{token}">
<button type="submit" id="signin">Sign in</button>
</form>
</body></html>
"""

#: SIOCGIFADDR, the ioctl that reads an interface's IPv4 address (linux/sockios.h).
SIOCGIFADDR = 0x8915


class ListenError(AgentError):
    """The page cannot tell where to listen (``ui_interface`` has no IPv4 address)."""


def interface_address(name: str) -> str:
    """The IPv4 address of the network interface ``name``; :class:`ListenError` naming it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                raise ListenError(f"ui_interface: there is no network interface {name!r}") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ListenError(f"ui_interface: {name} has no IPv4 address (is the hotspot up?)") from None
            raise ListenError(f"ui_interface: cannot read the address of {name} ({exc.strerror})") from None
    return socket.inet_ntoa(packed[20:24])


def listen_address(cfg: AgentConfig, listen: str | None = None) -> tuple[str, int]:
    """Where the page listens: ``listen`` (``--listen``); else ``ui_interface``'s IPv4 address on
    ``ui_listen``'s port; else ``ui_listen``."""
    host, port = parse_listen(listen or cfg.ui_listen)
    if listen is None and cfg.ui_interface is not None:
        host = interface_address(cfg.ui_interface)
    return host, port


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
        self.key = key
        self.token = secrets.token_urlsafe(24)
        self.lock = threading.Lock()
        pins.load(cfg.state_dir)                      # no PIN, no page: PinError
        self.throttle = SignInThrottle()
        self.kdf = threading.Semaphore(1)             # one scrypt at a time
        self.allowance = ConfirmationAllowance(cfg.state_dir)
        self.now_ms: Callable[[], int] = now_ms

    def signin_page(self, message: str = "") -> str:
        return SIGNIN.format(refresh="", message=message, token=html.escape(self.token))

    def signed_in(self, cookie_header: str | None) -> bool:
        """Whether the request's cookies hold a session of the current PIN."""
        if not cookie_header:
            return False
        jar: http.cookies.SimpleCookie = http.cookies.SimpleCookie()
        try:
            jar.load(cookie_header)
            stored = pins.load(self.cfg.state_dir)
        except (http.cookies.CookieError, pins.PinError):
            return False
        morsel = jar.get(pins.COOKIE)
        return morsel is not None and stored.session_ok(morsel.value)

    def sign_in(self, addr: str, typed: str) -> tuple[int, str, dict[str, str]]:
        """Check a PIN typed from ``addr``; (HTTP status, page, headers: the cookie when right)."""
        wait = self.throttle.begin(addr)
        if wait is not None:
            log.warning("sign-in from %s refused: too many wrong PINs", addr)
            return 429, self.signin_page(
                f'<p class="err" id="signin-error">Too many wrong PINs: try again in '
                f"{max(1, math.ceil(wait / 60))} min.</p>"), {"Retry-After": str(math.ceil(wait))}
        try:
            stored = pins.load(self.cfg.state_dir)
        except pins.PinError as exc:
            log.error("sign-in: %s", exc)
            return 503, self.signin_page('<p class="err" id="signin-error">This page has no PIN set: '
                                         "run <code>odo-agent pin reset</code> on the dongle.</p>"), {}
        with self.kdf:
            right = stored.matches(typed[:64])
        if not right:
            self.throttle.failed(addr)
            log.warning("wrong PIN from %s", addr)
            return 401, self.signin_page('<p class="err" id="signin-error">Wrong PIN.</p>'), {}
        self.throttle.succeeded(addr)
        log.info("signed in from %s", addr)
        cookie = (f"{pins.COOKIE}={stored.cookie()}; Max-Age={pins.SESSION_S}; Path=/; HttpOnly; "
                  "SameSite=Strict")
        return 303, "", {"Location": "/", "Set-Cookie": cookie}

    def summary(self) -> summ.Summary:
        return summ.read(self.outbox, self.dev, self.clock)

    def show(self, metres: int | None) -> str:
        """A distance in the device's display unit (``display_unit``)."""
        return units.show(metres, self.cfg.display_unit)

    def page(self, message: str = "", km_value: str | None = None, force: bool = False, *,
             code_value: str = "", waiting: bool = False) -> str:
        s = self.summary()
        banner = ""
        if s.confirmation_due:
            banner = ('<div class="banner" id="due">Please confirm your dashboard odometer '
                      f"for week {s.week}.</div>")
        confirmed = (f"{self.show(s.confirmed.odo_m)} (week {html.escape(s.confirmed.week)})"
                     if s.confirmed else "never")
        if s.confirmation_rejected:
            confirmed += f" — not accepted: {html.escape(s.confirmation_rejected.replace('_', ' '))}"
        if km_value is None:
            km_value = units.input_text(s.odo_m, self.cfg.display_unit) if s.odo_m is not None else ""
        return PAGE.format(
            message=message, banner=banner, odo=self.show(s.odo_m), confirmed=confirmed,
            since=self.show(s.since_confirmed_m), week=html.escape(s.week), balance=summ.tokens(s.balance),
            unit=self.cfg.display_unit,
            sync=f"{s.backlog} waiting" if s.backlog else "up to date", km_value=html.escape(km_value),
            token=html.escape(self.token),
            force='<input type="hidden" name="force" value="1">' if force else "",
            button="Confirm anyway" if force else "Confirm",
            **self.claim_parts(code_value, waiting),
        )

    def claim_parts(self, code_value: str, waiting: bool) -> dict[str, str]:
        """The claim section's status line (and, ``waiting`` for an answer, a refresh)."""
        current = claiming.view(self.outbox)
        req, answer, status = current.request, current.answer, ""
        if req is not None and answer is None:
            status = (f'<p class="banner" id="claim-status">Claim sent at {_hhmm(req.t)}; waiting for '
                      "the backend.</p>")
        elif answer is not None and answer.status == "claimed":
            status = (f'<p class="ok" id="claim-status">This car is {html.escape(answer.driver or "?")}\'s '
                      f"from {_hhmm(answer.valid_from)}.</p>")
        elif answer is not None:
            why = claiming.REASONS.get(answer.reason or "", answer.reason or "refused")
            status = f'<p class="err" id="claim-status">Claim refused: {html.escape(why)}.</p>'
        pending = waiting and req is not None and answer is None
        return {"claim_status": status, "code_max": str(messages.MAX_CLAIM_CODE_INPUT),
                "code_value": html.escape(code_value),
                "refresh": '<meta http-equiv="refresh" content="2">' if pending else ""}

    def claim(self, typed: str) -> tuple[int, str]:
        """Sign a claim with the pairing code typed and leave it for the daemon; (HTTP status, page)."""
        try:
            claiming.request(self.outbox, self.key, typed)
        except ValueError as exc:
            return 400, self.page(f'<p class="err" id="claim-error">{html.escape(str(exc))}</p>',
                                  code_value=typed[:messages.MAX_CLAIM_CODE_INPUT])
        except StorageError as exc:
            log.error("claim not saved: %s", exc)
            return 503, self.page('<p class="err" id="claim-error">Could not save the claim; try again.</p>')
        return 303, ""

    def confirm(self, km_text: str, force: bool) -> tuple[int, str]:
        """Record a confirmation of the figure typed in the display unit; (HTTP status, page)."""
        unit = self.cfg.display_unit
        try:
            odo = summ.parse_km(km_text) if unit == "km" else units.parse(km_text, unit)
        except ValueError as exc:
            return 400, self.page(f'<p class="err">{html.escape(str(exc))}</p>', km_text)
        with self.lock:
            device = self.summary().odo_m
            if device is not None and abs(odo - device) > self.cfg.tolerance_m and not force:
                warn = (f'<p class="err" id="warn">{self.show(odo)} differs from the device\'s '
                        f"{self.show(device)} by {self.show(abs(odo - device))}. "
                        "Check the figure, or confirm it anyway.</p>")
                return 200, self.page(warn, km_text, force=True)
            now = self.now_ms()
            try:
                allowed = self.allowance.take(records.iso_week(now), now)
            except OSError as exc:
                log.error("confirmation not recorded: the page's count of them cannot be saved: %s", exc)
                failed = '<p class="err">Could not save the confirmation; try again.</p>'
                return 503, self.page(failed, km_text)
            if not allowed:
                log.warning("confirmation from the page refused: this week's are used up")
                return 429, self.page(
                    '<p class="err" id="limit">This week\'s confirmation is already recorded (a typo can '
                    f"be corrected within {CORRECTION_S // 60} minutes of it). The next one can be given "
                    "next week, or on the dongle with <code>odo-agent confirm</code>.</p>", km_text)
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
        signed_in = self.app.signed_in(self.headers.get("Cookie"))
        if path == "/signin":
            if signed_in:
                return self._send(303, "", headers={"Location": "/"})
            return self._send(200, self.app.signin_page())
        if path in ("/", "/status.json") and not signed_in:
            if path == "/":
                return self._send(303, "", headers={"Location": "/signin"})
            return self._refuse(401, "sign in first (/signin)")
        if path == "/":
            msg = '<p class="ok" id="ok">Thank you: confirmation recorded.</p>' if "ok=1" in self.path else ""
            return self._send(200, self.app.page(msg, waiting="claim=1" in self.path))
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
        path = urllib.parse.urlsplit(self.path).path
        if path not in ("/confirm", "/claim", "/signin"):
            return self._refuse(404, "not found")
        if not self._same_origin():
            return self._refuse(403, "cross-origin request refused")
        if path != "/signin" and not self.app.signed_in(self.headers.get("Cookie")):
            return self._refuse(401, "sign in first (/signin)")
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
        if path == "/signin":
            status, body, headers = self.app.sign_in(self.client_address[0], form.get("pin", [""])[0])
            return self._send(status, body, headers=headers)
        if path == "/claim":
            status, body = self.app.claim(form.get("code", [""])[0])
            if status == 303:
                return self._send(303, "", headers={"Location": "/?claim=1"})
            return self._send(status, body)
        figure = form.get(self.app.cfg.display_unit, [""])[0]     # the field is named by its unit
        status, body = self.app.confirm(figure, form.get("force", [""])[0] == "1")
        if status == 303:
            return self._send(303, "", headers={"Location": "/?ok=1"})
        return self._send(status, body)


def _hhmm(t_ms: int | None) -> str:
    if t_ms is None:
        return "?"
    return datetime.datetime.fromtimestamp(t_ms / 1000, tz=datetime.UTC).strftime("%H:%M:%S UTC")


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def make_server(
    cfg: AgentConfig, key: SigningKey, outbox: Outbox, listen: str | None = None
) -> ThreadingHTTPServer:
    """The page's server, bound (:func:`listen_address`); raises :class:`ListenError` when
    ``ui_interface`` has no address, :class:`agent.pin.PinError` when no PIN is set."""
    host, port = listen_address(cfg, listen)
    try:
        if ipaddress.ip_address(host).is_unspecified:
            log.warning("the driver's page listens on every address (%s): anyone on any network the "
                        "dongle is on can reach it; ui_interface serves only the hotspot", host)
    except ValueError:
        pass                                          # a host name
    handler = type("BoundHandler", (Handler,), {"app": App(cfg, key, outbox)})
    server = (_Server6 if ":" in host else ThreadingHTTPServer)((host, port), handler)
    server.daemon_threads = True
    return server


def serve(cfg: AgentConfig, key: SigningKey, outbox: Outbox, listen: str | None = None) -> int:
    server = make_server(cfg, key, outbox, listen)
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

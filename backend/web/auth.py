"""Operator accounts, passwords, sessions and CSRF protection for the dashboard, and the same
machinery for every other place people sign in (a :class:`Realm`: the drivers' portal).

- Passwords are hashed with scrypt (``hashlib.scrypt``), a random 16-byte salt per
  user, and stored as ``scrypt$<log2 N>$<r>$<p>$<salt>$<hash>`` (base64url), so the
  cost can be raised later without invalidating old hashes. Checks compare in
  constant time, and an unknown user costs as much as a known one.
- A session is a random token in an HttpOnly, SameSite=Strict cookie, Secure unless the
  server listens on loopback only (``secure_cookies``); only its SHA-256 is stored in
  ``sessions``, with an expiry. Strict, not Lax: no page needs a session on a navigation from
  another site (a link from elsewhere shows the login form first).
- Every POST carries a CSRF token in a hidden field: HMAC-SHA256 of the session token,
  so it needs no storage and dies with the session. The login form, before any
  session exists, uses a double-submit cookie instead.
- Failed logins are limited per client address and, higher and slower, per name
  (:class:`LoginThrottle`), in bounded memory; the password checks run in a small pool of
  their own (:class:`PasswordPool`) that answers 503 when full, so a spray of logins takes
  neither the event loop nor ingest's CPU.
- Each realm has its own sessions table, cookie (scoped to its pages) and CSRF key: a
  session of one realm is never found, nor its token accepted, in another.

Errors: :class:`AuthError` (a ``ValueError``) names what was wrong with a username or
password given to :func:`add_operator` or :func:`set_password`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import threading
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import wraps
from typing import Concatenate, ParamSpec, TypeVar
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from backend.db import Database
from backend.errors import AuthError, IntegrityError
from backend.web.context import AppContext
from backend.web.render import render
from protocol import BadFormat, b64

log = logging.getLogger(__name__)

COOKIE = "odo_session"
LOGIN_COOKIE = "odo_login_csrf"
SESSION_TTL_MS = 12 * 3600 * 1000
USERNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
MIN_PASSWORD = 10
MAX_PASSWORD = 1024
SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P = 15, 8, 1      # 32 MiB, about 0.1 s per check

_DUMMY_SALT = secrets.token_bytes(16)


# -- passwords ----------------------------------------------------------------

def _scrypt(password: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=1 << log2_n, r=r, p=p,
                          maxmem=256 * 1024 * 1024, dklen=32)


def hash_password(password: str, log2_n: int = SCRYPT_LOG2_N) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, log2_n, SCRYPT_R, SCRYPT_P)
    return f"scrypt${log2_n}${SCRYPT_R}${SCRYPT_P}${b64.encode(salt)}${b64.encode(digest)}"


def verify_password(stored: str | None, password: str) -> bool:
    """Whether ``password`` matches ``stored``; with no stored hash, spend the same time and say no."""
    if stored is None:
        _scrypt(password, _DUMMY_SALT, SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P)
        return False
    try:
        scheme, log2_n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        computed = _scrypt(password, b64.decode(salt, "salt"), int(log2_n), int(r), int(p))
        expected = b64.decode(digest, "hash")
    except (ValueError, BadFormat):
        log.error("a password hash in an unknown format")
        return False
    return hmac.compare_digest(computed, expected)


def check_new_password(password: str) -> None:
    """:class:`AuthError` unless ``password`` is of a length people may choose."""
    if len(password) < MIN_PASSWORD:
        raise AuthError(f"password: at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise AuthError(f"password: at most {MAX_PASSWORD} characters")


def _check_new(username: str, password: str) -> None:
    if not USERNAME_RE.fullmatch(username):
        raise AuthError(f"username {username!r}: use 1-64 letters, digits, '.', '_', '@' or '-'")
    check_new_password(password)


# -- operators ----------------------------------------------------------------

@dataclass(frozen=True)
class Operator:
    username: str
    created_at: int
    sessions: int       # sessions not yet expired


def add_operator(db: Database, username: str, password: str, now_ms: int) -> None:
    """Create an operator account; :class:`AuthError` if the name is taken or unusable."""
    _check_new(username, password)
    hashed = hash_password(password)
    try:
        with db.write() as tx:
            tx.execute("INSERT INTO operators (username, password_hash, created_at) VALUES (?, ?, ?)",
                       (username, hashed, now_ms))
    except IntegrityError:
        raise AuthError(f"operator {username!r} already exists") from None


def set_password(db: Database, username: str, password: str) -> None:
    """Replace an operator's password and end all of their sessions."""
    _check_new(username, password)
    hashed = hash_password(password)
    with db.write() as tx:
        if tx.execute("UPDATE operators SET password_hash = ? WHERE username = ?", (hashed, username)) != 1:
            raise AuthError(f"operator {username!r}: no such operator")
        tx.execute("DELETE FROM sessions WHERE username = ?", (username,))


def check_password(db: Database, username: str, password: str) -> bool:
    row = db.one("SELECT password_hash FROM operators WHERE username = ?", (username,))
    return verify_password(row["password_hash"] if row else None, password)


def list_operators(db: Database, now_ms: int) -> list[Operator]:
    rows = db.query(
        "SELECT o.username, o.created_at, "
        "(SELECT COUNT(*) FROM sessions s WHERE s.username = o.username AND s.expires_at > ?) AS n "
        "FROM operators o ORDER BY o.username", (now_ms,))
    return [Operator(r["username"], int(r["created_at"]), int(r["n"])) for r in rows]


# -- sessions -----------------------------------------------------------------

@dataclass(frozen=True)
class Realm:
    """Where a kind of user signs in: their sessions table, cookie and pages."""

    kind: str                  # who signs in here, for logs: "operator", "driver"
    table: str                 # the sessions table: token_hash, <subject>, expires_at
    subject: str               # its column naming who the session is of
    cookie: str
    login_cookie: str          # the login form's double-submit token, before any session
    cookie_path: str           # the cookie goes to these pages only
    home: str                  # the first page; a page to go back to after login is under it
    login_path: str
    logout_path: str
    csrf_key: bytes            # CSRF tokens of one realm are no good in another
    who: str                   # what the login form asks for, in messages: "username", "driver ID"
    name_field: str            # the login form's field for it
    login_template: str
    error_template: str


OPERATORS = Realm(kind="operator", table="sessions", subject="username", cookie=COOKIE,
                  login_cookie=LOGIN_COOKIE, cookie_path="/", home="/", login_path="/login",
                  logout_path="/logout", csrf_key=b"odo-dashboard-csrf", who="username",
                  name_field="username", login_template="login.html", error_template="error.html")


@dataclass(frozen=True)
class Session:
    username: str              # the operator's username; in another realm, whoever it names
    expires_at: int
    csrf: str = ""


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_token(session_token: str, realm: Realm = OPERATORS) -> str:
    return hmac.new(session_token.encode(), realm.csrf_key, hashlib.sha256).hexdigest()


def start_session(db: Database, username: str, now_ms: int, realm: Realm = OPERATORS) -> str:
    """A new session for ``username``; returns the token for the cookie (never stored)."""
    token = secrets.token_urlsafe(32)
    with db.write() as tx:
        tx.execute(f"DELETE FROM {realm.table} WHERE expires_at <= ?", (now_ms,))
        tx.execute(f"INSERT INTO {realm.table} (token_hash, {realm.subject}, expires_at) VALUES (?, ?, ?)",
                   (_token_hash(token), username, now_ms + SESSION_TTL_MS))
    return token


def find_session(db: Database, token: str | None, now_ms: int, realm: Realm = OPERATORS) -> Session | None:
    if not token or len(token) > 200:
        return None
    row = db.one(f"SELECT {realm.subject} AS who, expires_at FROM {realm.table} "
                 "WHERE token_hash = ? AND expires_at > ?", (_token_hash(token), now_ms))
    if row is None:
        return None
    return Session(row["who"], int(row["expires_at"]), csrf_token(token, realm))


def end_session(db: Database, token: str, realm: Realm = OPERATORS) -> None:
    with db.write() as tx:
        tx.execute(f"DELETE FROM {realm.table} WHERE token_hash = ?", (_token_hash(token),))


# -- login rate limiting --------------------------------------------------------

class LoginLimiter:
    """At most ``max_failures`` failed logins per key in ``window_ms``; then refuse until the
    oldest of them leaves the window. Kept in memory, per process: at most ``max_names`` keys,
    each with at most ``max_failures`` times (when full, the key failed least recently goes)."""

    def __init__(self, max_failures: int = 5, window_ms: int = 15 * 60 * 1000,
                 max_names: int = 10_000) -> None:
        self.max_failures = max_failures
        self.window_ms = window_ms
        self.max_names = max_names
        self._failures: OrderedDict[str, deque[int]] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, name: str, now_ms: int) -> deque[int]:
        times = self._failures.get(name)
        if times is None:
            return deque()
        while times and times[0] <= now_ms - self.window_ms:
            times.popleft()
        if not times:
            del self._failures[name]
        return times

    def failures(self, key: str, now_ms: int) -> int:
        """How many failures of ``key`` are in the window."""
        with self._lock:
            return len(self._recent(key.lower(), now_ms))

    def retry_after_ms(self, key: str, now_ms: int) -> int:
        """0 when a login may be tried now, else how long until it may."""
        with self._lock:
            times = self._recent(key.lower(), now_ms)
            if len(times) < self.max_failures:
                return 0
            return times[-self.max_failures] + self.window_ms - now_ms

    def failed(self, key: str, now_ms: int) -> None:
        name = key.lower()
        with self._lock:
            times = self._recent(name, now_ms)
            if name not in self._failures:
                while len(self._failures) >= self.max_names:
                    self._failures.popitem(last=False)
                self._failures[name] = times
            self._failures.move_to_end(name)
            times.append(now_ms)
            while len(times) > self.max_failures:
                times.popleft()


def client_key(host: str | None) -> str:
    """Whom a login's failures count against: the client's IPv4 address, or its IPv6 /64 (one
    host usually holds a whole /64); an IPv4 address mapped into IPv6 counts as itself."""
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:100].lower()
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass(frozen=True)
class Throttled:
    """Why a login is not tried now, and for how long."""

    retry_after_ms: int
    message: str


class LoginThrottle:
    """Failed logins, counted per client address (:func:`client_key`) and per name.

    - An address with ``per_address`` failures in ``address_window_ms`` is refused, whatever name
      it tries: one address can guess ``per_address`` times per window.
    - A name with ``per_name`` failures in ``name_window_ms`` (guesses from many addresses) is then
      tried only from an address without a failure in its window: each address guessing at it
      gets one try per window, and its owner, who has not failed from where they are, signs in.
      The limit per name is higher than that per address, so one address is stopped first.

    Only failures count, and a success forgets none (an attacker's own good login must not
    refill their budget). Memory is bounded by each counter's ``max_names``."""

    def __init__(self, per_address: int = 10, address_window_ms: int = 15 * 60_000,
                 per_name: int = 50, name_window_ms: int = 3600_000, max_keys: int = 10_000) -> None:
        self.by_address = LoginLimiter(per_address, address_window_ms, max_keys)
        self.by_name = LoginLimiter(per_name, name_window_ms, max_keys)

    def check(self, address: str, name: str, who: str, now_ms: int) -> Throttled | None:
        """None when a login of ``name`` from ``address`` may be tried now; ``who`` names what
        ``name`` is in the message ("username")."""
        wait = self.by_address.retry_after_ms(address, now_ms)
        if wait:
            return Throttled(wait, "Too many failed attempts from your address.")
        wait = self.by_name.retry_after_ms(name, now_ms)
        if wait and self.by_address.failures(address, now_ms):
            return Throttled(wait, f"Too many failed attempts for this {who}.")
        return None

    def failed(self, address: str, name: str, now_ms: int) -> None:
        self.by_address.failed(address, now_ms)
        self.by_name.failed(name, now_ms)


P = ParamSpec("P")
T = TypeVar("T")


class Busy(Exception):
    """Every password checker is busy and the queue is full."""


class PasswordPool:
    """The threads that check passwords (scrypt, about 0.1 s of CPU and 32 MiB each), apart from
    the server's other threads and from ingest: ``workers`` threads, at most ``queue`` checks
    waiting; a check beyond that raises :class:`Busy` at once."""

    def __init__(self, workers: int | None = None, queue: int = 16) -> None:
        self.workers = workers or max(1, min(4, (os.cpu_count() or 2) // 2))
        self.limit = self.workers + queue
        self._pending = 0
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="odo-password")

    async def call(self, db: Database, fn: Callable[Concatenate[Database, P], T],
                   *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(db, *args)`` in one of the pool's threads (that thread's connection closed after)."""
        with self._lock:
            if self._pending >= self.limit:
                raise Busy
            self._pending += 1

        def run() -> T:
            try:
                return fn(db, *args, **kwargs)
            finally:
                db.close()

        try:
            return await asyncio.wrap_future(self._executor.submit(run))
        finally:
            with self._lock:
                self._pending -= 1


#: The one pool that checks every realm's passwords.
PASSWORDS = PasswordPool()
#: How long a client is told to wait when the pool is full.
BUSY_RETRY_S = 5


# -- HTTP glue ----------------------------------------------------------------

async def db_call(db: Database, fn: Callable[Concatenate[Database, P], T],
                  *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``fn(db, *args)``, blocking database work, in a worker thread, and close that thread's connection
    afterwards: operators' page views are few, and no connection is left behind in a
    thread that may end."""

    def run() -> T:
        try:
            return fn(db, *args, **kwargs)
        finally:
            db.close()

    return await run_in_threadpool(run)


PageHandler = Callable[[Request, Session], Awaitable[Response]]
#: A login form's check, after throttling: ``(db, name, form, now_ms)`` -> None when the name may sign
#: in, else the message to show (and the HTTP status to send it with).
LoginCheck = Callable[[Database, str, FormData, int], tuple[str, int] | None]


def safe_next(target: str | None, home: str = "/") -> str:
    """A local path under ``home`` to go back to after login; anything else goes to ``home``."""
    if (not target or not target.startswith(home) or not target.startswith("/") or target.startswith("//")
            or "\\" in target):
        return home
    return target


def _set_cookie(response: Response, ctx: AppContext, name: str, value: str, max_age: int,
                path: str = "/") -> None:
    response.set_cookie(name, value, max_age=max_age, path=path, httponly=True,
                        samesite="strict", secure=ctx.secure_cookies)


def _forbidden(request: Request, session: Session | None, realm: Realm) -> Response:
    return render(request, realm.error_template, {
        "session": session, "title": "Form expired",
        "message": "The form's security token was missing or wrong. Reload the page and try again.",
    }, status_code=403)


def login_required(ctx: AppContext, realm: Realm = OPERATORS,
                   ) -> Callable[[PageHandler], Callable[[Request], Awaitable[Response]]]:
    """Wrap a page: no valid session of ``realm`` redirects to its login; a POST must carry the
    CSRF token (its form is then in ``request.state.form``)."""

    def wrap(handler: PageHandler) -> Callable[[Request], Awaitable[Response]]:
        @wraps(handler)
        async def endpoint(request: Request) -> Response:
            session = await db_call(ctx.db, find_session, request.cookies.get(realm.cookie), ctx.clock(),
                                    realm)
            if session is None:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                where = realm.login_path if target == realm.home or request.method != "GET" else (
                    f"{realm.login_path}?next=" + quote(target, safe=""))
                return RedirectResponse(where, status_code=303)
            if request.method == "POST":
                form = await request.form()
                given = form.get("csrf")
                if not isinstance(given, str) or not hmac.compare_digest(given, session.csrf):
                    log.warning("POST %s by %s %s without a valid CSRF token", request.url.path, realm.kind,
                                session.username)
                    return _forbidden(request, session, realm)
                request.state.form = form
            return await handler(request, session)

        return endpoint

    return wrap


def login_routes(ctx: AppContext, realm: Realm, check: LoginCheck, limiter: LoginThrottle | None = None,
                 pool: PasswordPool | None = None) -> list[BaseRoute]:
    """The login (GET, POST) and logout (POST) of ``realm``; ``check`` says whether a form's
    credentials are right. Failures are throttled per client address and per name
    (:class:`LoginThrottle`) before ``check`` runs, and ``check`` runs in ``pool``
    (:data:`PASSWORDS`)."""
    throttle = limiter or LoginThrottle()
    checkers = pool or PASSWORDS
    login_cookie = realm.login_cookie

    def login_page(request: Request, form_token: str, name: str = "", error: str | None = None,
                   status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
        response = render(request, realm.login_template, {
            "form_token": form_token, "username": name, "error": error,
            "next": safe_next(request.query_params.get("next"), realm.home), "title": "Sign in",
        }, status_code=status_code)
        if headers:
            response.headers.update(headers)
        _set_cookie(response, ctx, login_cookie, form_token, 3600, path=realm.login_path)
        return response

    def back(target: object) -> Response:
        return RedirectResponse(safe_next(target if isinstance(target, str) else None, realm.home),
                                status_code=303)

    async def login(request: Request) -> Response:
        token = request.cookies.get(realm.cookie)
        if request.method == "GET":
            if await db_call(ctx.db, find_session, token, ctx.clock(), realm):
                return back(request.query_params.get("next"))
            form_token = request.cookies.get(login_cookie) or secrets.token_urlsafe(24)
            return login_page(request, form_token)
        form = await request.form()
        expected = request.cookies.get(login_cookie, "")
        given = form.get("csrf")
        if not expected or not isinstance(given, str) or not hmac.compare_digest(given, expected):
            return _forbidden(request, None, realm)
        name = str(form.get(realm.name_field, "")).strip()[:64]
        now = ctx.clock()
        address = client_key(request.client.host if request.client else None)
        throttled = throttle.check(address, name, realm.who, now)
        if throttled is not None:
            log.warning("%s login for %r from %s refused: %s", realm.kind, name, address, throttled.message)
            minutes = -(-throttled.retry_after_ms // 60_000)
            return login_page(request, expected, name, status_code=429,
                              error=f"{throttled.message} Try again in {minutes} minute(s).",
                              headers={"Retry-After": str(-(-throttled.retry_after_ms // 1000))})
        try:
            refused = await checkers.call(ctx.db, check, name, form, now)
        except Busy:
            log.warning("%s login for %r from %s refused: every password checker is busy", realm.kind, name,
                        address)
            return login_page(request, expected, name, status_code=503,
                              error="The server is busy. Try again in a few seconds.",
                              headers={"Retry-After": str(BUSY_RETRY_S)})
        if refused is not None:
            throttle.failed(address, name, now)
            log.info("failed %s login for %r from %s", realm.kind, name, address)
            return login_page(request, expected, name, *refused)
        session_token = await db_call(ctx.db, start_session, name, now, realm)
        log.info("%s %s logged in", realm.kind, name)
        response = back(form.get("next"))
        _set_cookie(response, ctx, realm.cookie, session_token, SESSION_TTL_MS // 1000,
                    path=realm.cookie_path)
        response.delete_cookie(login_cookie, path=realm.login_path, httponly=True, samesite="strict",
                               secure=ctx.secure_cookies)
        return response

    @login_required(ctx, realm)
    async def logout(request: Request, session: Session) -> Response:
        token = request.cookies.get(realm.cookie, "")
        await db_call(ctx.db, end_session, token, realm)
        log.info("%s %s logged out", realm.kind, session.username)
        response = RedirectResponse(realm.login_path, status_code=303)
        response.delete_cookie(realm.cookie, path=realm.cookie_path, httponly=True, samesite="strict",
                               secure=ctx.secure_cookies)
        return response

    return [
        Route(realm.login_path, login, methods=["GET", "POST"], name=f"{realm.kind}_login"),
        Route(realm.logout_path, logout, methods=["POST"], name=f"{realm.kind}_logout"),
    ]


def _check_operator(db: Database, username: str, form: FormData, now_ms: int) -> tuple[str, int] | None:
    password = str(form.get("password", ""))[:MAX_PASSWORD]
    if username and check_password(db, username, password):
        return None
    return "Wrong username or password.", 401


def routes(ctx: AppContext, limiter: LoginThrottle | None = None) -> list[BaseRoute]:
    """/login (GET, POST) and /logout (POST) of the operators."""
    return login_routes(ctx, OPERATORS, _check_operator, limiter)

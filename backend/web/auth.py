"""Operator accounts, passwords, sessions and CSRF protection for the dashboard.

- Passwords are hashed with scrypt (``hashlib.scrypt``), a random 16-byte salt per
  user, and stored as ``scrypt$<log2 N>$<r>$<p>$<salt>$<hash>`` (base64url), so the
  cost can be raised later without invalidating old hashes. Checks compare in
  constant time, and an unknown user costs as much as a known one.
- A session is a random token in an HttpOnly, SameSite=Strict cookie (Secure behind
  TLS); only its SHA-256 is stored in ``sessions``, with an expiry.
- Every POST carries a CSRF token in a hidden field: HMAC-SHA256 of the session token,
  so it needs no storage and dies with the session. The login form, before any
  session exists, uses a double-submit cookie instead.
- Failed logins are limited per username, in memory.

Errors: :class:`AuthError` (a ``ValueError``) names what was wrong with a username or
password given to :func:`add_operator` or :func:`set_password`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import wraps
from typing import Concatenate, ParamSpec, TypeVar
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
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
        log.error("operator password hash in an unknown format")
        return False
    return hmac.compare_digest(computed, expected)


def _check_new(username: str, password: str) -> None:
    if not USERNAME_RE.fullmatch(username):
        raise AuthError(f"username {username!r}: use 1-64 letters, digits, '.', '_', '@' or '-'")
    if len(password) < MIN_PASSWORD:
        raise AuthError(f"password: at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise AuthError(f"password: at most {MAX_PASSWORD} characters")


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
class Session:
    username: str
    expires_at: int
    csrf: str = ""


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_token(session_token: str) -> str:
    return hmac.new(session_token.encode(), b"odo-dashboard-csrf", hashlib.sha256).hexdigest()


def start_session(db: Database, username: str, now_ms: int) -> str:
    """A new session for ``username``; returns the token for the cookie (never stored)."""
    token = secrets.token_urlsafe(32)
    with db.write() as tx:
        tx.execute("DELETE FROM sessions WHERE expires_at <= ?", (now_ms,))
        tx.execute("INSERT INTO sessions (token_hash, username, expires_at) VALUES (?, ?, ?)",
                   (_token_hash(token), username, now_ms + SESSION_TTL_MS))
    return token


def find_session(db: Database, token: str | None, now_ms: int) -> Session | None:
    if not token or len(token) > 200:
        return None
    row = db.one("SELECT username, expires_at FROM sessions WHERE token_hash = ? AND expires_at > ?",
                 (_token_hash(token), now_ms))
    if row is None:
        return None
    return Session(row["username"], int(row["expires_at"]), csrf_token(token))


def end_session(db: Database, token: str) -> None:
    with db.write() as tx:
        tx.execute("DELETE FROM sessions WHERE token_hash = ?", (_token_hash(token),))


# -- login rate limiting --------------------------------------------------------

class LoginLimiter:
    """At most ``max_failures`` failed logins per username in ``window_ms``; then refuse
    until the oldest failure leaves the window. Kept in memory, per process."""

    def __init__(self, max_failures: int = 5, window_ms: int = 15 * 60 * 1000,
                 max_names: int = 10_000) -> None:
        self.max_failures = max_failures
        self.window_ms = window_ms
        self.max_names = max_names
        self._failures: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    def _recent(self, name: str, now_ms: int) -> list[int]:
        times = [t for t in self._failures.get(name, []) if t > now_ms - self.window_ms]
        if times:
            self._failures[name] = times
        else:
            self._failures.pop(name, None)
        return times

    def retry_after_ms(self, username: str, now_ms: int) -> int:
        """0 when a login may be tried now, else how long until it may."""
        with self._lock:
            times = self._recent(username.lower(), now_ms)
            if len(times) < self.max_failures:
                return 0
            return times[-self.max_failures] + self.window_ms - now_ms

    def failed(self, username: str, now_ms: int) -> None:
        with self._lock:
            if len(self._failures) >= self.max_names:
                for name in list(self._failures):
                    self._recent(name, now_ms)
                if len(self._failures) >= self.max_names:   # still full: forget the oldest
                    self._failures.pop(next(iter(self._failures)))
            self._failures.setdefault(username.lower(), []).append(now_ms)
            self._recent(username.lower(), now_ms)

    def succeeded(self, username: str) -> None:
        with self._lock:
            self._failures.pop(username.lower(), None)


# -- HTTP glue ----------------------------------------------------------------

P = ParamSpec("P")
T = TypeVar("T")


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


def safe_next(target: str | None) -> str:
    """A local path to go back to after login; anything else goes to the fleet page."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _set_cookie(response: Response, ctx: AppContext, name: str, value: str, max_age: int,
                path: str = "/") -> None:
    response.set_cookie(name, value, max_age=max_age, path=path, httponly=True,
                        samesite="strict", secure=ctx.secure_cookies)


def _forbidden(request: Request, session: Session | None) -> Response:
    return render(request, "error.html", {
        "session": session, "title": "Form expired",
        "message": "The form's security token was missing or wrong. Reload the page and try again.",
    }, status_code=403)


def login_required(ctx: AppContext) -> Callable[[PageHandler], Callable[[Request], Awaitable[Response]]]:
    """Wrap a page: no valid session redirects to /login; a POST must carry the CSRF token
    (its form is then in ``request.state.form``)."""

    def wrap(handler: PageHandler) -> Callable[[Request], Awaitable[Response]]:
        @wraps(handler)
        async def endpoint(request: Request) -> Response:
            session = await db_call(ctx.db, find_session, request.cookies.get(COOKIE), ctx.clock())
            if session is None:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                where = "/login" if target == "/" or request.method != "GET" else (
                    "/login?next=" + quote(target, safe=""))
                return RedirectResponse(where, status_code=303)
            if request.method == "POST":
                form = await request.form()
                given = form.get("csrf")
                if not isinstance(given, str) or not hmac.compare_digest(given, session.csrf):
                    log.warning("POST %s by %s without a valid CSRF token", request.url.path,
                                session.username)
                    return _forbidden(request, session)
                request.state.form = form
            return await handler(request, session)

        return endpoint

    return wrap


def routes(ctx: AppContext, limiter: LoginLimiter | None = None) -> list[BaseRoute]:
    """/login (GET, POST) and /logout (POST)."""
    limiter = limiter or LoginLimiter()

    def login_page(request: Request, form_token: str, username: str = "", error: str | None = None,
                   status_code: int = 200) -> Response:
        response = render(request, "login.html", {
            "form_token": form_token, "username": username, "error": error,
            "next": safe_next(request.query_params.get("next")), "title": "Sign in",
        }, status_code=status_code)
        _set_cookie(response, ctx, LOGIN_COOKIE, form_token, 3600, path="/login")
        return response

    async def login(request: Request) -> Response:
        token = request.cookies.get(COOKIE)
        if request.method == "GET":
            if await db_call(ctx.db, find_session, token, ctx.clock()):
                return RedirectResponse(safe_next(request.query_params.get("next")), status_code=303)
            form_token = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(24)
            return login_page(request, form_token)
        form = await request.form()
        expected = request.cookies.get(LOGIN_COOKIE, "")
        given = form.get("csrf")
        if not expected or not isinstance(given, str) or not hmac.compare_digest(given, expected):
            return _forbidden(request, None)
        username = str(form.get("username", "")).strip()[:64]
        password = str(form.get("password", ""))
        now = ctx.clock()
        wait_ms = limiter.retry_after_ms(username, now)
        if wait_ms:
            log.warning("login for %r refused: too many failures", username)
            minutes = -(-wait_ms // 60_000)
            return login_page(request, expected, username, status_code=429, error=(
                f"Too many failed attempts for this username. Try again in {minutes} minute(s)."))
        if not username or not await db_call(ctx.db, check_password, username, password[:MAX_PASSWORD]):
            limiter.failed(username, now)
            log.info("failed login for %r", username)
            return login_page(request, expected, username, "Wrong username or password.", 401)
        limiter.succeeded(username)
        session_token = await db_call(ctx.db, start_session, username, now)
        log.info("operator %s logged in", username)
        nxt = form.get("next")
        response = RedirectResponse(safe_next(nxt if isinstance(nxt, str) else None), status_code=303)
        _set_cookie(response, ctx, COOKIE, session_token, SESSION_TTL_MS // 1000)
        response.delete_cookie(LOGIN_COOKIE, path="/login", httponly=True, samesite="strict",
                               secure=ctx.secure_cookies)
        return response

    @login_required(ctx)
    async def logout(request: Request, session: Session) -> Response:
        token = request.cookies.get(COOKIE, "")
        await db_call(ctx.db, end_session, token)
        log.info("operator %s logged out", session.username)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=ctx.secure_cookies)
        return response

    return [
        Route("/login", login, methods=["GET", "POST"], name="login"),
        Route("/logout", logout, methods=["POST"], name="logout"),
    ]

"""How a driver signs in to their portal (``/driver/``): a password, or a one-time code an operator
issued (``odo-backend drivers password|login-code``).

- A password is hashed as an operator's is (:func:`backend.web.auth.hash_password`), in
  ``driver_passwords``; setting one ends the driver's sessions.
- A login code is written as a pairing code is (:func:`protocol.messages.normalise_claim_code`):
  8 characters of an alphabet without look-alikes, shown ``ABCD-EFGH`` (case, spaces and dashes
  do not matter when it is typed). Only SHA-256 of the driver id and the code
  is stored, with its expiry. A login uses it in one ``UPDATE`` that succeeds only while it is
  unused and unexpired, so it lets in one login at most. A new code for a driver replaces their
  codes not yet used.
- Sessions, cookies and CSRF tokens are those of :mod:`backend.web.auth`, in the realm
  :data:`DRIVERS`: the table ``driver_sessions``, a cookie sent only to ``/driver`` pages, a CSRF
  key of its own. An operator's session is no driver's, and a driver's no operator's.

Errors: :class:`AuthError` names what was wrong (no such driver, an unusable password or lifetime).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass

from starlette.datastructures import FormData

from backend.db import Database
from backend.errors import AuthError, IntegrityError
from backend.ledger.accounts import DRIVER_ID
from backend.web.auth import MAX_PASSWORD, Realm, check_new_password, hash_password, verify_password
from protocol.messages import CLAIM_CODE_ALPHABET, CLAIM_CODE_LEN, normalise_claim_code

log = logging.getLogger(__name__)

DRIVERS = Realm(kind="driver", table="driver_sessions", subject="driver_id", cookie="odo_driver_session",
                login_cookie="odo_driver_login_csrf", cookie_path="/driver", home="/driver/",
                login_path="/driver/login", logout_path="/driver/logout", csrf_key=b"odo-driver-portal-csrf",
                who="driver ID", name_field="driver", login_template="portal_login.html",
                error_template="portal_error.html")

MIN_CODE_TTL_MS = 60_000
MAX_CODE_TTL_MS = 7 * 24 * 3600 * 1000
DEFAULT_CODE_TTL_MS = 60 * 60_000
#: Used and expired codes are kept this long (a login with one is told so), then forgotten.
CODE_KEPT_MS = 30 * 24 * 3600 * 1000

WRONG_CODE = "Wrong driver ID or code."
USED_CODE = "This code was already used. Ask your fleet operator for a new one."
EXPIRED_CODE = "This code has expired. Ask your fleet operator for a new one."
WRONG_PASSWORD = "Wrong driver ID or password."


@dataclass(frozen=True)
class LoginCode:
    code: str              # as shown: ABCD-EFGH
    expires_at: int


def _code_hash(driver_id: str, code: str) -> str:
    return hashlib.sha256(f"odo-driver-login-code:{driver_id}:{code}".encode()).hexdigest()


def _need_driver(db: Database, driver_id: str) -> None:
    if not DRIVER_ID.fullmatch(driver_id) or not db.one("SELECT id FROM drivers WHERE id = ?", (driver_id,)):
        raise AuthError(f"no driver {driver_id!r} (add it: odo-backend drivers add ID)")


def issue_login_code(db: Database, driver_id: str, now_ms: int,
                     ttl_ms: int = DEFAULT_CODE_TTL_MS) -> LoginCode:
    """A new one-time code for ``driver_id``, good for ``ttl_ms``; the driver's unused codes end."""
    if not MIN_CODE_TTL_MS <= ttl_ms <= MAX_CODE_TTL_MS:
        raise AuthError(f"a login code lasts {MIN_CODE_TTL_MS // 60_000} to {MAX_CODE_TTL_MS // 60_000} "
                        f"minutes, not {ttl_ms // 60_000}")
    _need_driver(db, driver_id)
    while True:
        code = "".join(secrets.choice(CLAIM_CODE_ALPHABET) for _ in range(CLAIM_CODE_LEN))
        try:
            with db.write() as tx:
                tx.execute("DELETE FROM driver_login_codes WHERE (driver_id = ? AND used_at IS NULL) "
                           "OR expires_at <= ?", (driver_id, now_ms - CODE_KEPT_MS))
                tx.execute("INSERT INTO driver_login_codes (code_hash, driver_id, created_at, expires_at) "
                           "VALUES (?, ?, ?, ?)",
                           (_code_hash(driver_id, code), driver_id, now_ms, now_ms + ttl_ms))
        except IntegrityError:          # the same code as one of the driver's kept ones: draw again
            continue
        log.info("issued a login code for driver %s, valid for %d ms", driver_id, ttl_ms)
        return LoginCode(f"{code[:4]}-{code[4:]}", now_ms + ttl_ms)


def use_login_code(db: Database, driver_id: str, typed: str, now_ms: int) -> str | None:
    """Spend a code: None when it let the driver in, else why not."""
    code = normalise_claim_code(typed)
    if code is None or not DRIVER_ID.fullmatch(driver_id):
        return WRONG_CODE
    digest = _code_hash(driver_id, code)
    with db.write() as tx:
        if tx.execute("UPDATE driver_login_codes SET used_at = ? WHERE code_hash = ? AND driver_id = ? "
                      "AND used_at IS NULL AND expires_at > ?", (now_ms, digest, driver_id, now_ms)) == 1:
            return None
        row = tx.one("SELECT used_at FROM driver_login_codes WHERE code_hash = ? AND driver_id = ?",
                     (digest, driver_id))
    if row is None:
        return WRONG_CODE
    return USED_CODE if row["used_at"] is not None else EXPIRED_CODE


def set_driver_password(db: Database, driver_id: str, password: str, now_ms: int) -> None:
    """Set (or replace) a driver's portal password and end their sessions."""
    check_new_password(password)
    _need_driver(db, driver_id)
    hashed = hash_password(password)
    with db.write() as tx:
        if tx.execute("UPDATE driver_passwords SET password_hash = ?, updated_at = ? WHERE driver_id = ?",
                      (hashed, now_ms, driver_id)) != 1:
            tx.execute("INSERT INTO driver_passwords (driver_id, password_hash, updated_at) VALUES (?, ?, ?)",
                       (driver_id, hashed, now_ms))
        tx.execute("DELETE FROM driver_sessions WHERE driver_id = ?", (driver_id,))
    log.info("set the portal password of driver %s; their sessions ended", driver_id)


def check_driver_password(db: Database, driver_id: str, password: str) -> bool:
    row = (db.one("SELECT password_hash FROM driver_passwords WHERE driver_id = ?", (driver_id,))
           if DRIVER_ID.fullmatch(driver_id) else None)
    return verify_password(row["password_hash"] if row else None, password[:MAX_PASSWORD])


def check_login(db: Database, driver_id: str, form: FormData, now_ms: int) -> tuple[str, int] | None:
    """The portal's login check (:data:`backend.web.auth.LoginCheck`): a code when one was typed,
    else the password."""
    code = form.get("code")
    if isinstance(code, str) and code.strip():
        refused = use_login_code(db, driver_id, code, now_ms)
        return None if refused is None else (refused, 401)
    password = form.get("password")
    if isinstance(password, str) and password and check_driver_password(db, driver_id, password):
        return None
    return WRONG_PASSWORD, 401

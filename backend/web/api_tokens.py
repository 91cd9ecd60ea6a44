"""The JSON API's credentials (docs/DESIGN.md §7): API tokens made with ``odo-backend api-tokens``,
each with a name, a role (:mod:`backend.web.roles`) and an optional expiry, and the one
``api_token`` setting, an operator's.

- A token is ``odo-at-`` and 43 base64url characters (256 random bits), shown once when made;
  only its SHA-256 is stored (table ``api_tokens``).
- A revoked token's row is kept: it is listed as revoked, and a database that has ever held a
  token keeps the API closed. A name is unique among the tokens not revoked.
- :func:`authenticate` looks the bearer up at each request, so a token revoked or expired stops
  working at once.

Errors: :class:`ApiTokenError` names what was wrong with a token to be made or revoked.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from typing import Any

from backend.db import Database, Row
from backend.errors import AuthError, IntegrityError
from backend.ledger.accounts import DRIVER_ID
from backend.web.roles import DRIVER, OPERATOR, ROLES

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
PREFIX = "odo-at-"
#: The longest bearer token looked up; anything longer is no token of ours.
MAX_TOKEN = 200


class ApiTokenError(AuthError):
    """An API token that cannot be made or revoked; the message says why."""


@dataclass(frozen=True)
class Principal:
    """Who a request to the API acts as."""

    role: str                       # operator, partner or driver
    driver: str | None = None       # a driver token's driver id
    token: str | None = None        # the API token's name; None: the api_token setting, or no credentials

    @property
    def label(self) -> str:
        """``operator``, ``partner`` or ``driver:<id>``."""
        return f"{DRIVER}:{self.driver}" if self.role == DRIVER else self.role

    @property
    def by(self) -> str:
        """How the API names who made a decision (a device's ``decided_by``)."""
        return "api" if self.token is None else f"api:{self.token}"


#: A request with the ``api_token`` setting, and every request when no credential is configured.
UNNAMED_OPERATOR = Principal(OPERATOR)


@dataclass(frozen=True)
class Refusal:
    """Why a request has no credential that works (answered with 401)."""

    reason: str


@dataclass(frozen=True)
class ApiToken:
    id: int
    name: str
    role: str
    driver: str | None
    expires_at: int | None
    revoked_at: int | None
    created_at: int

    @property
    def label(self) -> str:
        return f"{DRIVER}:{self.driver}" if self.role == DRIVER else self.role

    def state(self, now_ms: int) -> str:
        """``active``, ``expired`` or ``revoked``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now_ms:
            return "expired"
        return "active"

    def to_dict(self, now_ms: int) -> dict[str, Any]:
        return {"name": self.name, "role": self.label, "driver": self.driver, "expires_at": self.expires_at,
                "revoked_at": self.revoked_at, "created_at": self.created_at, "state": self.state(now_ms)}

    @classmethod
    def from_row(cls, row: Row) -> ApiToken:
        return cls(int(row["id"]), str(row["name"]), str(row["role"]), row["driver_id"],
                   None if row["expires_at"] is None else int(row["expires_at"]),
                   None if row["revoked_at"] is None else int(row["revoked_at"]), int(row["created_at"]))


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def add(db: Database, name: str, role: str, driver: str | None, expires_at: int | None,
        now_ms: int) -> tuple[str, ApiToken]:
    """Make a token; return it (shown once, never stored) and its stored row."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ApiTokenError(f"name {name!r}: 1 to 64 letters, digits, '_', '.', '@' or '-', "
                            "starting with a letter or digit")
    if role not in ROLES:
        raise ApiTokenError(f"role {role!r}: use {', '.join(ROLES)}")
    if role == DRIVER:
        if driver is None:
            raise ApiTokenError("a driver token needs the driver's id")
        if not DRIVER_ID.fullmatch(driver):
            raise ApiTokenError(f"driver {driver!r}: not a driver id")
    elif driver is not None:
        raise ApiTokenError(f"a driver id is for role {DRIVER} only, not {role}")
    if expires_at is not None and expires_at <= now_ms:
        raise ApiTokenError("the expiry must be in the future")
    token = PREFIX + secrets.token_urlsafe(32)
    try:
        with db.write() as tx:
            if driver is not None and not tx.one("SELECT id FROM drivers WHERE id = ?", (driver,)):
                raise ApiTokenError(f"no driver {driver!r} (add it: odo-backend drivers add {driver})")
            if tx.one("SELECT id FROM api_tokens WHERE name = ? AND revoked_at IS NULL", (name,)):
                raise ApiTokenError(f"an API token named {name!r} exists (revoke it first)")
            tx.execute("INSERT INTO api_tokens (name, token_hash, role, driver_id, expires_at, revoked_at, "
                       "created_at) VALUES (?, ?, ?, ?, ?, NULL, ?)",
                       (name, token_hash(token), role, driver, expires_at, now_ms))
            row = tx.one("SELECT * FROM api_tokens WHERE token_hash = ?", (token_hash(token),))
    except IntegrityError:
        raise ApiTokenError(f"an API token named {name!r} exists (revoke it first)") from None
    assert row is not None
    made = ApiToken.from_row(row)
    log.info("API token %s (%s) added", made.name, made.label)
    return token, made


def list_tokens(db: Database) -> list[ApiToken]:
    return [ApiToken.from_row(r) for r in db.query("SELECT * FROM api_tokens ORDER BY name, id")]


def revoke(db: Database, name: str, now_ms: int) -> tuple[ApiToken, bool]:
    """Revoke the token named ``name``; return it and whether this call revoked it (False: it was
    already). :class:`ApiTokenError` when no token has that name."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ApiTokenError(f"name {name!r}: not an API token's name")
    with db.write() as tx:
        row = tx.one("SELECT * FROM api_tokens WHERE name = ? AND revoked_at IS NULL", (name,))
        if row is not None:
            tx.execute("UPDATE api_tokens SET revoked_at = ? WHERE id = ?", (now_ms, row["id"]))
            log.info("API token %s revoked", name)
            return ApiToken.from_row({**row, "revoked_at": now_ms}), True
        row = tx.one("SELECT * FROM api_tokens WHERE name = ? ORDER BY revoked_at DESC LIMIT 1", (name,))
    if row is None:
        raise ApiTokenError(f"no API token named {name!r}")
    return ApiToken.from_row(row), False


def authenticate(db: Database, given: str | None, configured: str | None, now_ms: int) -> Principal | Refusal:
    """Who a request with bearer token ``given`` acts as, or why it is refused.

    With neither ``configured`` (the ``api_token`` setting) nor any row in ``api_tokens``, every
    request is :data:`UNNAMED_OPERATOR`: the API is open. Otherwise it needs the configured token
    (compared in constant time) or a stored one neither revoked nor expired.
    """
    if given is not None and configured is not None and hmac.compare_digest(
            given.encode("utf-8"), configured.encode("utf-8")):
        return UNNAMED_OPERATOR
    with db.read() as tx:
        if given is not None and len(given) <= MAX_TOKEN:
            row = tx.one("SELECT * FROM api_tokens WHERE token_hash = ?", (token_hash(given),))
            if row is not None:
                found = ApiToken.from_row(row)
                state = found.state(now_ms)
                if state != "active":
                    return Refusal(f"the API token {found.name} is {state}")
                return Principal(found.role, found.driver, found.name)
        if configured is None and tx.one("SELECT id FROM api_tokens LIMIT 1") is None:
            return UNNAMED_OPERATOR
    if given is None:
        return Refusal("missing Authorization: Bearer <api token>")
    return Refusal("unknown bearer token")

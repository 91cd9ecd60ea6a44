"""The driver's page's PIN and its sign-in sessions.

``odo-agent init`` makes a PIN (:data:`NEW_PIN_DIGITS` random digits) for the dongle's label;
``odo-agent pin set`` / ``pin reset`` replace it. Only a salted scrypt hash of it is kept, in
``STATE_DIR/ui-pin.json`` (mode 0600), beside the key that signs the page's session cookies.
Each change of the PIN makes a new session key too, so every browser signed in is signed out.

A session cookie is ``EXPIRY.NONCE.MAC``: its expiry in Unix seconds, a random nonce and an
HMAC-SHA256 of both under the session key. One whose expiry is past, or further ahead than a
session lasts (the clock went back), is no session.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

PIN_FILE = "ui-pin.json"
NEW_PIN_DIGITS = 8
PIN_PATTERN = re.compile(r"[0-9]{6,12}")
#: scrypt's cost: 8 MiB and some tens of milliseconds a try, on a laptop core or a Pi.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**13, 8, 1
SESSION_S = 12 * 3600
COOKIE = "odo_session"
MAX_FILE_BYTES = 4096
_COOKIE_VALUE = re.compile(r"([0-9]{1,12})\.([A-Za-z0-9_-]{22})\.([A-Za-z0-9_-]{43})")


class PinError(Exception):
    """No usable PIN file, or a PIN that is not 6 to 12 digits."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _derive(pin: str, salt: bytes, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> bytes:
    return hashlib.scrypt(pin.encode("ascii"), salt=salt, n=n, r=r, p=p, dklen=32, maxmem=64 * 1024 * 1024)


def check_pin(pin: str) -> str:
    """``pin`` when it is 6 to 12 ASCII digits; :class:`PinError` otherwise."""
    if not PIN_PATTERN.fullmatch(pin):
        raise PinError("a PIN is 6 to 12 digits (0-9)")
    return pin


def new_pin() -> str:
    return "".join(secrets.choice("0123456789") for _ in range(NEW_PIN_DIGITS))


def path(state_dir: Path) -> Path:
    return state_dir / PIN_FILE


def store(state_dir: Path, pin: str) -> None:
    """Keep the hash of ``pin`` (and a fresh session key) in place of what was there."""
    salt = secrets.token_bytes(16)
    doc = {"kdf": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "salt": _b64(salt),
           "hash": _b64(_derive(check_pin(pin), salt)), "session_key": _b64(secrets.token_bytes(32))}
    target = path(state_dir)
    tmp = target.with_name(f".{PIN_FILE}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(json.dumps(doc) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        if os.geteuid() == 0:      # root on the dongle: the file stays the service user's
            st = state_dir.stat()
            os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def reset(state_dir: Path) -> str:
    """Make, keep and return a new random PIN."""
    pin = new_pin()
    store(state_dir, pin)
    return pin


@dataclass(frozen=True)
class Pin:
    """The stored PIN's hash and the session key, as read from the file."""

    salt: bytes
    hash: bytes
    n: int
    r: int
    p: int
    session_key: bytes = b""

    def matches(self, typed: str) -> bool:
        """Whether ``typed`` is the PIN (compared in constant time; anything not digits is not)."""
        candidate = typed if PIN_PATTERN.fullmatch(typed) else "0"
        ok = hmac.compare_digest(_derive(candidate, self.salt, self.n, self.r, self.p), self.hash)
        return ok and candidate == typed

    def cookie(self, now_s: int | None = None) -> str:
        """A new session's cookie value, good for :data:`SESSION_S`."""
        expiry = (int(time.time()) if now_s is None else now_s) + SESSION_S
        body = f"{expiry}.{_b64(secrets.token_bytes(16))}"
        return f"{body}.{self._mac(body)}"

    def session_ok(self, value: str | None, now_s: int | None = None) -> bool:
        """Whether a cookie value is a session this key signed that has not expired."""
        m = _COOKIE_VALUE.fullmatch(value or "")
        if m is None:
            return False
        body = f"{m.group(1)}.{m.group(2)}"
        if not hmac.compare_digest(self._mac(body), m.group(3)):
            return False
        now = int(time.time()) if now_s is None else now_s
        return now < int(m.group(1)) <= now + SESSION_S + 60

    def _mac(self, body: str) -> str:
        return _b64(hmac.new(self.session_key, b"odo-page-session:" + body.encode(), hashlib.sha256).digest())


def load(state_dir: Path) -> Pin:
    """The PIN file of ``state_dir``; :class:`PinError` naming what is wrong."""
    where = path(state_dir)
    try:
        with where.open("rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise PinError(f"no PIN for the driver's page at {where}: run `odo-agent pin reset` "
                       "(it prints a new one for the dongle's label)") from None
    except OSError as exc:
        raise PinError(f"cannot read {where}: {exc.strerror}") from None
    try:
        if len(data) > MAX_FILE_BYTES:
            raise ValueError("too large")
        doc = json.loads(data)
        n, r, p = doc["n"], doc["r"], doc["p"]
        if doc["kdf"] != "scrypt" or not all(type(v) is int for v in (n, r, p)):
            raise ValueError("not scrypt")
        if n not in (2**k for k in range(10, 18)) or not 1 <= r <= 16 or not 1 <= p <= 4:
            raise ValueError("scrypt parameters out of range")
        pin = Pin(_unb64(doc["salt"]), _unb64(doc["hash"]), n, r, p, _unb64(doc["session_key"]))
        if len(pin.hash) != 32 or len(pin.session_key) != 32 or not 16 <= len(pin.salt) <= 64:
            raise ValueError("wrong lengths")
    except (ValueError, KeyError, TypeError) as exc:
        raise PinError(f"{where} is not a PIN file ({exc}): run `odo-agent pin reset`") from None
    return pin

"""How often the driver's page lets a client try a PIN, and how often it signs a confirmation.

:class:`SignInThrottle` (in memory, bounded): :data:`MAX_TRIES` PINs per client address in
:data:`WINDOW_S`; when they are used up with a wrong one, the address is locked out for
:data:`WINDOW_S`, then twice as long each time, up to :data:`MAX_LOCK_S`. A right PIN forgets
the address. It keeps at most :data:`MAX_CLIENTS` addresses: when all are in use (tried in
the window or locked out), a new address is refused too, so that many addresses do not buy
more tries. A try is counted before the PIN is checked, so concurrent tries count.

:class:`ConfirmationAllowance` (``STATE_DIR/ui-confirmations.json``): the page signs one
confirmation an ISO week, and for :data:`CORRECTION_S` after it up to :data:`CORRECTIONS`
more (the driver fixing a typo); then nothing until the next week. The slot is taken before
the record is signed, so a crash in between spends it rather than granting another.
``odo-agent confirm`` does not go through it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MAX_TRIES = 5
WINDOW_S = 300.0
MAX_LOCK_S = 3600.0
MAX_CLIENTS = 64

ALLOWANCE_FILE = "ui-confirmations.json"
CORRECTION_S = 600
CORRECTIONS = 2
_WEEK = re.compile(r"[0-9]{4}-W[0-9]{2}")


@dataclass
class _Client:
    window_start: float
    tries: int = 0
    strikes: int = 0
    locked_until: float = 0.0

    def idle(self, now: float) -> bool:
        return now >= self.locked_until and now - self.window_start >= WINDOW_S


class SignInThrottle:
    """Tries of a PIN per client address; ``clock`` is monotonic seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._clients: dict[str, _Client] = {}
        self._lock = threading.Lock()

    def begin(self, addr: str) -> float | None:
        """Count a try from ``addr``: None when it may go ahead, else the seconds to wait."""
        now = self._clock()
        with self._lock:
            c = self._clients.get(addr)
            if c is None:
                if len(self._clients) >= MAX_CLIENTS and not self._evict(now):
                    return WINDOW_S
                c = self._clients[addr] = _Client(now)
            if now < c.locked_until:
                return c.locked_until - now
            if now - c.window_start >= WINDOW_S:
                c.window_start, c.tries = now, 0
            if c.tries >= MAX_TRIES:
                return c.window_start + WINDOW_S - now
            c.tries += 1
            return None

    def failed(self, addr: str) -> None:
        """The try from ``addr`` was a wrong PIN: lock it out once its tries are used up."""
        now = self._clock()
        with self._lock:
            c = self._clients.get(addr)
            if c is not None and c.tries >= MAX_TRIES and now >= c.locked_until:
                c.strikes += 1
                c.locked_until = now + min(WINDOW_S * 2 ** (c.strikes - 1), MAX_LOCK_S)
                c.window_start, c.tries = c.locked_until, 0

    def succeeded(self, addr: str) -> None:
        with self._lock:
            self._clients.pop(addr, None)

    def __len__(self) -> int:
        return len(self._clients)

    def _evict(self, now: float) -> bool:
        """Forget the client idle longest; False when none is idle."""
        idle = [(c.window_start, a) for a, c in self._clients.items() if c.idle(now)]
        if not idle:
            return False
        del self._clients[min(idle)[1]]
        return True


class ConfirmationAllowance:
    """The page's confirmations this ISO week, kept in the state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / ALLOWANCE_FILE
        self._lock = threading.Lock()

    def take(self, week: str, now_ms: int) -> bool:
        """Take a slot for a confirmation now, in ``week``; False when none is left. Raises
        OSError when the slot cannot be saved (nothing is signed then)."""
        with self._lock:
            used = self._read()
            if used is None or used[0] != week:
                self._write(week, now_ms, 1)
                return True
            _, first_ms, count = used
            if 0 <= now_ms - first_ms < CORRECTION_S * 1000 and count <= CORRECTIONS:
                self._write(week, first_ms, count + 1)
                return True
            return False

    def _read(self) -> tuple[str, int, int] | None:
        try:
            with self.path.open("rb") as fh:
                doc = json.loads(fh.read(1024))
            week, first, count = doc["week"], doc["first_t"], doc["count"]
        except (OSError, ValueError, KeyError, TypeError):
            return None                          # none, or not this module's: begun afresh
        if not (isinstance(week, str) and _WEEK.fullmatch(week) and type(first) is int
                and type(count) is int):
            return None
        return week, first, count

    def _write(self, week: str, first_ms: int, count: int) -> None:
        tmp = self.path.with_name(f".{ALLOWANCE_FILE}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(json.dumps({"week": week, "first_t": first_ms, "count": count}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

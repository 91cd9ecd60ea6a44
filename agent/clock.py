"""Time on a device with no real-time clock.

A Raspberry Pi boots with a stale wall clock until NTP (or GPS) sets it, so
every record says whether its ``t`` can be trusted (``clock``: ``synced`` or
``unsynced``) and carries this boot's id and the monotonic time since boot,
which order records whatever the wall clock said.

The clock counts as synchronised when, in this order:

- systemd-timesyncd has created ``/run/systemd/timesync/synchronized``;
- ``timedatectl show -p NTPSynchronized --value`` says ``yes``;
- ``chronyc -n tracking`` reports ``Leap status : Normal``.

Once synchronised it stays so for the rest of the process: a later loss of the
NTP server leaves a clock that is still close to right.

The wall clock itself is read with :func:`common.clock.now_ms`, as the backend reads it.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from agent.errors import ClockError

log = logging.getLogger(__name__)

TIMESYNC_FLAG = Path("/run/systemd/timesync/synchronized")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def mono_ms() -> int:
    """Monotonic milliseconds since boot (CLOCK_MONOTONIC)."""
    return time.monotonic_ns() // 1_000_000


def boot_id(path: Path = BOOT_ID) -> str:
    """This boot's id (the kernel's, without dashes). Raises :class:`ClockError` when it cannot
    be read: a made-up id would let the backend compare monotonic times across reboots, and
    judge good readings after a restart as implausibly fast. (systemd's ``ProcSubset=pid``
    hides ``/proc/sys``; the shipped units do not use it.)"""
    try:
        text = path.read_text().strip().replace("-", "")
    except OSError as exc:
        raise ClockError(f"cannot read this boot's id from {path} ({exc.strerror or exc}); "
                         "the agent needs /proc/sys visible (no ProcSubset=pid in its unit)") from None
    if not (text.isascii() and text.isalnum() and 0 < len(text) <= 64):
        raise ClockError(f"{path} holds no boot id ({text[:40]!r})")
    return text.lower()


def _run(args: list[str]) -> str | None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=2, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def system_synchronised() -> bool:
    if TIMESYNC_FLAG.exists():
        return True
    out = _run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"])
    if out is not None and out.strip() == "yes":
        return True
    out = _run(["chronyc", "-n", "tracking"])
    if out is not None:
        for line in out.splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "Leap status" and value.strip() == "Normal":
                return True
    return False


class Clock:
    """``state()`` is ``synced`` or ``unsynced``; ``mode`` forces one (config ``clock``)."""

    def __init__(
        self, mode: str = "auto", *, probe: Callable[[], bool] = system_synchronised,
        recheck_s: float = 30.0, monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in ("auto", "synced", "unsynced"):
            raise ValueError(f"clock mode {mode!r}")
        self.mode = mode
        self._probe = probe
        self._recheck_s = recheck_s
        self._monotonic = monotonic
        self._synced = mode == "synced"
        self._checked_at: float | None = None

    def state(self) -> str:
        if self.mode == "auto" and not self._synced:
            now = self._monotonic()
            if self._checked_at is None or now - self._checked_at >= self._recheck_s:
                self._checked_at = now
                self._synced = self._probe()
                if self._synced:
                    log.info("system clock is synchronised")
        return "synced" if self._synced else "unsynced"

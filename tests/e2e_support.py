"""Helpers for the end-to-end tests: waiting for a condition, and finding left-over processes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def wait_until(what: str, cond: Callable[[], Any], timeout: float = 30, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def left_running(path: Path) -> list[str]:
    """Processes whose command line or working directory mentions ``path``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if str(path) in cmd or cwd.startswith(str(path)):
            found.append(f"{pid} {cmd}")
    return found

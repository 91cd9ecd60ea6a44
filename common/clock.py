"""The one wall-clock reader of the agent and the backend: Unix milliseconds, as integers."""

from __future__ import annotations

import time


def now_ms() -> int:
    """Wall-clock Unix milliseconds."""
    return time.time_ns() // 1_000_000

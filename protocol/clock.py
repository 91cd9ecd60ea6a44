"""The one wall-clock reader that the agent and the backend share.

Everything else in :mod:`protocol` is pure; times are passed in as integers (Unix
milliseconds) and this is where both sides take them from.
"""

from __future__ import annotations

import time


def now_ms() -> int:
    """Wall-clock Unix milliseconds."""
    return time.time_ns() // 1_000_000

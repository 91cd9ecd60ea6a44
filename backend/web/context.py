"""What every HTTP route needs, handed in once when the app is made."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from backend.db import Database


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class AppContext:
    db: Database
    rules: Any = None                      # backend.rules.Rules, when a rules file is configured
    api_token: str | None = field(default=None, repr=False)
    clock: Callable[[], int] = now_ms      # Unix milliseconds
    secure_cookies: bool = False           # set behind TLS

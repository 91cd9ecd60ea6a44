"""What every HTTP route needs, handed in once when the app is made."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from backend.db import Database
from backend.ledger.rules import Rules
from common.clock import now_ms


@dataclass(frozen=True)
class AppContext:
    db: Database
    rules: Rules | None = None             # when a rules file is configured
    api_token: str | None = field(default=None, repr=False)
    clock: Callable[[], int] = now_ms      # Unix milliseconds
    secure_cookies: bool = False           # set behind TLS
    witnesses: int = 0                     # how many witnesses cosign the log's checkpoints

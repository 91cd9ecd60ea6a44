"""What every HTTP route needs, handed in once when the app is made.

The rules: ``book``, the rule book a running backend keeps up to date
(:class:`backend.ledger.contracts.LiveBook`); ``rules``, one file's rules where there is no book
(tests), and the version in force when the app was made where there is. Routes ask
:meth:`AppContext.rules_at` for the version in force at a time (a catalogue), and hand
:meth:`AppContext.rule_source` to what credits (``devices.clear``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from backend.db import Database
from backend.ledger.contracts import Source, book_of
from backend.ledger.rules import Rules
from common.clock import now_ms


@dataclass(frozen=True)
class AppContext:
    db: Database
    rules: Rules | None = None             # one file's rules; with a book, the version in force at start
    api_token: str | None = field(default=None, repr=False)
    clock: Callable[[], int] = now_ms      # Unix milliseconds
    secure_cookies: bool = False           # set behind TLS
    witnesses: int = 0                     # how many witnesses cosign the log's checkpoints
    display_unit: str = "km"               # the fleet's default unit of distance: km | mi
    book: Source | None = None             # the rule book, when there is one

    def rules_at(self, t_ms: int) -> Rules | None:
        """The rules in force at ``t_ms``: the book's version then, else ``rules``."""
        if self.book is None:
            return self.rules
        version = book_of(self.book).at(t_ms)
        return None if version is None else version.rules

    def rule_source(self) -> Source | None:
        """What credits by: the book, else ``rules``."""
        return self.book if self.book is not None else self.rules

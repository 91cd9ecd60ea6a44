"""Which seq to send next, and when to go back and send again (docs/protocol.md §4.3). Pure logic.

Records go out ascending, up to ``window_records`` ahead of the last ack. When ``through``
makes no progress for ``resend_after_s`` while records are outstanding, the window rewinds to
``through + 1``; each fruitless round doubles that wait, up to ``max_resend_after_s``. Times
are monotonic seconds, passed in.
"""

from __future__ import annotations

from typing import Protocol


class WindowSettings(Protocol):
    """The fields of :class:`agent.sync.SyncSettings` that the window reads."""

    @property
    def resend_after_s(self) -> float: ...
    @property
    def max_resend_after_s(self) -> float: ...
    @property
    def window_records(self) -> int: ...


class SendWindow:
    """Which seq to send next, and when to go back and send again. Pure logic."""

    def __init__(self, settings: WindowSettings, now: float) -> None:
        self.settings = settings
        self.next_seq = 1
        self.acked = 0
        self.last_progress = now
        self.stalls = 0

    def restart(self, first_unsynced: int | None, tip: int, acked: int, now: float) -> None:
        self.acked = max(self.acked, acked)
        self.next_seq = first_unsynced if first_unsynced is not None else tip + 1
        self.last_progress = now

    def on_ack(self, through: int, now: float) -> None:
        if through > self.acked:
            self.acked = through
            self.last_progress = now
            self.stalls = 0
        self.next_seq = max(self.next_seq, self.acked + 1)

    @property
    def outstanding(self) -> bool:
        return self.next_seq - 1 > self.acked

    def room(self) -> int:
        return max(0, self.settings.window_records - (self.next_seq - 1 - self.acked))

    def sent(self, last_seq: int, now: float) -> None:
        if not self.outstanding:
            self.last_progress = now
        self.next_seq = last_seq + 1

    def resend_delay(self) -> float:
        s = self.settings
        return min(s.max_resend_after_s, s.resend_after_s * float(2 ** min(self.stalls, 16)))

    def timed_out(self, now: float) -> bool:
        """True (and rewinds) when outstanding records have waited too long for an ack."""
        if not self.outstanding or now - self.last_progress < self.resend_delay():
            return False
        self.next_seq = self.acked + 1
        self.last_progress = now
        self.stalls += 1
        return True

    def resend_now(self, now: float) -> None:
        self.next_seq = self.acked + 1
        self.last_progress = now
        self.stalls = 0

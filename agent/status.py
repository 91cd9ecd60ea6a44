"""The agent's retained status message (docs/protocol.md §4.4): what it says, and when it is due.

``{"online": true, "t", "backlog", "last_seq", "obd", "version"}``, plus ``error`` while the
agent is in an error state (e.g. a full disk). It goes out on connect, then whenever something
in it changed, checked at most every ``every_s``. Its last word is the will,
``{"online": false}`` (:data:`protocol.messages.OFFLINE`), which :mod:`agent.sync` also
publishes itself on a clean stop.
"""

from __future__ import annotations

from collections.abc import Callable

from agent import __version__
from agent.buffer import Outbox
from common.clock import now_ms
from protocol import messages


class StatusReport:
    """``obd_state`` gives the adapter's state, ``error`` the agent's error state, if any."""

    def __init__(self, outbox: Outbox, *, obd_state: Callable[[], str], error: Callable[[], str | None],
                 every_s: float) -> None:
        self.outbox = outbox
        self.obd_state = obd_state
        self.error = error
        self.every_s = every_s
        self._last: tuple[int, int, str, str | None] | None = None
        self._checked_at = 0.0

    def reset(self) -> None:
        """A new connection: the next :meth:`due` sends the status whatever it says."""
        self._last = None

    def due(self, now: float) -> bytes | None:
        """The status to publish (retained) now, or None; ``now`` is monotonic seconds.
        Raises :class:`agent.errors.StorageError` when the outbox cannot be read."""
        if self._last is not None and now - self._checked_at < self.every_s:
            return None
        self._checked_at = now
        counts = self.outbox.counts()
        key = (counts.unsynced, counts.last_seq, self.obd_state(), self.error())
        if key == self._last:
            return None
        fields: dict[str, object] = {"t": now_ms(), "backlog": key[0], "last_seq": key[1], "obd": key[2],
                                     "version": __version__}
        if key[3]:
            fields["error"] = key[3]
        self._last = key
        return messages.encode_status(**fields)

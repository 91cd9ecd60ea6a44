"""Acting on the power policy (:mod:`agent.power`, which only decides).

After every sample the daemon's OBD loop calls :meth:`Shutdown.check`: it counts the unsynced
backlog and asks the policy whether to shut the device down. The first time the policy says
so, the reason is kept (``reason``), a ``shutdown`` event is recorded with the daemon's state,
and ``shutdown_command`` (e.g. ``systemctl poweroff``) runs, once. With no command configured
it is only logged.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Sequence
from typing import Protocol

from agent.clock import mono_ms
from agent.errors import StorageError
from agent.recorder import Recorder
from agent.state import Writes

log = logging.getLogger(__name__)


class PowerLike(Protocol):
    """:class:`agent.power.PowerPolicy`'s interface."""

    def poll_interval_s(self, ignition: bool) -> float: ...
    def should_shutdown(
        self, *, now_mono_ms: int, ignition: bool, voltage_mv: int | None, backlog: int
    ) -> str | None: ...


def run_shutdown(command: Sequence[str]) -> object:
    try:
        return subprocess.run(list(command), timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("shutdown command failed: %s", exc)
        return None


class Shutdown:
    def __init__(self, power: PowerLike, recorder: Recorder, *, command: Sequence[str] = (),
                 run_command: Callable[[Sequence[str]], object] | None = None) -> None:
        self.power = power
        self.recorder = recorder
        self.outbox = recorder.outbox
        self.command = tuple(command)
        self._run_command = run_command or run_shutdown
        self.reason: str | None = None

    def check(self, sample: object, *, ignition: bool, state: Callable[[], Writes]) -> None:
        """Ask the policy about this sample (its ``mono_ms`` and ``voltage_mv``); ``state`` is
        what to save with the ``shutdown`` event."""
        if self.reason is not None:
            return
        try:
            backlog = self.outbox.backlog()
        except StorageError as exc:
            log.error("cannot count the backlog: %s", exc)
            return
        reason = self.power.should_shutdown(
            now_mono_ms=getattr(sample, "mono_ms", mono_ms()), ignition=ignition,
            voltage_mv=getattr(sample, "voltage_mv", None), backlog=backlog,
        )
        if reason is None:
            return
        self.reason = reason
        if not self.command:
            log.warning("power policy says shut down (%s), but no shutdown_command is configured", reason)
            return
        log.warning("shutting down (%s): %s", reason, " ".join(self.command))
        self.recorder.event("shutdown", {"reason": reason}, state())
        self._run_command(self.command)

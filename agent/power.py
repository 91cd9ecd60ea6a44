"""Power policy: how often to poll, and when the agent should shut the device down.

Pure logic; the caller passes monotonic time in. Parked cars draining their
12 V battery are the complaint this answers (FIELD-NOTES): poll slowly with
the engine off, and shut down

- ``low_voltage``: the battery stayed below ``low_voltage_mv`` for the whole of
  ``low_voltage_for_s`` with the ignition off. One reading at or above the
  threshold, or the ignition coming on, restarts the wait; a missing reading
  (adapter not answering) neither counts nor resets. With the engine running
  the alternator, not the battery, feeds the car: a low reading then says
  nothing about a parked car's drain, and cranking dips must not stop a trip.
- ``engine_off``: the ignition has been off for ``off_shutdown_after_s`` and
  nothing is left to sync (``backlog == 0``), or for ``off_shutdown_max_s``
  whatever the backlog (records wait safely on disk for the next drive).
"""

from __future__ import annotations

from dataclasses import dataclass

#: The longest polling interval either setting may ask for.
MAX_POLL_S = 3600.0


@dataclass(frozen=True)
class PowerConfig:
    """The ``[power]`` table. Poll intervals are seconds, fractions allowed: a simulation that runs
    the car's time faster than the clock (``bench.agent``) polls faster in proportion."""

    off_poll_s: float = 10.0             # polling interval with the engine off
    on_poll_s: float = 1.0
    low_voltage_mv: int = 12200          # below this for low_voltage_for_s → shut down
    low_voltage_for_s: int = 180
    off_shutdown_after_s: int = 1800     # engine off this long with nothing left to sync → shut down
    off_shutdown_max_s: int = 4 * 3600   # engine off this long → shut down even with a backlog

    def __post_init__(self) -> None:
        for name in ("off_poll_s", "on_poll_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_POLL_S:
                raise ValueError(f"{name}: {value!r} must be a number of seconds above 0 and at most "
                                 f"{MAX_POLL_S:.0f}")
        if self.low_voltage_mv < 0 or self.low_voltage_for_s < 0:
            raise ValueError("low_voltage_mv and low_voltage_for_s must not be negative")
        if self.off_shutdown_after_s < 0 or self.off_shutdown_max_s < self.off_shutdown_after_s:
            raise ValueError("off_shutdown_max_s must be at least off_shutdown_after_s (both >= 0)")


class PowerPolicy:
    def __init__(self, cfg: PowerConfig) -> None:
        self.cfg = cfg
        self._low_since: int | None = None
        self._off_since: int | None = None

    def poll_interval_s(self, ignition: bool) -> float:
        return float(self.cfg.on_poll_s if ignition else self.cfg.off_poll_s)

    def should_shutdown(self, *, now_mono_ms: int, ignition: bool, voltage_mv: int | None,
                        backlog: int) -> str | None:
        """None, or why to shut down ("low_voltage" / "engine_off") once the condition has held."""
        if ignition:
            self._low_since = self._off_since = None
            return None
        if self._off_since is None or now_mono_ms < self._off_since:
            self._off_since = now_mono_ms
        if voltage_mv is not None:
            if voltage_mv >= self.cfg.low_voltage_mv:
                self._low_since = None
            elif self._low_since is None or now_mono_ms < self._low_since:
                self._low_since = now_mono_ms
        if self._low_since is not None and now_mono_ms - self._low_since >= self.cfg.low_voltage_for_s * 1000:
            return "low_voltage"
        off_ms = now_mono_ms - self._off_since
        if backlog <= 0 and off_ms >= self.cfg.off_shutdown_after_s * 1000:
            return "engine_off"
        if off_ms >= self.cfg.off_shutdown_max_s * 1000:
            return "engine_off"
        return None

"""Trips: the ignition (debounced), and the records a drive produces.

Pure logic: no I/O, no clocks (``mono_ms`` and wall-clock ``wall_ms`` come in).

Ignition. A sample counts as "on" when the adapter answered and the ECU did
(or RPM > 0). The ignition turns on after ``on_debounce_ms`` of "on" samples
and off after ``off_debounce_ms`` of anything else (an adapter that stops
answering included); a single contrary sample restarts the wait. A trip starts
at the first "on" sample of the run that turned the ignition on, and ends at
the last "on" sample before it turned off.

Records, as ``(kind, fields)`` for the vehicle to wrap:

- ``odometer`` at trip start, then every ``record_every_m`` metres, or every
  ``record_every_ms`` while the odometer moves, whichever comes first, and at
  trip end; only while the odometer may be recorded (never below a value
  already recorded: see :mod:`agent.odometer`).
- ``trip`` at trip end: ``start_t``, ``end_t``, ``start_odo_m``, ``end_odo_m``,
  ``max_kph``, ``src``. The odometer values are those recorded (so ``end_odo_m``
  is never below an earlier record, and never below ``start_odo_m``); ``src`` is
  ``obd`` when both ends came from PID A6, else ``derived``. A trip that began
  before the odometer was known gets ``start_odo_m = end_odo_m - distance``.
- With no odometer at all by the end of the trip (no A6, never confirmed),
  there is nothing honest to put in a trip record's odometer fields: the drive
  is recorded as an ``event`` ``trip_unanchored`` whose detail holds
  ``start_t``, ``end_t``, ``distance_m`` (measured from speed) and ``max_kph``.

A trip in progress is part of the snapshot. On the first sample after a
restart, a restored trip whose last "on" sample is older than the off debounce
(or when the wall clock went backwards, as it does on a Pi without a clock)
ended while the agent was away: it is closed at that last "on" sample, before
the new sample's distance is counted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from agent.odometer import Odometer

log = logging.getLogger(__name__)

Out = list[tuple[str, dict[str, object]]]


def _int(state: Mapping[str, object], key: str) -> int | None:
    v = state.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


@dataclass(frozen=True)
class TripConfig:
    record_every_m: int = 1000
    record_every_ms: int = 60_000
    on_debounce_ms: int = 3000
    off_debounce_ms: int = 30_000


class Ignition:
    """Debounced ignition state."""

    def __init__(self, on_debounce_ms: int, off_debounce_ms: int,
                 state: Mapping[str, object] | None = None) -> None:
        st = state or {}
        self.on_debounce_ms = on_debounce_ms
        self.off_debounce_ms = off_debounce_ms
        self.on = st.get("ign_on") == 1
        self.last_on_wall = _int(st, "ign_last_on_wall")   # wall time of the last "on" sample
        self.on_since_wall: int | None = None              # first "on" sample of the current run
        self._since_mono: int | None = None                # start of a contrary run (runtime only)
        self._since_wall = 0

    @property
    def pending(self) -> bool:
        """A contrary run is under way (the state may flip at a coming sample)."""
        return self._since_mono is not None

    def update(self, raw_on: bool, mono_ms: int, wall_ms: int) -> str | None:
        """Feed one sample; returns "start" or "end" when the debounced state flips."""
        if raw_on == self.on:
            self._since_mono = None
            if raw_on:
                self.last_on_wall = wall_ms
            return None
        if self._since_mono is None or mono_ms < self._since_mono:
            self._since_mono, self._since_wall = mono_ms, wall_ms
        wait = self.on_debounce_ms if raw_on else self.off_debounce_ms
        if mono_ms - self._since_mono < wait:
            return None
        self.on = raw_on
        self._since_mono = None
        if raw_on:
            self.on_since_wall, self.last_on_wall = self._since_wall, wall_ms
            return "start"
        return "end"

    def snapshot(self) -> dict[str, int | str | None]:
        return {"ign_on": int(self.on), "ign_last_on_wall": self.last_on_wall}


class Trips:
    """The trip in progress and the records around it."""

    def __init__(self, cfg: TripConfig, state: Mapping[str, object] | None = None) -> None:
        st = state or {}
        self.cfg = cfg
        self.ignition = Ignition(cfg.on_debounce_ms, cfg.off_debounce_ms, st)
        self._start_t = _int(st, "trip_start_t")
        self._start_odo = _int(st, "trip_start_odo_m")
        self._start_travel = _int(st, "trip_start_travel_m") or 0
        src = st.get("trip_start_src")
        self._start_src: str | None = src if isinstance(src, str) else None
        self._max_kph = _int(st, "trip_max_kph") or 0
        self._last_rec_odo = _int(st, "trip_last_rec_odo_m")
        self._last_rec_mono: int | None = None
        self._cand: tuple[int | None, str | None, int] | None = None   # odometer at the first "on" sample

    @property
    def active(self) -> bool:
        return self._start_t is not None

    def current(self, odo: Odometer) -> dict[str, object] | None:
        """The trip in progress: start_t, start_odo_m, distance_m, max_kph."""
        if self._start_t is None:
            return None
        return {"start_t": self._start_t, "start_odo_m": self._start_odo,
                "distance_m": self._distance(odo), "max_kph": self._max_kph}

    def snapshot(self) -> dict[str, int | str | None]:
        out = self.ignition.snapshot()
        out.update({
            "trip_start_t": self._start_t, "trip_start_odo_m": self._start_odo,
            "trip_start_travel_m": self._start_travel if self.active else None,
            "trip_start_src": self._start_src, "trip_max_kph": self._max_kph if self.active else None,
            "trip_last_rec_odo_m": self._last_rec_odo,
        })
        return out

    def resume(self, wall_ms: int, odo: Odometer) -> Out:
        """First sample after a restart: close a trip that ended while the agent was away."""
        out: Out = []
        if not self.active:
            return out
        last = self.ignition.last_on_wall
        if (self.ignition.on and last is not None and last <= wall_ms
                and wall_ms - last <= self.cfg.off_debounce_ms):
            return out
        log.info("closing the trip that was in progress before the restart")
        self._end(last if last is not None else self._start_t or 0, odo, out, None)
        self.ignition.on = False
        return out

    def step(self, raw_on: bool, speed_kph: int | None, mono_ms: int, wall_ms: int, odo: Odometer) -> Out:
        out: Out = []
        if raw_on and not self.ignition.on and not self.ignition.pending:
            self._cand = (self._stated(odo), odo.src, odo.travel_m)
        change = self.ignition.update(raw_on, mono_ms, wall_ms)
        if change == "start":
            if self.active:                 # cannot happen after resume(); be safe
                self._end(self.ignition.last_on_wall or wall_ms, odo, out, mono_ms)
            self._start(self.ignition.on_since_wall or wall_ms, odo, out, mono_ms)
        if not self.active:
            return out
        if speed_kph is not None and raw_on:
            self._max_kph = max(self._max_kph, speed_kph)
        if change == "end":
            self._end(self.ignition.last_on_wall or wall_ms, odo, out, mono_ms)
        elif change is None and self.ignition.on:
            self._periodic(odo, out, mono_ms)
        return out

    # -- internals ---------------------------------------------------------------------------

    def _distance(self, odo: Odometer) -> int:
        end = self._stated(odo)
        if end is not None and self._start_odo is not None:
            return max(0, end - self._start_odo)
        return max(0, odo.travel_m - self._start_travel)

    @staticmethod
    def _stated(odo: Odometer) -> int | None:
        """The odometer as records state it: the current value, or the highest recorded."""
        v = odo.value
        if v is None:
            return odo.high_m
        return v if odo.high_m is None else max(v, odo.high_m)

    def _record_odometer(self, odo: Odometer, out: Out, mono_ms: int | None) -> None:
        v = odo.value
        if v is None or not odo.recordable:
            return
        out.append(("odometer", {"odo_m": v, "src": odo.src}))
        odo.recorded(v)
        self._last_rec_odo, self._last_rec_mono = v, mono_ms

    def _start(self, start_t: int, odo: Odometer, out: Out, mono_ms: int) -> None:
        self._record_odometer(odo, out, mono_ms)
        self._start_t = start_t
        # the trip began at the first "on" sample, before the debounce confirmed it
        self._start_odo, self._start_src, self._start_travel = self._cand or (
            self._stated(odo), odo.src, odo.travel_m)
        if self._start_odo is None and odo.value is not None:
            self._start_odo, self._start_src = self._stated(odo), odo.src
        self._cand = None
        self._max_kph = 0
        log.info("trip started (odometer %s m, %s)", self._start_odo, odo.src)

    def _periodic(self, odo: Odometer, out: Out, mono_ms: int) -> None:
        v = odo.value
        if v is None or not odo.recordable:
            return
        last = self._last_rec_odo
        by_distance = last is None or v - last >= self.cfg.record_every_m
        by_time = (last is None or v > last) and (
            self._last_rec_mono is None or mono_ms - self._last_rec_mono >= self.cfg.record_every_ms)
        if by_distance or by_time:
            self._record_odometer(odo, out, mono_ms)

    def _end(self, end_t: int, odo: Odometer, out: Out, mono_ms: int | None) -> None:
        start_t = self._start_t if self._start_t is not None else end_t
        end_t = max(end_t, start_t)
        self._record_odometer(odo, out, mono_ms)
        end = self._stated(odo)
        travelled = max(0, odo.travel_m - self._start_travel)
        if end is None:
            out.append(("event", {"event": "trip_unanchored", "detail": {
                "start_t": start_t, "end_t": end_t, "distance_m": travelled, "max_kph": self._max_kph}}))
        else:
            start = self._start_odo if self._start_odo is not None else max(0, end - travelled)
            start = min(start, end)
            src = "obd" if self._start_odo is not None and self._start_src == "obd" and odo.src == "obd" \
                else "derived"
            out.append(("trip", {"start_t": start_t, "end_t": end_t, "start_odo_m": start,
                                 "end_odo_m": end, "max_kph": self._max_kph, "src": src}))
            odo.recorded(end)
        log.info("trip ended: %s m, max %d km/h", None if end is None else end - (self._start_odo or end),
                 self._max_kph)
        self._start_t = self._start_odo = self._start_src = None
        self._start_travel, self._max_kph = 0, 0

"""The vehicle: samples in, readings out. Pure logic; no I/O, no clocks.

``Vehicle.step(sample, wall_ms)`` feeds one :class:`agent.obd_source.Sample`
through the odometer strategy (:mod:`agent.odometer`) and the trip logic
(:mod:`agent.trips`), and returns the readings to sign and store, in order:

- ``event`` ``adapter_connected`` / ``adapter_lost`` when the adapter starts or
  stops answering (detail: ``{}``);
- ``event`` ``odometer_jump_back`` (detail ``from_m``, ``to_m``, ``src``) and
  ``odometer_implausible`` (detail ``last_m``, ``read_m``) from the odometer;
- ``odometer`` and ``trip`` records, and ``event`` ``trip_unanchored``, from trips.

``snapshot()`` holds everything needed to carry on after a restart (a flat dict
of ints, strings and None). The daemon stores it in the same transaction as the
records of each step and hands it back to ``Vehicle(cfg, state)``.

A VIN change means the dongle sits in another car: its odometer has nothing to
do with this one's. The daemon starts a fresh ``Vehicle(cfg)`` then.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from agent.obd_source import Sample
from agent.odometer import Odometer
from agent.trips import TripConfig, Trips

log = logging.getLogger(__name__)

SNAPSHOT_VERSION = 1


@dataclass(frozen=True)
class Reading:
    kind: str                            # "odometer" | "trip" | "event"
    fields: Mapping[str, object]         # the kind's payload fields (docs/protocol.md §3.3), integers only


@dataclass(frozen=True)
class VehicleConfig:
    record_every_m: int = 1000           # an odometer record every N metres while moving
    record_every_ms: int = 60_000        # … or every M ms while moving, whichever first
    ignition_on_debounce_ms: int = 3000
    ignition_off_debounce_ms: int = 30_000
    max_kph: int = 300                   # plausibility bound for odometer jumps and gap distances
    integrate_max_gap_ms: int = 5000     # samples further apart than this are not integrated
    jump_back_tolerance_m: int = 1000    # smaller drops are held back silently, larger ones reported

    def __post_init__(self) -> None:
        for name in ("record_every_m", "record_every_ms", "ignition_on_debounce_ms",
                     "ignition_off_debounce_ms", "max_kph", "integrate_max_gap_ms", "jump_back_tolerance_m"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: {value!r} must be a non-negative integer")
        if self.record_every_m == 0 or self.record_every_ms == 0 or self.max_kph == 0:
            raise ValueError("record_every_m, record_every_ms and max_kph must be positive")


class Vehicle:
    def __init__(self, cfg: VehicleConfig, state: Mapping[str, object] | None = None) -> None:
        self.cfg = cfg
        st: Mapping[str, object] = state or {}
        if st and st.get("v") != SNAPSHOT_VERSION:
            log.warning("vehicle state of an unknown version %r: starting afresh", st.get("v"))
            st = {}
        self._odo = Odometer(max_kph=cfg.max_kph, max_gap_ms=cfg.integrate_max_gap_ms,
                             jump_back_tolerance_m=cfg.jump_back_tolerance_m, state=st)
        self._trips = Trips(TripConfig(cfg.record_every_m, cfg.record_every_ms,
                                       cfg.ignition_on_debounce_ms, cfg.ignition_off_debounce_ms), st)
        adapter = st.get("adapter")
        self._adapter: str | None = adapter if adapter in ("up", "down") else None
        self._resumed = False

    @property
    def odo_m(self) -> int | None:
        """Best current odometer (metres), or None while unknown."""
        return self._odo.value

    @property
    def src(self) -> str | None:
        """``obd`` | ``derived`` | None."""
        return self._odo.src

    @property
    def ignition(self) -> bool:
        return self._trips.ignition.on

    @property
    def trip(self) -> Mapping[str, object] | None:
        """The trip in progress: start_t, start_odo_m, distance_m, max_kph."""
        current = self._trips.current(self._odo)
        return MappingProxyType(current) if current is not None else None

    def confirm(self, odo_m: int) -> None:
        """A driver confirmation re-anchors the derived odometer."""
        self._odo.confirm(odo_m)

    def snapshot(self) -> dict[str, object]:
        out: dict[str, object] = {"v": SNAPSHOT_VERSION, "adapter": self._adapter}
        out.update(self._odo.snapshot())
        out.update(self._trips.snapshot())
        return out

    def step(self, s: Sample, wall_ms: int) -> list[Reading]:
        """Feed one sample taken at wall-clock ``wall_ms``; returns the readings to record."""
        out: list[Reading] = []
        if not self._resumed:
            self._resumed = True
            out += self._wrap(self._trips.resume(wall_ms, self._odo))
        if s.connected and self._adapter != "up":
            out.append(Reading("event", {"event": "adapter_connected", "detail": {}}))
            self._adapter = "up"
        elif not s.connected and self._adapter != "down":
            if self._adapter == "up":
                out.append(Reading("event", {"event": "adapter_lost", "detail": {}}))
            self._adapter = "down"
        for name, detail in self._odo.update(s, wall_ms):
            out.append(Reading("event", {"event": name, "detail": detail}))
        raw_on = s.connected and (s.ecu or (s.rpm is not None and s.rpm > 0))
        out += self._wrap(self._trips.step(raw_on, s.speed_kph, s.mono_ms, wall_ms, self._odo))
        return out

    @staticmethod
    def _wrap(items: list[tuple[str, dict[str, object]]]) -> list[Reading]:
        return [Reading(kind, fields) for kind, fields in items]

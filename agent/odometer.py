"""The odometer strategy: which value the agent states, and where it comes from.

Pure logic over samples; no I/O and no clocks (times come in as arguments).

Sources, best first:

``obd``
    PID A6 (total distance), when the car answers it plausibly. ``obd_source``
    already rejected ``NO DATA``, replies other than ``41 A6``, and 0. Here a
    forward jump larger than ``max_kph`` allows since the last accepted reading
    (plus 1 km) is set aside and reported once (``odometer_implausible``); it
    is accepted only when three readings in a row confirm it.
``derived``
    An anchor plus the distance integrated from speed (PID 0x0D) since then:
    trapezoids over ``mono_ms``, in integer metres, carrying the remainder.
    The anchor is the latest of: the driver's confirmation (``confirm()``), or
    the last accepted A6 reading (so a car whose A6 drops out keeps counting
    from it). The value is still labelled ``obd`` while nothing was added to
    the last A6 reading (e.g. while parked).
none
    No A6 and no confirmation yet: no odometer value at all (``value`` is
    None). Distance is still measured (``travel_m``) so that trips have one.

Gaps. Whenever integration stops (agent restarted, adapter lost, samples
further apart than ``max_gap_ms``), the distance driven meanwhile is taken
from PID 0x31 (km since trouble codes were cleared), as a lower bound: we keep
an upper-bound estimate of where that counter really stood (its 1 km steps
hide the fraction), and after a gap add only what the new reading proves. A
reading lower than before means the codes were cleared: after a gap, what it
shows since the clear is added. At 65,535 km the counter stops and measures
nothing more. A correction is capped by what ``max_kph`` allows in the elapsed
time, when that time is known (monotonic within a run, wall clock across runs).

Monotonic output. ``high_m`` is the highest value recorded so far (the caller
reports each one through ``recorded()``); a lower value is never recorded
(``recordable`` is false until the value reaches it again). A drop of more than
``jump_back_tolerance_m`` below it is reported once as an
``odometer_jump_back`` event with both values. The tolerance covers the small
drops that are expected: A6 counts in 100 m steps behind the integrated value,
and a dashboard shows whole kilometres.

A driver's confirmation re-anchors ``derived``, unless the derived value
already lies within the kilometre the driver read (confirmed <= derived <
confirmed + 1000), which it then keeps. While the car answers A6, the next A6
reading takes over again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

log = logging.getLogger(__name__)

DSC_MAX_KM = 65_535
_CONFIRM_AFTER = 3          # consecutive readings that make an implausible A6 jump believable
_KPH_MS_PER_M2 = 7200       # (v1 + v2) [km/h] * dt [ms] / 7200 = metres of a trapezoid

Event = tuple[str, dict[str, object]]


class SampleLike(Protocol):
    @property
    def mono_ms(self) -> int: ...
    @property
    def speed_kph(self) -> int | None: ...
    @property
    def odo_m(self) -> int | None: ...
    @property
    def dist_since_clear_km(self) -> int | None: ...


def _int(state: Mapping[str, object], key: str) -> int | None:
    v = state.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


class Odometer:
    def __init__(self, *, max_kph: int = 300, max_gap_ms: int = 5000, jump_back_tolerance_m: int = 1000,
                 state: Mapping[str, object] | None = None) -> None:
        self.max_kph = max_kph
        self.max_gap_ms = max_gap_ms
        self.tolerance_m = jump_back_tolerance_m
        st = state or {}
        self._anchor_m = _int(st, "odo_anchor_m")
        self._anchor_src = "obd" if st.get("odo_anchor_src") == "obd" else "driver"
        self._since_m = _int(st, "odo_since_m") or 0
        self._rem = _int(st, "odo_rem") or 0
        self.travel_m = _int(st, "odo_travel_m") or 0
        self._obd_m = _int(st, "odo_obd_m")
        self._obd_wall = _int(st, "odo_obd_wall")
        self._obd_mono: int | None = None
        self._pending_m: int | None = None
        self._pending_n = 0
        self._dsc_km = _int(st, "odo_dsc_km")
        self._dsc_est_m = _int(st, "odo_dsc_est_m")
        self._dsc_wall = _int(st, "odo_dsc_wall")
        self._dsc_mono: int | None = None
        self._dsc_gap = True                 # a restart is a gap
        self.high_m = _int(st, "odo_high_m")
        self._jump_back = st.get("odo_jump_back") == 1
        self._last_wall = _int(st, "odo_last_wall")
        self._prev_mono: int | None = None
        self._prev_speed: int | None = None

    # -- what the rest of the agent reads --------------------------------------------------

    @property
    def value(self) -> int | None:
        """The best current odometer in metres (may lie below ``high_m``), or None."""
        return None if self._anchor_m is None else self._anchor_m + self._since_m

    @property
    def src(self) -> str | None:
        if self._anchor_m is None:
            return None
        return "obd" if self._anchor_src == "obd" and self._since_m == 0 else "derived"

    @property
    def recordable(self) -> bool:
        """The current value may be recorded: nothing higher was recorded before."""
        v = self.value
        return v is not None and (self.high_m is None or v >= self.high_m)

    def recorded(self, odo_m: int) -> None:
        """An odometer value went into a record (odometer or trip end)."""
        if self.high_m is None or odo_m > self.high_m:
            self.high_m = odo_m

    def snapshot(self) -> dict[str, int | str | None]:
        return {
            "odo_anchor_m": self._anchor_m, "odo_anchor_src": self._anchor_src,
            "odo_since_m": self._since_m, "odo_rem": self._rem, "odo_travel_m": self.travel_m,
            "odo_obd_m": self._obd_m, "odo_obd_wall": self._obd_wall,
            "odo_dsc_km": self._dsc_km, "odo_dsc_est_m": self._dsc_est_m, "odo_dsc_wall": self._dsc_wall,
            "odo_high_m": self.high_m, "odo_jump_back": int(self._jump_back),
            "odo_last_wall": self._last_wall,
        }

    # -- input -------------------------------------------------------------------------------

    def confirm(self, odo_m: int) -> None:
        """The driver read ``odo_m`` on the dashboard: re-anchor the derived value."""
        if isinstance(odo_m, bool) or not isinstance(odo_m, int) or odo_m < 0:
            raise ValueError(f"odo_m: {odo_m!r} is not a non-negative integer of metres")
        current = self.value
        if current is not None and odo_m <= current < odo_m + 1000:
            return
        self._anchor_m, self._anchor_src, self._since_m = odo_m, "driver", 0

    def update(self, s: SampleLike, wall_ms: int) -> list[Event]:
        """Feed one sample; returns events (name, detail) to record."""
        events: list[Event] = []
        dt = s.mono_ms - self._prev_mono if self._prev_mono is not None else None
        if dt is not None and dt < 0:
            dt = None
        step = 0
        if (s.speed_kph is not None and self._prev_speed is not None and dt is not None
                and dt <= self.max_gap_ms):
            step = self._integrate(self._prev_speed, s.speed_kph, dt)
            if self._dsc_est_m is not None:
                self._dsc_est_m += step
        elif dt is None or dt > 0:
            self._dsc_gap = True
        self._prev_mono, self._prev_speed = s.mono_ms, s.speed_kph
        if s.dist_since_clear_km is not None:
            self._distance_since_clear(s.dist_since_clear_km, s.mono_ms, wall_ms, step)
        if s.odo_m is not None:
            events += self._a6(s.odo_m, s.mono_ms, wall_ms)
        self._last_wall = wall_ms
        events += self._check_high()
        return events

    # -- internals ---------------------------------------------------------------------------

    def _add(self, metres: int) -> None:
        self._since_m += metres
        self.travel_m += metres

    def _integrate(self, v1: int, v2: int, dt_ms: int) -> int:
        num = (max(v1, 0) + max(v2, 0)) * dt_ms + self._rem
        metres, self._rem = divmod(num, _KPH_MS_PER_M2)
        self._add(metres)
        return metres

    def _limit_m(self, mono_ms: int, wall_ms: int, mono0: int | None, wall0: int | None) -> int | None:
        """The most a car could have driven since (mono0 | wall0), or None if unknown."""
        if mono0 is not None and mono_ms >= mono0:
            elapsed = mono_ms - mono0
        elif wall0 is not None and wall_ms >= wall0:
            elapsed = wall_ms - wall0
        else:
            return None
        return self.max_kph * elapsed // 3600 + 1000

    def _distance_since_clear(self, km: int, mono_ms: int, wall_ms: int, step: int) -> None:
        if not 0 <= km <= DSC_MAX_KM:
            return
        prev, est, gap = self._dsc_km, self._dsc_est_m, self._dsc_gap
        limit = self._limit_m(mono_ms, wall_ms, self._dsc_mono, self._dsc_wall)
        self._dsc_km, self._dsc_mono, self._dsc_wall, self._dsc_gap = km, mono_ms, wall_ms, False
        floor, ceiling = km * 1000, km * 1000 + 999
        if prev is None or est is None or (prev >= DSC_MAX_KM and km >= DSC_MAX_KM):
            self._dsc_est_m = ceiling           # unknown fraction: assume the most, add nothing
            return
        if km < prev:                           # trouble codes cleared
            add = floor if gap else 0
            self._dsc_est_m = ceiling
        elif gap:
            add = max(0, floor - est)
            self._dsc_est_m = ceiling
        else:
            add = 0
            self._dsc_est_m = floor + step if km > prev else min(est, ceiling)
        if add and limit is not None and add > limit:
            log.warning("PID 0x31 implies %d m in a gap, more than %d m possible: ignored", add, limit)
            return
        if add:
            log.info("distance driven during a gap, from PID 0x31: %d m", add)
            self._add(add)

    def _a6(self, v: int, mono_ms: int, wall_ms: int) -> list[Event]:
        events: list[Event] = []
        last = self._obd_m
        base = max(last, self.high_m or 0) if last is not None else None   # back to known ground is fine
        if last is not None and base is not None and v > base:
            limit = self._limit_m(mono_ms, wall_ms, self._obd_mono, self._obd_wall)
            if limit is not None and v - base > limit:
                pending = self._pending_m
                if pending is not None and pending <= v <= pending + 1000:
                    self._pending_n += 1
                else:
                    self._pending_n = 1
                    if pending is None:
                        events.append(("odometer_implausible", {"last_m": last, "read_m": v}))
                self._pending_m = v
                if self._pending_n < _CONFIRM_AFTER:
                    return events
                log.warning("PID A6 jumped from %d m to %d m: confirmed by %d readings",
                            last, v, self._pending_n)
        self._pending_m, self._pending_n = None, 0
        self._obd_m, self._obd_mono, self._obd_wall = v, mono_ms, wall_ms
        self._anchor_m, self._anchor_src, self._since_m = v, "obd", 0
        return events

    def _check_high(self) -> list[Event]:
        v = self.value
        if v is None:
            return []
        if self.high_m is None or v >= self.high_m:
            self._jump_back = False
            return []
        if self.high_m - v > self.tolerance_m and not self._jump_back:
            self._jump_back = True
            return [("odometer_jump_back", {"from_m": self.high_m, "to_m": v, "src": self.src or ""})]
        return []

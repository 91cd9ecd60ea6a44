"""A simulated car's driving profile: pure functions of elapsed seconds.

The car drives, parks with the engine off, drives again, and so on::

    |<------ drive_s ------>|<-- park_s -->|<------ drive_s ------>| ...
     ramp up, cruise, ramp down   engine off   next cruise speed

Each drive follows a trapezoid: ``ramp_s`` seconds up to the drive's cruise
speed (taken in turn from ``cruise_kph``), cruise, ``ramp_s`` seconds down to a
stop. Distance is the exact integral of that speed, so the odometer (PID A6)
and the distance since codes were cleared (PID 0x31) rise with the distance
driven. ``time_scale`` runs the profile faster than the wall clock (profile
seconds per real second) for tests that need kilometres in seconds.

Nothing here does I/O or reads a clock: the emulator host passes the elapsed
time in.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

VIN_RE = re.compile(r"^[A-HJ-NPR-Z0-9]{17}$")
DSC_MAX_KM = 65_535


@dataclass(frozen=True)
class Profile:
    """What one simulated car is and how it drives."""

    start_odo_km: float = 12_345.6
    has_a6: bool = True          # answers PID A6 (odometer) and advertises it in 01A0
    vin: str = "WP0ZZZ99ZTS390000"
    stock_a6: bool = False       # leave 01A6 to the emulator's stock reply ("61 A6" from 7EA, never rising)
    drive_s: float = 600.0       # length of one drive
    park_s: float = 120.0        # engine off between drives; 0 keeps the engine running
    ramp_s: float = 20.0         # seconds to reach the cruise speed, and to stop again
    cruise_kph: tuple[int, ...] = field(default=(50, 90, 120, 30))
    time_scale: float = 1.0      # profile seconds per wall-clock second
    dsc_start_km: int = 1_234    # PID 0x31 at the start
    idle_rpm: int = 800
    battery_mv: int = 12_600     # engine off
    charging_mv: int = 14_200    # engine running

    def __post_init__(self) -> None:
        if not VIN_RE.match(self.vin):
            raise ValueError(f"vin: {self.vin!r} is not 17 characters of A-H, J-N, P, R-Z, 0-9")
        if self.start_odo_km < 0:
            raise ValueError(f"start_odo_km: {self.start_odo_km} is negative")
        if self.drive_s <= 0 or self.park_s < 0 or self.ramp_s < 0:
            raise ValueError("drive_s must be positive, park_s and ramp_s not negative")
        if not self.cruise_kph or any(not 0 <= v <= 255 for v in self.cruise_kph):
            raise ValueError(f"cruise_kph: {self.cruise_kph!r} must be 1..n speeds within 0..255")
        if self.time_scale <= 0:
            raise ValueError(f"time_scale: {self.time_scale} must be positive")
        if not 0 <= self.dsc_start_km <= DSC_MAX_KM:
            raise ValueError(f"dsc_start_km: {self.dsc_start_km} out of 0..{DSC_MAX_KM}")

    @property
    def start_odo_m(self) -> int:
        return round(self.start_odo_km * 1000)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Profile:
        raw: dict[str, Any] = json.loads(text)
        if "cruise_kph" in raw:
            raw["cruise_kph"] = tuple(raw["cruise_kph"])
        return cls(**raw)


def _period(p: Profile) -> float:
    return p.drive_s + p.park_s


def _phase(p: Profile, t: float) -> tuple[int, float]:
    """(index of the current drive, seconds into its cycle)."""
    if t <= 0:
        return 0, 0.0
    n = int(t // _period(p))
    return n, t - n * _period(p)


def _ramp(p: Profile) -> float:
    return min(p.ramp_s, p.drive_s / 2)


def _cruise(p: Profile, n: int) -> int:
    return p.cruise_kph[n % len(p.cruise_kph)]


def engine_on(p: Profile, t: float) -> bool:
    """The engine runs during drives; t is profile seconds since the start."""
    return _phase(p, t)[1] < p.drive_s


def speed_kph(p: Profile, t: float) -> float:
    n, u = _phase(p, t)
    if u >= p.drive_s:
        return 0.0
    v, r = float(_cruise(p, n)), _ramp(p)
    if r > 0 and u < r:
        return v * u / r
    if r > 0 and u > p.drive_s - r:
        return v * (p.drive_s - u) / r
    return v


def _drive_distance_m(p: Profile, n: int, u: float) -> float:
    """Metres covered u seconds into drive n (u clamped to the drive)."""
    u = min(max(u, 0.0), p.drive_s)
    v, r, d = _cruise(p, n) / 3.6, _ramp(p), p.drive_s
    if r == 0:
        return v * u
    if u < r:
        return v * u * u / (2 * r)
    if u <= d - r:
        return v * r / 2 + v * (u - r)
    full = v * (d - r)
    return full - v * (d - u) ** 2 / (2 * r)


def distance_m(p: Profile, t: float) -> float:
    """Metres driven from the start to profile time t."""
    n, u = _phase(p, t)
    per_round = sum(_drive_distance_m(p, i, p.drive_s) for i in range(len(p.cruise_kph)))
    rounds, rest = divmod(n, len(p.cruise_kph))
    done = rounds * per_round + sum(_drive_distance_m(p, i, p.drive_s) for i in range(rest))
    return done + _drive_distance_m(p, n, u)


def rpm(p: Profile, t: float) -> int:
    """Engine speed: 0 when off, idle plus a simple gear model while driving."""
    if not engine_on(p, t):
        return 0
    v = speed_kph(p, t)
    return p.idle_rpm + int((v % 40) * 45 + v * 5)


def voltage_mv(p: Profile, t: float) -> int:
    return p.charging_mv if engine_on(p, t) else p.battery_mv


def odometer_m(p: Profile, driven_m: float) -> int:
    """The dashboard odometer after driving driven_m metres."""
    return p.start_odo_m + int(driven_m)


def a6_raw(odo_m: int) -> int:
    """PID A6's 4-byte value: the odometer in units of 0.1 km."""
    return odo_m // 100


def dsc_km(p: Profile, driven_since_clear_m: float, cleared: bool) -> int:
    """PID 0x31: km since codes were cleared, stopping at 65,535."""
    base = 0 if cleared else p.dsc_start_km
    return min(DSC_MAX_KM, base + int(driven_since_clear_m // 1000))

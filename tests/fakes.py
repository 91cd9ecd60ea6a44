"""Fakes for the agent's unit tests: an OBD source, vehicle logic and power policy
that follow a script, with the interfaces of ``agent.obd_source``, ``agent.vehicle``
and ``agent.power``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FakeSample:
    mono_ms: int
    connected: bool = True
    ecu: bool = True
    speed_kph: int | None = 50
    rpm: int | None = 1500
    odo_m: int | None = None
    dist_since_clear_km: int | None = None
    voltage_mv: int | None = 13800


@dataclass(frozen=True)
class FakeReading:
    kind: str
    fields: Mapping[str, object]


class FakeSource:
    """Opens on the n-th try; each sample advances the odometer by ``step_m``."""

    def __init__(self, *, vin: str | None = "WVWZZZ1JZXW000001", fail_opens: int = 0,
                 start_odo_m: int = 10_000_000, step_m: int = 500, a6: bool | None = True) -> None:
        self._vin = vin
        self.fail_opens = fail_opens
        self.opens = 0
        self.closes = 0
        self.samples = 0
        self.odo_m = start_odo_m
        self.step_m = step_m
        self.a6 = a6
        self._state = "closed"
        self.lose_after: int | None = None
        self.ecu_on = True                  # False: the ignition is off, only the adapter answers
        self.vin_reads = 0
        self.vin_reply: str | None = None      # what a car answered that is not a VIN

    @property
    def state(self) -> str:
        return self._state

    def open(self) -> bool:
        self.opens += 1
        if self.opens <= self.fail_opens:
            return False
        self._state = "connected" if self.ecu_on else "no_ecu"
        return True

    def vin(self) -> str | None:
        self.vin_reads += 1
        return self._vin if self.ecu_on else None

    def set_vin(self, vin: str | None) -> None:
        self._vin = vin

    def supports_a6(self) -> bool | None:
        return self.a6

    def sample(self, *, engine_off: bool) -> FakeSample:
        self.samples += 1
        if self.lose_after is not None and self.samples > self.lose_after:
            self._state = "lost"
            self.lose_after = None
            return FakeSample(self.samples * 1000, connected=False, ecu=False, speed_kph=None, rpm=None)
        self._state = "connected" if self.ecu_on else "no_ecu"
        if not self.ecu_on:
            return FakeSample(self.samples * 1000, ecu=False, speed_kph=None, rpm=None, voltage_mv=12_500)
        self.odo_m += self.step_m
        return FakeSample(self.samples * 1000, odo_m=self.odo_m)

    def close(self) -> None:
        self.closes += 1
        self._state = "closed"


@dataclass
class FakeVehicle:
    """Emits an odometer reading every ``every`` samples; ``confirm`` re-anchors."""

    every: int = 1
    state: Mapping[str, object] | None = None
    steps: int = 0
    anchors: list[int] = field(default_factory=list)
    _odo: int | None = None

    def step(self, s: FakeSample, wall_ms: int) -> list[FakeReading]:
        self.steps += 1
        if s.odo_m is not None:
            self._odo = s.odo_m
        if self._odo is None or self.steps % self.every:
            return []
        return [FakeReading("odometer", {"odo_m": self._odo, "src": "obd"})]

    def confirm(self, odo_m: int) -> None:
        self.anchors.append(odo_m)

    def snapshot(self) -> dict[str, object]:
        return {"steps": self.steps, "odo_m": self._odo}

    @property
    def odo_m(self) -> int | None:
        return self._odo

    @property
    def src(self) -> str | None:
        return "obd" if self._odo is not None else None

    @property
    def ignition(self) -> bool:
        return True

    @property
    def trip(self) -> Mapping[str, object] | None:
        return None


@dataclass
class FakePower:
    interval_s: float = 0.01
    shutdown_after: int | None = None  # samples; then a reason every time
    calls: int = 0

    def poll_interval_s(self, ignition: bool) -> float:
        return self.interval_s

    def should_shutdown(self, *, now_mono_ms: int, ignition: bool, voltage_mv: int | None,
                        backlog: int) -> str | None:
        self.calls += 1
        if self.shutdown_after is not None and self.calls > self.shutdown_after:
            return "engine_off"
        return None


class Ticker:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def counter(start: int = 1_700_000_000_000, step: int = 1000) -> Callable[[], int]:
    it: Iterator[int] = iter(range(start, 2**62, step))
    return lambda: next(it)

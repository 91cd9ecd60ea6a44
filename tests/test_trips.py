"""Ignition debounce and the records a trip produces (with the real odometer logic)."""

from __future__ import annotations

from agent.obd_source import Sample
from agent.odometer import Odometer
from agent.trips import Ignition, TripConfig, Trips

W = 1_760_000_000_000


def test_ignition_turns_on_after_the_debounce_and_a_contrary_sample_restarts_it() -> None:
    ign = Ignition(3000, 30_000)
    assert ign.update(True, 0, W) is None
    assert ign.update(True, 2000, W + 2000) is None
    assert ign.update(False, 2500, W + 2500) is None        # a glitch: start over
    assert ign.update(True, 3000, W + 3000) is None
    assert ign.update(True, 5999, W + 5999) is None
    assert ign.update(True, 6000, W + 6000) == "start"
    assert ign.on and ign.on_since_wall == W + 3000           # the trip began at the first "on" sample


def test_ignition_turns_off_after_the_off_debounce_and_remembers_the_last_on_sample() -> None:
    ign = Ignition(0, 30_000)
    assert ign.update(True, 0, W) == "start"
    ign.update(True, 1000, W + 1000)
    assert ign.update(False, 2000, W + 2000) is None
    assert ign.update(True, 3000, W + 3000) is None           # back on: the off wait restarts
    for t in range(4000, 34_000, 1000):
        assert ign.update(False, t, W + t) is None
    assert ign.update(False, 34_000, W + 34_000) == "end"
    assert not ign.on and ign.last_on_wall == W + 3000


def test_slow_polling_confirms_the_ignition_at_the_next_sample() -> None:
    ign = Ignition(3000, 30_000)
    assert ign.update(True, 0, W) is None
    assert ign.update(True, 10_000, W + 10_000) == "start"    # engine-off polling every 10 s
    assert ign.on_since_wall == W


Out = list[tuple[str, dict[str, object]]]


def _trip(cfg: TripConfig, odo: Odometer, speeds: list[int], *, start_mono: int = 0) -> tuple[Out, int]:
    """Drive at 1 Hz with the given speeds, then park until the trip ends."""
    trips = Trips(cfg)
    out: Out = []
    mono = start_mono
    for v in speeds:
        odo.update(Sample(mono, True, True, v, 1000, None, None, 14000), W + mono)
        out += trips.step(True, v, mono, W + mono, odo)
        mono += 1000
    for _ in range(cfg.off_debounce_ms // 1000 + 1):
        odo.update(Sample(mono, True, False, None, None, None, None, 12600), W + mono)
        out += trips.step(False, None, mono, W + mono, odo)
        mono += 1000
    return out, mono


def test_a_trip_records_the_odometer_at_start_every_km_and_at_the_end() -> None:
    cfg = TripConfig(record_every_m=1000, record_every_ms=600_000, on_debounce_ms=0, off_debounce_ms=5000)
    odo = Odometer()
    odo.confirm(10_000_000)
    out, _ = _trip(cfg, odo, [72] * 151)                     # 20 m/s for 150 s: 3 km
    kinds = [k for k, _ in out]
    assert kinds == ["odometer"] * 5 + ["trip"]
    values = [f["odo_m"] for k, f in out if k == "odometer"]
    assert values == [10_000_000, 10_001_000, 10_002_000, 10_003_000, 10_003_000]
    trip = out[-1][1]
    assert trip["start_odo_m"] == 10_000_000 and trip["end_odo_m"] == 10_003_000
    assert trip["max_kph"] == 72 and trip["src"] == "derived"
    assert trip["start_t"] == W and trip["end_t"] == W + 150_000


def test_time_based_records_only_while_the_odometer_moves() -> None:
    cfg = TripConfig(record_every_m=100_000, record_every_ms=10_000, on_debounce_ms=0, off_debounce_ms=5000)
    odo = Odometer()
    odo.confirm(0)
    out, _ = _trip(cfg, odo, [36] * 31 + [0] * 60)           # 30 s moving, then a minute standing
    odos = [f["odo_m"] for k, f in out if k == "odometer"]
    # start; by time while moving (the last one as it slows down); none while standing; end
    assert odos == [0, 100, 200, 300, 305, 305]


def test_trip_src_is_obd_when_both_ends_came_from_a6() -> None:
    cfg = TripConfig(on_debounce_ms=0, off_debounce_ms=2000)
    odo = Odometer()
    trips = Trips(cfg)
    out: Out = []
    for mono, (v, a6) in enumerate([(50, 5_000_000), (50, 5_000_000), (50, 5_000_100)]):
        odo.update(Sample(mono * 1000, True, True, v, 900, a6, None, 14000), W + mono * 1000)
        out += trips.step(True, v, mono * 1000, W + mono * 1000, odo)
    for mono in range(3, 7):
        odo.update(Sample(mono * 1000, True, False, None, None, None, None, 12600), W + mono * 1000)
        out += trips.step(False, None, mono * 1000, W + mono * 1000, odo)
    trip = [f for k, f in out if k == "trip"][0]
    assert trip["src"] == "obd" and (trip["start_odo_m"], trip["end_odo_m"]) == (5_000_000, 5_000_100)


def test_trip_without_any_odometer_is_an_event_with_its_distance() -> None:
    cfg = TripConfig(on_debounce_ms=0, off_debounce_ms=3000)
    out, _ = _trip(cfg, Odometer(), [36] * 11)
    assert [k for k, _ in out] == ["event"]
    ev = out[0][1]
    assert ev["event"] == "trip_unanchored"
    assert ev["detail"] == {"start_t": W, "end_t": W + 10_000, "distance_m": 100, "max_kph": 36}


def test_trip_anchored_midway_gets_its_start_from_the_distance() -> None:
    cfg = TripConfig(on_debounce_ms=0, off_debounce_ms=3000, record_every_m=10**6, record_every_ms=10**9)
    odo = Odometer()
    trips = Trips(cfg)
    out: Out = []
    for mono in range(0, 11_000, 1000):
        if mono == 5000:
            odo.confirm(8_000_000)                          # the driver confirms at a stop
        odo.update(Sample(mono, True, True, 36, 900, None, None, 14000), W + mono)
        out += trips.step(True, 36, mono, W + mono, odo)
    for mono in range(11_000, 15_000, 1000):
        odo.update(Sample(mono, True, False, None, None, None, None, 12600), W + mono)
        out += trips.step(False, None, mono, W + mono, odo)
    trip = [f for k, f in out if k == "trip"][0]
    assert trip["end_odo_m"] == 8_000_060               # confirmed, then 6 s at 10 m/s
    assert trip["start_odo_m"] == 8_000_060 - 100       # the trip's 10 s at 10 m/s


def test_restored_trip_continues_or_is_closed_when_stale() -> None:
    cfg = TripConfig(on_debounce_ms=0, off_debounce_ms=30_000)
    odo = Odometer()
    odo.confirm(1_000_000)
    trips = Trips(cfg)
    trips.step(True, 40, 0, W, odo)
    assert trips.active
    state = {**trips.snapshot(), **odo.snapshot()}

    fresh = Trips(cfg, state)
    assert fresh.resume(W + 10_000, Odometer(state=state)) == [] and fresh.active

    stale = Trips(cfg, state)
    out = stale.resume(W + 3_600_000, Odometer(state=state))
    assert [k for k, _ in out] == ["odometer", "trip"] and not stale.active and not stale.ignition.on
    assert out[1][1]["end_t"] == W

    backwards = Trips(cfg, state)                               # a Pi booted without a clock: 1970
    assert [k for k, _ in backwards.resume(5_000, Odometer(state=state))] == ["odometer", "trip"]

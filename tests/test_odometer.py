"""The odometer strategy: A6, derived from speed, gaps filled from PID 0x31, monotonic output."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.obd_source import Sample
from agent.odometer import Odometer

WALL0 = 1_760_000_000_000


def s(mono: int, speed: int | None = None, odo: int | None = None, dsc: int | None = None) -> Sample:
    return Sample(mono, True, True, speed, 900 if speed is not None else None, odo, dsc, 14000)


def drive(o: Odometer, start_mono: int, seconds: int, kph: int, *, step_ms: int = 1000,
          dsc: int | None = None, odo: int | None = None) -> int:
    """Feed samples at constant speed; returns the next mono_ms."""
    mono = start_mono
    for _ in range(seconds * 1000 // step_ms + 1):
        o.update(s(mono, kph, odo, dsc), WALL0 + mono)
        mono += step_ms
    return mono


def test_no_anchor_and_no_a6_gives_no_value_but_measures_distance() -> None:
    o = Odometer()
    drive(o, 0, 100, 36)              # 36 km/h = 10 m/s
    assert o.value is None and o.src is None
    assert o.travel_m == 1000
    assert not o.recordable


def test_integration_carries_the_remainder() -> None:
    o = Odometer()
    o.confirm(0)
    drive(o, 0, 360, 1, step_ms=100)  # 1 km/h for 6 minutes: 100 m, each step only ~2.8 cm
    assert o.value == 100


def test_trapezoid_between_two_speeds() -> None:
    o = Odometer()
    o.confirm(5_000_000)
    o.update(s(0, 0), WALL0)
    o.update(s(4000, 72), WALL0 + 4000)   # 0 -> 72 km/h in 4 s: 40 m
    assert o.value == 5_000_040 and o.src == "derived"


def test_samples_too_far_apart_are_not_integrated() -> None:
    o = Odometer(max_gap_ms=5000)
    o.confirm(1000)
    o.update(s(0, 100), WALL0)
    o.update(s(6000, 100), WALL0 + 6000)
    assert o.value == 1000


def test_confirmation_within_the_dashboard_kilometre_keeps_the_derived_value() -> None:
    o = Odometer()
    o.confirm(12_345_000)
    drive(o, 0, 50, 36)                    # +500 m
    assert o.value == 12_345_500
    o.confirm(12_345_000)                  # the dashboard still shows 12345 km
    assert o.value == 12_345_500
    o.confirm(12_346_000)                  # it shows 12346: re-anchor
    assert o.value == 12_346_000
    o.confirm(12_300_000)                  # far below: re-anchor too (the driver's word)
    assert o.value == 12_300_000
    with pytest.raises(ValueError):
        o.confirm(-1)


def test_a6_wins_and_derived_continues_from_it_when_it_drops_out() -> None:
    o = Odometer()
    o.confirm(1_000_000)
    o.update(s(0, 36, odo=20_000_000), WALL0)
    assert (o.value, o.src) == (20_000_000, "obd")
    mono = drive(o, 1000, 10, 36)         # A6 now NO DATA: 11 s at 10 m/s
    assert (o.value, o.src) == (20_000_110, "derived")
    o.update(s(mono, 36, odo=20_000_100), WALL0 + mono)
    assert (o.value, o.src) == (20_000_100, "obd")


def test_a6_value_stays_obd_while_nothing_is_added() -> None:
    o = Odometer()
    o.update(s(0, 0, odo=7_000_000), WALL0)
    o.update(Sample(10_000, True, False, None, None, None, None, 12600), WALL0 + 10_000)   # parked
    assert (o.value, o.src) == (7_000_000, "obd")


def test_implausible_a6_jump_is_reported_and_needs_three_readings() -> None:
    o = Odometer(max_kph=300)
    o.update(s(0, 50, odo=10_000_000), WALL0)
    ev = o.update(s(1000, 50, odo=90_000_000), WALL0 + 1000)      # +80,000 km in a second
    assert ev == [("odometer_implausible", {"last_m": 10_000_000, "read_m": 90_000_000})]
    assert o.src == "derived" and o.value is not None and o.value < 10_001_000
    assert o.update(s(2000, 50, odo=90_000_000), WALL0 + 2000) == []
    assert o.value is not None and o.value < 10_001_000
    o.update(s(3000, 50, odo=90_000_100), WALL0 + 3000)
    assert (o.value, o.src) == (90_000_100, "obd")


def test_a6_forward_jump_after_a_restart_is_plausible_over_the_wall_clock_gap() -> None:
    o = Odometer()
    o.update(s(0, 0, odo=10_000_000), WALL0)
    o2 = Odometer(state=o.snapshot())
    assert o2.update(s(5, 0, odo=10_200_000), WALL0 + 3_600_000) == []   # 200 km in an hour
    assert o2.value == 10_200_000


def test_jump_back_is_an_event_once_and_never_recordable() -> None:
    o = Odometer(jump_back_tolerance_m=1000)
    o.update(s(0, 0, odo=12_345_000), WALL0)
    assert o.recordable
    o.recorded(12_345_000)
    ev = o.update(s(1000, 0, odo=2_000_000), WALL0 + 1000)
    assert ev == [("odometer_jump_back", {"from_m": 12_345_000, "to_m": 2_000_000, "src": "obd"})]
    assert o.value == 2_000_000 and not o.recordable
    assert o.update(s(2000, 0, odo=2_000_100), WALL0 + 2000) == []
    o.update(s(3000, 0, odo=12_345_000), WALL0 + 3000)
    assert o.recordable


def test_small_drop_is_held_back_silently() -> None:
    o = Odometer(jump_back_tolerance_m=1000)
    o.update(s(0, 36, odo=5_000_000), WALL0)
    mono = drive(o, 1000, 5, 36)          # derived: 6 s at 10 m/s
    assert o.value == 5_000_060 and o.recordable
    o.recorded(5_000_060)
    assert o.update(s(mono, 36, odo=5_000_000), WALL0 + mono) == []   # A6 is back, 50 m lower
    assert not o.recordable
    o.update(s(mono + 1000, 36, odo=5_000_100), WALL0 + mono + 1000)
    assert o.recordable


def _synced(o: Odometer, dsc0: int) -> int:
    """Drive 72 km/h across a 0x31 step so that the counter's fraction is known; returns mono."""
    mono = 0
    true_m = dsc0 * 1000 + 990      # 10 m before the next step
    for _ in range(30):
        o.update(s(mono, 72, dsc=true_m // 1000), WALL0 + mono)
        mono += 1000
        true_m += 20
    return mono


def test_gap_after_restart_is_filled_from_pid_0x31_as_a_lower_bound() -> None:
    o = Odometer()
    o.confirm(50_000_000)
    mono = _synced(o, 1234)
    before, travel = o.value, o.travel_m
    assert before is not None
    true_before = 1234 * 1000 + 990 + 29 * 20      # where the car really is (0x31 metres)
    o2 = Odometer(state=o.snapshot())               # agent off; the car drives 7.3 km
    true_after = true_before + 7300
    o2.update(s(10, 0, dsc=true_after // 1000), WALL0 + mono + 600_000)
    added = o2.travel_m - travel
    assert 7300 - 1000 < added <= 7300
    assert o2.value == before + added and o2.src == "derived"


def test_gap_while_running_is_filled_too() -> None:
    o = Odometer()
    o.confirm(0)
    mono = _synced(o, 100)
    v = o.value
    assert v is not None
    o.update(Sample(mono + 20_000, False, False, None, None, None, None, None), WALL0 + mono + 20_000)
    o.update(s(mono + 120_000, 0, dsc=103), WALL0 + mono + 120_000)   # lost for 2 min, ~2.4 km driven
    assert 1000 < o.value - v <= 2_600   # type: ignore[operator]


def test_cleared_codes_during_a_gap_count_from_zero() -> None:
    o = Odometer()
    o.confirm(0)
    o.update(s(0, 0, dsc=5000), WALL0)
    o2 = Odometer(state=o.snapshot())
    o2.update(s(1, 0, dsc=3), WALL0 + 3_600_000)
    assert o2.value == 3000


def test_cleared_codes_while_running_add_nothing() -> None:
    o = Odometer()
    o.confirm(0)
    o.update(s(0, 0, dsc=5000), WALL0)
    o.update(s(1000, 0, dsc=0), WALL0 + 1000)
    o.update(s(2000, 0, dsc=1), WALL0 + 2000)
    assert o.value == 0


def test_saturated_counter_measures_nothing() -> None:
    o = Odometer()
    o.confirm(0)
    o.update(s(0, 0, dsc=65_535), WALL0)
    o2 = Odometer(state=o.snapshot())
    o2.update(s(1, 0, dsc=65_535), WALL0 + 3_600_000)
    assert o2.value == 0


def test_implausible_gap_is_ignored() -> None:
    o = Odometer(max_kph=300)
    o.confirm(0)
    o.update(s(0, 0, dsc=100), WALL0)
    o2 = Odometer(state=o.snapshot())
    o2.update(s(1, 0, dsc=600), WALL0 + 60_000)     # 500 km in a minute
    assert o2.value == 0


def test_no_0x31_means_the_gap_is_not_filled() -> None:
    o = Odometer()
    o.confirm(1_000_000)
    o.update(s(0, 50), WALL0)
    o2 = Odometer(state=o.snapshot())
    o2.update(s(1, 50), WALL0 + 600_000)
    assert o2.value == 1_000_000


def test_snapshot_holds_only_ints_strings_and_none() -> None:
    o = Odometer()
    o.confirm(3)
    drive(o, 0, 5, 50, dsc=7)
    assert all(v is None or isinstance(v, (int, str)) and not isinstance(v, bool)
               for v in o.snapshot().values())


# -- property: distance is never over-counted, and gaps cost at most ~2 km each -----------------

_step = st.one_of(
    st.tuples(st.just("drive"), st.integers(1, 120), st.integers(200, 3000), st.integers(0, 200)),
    st.tuples(st.just("gap"), st.integers(0, 50_000), st.integers(0, 1), st.just(0)),
)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 60_000_000), st.lists(_step, min_size=1, max_size=20))
def test_distance_never_over_counted(start_m: int, steps: list[tuple[str, int, int, int]]) -> None:
    o = Odometer(max_kph=100_000)     # plausibility is tested elsewhere
    true_m = Fraction(start_m)        # the car's true distance since codes were cleared
    mono, wall, speed, gaps = 0, WALL0, 0, 0
    start_travel = o.travel_m
    start_true = true_m
    o.update(s(mono, speed, dsc=int(true_m) // 1000), wall)
    for kind, a, b, c in steps:
        if kind == "drive":      # a samples, b ms apart, towards speed c
            for i in range(a):
                v = speed + (c - speed) * (i + 1) // a
                true_m += Fraction((speed + v) * b, 7200)
                mono, wall, speed = mono + b, wall + b, v
                o.update(s(mono, speed, dsc=min(65_535, int(true_m) // 1000)), wall)
            continue
        gaps += 1
        true_m += a
        wall += 600_000
        if b:       # the agent restarted
            o = Odometer(max_kph=100_000, state=o.snapshot())
            mono = 0
        else:       # the adapter was lost for a while
            o.update(Sample(mono + 1, False, False, None, None, None, None, None), wall - 599_000)
            mono += 600_000
        o.update(s(mono, speed, dsc=min(65_535, int(true_m) // 1000)), wall)
    if int(true_m) // 1000 >= 65_535:
        return
    measured = o.travel_m - start_travel
    driven = true_m - start_true
    assert measured <= driven + gaps + 1
    assert measured >= driven - 2000 * gaps - 1

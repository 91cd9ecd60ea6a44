"""The power policy: poll intervals and shutdown with hysteresis."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.power import PowerConfig, PowerPolicy

S = 1000  # ms


NEVER = 10**6


def policy(**kw: int) -> PowerPolicy:
    return PowerPolicy(PowerConfig(**kw))


def test_poll_interval_follows_ignition() -> None:
    p = policy()
    assert p.poll_interval_s(True) == 1.0
    assert p.poll_interval_s(False) == 10.0


def test_low_voltage_must_hold_for_the_whole_window() -> None:
    p = policy(low_voltage_mv=12200, low_voltage_for_s=180, off_shutdown_after_s=NEVER,
               off_shutdown_max_s=NEVER)
    for t in range(0, 180, 10):
        assert p.should_shutdown(now_mono_ms=t * S, ignition=False, voltage_mv=12100, backlog=5) is None
    assert p.should_shutdown(now_mono_ms=180 * S, ignition=False, voltage_mv=12100, backlog=5) \
        == "low_voltage"


def test_one_high_sample_resets_the_low_voltage_window() -> None:
    p = policy(low_voltage_for_s=180, off_shutdown_after_s=NEVER, off_shutdown_max_s=NEVER)
    for t in range(0, 170, 10):
        p.should_shutdown(now_mono_ms=t * S, ignition=False, voltage_mv=12000, backlog=0)
    assert p.should_shutdown(now_mono_ms=170 * S, ignition=False, voltage_mv=12300, backlog=0) is None
    for t in range(180, 350, 10):
        assert p.should_shutdown(now_mono_ms=t * S, ignition=False, voltage_mv=12000, backlog=0) is None
    assert p.should_shutdown(now_mono_ms=360 * S, ignition=False, voltage_mv=12000, backlog=0) \
        == "low_voltage"


def test_threshold_itself_is_not_low() -> None:
    p = policy(low_voltage_mv=12200, low_voltage_for_s=0,
               off_shutdown_after_s=NEVER, off_shutdown_max_s=NEVER)
    assert p.should_shutdown(now_mono_ms=0, ignition=False, voltage_mv=12200, backlog=0) is None
    assert p.should_shutdown(now_mono_ms=1, ignition=False, voltage_mv=12199, backlog=0) == "low_voltage"


def test_missing_voltage_neither_counts_nor_resets() -> None:
    p = policy(low_voltage_for_s=60, off_shutdown_after_s=NEVER, off_shutdown_max_s=NEVER)
    p.should_shutdown(now_mono_ms=0, ignition=False, voltage_mv=11900, backlog=0)
    assert p.should_shutdown(now_mono_ms=30 * S, ignition=False, voltage_mv=None, backlog=0) is None
    assert p.should_shutdown(now_mono_ms=60 * S, ignition=False, voltage_mv=None, backlog=0) == "low_voltage"


def test_low_voltage_with_the_engine_running_is_ignored_and_ignition_resets() -> None:
    p = policy(low_voltage_for_s=60, off_shutdown_after_s=NEVER, off_shutdown_max_s=NEVER)
    for t in range(0, 300, 10):
        assert p.should_shutdown(now_mono_ms=t * S, ignition=True, voltage_mv=11000, backlog=0) is None
    p.should_shutdown(now_mono_ms=300 * S, ignition=False, voltage_mv=11000, backlog=0)
    assert p.should_shutdown(now_mono_ms=330 * S, ignition=True, voltage_mv=11000, backlog=0) is None
    assert p.should_shutdown(now_mono_ms=340 * S, ignition=False, voltage_mv=11000, backlog=0) is None
    assert p.should_shutdown(now_mono_ms=400 * S, ignition=False, voltage_mv=11000, backlog=0) \
        == "low_voltage"


def test_engine_off_waits_for_an_empty_backlog() -> None:
    p = policy(off_shutdown_after_s=1800, off_shutdown_max_s=7200)
    assert p.should_shutdown(now_mono_ms=0, ignition=False, voltage_mv=12600, backlog=3) is None
    assert p.should_shutdown(now_mono_ms=1800 * S, ignition=False, voltage_mv=12600, backlog=3) is None
    assert p.should_shutdown(now_mono_ms=1801 * S, ignition=False, voltage_mv=12600, backlog=0) \
        == "engine_off"


def test_engine_off_gives_up_on_the_backlog_after_the_maximum() -> None:
    p = policy(off_shutdown_after_s=1800, off_shutdown_max_s=7200)
    p.should_shutdown(now_mono_ms=0, ignition=False, voltage_mv=None, backlog=40)
    assert p.should_shutdown(now_mono_ms=7199 * S, ignition=False, voltage_mv=None, backlog=40) is None
    assert p.should_shutdown(now_mono_ms=7200 * S, ignition=False, voltage_mv=None, backlog=40) \
        == "engine_off"


def test_ignition_restarts_the_engine_off_timer() -> None:
    p = policy(off_shutdown_after_s=100, off_shutdown_max_s=100)
    p.should_shutdown(now_mono_ms=0, ignition=False, voltage_mv=None, backlog=0)
    p.should_shutdown(now_mono_ms=90 * S, ignition=True, voltage_mv=None, backlog=0)
    assert p.should_shutdown(now_mono_ms=150 * S, ignition=False, voltage_mv=None, backlog=0) is None
    assert p.should_shutdown(now_mono_ms=250 * S, ignition=False, voltage_mv=None, backlog=0) == "engine_off"


@pytest.mark.parametrize("kw", [{"off_poll_s": 0}, {"low_voltage_for_s": -1},
                                {"off_shutdown_after_s": 100, "off_shutdown_max_s": 50}])
def test_bad_config_is_refused(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        PowerConfig(**kw)


@given(st.lists(st.tuples(st.integers(1, 30), st.one_of(st.none(), st.integers(10_000, 15_000))),
                max_size=60))
def test_low_voltage_fires_only_after_a_full_window_of_low_readings(
        steps: list[tuple[int, int | None]]) -> None:
    cfg = PowerConfig(low_voltage_for_s=60, off_shutdown_after_s=NEVER, off_shutdown_max_s=NEVER)
    p = PowerPolicy(cfg)
    t = 0
    seen: list[tuple[int, int | None]] = []
    for dt, mv in steps:
        t += dt * S
        seen.append((t, mv))
        reason = p.should_shutdown(now_mono_ms=t, ignition=False, voltage_mv=mv, backlog=1)
        if reason == "low_voltage":
            last_high = max((tt for (tt, v) in seen if v is not None and v >= cfg.low_voltage_mv),
                            default=-1)
            lows = [tt for (tt, v) in seen if v is not None and v < cfg.low_voltage_mv and tt > last_high]
            assert lows and t - min(lows) >= 60 * S   # no high reading since the window began

"""The simulated cars: the driving profile, and the emulator launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.obd_source import ObdSource
from sim import profile as pf
from sim.car import SimCar, SimCarError
from sim.profile import Profile

REPO = Path(__file__).resolve().parent.parent


# -- profile: pure functions of elapsed seconds -----------------------------------------------------

def test_drives_and_parks_in_turn() -> None:
    p = Profile(drive_s=100, park_s=50, ramp_s=10, cruise_kph=(60, 90))
    assert pf.engine_on(p, 0) and pf.engine_on(p, 99.9)
    assert not pf.engine_on(p, 100) and not pf.engine_on(p, 149)
    assert pf.engine_on(p, 150)
    assert pf.speed_kph(p, 5) == 30 and pf.speed_kph(p, 50) == 60 and pf.speed_kph(p, 120) == 0
    assert pf.speed_kph(p, 200) == 90                      # the second drive cruises faster
    assert pf.rpm(p, 120) == 0 and pf.rpm(p, 50) > p.idle_rpm
    assert pf.voltage_mv(p, 50) == p.charging_mv and pf.voltage_mv(p, 120) == p.battery_mv


def test_distance_is_the_integral_of_speed() -> None:
    p = Profile(drive_s=100, park_s=30, ramp_s=20, cruise_kph=(50, 120, 0))
    dt, total = 0.01, 0.0
    t = 0.0
    while t < 600:
        total += (pf.speed_kph(p, t) + pf.speed_kph(p, t + dt)) / 2 * dt / 3.6
        t += dt
    assert pf.distance_m(p, 600) == pytest.approx(total, rel=1e-4)
    assert pf.distance_m(p, 115) == pf.distance_m(p, 129)   # parked: no distance


@given(st.floats(0, 10_000), st.floats(0, 10_000))
def test_distance_never_decreases(a: float, b: float) -> None:
    p = Profile()
    lo, hi = sorted((a, b))
    assert pf.distance_m(p, lo) <= pf.distance_m(p, hi) + 1e-6


def test_odometer_a6_and_0x31_follow_the_distance() -> None:
    p = Profile(start_odo_km=12_345.6, dsc_start_km=65_530)
    assert pf.odometer_m(p, 1234.9) == 12_346_834
    assert pf.a6_raw(12_346_834) == 123_468
    assert pf.dsc_km(p, 4_999, cleared=False) == 65_534
    assert pf.dsc_km(p, 50_000, cleared=False) == 65_535    # the counter stops at its ceiling
    assert pf.dsc_km(p, 2_500, cleared=True) == 2


def test_profile_validation_and_json() -> None:
    p = Profile(vin="1HGCM82633A004352", has_a6=False, cruise_kph=(10, 20))
    assert Profile.from_json(p.to_json()) == p
    for bad in ({"vin": "SHORT"}, {"vin": "1HGCM82633A00435O"}, {"cruise_kph": ()},
                {"time_scale": 0}, {"dsc_start_km": 70_000}):
        with pytest.raises(ValueError):
            Profile(**bad)  # type: ignore[arg-type]


# -- the launcher -----------------------------------------------------------------------------------

def test_simcar_runs_in_its_own_directory_and_stops_cleanly(tmp_path: Path) -> None:
    car = SimCar(Profile(park_s=0), tmp_path / "w")
    port = car.start()
    assert port.startswith("/dev/pts/") and Path(port).exists()
    proc = car._proc
    assert proc is not None and proc.poll() is None
    src = ObdSource(port)
    assert src.open()
    src.close()
    assert (tmp_path / "w" / "elm.log").exists()
    assert not (Path.cwd() / "elm.log").exists() or Path.cwd() == tmp_path / "w"
    car.stop()
    assert proc.poll() is not None
    car.stop()                                              # idempotent
    with pytest.raises(SimCarError):
        car.hang()


def test_simcar_refuses_a_bad_vin_and_keeps_running(tmp_path: Path) -> None:
    with SimCar(Profile(park_s=0), tmp_path) as car:
        with pytest.raises(SimCarError, match="VIN"):
            car.set_vin("NOT-A-VIN")
        car.set_vin("WVWZZZ1JZXW000001")                    # still answering


def test_profile_engine_off_periods_end_and_start_trips(tmp_path: Path) -> None:
    p = Profile(drive_s=0.6, park_s=0.6, ramp_s=0.1, time_scale=1.0)
    with SimCar(p, tmp_path) as car:
        src = ObdSource(car.port or "")
        src.open()
        seen = set()
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline and len(seen) < 2:
            seen.add(src.sample(engine_off=False).ecu)
            time.sleep(0.05)
        src.close()
    assert seen == {True, False}


def test_clear_codes_restarts_pid_0x31(tmp_path: Path) -> None:
    with SimCar(Profile(park_s=0, dsc_start_km=4321), tmp_path) as car:
        src = ObdSource(car.port or "")
        src.open()
        assert src.sample(engine_off=False).dist_since_clear_km == 4321
        car.clear_codes()
        assert src.sample(engine_off=False).dist_since_clear_km == 0
        car.set_voltage(11_900)
        assert src.sample(engine_off=False).voltage_mv == 11_900
        src.close()


def test_command_line_prints_the_port_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen(
        [sys.executable, "-m", "sim.car", "--vin", "WP0ZZZ99ZTS390000", "--start-km", "1000", "--no-a6",
         "--workdir", str(tmp_path)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            port = proc.stdout.readline().strip()
            assert port.startswith("/dev/pts/")
            src = ObdSource(port)
            assert src.open() and src.supports_a6() is False and src.vin() == "WP0ZZZ99ZTS390000"
            src.close()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_command_line_rejects_bad_input(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "sim.car", "--vin", "BAD"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "vin" in r.stderr

"""ObdSource against the real ELM327 emulator (sim.car), plus its pure decoders."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent import obd_source
from agent.obd_source import ObdSource, Sample, decode_vin, decode_voltage_mv, pid_bytes
from sim.car import SimCar
from sim.profile import Profile

VIN = "1HGCM82633A004352"      # starts with 1 and ends with 2: python-OBD would strip both
FAST = Profile(vin=VIN, start_odo_km=48_213.4, park_s=0, time_scale=40, cruise_kph=(100,))
BOUND_S = 2.5                  # no query may block longer than ~2 s


@pytest.fixture
def car(tmp_path: Path) -> Iterator[SimCar]:
    with SimCar(FAST, tmp_path / "car") as c:
        yield c


def opened(port: str) -> ObdSource:
    src = ObdSource(port)
    assert src.open()
    return src


def timed_sample(src: ObdSource, *, engine_off: bool = False) -> tuple[Sample, float]:
    t = time.monotonic()
    s = src.sample(engine_off=engine_off)
    return s, time.monotonic() - t


# -- pure decoders ----------------------------------------------------------------------------------

def test_decode_vin_keeps_every_character() -> None:
    assert decode_vin(b"\x01" + VIN.encode()) == VIN                    # CAN: count byte first
    assert decode_vin(b"\x00\x00\x00" + VIN.encode()) == VIN            # legacy: leading padding
    assert decode_vin(VIN.encode() + b"\x00\x00") == VIN                # trailing padding
    assert decode_vin(b"\x01" + b"1HGCM82633A00435") is None            # 16 characters
    assert decode_vin(b"\x01" + b"1HGCM82633I004352") is None           # I is never in a VIN
    assert decode_vin(b"\x01" + bytes([0xC3]) * 17) is None


def test_decode_voltage_without_floats() -> None:
    assert decode_voltage_mv("12.3V") == 12_300
    assert decode_voltage_mv("14.25V") == 14_250
    assert decode_voltage_mv("13V") == 13_000
    assert decode_voltage_mv("?") is None and decode_voltage_mv("NO DATA") is None


def test_pid_bytes_accepts_only_41_replies_of_the_right_length() -> None:
    engine, other = 2, 1

    def msg(data: bytes, ecu: int = engine) -> SimpleNamespace:
        return SimpleNamespace(data=bytearray(data), ecu=ecu)

    assert pid_bytes([msg(b"\x41\xa6\x00\x01\xe2\x40")], 0xA6, 4) == b"\x00\x01\xe2\x40"
    assert pid_bytes([msg(b"\x61\xa6\x00\x00\xea\x5c")], 0xA6, 4) is None   # the emulator's stock reply
    assert pid_bytes([msg(b"\x41\xa6\x00\x01")], 0xA6, 4) is None            # short
    assert pid_bytes([msg(b"")], 0xA6, 4) is None                            # NO DATA
    assert pid_bytes([msg(b"\x41\x0d\x10", other), msg(b"\x41\x0d\x20")], 0x0D, 1) == b"\x20"


def test_python_obd_stderr_handler_is_removed() -> None:
    handler = getattr(obd_source.obd, "console_handler", None)
    assert handler is not None and handler not in logging.getLogger("obd").handlers


def test_socket_port_gets_an_explicit_baudrate() -> None:
    assert ObdSource("socket://127.0.0.1:35000")._baudrate == 38400
    assert ObdSource("/dev/ttyUSB0")._baudrate is None
    assert ObdSource("socket://10.0.0.1:35000", baudrate=9600)._baudrate == 9600
    with pytest.raises(ValueError):
        ObdSource("")


# -- against the emulator ---------------------------------------------------------------------------

def test_vin_and_a6_read_and_rising(car: SimCar) -> None:
    src = opened(car.port or "")
    assert src.state == "connected"
    assert src.vin() == VIN
    assert src.supports_a6() is True
    first, took = timed_sample(src)
    assert first.connected and first.ecu and took < BOUND_S
    assert first.speed_kph is not None and first.rpm is not None and first.rpm > 0
    assert first.voltage_mv == 14_200 and first.dist_since_clear_km is not None
    assert first.odo_m is not None and 48_213_400 <= first.odo_m < 48_300_000
    time.sleep(0.5)
    later = src.sample(engine_off=False)
    assert later.odo_m is not None and later.odo_m > first.odo_m
    assert later.odo_m % 100 == 0 and later.mono_ms > first.mono_ms
    src.close()
    assert src.state == "closed"


def test_car_without_a6(tmp_path: Path) -> None:
    with SimCar(Profile(has_a6=False, park_s=0), tmp_path) as c:
        src = opened(c.port or "")
        assert src.supports_a6() is False
        s = src.sample(engine_off=False)
        assert s.ecu and s.speed_kph is not None and s.odo_m is None
        src.close()


def test_no_data_never_becomes_zero_km(car: SimCar) -> None:
    src = opened(car.port or "")
    car.no_data(True)
    for _ in range(3):
        s = src.sample(engine_off=False)
        assert s.ecu and s.speed_kph is not None
        assert s.odo_m is None
    car.no_data(False)
    back = src.sample(engine_off=False).odo_m
    assert back is not None and back > 48_000_000
    src.close()


def test_the_emulators_stock_61_a6_reply_is_rejected(tmp_path: Path) -> None:
    for has_a6 in (True, False):    # advertised in 01A0 or not, "61 A6" is no odometer
        with SimCar(Profile(stock_a6=True, has_a6=has_a6, park_s=0), tmp_path / str(has_a6)) as c:
            src = opened(c.port or "")
            assert all(src.sample(engine_off=False).odo_m is None for _ in range(4))
            if not has_a6:
                assert src.supports_a6() is False
            src.close()


def test_adapter_hangs_mid_trip_then_comes_back(car: SimCar) -> None:
    src = opened(car.port or "")
    assert src.sample(engine_off=False).ecu
    car.hang()
    s, took = timed_sample(src)
    assert took < BOUND_S
    assert not s.connected and not s.ecu and s.speed_kph is None and s.odo_m is None
    assert src.state == "lost"
    s, took = timed_sample(src)                 # lost: answers at once, no blocking
    assert took < 0.1 and not s.connected
    t = time.monotonic()
    assert not src.open()                       # still silent: bounded too
    assert time.monotonic() - t < BOUND_S and src.state == "lost"
    car.unhang()
    assert src.open() and src.state == "connected"
    s, took = timed_sample(src)
    assert s.connected and s.ecu and s.odo_m is not None and took < BOUND_S
    src.close()


def test_vin_change(car: SimCar) -> None:
    src = opened(car.port or "")
    assert src.vin() == VIN
    car.set_vin("WVWZZZ1JZXW000001")
    assert src.vin() == "WVWZZZ1JZXW000001"
    src.close()


def test_engine_off_then_on(car: SimCar, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(obd_source, "_CAR_RETRY_S", 0.0)
    car.engine(False)
    src = opened(car.port or "")                # the adapter answers, the car does not
    assert src.state == "no_ecu"
    s, took = timed_sample(src, engine_off=True)
    assert s.connected and not s.ecu and s.rpm is None and s.voltage_mv == 12_600 and took < BOUND_S
    assert src.vin() is None
    car.engine(True)
    s = src.sample(engine_off=True)             # the ECU answers: a full sample
    assert s.ecu and s.speed_kph is not None and s.voltage_mv == 14_200
    assert src.state == "connected" and src.supports_a6() is True
    car.engine(False)                           # switched off while connected
    s = src.sample(engine_off=False)
    assert s.connected and not s.ecu and src.state == "no_ecu"
    src.close()


def test_wifi_adapter_over_socket(tmp_path: Path) -> None:
    with SimCar(FAST, tmp_path, transport="tcp") as c:
        assert (c.port or "").startswith("socket://")
        src = opened(c.port or "")
        assert src.vin() == VIN and src.sample(engine_off=False).odo_m is not None
        c.hang()
        s, took = timed_sample(src)
        assert not s.connected and took < BOUND_S and src.state == "lost"
        c.unhang()
        assert src.open()
        src.close()


def test_missing_adapter_never_raises() -> None:
    src = ObdSource("/dev/does-not-exist-odoledger")
    assert not src.open() and src.state == "lost"
    s = src.sample(engine_off=True)
    assert not s.connected and s.voltage_mv is None
    assert src.vin() is None and src.supports_a6() is None
    with socket.socket() as sock:           # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t = time.monotonic()
    assert not ObdSource(f"socket://127.0.0.1:{port}").open()
    assert time.monotonic() - t < BOUND_S

"""The daemon's OBD loop with fake car parts; systemd notifications on a real socket."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from agent import daemon
from agent.backoff import Backoff
from agent.buffer import Outbox
from agent.clock import Clock
from agent.recorder import Recorder
from agent.vehicle import Vehicle, VehicleConfig
from protocol import records
from protocol.identity import SigningKey
from tests.fakes import FakePower, FakeSource, FakeVehicle

OLD_VIN = "WVWZZZ1JZXW000001"
NEW_VIN = "WF0XXXGCDX1234567"


class Parts:
    def __init__(self, tmp: Path, *, clock: Clock | None = None, boot: str = "boot1",
                 **source: object) -> None:
        self.key = SigningKey.generate()
        self.path = tmp / "outbox.db"
        self.outbox = Outbox.open(self.path)
        self.clock = clock or Clock("unsynced")
        self.recorder = Recorder(self.outbox, self.key, clock=self.clock, boot=boot)
        self.source = FakeSource(**source)  # type: ignore[arg-type]
        self.vehicle = FakeVehicle()
        self.power = FakePower()
        self.commands: list[Sequence[str]] = []
        self.boot = boot

    def loop(self, **kw: object) -> daemon.ObdLoop:
        return daemon.ObdLoop(
            self.source, self.vehicle, self.power, self.recorder, clock=self.clock, boot=self.boot,
            run_command=self.commands.append, open_backoff=Backoff(0.01, 0.05), **kw,  # type: ignore[arg-type]
        )

    def kinds(self) -> list[tuple[str, object]]:
        return [(r.kind, records.verify(r.jws, self.key.public).fields.get("event"))
                for r in self.outbox.records()]


def test_every_reading_is_recorded_with_the_vehicle_snapshot_and_live_view(tmp_path: Path) -> None:
    p = Parts(tmp_path)
    obd = p.loop()
    assert p.source.open()
    obd.on_open()
    for _ in range(3):
        assert obd.tick() == p.power.interval_s
    rows = p.outbox.records()
    assert [r.odo_m for r in rows] == [10_000_500, 10_001_000, 10_001_500]
    assert p.outbox.state("vehicle") == {"steps": 3, "odo_m": 10_001_500}
    live = p.outbox.state("live")
    assert live["odo_m"] == 10_001_500 and live["obd"] == "connected" and live["src"] == "obd"
    assert p.outbox.state("vin") == OLD_VIN
    assert all(records.verify(r.jws, p.key.public).vin == OLD_VIN for r in rows)


def test_a_new_vin_is_an_event_and_later_records_carry_it(tmp_path: Path) -> None:
    p = Parts(tmp_path, vin=NEW_VIN)
    p.outbox.set_state({"vin": OLD_VIN})
    p.recorder.vin = OLD_VIN
    obd = p.loop()
    p.source.open()
    obd.on_open()
    obd.tick()
    first, second = (records.verify(r.jws, p.key.public) for r in p.outbox.records())
    assert first.fields["event"] == "vin_changed"
    assert first.fields["detail"] == {"from": OLD_VIN, "to": NEW_VIN} and first.vin == NEW_VIN
    assert second.kind == "odometer" and second.vin == NEW_VIN
    assert p.outbox.state("vin") == NEW_VIN
    # an unreadable VIN later keeps the last one read, and is no change
    p.source.set_vin(None)
    obd.on_open()
    obd.tick()
    assert records.verify(p.outbox.records()[-1].jws, p.key.public).vin == NEW_VIN
    assert [k for k in p.kinds() if k[1] == "vin_changed"] == [("event", "vin_changed")]


def test_a_reply_that_is_not_a_vin_is_an_event_and_never_signed_as_one(tmp_path: Path) -> None:
    p = Parts(tmp_path, vin=None)
    p.outbox.set_state({"vin": OLD_VIN})
    p.recorder.vin = OLD_VIN
    p.source.vin_reply = "0157565757a5a5a5"          # what a car said to 0902 that is not ISO 3779
    obd = p.loop()
    p.source.open()
    obd.on_open()
    obd.tick()
    signed = [records.verify(r.jws, p.key.public) for r in p.outbox.records()]
    event = next(r for r in signed if r.kind == "event")
    assert event.fields["event"] == "vin_unreadable"
    assert event.fields["detail"] == {"reply": "0157565757a5a5a5"}
    assert all(r.vin == OLD_VIN for r in signed)     # the last VIN read, never what it said


def test_another_car_starts_a_fresh_vehicle_after_ending_the_old_cars_trip(tmp_path: Path) -> None:
    """The dongle moves from a car at 10,000 km to one at 2,000 km: the old car's trip ends under
    its VIN, and the new car's odometer is recorded as its own, not as a jump back."""
    p = Parts(tmp_path, start_odo_m=10_000_000)
    p.vehicle = Vehicle(VehicleConfig())  # type: ignore[assignment]
    obd = p.loop()
    p.source.open()
    obd.on_open()
    for _ in range(8):
        obd.tick()
    old = [records.verify(r.jws, p.key.public) for r in p.outbox.records()]
    old_high = max(r.fields["odo_m"] for r in old if r.kind == "odometer")
    assert old_high >= 10_001_000 and obd.vehicle.trip is not None
    p.source.close()                        # unplugged, and plugged into another car
    p.source.set_vin(NEW_VIN)
    p.source.odo_m = 2_000_000
    p.source.open()
    obd.on_open()
    assert obd.vehicle is not p.vehicle and obd.vehicle.odo_m is None and obd.vehicle.trip is None
    assert p.outbox.state("vehicle") == obd.vehicle.snapshot()
    for _ in range(6):
        obd.tick()
    after = [records.verify(r.jws, p.key.public) for r in p.outbox.records()][len(old):]
    events = [r.fields["event"] for r in old + after if r.kind == "event"]
    assert "odometer_jump_back" not in events and "odometer_implausible" not in events
    change = next(i for i, r in enumerate(after) if r.fields.get("event") == "vin_changed")
    (trip,) = [r for r in after[:change] if r.kind == "trip"]
    assert trip.vin == OLD_VIN and trip.fields["end_odo_m"] == old_high
    assert all(r.vin == OLD_VIN for r in after[:change])
    first = next(r for r in after[change:] if r.kind == "odometer")
    assert first.vin == NEW_VIN and 2_000_000 < first.fields["odo_m"] < old_high
    assert first.fields["src"] == "obd"
    assert p.outbox.state("vin") == NEW_VIN


def test_the_vin_is_read_again_when_the_car_wakes_up(tmp_path: Path) -> None:
    p = Parts(tmp_path, vin=NEW_VIN)
    p.source.ecu_on = False                 # opened with the ignition off: no VIN
    p.outbox.set_state({"vin": OLD_VIN})
    obd = p.loop()
    p.source.open()
    obd.on_open()
    obd.tick()
    assert p.recorder.vin == OLD_VIN and p.kinds() == []
    p.source.ecu_on = True                  # the ECU answers: this is another car
    for _ in range(3):
        obd.tick()
    assert p.kinds().count(("event", "vin_changed")) == 1
    assert records.verify(p.outbox.records()[-1].jws, p.key.public).vin == NEW_VIN
    assert p.source.vin_reads == 2
    for _ in range(3):                      # and not asked again while it stays awake
        obd.tick()
    assert p.source.vin_reads == 2


def test_a_confirmation_from_another_process_re_anchors_the_vehicle(tmp_path: Path) -> None:
    p = Parts(tmp_path)
    obd = p.loop()
    p.source.open()
    obd.tick()
    other = Recorder(Outbox.open(p.path), p.key, clock=Clock("unsynced"), boot="boot1")
    rec = other.confirm(12_345_600, 10_000_500)
    obd.tick()
    obd.tick()
    assert p.vehicle.anchors == [12_345_600]
    assert p.outbox.state("confirm_applied") == rec.seq
    # a restarted daemon does not apply it twice
    again = p.loop()
    again.tick()
    assert p.vehicle.anchors == [12_345_600]


def test_the_power_policy_runs_the_shutdown_command_once(tmp_path: Path) -> None:
    p = Parts(tmp_path)
    p.power.shutdown_after = 2
    obd = p.loop(shutdown_command=["systemctl", "poweroff"])
    p.source.open()
    for _ in range(5):
        obd.tick()
    assert p.commands == [("systemctl", "poweroff")]
    assert obd.shutdown_reason == "engine_off"
    assert ("event", "shutdown") in p.kinds()


def test_clock_synced_is_recorded_once_per_boot(tmp_path: Path) -> None:
    synced = [False]
    clock = Clock("auto", probe=lambda: synced[0], recheck_s=0)
    p = Parts(tmp_path, clock=clock)
    obd = p.loop()
    p.source.open()
    obd.tick()
    synced[0] = True
    obd.tick()
    obd.tick()
    assert p.kinds().count(("event", "clock_synced")) == 1
    p.loop().tick()   # the daemon restarts in the same boot
    assert p.kinds().count(("event", "clock_synced")) == 1
    rows = [records.verify(r.jws, p.key.public) for r in p.outbox.records()]
    assert rows[0].clock == "unsynced" and rows[-1].clock == "synced"


def test_the_loop_opens_with_backoff_reopens_a_lost_adapter_and_stops(tmp_path: Path) -> None:
    p = Parts(tmp_path, fail_opens=2)
    p.source.lose_after = 3
    obd = p.loop()
    stop = threading.Event()
    t = threading.Thread(target=obd.run, args=(stop,))
    t.start()
    deadline = time.monotonic() + 5
    while p.source.samples < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    t.join(5)
    assert not t.is_alive()
    assert p.source.opens == 4          # two failures, then open, lost, open again
    assert p.source.samples >= 10 and p.source.state == "closed"
    assert p.outbox.backlog() >= 8


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "600000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()


def test_run_tells_systemd_ready_watchdog_and_stopping(tmp_path: Path, notify_socket: socket.socket) -> None:
    p = Parts(tmp_path)
    stop = threading.Event()
    result: list[int] = []
    obd = p.loop()
    t = threading.Thread(target=lambda: result.append(daemon.run(obd, None, stop, install_signals=False)))
    t.start()
    got: list[str] = []
    while "WATCHDOG=1" not in got or not any(m.startswith("STATUS=obd connected") for m in got):
        got.append(notify_socket.recv(256).decode())
    stop.set()
    t.join(10)
    while "STOPPING=1" not in got:
        got.append(notify_socket.recv(256).decode())
    assert got[0] == "READY=1" and result == [0]

"""``odo-agent run``: the OBD loop and the sync loop, fed to systemd's watchdog.

Two threads: the OBD loop (open the adapter with backoff, read the VIN, feed
samples to the vehicle logic, record every reading) and the sync loop
(:class:`agent.sync.Syncer`). The main thread waits for SIGTERM/SIGINT, pings
the watchdog while the OBD loop is not stuck in one call, and stops both
cleanly. The car being off, the adapter unplugged or the broker away are
normal states, never a reason to exit, and so is an outbox that cannot be written (a full
disk): the recorder holds what matters (:mod:`agent.recorder`), the adapter stays open, the
sync loop keeps sending what is stored, and systemd's ``STATUS=`` line says ``outbox: <error>``.

After each sample the OBD loop also prunes the outbox (:mod:`agent.retention`)
and acts on the power policy (:mod:`agent.shutdown`). It keeps the vehicle
snapshot and a live view for ``status`` and the UI in the outbox's state
(:mod:`agent.state`), and picks up what other processes wrote there: a
confirmation from ``odo-agent confirm`` or the UI re-anchors the vehicle's
derived odometer (``Vehicle.confirm``).

A VIN other than the stored one means the dongle now sits in another car. The
old car's trip in progress, if any, is ended at its last "on" sample and
recorded under the old VIN; then a ``vin_changed`` event is recorded and a
fresh vehicle (no odometer, no trip) takes over, so the new car's odometer is
never compared with the old one's.
"""

from __future__ import annotations

import fcntl
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from agent import sdnotify
from agent.backoff import Backoff
from agent.buffer import Outbox
from agent.clock import Clock, mono_ms
from agent.errors import StorageError
from agent.recorder import ReadingLike, Recorder
from agent.retention import Retention
from agent.shutdown import PowerLike, Shutdown
from agent.state import (
    CLOCK_SYNCED_BOOT,
    CONFIRM_APPLIED,
    LIVE,
    VEHICLE,
    VIN,
    Entry,
    Live,
    Writes,
    save,
    writes,
)
from common.clock import now_ms

if TYPE_CHECKING:  # `odo-agent enroll` asks whether a daemon runs, and needs no MQTT for that
    from agent.sync import Syncer

log = logging.getLogger(__name__)

LOCK_FILE = "daemon.lock"
LIVE_EVERY_S = 10.0
DAY_MS = 86_400_000


def lock(state_dir: Path) -> IO[str] | None:
    """Take the state directory's daemon lock (held until the process ends); None when
    another process holds it. One daemon per state directory: one adapter, one
    MQTT client id."""
    fh = open(state_dir / LOCK_FILE, "a")  # noqa: SIM115 - held for the life of the daemon
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    return fh


def running(state_dir: Path) -> bool:
    """Whether a daemon holds the lock of ``state_dir``."""
    fh = lock(state_dir)
    if fh is None:
        return True
    fh.close()
    return False


class SourceLike(Protocol):
    @property
    def state(self) -> str: ...
    def open(self) -> bool: ...
    def vin(self) -> str | None: ...
    @property
    def vin_reply(self) -> str | None: ...
    def supports_a6(self) -> bool | None: ...
    def sample(self, *, engine_off: bool) -> Any: ...
    def close(self) -> None: ...


class VehicleLike(Protocol):
    def step(self, s: Any, wall_ms: int) -> Sequence[ReadingLike]: ...
    def confirm(self, odo_m: int) -> None: ...
    def snapshot(self) -> dict[str, object]: ...
    @property
    def odo_m(self) -> int | None: ...
    @property
    def src(self) -> str | None: ...
    @property
    def ignition(self) -> bool: ...
    @property
    def trip(self) -> Mapping[str, object] | None: ...


#: Makes a vehicle: ``None`` for a fresh one, or a snapshot to carry on from.
VehicleFactory = Callable[[Mapping[str, object] | None], VehicleLike]


def factory_of(vehicle: object) -> VehicleFactory | None:
    """``type(vehicle)(vehicle.cfg, state)`` for a vehicle that has a ``cfg``, else None."""
    cfg = getattr(vehicle, "cfg", None)
    if cfg is None:
        return None
    cls: Any = type(vehicle)
    return lambda state: cls(cfg, state)


@dataclass(frozen=True)
class _Unplugged:
    """A sample of an adapter that does not answer (``agent.obd_source.Sample`` fields)."""

    mono_ms: int
    connected: bool = False
    ecu: bool = False
    speed_kph: int | None = None
    rpm: int | None = None
    odo_m: int | None = None
    dist_since_clear_km: int | None = None
    voltage_mv: int | None = None


class ObdLoop:
    """The OBD side: one :meth:`tick` per sample; :meth:`run` adds opening with backoff."""

    def __init__(
        self, source: SourceLike, vehicle: VehicleLike, power: PowerLike, recorder: Recorder, *,
        clock: Clock, boot: str, retention_days: int = 30, max_records: int = 50_000,
        shutdown_command: Sequence[str] = (), run_command: Callable[[Sequence[str]], object] | None = None,
        monotonic: Callable[[], float] = time.monotonic, open_backoff: Backoff | None = None,
        new_vehicle: VehicleFactory | None = None,
    ) -> None:
        self.source = source
        self.vehicle = vehicle
        self.new_vehicle = new_vehicle or factory_of(vehicle)
        self.power = power
        self.recorder = recorder
        self.outbox: Outbox = recorder.outbox
        self.clock = clock
        self.boot = boot
        self.retention = Retention(recorder, retention_days=retention_days, max_records=max_records,
                                   monotonic=monotonic)
        self.shutdown = Shutdown(power, recorder, command=shutdown_command, run_command=run_command)
        self._mono = monotonic
        self._backoff = open_backoff or Backoff(1.0, 60.0)
        self.busy_since: float | None = None     # set while inside an adapter call
        self._live_at = -LIVE_EVERY_S
        self._live_saved: Live | None = None
        self._clock_announced = CLOCK_SYNCED_BOOT.get(self.outbox) == boot
        self._vin_read = False
        self._confirm_seen = CONFIRM_APPLIED.get(self.outbox)

    @property
    def obd_state(self) -> str:
        return self.source.state

    @property
    def shutdown_reason(self) -> str | None:
        """Why the power policy shut the device down, once it did."""
        return self.shutdown.reason

    def _call(self, fn: Callable[[], Any]) -> Any:
        self.busy_since = self._mono()
        try:
            return fn()
        finally:
            self.busy_since = None

    # -- the loop -------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        backoff = self._backoff
        while not stop.is_set():
            try:
                if self.source.state not in ("connected", "no_ecu"):
                    self._call(self.source.close)
                    if not self._call(self.source.open):
                        self.save_live(force=False)
                        delay = backoff.next()
                        log.info("OBD adapter not available; trying again in %.0f s", delay)
                        stop.wait(delay)
                        continue
                    backoff.reset()
                    self.on_open()
                interval = self.tick()
            except StorageError as exc:      # the outbox, not the adapter: carry on sampling
                log.error("outbox: %s", exc)
                interval = self.power.poll_interval_s(self.vehicle.ignition)
            except Exception:  # noqa: BLE001 - a bug in one sample must not stop the recording
                log.exception("OBD loop error; reopening the adapter")
                self._call(self.source.close)
                interval = backoff.next()
            stop.wait(interval)
        self._call(self.source.close)
        self.save_live(force=True)

    def on_open(self) -> None:
        """Read the VIN (and log what the car supports) on a fresh connection, or once
        the ECU answers when the adapter was opened with the ignition off."""
        vin = self._call(self.source.vin)
        self._vin_read = vin is not None
        a6 = self._call(self.source.supports_a6)
        stored = VIN.get(self.outbox)
        log.info("OBD adapter open: VIN %s, odometer PID A6 %s", vin or "unreadable",
                 {True: "supported", False: "not supported", None: "unknown"}[a6])
        if vin is None:
            self.recorder.vin = stored  # keep the last VIN read, not a spurious null
            reply = self.source.vin_reply
            if reply is not None:
                # The car answered something that is not a VIN: say what, never sign it as one.
                log.warning("the car answered a VIN request with %s, which is not a VIN", reply)
                self.recorder.event("vin_unreadable", {"reply": reply})
            return
        if vin == stored:
            self.recorder.vin = vin
        elif stored is None:
            self.recorder.vin = vin
            try:
                VIN.put(self.outbox, vin)
            except StorageError as exc:      # kept in memory; saved at the next open
                log.error("cannot save the VIN: %s", exc)
        else:
            self.change_vehicle(stored, vin)

    def change_vehicle(self, old_vin: str, new_vin: str) -> None:
        """The dongle moved to another car: end the old car's trip under its VIN, record
        ``vin_changed``, and carry on with a fresh vehicle (and save its snapshot)."""
        log.warning("VIN changed from %s to %s: the dongle is in another car", old_vin, new_vin)
        self.recorder.vin = old_vin
        if self.vehicle.trip is not None:
            # Two samples of an unplugged adapter, a day apart in the vehicle's own monotonic
            # time, run out the ignition's off debounce: the trip ends at its last "on" sample.
            start = mono_ms()
            closing = [*self.vehicle.step(_Unplugged(start), now_ms()),
                       *self.vehicle.step(_Unplugged(start + DAY_MS), now_ms())]
            if self.vehicle.trip is not None:
                log.warning("the old car's trip could not be ended; it is dropped")
            self.recorder.record(closing, writes(VEHICLE.entry(self.vehicle.snapshot())))
        state: list[Entry] = [VIN.entry(new_vin)]
        if self.new_vehicle is not None:
            self.vehicle = self.new_vehicle(None)
            state.append(VEHICLE.entry(self.vehicle.snapshot()))
        else:
            log.warning("no way to start a fresh vehicle: the old car's odometer state is kept")
        self.recorder.vin = new_vin
        self.recorder.event("vin_changed", {"from": old_vin, "to": new_vin}, writes(*state))
        self._live_saved = None  # the live view changed: save it at the next chance

    def tick(self) -> float:
        """Take one sample, record what it gives; returns the seconds until the next."""
        self.apply_confirmation()
        before = self.source.state
        sample = self._call(lambda: self.source.sample(engine_off=not self.vehicle.ignition))
        if not self._vin_read and before != "connected" and self.source.state == "connected":
            self.on_open()  # the car woke up: the VIN may be readable now, and may be new
        wall = now_ms()
        readings = list(self.vehicle.step(sample, wall))
        extra: list[Entry] = []
        if not self._clock_announced and self.clock.state() == "synced":
            readings.append(_Event("clock_synced", {"boot": self.boot}))
            extra.append(CLOCK_SYNCED_BOOT.entry(self.boot))
        if readings:
            live = self._live(wall)
            if self.recorder.record(readings, writes(VEHICLE.entry(self.vehicle.snapshot()), LIVE.entry(live),
                                                     *extra)):
                self._clock_announced = self._clock_announced or bool(extra)
                self._saved(live)
        else:
            self.save_live(force=False)
        self.shutdown.check(sample, ignition=self.vehicle.ignition, state=lambda: self._state(now_ms()))
        self.retention.tick()
        return self.power.poll_interval_s(self.vehicle.ignition)

    # -- state other processes read -------------------------------------------------------------

    def _live(self, wall: int) -> Live:
        trip = self.vehicle.trip
        return Live(self.vehicle.odo_m, self.vehicle.src, self.vehicle.ignition,
                    dict(trip) if trip is not None else None, self.source.state, self.recorder.error, wall)

    def _state(self, wall: int, *more: Entry) -> Writes:
        """The vehicle snapshot and the live view (and ``more``), to save in one transaction."""
        return writes(*more, VEHICLE.entry(self.vehicle.snapshot()), LIVE.entry(self._live(wall)))

    def save_live(self, *, force: bool) -> None:
        """Save the vehicle snapshot and the live view (for status/UI) when the view
        changed, at most every few seconds."""
        live = self._live(now_ms())
        same = live.same_view(self._live_saved)
        if not force and (self._mono() - self._live_at < LIVE_EVERY_S or same):
            return
        try:
            save(self.outbox, writes(VEHICLE.entry(self.vehicle.snapshot()), LIVE.entry(live)))
            self._saved(live)
        except StorageError as exc:
            self._live_at = self._mono()     # tried again in LIVE_EVERY_S, not at every sample
            log.error("cannot save the live state: %s", exc)

    def _saved(self, live: Live) -> None:
        self._live_saved = live
        self._live_at = self._mono()

    def apply_confirmation(self) -> None:
        """Re-anchor the derived odometer on a confirmation written by another process."""
        latest = self.outbox.latest("confirmation")
        if latest is None or latest.seq <= self._confirm_seen or latest.odo_m is None:
            return
        log.info("driver confirmed %d m (seq %d); re-anchoring the odometer", latest.odo_m, latest.seq)
        self.vehicle.confirm(latest.odo_m)
        self._confirm_seen = latest.seq
        try:
            save(self.outbox, self._state(now_ms(), CONFIRM_APPLIED.entry(latest.seq)))
        except StorageError as exc:
            log.error("cannot save the re-anchored odometer: %s", exc)


class _Event:
    kind = "event"

    def __init__(self, name: str, detail: object) -> None:
        self.fields = {"event": name, "detail": detail}


def run(obd: ObdLoop, syncer: Syncer | None, stop: threading.Event, *, install_signals: bool = True) -> int:
    """Run both loops until SIGTERM/SIGINT (or ``stop``); the exit status."""
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    threads = [threading.Thread(target=obd.run, args=(stop,), name="obd", daemon=True)]
    if syncer is not None:
        threads.append(threading.Thread(target=syncer.run, args=(stop,), name="sync", daemon=True))
    for t in threads:
        t.start()
    watchdog = sdnotify.watchdog_interval_s()
    sdnotify.notify("READY=1")
    status = 0
    last_status = ""
    while not stop.is_set():
        if stop.wait(min(1.0, watchdog / 3) if watchdog else 1.0):
            break                            # the loops end because they were told to
        if not threads[0].is_alive():
            log.error("the OBD loop ended unexpectedly")
            status = 1
            break
        if syncer is not None and not threads[1].is_alive() and syncer.state != "auth_refused":
            log.error("the sync loop ended unexpectedly")
            status = 1
            break
        busy = obd.busy_since
        if watchdog and (busy is None or time.monotonic() - busy < watchdog * 0.8):
            sdnotify.notify("WATCHDOG=1")
        text = f"STATUS=obd {obd.obd_state}, sync {syncer.state if syncer else 'off'}"
        if obd.recorder.error is not None:
            text += f", outbox: {obd.recorder.error}"
        if text != last_status:
            sdnotify.notify(text)
            last_status = text
    stop.set()
    sdnotify.notify("STOPPING=1")
    for t in threads:
        t.join(timeout=15)
    return status

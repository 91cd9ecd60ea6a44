"""A full disk under a running agent (docs/DESIGN.md §4, README "What the agent does offline").

The daemon's two loops run on fake car parts and a real mosquitto with a stand-in backend; the
outbox sits on a small filesystem that is then filled up (:mod:`tests.disk_support`: a tmpfs as
root, SQLite's page limit otherwise). The agent keeps running: the adapter is not reopened, the
oldest synced records make room where SQLite can still delete them (under its page limit; not on a
full filesystem), then only trips are held while odometer samples are dropped and counted, the
sync loop keeps sending what is stored, its status says the outbox is full; once there is space
again the held trips are written, a ``buffer_pruned`` event counts what was lost, and the chain
the backend takes is whole from the first record to the last.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent import daemon
from agent import recorder as recorder_module
from agent.backoff import Backoff
from agent.buffer import Outbox
from agent.clock import Clock, boot_id
from agent.errors import StorageError
from agent.recorder import Recorder
from agent.sync import Syncer, SyncSettings
from common.transport import BrokerConfig
from protocol import messages, records, topics
from protocol.identity import SigningKey
from protocol.records import GENESIS
from sim.broker import Broker, quiet_broker
from tests.agent_helpers import Backend, wait_for
from tests.disk_support import PageLimit, small_disk
from tests.fakes import FakePower, FakeReading, FakeSample, FakeSource, counter

FAST = SyncSettings(resend_after_s=0.3, max_resend_after_s=1.0, status_every_s=0.05, backoff_base_s=0.1,
                    backoff_cap_s=0.5, connect_timeout_s=3.0)
TRIP_EVERY = 10
MAX_RECORDS = 300


@dataclass
class TripVehicle:
    """An odometer reading every sample, and a trip every ``TRIP_EVERY`` samples."""

    steps: int = 0
    trips: int = 0
    odo_m: int | None = None

    def step(self, s: FakeSample, wall_ms: int) -> list[FakeReading]:
        self.steps += 1
        self.odo_m = s.odo_m
        out = [FakeReading("odometer", {"odo_m": self.odo_m, "src": "obd"})]
        if self.steps % TRIP_EVERY == 0:
            self.trips += 1
            start = 1_700_000_000_000 + self.steps * 1000
            out.append(FakeReading("trip", {"start_t": start, "end_t": start + 500, "start_odo_m": 0,
                                            "end_odo_m": self.odo_m, "max_kph": 50, "src": "obd"}))
        return out

    def confirm(self, odo_m: int) -> None:
        pass

    def snapshot(self) -> dict[str, object]:
        return {"steps": self.steps}

    @property
    def src(self) -> str | None:
        return "obd"

    @property
    def ignition(self) -> bool:
        return True

    @property
    def trip(self) -> None:
        return None


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    b = quiet_broker()
    yield b
    b.stop()


def chain(box: Outbox, key: SigningKey) -> list[records.Record]:
    """The outbox's records, each verified and chained to the one before it."""
    out: list[records.Record] = []
    for row in box.records(limit=100_000):
        rec = records.verify(row.jws, key.public)
        assert rec.seq == row.seq and rec.id == row.id
        if out:
            assert rec.seq == out[-1].seq + 1 and rec.prev == out[-1].id
        out.append(rec)
    return out


def test_a_full_disk_applies_the_overflow_policy_and_the_agent_keeps_running(tmp_path: Path,
                                                                            broker: Broker) -> None:
    with small_disk(tmp_path / "disk") as disk:
        key = SigningKey.generate()
        outbox = Outbox.open(disk.path / "outbox.db")
        # SQLite's page limit leaves room for the delete that frees pages; a full filesystem does not
        room = isinstance(disk, PageLimit)
        if isinstance(disk, PageLimit):
            disk.watch(lambda: outbox._conn)
        clock = Clock("synced")
        recorder = Recorder(outbox, key, clock=clock, boot=boot_id(), max_records=MAX_RECORDS)
        source, vehicle = FakeSource(step_m=100), TripVehicle()
        obd = daemon.ObdLoop(source, vehicle, FakePower(interval_s=0.005), recorder, clock=clock,
                             boot=boot_id(), max_records=MAX_RECORDS, open_backoff=Backoff(0.01, 0.05))
        syncer = Syncer(BrokerConfig(broker.host, broker.port), key.public.id, outbox, settings=FAST,
                        obd_state=lambda: obd.obd_state, error=lambda: recorder.error, boot=boot_id())
        backend = Backend(broker, key.public)
        sent: list[str] = []                   # every record the agent published, seen beside the backend
        seen = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watcher-{key.public.id[:8]}")
        seen.on_message = lambda c, u, m: sent.extend(
            map(str, messages.decode_batch(bytes(m.payload)).records))
        seen.connect(broker.host, broker.port)
        seen.subscribe(topics.records(key.public.id), qos=1)
        seen.loop_start()
        stop = threading.Event()
        status: list[int] = []
        runner = threading.Thread(target=lambda: status.append(daemon.run(obd, syncer, stop,
                                                                          install_signals=False)))
        runner.start()
        try:
            # synced records to make room with
            assert wait_for(lambda: backend.through >= 120, timeout=30)
            backend.acking = False
            with outbox._lock:
                disk.fill()
            # full: the oldest synced records go if they can (they cannot when the delete itself
            # finds no space), then the outbox stays full (nothing new is synced)
            assert wait_for(lambda: recorder.error is not None and (
                not room or outbox.backlog() == outbox.counts().total), timeout=30), recorder.error
            assert "full" in (recorder.error or "")
            full_at = vehicle.steps
            assert wait_for(lambda: vehicle.steps >= full_at + 20 * TRIP_EVERY, timeout=30)
            assert recorder.error is not None
            assert recorder.held >= 15 and recorder.held <= vehicle.trips   # trips held, samples not
            assert runner.is_alive() and source.opens == 1                  # no crash, no reopening
            stored = chain(outbox, key)
            # the sync loop keeps sending what is stored, and says why nothing more is
            assert wait_for(lambda: max(backend.received, default=0) == stored[-1].seq, timeout=10)
            assert wait_for(lambda: any("full" in str(s.get("error", "")) for s in backend.statuses))
            # space again: the held trips are written, and the backend takes the whole chain
            with outbox._lock:
                disk.free()
            backend.acking = True
            assert wait_for(lambda: recorder.error is None, timeout=10)
            tip = outbox.tip()[0]
            assert wait_for(lambda: backend.through >= tip, timeout=30)
        finally:
            stop.set()
            runner.join(20)
            backend.close()
            seen.disconnect()
            seen.loop_stop()
        assert status == [0] and not runner.is_alive()
        final = chain(outbox, key)
        pruned = [r.fields["detail"] for r in final if r.fields.get("event") == "buffer_pruned"]
        # one event per time the outbox could not be written, counting what that time cost
        episodes = [d for d in pruned if isinstance(d, dict) and d.get("mode") == "disk_full"]
        assert episodes
        deleted = sum(int(d["deleted_synced"]) for d in episodes)
        skipped: dict[str, int] = {}
        for d in episodes:
            for kind, n in d["skipped"].items():
                skipped[kind] = skipped.get(kind, 0) + int(n)
        assert deleted >= (100 if room else 0)                       # synced records made room first
        assert skipped["odometer"] >= 20 * TRIP_EVERY - 20           # samples dropped while full
        assert set(skipped) == {"odometer"}                          # no trip lost
        # every trip the vehicle gave was signed once: in the outbox, or sent before its deletion
        signed = {r.id: r for r in final}
        for jws in sent:
            rec = records.verify(jws, key.public)
            signed.setdefault(rec.id, rec)
        trips = sorted(int(str(r.fields["end_odo_m"])) for r in signed.values() if r.kind == "trip")
        assert len(trips) == vehicle.trips == len(set(trips))
        assert outbox.backlog() < MAX_RECORDS                        # and the backend has the rest
        outbox.close()


ODO = FakeReading("odometer", {"odo_m": 1000, "src": "obd"})
TRIP = FakeReading("trip", {"start_t": 1, "end_t": 2, "start_odo_m": 0, "end_odo_m": 1000, "max_kph": 50,
                            "src": "obd"})
EVENT = FakeReading("event", {"event": "adapter_lost", "detail": None})


def test_while_the_outbox_is_full_only_trips_wait_and_a_confirmation_comes_after_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recorder_module, "HOLD_LIMIT", 4)
    key = SigningKey.generate()
    outbox = Outbox.open(tmp_path / "outbox.db")
    rec = Recorder(outbox, key, clock=Clock("synced"), boot="b1", wall=counter(), mono=counter(5, 1))
    rec.record([ODO])
    pages = outbox._read("PRAGMA page_count")[0][0]
    outbox._conn.execute(f"PRAGMA max_page_count = {pages}")       # SQLite's own SQLITE_FULL from here
    big = FakeReading("event", {"event": "note", "detail": "x" * 20_000})
    assert rec.record([big, ODO]) == [] and rec.held == 2          # admitted before the failure: kept
    with pytest.raises(StorageError, match="full"):                # not before what is held
        rec.confirm(5000, None)
    assert rec.record([ODO, TRIP, EVENT]) == [] and rec.held == 3  # then trips only
    assert rec.record([TRIP, TRIP]) == [] and rec.held == 4        # the oldest held go past the limit
    assert outbox.tip()[0] == 1
    outbox._conn.execute("PRAGMA max_page_count = 1000000000")
    confirmation = rec.confirm(5000, None)
    assert rec.error is None and rec.held == 0
    stored = chain(outbox, key)
    assert [(r.kind, r.fields.get("event")) for r in stored] == [
        ("odometer", None), ("event", "buffer_pruned"), ("odometer", None), ("trip", None), ("trip", None),
        ("trip", None), ("confirmation", None)]
    assert stored[1].fields["detail"] == {"mode": "disk_full", "deleted_synced": 0,
                                          "skipped": {"odometer": 1, "event": 2}}
    assert stored[-1].id == confirmation.id and stored[0].prev == GENESIS

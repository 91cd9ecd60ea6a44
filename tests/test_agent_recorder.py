from __future__ import annotations

from pathlib import Path

from agent.buffer import Outbox
from agent.clock import Clock
from agent.recorder import Recorder
from protocol import records
from protocol.identity import SigningKey
from protocol.messages import Ack
from tests.fakes import FakeReading, counter

ODO = FakeReading("odometer", {"odo_m": 1000, "src": "obd"})
TRIP = FakeReading("trip", {"start_t": 1, "end_t": 2, "start_odo_m": 0, "end_odo_m": 1000, "max_kph": 50,
                            "src": "obd"})
EVENT = FakeReading("event", {"event": "adapter_lost", "detail": None})


def _recorder(tmp_path: Path, **kw: object) -> Recorder:
    key = SigningKey.generate()
    return Recorder(Outbox.open(tmp_path / "o.db"), key, clock=Clock("unsynced"), boot="abc123",
                    wall=counter(), mono=counter(5, 1), **kw)  # type: ignore[arg-type]


def test_every_record_carries_the_common_fields(tmp_path: Path) -> None:
    rec = _recorder(tmp_path, vin="WVWZZZ1JZXW000001")
    (r,) = rec.record([ODO])
    parsed = records.verify(r.jws, rec.key.public)
    assert parsed.payload == {
        "v": 1, "dev": rec.dev, "seq": 1, "prev": "0" * 64, "kind": "odometer", "t": 1_700_000_000_000,
        "clock": "unsynced", "boot": "abc123", "mono_ms": 5, "vin": "WVWZZZ1JZXW000001",
        "odo_m": 1000, "src": "obd",
    }


def test_a_malformed_reading_is_dropped_not_signed(tmp_path: Path) -> None:
    rec = _recorder(tmp_path)
    out = rec.record([FakeReading("odometer", {"odo_m": 1.5, "src": "obd"}), ODO])
    assert [r.kind for r in out] == ["odometer"] and out[0].seq == 1


def test_confirmation_record_and_state(tmp_path: Path) -> None:
    rec = _recorder(tmp_path)
    r = rec.confirm(12_345_600, 12_340_000)
    assert r.kind == "confirmation" and dict(r.fields) == {
        "odo_m": 12_345_600, "device_odo_m": 12_340_000, "week": records.iso_week(r.t)}
    assert rec.outbox.state("confirmed")["odo_m"] == 12_345_600
    assert rec.confirm(1000, None).fields["device_odo_m"] is None


def test_a_long_backlog_thins_odometer_samples_but_keeps_the_chain_whole(tmp_path: Path) -> None:
    rec = _recorder(tmp_path, max_records=40)
    for _ in range(35):
        rec.record([ODO])
    out = rec.record([ODO])           # 35 < 36 = 90 %: still written
    assert [r.kind for r in out] == ["odometer"]
    out = rec.record([ODO, EVENT])    # 36 unsynced: thinning starts; events still go in
    assert [r.fields.get("event") for r in out] == ["buffer_pruned", "adapter_lost"]
    assert out[0].fields["detail"]["mode"] == "thinning"  # type: ignore[index]
    assert rec.record([ODO]) == []
    assert len(rec.record([EVENT, EVENT])) == 2
    assert rec.outbox.backlog() == 40
    assert rec.record([EVENT, ODO]) == []        # full: only trips and confirmations
    assert [r.kind for r in rec.record([TRIP])] == ["trip"]
    assert rec.confirm(5000, None).seq == 42
    # the backend catches up: thinning ends with an event counting what was skipped
    rec.outbox.apply_ack(Ack(rec.outbox.tip()[0]), 1)
    out = rec.record([ODO])
    assert [r.kind for r in out] == ["event", "odometer"]
    assert out[0].fields["detail"]["skipped"] == {"odometer": 3, "event": 1}  # type: ignore[index]
    seqs = [r.seq for r in rec.outbox.records()]
    assert seqs == list(range(1, 45))

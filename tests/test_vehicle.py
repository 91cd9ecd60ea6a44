"""The vehicle: samples in, readings out; restarts; and the never-decreasing odometer."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.obd_source import Sample
from agent.vehicle import Reading, Vehicle, VehicleConfig
from protocol import records

W = 1_760_000_000_000
CFG = VehicleConfig(record_every_m=1000, record_every_ms=60_000, ignition_on_debounce_ms=3000,
                    ignition_off_debounce_ms=30_000)


def on(mono: int, kph: int, *, odo: int | None = None, dsc: int | None = None) -> Sample:
    return Sample(mono, True, True, kph, 800 + kph * 20, odo, dsc, 14_200)


def off(mono: int) -> Sample:
    return Sample(mono, True, False, None, None, None, None, 12_600)


def lost(mono: int) -> Sample:
    return Sample(mono, False, False, None, None, None, None, None)


class Run:
    """Feeds a vehicle at 1 Hz, keeping wall time in step with mono time."""

    def __init__(self, v: Vehicle, mono: int = 0, wall: int = W) -> None:
        self.v, self.mono, self.wall = v, mono, wall
        self.out: list[Reading] = []

    def feed(self, make: object, seconds: int, **kw: object) -> None:
        for _ in range(seconds):
            self.out += self.v.step(make(self.mono, **kw), self.wall)  # type: ignore[operator]
            self.mono += 1000
            self.wall += 1000

    def kinds(self) -> list[str]:
        return [r.kind if r.kind != "event" else str(r.fields["event"]) for r in self.out]


def test_a_drive_with_a6() -> None:
    r = Run(Vehicle(CFG))
    r.feed(off, 5)
    odo = 20_000_000
    for _ in range(120):                        # 2 minutes at 72 km/h: 20 m/s, A6 in 100 m steps
        r.out += r.v.step(on(r.mono, 72, odo=odo - odo % 100), r.wall)
        r.mono += 1000
        r.wall += 1000
        odo += 20
    r.feed(off, 31)
    assert r.kinds()[0] == "adapter_connected"
    odos = [r2.fields for r2 in r.out if r2.kind == "odometer"]
    assert odos[0] == {"odo_m": 20_000_000, "src": "obd"}
    assert [o["odo_m"] for o in odos][1:3] == [20_001_000, 20_002_000]
    trip = [r2.fields for r2 in r.out if r2.kind == "trip"]
    assert len(trip) == 1
    assert trip[0]["src"] == "obd" and trip[0]["start_odo_m"] == 20_000_000
    assert trip[0]["end_odo_m"] == 20_002_300 and trip[0]["max_kph"] == 72
    assert trip[0]["start_t"] == W + 5000 and trip[0]["end_t"] == W + 124_000
    assert not r.v.ignition and r.v.trip is None


def test_a_drive_without_a6_is_derived_from_the_confirmation() -> None:
    v = Vehicle(CFG)
    v.confirm(50_000_000)
    r = Run(v)
    r.feed(on, 60, kph=36)
    assert v.ignition and v.trip is not None and v.trip["distance_m"] == 590
    r.feed(off, 31)
    trip = [x.fields for x in r.out if x.kind == "trip"][0]
    assert trip["src"] == "derived"
    assert (trip["start_odo_m"], trip["end_odo_m"]) == (50_000_000, 50_000_590)
    assert v.odo_m == 50_000_590 and v.src == "derived"


def test_no_anchor_no_a6_gives_no_odometer_records_but_the_trip_as_an_event() -> None:
    r = Run(Vehicle(CFG))
    r.feed(on, 60, kph=36)
    r.feed(off, 31)
    assert r.kinds() == ["adapter_connected", "trip_unanchored"]
    assert r.out[1].fields["detail"]["distance_m"] == 590  # type: ignore[index]
    assert r.v.odo_m is None and r.v.src is None


def test_adapter_lost_and_back_mid_trip() -> None:
    v = Vehicle(CFG)
    v.confirm(1_000_000)
    r = Run(v)
    r.feed(on, 20, kph=50)
    r.feed(lost, 10)
    r.feed(on, 20, kph=50)
    assert r.kinds().count("adapter_lost") == 1 and r.kinds().count("adapter_connected") == 2
    assert "trip" not in r.kinds() and v.ignition            # 10 s lost: the trip goes on
    r.feed(lost, 40)
    assert r.kinds().count("trip") == 1 and not v.ignition   # lost for longer: it ended


def test_trip_survives_a_restart_and_the_gap_is_filled_from_0x31() -> None:
    v = Vehicle(CFG)
    v.confirm(30_000_000)
    r = Run(v)
    true_m = 800_990
    for _ in range(60):                          # 72 km/h, 0x31 steps along
        r.out += v.step(on(r.mono, 72, dsc=true_m // 1000), r.wall)
        r.mono, r.wall, true_m = r.mono + 1000, r.wall + 1000, true_m + 20
    state = json.loads(json.dumps(v.snapshot()))
    before = v.odo_m
    assert before is not None
    v2 = Vehicle(CFG, state)                      # the agent restarted within 20 s, car still driving
    assert v2.ignition and v2.trip is not None
    r2 = Run(v2, mono=5_000, wall=r.wall + 20_000)
    true_m += 400
    out = v2.step(on(r2.mono, 72, dsc=true_m // 1000), r2.wall)
    assert not any(x.kind == "trip" for x in out)
    assert v2.odo_m is not None and 0 <= v2.odo_m - before <= 400
    r2.feed(off, 31)
    trips = [x.fields for x in r2.out if x.kind == "trip"]
    assert len(trips) == 1 and trips[0]["start_t"] == W


def test_jump_back_becomes_an_event_not_a_lower_record() -> None:
    r = Run(Vehicle(CFG))
    r.feed(on, 10, kph=0, odo=90_000_000)
    r.feed(on, 10, kph=0, odo=40_000_000)         # the cluster was swapped
    r.feed(off, 31)
    jb = [x.fields for x in r.out if x.kind == "event" and x.fields["event"] == "odometer_jump_back"]
    assert jb == [{"event": "odometer_jump_back",
                   "detail": {"from_m": 90_000_000, "to_m": 40_000_000, "src": "obd"}}]
    assert all(x.fields["odo_m"] == 90_000_000 for x in r.out if x.kind == "odometer")
    trip = [x.fields for x in r.out if x.kind == "trip"][0]
    assert trip["end_odo_m"] == 90_000_000


def test_snapshot_is_flat_json_of_ints_strings_and_none() -> None:
    v = Vehicle(CFG)
    v.confirm(5)
    Run(v).feed(on, 10, kph=30, dsc=44)
    snap = v.snapshot()
    assert json.loads(json.dumps(snap)) == snap
    assert all(x is None or (isinstance(x, (int, str)) and not isinstance(x, bool)) for x in snap.values())


def test_unknown_snapshot_version_starts_afresh() -> None:
    v = Vehicle(CFG, {"v": 99, "odo_anchor_m": 5})
    assert v.odo_m is None


@pytest.mark.parametrize("field", ["record_every_m", "ignition_off_debounce_ms", "max_kph"])
def test_bad_config_names_the_field(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        VehicleConfig(**{field: -1})


# -- property: whatever the samples, the stated odometer never decreases ---------------------------

_ODO = st.integers(10_000_000, 10_050_000)       # close together: drops and plausible jumps are common
_segment = st.one_of(       # (what, samples, kph / confirmed value, A6, 0x31)
    st.tuples(st.just("on"), st.integers(1, 12), st.integers(0, 255), st.one_of(st.none(), _ODO),
              st.one_of(st.none(), st.integers(0, 65_535))),
    st.tuples(st.sampled_from(["off", "lost"]), st.integers(1, 12), st.just(0), st.none(), st.none()),
    st.tuples(st.just("confirm"), st.just(0), _ODO, st.none(), st.none()),
    st.tuples(st.just("restart"), st.just(0), st.just(0), st.none(), st.none()),
)


def _payload(r: Reading, seq: int) -> dict[str, object]:
    p: dict[str, object] = {"v": 1, "dev": "0" * 32, "seq": seq, "prev": "0" * 64 if seq == 1 else "1" * 64,
                            "kind": r.kind, "t": W, "clock": "synced", "boot": "b", "mono_ms": 0, "vin": None}
    p.update(r.fields)
    return p


@settings(max_examples=200, deadline=None)
@given(st.lists(_segment, max_size=40), st.integers(300, 3000))
def test_stated_odometer_never_decreases(
        segments: list[tuple[str, int, int, int | None, int | None]], dt: int) -> None:
    cfg = VehicleConfig(record_every_m=500, record_every_ms=5000, ignition_on_debounce_ms=2000,
                        ignition_off_debounce_ms=6000)
    v = Vehicle(cfg)
    mono, wall, seq = 0, W, 0
    stated: list[int] = []
    for what, n, a, odo, dsc in segments:
        if what == "confirm":
            v.confirm(a)
            continue
        if what == "restart":
            v = Vehicle(cfg, json.loads(json.dumps(v.snapshot())))
            mono, wall = 0, wall + 60_000
            continue
        for _ in range(n):
            mono, wall = mono + dt, wall + dt
            s = on(mono, a, odo=odo, dsc=dsc) if what == "on" else off(mono) if what == "off" else lost(mono)
            for r in v.step(s, wall):
                seq += 1
                records.validate(_payload(r, seq))         # every reading is a well-formed record
                if r.kind == "odometer":
                    stated.append(int(r.fields["odo_m"]))  # type: ignore[call-overload]
                elif r.kind == "trip":
                    assert r.fields["start_odo_m"] <= r.fields["end_odo_m"]  # type: ignore[operator]
                    stated.append(int(r.fields["end_odo_m"]))  # type: ignore[call-overload]
    assert stated == sorted(stated)

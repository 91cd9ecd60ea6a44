"""Mileage and ledger exports, on SQLite and PostgreSQL: ``GET /api/vehicles/{vin}/mileage``,
``odo-backend export``, ``vehicles allowance``, ``devices unit``, and the device page in miles."""

from __future__ import annotations

import csv
import datetime
import io
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backend.cli import main
from backend.db import Database
from backend.records import mileage
from backend.web import auth
from backend.web.app import create_app
from backend.web.context import AppContext
from tests import dashboard_seed as seed

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

VIN = "WVWZZZ1JZXW000001"
OTHER = "WBA00000000000002"
NOBODY = "WF0XXXGCDX1234567"


def ms(text: str) -> int:
    return int(datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.UTC).timestamp() * 1000)


def reading(db: Database, device: seed.SeededDevice, when: str, odo_m: int, status: str = "accepted",
            kind: str = "odometer") -> None:
    t = ms(when)
    if kind == "odometer":
        seed.add_record(db, device, "odometer", t, status=status, odo_m=odo_m, src="obd")
    else:
        seed.add_record(db, device, "confirmation", t, status=status, odo_m=odo_m, device_odo_m=odo_m,
                        week="2026-W05")
    with db.write() as tx:
        if status == "accepted" and not tx.insert_ignore("vehicles", {
                "vin": device.vin, "top_odo_m": odo_m, "top_src": "obd", "top_dev": device.dev,
                "top_seq": len(device.records), "updated_at": t}, ("vin",)):
            tx.execute("UPDATE vehicles SET top_odo_m = ? WHERE vin = ? AND top_odo_m < ?",
                       (odo_m, device.vin, odo_m))


@dataclass
class Fleet:
    first: seed.SeededDevice        # the car's first dongle, retired at the end of January
    second: seed.SeededDevice       # its replacement, in the same car
    other: seed.SeededDevice


@pytest.fixture
def fleet(db: Database) -> Fleet:
    first = seed.add_device(db, VIN, "revoked", enrolled_at=ms("2025-12-01"))
    second = seed.add_device(db, VIN, "approved", enrolled_at=ms("2026-01-20"))
    other = seed.add_device(db, OTHER, "approved", enrolled_at=ms("2025-12-01"))
    reading(db, first, "2025-12-31T23:00:00", 9_900_000)                 # before the range
    reading(db, first, "2026-01-01T00:00:00", 10_000_000)                # the first instant of January
    reading(db, first, "2026-01-15T12:00:00", 10_250_000)
    reading(db, first, "2026-01-16T12:00:00", 99_000_000, status="rejected")   # not a reading
    reading(db, first, "2026-01-31T23:59:59.999", 10_400_000)            # the last instant of January
    reading(db, second, "2026-01-25T10:00:00", 10_300_000)               # both dongles read one odometer
    reading(db, second, "2026-02-01T00:00:00", 10_400_500)               # February's first instant
    reading(db, second, "2026-02-10T08:00:00", 10_650_000, kind="confirmation")   # the driver's: not one
    reading(db, second, "2026-02-20T08:00:00", 10_900_000)
    reading(db, other, "2026-02-05T08:00:00", 5_000_000)
    return Fleet(first, second, other)


RANGE = mileage.parse_range("2026-01-01", "2026-04-01")


def test_months_in_utc_two_dongles_once_rejected_ignored(db: Database, fleet: Fleet) -> None:
    with db.read() as tx:
        rows = mileage.vehicle_mileage(tx, VIN, RANGE, "month", "km")
    assert [r["period"] for r in rows] == ["2026-01", "2026-02", "2026-03"]
    jan, feb, mar = rows
    assert jan["period_start"] == "2026-01-01T00:00:00Z" and jan["period_end"] == "2026-02-01T00:00:00Z"
    # January: the readings of both dongles, not the rejected one; from December's last reading
    assert jan["readings"] == 4 and jan["first_odo_m"] == 10_000_000 and jan["last_odo_m"] == 10_400_000
    assert jan["last_reading_at"] == "2026-01-31T23:59:59Z"
    assert jan["distance_m"] == 10_400_000 - 9_900_000 and jan["distance_km"] == "500.000"
    # February: counted from January's highest, once, whichever dongle read it
    assert feb["readings"] == 2 and feb["first_odo_m"] == 10_400_500 and feb["distance_m"] == 500_000
    assert feb["first_reading_at"] == "2026-02-01T00:00:00Z"
    assert mar["readings"] == 0 and mar["distance_m"] == 0 and mar["first_odo_m"] is None
    assert jan["allowance_m"] is None and jan["over_allowance_km"] is None
    # the months add up to the range's distance
    assert sum(r["distance_m"] for r in rows) == 10_900_000 - 9_900_000


def test_a_zone_and_weeks(db: Database, fleet: Fleet) -> None:
    r = mileage.parse_range("2026-01-01T01:00+01:00", "2026-01-31T23:59:59.999Z")
    assert r.start_ms == ms("2026-01-01") and r.end_ms == ms("2026-01-31T23:59:59.999")
    with db.read() as tx:
        (jan,) = mileage.vehicle_mileage(tx, VIN, r, "month", "mi")
        # the 31st's last reading falls outside: from December's 9,900 km to 10,300 km
        assert jan["readings"] == 3 and jan["distance_m"] == 400_000 and jan["distance_mi"] == "248.548"
        weeks = mileage.vehicle_mileage(tx, VIN, mileage.parse_range("2026-01-01", "2026-01-19"), "week",
                                        "km")
    # 2026-01-01 is a Thursday of ISO week 2026-W01, cut to the range
    assert [(w["period"], w["period_start"]) for w in weeks] == [
        ("2026-W01", "2026-01-01T00:00:00Z"), ("2026-W02", "2026-01-05T00:00:00Z"),
        ("2026-W03", "2026-01-12T00:00:00Z")]
    assert weeks[-1]["period_end"] == "2026-01-19T00:00:00Z"


def test_an_allowance_sets_each_month_against_its_share(db: Database, fleet: Fleet,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    url = db.url
    status, out, _ = run(capsys, "vehicles", "allowance", VIN, "--per-year-km", "12000", "--db", url)
    assert status == 0 and "12,000.0 km a year" in out
    status, out, _ = run(capsys, "vehicles", "allowance", VIN, "--per-year-km", "12000", "--db", url)
    assert status == 0 and "already" in out                     # the same twice changes nothing
    with db.read() as tx:
        jan, feb, mar = mileage.vehicle_mileage(tx, VIN, RANGE, "month", "km")
    assert jan["allowance_m"] == 1_000_000 and jan["over_allowance_m"] == -500_000
    assert jan["over_allowance_km"] == "-500.000"
    half = mileage.parse_range("2026-01-01", "2026-01-16T12:00")     # half of January's 31 days
    with db.read() as tx:
        (part,) = mileage.vehicle_mileage(tx, VIN, half, "month", "km")
    assert part["allowance_m"] == 500_000
    # in miles: 7,456.454 mi a year is 11,999,999.506 m: 12,000,000 to the nearest metre
    assert run(capsys, "vehicles", "allowance", VIN, "--per-year-mi", "7456.454", "--db", url)[0] == 0
    assert db.one("SELECT per_year_m, unit FROM vehicle_allowances WHERE vin = ?", (VIN,)) == {
        "per_year_m": 12_000_000, "unit": "mi"}
    for bad in (["--per-year-km", "0"], ["--per-year-km", "1e5"], []):
        assert run(capsys, "vehicles", "allowance", VIN, *bad, "--db", url)[0] == 2, bad
    assert run(capsys, "vehicles", "allowance", "NOT-A-VIN", "--per-year-km", "1", "--db", url)[0] == 2


# -- CSV --------------------------------------------------------------------------------------------

def test_csv_cells_cannot_become_formulas() -> None:
    assert mileage.cell("=HYPERLINK(\"http://x\")") == "'=HYPERLINK(\"http://x\")"
    assert [mileage.cell(v) for v in ("+1", "-1", "@SUM(A1)", "\tx", "plain", None, -5, 0)] == [
        "'+1", "'-1", "'@SUM(A1)", "'\tx", "plain", "", "-5", "0"]
    assert mileage.cell(mileage.Figure("-1.500")) == "-1.500"
    text = "".join(mileage.csv_lines(("a", "b"), [{"a": 'say "hi", then\nleave', "b": "=1+1"}]))
    assert text == 'a,b\r\n"say ""hi"", then\nleave",\'=1+1\r\n'
    assert list(csv.reader(io.StringIO(text))) == [["a", "b"], ['say "hi", then\nleave', "'=1+1"]]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        status = main(list(argv))
    except SystemExit as exc:
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ODO_DB", "ODO_CONFIG", "ODO_DISPLAY_UNIT", "ODO_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)


def test_export_mileage_csv(db: Database, fleet: Fleet, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mileage.csv"
    status, _, err = run(capsys, "export", "mileage", "--from", "2026-01-01", "--to", "2026-03-01",
                         "--format", "csv", "--db", db.url, "--out", str(out))
    assert status == 0, err
    raw = out.read_bytes()
    assert raw.startswith(b"vin,period,period_start,period_end,readings,first_reading_at,first_odo_m,"
                          b"first_odo_km,last_reading_at,last_odo_m,last_odo_km,distance_m,distance_km,"
                          b"allowance_m,allowance_km,over_allowance_m,over_allowance_km\r\n")
    rows = list(csv.DictReader(io.StringIO(raw.decode())))
    assert [(r["vin"], r["period"], r["distance_m"], r["distance_km"]) for r in rows] == [
        (OTHER, "2026-01", "0", "0.000"), (OTHER, "2026-02", "0", "0.000"),
        (VIN, "2026-01", "500000", "500.000"), (VIN, "2026-02", "500000", "500.000")]
    # one vehicle, in its unit: the fleet's display_unit from the config file
    conf = tmp_path / "backend.toml"
    conf.write_text('display_unit = "mi"\n')
    status, text, _ = run(capsys, "export", "mileage", "--from", "2026-01-01", "--to", "2026-02-01",
                          "--vin", VIN, "--db", db.url, "--config", str(conf))
    assert status == 0 and text.splitlines()[0].endswith("over_allowance_m,over_allowance_mi")
    assert text.splitlines()[1].split(",")[11:13] == ["500000", "310.686"]
    # ... or the vehicle's device's own
    assert run(capsys, "devices", "unit", fleet.second.dev, "km", "--db", db.url)[0] == 0
    status, text, _ = run(capsys, "export", "mileage", "--from", "2026-01-01", "--to", "2026-02-01",
                          "--vin", VIN, "--per", "week", "--db", db.url, "--config", str(conf))
    assert status == 0 and "distance_km" in text.splitlines()[0] and len(text.splitlines()) == 1 + 5
    conf.write_text('display_unit = "furlongs"\n')
    status, _, err = run(capsys, "export", "mileage", "--from", "2026-01-01", "--to", "2026-02-01",
                         "--db", db.url, "--config", str(conf))
    assert status == 78 and "display_unit" in err


@pytest.mark.parametrize(("args", "message"), [
    (["--from", "2026-02-01", "--to", "2026-01-01"], "--to: '2026-01-01' is not after"),
    (["--from", "2016-01-01", "--to", "2026-01-02"], "more than ten years"),
    (["--from", "yesterday", "--to", "2026-01-01"], "--from: 'yesterday' is not an ISO 8601"),
    (["--from", "2026-01-01", "--to", "2026-02-01", "--vin", "wvw"], "--vin: 'wvw' is not a VIN"),
    (["--from", "2026-01-01", "--to", "2026-02-01", "--vin", NOBODY], "no vehicle"),
])
def test_export_refuses_bad_input(db: Database, fleet: Fleet, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "never.csv"
    status, _, err = run(capsys, "export", "mileage", *args, "--db", db.url, "--out", str(out))
    assert status == 2 and message in err, err
    assert list(out.parent.iterdir()) == []


def test_export_ledger_csv(db: Database, fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    rec = fleet.second.records[0]
    rows = [
        ("reward:a", "issuer", f"unassigned:{fleet.second.dev}", 10_000, "weekly-confirmation", "acme-1",
         fleet.second.dev, rec.id, "2026-W05", "=cmd|' /C calc'!A0", ms("2026-01-31T23:59:59")),
        ("reward:b", "issuer", "driver:alice", 2_500, "distance", "acme-1", fleet.other.dev, None, "2026-W06",
         "a, \"quoted\"\nmemo", ms("2026-02-01T00:00:00")),
        ("redeem:c", "driver:alice", "redeemed:tyre", 500, None, None, None, None, None, None,
         ms("2026-03-01T00:00:00")),                                     # after the range
    ]
    with db.write() as tx:
        for key, src, dst, amount, rule, version, dev, record_id, week, memo, at in rows:
            tx.execute("INSERT INTO transfers (key, from_account, to_account, amount, rule_id, "
                       "rules_version, dev, record_id, week, memo, created_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (key, src, dst, amount, rule, version, dev, record_id, week, memo, at))
    status, text, err = run(capsys, "export", "ledger", "--from", "2026-01-01", "--to", "2026-03-01",
                            "--format", "csv", "--db", db.url)
    assert status == 0, err
    assert text.split("\r\n")[0] == ("id,created_at,from_account,to_account,amount_milli_tokens,rule_id,"
                                     "rules_version,vin,dev,week,memo,record_id,key")
    got = list(csv.DictReader(io.StringIO(text)))
    assert [(g["key"], g["amount_milli_tokens"], g["vin"], g["created_at"]) for g in got] == [
        ("reward:a", "10000", VIN, "2026-01-31T23:59:59Z"),
        ("reward:b", "2500", OTHER, "2026-02-01T00:00:00Z")]
    assert got[0]["memo"] == "'=cmd|' /C calc'!A0" and got[1]["memo"] == 'a, "quoted"\nmemo'
    assert got[0]["rules_version"] == "acme-1" and got[0]["week"] == "2026-W05"
    assert got[0]["record_id"] == rec.id and got[0]["dev"] == fleet.second.dev
    status, text, _ = run(capsys, "export", "ledger", "--from", "2026-01-01", "--to", "2026-03-01",
                          "--vin", OTHER, "--db", db.url)
    assert status == 0 and [g["key"] for g in csv.DictReader(io.StringIO(text))] == ["reward:b"]


# -- the API ----------------------------------------------------------------------------------------

@pytest.fixture
def client(db: Database, fleet: Fleet) -> Iterator[TestClient]:
    with TestClient(create_app(AppContext(db=db, clock=lambda: seed.NOW, display_unit="mi"))) as c:
        yield c


PATH = f"/api/vehicles/{VIN}/mileage"


def test_api_json_and_csv_agree(client: TestClient) -> None:
    r = client.get(PATH, params={"from": "2026-01-01", "to": "2026-03-01"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["unit"] == "mi" and doc["per"] == "month" and doc["total_distance_m"] == 1_000_000
    assert doc["columns"] == list(mileage.mileage_columns("mi"))
    assert [(p["period"], p["distance_m"], p["distance_mi"]) for p in doc["periods"]] == [
        ("2026-01", 500_000, "310.686"), ("2026-02", 500_000, "310.686")]
    as_csv = client.get(PATH, params={"from": "2026-01-01", "to": "2026-03-01"},
                        headers={"Accept": "text/csv"})
    same = client.get(PATH, params={"from": "2026-01-01", "to": "2026-03-01", "format": "csv"})
    assert as_csv.status_code == 200 and as_csv.headers["content-type"].startswith("text/csv")
    assert as_csv.text == same.text and "attachment" in as_csv.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [{k: (int(v) if k.endswith("_m") or k == "readings" else v) for k, v in row.items() if v != ""}
            for row in rows] == [{k: v for k, v in p.items() if v is not None} for p in doc["periods"]]
    km = client.get(PATH, params={"from": "2026-01-01", "to": "2026-03-01", "unit": "km", "per": "week"})
    assert km.json()["unit"] == "km" and km.json()["periods"][0]["period"] == "2026-W01"


@pytest.mark.parametrize(("path", "params", "status", "message"), [
    ("/api/vehicles/WVW/mileage", {"from": "2026-01-01", "to": "2026-02-01"}, 400, "is not a VIN"),
    ("/api/vehicles/wvwzzz1jzxw000001/mileage", {"from": "2026-01-01", "to": "2026-02-01"}, 400, "VIN"),
    (f"/api/vehicles/{NOBODY}/mileage", {"from": "2026-01-01", "to": "2026-02-01"}, 404, "no vehicle"),
    (PATH, {"to": "2026-02-01"}, 400, "from: required"),
    (PATH, {"from": "2026-01-01", "to": "2026-01-01"}, 400, "is not after"),
    (PATH, {"from": "2016-01-01", "to": "2026-02-01"}, 400, "ten years"),
    (PATH, {"from": "2026-01-01", "to": "x" * 100}, 400, "at most 40 characters"),
    (PATH, {"from": "2026-01-01", "to": "2026-02-01", "per": "day"}, 400, "per: must be month or week"),
    (PATH, {"from": "2026-01-01", "to": "2026-02-01", "unit": "furlong"}, 400, "unit: must be km or mi"),
    (PATH, {"from": "2026-01-01", "to": "2026-02-01", "format": "xml"}, 400, "format"),
    (PATH, {"from": "2026-01-01", "to": "2026-02-01", "form": "csv"}, 400, "unexpected parameters: form"),
])
def test_api_errors(client: TestClient, path: str, params: dict[str, str], status: int, message: str) -> None:
    r = client.get(path, params=params)
    assert r.status_code == status and message in r.json()["error"], r.text


# -- the device page ----------------------------------------------------------------------------------

def test_the_device_page_shows_the_devices_unit(db: Database, fleet: Fleet, client: TestClient,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    auth.add_operator(db, "op", seed.PASSWORD, seed.NOW)
    page = client.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token
    client.post("/login", data={"username": "op", "password": seed.PASSWORD, "csrf": token.group(1),
                                "next": "/"})
    body = client.get(f"/devices/{fleet.second.dev}").text           # the fleet's unit: mi
    assert "Odometer (mi)" in body and "6,772.9 mi" in body and "mi (the fleet's)" in body
    assert "10,900.0 km" not in body
    status, out, _ = run(capsys, "devices", "unit", fleet.second.dev, "km", "--db", db.url)
    assert status == 0 and "figures shown in km" in out
    assert "already" in run(capsys, "devices", "unit", fleet.second.dev, "km", "--db", db.url)[1]
    body = client.get(f"/devices/{fleet.second.dev}").text
    assert "Odometer (km)" in body and "10,900.0 km" in body and "(this device)" in body
    assert run(capsys, "devices", "unit", fleet.second.dev, "default", "--db", db.url)[0] == 0
    row = db.one("SELECT display_unit FROM devices WHERE dev = ?", (fleet.second.dev,))
    assert row == {"display_unit": None}
    status, _, err = run(capsys, "devices", "unit", fleet.second.dev, "miles", "--db", db.url)
    assert status == 2 and "invalid choice" in err
    status, _, err = run(capsys, "devices", "unit", "0" * 32, "km", "--db", db.url)
    assert status == 2 and "no device" in err

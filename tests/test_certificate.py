from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import backend.cli as backend_cli
from protocol import certificate as pc
from protocol import checkpoint, merkle
from protocol.identity import SigningKey, VerifyKey
from protocol.records import Record
from tests.ledger_support import DAY, MONDAY, WEEK, Car, open_db

LOG_KEY = SigningKey.generate()
VIN = "WBA0TEST000000001"
ODO_VERIFY = str(Path(sys.executable).parent / "odo-verify")


# -- pure: a certificate made from values ----------------------------------------------------

def _cert(recs: list[Record], car: Car, *, extra: int = 3, others: tuple[Car, ...] = ()) -> dict[str, Any]:
    """Log the records between unrelated entries, sign a checkpoint, prove each record."""
    entries: list[bytes] = [b"transfer %d" % i for i in range(extra)]
    index = {}
    for r in recs:
        index[r.id] = len(entries)
        entries.append(r.jws.encode("ascii"))
        entries.append(b'{"transfer":%d}' % len(entries))
    leaves = [merkle.leaf_hash(e) for e in entries]
    cp = checkpoint.sign(LOG_KEY, len(leaves), merkle.root(leaves), MONDAY + 30 * DAY)
    listed = [pc.DeviceEntry(c.dev, c.key.public, {"vin": c.vin}) for c in (car, *others)]
    proved = [pc.RecordEntry(r.jws, index[r.id], tuple(merkle.inclusion_proof(index[r.id], leaves)))
              for r in recs]
    return pc.build(VIN, listed, proved, cp.jws, [], MONDAY + 30 * DAY)


def _chain(n: int = 6) -> tuple[Car, list[Record]]:
    car = Car(None, VIN, register=False)  # type: ignore[arg-type]
    recs = []
    for i in range(n):
        t = MONDAY + i * DAY
        recs.append(car.trip(t, 25_000) if i % 3 == 1 else car.confirm(t) if i % 3 == 2 else car.odometer(t))
    return car, recs


def test_a_certificate_made_from_values_verifies() -> None:
    car, recs = _chain()
    proven = pc.verify(pc.encode(_cert(recs, car)), LOG_KEY.public)
    assert proven.vin == VIN and len(proven.records) == 6 and not proven.gaps and not proven.warnings
    assert proven.readings[0].odo_m == 10_000_000 and proven.readings[-1].odo_m == 10_050_000
    assert proven.starts == {car.dev: 1}


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_changing_any_character_of_a_record_proof_or_checkpoint_fails(data: st.DataObject) -> None:
    car, recs = _chain(4)
    cert = _cert(recs, car)
    part = data.draw(st.sampled_from(["record", "proof", "checkpoint"]))
    if part == "record":
        item = cert["records"][data.draw(st.integers(0, 3))]
        item["jws"] = _flip(data, item["jws"], "ABCabc012-_")
    elif part == "proof":
        item = cert["records"][data.draw(st.integers(0, 3))]
        j = data.draw(st.integers(0, len(item["proof"]) - 1))
        item["proof"][j] = _flip(data, item["proof"][j], "0123456789abcdef")
    else:
        cert["checkpoint"] = _flip(data, cert["checkpoint"], "ABCabc012-_")
    with pytest.raises(pc.CertificateError):
        pc.verify(cert, LOG_KEY.public)


def _flip(data: st.DataObject, text: str, alphabet: str) -> str:
    i = data.draw(st.integers(0, len(text) - 1))
    choice = data.draw(st.sampled_from(alphabet))
    if choice == text[i]:
        choice = alphabet[(alphabet.index(choice) + 1) % len(alphabet)]
    return text[:i] + choice + text[i + 1:]


def test_a_broken_chain_is_named() -> None:
    car = Car(None, VIN, register=False)  # type: ignore[arg-type]
    recs = [car.odometer(MONDAY), car.odometer(MONDAY + DAY, prev="ab" * 32), car.odometer(MONDAY + 2 * DAY)]
    with pytest.raises(pc.CertificateError, match=f"record seq 2 of device {car.dev}: chain broken"):
        pc.verify(_cert(recs, car), LOG_KEY.public)


def test_the_odometer_may_not_go_back() -> None:
    car = Car(None, VIN, register=False)  # type: ignore[arg-type]
    recs = [car.odometer(MONDAY, 50_000), car.odometer(MONDAY + DAY, 49_999)]
    with pytest.raises(pc.CertificateError, match="the odometer goes back from 50000 m"):
        pc.verify(_cert(recs, car), LOG_KEY.public)
    # a driver's figure correcting a derived one by less than 2 km is shown, not refused
    car = Car(None, VIN, register=False)  # type: ignore[arg-type]
    recs = [car.odometer(MONDAY, 50_000, src="derived"), car.confirm(MONDAY + DAY, odo_m=48_500,
                                                                     device_odo_m=50_000)]
    proven = pc.verify(_cert(recs, car), LOG_KEY.public)
    assert len(proven.corrections) == 1 and "by 1500 m" in proven.corrections[0]


def test_the_vehicles_odometer_may_not_go_back_across_its_dongles() -> None:
    """A second dongle that reads 1,001 km while the car stands at 50,002 km fails, not warns."""
    first = Car(None, VIN, register=False)  # type: ignore[arg-type]
    second = Car(None, VIN, register=False)  # type: ignore[arg-type]
    recs = [first.odometer(MONDAY, 50_002_000), second.odometer(MONDAY + DAY, 1_001_000)]
    with pytest.raises(pc.CertificateError, match="the vehicle's odometer goes back from 50002000 m"):
        pc.verify(_cert(recs, first, others=(second,)), LOG_KEY.public)
    # a dongle that takes over where the other left off is one vehicle's history
    recs = [first.odometer(MONDAY + 2 * DAY, 50_010_000), second.odometer(MONDAY + 3 * DAY, 50_050_000)]
    proven = pc.verify(_cert(recs, first, others=(second,)), LOG_KEY.public)
    assert {r.dev for r in proven.records} == {first.dev, second.dev}


def test_records_must_be_about_the_vin_and_by_listed_devices() -> None:
    car, recs = _chain(2)
    other = Car(None, "WBA0THER000000002", register=False)  # type: ignore[arg-type]
    with pytest.raises(pc.CertificateError, match="is about VIN WBA0THER000000002"):
        pc.verify(_cert([other.odometer(MONDAY)], other), LOG_KEY.public)
    cert = _cert(recs, car)
    cert["devices"][0]["dev"] = "0" * 32
    with pytest.raises(pc.CertificateError, match="is not the id of its public key"):
        pc.verify(cert, LOG_KEY.public)
    with pytest.raises(pc.CertificateError, match="signed by log key"):
        pc.verify(_cert(recs, car), SigningKey.generate().public)
    with pytest.raises(pc.CertificateError, match="not an odoledger-mileage-certificate"):
        pc.verify(b'{"format": "x"}', LOG_KEY.public)
    with pytest.raises(pc.CertificateError, match="not JSON"):
        pc.verify(b"{", LOG_KEY.public)


# -- from the database, checked by odo-verify as a separate process ---------------------------

def _verify(cert: Path, key: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ODO_VERIFY, str(cert), "--log-key", str(key), *extra], capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.fixture
def issued(db_url: str, tmp_path: Path) -> tuple[Path, Path, Car]:
    db = open_db(db_url)
    car = Car(db, VIN, fleet_token="secret-fleet-token")
    car.store(car.odometer(MONDAY))
    car.store(car.trip(MONDAY + DAY, 42_000))
    rollback = car.sign("odometer", MONDAY + 2 * DAY, odo_m=car.odo_m - 5_000, src="obd")
    car.store(rollback, status="rejected", reason="odometer_rollback")
    car.store(car.confirm(MONDAY + 3 * DAY))
    car.store(car.odometer(MONDAY + 4 * DAY, vin=None))                  # no VIN read: not in the certificate
    car.store(car.confirm(5000, clock="unsynced", week="2026-W03"), t_est=MONDAY + WEEK)   # a clock at 1970
    car.store(car.trip(MONDAY + WEEK + DAY, 120_500))
    other = Car(db, "WBA0THER000000002")                                 # another car's records stay out
    other.store(other.odometer(MONDAY))
    db.close()
    cert, key = tmp_path / "cert.json", tmp_path / "log.pem"
    assert backend_cli.main(["certificate", VIN, "--db", db_url, "--out", str(cert)]) == 0
    assert backend_cli.main(["log-key", "--db", db_url, "--out", str(key)]) == 0
    return cert, key, car


def test_odo_verify_says_what_the_certificate_proves(issued: tuple[Path, Path, Car]) -> None:
    cert, key, car = issued
    assert b"secret-fleet-token" not in cert.read_bytes()
    done = _verify(cert, key)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert f"VERIFIED: mileage certificate for VIN {VIN}" in out
    assert f"device {car.dev}: 5 records, seq 1 to 7" in out
    assert "first reading: 10,000.000 km on 2026-01-05 10:00 UTC" in out
    assert "last reading:  10,162.500 km on 2026-01-13 10:00 UTC" in out
    assert "gap: device" in out and "seq 3 not in the certificate" in out
    assert "rejected: odometer_rollback" in out
    assert "seq 5 not in the certificate" in out and "no VIN was read" in out
    assert "(device clock not synced)" not in out.split("last reading")[1].split("\n")[0]
    proven = pc.verify(cert.read_bytes(), VerifyKey.from_pem(key.read_bytes()))
    assert list(proven.estimates.values()) == [MONDAY + WEEK]
    summary = json.loads(_verify(cert, key, "--json").stdout)
    assert summary["records"] == 5 and summary["last"]["odo_m"] == 10_162_500


def _change(cert: Path, old: str, new: str) -> None:
    text = cert.read_text()
    assert old in text
    cert.write_text(text.replace(old, new, 1))


def _one_char(text: str, i: int) -> str:
    return text[:i] + ("A" if text[i] != "A" else "B") + text[i + 1:]


@pytest.mark.parametrize("part", ["record payload", "record signature", "proof", "checkpoint"])
def test_odo_verify_names_a_changed_byte(issued: tuple[Path, Path, Car], part: str) -> None:
    cert, key, _ = issued
    doc = json.loads(cert.read_text())
    if part.startswith("record"):
        jws = doc["records"][2]["jws"]
        i = jws.index(".") + 20 if part == "record payload" else len(jws) - 10
        _change(cert, jws, _one_char(jws, i))
        expected = "records[2]"
    elif part == "proof":
        h = doc["records"][1]["proof"][0]
        _change(cert, h, ("0" if h[0] != "0" else "1") + h[1:])
        expected = "inclusion proof"
    else:
        cp = doc["checkpoint"]
        _change(cert, cp, _one_char(cp, cp.index(".") + 5))
        expected = "checkpoint"
    done = _verify(cert, key)
    assert done.returncode == 1
    assert done.stdout.startswith("FAILED: ") and expected in done.stdout


def test_odo_verify_usage_errors(issued: tuple[Path, Path, Car], tmp_path: Path) -> None:
    cert, key, _ = issued
    wrong = tmp_path / "wrong.pem"
    wrong.write_bytes(SigningKey.generate().public.to_pem())
    done = _verify(cert, wrong)
    assert done.returncode == 1 and "checkpoint: signed by log key" in done.stdout
    assert _verify(tmp_path / "missing.json", key).returncode == 2
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    done = _verify(cert, garbage)
    assert done.returncode == 2 and "--log-key" in done.stderr
    assert subprocess.run([ODO_VERIFY], capture_output=True, check=False, timeout=60).returncode == 2


def test_no_certificate_without_records(db_url: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    open_db(db_url).close()
    assert backend_cli.main(["certificate", "NOSUCHVIN", "--db", db_url, "--out", str(tmp_path / "c")]) == 2
    assert "no accepted records for VIN NOSUCHVIN" in capsys.readouterr().err

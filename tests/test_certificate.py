"""Mileage certificates v2: log entries with inclusion proofs, a cosigned C2SP checkpoint and
signed annotations; every byte authenticated. Made from values, and from the database and
checked by odo-verify as a separate process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import backend.cli as backend_cli
from protocol import canonical, merkle, messages, note
from protocol import certificate as pc
from protocol.checkpoint import log_verifier, sign_note
from protocol.identity import SigningKey
from protocol.records import Record
from tests.ledger_support import DAY, MONDAY, WEEK, Car, open_db

LOG_KEY = SigningKey.generate()
ORIGIN = "odoledger.test/log"
LOG = log_verifier(ORIGIN, LOG_KEY.public)
WITNESS_KEYS = [SigningKey.generate() for _ in range(3)]
WITNESSES = [note.Verifier(f"witness-{i}.example", note.COSIGNATURE_V1, k.public)
             for i, k in enumerate(WITNESS_KEYS)]
VIN = "WBA0TEST000000001"
ODO_VERIFY = str(Path(sys.executable).parent / "odo-verify")


# -- pure: a certificate made from a log held in memory ---------------------------------------

class Log:
    """A log's entries, and the certificate a backend would issue from them."""

    def __init__(self, unrelated: int = 3) -> None:
        self.entries: list[bytes] = [b"unrelated %d" % i for i in range(unrelated)]
        self.mine: list[int] = []

    def add(self, data: bytes, *, mine: bool = True) -> int:
        self.entries.append(data)
        if mine:
            self.mine.append(len(self.entries) - 1)
        return len(self.entries) - 1

    def enrol(self, car: Car, at: int = MONDAY - WEEK) -> int:
        jws = messages.sign_enrollment(car.key, car.vin, at)
        return self.add(canonical.dumps({"entry": "enrolment", "enrolment": jws, "at": at}))

    def decide(self, action: str, car: Car, at: int = MONDAY - WEEK + 1, *, vin: Any = "car",
               replaces: str | None = None) -> int:
        return self.add(canonical.dumps({"entry": "decision", "action": action, "dev": car.dev,
                                         "vin": car.vin if vin == "car" else vin, "by": "operator:alice",
                                         "at": at, "replaces": replaces}))

    def join(self, car: Car) -> None:
        self.enrol(car)
        self.decide("approve", car)

    def records(self, recs: Sequence[Record]) -> None:
        for r in recs:
            self.add(r.jws.encode("ascii"))
            self.add(b'{"entry":"transfer"}', mine=False)

    def certificate(self, vin: str = VIN, *, witnesses: int = 0, t_est: dict[str, int] | None = None,
                    gaps: Sequence[dict[str, Any]] = (), indexes: Sequence[int] | None = None
                    ) -> dict[str, Any]:
        leaves = [merkle.leaf_hash(e) for e in self.entries]
        size = len(leaves)
        cp = sign_note(LOG_KEY, ORIGIN, size, merkle.root(leaves))
        signed = cp.signed + "".join(
            note.cosign(cp.text, WITNESSES[i].name, WITNESS_KEYS[i], 1_800_000_000 + i).line
            for i in range(witnesses))
        chosen = self.mine if indexes is None else indexes
        entries = [(i, self.entries[i], merkle.inclusion_proof(i, leaves)) for i in chosen]
        annotations = pc.sign_annotations(LOG_KEY, vin, MONDAY + 30 * DAY, size, t_est or {}, gaps)
        return pc.build(vin, ORIGIN, signed, entries, annotations)


def _car(vin: str | None = VIN) -> Car:
    return Car(None, vin, register=False)  # type: ignore[arg-type]


def _chain(n: int = 6) -> tuple[Car, list[Record]]:
    car = _car()
    recs = []
    for i in range(n):
        t = MONDAY + i * DAY
        recs.append(car.trip(t, 25_000) if i % 3 == 1 else car.confirm(t) if i % 3 == 2 else car.odometer(t))
    return car, recs


def _issued(recs: Sequence[Record], *cars: Car, **kw: Any) -> dict[str, Any]:
    log = Log()
    for car in cars:
        log.join(car)
    log.records(recs)
    return log.certificate(**kw)


def test_a_certificate_made_from_log_entries_verifies() -> None:
    car, recs = _chain()
    proven = pc.verify(pc.encode(_issued(recs, car)), LOG)
    assert proven.vin == VIN and len(proven.records) == 6 and not proven.gaps and not proven.warnings
    assert proven.readings[0].odo_m == 10_000_000 and proven.readings[-1].odo_m == 10_050_000
    assert proven.starts == {car.dev: 1}
    (device,) = proven.devices
    assert device.dev == car.dev and device.enrolments[0].enrollment.vin == VIN
    assert [d.action for d in device.decisions] == ["approve"]
    assert proven.checkpoint.origin == ORIGIN and proven.ignored_signatures == 0
    # a bare key (PEM) serves as well: the certificate's origin names the log
    assert pc.verify(pc.encode(_issued(recs, car)), LOG_KEY.public).vin == VIN


def test_a_log_key_of_another_name_or_key_is_refused() -> None:
    car, recs = _chain(2)
    data = pc.encode(_issued(recs, car))
    with pytest.raises(pc.CertificateError, match="the key given is of log 'other.example/log'"):
        pc.verify(data, log_verifier("other.example/log", LOG_KEY.public))
    with pytest.raises(pc.CertificateError, match="checkpoint"):
        pc.verify(data, log_verifier(ORIGIN, SigningKey.generate().public))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_changed_byte_fails(data: st.DataObject) -> None:
    """Any single byte of the file changed (to any other printable byte) fails the certificate,
    or is in a signature line that is reported as ignored."""
    car, recs = _chain(3)
    raw = pc.encode(_issued(recs, car, witnesses=1, t_est={}, gaps=()))
    i = data.draw(st.integers(0, len(raw) - 1))
    b = data.draw(st.integers(0x20, 0x7E).filter(lambda v: v != raw[i]))
    tampered = raw[:i] + bytes([b]) + raw[i + 1:]
    try:
        proven = pc.verify(tampered, LOG, WITNESSES[:1], 1)
    except pc.CertificateError:
        return
    raise AssertionError(f"byte {i} changed to {chr(b)!r} still verifies: {proven.ignored_signatures}")


def test_an_unchecked_cosignature_is_reported_not_trusted() -> None:
    car, recs = _chain(2)
    cert = _issued(recs, car, witnesses=2)
    proven = pc.verify(cert, LOG)
    assert proven.ignored_signatures == 2 and not proven.checkpoint.cosignatures
    proven = pc.verify(cert, LOG, WITNESSES[:2], 2)
    assert len(proven.checkpoint.cosignatures) == 2 and proven.ignored_signatures == 0
    with pytest.raises(pc.CertificateError, match="cosigned by 1 of the known witnesses, 2 needed"):
        pc.verify(_issued(recs, car, witnesses=1), LOG, WITNESSES[:2], 2)
    with pytest.raises(pc.CertificateError, match="cosigned by 0"):
        pc.verify(cert, LOG, WITNESSES[2:], 1)


def test_a_record_must_be_logged_while_its_device_was_approved_for_the_vin() -> None:
    car, recs = _chain(3)
    log = Log()
    log.enrol(car)
    log.records(recs[:1])
    log.decide("approve", car)
    log.records(recs[1:])
    with pytest.raises(pc.CertificateError, match="seq 1 .* logged while its device was never approved"):
        pc.verify(log.certificate(), LOG)
    log = Log()
    log.join(car)
    log.records(recs[:2])
    log.decide("revoke", car, MONDAY + 2 * DAY)
    log.records(recs[2:])
    with pytest.raises(pc.CertificateError, match="record seq 3 .* logged while its device was revoked"):
        pc.verify(log.certificate(), LOG)
    log = Log()
    log.enrol(car)
    log.decide("approve", car, vin="WBA0THER000000002")
    log.records(recs)
    with pytest.raises(pc.CertificateError, match="approved for VIN WBA0THER000000002"):
        pc.verify(log.certificate(), LOG)
    # a cleared flag does not end an approval
    log = Log()
    log.join(car)
    log.decide("clear", car, MONDAY)
    log.records(recs)
    assert len(pc.verify(log.certificate(), LOG).records) == 3


def test_every_record_needs_its_devices_logged_enrolment() -> None:
    car, recs = _chain(2)
    log = Log()
    log.records(recs)
    with pytest.raises(pc.CertificateError, match="whose enrolment the certificate does not hold"):
        pc.verify(log.certificate(), LOG)
    log = Log()
    log.decide("approve", car)
    log.records(recs)
    with pytest.raises(pc.CertificateError, match="a decision on device"):
        pc.verify(log.certificate(), LOG)
    # an enrolment signed by another key than the one it names
    log = Log()
    other = SigningKey.generate()
    forged = messages.sign_enrollment(other, VIN, 1)
    head, body, sig = forged.split(".")
    real = messages.sign_enrollment(car.key, VIN, 1).split(".")
    log.add(canonical.dumps({"entry": "enrolment", "enrolment": ".".join([real[0], real[1], sig]), "at": 1}))
    log.decide("approve", car)
    log.records(recs)
    with pytest.raises(pc.CertificateError, match="enrolment does not verify"):
        pc.verify(log.certificate(), LOG)


def test_a_replacement_dongle_carries_on_the_vehicles_history() -> None:
    first, second = _car(), _car()
    log = Log()
    log.join(first)
    a = [first.odometer(MONDAY, 50_002_000), first.odometer(MONDAY + DAY, 50_010_000)]
    log.records(a)
    log.enrol(second, MONDAY + 2 * DAY)
    log.decide("retire", first, MONDAY + 2 * DAY)
    log.decide("approve", second, MONDAY + 2 * DAY, replaces=first.dev)
    b = [second.odometer(MONDAY + 3 * DAY, 50_050_000)]
    log.records(b)
    proven = pc.verify(log.certificate(), LOG)
    assert [d.dev for d in proven.devices] == sorted([first.dev, second.dev])
    late = first.odometer(MONDAY + 4 * DAY, 50_060_000)       # the retired one signs on: refused
    log.records([late])
    with pytest.raises(pc.CertificateError, match="while its device was retired"):
        pc.verify(log.certificate(), LOG)


def test_the_vehicles_odometer_may_not_go_back_across_its_dongles() -> None:
    first, second = _car(), _car()
    recs = [first.odometer(MONDAY, 50_002_000), second.odometer(MONDAY + DAY, 1_001_000)]
    with pytest.raises(pc.CertificateError, match="the vehicle's odometer goes back from 50002000 m"):
        pc.verify(_issued(recs, first, second), LOG)


def test_a_broken_chain_and_a_rollback_are_named() -> None:
    car = _car()
    recs = [car.odometer(MONDAY), car.odometer(MONDAY + DAY, prev="ab" * 32), car.odometer(MONDAY + 2 * DAY)]
    with pytest.raises(pc.CertificateError, match=f"record seq 2 of device {car.dev}: chain broken"):
        pc.verify(_issued(recs, car), LOG)
    car = _car()
    recs = [car.odometer(MONDAY, 50_000), car.odometer(MONDAY + DAY, 49_999)]
    with pytest.raises(pc.CertificateError, match="the odometer goes back from 50000 m"):
        pc.verify(_issued(recs, car), LOG)
    car = _car()
    recs = [car.odometer(MONDAY, 50_000, src="derived"), car.confirm(MONDAY + DAY, odo_m=48_500,
                                                                     device_odo_m=50_000)]
    proven = pc.verify(_issued(recs, car), LOG)
    assert len(proven.corrections) == 1 and "by 1500 m" in proven.corrections[0]


def test_the_annotations_are_signed_for_this_checkpoint_and_these_records() -> None:
    car = _car()
    recs = [car.odometer(MONDAY), car.odometer(5000, clock="unsynced"), car.odometer(MONDAY + 2 * DAY)]
    gaps = [{"dev": car.dev, "seq": 9, "note": "rejected: odometer_rollback"}]
    proven = pc.verify(_issued(recs, car, t_est={recs[1].id: MONDAY + DAY}, gaps=gaps), LOG)
    assert proven.estimates == {recs[1].id: MONDAY + DAY} and proven.issued_at == MONDAY + 30 * DAY
    with pytest.raises(pc.CertificateError, match="not a record of this certificate with an unsynced clock"):
        pc.verify(_issued(recs, car, t_est={recs[0].id: MONDAY}), LOG)
    cert = _issued(recs, car, t_est={recs[1].id: MONDAY + DAY})
    cert["annotations"]["t_est"][recs[1].id] += 1
    with pytest.raises(pc.CertificateError, match="annotations: the log key's signature does not verify"):
        pc.verify(cert, LOG)
    cert = _issued(recs, car)
    cert["annotations"] = pc.sign_annotations(LOG_KEY, VIN, 1, 2, {}, [])
    with pytest.raises(pc.CertificateError, match="made for a checkpoint of 2 entries"):
        pc.verify(cert, LOG)
    cert = _issued(recs, car)
    size = cert["annotations"]["size"]
    cert["annotations"] = pc.sign_annotations(LOG_KEY, "WBA0THER000000002", 1, size, {}, [])
    with pytest.raises(pc.CertificateError, match="made for VIN WBA0THER000000002"):
        pc.verify(cert, LOG)


def test_malformed_certificates_are_refused_naming_what() -> None:
    car, recs = _chain(2)
    for change, match in (
        (lambda c: c.update(extra=1), "unknown member"),
        (lambda c: c["entries"][0].update(note="x"), "unknown member"),
        (lambda c: c["entries"].reverse(), "ascending index order"),
        (lambda c: c["entries"][0]["proof"].__setitem__(0, c["entries"][0]["proof"][0].upper()),
         "lowercase hex"),
        (lambda c: c["entries"][0].update(index=10**6), "outside the checkpoint"),
        (lambda c: c.update(vin="WBA0THER000000002"), "is about VIN WBA0TEST000000001"),
        (lambda c: c.update(v=1), "version 2"),
        (lambda c: c["log"].update(origin="other.example/log"), "of log"),
    ):
        cert = _issued(recs, car)
        change(cert)
        with pytest.raises(pc.CertificateError, match=match):
            pc.verify(cert, LOG_KEY.public)
    with pytest.raises(pc.CertificateError, match="not JSON"):
        pc.verify(b"{", LOG)
    rewritten = json.dumps(_issued(recs, car)).encode()
    with pytest.raises(pc.CertificateError, match="not in its one encoding"):
        pc.verify(rewritten, LOG)


def test_a_certificate_holds_only_its_vehicles_kinds_of_entry() -> None:
    car, recs = _chain(2)
    log = Log()
    log.join(car)
    log.records(recs)
    log.add(b'{"entry":"transfer"}')
    with pytest.raises(pc.CertificateError, match="a 'transfer' entry, which a certificate does not hold"):
        pc.verify(log.certificate(), LOG)
    log = Log()
    log.join(car)
    log.records(recs)
    log.add(b'{"entry": "decision"}')
    with pytest.raises(pc.CertificateError, match="not in canonical JSON"):
        pc.verify(log.certificate(), LOG)


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
    cert, key = tmp_path / "cert.json", tmp_path / "log.vkey"
    assert backend_cli.main(["certificate", VIN, "--db", db_url, "--out", str(cert)]) == 0
    assert backend_cli.main(["log-key", "--db", db_url, "--out", str(key)]) == 0
    assert backend_cli.main(["log-key", "--db", db_url, "--out", str(tmp_path / "log.pem"), "--pem"]) == 0
    return cert, key, car


def test_odo_verify_says_what_the_certificate_proves(issued: tuple[Path, Path, Car]) -> None:
    cert, key, car = issued
    assert b"secret-fleet-token" not in cert.read_bytes()
    done = _verify(cert, key, VIN)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert f"VERIFIED: mileage certificate for VIN {VIN}" in out
    assert f"device {car.dev}: enrolled (signed by its own key) for VIN {VIN}" in out
    assert "approve for VIN" in out and "by fleet-token" in out
    assert "5 records, seq 1 to 7" in out
    assert "first reading: 10,000.000 km on 2026-01-05 10:00 UTC" in out
    assert "last reading:  10,162.500 km on 2026-01-13 10:00 UTC" in out
    proven_part, _, word = out.partition("not proven (the backend's word)")
    assert "gap: device" in word and "seq 3 not in the certificate" in word
    assert "rejected: odometer_rollback" in word and "no VIN was read" in word
    assert "that the log holds no later entries for this VIN" in out
    summary = json.loads(_verify(cert, key, "--json").stdout)
    assert summary["records"] == 5 and summary["last"]["odo_m"] == 10_162_500
    assert summary["checkpoint"]["origin"] == key.read_text().split("+")[0]
    # the PEM form of the key serves too; a certificate for another VIN than the car's does not
    assert _verify(cert, cert.parent / "log.pem").returncode == 0
    other = _verify(cert, key, "WBA0THER000000002")
    assert other.returncode == 1 and f"is for VIN {VIN}, not WBA0THER000000002" in other.stdout


@pytest.mark.parametrize("part", ["record", "proof", "checkpoint", "enrolment", "annotations", "space"])
def test_odo_verify_names_a_changed_byte(issued: tuple[Path, Path, Car], part: str) -> None:
    cert, key, _ = issued
    text = cert.read_text()
    doc = json.loads(text)
    records = [e for e in doc["entries"] if not e["leaf"].startswith("{")]
    if part == "record":
        old = records[2]["leaf"]
        new = old[:old.index(".") + 20] + ("A" if old[old.index(".") + 20] != "A" else "B") + \
            old[old.index(".") + 21:]
        expected = "not included in the checkpoint"
    elif part == "proof":
        old = records[1]["proof"][0]
        new = ("0" if old[0] != "0" else "1") + old[1:]
        expected = "not included in the checkpoint"
    elif part == "checkpoint":
        old = doc["log"]["checkpoint"]
        new = old.replace("\n", "\n ", 1)
        expected = "checkpoint"
    elif part == "enrolment":
        old = next(e["leaf"] for e in doc["entries"] if '"enrolment"' in e["leaf"])
        new = old.replace('"at":', '"at":1', 1)
        expected = "not included in the checkpoint"
    elif part == "annotations":
        old = f'"issued_at": {doc["annotations"]["issued_at"]}'
        new = f'"issued_at": {doc["annotations"]["issued_at"] + 1}'
        expected = "annotations: the log key's signature does not verify"
    else:
        old, new = '"format": ', '"format":  '
        expected = "not in its one encoding"
    if part not in ("space", "annotations"):            # a string's content, as the file escapes it
        old, new = json.dumps(old)[1:-1], json.dumps(new)[1:-1]
    assert old in text
    cert.write_text(text.replace(old, new, 1))
    done = _verify(cert, key)
    assert done.returncode == 1, done.stdout
    assert done.stdout.startswith("FAILED: ") and expected in done.stdout


def test_odo_verify_usage_errors(issued: tuple[Path, Path, Car], tmp_path: Path) -> None:
    cert, key, _ = issued
    wrong = tmp_path / "wrong.pem"
    wrong.write_bytes(SigningKey.generate().public.to_pem())
    done = _verify(cert, wrong)
    assert done.returncode == 1 and "FAILED: checkpoint" in done.stdout
    assert _verify(tmp_path / "missing.json", key).returncode == 2
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    done = _verify(cert, garbage)
    assert done.returncode == 2 and "--log-key" in done.stderr
    done = _verify(cert, key, "--quorum", "1")
    assert done.returncode == 2 and "--quorum 1" in done.stderr
    done = _verify(cert, key, "NOT-A-VIN")
    assert done.returncode == 2 and "VIN 'NOT-A-VIN'" in done.stderr
    assert subprocess.run([ODO_VERIFY], capture_output=True, check=False, timeout=60).returncode == 2


def test_no_certificate_without_records(db_url: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    open_db(db_url).close()
    assert backend_cli.main(["certificate", "NOSUCHVIN", "--db", db_url, "--out", str(tmp_path / "c")]) == 2
    assert "no accepted records for VIN NOSUCHVIN" in capsys.readouterr().err

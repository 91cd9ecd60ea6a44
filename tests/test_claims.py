"""Claiming a car with a pairing code: the codes and claims (backend.ledger.claims), the claim
message (protocol.messages, backend.records.claims_mqtt), ``odo-backend drivers end``, and the
whole flow on real parts: the code typed on the dongle's page, the assignment in the backend."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from backend.db import Database
from backend.errors import (
    AssignmentError,
    ClaimConflict,
    ClaimDeviceError,
    ExpiredCode,
    TooManyClaims,
    UnknownCode,
    UsedCode,
)
from backend.ledger import assignments, claims
from backend.records import claims_mqtt
from common.clock import now_ms
from protocol import b64, canonical, jws, messages
from protocol.errors import BadFormat
from protocol.identity import SigningKey
from sim.processes import ROOT
from tests.claim_support import VIN, claim_stack
from tests.e2e_support import left_running, wait_until

NOW = 1_780_000_000_000
VIN2 = "WVWZZZ1JZXW000032"


def device(db: Database, status: str = "approved", vin: str | None = VIN) -> SigningKey:
    key = SigningKey.generate()
    with db.write() as tx:
        tx.execute("INSERT INTO devices (dev, pub, vin, status, enrollment, enrolled_at) "
                   "VALUES (?, ?, ?, ?, ?, ?)", (key.public.id, key.public.raw, vin, status, "-", NOW))
    return key


def drivers(db: Database, *names: str) -> None:
    for name in names:
        assignments.add_driver(db, name, None, NOW)


def rows(db: Database, vin: str = VIN) -> list[tuple[str, int, int | None]]:
    return [(r["driver_id"], int(r["valid_from"]), r["valid_to"])
            for r in db.query("SELECT * FROM assignments WHERE vin = ? ORDER BY id", (vin,))]


# -- codes and claims ------------------------------------------------------------------------------

def test_a_code_claims_once_and_the_same_claim_again_is_the_first_result(db: Database) -> None:
    drivers(db, "alice")
    key = device(db)
    code = claims.pairing_code(db, "alice", NOW)
    assert re.fullmatch(r"[2-9A-HJKMNP-TV-Z]{4}-[2-9A-HJKMNP-TV-Z]{4}", code)
    assert code.replace("-", "") not in str(db.query("SELECT * FROM claim_codes"))     # only its hash
    typed = " " + code.lower().replace("-", " - ") + " "
    first = claims.claim(db, key.public.id, typed, NOW + 1000)
    assert (first.driver_id, first.vin, first.valid_from, first.created, first.repeat) == \
        ("alice", VIN, NOW + 1000, True, False)
    again = claims.claim(db, key.public.id, code, NOW + 5000)
    assert again.repeat and (again.driver_id, again.vin, again.valid_from) == ("alice", VIN, NOW + 1000)
    assert rows(db) == [("alice", NOW + 1000, None)]
    other = device(db, vin=VIN2)
    with pytest.raises(UsedCode, match="used at .* by another device"):
        claims.claim(db, other.public.id, code, NOW + 6000)
    assert rows(db, VIN2) == []


def test_expired_wrong_and_replaced_codes_are_refused(db: Database) -> None:
    drivers(db, "alice")
    dev = device(db).public.id
    old = claims.pairing_code(db, "alice", NOW)
    with pytest.raises(ExpiredCode, match="ended at"):
        claims.claim(db, dev, old, NOW + claims.CODE_TTL_MS)
    newer = claims.pairing_code(db, "alice", NOW + 1)
    replaced = claims.pairing_code(db, "alice", NOW + 2)
    with pytest.raises(ExpiredCode):
        claims.claim(db, dev, newer, NOW + 3)              # a newer code of the driver ended it
    with pytest.raises(UnknownCode, match="no such pairing code"):
        claims.claim(db, dev, "2345-6789", NOW + 4)
    with pytest.raises(UnknownCode):
        claims.claim(db, dev, "not a code at all", NOW + 4)
    assert rows(db) == []
    assert claims.claim(db, dev, replaced, NOW + 5).driver_id == "alice"


def test_wrong_codes_lock_the_device_out_for_a_while(db: Database) -> None:
    drivers(db, "alice")
    dev = device(db).public.id
    for i in range(claims.MAX_FAILURES):
        with pytest.raises(UnknownCode):
            claims.claim(db, dev, "2345-6789", NOW + i)
    good = claims.pairing_code(db, "alice", NOW + 10)
    with pytest.raises(TooManyClaims, match="no claim before"):
        claims.claim(db, dev, good, NOW + 10)               # even the right code, in the window
    assert rows(db) == []
    assert claims.claim(db, dev, good, NOW + claims.FAILURE_WINDOW_MS).driver_id == "alice"


def test_a_claim_while_another_drivers_runs_is_refused_until_it_ends(db: Database) -> None:
    drivers(db, "alice", "bob")
    dev = device(db).public.id
    claims.claim(db, dev, claims.pairing_code(db, "alice", NOW), NOW + 1000)
    bobs = claims.pairing_code(db, "bob", NOW + 2000)
    with pytest.raises(ClaimConflict, match=f"{VIN} is alice's from .*must end first "
                                            f"\\(odo-backend drivers end alice --vin {VIN}\\)"):
        claims.claim(db, dev, bobs, NOW + 3000)
    assert rows(db) == [("alice", NOW + 1000, None)]
    ended = claims.end(db, "alice", VIN, NOW + 4000, NOW + 4000)
    assert ended.changed and ended.valid_to == NOW + 4000
    assert claims.claim(db, dev, bobs, NOW + 5000).driver_id == "bob"     # the refusal left it unused
    assert rows(db) == [("alice", NOW + 1000, NOW + 4000), ("bob", NOW + 5000, None)]
    # an operator's assignment counts the same
    assignments.assign(db, "alice", VIN2, NOW, NOW)
    with pytest.raises(ClaimConflict, match="alice's"):
        claims.claim(db, device(db, vin=VIN2).public.id, claims.pairing_code(db, "bob", NOW + 6000),
                     NOW + 6000)


def test_the_driver_who_has_the_car_claims_it_again_without_a_new_assignment(db: Database) -> None:
    drivers(db, "alice")
    dev = device(db).public.id
    claims.claim(db, dev, claims.pairing_code(db, "alice", NOW), NOW + 1000)
    again = claims.claim(db, dev, claims.pairing_code(db, "alice", NOW + 2000), NOW + 3000)
    assert (again.created, again.repeat, again.valid_from) == (False, False, NOW + 1000)
    assert rows(db) == [("alice", NOW + 1000, None)]


@pytest.mark.parametrize(("status", "vin"), [("revoked", VIN), ("pending", VIN), ("retired", VIN),
                                             ("approved", None)])
def test_a_device_not_approved_for_a_vin_cannot_claim(db: Database, status: str, vin: str | None) -> None:
    drivers(db, "alice")
    dev = device(db, status, vin).public.id
    code = claims.pairing_code(db, "alice", NOW)
    with pytest.raises(ClaimDeviceError):
        claims.claim(db, dev, code, NOW + 1)
    with pytest.raises(ClaimDeviceError, match="unknown"):
        claims.claim(db, "0" * 32, code, NOW + 1)
    assert db.query("SELECT * FROM assignments") == []
    assert db.one("SELECT used_at FROM claim_codes") == {"used_at": None}


def test_end_twice_changes_nothing_and_end_is_bounded(db: Database) -> None:
    drivers(db, "alice")
    with pytest.raises(AssignmentError, match="not assigned"):
        claims.end(db, "alice", VIN, NOW, NOW)
    assignments.assign(db, "alice", VIN, NOW, NOW)
    with pytest.raises(AssignmentError, match="later than now"):
        claims.end(db, "alice", VIN, NOW + 2000, NOW + 1000)
    with pytest.raises(AssignmentError, match="not assigned"):
        claims.end(db, "alice", VIN, NOW, NOW + 1000)           # it starts then: nothing to end
    assert claims.end(db, "alice", VIN, NOW + 500, NOW + 1000).changed
    assert not claims.end(db, "alice", VIN, NOW + 500, NOW + 2000).changed
    assert rows(db) == [("alice", NOW, NOW + 500)]


def test_drivers_end_on_the_command_line(db_url: str) -> None:
    db = Database.open(db_url)
    db.migrate()
    drivers(db, "alice")
    assignments.assign(db, "alice", VIN, NOW, NOW)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "backend.cli", "drivers", *args, "--db", db_url],
                              cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)

    done = cli("end", "alice", "--vin", VIN, "--at", "2026-05-28T21:00:00Z")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"alice drives {VIN} from 2026-05-28T20:26:40Z to 2026-05-28T21:00:00Z\n"
    assert rows(db) == [("alice", NOW, NOW + 2_000_000)]
    again = cli("end", "alice", "--vin", VIN, "--at", "2026-05-28T21:00:00Z")
    assert again.returncode == 0 and "ended then already" in again.stdout
    bad = cli("end", "alice", "--vin", VIN, "--at", "yesterday")
    assert bad.returncode == 2 and "--at: 'yesterday' is not an ISO 8601" in bad.stderr
    gone = cli("end", "bob", "--vin", VIN)
    assert gone.returncode == 2 and "bob is not assigned to" in gone.stderr
    db.close()


# -- the claim message -----------------------------------------------------------------------------

def test_a_signed_claim_through_the_handler(db: Database) -> None:
    drivers(db, "alice")
    key = device(db)
    body = messages.sign_claim(key, claims.pairing_code(db, "alice", NOW), NOW).encode()
    result = claims_mqtt.handle(db, key.public.id, body, NOW + 2000)
    assert result == messages.ClaimResult(messages.claim_id(body.decode()), "claimed", None, "alice", VIN,
                                          NOW + 2000)
    assert messages.decode_claim_result(messages.encode_claim_result(result)) == result
    assert claims_mqtt.handle(db, key.public.id, body, NOW + 9000) == result       # the same claim again
    assert rows(db) == [("alice", NOW + 2000, None)]


def forged(key: SigningKey, payload: dict[str, object], kid: str | None = None) -> bytes:
    return jws.sign(canonical.dumps(payload), key, kid or key.public.id).encode()


def test_forged_and_misaddressed_claims_are_refused(db: Database) -> None:
    drivers(db, "alice")
    key, other = device(db), device(db, vin=VIN2)
    dev = key.public.id
    code = claims.pairing_code(db, "alice", NOW).replace("-", "")

    def reason(body: bytes, topic_dev: str = dev, now: int = NOW) -> str | None:
        got = claims_mqtt.handle(db, topic_dev, body, now)
        assert got.status == "refused" and got.id == hashlib.sha256(body).hexdigest()
        return got.reason

    stranger = SigningKey.generate()
    assert reason(forged(stranger, {"v": 1, "dev": dev, "code": code, "t": NOW}, kid=dev)) == "bad_signature"
    assert reason(forged(other, {"v": 1, "dev": other.public.id, "code": code, "t": NOW})) == "bad_format"
    assert reason(forged(key, {"v": 1, "dev": other.public.id, "code": code, "t": NOW})) == "bad_format"
    assert reason(forged(key, {"v": 1, "dev": dev, "code": code, "t": NOW, "vin": VIN})) == "bad_format"
    assert reason(forged(key, {"v": 1, "dev": dev, "code": code.lower(), "t": NOW})) == "bad_format"
    assert reason(forged(key, {"v": 1, "dev": dev, "code": code, "t": -1})) == "bad_format"
    assert reason(b"x" * (messages.MAX_CLAIM_BYTES + 1)) == "bad_format"
    assert reason(b"\xff\xfe") == "bad_format"
    skewed = forged(key, {"v": 1, "dev": dev, "code": code, "t": NOW - claims_mqtt.CLAIM_SKEW_MS - 1})
    assert reason(skewed) == "clock_off"
    assert reason(forged(key, {"v": 1, "dev": dev, "code": "2345ABCD", "t": NOW})) == "unknown_code"
    revoked = device(db, "revoked")
    refused = reason(messages.sign_claim(revoked, code, NOW).encode(), revoked.public.id)
    assert refused == "device_not_approved"
    assert db.query("SELECT * FROM assignments") == []
    assert db.one("SELECT used_at FROM claim_codes") == {"used_at": None}


def test_claim_messages_are_parsed_strictly() -> None:
    key = SigningKey.generate()
    with pytest.raises(ValueError, match="pairing code"):
        messages.sign_claim(key, "ABC", NOW)
    signed = messages.sign_claim(key, "abcd efgh", NOW)
    claim = messages.verify_claim(signed.encode(), key.public)
    assert (claim.dev, claim.code, claim.t) == (key.public.id, "ABCDEFGH", NOW)
    assert "ABCDEFGH" not in repr(claim)
    with pytest.raises(BadFormat, match="kid"):
        messages.verify_claim(signed.encode(), SigningKey.generate().public)
    assert messages.normalise_claim_code("ab-cd ef-gh") == "ABCDEFGH"
    assert messages.normalise_claim_code("ABCDEFG0") is None              # 0 is not in the alphabet
    assert messages.normalise_claim_code("A" * 40) is None
    with pytest.raises(BadFormat, match="unknown members"):
        messages.decode_claim_result(b'{"claim":{"id":"' + b"a" * 64 + b'","status":"claimed","reason":null,'
                                     b'"driver":null,"vin":null,"from":null,"extra":1}}')
    with pytest.raises(BadFormat):
        messages.decode_claim_result(b'{"claim":{"id":"short","status":"claimed","reason":null,'
                                     b'"driver":null,"vin":null,"from":null}}')
    assert b64.decode(signed.split(".")[1], "p").startswith(b'{"code":"ABCDEFGH"')


# -- the whole flow --------------------------------------------------------------------------------

def post_claim(url: str, code: str, cookie: str) -> tuple[int, str]:
    page = page_of(url, cookie)
    token = re.search(r'name="token" value="([^"]+)"', page)
    assert token is not None
    body = urllib.parse.urlencode({"code": code, "token": token.group(1)}).encode()
    req = urllib.request.Request(url + "/claim", data=body, method="POST", headers={
        "Content-Type": "application/x-www-form-urlencoded", "Origin": url, "Cookie": cookie})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:     # follows the 303 to the page
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_code_typed_on_the_dongles_page_assigns_the_driver(tmp_path: Path, db_url: str) -> None:
    with claim_stack(tmp_path / "stack", db_url) as cs:
        stack, car, db = cs.stack, cs.car, cs.db
        status, page = post_claim(cs.ui_url, "not-a-code", cs.ui_cookie)
        assert status == 400 and "pairing code is 8 letters and digits" in page
        code = claims.pairing_code(db, "alice", now_ms())
        status, page = post_claim(cs.ui_url, code.lower(), cs.ui_cookie)
        assert status == 200 and 'id="claim-status"' in page
        assignment = wait_until("the claim in the backend", lambda: db.query(
            "SELECT * FROM assignments WHERE vin = ?", (VIN,)), timeout=30)
        assert [a["driver_id"] for a in assignment] == ["alice"]
        shown = wait_until("the answer on the page", lambda: "This car is alice's" in (
            p := page_of(cs.ui_url, cs.ui_cookie)) and p, timeout=20)
        assert "This car is alice" in shown
        # credits after the claim go to the claiming driver
        odo = wait_until("an odometer figure", lambda: stack.status(car)["odo_m"])
        done = stack.agent_cli(car, "confirm", "--km", f"{odo / 1000:.1f}", "--yes")
        assert done.returncode == 0, done.stderr
        wallet = wait_until("the confirmation credited to alice", lambda: (
            w := stack.api("/api/wallets/driver:alice"))["balance"] >= 10000 and w, timeout=30)
        assert "weekly-confirmation" in [t["rule_id"] for t in wallet["transfers"]], wallet
        assert db.query("SELECT key FROM transfers WHERE to_account = ? AND rule_id = 'weekly-confirmation'",
                        (f"unassigned:{car.dev}",)) == []
        # the same code again from the page: nothing new
        post_claim(cs.ui_url, code, cs.ui_cookie)
        wait_until("the second answer", lambda: "This car is alice's" in page_of(cs.ui_url, cs.ui_cookie),
                   timeout=20)
        assert len(db.query("SELECT * FROM assignments WHERE vin = ?", (VIN,))) == 1
    assert left_running(tmp_path) == []


def page_of(url: str, cookie: str) -> str:
    req = urllib.request.Request(url + "/", headers={"Cookie": cookie})
    with urllib.request.urlopen(req, timeout=10) as r:
        return str(r.read().decode())

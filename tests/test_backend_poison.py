"""One bad item never stalls the batch beside it, and refused content is kept within a budget
(on SQLite and PostgreSQL, through the store's own entry point)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from backend.db import Database
from backend.records import evidence, store
from backend.records.evidence import EvidenceLimits
from protocol import b64, canonical
from protocol.messages import Ack
from sim.devices import T0, Dongle, batch, enroll, fresh_vin

NOW = T0 + 86_400_000


def scalar(db: Database, sql: str, params: tuple[Any, ...] = ()) -> Any:
    with db.read() as tx:
        return tx.scalar(sql, params)


def signed_raw(d: Dongle, payload_bytes: bytes) -> str:
    """A JWS that ``d`` really signed over ``payload_bytes``, whatever they hold."""
    header = b64.encode(json.dumps({"alg": "Ed25519", "kid": d.dev}, separators=(",", ":")).encode())
    signing_input = f"{header}.{b64.encode(payload_bytes)}"
    return f"{signing_input}.{b64.encode(d.key.sign(signing_input.encode('ascii')))}"


def poison(d: Dongle, **over: Any) -> str:
    """The next record of ``d`` with fields overridden beyond what the format allows; signed."""
    p = {"v": 1, **d.payload("odometer", {"odo_m": d.odo_m, "src": "obd"}, dt_ms=0), **over}
    return signed_raw(d, json.dumps(p, sort_keys=True, separators=(",", ":")).encode())


POISONS = {
    "seq beyond 2^63": lambda d: poison(d, seq=2**63 + 5),
    "seq of 2^53": lambda d: poison(d, seq=2**53),
    "a 5000-digit integer": lambda d: signed_raw(
        d, canonical.dumps(dict(d.payload("odometer", {"src": "obd"}, dt_ms=0), v=1))[:-1]
        + b',"odo_m":' + b"7" * 5000 + b"}"),
    "990-deep nesting": lambda d: signed_raw(d, b'{"a":' + b"[" * 990 + b"]" * 990 + b"}"),
    "t past the year 9999": lambda d: poison(d, t=253_402_300_800_000),
    "an odometer of 10^10 m": lambda d: poison(d, odo_m=10**10),
    "a VIN with a newline": lambda d: poison(d, vin="WVWZZZ1JZXW000001\n"),
    "a lower-case VIN": lambda d: poison(d, vin="wvwzzz1jzxw000001"),
    "not a string": lambda d: 12345,
    "garbage": lambda d: "\u00ff" * 100,
}


@pytest.mark.parametrize("kind", sorted(POISONS))
def test_a_poison_record_is_its_own_bad_format_and_the_rest_is_decided(
        db: Database, rules: Any, kind: str) -> None:
    d = Dongle()
    enroll(db, d)
    first = d.odometer(1)
    bad = POISONS[kind](d)
    rest = [d.odometer(1), d.odometer(1)]
    body = json.dumps({"records": [first.jws, bad, *(r.jws for r in rest)]}).encode()
    ack = store.process_batch(db, rules, d.dev, body, NOW).ack
    assert ack.through == 3, ack
    assert [r.reason for r in ack.rejected] == ["bad_format"]
    assert ack.rejected[0].seq is None or 1 <= ack.rejected[0].seq < 2**53
    stored = db.query("SELECT seq FROM records WHERE dev = ? ORDER BY seq", (d.dev,))
    assert [r["seq"] for r in stored] == [1, 2, 3]


def test_refused_content_is_kept_within_each_devices_budget(db: Database, rules: Any) -> None:
    d, other = Dongle(), Dongle(vin=fresh_vin())
    enroll(db, d)
    enroll(db, other)
    limits = EvidenceLimits(per_device=3, per_device_bytes=10_000, unknown=2, unknown_bytes=10_000)
    for i in range(10):
        ack = store.process_batch(db, rules, d.dev, batch(f"not-a-record-{i}"), NOW, limits).ack
        assert ack == Ack(0, ack.rejected, ack.balance) and ack.rejected[0].reason == "bad_format"
    with db.read() as tx:
        kept = evidence.budget(tx, d.dev)
    assert (kept["kept"], kept["dropped"]) == (3, 7) and kept["kept_bytes"] > 0
    assert scalar(db, "SELECT COUNT(*) FROM rejections WHERE dev = ?", (d.dev,)) == 3
    # another device's budget is its own: it is still kept, and its records still count
    ack = store.process_batch(db, rules, other.dev, batch("junk", other.odometer(1)), NOW, limits).ack
    assert ack.through == 1 and [r.reason for r in ack.rejected] == ["bad_format"]
    assert scalar(db, "SELECT COUNT(*) FROM rejections WHERE dev = ?", (other.dev,)) == 1
    # the same content again is kept once and costs no budget
    store.process_batch(db, rules, other.dev, batch("junk"), NOW, limits)
    assert scalar(db, "SELECT COUNT(*) FROM rejections WHERE dev = ?", (other.dev,)) == 1


def test_unknown_devices_share_one_budget(db: Database, rules: Any) -> None:
    limits = EvidenceLimits(per_device=100, per_device_bytes=10**6, unknown=4, unknown_bytes=10**6)
    for _ in range(10):                       # ten "devices" that never enrolled, three messages each
        stranger = Dongle()
        for _ in range(3):
            ack = store.process_batch(db, rules, stranger.dev, batch(stranger.odometer(1)), NOW, limits).ack
            assert [r.reason for r in ack.rejected] == ["unknown_device"] and ack.through == 0
    assert scalar(db, "SELECT COUNT(*) FROM rejections") == 4
    with db.read() as tx:
        assert evidence.budget(tx, evidence.UNKNOWN)["dropped"] == 26


def test_bytes_budget(db: Database, rules: Any) -> None:
    d = Dongle()
    enroll(db, d)
    limits = EvidenceLimits(per_device=1000, per_device_bytes=5_000)
    for i in range(10):
        store.process_batch(db, rules, d.dev, batch(f"{i}" + "x" * 1_000), NOW, limits)
    kept = scalar(db, "SELECT COUNT(*) FROM rejections WHERE dev = ?", (d.dev,))
    assert kept == 4                          # about 1 KB each, with the detail
    assert scalar(db, "SELECT SUM(LENGTH(body)) FROM rejections WHERE dev = ?", (d.dev,)) <= 5_000

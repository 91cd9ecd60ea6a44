"""Attack: a record forged in a device's name. The attacker knows the device id (it is on the
topic) but not its key: the backend refuses the record without giving it a seq, keeps it for
operators, and the device's own record for that seq is still accepted."""

from __future__ import annotations

import json
from typing import Any

from backend.db import Database
from protocol import b64, canonical
from protocol.identity import SigningKey
from sim.devices import Dongle, enroll
from tests.attacks.support import Target, added, reasons, rejections
from tests.backend_helpers import snapshot


def unsigned(payload: dict[str, Any], kid: str) -> str:
    """The same claim as a JWS that asks for no signature at all (``alg: none``)."""
    header = b64.encode(json.dumps({"alg": "none", "kid": kid}).encode())
    return f"{header}.{b64.encode(canonical.dumps({'v': 1, **payload}))}."


def test_forged_signature(db: Database, rules: Any) -> None:
    backend = Target(db, rules)
    car = Dongle()
    enroll(db, car)
    assert backend.send(car, car.odometer(1)).through == 1
    before = snapshot(db)

    # 1,000 km more on the clock, at the next seq, chained to the real head, signed by a stranger
    claim = car.payload("odometer", {"odo_m": car.odo_m + 1_000_000, "src": "obd"})
    forged = car.forged(claim, SigningKey.generate())
    bare = unsigned(claim, car.dev)
    ack = backend.send(car, forged, bare)

    assert ack.through == 1 and reasons(ack) == [(2, "bad_signature"), (None, "bad_format")]
    assert snapshot(db) == before                         # no seq taken, nothing logged or credited
    assert added(before, snapshot(db)) == {}
    kept = rejections(db, car)
    assert [(r["seq"], r["reason"], r["body"]) for r in kept] == [(2, "bad_signature", forged),
                                                                 (None, "bad_format", bare)]
    assert backend.counted("rejected", "bad_signature") == 1
    assert backend.counted("rejected", "bad_format") == 1

    # the device's own seq 2, even behind another forgery in the same message, goes through
    genuine = car.odometer(1)
    ack = backend.send(car, car.forged(claim, SigningKey.generate()), genuine)
    assert ack.through == 2 and reasons(ack) == [(2, "bad_signature")]
    assert db.one("SELECT id, status FROM records WHERE seq = 2") == {"id": genuine.id, "status": "accepted"}
    assert backend.counted("accepted") == 2

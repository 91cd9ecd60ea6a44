"""Attack: spending more than one has. A driver who earned 10 tokens by driving redeems a 5-token
voucher twice, then tries a third; a partner's shop tries to charge the issuer (the one account
that may go negative) and a device's unassigned account. Each refusal is a 409 or a 404 naming
why, and changes nothing: no balance ever goes below zero."""

from __future__ import annotations

from typing import Any

from backend.db import Database
from backend.ledger import assignments
from sim.devices import T0, Dongle, enroll
from tests.attacks.support import Target, api, balance, driver_app, partner_app
from tests.backend_helpers import snapshot


def test_overdraw(db: Database, rules: Any) -> None:
    car = Dongle()
    enroll(db, car)
    alice = driver_app(db, "alice")
    assert car.vin is not None
    assignments.assign(db, "alice", car.vin, T0, T0)
    assert Target(db, rules).send(car, car.odometer(1), car.confirmation("2026-W39")).balance == 10_000
    shop = partner_app(db)
    with api(db, rules) as client:
        def redeem(account: str, key: str, headers: dict[str, str]) -> Any:
            return client.post(f"/api/wallets/{account}/redeem", headers=headers,
                               json={"item": "tyre-voucher", "idempotency_key": key})

        assert [redeem("driver:alice", f"order-{i}", alice).status_code for i in (1, 2)] == [200, 200]
        assert balance(db, "driver:alice") == 0
        before = snapshot(db)

        third = redeem("driver:alice", "order-3", alice)
        assert third.status_code == 409
        assert third.json() == {"error": "driver:alice has 0 milli-tokens; tyre-voucher costs 5000"}
        for account in ("issuer", f"unassigned:{car.dev}"):
            refused = redeem(account, "shop-1", shop)
            assert refused.status_code == 404 and "only a driver's account" in refused.json()["error"]
        assert snapshot(db) == before
        assert balance(db, "driver:alice") == 0 and balance(db, "redeemed:tyre-voucher") == 10_000
        assert client.get("/api/wallets/driver:alice", headers=alice).json()["balance"] == 0

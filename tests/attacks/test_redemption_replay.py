"""Attack: a redemption sent again, to be paid twice or to pass one order off as another. The
same request again (a retry, or someone replaying it) answers the first redemption and spends
nothing more; the same idempotency key for another item is a 409 naming the key; another driver
who replays it on the first driver's wallet is refused (403), and on their own wallet it is
their own order, paid from their own balance, that neither returns nor repeats the first."""

from __future__ import annotations

from typing import Any

from backend.db import Database
from backend.ledger import accounts
from tests.attacks.support import NOW, api, balance, driver_app
from tests.backend_helpers import snapshot

ORDER = {"item": "car-wash", "idempotency_key": "shop-42-order-1001"}


def grant(db: Database, driver: str, milli_tokens: int) -> None:
    with db.write() as tx:
        accounts.transfer(tx, key=f"grant:{driver}", from_account=accounts.ISSUER,
                          to_account=accounts.driver_account(driver), amount=milli_tokens, now_ms=NOW)


def test_redemption_replay(db: Database, rules: Any) -> None:
    alice, bob = driver_app(db, "alice"), driver_app(db, "bob")
    grant(db, "alice", 3_000)
    with api(db, rules) as client:
        first = client.post("/api/wallets/driver:alice/redeem", headers=alice, json=ORDER)
        assert first.status_code == 200 and first.json()["amount"] == 1_000
        before = snapshot(db)

        again = client.post("/api/wallets/driver:alice/redeem", headers=alice, json=ORDER)
        assert again.status_code == 200 and again.json() == first.json()
        other_item = client.post("/api/wallets/driver:alice/redeem", headers=alice,
                                 json={**ORDER, "item": "tyre-voucher"})
        assert other_item.status_code == 409
        assert other_item.json() == {"error": "idempotency_key 'shop-42-order-1001' was already used to "
                                              "redeem 'car-wash'"}
        on_her_wallet = client.post("/api/wallets/driver:alice/redeem", headers=bob, json=ORDER)
        assert on_her_wallet.status_code == 403
        assert snapshot(db) == before and balance(db, "driver:alice") == 2_000

        # on his own wallet, with nothing in it: his own order, which he cannot pay
        on_his_wallet = client.post("/api/wallets/driver:bob/redeem", headers=bob, json=ORDER)
        assert on_his_wallet.status_code == 409 and "driver:bob has 0" in on_his_wallet.json()["error"]
        grant(db, "bob", 1_000)
        paid = client.post("/api/wallets/driver:bob/redeem", headers=bob, json=ORDER)
        assert paid.status_code == 200 and paid.json()["from_account"] == "driver:bob"
        assert paid.json()["id"] != first.json()["id"]
        assert (balance(db, "driver:alice"), balance(db, "driver:bob")) == (2_000, 0)
        assert balance(db, "redeemed:car-wash") == 2_000

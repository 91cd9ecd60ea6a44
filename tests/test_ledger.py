from __future__ import annotations

import threading

import pytest

from backend.db import Database, IntegrityError
from backend.ledger import accounts
from backend.ledger.accounts import InsufficientFunds, InvalidKey, KeyConflict, UnknownAccount, UnknownItem
from backend.transparency import translog
from tests.ledger_support import make_rules, open_db

RULES = make_rules()


def _fund(db: Database, account: str, amount: int, key: str = "grant") -> None:
    with db.write() as tx:
        assert accounts.transfer(tx, key=key, from_account="issuer", to_account=account, amount=amount,
                               now_ms=1) is not None


def _add_driver(db: Database, driver_id: str) -> None:
    with db.write() as tx:
        tx.execute("INSERT INTO drivers (id, created_at) VALUES (?, ?)", (driver_id, 1))


def _counts(db: Database) -> tuple[int, int]:
    with db.read() as tx:
        stored = translog.size(tx) + translog.queued(tx)
        return int(tx.scalar("SELECT COUNT(*) AS n FROM transfers")), stored


def test_double_entry_and_idempotency(db_url: str) -> None:
    db = open_db(db_url)
    _fund(db, "driver:alice", 700)
    with db.write() as tx:
        again = accounts.transfer(tx, key="grant", from_account="issuer", to_account="driver:alice",
                                  amount=700, now_ms=2)
        assert again is None
        moved = accounts.transfer(tx, key="gift", from_account="driver:alice", to_account="driver:bob",
                                amount=200, now_ms=3)
        assert moved is not None and moved.amount == 200
        assert accounts.balance(tx, "driver:alice") == 500
        assert accounts.balance(tx, "driver:bob") == 200
        assert accounts.balance(tx, "issuer") == -700          # only the issuer goes negative
        with pytest.raises(InsufficientFunds, match="driver:bob has 200"):
            accounts.transfer(tx, key="too-much", from_account="driver:bob", to_account="driver:alice",
                            amount=201, now_ms=4)
        for bad in ({"amount": 0}, {"amount": -1}, {"to_account": "wallet:x"},
                    {"from_account": "driver:bob", "to_account": "driver:bob"}):
            kwargs = {"key": "k", "from_account": "issuer", "to_account": "driver:bob", "amount": 1, **bad}
            with pytest.raises(ValueError):
                accounts.transfer(tx, now_ms=5, **kwargs)  # type: ignore[arg-type]
    # the database itself refuses a second row with one key
    with pytest.raises(IntegrityError), db.write() as tx:
        tx.execute("INSERT INTO transfers (key, from_account, to_account, amount, created_at) "
                   "VALUES ('grant', 'issuer', 'driver:eve', 5, 1)")
    # every transfer is in the transparency log, as its canonical JSON
    translog.integrate_all(db)
    with db.read() as tx:
        for row in tx.query("SELECT * FROM transfers"):
            t = accounts.Transfer.from_row(row)
            entry = tx.scalar("SELECT entry FROM translog WHERE ref = ?", (t.key,))
            assert bytes(entry) == t.entry()
    db.close()


def test_wallet(db_url: str) -> None:
    db = open_db(db_url)
    _add_driver(db, "alice")
    empty = accounts.wallet(db, "driver:alice")
    assert empty == {"account": "driver:alice", "balance": 0, "transfers": []}
    _fund(db, "driver:alice", 40000)
    accounts.redeem(db, RULES, "driver:alice", "car-wash", "k1", 10)
    w = accounts.wallet(db, "driver:alice")
    assert w["balance"] == 10000
    assert [(t["key"], t["delta"]) for t in w["transfers"]] == [("redeem:driver:alice:k1", -30000),
                                                              ("grant", 40000)]
    assert accounts.wallet(db, "redeemed:car-wash")["balance"] == 30000
    assert accounts.wallet(db, "issuer")["balance"] == -40000
    with pytest.raises(UnknownAccount, match="no account driver:nobody"):
        accounts.wallet(db, "driver:nobody")
    with pytest.raises(UnknownAccount, match="not an account name"):
        accounts.wallet(db, "alice")
    db.close()


def test_redeem_is_idempotent_and_never_overdraws(db_url: str) -> None:
    db = open_db(db_url)
    _add_driver(db, "alice")
    _fund(db, "driver:alice", 520000)
    first = accounts.redeem(db, RULES, "driver:alice", "tyre-voucher", "order-1", 100)
    again = accounts.redeem(db, RULES, "driver:alice", "tyre-voucher", "order-1", 200)
    assert again == first
    assert first.to_account == "redeemed:tyre-voucher" and first.amount == 500000
    assert first.rules_version == RULES.version
    with db.read() as tx:
        assert accounts.balance(tx, "driver:alice") == 20000
    before = _counts(db)
    with pytest.raises(KeyConflict, match="order-1"):
        accounts.redeem(db, RULES, "driver:alice", "car-wash", "order-1", 300)
    with pytest.raises(InsufficientFunds, match="driver:alice has 20000 milli-tokens; car-wash costs 30000"):
        accounts.redeem(db, RULES, "driver:alice", "car-wash", "order-2", 300)
    with pytest.raises(UnknownItem, match="'moon'"):
        accounts.redeem(db, RULES, "driver:alice", "moon", "order-3", 300)
    with pytest.raises(UnknownAccount, match="no driver 'bob'"):
        accounts.redeem(db, RULES, "driver:bob", "car-wash", "order-4", 300)
    with pytest.raises(UnknownAccount, match="only a driver's account"):
        accounts.redeem(db, RULES, "issuer", "car-wash", "order-5", 300)
    for key in ("", "has space", "x" * 201):
        with pytest.raises(InvalidKey):
            accounts.redeem(db, RULES, "driver:alice", "car-wash", key, 300)
    assert _counts(db) == before                             # nothing changed by any refusal
    with db.read() as tx:
        assert accounts.balance(tx, "driver:alice") == 20000
    db.close()


def test_concurrent_redemptions_cannot_overspend(db_url: str) -> None:
    """Eight connections race to spend 1,000,000 on 500,000 vouchers: exactly two win."""
    db = open_db(db_url)
    _add_driver(db, "alice")
    _fund(db, "driver:alice", 1_000_000)
    results: list[str] = []
    barrier = threading.Barrier(8)

    def spend(i: int) -> None:
        conn = Database.open(db_url)
        barrier.wait()
        try:
            accounts.redeem(conn, RULES, "driver:alice", "tyre-voucher", f"race-{i}", 1000 + i)
            results.append("ok")
        except InsufficientFunds:
            results.append("refused")
        finally:
            conn.close()

    threads = [threading.Thread(target=spend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ok"] * 2 + ["refused"] * 6
    with db.read() as tx:
        assert accounts.balance(tx, "driver:alice") == 0
    db.close()


def test_device_balance_follows_the_assignment(db_url: str) -> None:
    db = open_db(db_url)
    dev = "ab" * 16
    _add_driver(db, "alice")
    _fund(db, f"unassigned:{dev}", 300, key="u")
    _fund(db, "driver:alice", 900, key="a")
    with db.write() as tx:
        tx.execute("INSERT INTO assignments (driver_id, vin, valid_from, valid_to, created_at) "
                   "VALUES ('alice', 'VIN1', 1000, 5000, 1)")
        assert accounts.device_balance(tx, dev, "VIN1", 999) == 300
        assert accounts.device_balance(tx, dev, "VIN1", 1000) == 900
        assert accounts.device_balance(tx, dev, "VIN1", 5000) == 300
        assert accounts.device_balance(tx, dev, None, 2000) == 300
    db.close()

"""The double-entry ledger (docs/DESIGN.md §5): transfers, balances, wallets, redemption.

Every movement of milli-tokens is one row of ``transfers`` from one account to
another: ``issuer``, ``driver:<id>``, ``unassigned:<dev>``, ``redeemed:<item>``.
A balance is always derived (sum in − sum out), never stored. Only ``issuer`` may
go negative. Each transfer has a unique idempotency key, enforced by the
database, so a retry or a redelivered record never moves tokens twice; each is
appended to the transparency log in the same transaction.

Exceptions::

    LedgerError
    ├── UnknownAccount      no such account (or a malformed name)
    ├── UnknownItem         not in the rules' catalogue
    ├── InsufficientFunds   the balance would go below zero
    ├── KeyConflict         the idempotency key was used for something else
    └── InvalidKey          the idempotency key is empty or malformed (also a ValueError)
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from backend.db import Database, Tx
from backend.errors import (
    InsufficientFunds,
    InvalidKey,
    KeyConflict,
    UnknownAccount,
    UnknownItem,
)
from backend.ledger.rules import Rules
from backend.transparency import translog
from protocol import canonical

log = logging.getLogger(__name__)

ISSUER = "issuer"
DRIVER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_ACCOUNT = re.compile(r"(issuer|driver:[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}|unassigned:[0-9a-f]{32}"
                      r"|redeemed:[a-z0-9][a-z0-9_.-]{0,63})")
_KEY = re.compile(r"[\x21-\x7e]{1,200}")          # a client's idempotency key
_TRANSFER_KEY = re.compile(r"[\x21-\x7e]{1,400}")


@dataclass(frozen=True)
class Transfer:
    id: int
    key: str
    from_account: str
    to_account: str
    amount: int
    rule_id: str | None
    rules_version: str | None
    dev: str | None
    record_id: str | None
    week: str | None
    memo: str | None
    created_at: int

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "key": self.key, "from_account": self.from_account,
                "to_account": self.to_account, "amount": self.amount, "rule_id": self.rule_id,
                "rules_version": self.rules_version, "dev": self.dev, "record_id": self.record_id,
                "week": self.week, "memo": self.memo, "created_at": self.created_at}

    def entry(self) -> bytes:
        """The transparency log's leaf for this transfer: its canonical JSON, named (docs/log.md)."""
        return canonical.dumps({"entry": "transfer", **self.to_dict()})

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Transfer:
        return cls(int(row["id"]), str(row["key"]), str(row["from_account"]), str(row["to_account"]),
                   int(row["amount"]), row["rule_id"], row["rules_version"], row["dev"], row["record_id"],
                   row["week"], row["memo"], int(row["created_at"]))


def is_account(name: object) -> bool:
    return isinstance(name, str) and bool(_ACCOUNT.fullmatch(name))


def driver_account(driver_id: str) -> str:
    return f"driver:{driver_id}"


def unassigned_account(dev: str) -> str:
    return f"unassigned:{dev}"


def account_lock(account: str) -> int:
    """An advisory lock number for one account (signed 64-bit, as PostgreSQL wants)."""
    return int.from_bytes(hashlib.sha256(b"odoledger account " + account.encode()).digest()[:8], "big",
                          signed=True)


def balance(tx: Tx, account: str) -> int:
    """Sum in − sum out of ``account``."""
    got = tx.scalar("SELECT COALESCE(SUM(amount), 0) AS n FROM transfers WHERE to_account = ?", (account,))
    spent = tx.scalar("SELECT COALESCE(SUM(amount), 0) AS n FROM transfers WHERE from_account = ?",
                      (account,))
    return int(got) - int(spent)


def by_key(tx: Tx, key: str) -> Transfer | None:
    row = tx.one("SELECT * FROM transfers WHERE key = ?", (key,))
    return None if row is None else Transfer.from_row(row)


def _check(key: str, from_account: str, to_account: str, amount: int) -> None:
    for name, account in (("from_account", from_account), ("to_account", to_account)):
        if not is_account(account):
            raise ValueError(f"{name}: {account!r} is not an account name")
    if from_account == to_account:
        raise ValueError("a transfer needs two different accounts")
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
        raise ValueError(f"amount: must be a positive integer of milli-tokens, got {amount!r}")
    if not isinstance(key, str) or not _TRANSFER_KEY.fullmatch(key):
        raise ValueError(f"key: malformed idempotency key {key!r}")


_TRANSFER_COLUMNS = ("key", "from_account", "to_account", "amount", "rule_id", "rules_version", "dev",
                     "record_id", "week", "memo", "created_at", "rules_sha256")


@dataclass(frozen=True)
class Issue:
    """A transfer from ``issuer`` still to be written (:func:`issue_many`)."""

    key: str
    to_account: str
    amount: int
    rule_id: str | None = None
    rules_version: str | None = None
    dev: str | None = None
    record_id: str | None = None
    week: str | None = None
    memo: str | None = None
    rules_sha256: str | None = None


def _insert(tx: Tx, rows: Sequence[tuple[Any, ...]]) -> dict[str, int]:
    """Insert transfers (values in :data:`_TRANSFER_COLUMNS` order), skipping a key used before;
    the id of each one inserted, by key."""
    ids: dict[str, int] = {}
    per = max(1, 900 // len(_TRANSFER_COLUMNS))
    marks = "(" + ", ".join("?" for _ in _TRANSFER_COLUMNS) + ")"
    for n in range(0, len(rows), per):
        chunk = rows[n:n + per]
        ids.update((str(r["key"]), int(r["id"])) for r in tx.query(
            f"INSERT INTO transfers ({', '.join(_TRANSFER_COLUMNS)}) "
            f"VALUES {', '.join(marks for _ in chunk)} ON CONFLICT (key) DO NOTHING RETURNING id, key",
            [v for row in chunk for v in row]))
    return ids


def issue_many(tx: Tx, issues: Sequence[Issue], now_ms: int) -> list[Transfer]:
    """:func:`transfer` from ``issuer`` of many at once, in a few statements, each appended to
    the log; those whose key was used before are skipped. Returns the transfers made, in the
    order given. Raises ValueError on a malformed account, amount or key (before writing any)."""
    for i in issues:
        _check(i.key, ISSUER, i.to_account, i.amount)
    ids = _insert(tx, [(i.key, ISSUER, i.to_account, i.amount, i.rule_id, i.rules_version, i.dev, i.record_id,
                        i.week, i.memo, now_ms, i.rules_sha256) for i in issues])
    made = [Transfer(ids[i.key], i.key, ISSUER, i.to_account, i.amount, i.rule_id, i.rules_version, i.dev,
                     i.record_id, i.week, i.memo, now_ms) for i in issues if i.key in ids]
    # Keys just made unique by the table: no entry was logged under them before.
    translog.append_many(tx, "transfer", [(t.key, t.entry()) for t in made], now_ms)
    return made


def transfer(tx: Tx, *, key: str, from_account: str, to_account: str, amount: int, now_ms: int,
             rule_id: str | None = None, rules_version: str | None = None, dev: str | None = None,
             record_id: str | None = None, week: str | None = None,
             memo: str | None = None, rules_sha256: str | None = None) -> Transfer | None:
    """Move ``amount`` milli-tokens; return the transfer, or None if ``key`` was already used.
    ``rules_sha256``: the hash of the rules version that earned it, kept beside it.

    Raises :class:`InsufficientFunds` if an account other than ``issuer`` would go
    below zero (the caller holds the account's lock when that can race), and
    ValueError on a malformed account or amount.
    """
    _check(key, from_account, to_account, amount)
    if from_account != ISSUER:
        if by_key(tx, key) is not None:
            return None
        have = balance(tx, from_account)
        if have < amount:
            raise InsufficientFunds(f"{from_account} has {have} milli-tokens, {amount} needed")
    ids = _insert(tx, [(key, from_account, to_account, amount, rule_id, rules_version, dev, record_id, week,
                        memo, now_ms, rules_sha256)])
    if key not in ids:                       # the key was used before
        return None
    made = Transfer(ids[key], key, from_account, to_account, amount, rule_id, rules_version, dev,
                    record_id, week, memo, now_ms)
    translog.append(tx, "transfer", key, made.entry())
    log.debug("transfer %s: %d from %s to %s", key, amount, from_account, to_account)
    return made


def assigned_driver(tx: Tx, vin: str | None, at_ms: int) -> str | None:
    """The driver assigned to ``vin`` at ``at_ms``, if any."""
    if vin is None:
        return None
    row = tx.one("SELECT driver_id FROM assignments WHERE vin = ? AND valid_from <= ? "
                 "AND (valid_to IS NULL OR valid_to > ?) ORDER BY valid_from DESC LIMIT 1",
                 (vin, at_ms, at_ms))
    return None if row is None else str(row["driver_id"])


def reward_account(tx: Tx, dev: str, vin: str | None, at_ms: int) -> str:
    """Where a reward for a reading of ``vin`` by ``dev`` taken at ``at_ms`` goes."""
    return account_of(dev, assigned_driver(tx, vin, at_ms))


def account_of(dev: str, driver: str | None) -> str:
    """Where a reward earned by ``dev`` goes: its driver's account, else the device's own."""
    return driver_account(driver) if driver is not None else unassigned_account(dev)


def device_balance(tx: Tx, dev: str, vin: str | None, now_ms: int) -> int:
    """The balance of the account that the device's rewards go to now."""
    return balance(tx, reward_account(tx, dev, vin, now_ms))


def _known(tx: Tx, account: str) -> bool:
    if account == ISSUER:
        return True
    kind, _, name = account.partition(":")
    if kind == "driver" and tx.one("SELECT id FROM drivers WHERE id = ?", (name,)):
        return True
    if kind == "unassigned" and tx.one("SELECT dev FROM devices WHERE dev = ?", (name,)):
        return True
    return tx.one("SELECT id FROM transfers WHERE to_account = ? OR from_account = ? LIMIT 1",
                  (account, account)) is not None


def wallet(db: Database, account: str, limit: int = 500) -> dict[str, Any]:
    """``{"account", "balance", "transfers": [...]}``, newest first (at most ``limit``).

    Each transfer carries ``delta``: what it changed this account's balance by.
    """
    if not is_account(account):
        raise UnknownAccount(f"{account!r} is not an account name (issuer, driver:<id>, "
                             "unassigned:<dev>, redeemed:<item>)")
    with db.read() as tx:
        if not _known(tx, account):
            raise UnknownAccount(f"no account {account}")
        rows = tx.query("SELECT * FROM transfers WHERE to_account = ? OR from_account = ? "
                        "ORDER BY id DESC LIMIT ?", (account, account, limit))
        bal = balance(tx, account)
    out = []
    for row in rows:
        t = Transfer.from_row(row).to_dict()
        t["delta"] = t["amount"] if t["to_account"] == account else -t["amount"]
        out.append(t)
    return {"account": account, "balance": bal, "transfers": out}


def redeem(db: Database, rules: Rules, account: str, item: str, idempotency_key: str,
           now_ms: int) -> Transfer:
    """Spend ``account``'s tokens on a catalogue item; idempotent by key.

    The same key with the same account and item returns the first transfer; the
    same key for another item raises :class:`KeyConflict`. The balance check and
    the insert happen in one write transaction under the account's lock, so two
    processes can never overspend.
    """
    if not isinstance(idempotency_key, str) or not _KEY.fullmatch(idempotency_key):
        raise InvalidKey("idempotency_key: 1 to 200 printable ASCII characters, no spaces")
    if not is_account(account) or not account.startswith("driver:"):
        raise UnknownAccount(f"{account!r}: only a driver's account (driver:<id>) can redeem")
    key = f"redeem:{account}:{idempotency_key}"
    with db.write() as tx:
        db.lock_key(tx, account_lock(account))
        if not tx.one("SELECT id FROM drivers WHERE id = ?", (account.partition(":")[2],)):
            raise UnknownAccount(f"no driver {account.partition(':')[2]!r}")
        existing = by_key(tx, key)
        if existing is not None:
            if existing.from_account == account and existing.to_account == f"redeemed:{item}":
                return existing
            raise KeyConflict(f"idempotency_key {idempotency_key!r} was already used to redeem "
                              f"{existing.to_account.partition(':')[2]!r}")
        price = rules.catalogue.get(item)
        if price is None:
            raise UnknownItem(f"item {item!r} is not in the catalogue of rules {rules.version}")
        have = balance(tx, account)
        if have < price:
            raise InsufficientFunds(f"{account} has {have} milli-tokens; {item} costs {price}")
        made = transfer(tx, key=key, from_account=account, to_account=f"redeemed:{item}", amount=price,
                        now_ms=now_ms, rules_version=rules.version, memo=f"redeemed {item}")
        assert made is not None
    log.info("%s redeemed %s for %d milli-tokens", account, item, price)
    return made

"""``odo-backend rewards audit``: recompute every credit from scratch and compare with the ledger.

The accepted records are read back and their signatures checked again with
their device's key; :func:`backend.ledger.rewards.recompute` decides, from them, the
assignments and the rule book published in the database (each reading under the version in
force at its time, :mod:`backend.ledger.contracts`), every reward and whose it is. Each stored
reward transfer, with its rules version and sha256, and the move of a reward to a driver
assigned later (``reassign:<key>``), must match. A reward with no sha256 is one credited before
versions were published (or by rules read from no file): only its version's name is compared.
The log entry of every transfer must still be the transfer, and no account but ``issuer`` may be
below zero. Rules given to :func:`audit` are used only for a database no version was published
to (as before versions existed: that one file at every time).
"""

from __future__ import annotations

import logging
from typing import Any

from backend.db import Database
from backend.errors import RulesError
from backend.ledger import accounts, assignments, contracts, rewards
from backend.ledger.contracts import RuleBook
from backend.ledger.rules import Rules
from protocol import BadFormat, BadSignature, records
from protocol.identity import VerifyKey

log = logging.getLogger(__name__)


def _readings(db: Database, problems: list[str]) -> list[rewards.Reading]:
    with db.read() as tx:
        devices = {d["dev"]: d for d in tx.query("SELECT dev, pub, vin FROM devices")}
        rows = tx.query("SELECT dev, seq, jws, clock, t_est, received_at, base_odo_m FROM records "
                        "WHERE status = 'accepted' ORDER BY dev, seq")
    out = []
    keys: dict[str, VerifyKey] = {}
    for row in rows:
        device = devices.get(row["dev"])
        if device is None:
            problems.append(f"record seq {row['seq']} of {row['dev']}: no such device")
            continue
        key = keys.setdefault(row["dev"], VerifyKey(bytes(device["pub"])))
        try:
            record = records.verify(str(row["jws"]), key)
        except (BadFormat, BadSignature) as exc:
            problems.append(f"record seq {row['seq']} of {row['dev']}: does not verify ({exc})")
            continue
        if record.seq != int(row["seq"]):
            problems.append(f"record seq {row['seq']} of {row['dev']}: the record says seq {record.seq}")
            continue
        at = rewards.reading_time(record.clock, record.t, row["t_est"])
        base = row["base_odo_m"]
        out.append(rewards.Reading(record, at, record.vin or device["vin"], int(row["received_at"]),
                                   None if base is None else int(base)))
    return out


def _compare(book: RuleBook, expected: dict[str, rewards.Expected], stored: dict[str, accounts.Transfer],
             moves: dict[str, accounts.Transfer], hashes: dict[str, str | None]) -> list[str]:
    problems = []
    for key in sorted(set(expected) - set(stored)):
        e = expected[key]
        problems.append(f"missing: {key}: {e.credit.amount} to {e.to_account} was never credited")
    for key in sorted(set(stored) - set(expected)):
        t = stored[key]
        problems.append(f"unexpected: {key}: {t.amount} to {t.to_account}, earned by no accepted record")
    for key in sorted(set(stored) & set(expected)):
        t, e = stored[key], expected[key]
        c = e.credit
        move = moves.get(f"reassign:{key}")
        if t.from_account != accounts.ISSUER:
            problems.append(f"differs: {key}: paid from {t.from_account}, not issuer")
        for name, got, want in (("amount", t.amount, c.amount), ("rule", t.rule_id, c.rule_id),
                                ("device", t.dev, c.dev), ("record", t.record_id, c.record_id),
                                ("week", t.week, c.week),
                                ("rules version", t.rules_version, e.rules_version)):
            if got != want:
                problems.append(f"differs: {key}: {name} is {got}, expected {want}")
        problems.extend(_hash_problem(book, key, t, hashes.get(key), e.rules_sha256))
        if move is not None and (move.from_account != t.to_account or move.amount != t.amount):
            problems.append(f"differs: reassign:{key}: moves {move.amount} from {move.from_account}, "
                            f"expected {t.amount} from {t.to_account}")
        holder = move.to_account if move is not None else t.to_account
        if holder != e.to_account:
            problems.append(f"differs: {key}: went to {holder}, expected {e.to_account}")
    for key in sorted(k for k in moves if k.removeprefix("reassign:") not in stored):
        problems.append(f"unexpected: {key}: moves a reward that does not exist")
    return problems


def _hash_problem(book: RuleBook, key: str, t: accounts.Transfer, got: str | None,
                  want: str | None) -> list[str]:
    if got is not None and want is not None and got != want:
        return [f"differs: {key}: rules sha256 is {got}, expected {want} (version {t.rules_version})"]
    since = book.first_published_at
    if got is None and want is not None and book.published and since is not None and t.created_at >= since:
        return [f"differs: {key}: no rules sha256, though credited after versions were published "
                f"(expected {want})"]
    return []


def _log_and_balances(db: Database) -> list[str]:
    problems = []
    sums: dict[str, int] = {}
    with db.read() as tx:
        # In the tree, or stored for the sequencer to integrate: both are the log's.
        logged = {str(r["ref"]): bytes(r["entry"]) for table in ("translog", "translog_queue")
                  for r in tx.query(f"SELECT ref, entry FROM {table} WHERE entry_kind = 'transfer'")}
        rows = tx.query("SELECT * FROM transfers ORDER BY id")
    for row in rows:
        t = accounts.Transfer.from_row(row)
        sums[t.to_account] = sums.get(t.to_account, 0) + t.amount
        sums[t.from_account] = sums.get(t.from_account, 0) - t.amount
        entry = logged.get(t.key)
        if entry is None:
            problems.append(f"log: transfer {t.key} is not in the transparency log")
        elif entry != t.entry():
            problems.append(f"log: transfer {t.key} differs from what the transparency log holds")
    for account, total in sorted(sums.items()):
        if total < 0 and account != accounts.ISSUER:
            problems.append(f"balance: {account} is below zero ({total})")
    return problems


def audit(db: Database, rules: Rules | RuleBook | None = None) -> list[str]:
    """Every difference found, as one line each; an empty list means the ledger is right."""
    problems: list[str] = []
    book = contracts.load_book(db)
    if not book.versions:
        if rules is None:
            raise RulesError("no rules version is published in the database, and no rules were given")
        book = contracts.book_of(rules)
    readings = _readings(db, problems)
    with db.read() as tx:
        plan = assignments.load(tx)
        rows = tx.query("SELECT * FROM transfers WHERE key LIKE 'reward:%'")
        stored = {t.key: t for t in map(accounts.Transfer.from_row, rows)}
        hashes = {str(r["key"]): r["rules_sha256"] for r in rows}
        moves = {t.key: t for t in map(accounts.Transfer.from_row,
                                       tx.query("SELECT * FROM transfers WHERE key LIKE 'reassign:%'"))}
        standings = {d["dev"]: rewards.Standing.of(d)
                     for d in tx.query("SELECT dev, approved_at, held_at FROM devices")}
    expected = rewards.recompute(book, readings, plan, standings)
    problems.extend(_compare(book, expected, stored, moves, hashes))
    problems.extend(_log_and_balances(db))
    log.info("audit of %d records and %d rewards: %d differences", len(readings), len(stored), len(problems))
    return problems


def summary(problems: list[str]) -> dict[str, Any]:
    return {"ok": not problems, "differences": problems}

"""Rewards: what the rules give for an accepted record, and to whom (docs/DESIGN.md §5).

The decisions are one pure function, :func:`decide`, over a reading and a view of
what was already credited. :func:`credit` runs it against the database inside
the transaction that stores the record; :func:`recompute` runs it from scratch
over the list of accepted records and the assignments, for the audit. Both see
each device's records in seq order, so both reach the same credits.

- *When* a reading was taken: the record's ``t`` when its clock was synced, else
  the backend's estimate (``records.t_est``), so an unsynced dongle's 1970 never
  decides a week or a driver.
- *Which vehicle*: the record's ``vin``, else the VIN the device is approved for. Rewards
  are per vehicle: the *scope* of a key is the VIN (the device id only for a vehicle with
  no VIN), so neither a second dongle in the same car nor a replacement earns twice.
- *Which periods*: from ``reward_backfill_days`` before the device's first approval on
  (older readings are history, not income), never for a time ahead of the backend's clock
  (``clock_ahead`` refuses such records), and nothing while the device is held (flagged for
  a rollback) until an operator clears it.
- **weekly** (``on = "confirmation"``): the confirmation's ``week`` counts only if it
  is the ISO week of the reading time or the week before it; the driver's figure must be
  within ``tolerance_m`` of ``device_odo_m`` when the device had one. At most once per
  vehicle and week: key ``reward:<rule>:<scope>:<week>``. With ``on = "odometer"``: once
  per vehicle and ISO week (of the reading time) in which it sent a reading.
- **distance**: per trip, the vehicle's accepted progress over it (:func:`trip_distance_m`:
  from the higher of the trip's start and the vehicle's highest reading before it, to its
  end; never the trip's claim alone) × milli_tokens_per_km / 1000, rounded down, capped
  per vehicle and ISO week of the reading time; key ``reward:<rule>:<scope>:<record id>``.
- **streak**: when its weekly rule rewards a week W, the run of consecutive
  rewarded weeks ending at W (and after the last week that closed a streak) is
  counted; every ``every_weeks``-th week of a run earns it: key
  ``reward:<rule>:<scope>:<W>``. A week rewarded late, after later weeks, does not
  re-open runs already counted.
- The reward goes from ``issuer`` to ``driver:<id>`` of the driver assigned to the
  vehicle at the reading time, else to ``unassigned:<dev>``.
- *Which rules*: the version of the rule book in force at the reading time
  (:mod:`backend.ledger.contracts`), its ``reward_backfill_days`` included; nothing before the
  earliest version. Its name and sha256 are recorded on the transfer. Week totals and streaks
  run on across versions: a rule of the new version with the id of an old one continues it.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from backend.db import Tx
from backend.ledger import accounts
from backend.ledger.contracts import RuleBook, book_of
from backend.ledger.rules import DistanceRule, Rules, StreakRule, WeeklyRule
from protocol.records import Record, iso_week

log = logging.getLogger(__name__)

WEEK_MS = 7 * 24 * 3600 * 1000
DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class Reading:
    """An accepted record, with when it was taken, of which vehicle, when the backend received
    it, and (a trip) the vehicle's highest reading before it, as the backend saw it then."""

    record: Record
    at_ms: int
    vin: str | None
    received_at: int = 0
    base_m: int | None = None

    @property
    def scope(self) -> str:
        """Whose rewards these are: the vehicle (its VIN), or the device of a car with no VIN."""
        return self.vin if self.vin is not None else self.record.dev


@dataclass(frozen=True)
class Standing:
    """What a device's approval and flags say about its rewards."""

    approved_at: int | None
    held_at: int | None

    @classmethod
    def of(cls, device: Mapping[str, Any]) -> Standing:
        approved, held = device.get("approved_at"), device.get("held_at")
        return cls(None if approved is None else int(approved), None if held is None else int(held))


def eligible(rules: Rules, reading: Reading, standing: Standing) -> bool:
    """Whether a reading may earn at all: taken no earlier than ``reward_backfill_days`` before
    the device's first approval, and not received while the device is held."""
    if standing.held_at is not None and reading.received_at >= standing.held_at:
        return False
    if standing.approved_at is not None:
        return reading.at_ms >= standing.approved_at - rules.reward_backfill_days * DAY_MS
    return True


def trip_distance_m(record: Record, base_m: int | None) -> int:
    """The distance a trip earns: the vehicle's accepted progress over it, never the trip's claim
    alone. From the higher of its start and the vehicle's highest reading before it (``base_m``)
    to its end; nothing when the vehicle had no reading before the trip."""
    if base_m is None:
        return 0
    start, end = int(record.fields["start_odo_m"]), int(record.fields["end_odo_m"])
    return max(end - max(start, base_m), 0)


@dataclass(frozen=True)
class Credit:
    """A reward the rules give, before it is known whose it is."""

    key: str
    rule_id: str
    amount: int
    dev: str
    record_id: str
    week: str
    memo: str
    scope: str = ""


@dataclass(frozen=True)
class Assignment:
    driver_id: str
    vin: str
    valid_from: int
    valid_to: int | None


class Credited(Protocol):
    """What was credited before: the database, or the audit's own tally."""

    def has(self, key: str) -> bool: ...

    def week_total(self, rule_id: str, scope: str, week: str) -> int: ...


def reading_time(clock: str, t: int, t_est: int | None) -> int:
    return t if clock == "synced" or t_est is None else int(t_est)


def previous_week(week: str) -> str:
    year, num = week.split("-W")
    monday = datetime.date.fromisocalendar(int(year), int(num), 1) - datetime.timedelta(days=7)
    y, w, _ = monday.isocalendar()
    return f"{y:04d}-W{w:02d}"


def _ordered(rules: Rules, kind: str) -> list[WeeklyRule | DistanceRule | StreakRule]:
    order = {WeeklyRule: 0, DistanceRule: 1, StreakRule: 2}
    return sorted((r for r in rules.rules if r.on == kind), key=lambda r: order[type(r)])


def _weekly(rule: WeeklyRule, r: Record, at_ms: int) -> tuple[str, str] | None:
    """(week, memo) when the record earns the weekly reward's week, else None."""
    if r.kind != "confirmation":
        return iso_week(at_ms), "a reading this week"
    week = str(r.fields["week"])
    if week not in {iso_week(max(at_ms + d, 0)) for d in (-WEEK_MS, 0)}:
        log.info("confirmation %s: week %s is not the week of its time %d, nor the one before", r.id, week,
                 at_ms)
        return None
    device_odo = r.fields.get("device_odo_m")
    odo = int(r.fields["odo_m"])
    tolerance = rule.tolerance_m
    if tolerance is not None and device_odo is not None and abs(odo - int(device_odo)) > tolerance:
        log.info("confirmation %s: %d m is more than %d m from the device's %d m", r.id, odo,
                 rule.tolerance_m, device_odo)
        return None
    return week, f"confirmed {odo} m in {week}"


def decide(rules: Rules, reading: Reading, credited: Credited) -> list[Credit]:
    """The rewards one accepted record earns, given what was credited before it."""
    r = reading.record
    planned: dict[str, Credit] = {}

    def has(key: str) -> bool:
        return key in planned or credited.has(key)

    scope = reading.scope
    for rule in _ordered(rules, r.kind):
        prefix = f"reward:{rule.id}:{scope}:"
        if isinstance(rule, WeeklyRule):
            got = _weekly(rule, r, reading.at_ms)
            if got is not None and not has(prefix + got[0]):
                planned[prefix + got[0]] = Credit(prefix + got[0], rule.id, rule.milli_tokens, r.dev, r.id,
                                                  got[0], got[1], scope)
        elif isinstance(rule, DistanceRule):
            key = prefix + r.id
            if has(key):
                continue
            week = iso_week(reading.at_ms)
            metres = trip_distance_m(r, reading.base_m)
            amount = metres * rule.milli_tokens_per_km // 1000
            memo = f"{metres} m driven"
            if rule.cap_milli_tokens_per_week is not None:
                done = credited.week_total(rule.id, scope, week)
                left = max(rule.cap_milli_tokens_per_week - done, 0)
                if amount > left:
                    amount, memo = left, f"{memo}, capped at {rule.cap_milli_tokens_per_week} per week"
            if amount > 0:
                planned[key] = Credit(key, rule.id, amount, r.dev, r.id, week, memo, scope)
        else:
            confirmed = next((c.week for c in planned.values() if c.rule_id == rule.weekly), None)
            if confirmed is None:
                continue
            week = confirmed
            count, w = 1, week
            while count < rule.every_weeks:
                w = previous_week(w)
                if has(f"{prefix}{w}") or not has(f"reward:{rule.weekly}:{scope}:{w}"):
                    break
                count += 1
            if count == rule.every_weeks and not has(prefix + week):
                planned[prefix + week] = Credit(prefix + week, rule.id, rule.milli_tokens, r.dev, r.id, week,
                                                f"{count} consecutive weeks to {week}", scope)
    return list(planned.values())


#: A rule's credits to a scope in a week, as credited so far: (rule id, scope, week) -> milli-tokens.
WeekTotals = dict[tuple[str, str, str], int]


class Pending:
    """Credits of one transaction's records, written together by :meth:`flush` (a batch of
    records holds its vehicles' locks): what it planned counts as credited for the records after
    (idempotency keys and week totals), and each VIN's assignments are read once."""

    def __init__(self, tx: Tx) -> None:
        self.tx = tx
        self.totals: WeekTotals = {}
        self._issues: list[accounts.Issue] = []
        self._keys: set[str] = set()
        self._assignments: dict[str, list[Assignment]] = {}

    def has(self, key: str) -> bool:
        return key in self._keys

    def add(self, issue: accounts.Issue) -> None:
        self._issues.append(issue)
        self._keys.add(issue.key)

    def account(self, dev: str, vin: str | None, at_ms: int) -> str:
        """:func:`accounts.reward_account`, from the VIN's assignments read once."""
        if vin is None:
            return accounts.account_of(dev, None)
        if vin not in self._assignments:
            self._assignments[vin] = [Assignment(str(r["driver_id"]), vin, int(r["valid_from"]),
                                                 None if r["valid_to"] is None else int(r["valid_to"]))
                                      for r in self.tx.query("SELECT driver_id, valid_from, valid_to "
                                                             "FROM assignments WHERE vin = ?", (vin,))]
        return accounts.account_of(dev, driver_at(self._assignments[vin], vin, at_ms))

    def flush(self, now_ms: int) -> list[accounts.Transfer]:
        """Write what was planned; the transfers made."""
        if not self._issues:
            return []
        made = accounts.issue_many(self.tx, self._issues, now_ms)
        if len(made) < len(self._issues):            # under the vehicles' locks: not expected
            log.warning("%d planned credits were already written", len(self._issues) - len(made))
        if log.isEnabledFor(logging.DEBUG):       # one line a record is too many at INFO: the ledger has them
            for t in made:
                log.debug("credited %d milli-tokens to %s: %s", t.amount, t.to_account, t.key)
        self._issues = []
        return made


class _InDatabase:
    """What was credited, read from the transaction; week totals are read once per scope and
    week and then kept in ``totals`` (a batch holds its vehicle's lock, so no other writer adds
    to them meanwhile)."""

    def __init__(self, tx: Tx, totals: WeekTotals | None = None, fresh: str | None = None,
                 pending: Pending | None = None) -> None:
        self.tx = tx
        self.totals = {} if totals is None else totals
        self._fresh_suffix = None if fresh is None else f":{fresh}"
        self._pending = pending

    def has(self, key: str) -> bool:
        if self._pending is not None and self._pending.has(key):
            return True
        if self._fresh_suffix is not None and key.endswith(self._fresh_suffix):
            return False             # the record was accepted by this transaction: nothing names it yet
        return self.tx.one("SELECT id FROM transfers WHERE key = ?", (key,)) is not None

    def week_total(self, rule_id: str, scope: str, week: str) -> int:
        key = (rule_id, scope, week)
        if key not in self.totals:
            self.totals[key] = int(self.tx.scalar(
                "SELECT COALESCE(SUM(amount), 0) AS n FROM transfers WHERE week = ? AND rule_id = ? "
                "AND from_account = ? AND key LIKE ?",
                (week, rule_id, accounts.ISSUER, f"reward:{rule_id}:{scope}:%")))
        return self.totals[key]


@dataclass(frozen=True)
class Stored:
    """What the backend stored with an accepted record, when the caller has it in hand."""

    t_est: int | None
    received_at: int
    base_odo_m: int | None


def credit(tx: Tx, rules: Rules | RuleBook, record: Record, device: Mapping[str, Any], now_ms: int,
           stored: Stored | None = None, pending: Pending | None = None,
           fresh: bool = False) -> list[accounts.Transfer]:
    """Credit what ``record`` earns under the version of ``rules`` in force at its reading time;
    call in the transaction that stored it as accepted (with ``stored``, what was stored with
    it, else it is read back; ``fresh``, the record was accepted by this very transaction, so
    that no credit can name it yet: that is not looked up, the idempotency key's uniqueness
    still holds).

    Returns the transfers made (none when it earns nothing or was credited before). With
    ``pending``, they are planned there instead, and written by its :meth:`Pending.flush`
    (which returns them): then nothing is returned here.
    """
    book = book_of(rules)
    if record.kind not in book.kinds:
        return []
    # Under the vehicle's lock (taken by the caller, as process_batch and devices.clear do), so
    # that an assignment made meanwhile by another process is either seen here, or sees this
    # credit.
    if stored is None:
        row = tx.one("SELECT t_est, received_at, base_odo_m FROM records WHERE id = ?", (record.id,))
        assert row is not None, "credit() runs in the transaction that stored the record"
        stored = Stored(row["t_est"], int(row["received_at"]),
                        None if row["base_odo_m"] is None else int(row["base_odo_m"]))
    reading = Reading(record, reading_time(record.clock, record.t, stored.t_est),
                      record.vin or device.get("vin"), stored.received_at, stored.base_odo_m)
    version = book.at(reading.at_ms)
    if version is None or record.kind not in version.kinds:
        return []
    if not eligible(version.rules, reading, Standing.of(device)):
        return []
    credited = _InDatabase(tx, None if pending is None else pending.totals, record.id if fresh else None,
                           pending)
    credits = decide(version.rules, reading, credited)
    if not credits:
        return []
    account = (accounts.reward_account(tx, record.dev, reading.vin, reading.at_ms) if pending is None
               else pending.account(record.dev, reading.vin, reading.at_ms))
    made = []
    for c in credits:
        issue = accounts.Issue(c.key, account, c.amount, c.rule_id, version.name, c.dev, c.record_id, c.week,
                               c.memo, version.sha256)
        if pending is not None:
            pending.add(issue)
        else:
            written = accounts.issue_many(tx, [issue], now_ms)
            if not written:                  # credited before
                continue
            made.extend(written)
            log.info("credited %d milli-tokens to %s: %s", c.amount, account, c.key)
        week_key = (c.rule_id, c.scope, c.week)
        if week_key in credited.totals:
            credited.totals[week_key] += c.amount
    return made


# -- recomputation from scratch, for the audit ---------------------------------------------------


class _Tally:
    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.totals: dict[tuple[str, str, str], int] = {}

    def has(self, key: str) -> bool:
        return key in self.keys

    def week_total(self, rule_id: str, scope: str, week: str) -> int:
        return self.totals.get((rule_id, scope, week), 0)

    def add(self, c: Credit) -> None:
        self.keys.add(c.key)
        self.totals[(c.rule_id, c.scope, c.week)] = self.week_total(c.rule_id, c.scope, c.week) + c.amount


def driver_at(assignments: Iterable[Assignment], vin: str | None, at_ms: int) -> str | None:
    """The driver assigned to ``vin`` at ``at_ms`` (the latest-starting one, as the database)."""
    best: Assignment | None = None
    for a in assignments:
        if (a.vin == vin and a.valid_from <= at_ms and (a.valid_to is None or at_ms < a.valid_to)
                and (best is None or a.valid_from > best.valid_from)):
            best = a
    return None if best is None else best.driver_id


@dataclass(frozen=True)
class Expected:
    credit: Credit
    to_account: str
    rules_version: str = ""
    rules_sha256: str | None = None


def recompute(rules: Rules | RuleBook, readings: Sequence[Reading], assignments: Sequence[Assignment],
              standings: Mapping[str, Standing] | None = None) -> dict[str, Expected]:
    """Every reward the rules give for these accepted records, by key, each under the version in
    force at its reading time; pure. Records are taken in the order the backend received them
    (each device's in seq order), as it credited them."""
    book = book_of(rules)
    tally = _Tally()
    out: dict[str, Expected] = {}
    for reading in sorted(readings, key=lambda x: (x.received_at, x.record.dev, x.record.seq)):
        version = book.at(reading.at_ms)
        if version is None:
            continue
        standing = (standings or {}).get(reading.record.dev)
        if standing is not None and not eligible(version.rules, reading, standing):
            continue
        for c in decide(version.rules, reading, tally):
            tally.add(c)
            driver = driver_at(assignments, reading.vin, reading.at_ms)
            account = accounts.driver_account(driver) if driver else accounts.unassigned_account(c.dev)
            out[c.key] = Expected(c, account, version.name, version.sha256)
    return out

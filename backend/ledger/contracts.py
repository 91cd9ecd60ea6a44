"""Rules as versioned, published contracts: the rule book (docs/DESIGN.md §5).

A rules file is *published* once (``odo-backend rules publish FILE``, or ``run --rules FILE``):
its text, the SHA-256 of its bytes, its ``effective_from`` and the time are stored in
``rules_versions`` and appended to the transparency log (a ``rules`` entry, in the same
transaction). The published versions ordered by ``effective_from`` are the *rule book*;
versions are never changed nor removed. Which version decides what:

- a reward: the version in force at the reading's time (``rewards.reading_time``); its
  ``reward_backfill_days`` too. The transfer records its version and sha256, and never changes.
- the checks of a record (``max_speed_kph``, ``max_clock_ahead_ms``, ``rollback_tolerance_m``):
  the version in force when the backend receives it (the earliest one before any is).
- the catalogue of a redemption: the version in force now.
- before the earliest version's ``effective_from``, none is: readings taken then earn nothing.

Publishing never changes a credit already made, nor one a running backend is about to make:

- the same bytes again: nothing new (:attr:`Published.new` is False);
- a ``version`` name already published with other content: refused;
- the first version: when accepted records are stored already (credited under the file the
  backend read before versions were published), it must be in force from the earliest reading
  on. A file without ``effective_from`` is in force from the beginning of time (0) -- accepted
  only from ``run --rules``, and only as the first version;
- a later version: its ``effective_from`` must be later than every published one's and than the
  reading time of every accepted record stored. It may lie in the past (a contract signed
  late) as long as no reading of its time was accepted yet.
- a version published while backends run: each batch reads the versions' ids in its own
  write transaction (:meth:`LiveBook.in_tx`), after a shared lock that publishing takes
  exclusively (PostgreSQL; SQLite serialises every writer). So a batch either committed before
  the version was published, and publishing saw its readings, or credits by the new book.

A single :class:`~backend.ledger.rules.Rules` where a book is expected (tests, a database no
version was published to) is a book of that one version, in force at every time.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from backend.db import Database, Tx
from backend.errors import DatabaseError, RulesError, UnknownItem
from backend.ledger import accounts
from backend.ledger.rules import Rules, loads
from backend.records import device_log

log = logging.getLogger(__name__)

#: How often a running backend looks whether a version was published, outside a batch (for the
#: catalogue and the pages; a batch looks in its own transaction).
RELOAD_S = 2.0
#: Serialises publishers (PostgreSQL advisory lock; SQLite's write transactions already are).
_PUBLISH_LOCK = 0x0D0_0108


class PublishError(RulesError):
    """The rules cannot be published: the message says which rule of the book they break."""


def sha256_of(rules: Rules) -> str:
    """The SHA-256 of the file's bytes (its text, as read: UTF-8)."""
    return hashlib.sha256(rules.text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Version:
    """One version of the rules, as published (``id`` 0: rules that were not)."""

    rules: Rules
    sha256: str | None             # None: rules not read from a file
    effective_from: int
    id: int = 0
    published_at: int | None = None

    @property
    def name(self) -> str:
        return self.rules.version

    @cached_property
    def kinds(self) -> frozenset[str]:
        """The record kinds some rule of this version is on."""
        return frozenset(r.on for r in self.rules.rules)


@dataclass(frozen=True)
class RuleBook:
    """Versions ordered by ``effective_from``; ``published``: read from the database."""

    versions: tuple[Version, ...]
    published: bool = False
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        starts = tuple(v.effective_from for v in self.versions)
        if list(starts) != sorted(set(starts)):
            raise ValueError("a rule book's versions start at distinct times, in order")
        object.__setattr__(self, "_starts", starts)

    @classmethod
    def single(cls, rules: Rules) -> RuleBook:
        """One rules file, unpublished: in force at every time."""
        return cls((Version(rules, sha256_of(rules) if rules.text else None, 0),))

    def at(self, t_ms: int) -> Version | None:
        """The version in force at ``t_ms``: the latest to start at or before it."""
        i = bisect.bisect_right(self._starts, t_ms)
        return self.versions[i - 1] if i else None

    def for_receipt(self, now_ms: int) -> Version:
        """What checks a record received at ``now_ms``: the version in force, else the earliest."""
        if not self.versions:
            raise RulesError("no rules version is published")
        return self.at(now_ms) or self.versions[0]

    @cached_property
    def kinds(self) -> frozenset[str]:
        """The record kinds some version has a rule on: others never earn."""
        return frozenset(k for v in self.versions for k in v.kinds)

    @property
    def latest_id(self) -> int:
        return max((v.id for v in self.versions), default=0)

    @property
    def first_published_at(self) -> int | None:
        """When versions began to be published (credits before then carry no sha256)."""
        return min((v.published_at for v in self.versions if v.published_at is not None), default=None)


class LiveBook:
    """The database's rule book as a running backend sees it: reloaded when a version is
    published (by this process or another, e.g. the CLI), looked for at most every
    ``reload_s`` seconds with one query (the highest version id), by one thread while the others
    wait for it: once ``reload_s`` has passed since a version was published, no thread credits by
    the book without it."""

    def __init__(self, db: Database, book: RuleBook | None = None, *, reload_s: float = RELOAD_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.db, self.reload_s, self._clock = db, reload_s, clock
        self._book = book if book is not None else load_book(db)
        self._checked = clock()
        self._lock = threading.Lock()

    def book(self) -> RuleBook:
        if self._clock() - self._checked >= self.reload_s:
            with self._lock:
                if self._clock() - self._checked >= self.reload_s:
                    self._refresh()
        return self._book

    def in_tx(self, tx: Tx) -> RuleBook:
        """The book a write transaction credits by: the versions' ids read in ``tx`` after the
        shared side of the lock that :func:`publish` takes, so that no version is published
        between this read and the transaction's commit; the book is reloaded when one was."""
        self.db.lock_key(tx, _PUBLISH_LOCK, shared=True)
        row = tx.one("SELECT COALESCE(MAX(id), 0) AS n FROM rules_versions")
        latest = int(row["n"]) if row is not None else 0
        book = self._book
        if latest != book.latest_id:
            book = book_in(tx)
            with self._lock:
                if book.latest_id > self._book.latest_id:
                    self._book = book
                    log.info("rules versions reloaded: %s", ", ".join(v.name for v in book.versions))
        return book

    def _refresh(self) -> None:
        started = self._clock()
        try:
            row = self.db.one("SELECT COALESCE(MAX(id), 0) AS n FROM rules_versions")
            latest = int(row["n"]) if row is not None else 0
            if latest != self._book.latest_id:
                self._book = load_book(self.db)
                log.info("rules versions reloaded: %s", ", ".join(v.name for v in self._book.versions))
        except (DatabaseError, RulesError) as exc:
            log.warning("could not look for newly published rules (trying again in %.0f s): %s",
                        self.reload_s, exc)
        finally:
            self._checked = started          # only now: the other threads wait until it is done


#: What crediting accepts as its rules: one file's, a book, or the running backend's book.
Source = Rules | RuleBook | LiveBook


def book_of(source: Source) -> RuleBook:
    if isinstance(source, RuleBook):
        return source
    if isinstance(source, LiveBook):
        return source.book()
    return RuleBook.single(source)


def _book(rows: list[dict[str, Any]]) -> RuleBook:
    versions = []
    for r in rows:
        rules = loads(str(r["text"]), f"rules version {r['version']} (id {r['id']})")
        versions.append(Version(rules, str(r["sha256"]), int(r["effective_from"]), int(r["id"]),
                                int(r["published_at"])))
    return RuleBook(tuple(versions), published=True)


_SELECT = "SELECT id, version, sha256, effective_from, published_at, text FROM rules_versions " \
          "ORDER BY effective_from"


def book_in(tx: Tx) -> RuleBook:
    """Every published version, read in ``tx`` (an empty book when none was published)."""
    return _book(tx.query(_SELECT))


def load_book(db: Database) -> RuleBook:
    with db.read() as tx:
        return book_in(tx)


def published_or(tx: Tx, source: Source) -> RuleBook:
    """The database's book, read in ``tx``; ``source``'s when no version was published."""
    book = book_in(tx)
    return book if book.versions else book_of(source)


def book_for(tx: Tx, source: Source) -> RuleBook:
    """What a write transaction credits by: a running backend's book as of ``tx``
    (:meth:`LiveBook.in_tx`), else ``source`` as it is."""
    return source.in_tx(tx) if isinstance(source, LiveBook) else book_of(source)


@dataclass(frozen=True)
class Published:
    version: Version
    new: bool                      # False: these bytes were published before


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms // 1000))


def _reading_times(tx: Tx) -> tuple[int | None, int | None]:
    row = tx.one("SELECT MIN(CASE WHEN clock = 'synced' THEN t ELSE t_est END) AS lo, "
                 "MAX(CASE WHEN clock = 'synced' THEN t ELSE t_est END) AS hi FROM records "
                 "WHERE status = 'accepted'")
    if row is None or row["lo"] is None:
        return None, None
    return int(row["lo"]), int(row["hi"])


def publish(db: Database, rules: Rules, now_ms: int, *, require_effective_from: bool = True) -> Published:
    """Publish ``rules`` (read from a file: :func:`backend.ledger.rules.load_rules`) at
    ``now_ms``; raise :class:`PublishError` saying which rule of the book it would break.
    Without ``require_effective_from``, a file that has none starts at 0 (``run --rules``)."""
    if not rules.text:
        raise ValueError("only rules read from a file can be published")
    where = f"{rules.source}: version {rules.version}"
    if rules.effective_from is None and require_effective_from:
        raise PublishError(f"{rules.source}: effective_from: missing; a published version says from when "
                           "it decides credits, e.g. effective_from = 2027-01-01T00:00:00Z")
    effective = 0 if rules.effective_from is None else rules.effective_from
    digest = sha256_of(rules)
    with db.write() as tx:
        db.lock_key(tx, _PUBLISH_LOCK)
        book = book_in(tx)
        same = next((v for v in book.versions if v.sha256 == digest), None)
        if same is not None:
            return Published(same, False)
        clash = next((v for v in book.versions if v.name == rules.version), None)
        if clash is not None:
            raise PublishError(f"{where}: version: {rules.version!r} is already published with other content "
                               f"(sha256 {clash.sha256}); a change is a new version: give it another "
                               "version and a later effective_from")
        earliest, latest = _reading_times(tx)
        if not book.versions:
            if earliest is not None and effective > earliest:
                raise PublishError(
                    f"{where}: effective_from: {_iso(effective)} is after the earliest accepted reading "
                    f"({_iso(earliest)}): the first version must cover the readings already credited; "
                    "publish the rules they were credited by first")
        else:
            last = book.versions[-1]
            if effective <= last.effective_from:
                raise PublishError(
                    f"{where}: effective_from: {_iso(effective)} must be later than that of every published "
                    f"version (the latest, {last.name}, starts at {_iso(last.effective_from)}): credits "
                    "already made never change")
            if latest is not None and effective <= latest:
                raise PublishError(
                    f"{where}: effective_from: {_iso(effective)} must be later than every accepted reading "
                    f"(the latest was taken at {_iso(latest)}): credits already made never change")
        tx.execute("INSERT INTO rules_versions (version, sha256, effective_from, published_at, text) "
                   "VALUES (?, ?, ?, ?, ?)", (rules.version, digest, effective, now_ms, rules.text))
        row = tx.one("SELECT id FROM rules_versions WHERE sha256 = ?", (digest,))
        assert row is not None
        device_log.log_rules(tx, rules.version, rules.text, now_ms)
    log.info("published rules %s (sha256 %s), in force from %s", rules.version, digest, _iso(effective))
    return Published(Version(rules, digest, effective, int(row["id"]), now_ms), True)


def versions(db: Database, now_ms: int) -> list[dict[str, Any]]:
    """Every published version, by ``effective_from``, with whether it is the one in force."""
    book = load_book(db)
    current = book.at(now_ms)
    return [{"id": v.id, "version": v.name, "sha256": v.sha256, "effective_from": v.effective_from,
             "published_at": v.published_at, "rules": len(v.rules.rules), "catalogue": len(v.rules.catalogue),
             "in_force": current is not None and v.id == current.id,
             "upcoming": v.effective_from > now_ms} for v in book.versions]


def redeem(db: Database, source: Source, account: str, item: str, idempotency_key: str,
           now_ms: int) -> accounts.Transfer:
    """:func:`backend.ledger.accounts.redeem` with the catalogue of the version in force now."""
    version = book_of(source).at(now_ms)
    if version is None:
        raise UnknownItem(f"item {item!r}: no rules version is in force yet, so there is no catalogue")
    return accounts.redeem(db, version.rules, account, item, idempotency_key, now_ms)

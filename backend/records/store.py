"""Storing a batch of records: one transaction per batch, then the ack (docs/protocol.md §4.3).

On SQLite, batches that workers have ready at once are written in one transaction, each in a
savepoint of its own (:meth:`backend.db.Database.write_together`): one commit for all of them.

    result = store.process_batch(db, rules, dev, body, now_ms)
    publish(topics.ack(dev), messages.encode_ack(result.ack))     # after the commit

Signatures are checked before the transaction (they are the costly part); inside it, under a
per-device lock (``db.lock_key``) so that two backend processes never handle one device at
once, the device's state is read again and each record is decided by :mod:`backend.records.verify`.
Every accepted record is appended to the transparency log and credited by
:func:`backend.ledger.rewards.credit` in the same transaction, so a record is stored, logged and
credited together or not at all. The ``through`` of the ack is therefore durable. ``rules`` is
a rule book (:mod:`backend.ledger.contracts`; a running backend's is read again in the batch's
transaction, so a version published meanwhile is seen at once) or one file's rules: a record is
checked by the version in force when the batch is received, and credited by the one in force at
its reading time.
"""

from __future__ import annotations

import bisect
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from backend.db import Database, Row, Tx, insert_many
from backend.ledger import accounts, rewards
from backend.ledger.contracts import RuleBook, Source, book_for
from backend.locks import lock_device, lock_vehicles
from backend.records import evidence
from backend.records.devices import active_device
from backend.records.evidence import DEFAULT_LIMITS, MAX_LOGGED_BODY, EvidenceLimits
from backend.records.verify import (
    MIN_WALL_MS,
    Anchor,
    Chain,
    Decision,
    DeviceKey,
    Limits,
    Parsed,
    Reading,
    Refusal,
    Stored,
    TripContext,
    VehicleTop,
    authenticate,
    decide,
    estimate_time,
    parse,
    source,
    source_of,
)
from backend.transparency import translog
from protocol import messages
from protocol.errors import BadFormat
from protocol.messages import Ack, Rejection
from protocol.records import Record

log = logging.getLogger(__name__)


_RECORD_COLUMNS = ("dev", "seq", "id", "jws", "kind", "t", "t_est", "clock", "boot", "mono_ms", "vin",
                   "odo_m",
                   "src", "status", "reason", "received_at", "base_odo_m")

#: The vehicle's highest accepted reading taken at or before a time (the trip's start).
TRIP_BEFORE_SQL = (
    "SELECT MAX(odo_m) FROM (SELECT odo_m FROM records WHERE vin = ? AND t_est <= ? AND status = 'accepted' "
    "AND odo_m IS NOT NULL ORDER BY t_est DESC LIMIT 50) AS latest")


@dataclass(frozen=True)
class BatchResult:
    dev: str
    ack: Ack
    outcomes: tuple[tuple[str, str], ...] = ()      # (status, reason) per record, for metrics
    refused: str | None = None                      # why the whole message was refused, if it was
    stored: bool = False                            # the device's row was written (it is known)


def _storable(text: str) -> str:
    """Refused content as a database can keep it: a lone surrogate (not UTF-8) and NUL (which
    PostgreSQL's text refuses) are written as escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _device_key(row: Row | None) -> DeviceKey | None:
    return None if row is None else DeviceKey(row["status"], bytes(row["pub"]))


#: How long a batch that starts past its device's ``through`` waits, at most, for another process
#: to commit the batch before it; how often it looks; how recently the device must have been
#: heard from for that to be likely.
PREDECESSOR_WAIT_S = 0.25
PREDECESSOR_POLL_S = 0.01
PREDECESSOR_RECENT_MS = 10_000


def await_predecessor(db: Database, dev: str, first: int, now_ms: int, row: Row | None = None) -> bool:
    """On PostgreSQL, where several backend processes share the devices' messages (a shared
    subscription that deals them round robin), a batch that starts past its device's ``through``
    + 1, from a device heard from moments ago, most likely follows one that another process is
    storing right now: wait for that commit (at most :data:`PREDECESSOR_WAIT_S`), rather than
    answer with a gap that the agent would send again. Whether the batch now starts at or before
    ``through`` + 1. ``row``: the device's ``through`` and ``last_seen`` as just read, if at hand."""
    if db.dialect != "postgresql":
        return False                 # one process: a device's batches are handled in turn already
    deadline = time.monotonic() + PREDECESSOR_WAIT_S
    while True:
        if row is None:
            row = db.one("SELECT through, last_seen FROM devices WHERE dev = ?", (dev,))
        if row is None or first <= int(row["through"]) + 1:
            return row is not None
        if row["last_seen"] is None or now_ms - int(row["last_seen"]) > PREDECESSOR_RECENT_MS:
            return False             # not heard from lately: a real gap, answered at once
        if time.monotonic() >= deadline:
            return False
        time.sleep(PREDECESSOR_POLL_S)
        row = None


def _key_of(db: Database, dev: str) -> DeviceKey | None:
    return _device_key(db.one("SELECT status, pub FROM devices WHERE dev = ?", (dev,)))


def _authenticate_all(dev: str, items: list[Parsed | Refusal],
                      keys: dict[str, DeviceKey | None]) -> list[Record | Refusal]:
    return [item if isinstance(item, Refusal) else authenticate(dev, item, keys.get(item.kid))
            for item in items]


def _is_anchor(record: Record) -> bool:
    return record.clock == "synced" and record.t >= MIN_WALL_MS


def _later_anchors(checked: list[Record | Refusal]) -> list[Anchor | None]:
    """For each record, the next synced record of the same boot later in the batch."""
    out: list[Anchor | None] = []
    following: dict[str, Anchor] = {}
    for item in reversed(checked):
        if isinstance(item, Refusal):
            out.append(None)
            continue
        out.append(following.get(item.boot))
        if _is_anchor(item):
            following[item.boot] = Anchor(item.t, item.mono_ms)
    return out[::-1]


def process_batch(db: Database, rules: Source, dev: str, body: bytes, now_ms: int,
                  limits: EvidenceLimits = DEFAULT_LIMITS) -> BatchResult:
    """Verify and store one ``records`` message published on ``dev``'s topic."""
    return prepare(db, dev, body, now_ms).store(db, rules, limits)


@dataclass
class Prepared:
    """A ``records`` message parsed and its signatures checked (:func:`prepare`), not yet
    stored: :meth:`store` decides and stores it."""

    dev: str
    body: bytes
    now_ms: int
    sent: messages.Batch
    texts: list[Any]
    items: list[Parsed | Refusal]
    checked: list[Record | Refusal]
    snapshot: dict[str, DeviceKey | None]
    refused_batch: Refusal | None
    refused: str | None

    def store(self, db: Database, rules: Source, limits: EvidenceLimits = DEFAULT_LIMITS) -> BatchResult:
        """Decide each record and store the batch in one transaction (on SQLite, together with the
        batches that other workers have ready: one commit for all)."""
        return db.write_together(lambda tx: self.store_in(db, tx, rules, limits))

    def store_in(self, db: Database, tx: Tx, rules: Source, limits: EvidenceLimits) -> BatchResult:
        """:meth:`store` in the write transaction ``tx`` (:meth:`Database.write_each` writes
        several batches in one)."""
        dev = self.dev
        lock_device(db, tx, dev)
        device = tx.one("SELECT * FROM devices WHERE dev = ?", (dev,))
        fresh = _device_key(device)
        verdicts = self.checked
        if fresh != self.snapshot[dev]:                     # approved or revoked meanwhile
            verdicts = _authenticate_all(dev, self.items, {**self.snapshot, dev: fresh})
        signed = [c for c in verdicts if isinstance(c, Record)]
        if device is not None:
            lock_vehicles(db, tx, [v for v in (*(r.vin for r in signed), device["vin"]) if v is not None])
        batch = _Batch(tx, book_for(tx, rules), dev, device, self.now_ms, self.sent, limits, signed)
        if self.refused_batch is not None:
            batch.refuse(self.refused_batch, self.body[:MAX_LOGGED_BODY].decode("utf-8", "replace"))
        for text, item, later in zip(self.texts, verdicts, _later_anchors(verdicts), strict=True):
            if isinstance(item, Refusal):
                batch.refuse(item, text if isinstance(text, str) else json.dumps(text)[:MAX_LOGGED_BODY])
            else:
                batch.take(item, later)
        ack = batch.finish()
        return BatchResult(dev, ack, tuple(batch.outcomes), self.refused, stored=device is not None)


def prepare(db: Database, dev: str, body: bytes, now_ms: int) -> Prepared:
    """Parse a ``records`` message published on ``dev``'s topic and check its signatures, outside
    any transaction (the costly part)."""
    refused_batch: Refusal | None = None
    refused: str | None = None
    try:
        sent = messages.decode_batch(body)
    except BadFormat as exc:
        refused = "too_large" if isinstance(exc, messages.TooLarge) else "bad_format"
        sent, refused_batch = messages.Batch(()), Refusal(None, "bad_format", str(exc))
    texts = list(sent.records)
    # Each record parsed, then its signature checked, one after the other.
    own = db.one("SELECT status, pub, through, last_seen FROM devices WHERE dev = ?", (dev,))
    snapshot = {dev: _device_key(own)}
    items: list[Parsed | Refusal] = []
    checked: list[Record | Refusal] = []
    for text in texts:
        item = parse(text)
        items.append(item)
        if isinstance(item, Refusal):
            checked.append(item)
            continue
        if item.kid not in snapshot:
            snapshot[item.kid] = _key_of(db, item.kid)
        checked.append(authenticate(dev, item, snapshot[item.kid]))
    first = min((c.seq for c in checked if isinstance(c, Record)), default=None)
    if first is not None:
        await_predecessor(db, dev, first, now_ms, own)
    return Prepared(dev, body, now_ms, sent, texts, items, checked, snapshot, refused_batch, refused)


def _trip_span(record: Record, signed: int) -> tuple[int, int]:
    """A trip's start and end on the backend's clock, from its (estimated) signing time: a trip
    is signed after its end (after the off debounce, or only when the agent starts again after a
    power cut), and its times and ``t`` are on one clock, so it ended that long before."""
    end = signed - max(0, record.t - int(record.fields["end_t"]))
    return end - (int(record.fields["end_t"]) - int(record.fields["start_t"])), end


#: Readings of a vehicle between a batch's trips that are read at once, at most; past that, each
#: trip reads its own.
WINDOW_ROWS = 2000


@dataclass(frozen=True)
class _Window:
    """A vehicle's accepted readings with ``lo <= t_est <= hi`` (``rows``, by time) and the 50
    latest before ``lo`` (``before``, latest first), as (t_est, odo_m, kind)."""

    lo: int
    hi: int
    rows: list[tuple[int, int, str]]
    before: list[tuple[int, int, str]]

    @classmethod
    def read(cls, tx: Tx, vin: str, lo: int, hi: int) -> _Window | None:
        rows = [(int(r["t_est"]), int(r["odo_m"]), str(r["kind"])) for r in tx.query(
            "SELECT t_est, odo_m, kind FROM records WHERE vin = ? AND t_est >= ? AND t_est <= ? "
            "AND status = 'accepted' AND odo_m IS NOT NULL ORDER BY t_est LIMIT ?",
            (vin, lo, hi, WINDOW_ROWS + 1))]
        if len(rows) > WINDOW_ROWS:
            return None
        before = [(int(r["t_est"]), int(r["odo_m"]), str(r["kind"])) for r in tx.query(
            "SELECT t_est, odo_m, kind FROM records WHERE vin = ? AND t_est < ? AND status = 'accepted' "
            "AND odo_m IS NOT NULL ORDER BY t_est DESC LIMIT 50", (vin, lo))]
        return cls(lo, hi, rows, before)

    def context(self, start: int, end: int) -> tuple[int | None, int | None, int | None]:
        """What :data:`TRIP_BEFORE_SQL` and the query of readings during a trip would read: the
        highest of the 50 latest readings at or before ``start``; the lowest and highest
        odometer readings from ``start`` to ``end``."""
        upto = bisect.bisect_right(self.rows, start, key=lambda r: r[0])
        latest = [odo for _, odo, _ in self.rows[max(0, upto - 50):upto]]
        latest += [odo for _, odo, _ in self.before[:50 - len(latest)]]
        inside = self.rows[bisect.bisect_left(self.rows, start, key=lambda r: r[0]):
                           bisect.bisect_right(self.rows, end, key=lambda r: r[0])]
        during = [odo for _, odo, kind in inside if kind == "odometer"]
        return (max(latest, default=None), min(during, default=None), max(during, default=None))


class _Batch:
    """The records of one batch, decided in order inside one transaction."""

    def __init__(self, tx: Tx, rules: RuleBook, dev: str, device: Row | None, now_ms: int,
                 sent: messages.Batch, limits: EvidenceLimits,
                 records: list[Record]) -> None:
        self.tx, self.rules, self.dev, self.now_ms = tx, rules, dev, now_ms
        self.sent, self.evidence = sent, limits
        self.device = dict(device) if device is not None else None
        self.through = int(device["through"]) if device else 0
        self.head_id: str = (device["head_id"] if device else None) or ""
        self.rejected: list[Rejection] = []
        self.outcomes: list[tuple[str, str]] = []
        self._last: dict[str | None, Reading | None] = {}
        self._anchors: dict[str, Anchor | None] = {}
        self._records = records
        self._start_through = self.through
        self._prefetched = False
        self._taken: dict[int, Stored] = {}
        self._tops: dict[str, VehicleTop | None] = {}
        self._raised: dict[str, bool] = {}          # VINs whose top this batch raised: was there a row?
        self._trips: dict[str, TripContext] = {}
        self._windows: dict[str, _Window | None] = {}
        # VIN -> its readings accepted by this batch: (t_est, odo_m, kind)
        self._readings: dict[str, list[tuple[int, int, str]]] = {}
        self._rows: list[tuple[Any, ...]] = []          # records decided, written by _flush
        self._logged: list[tuple[str, bytes]] = []       # accepted ones, for the log
        self._credits = rewards.Pending(tx)
        self.held_now = False
        checks = rules.for_receipt(now_ms).rules
        self.limits = Limits(int(checks.max_speed_kph), now_ms, checks.max_clock_ahead_ms,
                             checks.rollback_tolerance_m)

    # -- refusals: records that do not take a seq ----------------------------------------------

    def refuse(self, refusal: Refusal, body: str) -> None:
        self.rejected.append(Rejection(refusal.seq, refusal.reason))
        self.outcomes.append(("rejected", refusal.reason))
        log.info("%s: refused record seq=%s: %s (%s)", self.dev, refusal.seq, refusal.reason, refusal.detail)
        evidence.keep(self.tx, self.dev, self.device is not None, refusal.seq, refusal.reason,
                      _storable(refusal.detail), _storable(body), self.now_ms, self.evidence)

    # -- authenticated records -----------------------------------------------------------------

    def _vin_scope(self, record: Record) -> str | None:
        assert self.device is not None
        return record.vin if record.vin is not None else self.device["vin"]

    def _flush(self) -> None:
        """Write the records decided so far, and store the accepted ones for the log: in a few
        statements a batch, and before anything reads the records table."""
        if self._rows:
            insert_many(self.tx, "records", _RECORD_COLUMNS, self._rows)
            self._rows = []
        if self._logged:
            translog.append_many(self.tx, "record", self._logged, self.now_ms)
            self._logged = []
        self._credits.flush(self.now_ms)

    def _last_reading(self, vin: str | None) -> Reading | None:
        """The last accepted odometer reading of this device in the vehicle ``vin``."""
        if vin not in self._last:
            self._flush()
            where = "vin = ?" if vin is not None else "vin IS NULL"
            params: tuple[Any, ...] = (self.dev, vin) if vin is not None else (self.dev,)
            row = self.tx.one(
                "SELECT odo_m, src, kind, t, clock, boot, mono_ms FROM records "
                f"WHERE dev = ? AND {where} AND status = 'accepted' AND odo_m IS NOT NULL "
                "ORDER BY seq DESC LIMIT 1", params)
            self._last[vin] = None if row is None else Reading(
                int(row["odo_m"]), source(row["kind"], row["src"]),
                int(row["t"]), row["clock"], row["boot"], int(row["mono_ms"]))
        return self._last[vin]

    def _vehicle_top(self, vin: str | None) -> VehicleTop | None:
        """The vehicle's highest accepted reading, from any device (read once, then kept)."""
        if vin is None:
            return None
        if vin not in self._tops:
            row = self.tx.one("SELECT top_odo_m, top_src, top_dev, top_seq FROM vehicles WHERE vin = ?",
                              (vin,))
            self._tops[vin] = None if row is None else VehicleTop(int(row["top_odo_m"]), row["top_src"],
                                                                  row["top_dev"], int(row["top_seq"]))
        return self._tops[vin]

    def _raise_top(self, vin: str, record: Record, odo: int) -> None:
        """Raise the vehicle's highest reading (written once per batch, by :meth:`finish`)."""
        top = self._vehicle_top(vin)
        if top is not None and odo <= top.odo_m:
            return
        if vin not in self._raised:
            self._raised[vin] = top is not None
        self._tops[vin] = VehicleTop(odo, source_of(record), self.dev, record.seq)

    def _write_tops(self) -> None:
        for vin, existed in self._raised.items():
            top = self._tops[vin]
            assert top is not None
            values = (top.odo_m, top.src, top.dev, top.seq, self.now_ms, vin)
            if existed:
                self.tx.execute("UPDATE vehicles SET top_odo_m = ?, top_src = ?, top_dev = ?, top_seq = ?, "
                                "updated_at = ? WHERE vin = ?", values)
            else:
                self.tx.execute("INSERT INTO vehicles (top_odo_m, top_src, top_dev, top_seq, updated_at, "
                                "vin) VALUES (?, ?, ?, ?, ?, ?)", values)

    def _trip_context(self, record: Record, vin: str, later: Anchor | None) -> TripContext:
        """The vehicle's accepted readings before and during the trip, by their reading times
        (``t`` of a synced clock, else the backend's estimate); read once per trip."""
        if record.id not in self._trips:
            self._trips[record.id] = self._read_trip_context(record, vin, later)
        return self._trips[record.id]

    def _read_trip_context(self, record: Record, vin: str, later: Anchor | None) -> TripContext:
        signed = estimate_time(record, self._anchors_for(record, later), self.now_ms, self._sent_mono(record))
        start, end = _trip_span(record, signed)
        window = self._window(vin)
        if window is not None and window.lo <= start and end <= window.hi:
            before, lo, hi = window.context(start, end)
        else:
            # t_est is the reading time (a synced clock's t, else the estimate), indexed per VIN. The
            # vehicle's odometer only rises, so the latest readings before the start hold its highest.
            before = self.tx.scalar(TRIP_BEFORE_SQL, (vin, start))
            during = self.tx.one(
                "SELECT MIN(odo_m) AS lo, MAX(odo_m) AS hi FROM records WHERE vin = ? AND t_est >= ? "
                "AND t_est <= ? AND status = 'accepted' AND kind = 'odometer' AND odo_m IS NOT NULL",
                (vin, start, end))
            lo = during["lo"] if during is not None else None
            hi = during["hi"] if during is not None else None
        # and this batch's accepted readings (those written by a _flush since are counted twice:
        # a maximum or a minimum does not mind)
        mine = self._readings.get(vin, ())
        earlier = [odo for t, odo, _ in mine if t <= start]
        inside = [odo for t, odo, kind in mine if start <= t <= end and kind == "odometer"]
        before = max([*earlier, *([] if before is None else [int(before)])], default=None)
        lo = min([*inside, *([] if lo is None else [int(lo)])], default=None)
        hi = max([*inside, *([] if hi is None else [int(hi)])], default=None)
        return TripContext(before, lo, hi)

    def _window(self, vin: str) -> _Window | None:
        """The vehicle's accepted readings over the times of the batch's trips signed on a synced
        clock (whose times need no estimate), read once: a trip within them needs no query of its
        own. None when the batch has no such trip or too many readings fall in between."""
        if vin not in self._windows:
            spans = [_trip_span(r, r.t) for r in self._records
                     if r.kind == "trip" and _is_anchor(r) and self._vin_scope(r) == vin]
            self._windows[vin] = _Window.read(self.tx, vin, min(s for s, _ in spans),
                                              max(e for _, e in spans)) if spans else None
        return self._windows[vin]

    def _sent_mono(self, record: Record) -> int | None:
        return self.sent.mono_ms if self.sent.boot == record.boot else None

    def _stored(self, seq: int) -> Stored | None:
        """What is stored at a seq already taken; the batch's range is read in one query."""
        if seq not in self._taken and seq <= self._start_through and not self._prefetched:
            self._prefetched = True
            low = min((r.seq for r in self._records), default=seq)
            rows = self.tx.query("SELECT seq, id, status, reason FROM records WHERE dev = ? AND seq >= ? "
                                 "AND seq <= ?", (self.dev, min(low, seq), self._start_through))
            for row in rows:
                self._taken.setdefault(int(row["seq"]), Stored(row["id"], row["status"], row["reason"]))
        return self._taken.get(seq)

    def take(self, record: Record, later: Anchor | None) -> None:
        assert self.device is not None                       # authenticated: the device exists
        vin = self._vin_scope(record)
        fresh = record.seq == self.through + 1               # a replay or a gap needs no context
        trip = self._trip_context(record, vin, later) if fresh and record.kind == "trip" and vin else None
        chain = Chain(self.through, self.head_id, self.device["vin"], self._last_reading(vin), self.limits,
                      self._vehicle_top(vin), trip)
        stored = self._stored(record.seq) if record.seq <= self.through else None
        decision = decide(record, chain, stored)
        if decision.takes_seq:
            decision = self._first_vin(record) or decision
        if decision.outcome == "duplicate":
            self.outcomes.append(("duplicate", ""))
            if stored is not None and stored.status == "rejected" and stored.reason:
                self.rejected.append(Rejection(record.seq, stored.reason))
        elif decision.outcome == "gap":
            self.outcomes.append(("gap", ""))
        elif decision.outcome == "fork":
            self.tx.insert_ignore("forks", {"dev": self.dev, "seq": record.seq, "record_id": record.id,
                                            "jws": record.jws, "received_at": self.now_ms}, ["record_id"])
            self._reject(record, decision)
            # Two records signed for one seq: the key is cloned (or the device broken), and either
            # record may be the copy's. Its rewards wait for an operator, as for a rollback.
            self._hold(f"fork at seq {record.seq}: a second record signed for a seq already taken "
                       "(a cloned key?)")
        elif decision.outcome == "hold":
            if self.device["flagged_vin"] != record.vin:
                self.tx.execute("UPDATE devices SET flagged_vin = ? WHERE dev = ?", (record.vin, self.dev))
                self.device["flagged_vin"] = record.vin
                log.warning("%s: now reads VIN %s, approved for %s: its records wait for an operator",
                            self.dev, record.vin, self.device["vin"])
            evidence.keep(self.tx, self.dev, True, record.seq, "vin_mismatch", decision.detail, record.jws,
                          self.now_ms, self.evidence)
            self._reject(record, decision)
        else:
            self._store(record, decision, later)

    def _first_vin(self, record: Record) -> Decision | None:
        """A hold when a device approved without a VIN first reads one whose vehicle has another
        active device: the VIN is not taken on, an operator decides (``approve --replace``)."""
        assert self.device is not None
        if self.device["vin"] is not None or record.vin is None:
            return None
        active = active_device(self.tx, record.vin, self.dev)
        if active is None:
            return None
        return Decision("hold", "vin_mismatch", f"record reads VIN {record.vin}, whose active device is "
                                                f"{active}")

    def _reject(self, record: Record, decision: Decision) -> None:
        assert decision.reason is not None
        self.rejected.append(Rejection(record.seq, decision.reason))
        self.outcomes.append(("rejected", decision.reason))
        log.info("%s: seq %d %s: %s", self.dev, record.seq, decision.reason, decision.detail)

    def _anchors_for(self, record: Record, later: Anchor | None) -> list[Anchor]:
        """Synced records of the record's boot: the last one stored, and the next in the batch."""
        if record.boot not in self._anchors:
            row = self.tx.one("SELECT t, mono_ms FROM records WHERE dev = ? AND boot = ? "
                              "AND clock = 'synced' AND t >= ? ORDER BY seq DESC LIMIT 1",
                              (self.dev, record.boot, MIN_WALL_MS))
            self._anchors[record.boot] = None if row is None else Anchor(int(row["t"]), int(row["mono_ms"]))
        return [a for a in (self._anchors[record.boot], later) if a is not None]

    def _store(self, record: Record, decision: Decision, later: Anchor | None) -> None:
        assert self.device is not None
        t_est = estimate_time(record, self._anchors_for(record, later), self.now_ms, self._sent_mono(record))
        status = "accepted" if decision.outcome == "accept" else "rejected"
        vin = self._vin_scope(record)
        base = None
        if record.kind == "trip" and vin is not None:
            base = self._trip_context(record, vin, later).before_m
        self._rows.append((self.dev, record.seq, record.id, record.jws, record.kind, record.t, t_est,
                           record.clock, record.boot, record.mono_ms, record.vin, record.odo_m,
                           record.fields.get("src"), status, decision.reason, self.now_ms, base))
        self.through, self.head_id = record.seq, record.id
        self._taken[record.seq] = Stored(record.id, status, decision.reason)
        if _is_anchor(record):
            self._anchors[record.boot] = Anchor(record.t, record.mono_ms)
        if status == "rejected":
            self._reject(record, decision)
            if decision.reason == "odometer_rollback":
                self._hold(f"odometer_rollback at seq {record.seq}: {decision.detail}")
            return
        if record.vin is not None and self.device["vin"] is None:
            # The first VIN read by a device enrolled without one: later records must match it.
            self.tx.execute("UPDATE devices SET vin = ? WHERE dev = ? AND vin IS NULL",
                            (record.vin, self.dev))
            self.device["vin"] = record.vin
        reading = Reading.of(record)
        if reading is not None:
            self._last[self._vin_scope(record)] = reading
            if vin is not None:
                self._readings.setdefault(vin, []).append((t_est, reading.odo_m, record.kind))
            scope = self._vin_scope(record)
            if scope is not None:
                self._raise_top(scope, record, reading.odo_m)
        self._logged.append((record.id, record.jws.encode("ascii")))
        rewards.credit(self.tx, self.rules, record, self.device, self.now_ms,
                       stored=rewards.Stored(t_est, self.now_ms, base), pending=self._credits, fresh=True)
        self.outcomes.append(("accepted", ""))

    def _hold(self, why: str) -> None:
        """Flag the device: its rewards are held until an operator clears or revokes it."""
        assert self.device is not None
        if self.device.get("held_at") is None:
            self.tx.execute("UPDATE devices SET held_at = ?, held_reason = ? "
                            "WHERE dev = ? AND held_at IS NULL", (self.now_ms, why, self.dev))
            self.device["held_at"], self.device["held_reason"] = self.now_ms, why
            self.held_now = True
            log.warning("%s: flagged, rewards held until an operator clears it: %s", self.dev, why)

    def finish(self) -> Ack:
        self._flush()
        self._write_tops()
        if self.device is None:
            return Ack(0, tuple(self.rejected), None)
        self.tx.execute("UPDATE devices SET through = ?, head_id = ?, last_seen = ? WHERE dev = ?",
                        (self.through, self.head_id or None, self.now_ms, self.dev))
        balance = accounts.device_balance(self.tx, self.dev, self.device["vin"], self.now_ms)
        return Ack(self.through, tuple(self.rejected), balance)

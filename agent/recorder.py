"""Readings become signed records: build the payload, sign it at the chain tip, append.

Signing happens inside the outbox's write transaction (see
:meth:`agent.buffer.Outbox.append`): the recorder hands it one builder per
reading, which signs for the (seq, prev) the transaction found.

Admission, when the backlog of unsynced records grows (the car has been out of
coverage for weeks), keeps the chain verifiable instead of deleting records the
backend still needs:

- at 90 % of ``max_records`` unsynced, ``odometer`` samples are no longer
  written (each ``trip`` record still states its start and end odometer), and a
  ``buffer_pruned`` event says so; when the backlog drains, another
  ``buffer_pruned`` event counts what was skipped;
- at ``max_records`` unsynced, only ``trip`` and ``confirmation`` records are
  written.

A write that fails (disk full, I/O error) is an error state, not a crash, and the
outbox counts as full: what was being written is held in memory and written, in
order, once a write works again (tried at each reading); meanwhile only ``trip``
and ``confirmation`` readings are held (at most ``HOLD_LIMIT``, the oldest go
first), everything else is counted and dropped. On a full disk the oldest synced
records (they are on the backend already) are deleted to make room. Records are
signed only when written, so the chain stays whole. When writing works again, a
``buffer_pruned`` event (``"mode": "disk_full"``) counts what was dropped and
deleted, if anything was. Nothing unsynced is touched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.buffer import Builder, Outbox
from agent.clock import Clock, mono_ms
from agent.config import DEFAULT_MAX_RECORDS
from agent.errors import StorageError
from agent.state import CONFIRMATION_DUE, CONFIRMED, Confirmed, Writes, save, writes
from common.clock import now_ms
from protocol import records
from protocol.errors import BadFormat
from protocol.identity import SigningKey
from protocol.records import GENESIS, Record

log = logging.getLogger(__name__)

THIN_AT = 0.9
HOLD_LIMIT = 10_000
#: Kinds still held in memory while the outbox cannot be written.
HELD_KINDS = ("trip", "confirmation")
#: On a full disk, synced records deleted to make room: this share of ``max_records``, at least ``ROOM_MIN``.
ROOM_SHARE = 0.1
ROOM_MIN = 100
#: A retention that expires nothing (pruning for room goes by count alone).
NO_EXPIRY_MS = 2**62


class ReadingLike(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def fields(self) -> Mapping[str, object]: ...


@dataclass(frozen=True)
class Item:
    """A reading stamped with the times and VIN it was taken under."""

    kind: str
    fields: Mapping[str, object]
    t: int = 0
    mono_ms: int = 0
    clock: str = "unsynced"
    vin: str | None = None


@dataclass
class _Admission:
    thinning: bool = False
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass
class _Unwritable:
    """What a failing outbox cost: readings dropped (by kind), synced records deleted for room."""

    skipped: dict[str, int] = field(default_factory=dict)
    deleted_synced: int = 0


class Recorder:
    def __init__(
        self, outbox: Outbox, key: SigningKey, *, clock: Clock, boot: str,
        max_records: int = DEFAULT_MAX_RECORDS, vin: str | None = None,
        wall: Callable[[], int] = now_ms, mono: Callable[[], int] = mono_ms,
    ) -> None:
        self.outbox = outbox
        self.key = key
        self.dev = key.public.id
        self.clock = clock
        self.boot = boot
        self.max_records = max_records
        self.vin = vin
        self._wall = wall
        self._mono = mono
        self._held: list[Item] = []
        self._admission = _Admission()
        self._unwritable = _Unwritable()
        self.error: str | None = None

    # -- building -------------------------------------------------------------------------------

    def stamp(self, kind: str, fields: Mapping[str, object]) -> Item | None:
        """Stamp a reading now; None (logged) when it would not make a valid record."""
        item = Item(kind, dict(fields), self._wall(), self._mono(), self.clock.state(), self.vin)
        try:
            records.validate({"v": records.VERSION, **self._payload(item, 1, GENESIS)})
        except BadFormat as exc:
            log.error("dropping a malformed %s reading (%s): %r", kind, exc, dict(fields))
            return None
        return item

    def _payload(self, item: Item, seq: int, prev: str) -> dict[str, Any]:
        return {
            "dev": self.dev, "seq": seq, "prev": prev, "kind": item.kind, "t": item.t,
            "clock": item.clock, "boot": self.boot, "mono_ms": item.mono_ms, "vin": item.vin,
            **item.fields,
        }

    def _builder(self, item: Item) -> Builder:
        def build(seq: int, prev: str) -> Record:
            return records.sign(self.key, self._payload(item, seq, prev))
        return build

    # -- admission ------------------------------------------------------------------------------

    def _admit(self, items: list[Item]) -> list[Item]:
        backlog = self.outbox.backlog() + len(self._held)
        thin = backlog >= THIN_AT * self.max_records
        full = backlog >= self.max_records
        adm = self._admission
        out: list[Item] = []
        if thin and not adm.thinning:
            log.warning("outbox nearly full (%d unsynced of %d): odometer samples are no longer written",
                        backlog, self.max_records)
            adm.thinning = True
            ev = self.stamp("event", {"event": "buffer_pruned", "detail": {
                "mode": "thinning", "backlog": backlog, "max_records": self.max_records}})
            out += [ev] if ev else []
        elif not thin and adm.thinning:
            log.info("outbox below its limit again; skipped while thinning: %s", adm.skipped)
            ev = self.stamp("event", {"event": "buffer_pruned", "detail": {
                "mode": "normal", "skipped": dict(adm.skipped), "backlog": backlog}})
            out += [ev] if ev else []
            self._admission = adm = _Admission()
        for item in items:
            if item.kind in ("trip", "confirmation") or (item.kind == "event" and not full) or not thin:
                out.append(item)
            else:
                adm.skipped[item.kind] = adm.skipped.get(item.kind, 0) + 1
        return out

    # -- writing --------------------------------------------------------------------------------

    def record(self, readings: Sequence[ReadingLike], state: Writes | None = None) -> list[Record]:
        """Record readings (and save ``state``) in one transaction; [] on a storage error.
        In the error state, what is held is written first (a transaction of its own)."""
        fresh = [i for r in readings if (i := self.stamp(r.kind, r.fields)) is not None]
        written = self._write_held() if self.error is not None else []
        if self.error is not None:
            self._hold(fresh)
            return []
        try:
            items = self._admit(fresh)
        except StorageError as exc:
            self._fail(exc, fresh)
            return written
        if not items:
            if state:
                try:
                    save(self.outbox, state)
                except StorageError as exc:
                    self._fail(exc, [])
            return written
        try:
            out = self.outbox.append([self._builder(i) for i in items], state)
        except StorageError as exc:
            self._fail(exc, items)
            return written
        return written + out

    def _write_held(self) -> list[Record]:
        """Try the held readings again (after an event counting what was lost, if anything
        was); the records written, [] while the outbox still fails."""
        lost = self._unwritable
        note = None
        if lost.skipped or lost.deleted_synced:
            note = self.stamp("event", {"event": "buffer_pruned", "detail": {
                "mode": "disk_full", "skipped": dict(lost.skipped), "deleted_synced": lost.deleted_synced}})
        items = [*([note] if note else []), *self._held]
        try:
            out = self.outbox.append([self._builder(i) for i in items]) if items else []
        except StorageError as exc:
            self._fail(exc, self._held)
            return []
        log.warning("outbox writable again; wrote %d held records; dropped meanwhile: %s, synced records "
                    "deleted for room: %d", len(self._held), lost.skipped or "nothing", lost.deleted_synced)
        self._held, self.error, self._unwritable = [], None, _Unwritable()
        return out

    def _fail(self, exc: StorageError, items: list[Item]) -> None:
        """Enter (or stay in) the error state, holding ``items``: readings admitted before the
        write failed, all of them, up to ``HOLD_LIMIT``."""
        if self.error is None:
            log.error("%s; holding trips and confirmations in memory until a write works, dropping "
                      "other readings", exc)
        self.error = str(exc)
        self._held = []
        self._hold(items, every_kind=True)
        if "full" in str(exc):
            self._make_room()

    def _hold(self, items: Sequence[Item], *, every_kind: bool = False) -> None:
        """Hold ``items`` of :data:`HELD_KINDS` (or of every kind), the oldest held going past
        ``HOLD_LIMIT``; count the rest."""
        skipped = self._unwritable.skipped
        for item in items:
            if every_kind or item.kind in HELD_KINDS:
                self._held.append(item)
            else:
                skipped[item.kind] = skipped.get(item.kind, 0) + 1
        for item in self._held[:max(0, len(self._held) - HOLD_LIMIT)]:
            skipped[item.kind] = skipped.get(item.kind, 0) + 1
        del self._held[:max(0, len(self._held) - HOLD_LIMIT)]

    def _make_room(self) -> None:
        """Delete the oldest synced records, so that the outbox's own free pages take the next writes."""
        try:
            counts = self.outbox.counts()
            if counts.total == counts.unsynced:
                return
            room = max(ROOM_MIN, int(self.max_records * ROOM_SHARE))
            _, deleted = self.outbox.prune(self._wall(), retention_ms=NO_EXPIRY_MS,
                                           max_records=max(0, counts.total - room))
        except StorageError as exc:
            log.debug("cannot make room in the outbox: %s", exc)
            return
        if deleted:
            self._unwritable.deleted_synced += deleted
            log.warning("outbox: disk full: deleted the %d oldest synced records to make room", deleted)

    def event(self, name: str, detail: object = None, state: Writes | None = None) -> list[Record]:
        return self.record([Item("event", {"event": name, "detail": detail})], state)

    def confirm(self, odo_m: int, device_odo_m: int | None, week: str | None = None) -> Record:
        """Append a driver's confirmation now (after what is held); raises :class:`StorageError`
        when it cannot."""
        if self.error is not None:
            self._write_held()
            if self.error is not None:
                raise StorageError(self.error)
        t = self._wall()
        week = week or records.iso_week(t)
        item = self.stamp("confirmation", {"odo_m": odo_m, "device_odo_m": device_odo_m, "week": week})
        if item is None:
            raise ValueError("confirmation: odo_m must be a non-negative whole number of metres")
        confirmed = Confirmed(odo_m, device_odo_m, week, item.t)
        (rec,) = self.outbox.append([self._builder(item)],
                                    writes(CONFIRMED.entry(confirmed), CONFIRMATION_DUE.entry(None)))
        return rec

    @property
    def held(self) -> int:
        return len(self._held)

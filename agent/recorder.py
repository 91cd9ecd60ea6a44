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

A write that fails (disk full, I/O error) is an error state, not a crash: the
readings are held in memory (bounded) and written, in order, once a write
works again. Nothing already stored is touched.
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
        self._dropped = 0
        self._admission = _Admission()
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
        """Record readings (and save ``state``) in one transaction; [] on a storage error."""
        fresh = [i for r in readings if (i := self.stamp(r.kind, r.fields)) is not None]
        try:
            items = self._held + self._admit(fresh)
        except StorageError as exc:
            items = self._held + fresh
            self._fail(exc, items)
            return []
        if not items:
            if state:
                try:
                    save(self.outbox, state)
                except StorageError as exc:
                    self._fail(exc, [])
            return []
        try:
            out = self.outbox.append([self._builder(i) for i in items], state)
        except StorageError as exc:
            self._fail(exc, items)
            return []
        if self.error:
            log.warning("outbox writable again; wrote %d held records", len(items) - len(fresh))
        self._held, self.error = [], None
        return out

    def _fail(self, exc: StorageError, items: list[Item]) -> None:
        if self.error is None:
            log.error("%s; holding readings in memory until a write works", exc)
        self.error = str(exc)
        if len(items) > HOLD_LIMIT:
            self._dropped += len(items) - HOLD_LIMIT
            log.error("dropped %d readings that could not be stored", self._dropped)
            items = items[-HOLD_LIMIT:]
        self._held = items

    def event(self, name: str, detail: object = None, state: Writes | None = None) -> list[Record]:
        return self.record([Item("event", {"event": name, "detail": detail})], state)

    def confirm(self, odo_m: int, device_odo_m: int | None, week: str | None = None) -> Record:
        """Append a driver's confirmation now; raises :class:`StorageError` when it cannot."""
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

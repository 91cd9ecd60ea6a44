"""What ``odo-agent status``, ``confirm``, ``remind`` and the driver's page show, read
from the outbox's state (:mod:`agent.state`; the daemon keeps its live view there)."""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from dataclasses import dataclass

from agent import state
from agent.buffer import Outbox
from agent.clock import Clock
from agent.state import Confirmed, LastRejection
from common.clock import now_ms
from protocol.records import iso_week


@dataclass(frozen=True)
class Summary:
    dev: str
    vin: str | None
    last_seq: int
    synced_through: int
    backlog: int
    odo_m: int | None             # the device's current odometer (the daemon's live view)
    src: str | None
    obd: str                      # adapter state, or "unknown" when the daemon never ran
    trip: Mapping[str, object] | None
    balance: int | None           # milli-tokens, from the last ack
    last_ack_t: int | None
    clock: str
    week: str                     # the current ISO week
    confirmed: Confirmed | None   # the last confirmation
    confirmation_due: bool
    enrolled: str | None          # approved | pending | rejected | None (never asked)
    enrollment_reason: str | None
    live_t: int | None            # when the daemon last saved its live view
    error: str | None
    last_rejection: LastRejection | None
    confirmation_rejected: str | None = None   # the backend's reason, if it rejected the last one
    sync: str | None = None       # the daemon's broker connection: online | offline | auth_refused
    sync_refusal: str | None = None

    @property
    def since_confirmed_m(self) -> int | None:
        if self.odo_m is None or not self.confirmed:
            return None
        return self.odo_m - self.confirmed.odo_m

    def as_json(self) -> dict[str, object]:
        return {
            "dev": self.dev, "vin": self.vin, "last_seq": self.last_seq,
            "synced_through": self.synced_through, "backlog": self.backlog, "odo_m": self.odo_m,
            "obd": self.obd, "balance": self.balance, "src": self.src,
            "trip": dict(self.trip) if self.trip else None, "last_ack_t": self.last_ack_t,
            "clock": self.clock, "confirmation_due": self.confirmation_due, "enrolled": self.enrolled,
            "enrollment_reason": self.enrollment_reason, "week": self.week,
            "confirmed": self.confirmed.as_json() if self.confirmed else None,
            "since_confirmed_m": self.since_confirmed_m, "live_t": self.live_t, "error": self.error,
            "last_rejection": self.last_rejection.as_json() if self.last_rejection else None,
            "sync": self.sync, "sync_refusal": self.sync_refusal,
            "confirmation_rejected": self.confirmation_rejected,
        }


def read(outbox: Outbox, dev: str, clock: Clock, now: int | None = None) -> Summary:
    now = now_ms() if now is None else now
    counts = outbox.counts()
    live = state.LIVE.get(outbox)
    ack = state.ACK.get(outbox)
    enrollment = state.ENROLLMENT.get(outbox)
    confirmed = state.CONFIRMED.get(outbox)
    sync = state.SYNC.get(outbox)
    last = outbox.latest("confirmation")
    week = iso_week(now)
    return Summary(
        dev=dev, vin=state.VIN.get(outbox), last_seq=counts.last_seq,
        synced_through=counts.synced_through, backlog=counts.unsynced,
        odo_m=live.odo_m if live else None, src=live.src if live else None,
        obd=(live.obd if live else None) or "unknown", trip=live.trip if live else None,
        balance=ack.balance if ack else None, last_ack_t=ack.t if ack else None, clock=clock.state(),
        week=week, confirmed=confirmed, confirmation_due=not confirmed or confirmed.week != week,
        enrolled=enrollment.status if enrollment else None,
        enrollment_reason=enrollment.reason if enrollment else None,
        live_t=live.t if live else None, error=live.error if live else None,
        last_rejection=state.LAST_REJECTION.get(outbox),
        sync=sync.state if sync else None, sync_refusal=sync.refusal if sync else None,
        confirmation_rejected=last.rejected if last is not None else None,
    )


def parse_km(text: str) -> int:
    """``12345`` or ``12345.6`` (km, one decimal at most) → metres as an int; ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d{1,7})(?:\.(\d))?\s*", text)
    if not m:
        raise ValueError(f"{text!r}: give whole kilometres or one decimal, e.g. 12345.6")
    return int(m.group(1)) * 1000 + int(m.group(2) or 0) * 100


def km(metres: int | None) -> str:
    """12345600 → ``12,345.6 km``; None → ``unknown``."""
    if metres is None:
        return "unknown"
    sign = "-" if metres < 0 else ""
    tenths = (abs(metres) + 50) // 100
    return f"{sign}{tenths // 10:,}.{tenths % 10} km"


def when(t_ms: int | None) -> str:
    if t_ms is None:
        return "never"
    moment = datetime.datetime.fromtimestamp(t_ms / 1000, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def tokens(milli: int | None) -> str:
    if milli is None:
        return "unknown"
    return f"{milli // 1000:,}.{milli % 1000:03d} tokens"


def text(s: Summary) -> str:
    """The status in words."""
    lines = [
        f"device       {s.dev}",
        f"vehicle      {s.vin or 'VIN not read yet'}",
        f"enrolment    {s.enrolled or 'not enrolled'}"
        + (f" ({s.enrollment_reason})" if s.enrollment_reason else ""),
        f"odometer     {km(s.odo_m)}" + (f" ({s.src})" if s.src else "") + f", as of {when(s.live_t)}",
        f"adapter      {s.obd}",
    ]
    if s.trip:
        start = s.trip.get("start_t")
        lines.append(f"trip         under way since {when(start if isinstance(start, int) else None)}")
    lines += [
        f"records      {s.last_seq} signed, synced through {s.synced_through}, {s.backlog} waiting to sync",
        f"broker       {s.sync or 'never connected'}" + (f": {s.sync_refusal}" if s.sync_refusal else ""),
        f"last ack     {when(s.last_ack_t)}",
        f"balance      {tokens(s.balance)}",
        f"clock        {s.clock}",
    ]
    if s.confirmed:
        lines.append(f"confirmed    {km(s.confirmed.odo_m)} in week {s.confirmed.week}"
                     f" ({km(s.since_confirmed_m)} since)")
        if s.confirmation_rejected:
            lines.append(f"             rejected by the backend: {s.confirmation_rejected}")
    else:
        lines.append("confirmed    never")
    lines.append(f"this week    {s.week}: " + ("confirmation due" if s.confirmation_due else "confirmed"))
    if s.last_rejection:
        lines.append(f"waiting      backend did not take seq {s.last_rejection.seq}: "
                     f"{s.last_rejection.reason}")
    if s.error:
        lines.append(f"ERROR        {s.error}")
    return "\n".join(lines)

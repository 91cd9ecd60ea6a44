"""Mileage per vehicle and month (or ISO week), and the ledger's transfers in a time range: the
queries that ``GET /api/vehicles/{vin}/mileage`` (:mod:`backend.web.exports`) and
``odo-backend export`` (:mod:`backend.cli.export`) share, and their one CSV form.

Readings are a vehicle's accepted ``odometer`` records (by ``records.vin``, from every device
it has had; rejected records, trips and the driver's confirmations are not readings), placed
in time by ``t_est``. A period is a calendar month (or an ISO week, Monday 00:00) in UTC, cut to
the range asked for; it holds the readings with ``start <= t_est < end``. Its distance is how far
the vehicle's odometer (its highest reading so far) rose in it: from the highest reading
before the period (or, for the vehicle's first, the period's first reading) to the highest
reading up to its end. Two dongles in one car read one odometer, so nothing is counted twice,
and the distances of consecutive periods add up to the whole range's.

A lease allowance (``odo-backend vehicles allowance``) is a distance a year; a period's share of
it is a twelfth a calendar month (a week: 7 / 365.2425 of it), in proportion for a period cut by
the range, to the nearest metre. Distances in km or mi are decimal text with three decimals,
to the nearest (:mod:`common.units`).

CSV (RFC 4180: a header row, CRLF line ends, fields quoted when they need it) is safe to open in
a spreadsheet: a text cell that begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage
return gets a leading ``'`` so that it is not read as a formula; numbers are written as they are.
"""

from __future__ import annotations

import csv
import datetime
import io
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from backend.db import Database, Tx
from common import units
from protocol.identity import VIN_RE

PERIODS = ("month", "week")
#: A range may span at most this many days (ten years and their leap days).
MAX_RANGE_DAYS = 3653
MAX_TIME_TEXT = 40
EARLIEST = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
LATEST = datetime.datetime(2200, 1, 1, tzinfo=datetime.UTC)
MEAN_YEAR_MS = 31_556_952_000                  # 365.2425 days
#: An allowance of at most this many metres a year (ten million km).
MAX_ALLOWANCE_M = 10**10
LEDGER_PAGE = 1000

_READINGS = ("FROM records WHERE vin = ? AND status = 'accepted' AND kind = 'odometer' "
             "AND odo_m IS NOT NULL")
#: The vehicle's highest reading before a time (it only rises: the latest readings hold it).
_BEFORE_SQL = (f"SELECT MAX(odo_m) FROM (SELECT odo_m {_READINGS} AND t_est < ? "
               "ORDER BY t_est DESC LIMIT 50) AS latest")


def mileage_columns(unit: str) -> tuple[str, ...]:
    """The mileage CSV's header (and the keys of each JSON period), for ``unit``."""
    u = units.check_unit(unit)
    return ("vin", "period", "period_start", "period_end", "readings",
            "first_reading_at", "first_odo_m", f"first_odo_{u}", "last_reading_at", "last_odo_m",
            f"last_odo_{u}", "distance_m", f"distance_{u}", "allowance_m", f"allowance_{u}",
            "over_allowance_m", f"over_allowance_{u}")


LEDGER_COLUMNS = ("id", "created_at", "from_account", "to_account", "amount_milli_tokens", "rule_id",
                  "rules_version", "vin", "dev", "week", "memo", "record_id", "key")


# -- the range and its periods ---------------------------------------------------------------

def parse_moment(text: str, what: str) -> datetime.datetime:
    """An ISO 8601 date (midnight UTC) or date and time (UTC unless it names a zone), within
    1970 to 2200; ValueError naming ``what`` otherwise."""
    if len(text) > MAX_TIME_TEXT:
        raise ValueError(f"{what}: at most {MAX_TIME_TEXT} characters")
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not an ISO 8601 date or time "
                         "(e.g. 2026-01-01 or 2026-01-01T00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    moment = moment.astimezone(datetime.UTC)
    if not EARLIEST <= moment <= LATEST:
        raise ValueError(f"{what}: {text!r} is not between 1970 and 2200")
    return moment


@dataclass(frozen=True)
class Range:
    start: datetime.datetime
    end: datetime.datetime

    @property
    def start_ms(self) -> int:
        return _ms(self.start)

    @property
    def end_ms(self) -> int:
        return _ms(self.end)


def parse_range(from_text: str, to_text: str) -> Range:
    """``from`` and ``to`` (``to`` after ``from``, at most ten years on); ValueError naming them."""
    start, end = parse_moment(from_text, "from"), parse_moment(to_text, "to")
    if end <= start:
        raise ValueError(f"to: {to_text!r} is not after from {from_text!r}")
    if end - start > datetime.timedelta(days=MAX_RANGE_DAYS):
        raise ValueError(f"to: {to_text!r} is more than ten years ({MAX_RANGE_DAYS} days) after "
                         f"from {from_text!r}")
    return Range(start, end)


def check_per(value: str) -> str:
    if value not in PERIODS:
        raise ValueError(f"per: must be month or week, got {value[:20]!r}")
    return value


def _ms(moment: datetime.datetime) -> int:
    return (moment - EARLIEST) // datetime.timedelta(milliseconds=1)


def iso(t_ms: int) -> str:
    """Unix ms as ``2026-01-01T00:00:00Z``."""
    moment = EARLIEST + datetime.timedelta(milliseconds=t_ms)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Period:
    label: str                 # 2026-01, or 2026-W03
    start_ms: int
    end_ms: int
    share: Fraction            # of a year: what part of an allowance falls in it


def periods(r: Range, per: str) -> list[Period]:
    """The calendar months (or ISO weeks) that ``r`` touches, in UTC, each cut to ``r``."""
    check_per(per)
    out = []
    if per == "month":
        cursor = r.start.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    else:
        day = r.start.replace(hour=0, minute=0, second=0, microsecond=0)
        cursor = day - datetime.timedelta(days=day.weekday())
    while cursor < r.end:
        if per == "month":
            following = cursor.replace(year=cursor.year + cursor.month // 12, month=cursor.month % 12 + 1)
            label = f"{cursor.year:04d}-{cursor.month:02d}"
        else:
            following = cursor + datetime.timedelta(days=7)
            year, week, _ = cursor.isocalendar()
            label = f"{year:04d}-W{week:02d}"
        lo, hi = max(cursor, r.start), min(following, r.end)
        whole = _ms(following) - _ms(cursor)
        part = Fraction(_ms(hi) - _ms(lo), whole)
        share = part / 12 if per == "month" else part * whole / MEAN_YEAR_MS
        out.append(Period(label, _ms(lo), _ms(hi), share))
        cursor = following
    return out


# -- vehicles --------------------------------------------------------------------------------

def check_vin(vin: str) -> str:
    if len(vin) > 17 or not VIN_RE.fullmatch(vin):
        raise ValueError(f"{vin[:40]!r} is not a VIN (17 characters of A-H J-N P R-Z 0-9)")
    return vin


def known_vin(tx: Tx, vin: str) -> bool:
    """Whether the backend has heard of ``vin``: a device approved for it, a record of it, or
    an allowance."""
    return any(tx.one(sql, (vin,)) is not None for sql in (
        "SELECT 1 FROM devices WHERE vin = ? LIMIT 1",
        "SELECT 1 FROM vehicles WHERE vin = ?",
        "SELECT 1 FROM records WHERE vin = ? LIMIT 1",
        "SELECT 1 FROM vehicle_allowances WHERE vin = ?"))


def all_vins(tx: Tx) -> list[str]:
    """Every vehicle with an accepted reading or an allowance, in VIN order."""
    rows = tx.query("SELECT vin FROM vehicles UNION SELECT vin FROM vehicle_allowances ORDER BY vin")
    return [r["vin"] for r in rows]


def allowance(tx: Tx, vin: str) -> tuple[int, str] | None:
    """The vehicle's allowance: (metres a year, the unit it was given in), or None."""
    row = tx.one("SELECT per_year_m, unit FROM vehicle_allowances WHERE vin = ?", (vin,))
    return None if row is None else (int(row["per_year_m"]), str(row["unit"]))


def set_allowance(db: Database, vin: str, per_year_m: int, unit: str, now_ms: int, by: str) -> bool:
    """Set (or replace) the vehicle's allowance; False when it was already exactly that."""
    check_vin(vin)
    units.check_unit(unit)
    if not 0 < per_year_m <= MAX_ALLOWANCE_M:
        raise ValueError(f"{per_year_m} m a year: must be from 1 m to {MAX_ALLOWANCE_M} m")
    with db.write() as tx:
        if allowance(tx, vin) == (per_year_m, unit):
            return False
        if not tx.insert_ignore("vehicle_allowances", {"vin": vin, "per_year_m": per_year_m, "unit": unit,
                                                       "set_at": now_ms, "set_by": by}, ("vin",)):
            tx.execute("UPDATE vehicle_allowances SET per_year_m = ?, unit = ?, set_at = ?, set_by = ? "
                       "WHERE vin = ?", (per_year_m, unit, now_ms, by, vin))
    return True


# -- mileage ---------------------------------------------------------------------------------

class Figure(str):
    """A distance in km or mi as decimal text (``-12.345``): a number in CSV, a string in JSON."""


def _figure(metres: int | None, unit: str) -> Figure | None:
    return None if metres is None else Figure(units.decimal_text(metres, unit))


def _nearest(value: Fraction) -> int:
    return (value.numerator * 2 + value.denominator) // (2 * value.denominator)


def vehicle_mileage(tx: Tx, vin: str, r: Range, per: str, unit: str) -> list[dict[str, Any]]:
    """One row per period of ``r`` for ``vin``, keyed by :func:`mileage_columns`."""
    lease = allowance(tx, vin)
    level = tx.scalar(_BEFORE_SQL, (vin, r.start_ms))
    level = None if level is None else int(level)
    rows = []
    for p in periods(r, per):
        span = (vin, p.start_ms, p.end_ms)
        agg = tx.one(f"SELECT COUNT(*) AS n, MAX(odo_m) AS hi {_READINGS} AND t_est >= ? AND t_est < ?", span)
        count = int(agg["n"]) if agg else 0
        first = last = None
        distance = 0
        if count:
            first = tx.one(f"SELECT odo_m, t_est {_READINGS} AND t_est >= ? AND t_est < ? "
                           "ORDER BY t_est, dev, seq LIMIT 1", span)
            last = tx.one(f"SELECT odo_m, t_est {_READINGS} AND t_est >= ? AND t_est < ? "
                          "ORDER BY t_est DESC, dev DESC, seq DESC LIMIT 1", span)
            assert agg is not None and first is not None and last is not None
            base = level if level is not None else int(first["odo_m"])
            level = max(base, int(agg["hi"]))
            distance = level - base
        share = _nearest(lease[0] * p.share) if lease else None
        over = distance - share if share is not None else None
        values = (vin, p.label, iso(p.start_ms), iso(p.end_ms), count,
                  iso(int(first["t_est"])) if first else None, int(first["odo_m"]) if first else None,
                  _figure(int(first["odo_m"]), unit) if first else None,
                  iso(int(last["t_est"])) if last else None, int(last["odo_m"]) if last else None,
                  _figure(int(last["odo_m"]), unit) if last else None,
                  distance, _figure(distance, unit), share, _figure(share, unit), over, _figure(over, unit))
        rows.append(dict(zip(mileage_columns(unit), values, strict=True)))
    return rows


def mileage_document(db: Database, vin: str, r: Range, per: str, unit: str) -> dict[str, Any]:
    """The JSON answer of ``GET /api/vehicles/{vin}/mileage``."""
    with db.read() as tx:
        lease = allowance(tx, vin)
        rows = vehicle_mileage(tx, vin, r, per, unit)
    return {
        "vin": vin, "per": per, "unit": unit, "from": iso(r.start_ms), "to": iso(r.end_ms),
        "allowance_per_year_m": lease[0] if lease else None,
        "allowance_per_year": _figure(lease[0], unit) if lease else None,
        "columns": list(mileage_columns(unit)), "periods": rows,
        "total_distance_m": sum(int(p["distance_m"]) for p in rows),
    }


def fleet_mileage(db: Database, r: Range, per: str, unit: str,
                  vins: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """The rows of every vehicle (or of ``vins``), vehicle by vehicle."""
    with db.read() as tx:
        chosen = list(vins) if vins is not None else all_vins(tx)
    for vin in chosen:
        with db.read() as tx:
            yield from vehicle_mileage(tx, vin, r, per, unit)


# -- the ledger ------------------------------------------------------------------------------

_LEDGER_SQL = (
    "SELECT t.id, t.created_at, t.from_account, t.to_account, t.amount AS amount_milli_tokens, t.rule_id, "
    "t.rules_version, COALESCE(r.vin, d.vin) AS vin, t.dev, t.week, t.memo, t.record_id, t.key "
    "FROM transfers t LEFT JOIN records r ON r.id = t.record_id LEFT JOIN devices d ON d.dev = t.dev "
    "WHERE t.created_at >= ? AND t.created_at < ? AND t.id > ?")


def ledger(db: Database, r: Range, vin: str | None = None) -> Iterator[dict[str, Any]]:
    """The transfers made in ``r`` (of ``vin``'s records or devices, when given), in ledger order,
    read a page at a time in one transaction."""
    where = " AND COALESCE(r.vin, d.vin) = ?" if vin is not None else ""
    after = 0
    with db.read() as tx:
        while True:
            params: tuple[Any, ...] = (r.start_ms, r.end_ms, after, *((vin,) if vin is not None else ()))
            page = tx.query(f"{_LEDGER_SQL}{where} ORDER BY t.id LIMIT {LEDGER_PAGE}", params)
            for row in page:
                yield {**row, "created_at": iso(int(row["created_at"]))}
            if len(page) < LEDGER_PAGE:
                return
            after = int(page[-1]["id"])


# -- CSV -------------------------------------------------------------------------------------

_FORMULA = re.compile(r"[=+\-@\t\r]")


def cell(value: object) -> str:
    """One CSV field: integers and figures as they are, None empty, text with a leading ``'``
    when a spreadsheet would take it for a formula."""
    if value is None:
        return ""
    if isinstance(value, Figure) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    text = str(value)
    return "'" + text if _FORMULA.match(text) else text


def csv_lines(columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    """The CSV text, a line at a time: the header, then one line per row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([cell(row[c]) for c in columns])
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    if buffer.getvalue():
        yield buffer.getvalue()

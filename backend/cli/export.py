"""``odo-backend export``: mileage and ledger files for the fleet manager::

    odo-backend export mileage --from ISO --to ISO --format csv [--vin VIN] [--per month|week]
                               [--unit km|mi] --db URL [--out FILE]
    odo-backend export ledger  --from ISO --to ISO --format csv [--vin VIN] --db URL [--out FILE]

``mileage`` has one row per vehicle and month (or ISO week), as ``GET /api/vehicles/{vin}/mileage``
gives it; ``ledger`` one row per transfer made in the range. The columns, the CSV's form and
its guard against spreadsheet formulas are :mod:`backend.records.mileage`'s. Times are UTC
unless they name a zone; ``--to`` is not included. Distances are in metres and in ``--unit``
(default: the one vehicle's unit with ``--vin``, else the fleet's ``display_unit``).

With ``--out`` the file appears whole or not at all (written beside it, then renamed).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterator

from backend.cli.common import Subparsers, add_db_options, database
from backend.config import display_unit, settings
from backend.errors import UsageError
from backend.records import display_units, mileage


def _range(args: argparse.Namespace) -> mileage.Range:
    try:
        return mileage.parse_range(args.start, args.end)
    except ValueError as exc:
        raise UsageError(f"--{exc}") from None


def _vin(args: argparse.Namespace) -> str | None:
    if args.vin is None:
        return None
    try:
        return mileage.check_vin(args.vin)
    except ValueError as exc:
        raise UsageError(f"--vin: {exc}") from None


def _write(lines: Iterator[str], out: str | None) -> int:
    """Write the CSV to ``out`` (whole, or not at all) or to stdout; the number of data rows."""
    rows = -1
    if out is None:
        for line in lines:
            sys.stdout.write(line)
            rows += line.count("\r\n")
        sys.stdout.flush()
        return rows
    directory = os.path.dirname(os.path.abspath(out))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".export-", dir=directory)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write there ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            for line in lines:
                f.write(line)
                rows += line.count("\r\n")
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return rows


def cmd_mileage(args: argparse.Namespace) -> int:
    r, vin = _range(args), _vin(args)
    fleet_unit = display_unit(settings(args)) if args.unit is None else args.unit
    db = database(args)
    try:
        with db.read() as tx:
            if vin is not None and not mileage.known_vin(tx, vin):
                raise UsageError(f"--vin: no vehicle {vin} is known")
            unit = args.unit or (display_units.vehicle_unit(tx, vin, fleet_unit) if vin else fleet_unit)
        rows = mileage.fleet_mileage(db, r, args.per, unit, [vin] if vin else None)
        count = _write(mileage.csv_lines(mileage.mileage_columns(unit), rows), args.out)
    finally:
        db.close()
    if args.out:
        print(f"{args.out}: {count} rows (per {args.per}, {unit})", file=sys.stderr)
    return 0


def cmd_ledger(args: argparse.Namespace) -> int:
    r, vin = _range(args), _vin(args)
    db = database(args)
    try:
        count = _write(mileage.csv_lines(mileage.LEDGER_COLUMNS, mileage.ledger(db, r, vin)), args.out)
    finally:
        db.close()
    if args.out:
        print(f"{args.out}: {count} transfers", file=sys.stderr)
    return 0


def register(sub: Subparsers) -> None:
    p = sub.add_parser("export", help="mileage and ledger files (CSV) for the fleet manager",
                       description="Mileage per vehicle and period, or the ledger's transfers, as CSV.")
    esub = p.add_subparsers(dest="export_command", required=True, metavar="mileage|ledger")
    for name, text, func in (
            ("mileage", "per vehicle and month (or week): readings, distance, allowance", cmd_mileage),
            ("ledger", "the transfers made in the range", cmd_ledger)):
        q = esub.add_parser(name, help=text, description=text)
        q.add_argument("--from", dest="start", metavar="ISO", required=True,
                       help="from this date or time (UTC unless it names a zone), included")
        q.add_argument("--to", dest="end", metavar="ISO", required=True,
                       help="to this date or time, not included; at most ten years after --from")
        q.add_argument("--format", choices=("csv",), default="csv", help="csv (RFC 4180; the default)")
        q.add_argument("--vin", help="only this vehicle")
        if name == "mileage":
            q.add_argument("--per", choices=mileage.PERIODS, default="month", help="month (default) or week")
            q.add_argument("--unit", choices=("km", "mi"),
                           help="distances in km or mi beside metres (default: the vehicle's, or the "
                                "fleet's display_unit)")
        add_db_options(q, out=True)
        q.set_defaults(func=func)

"""``odo-backend vehicles``: what the fleet manager knows of a vehicle beyond its dongles::

    odo-backend vehicles allowance VIN --per-year-km N | --per-year-mi N --db URL

A lease's mileage allowance, a distance a year, is what ``odo-backend export mileage`` and
``GET /api/vehicles/{vin}/mileage`` set each period's distance against. It is kept in whole
metres (1 mi = 1609.344 m, to the nearest metre) with the unit it was given in; setting it again
replaces it, and setting the same figure again changes nothing.
"""

from __future__ import annotations

import argparse
import getpass
from collections.abc import Callable

from backend.cli.common import Subparsers, add_db_options, database
from backend.errors import UsageError
from backend.records import mileage
from common import units
from common.clock import now_ms


def _figure(unit: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            return units.parse(text, unit)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def cmd_allowance(args: argparse.Namespace) -> int:
    try:
        vin = mileage.check_vin(args.vin)
    except ValueError as exc:
        raise UsageError(f"VIN: {exc}") from None
    unit = "km" if args.per_year_km is not None else "mi"
    metres = args.per_year_km if args.per_year_km is not None else args.per_year_mi
    db = database(args)
    try:
        changed = mileage.set_allowance(db, vin, metres, unit, now_ms(), f"cli:{getpass.getuser()}")
    except ValueError as exc:
        raise UsageError(f"--per-year-{unit}: {exc}") from None
    finally:
        db.close()
    said = "allowance of" if changed else "allowance already"
    print(f"{vin}: {said} {units.show(metres, unit)} a year ({metres} m)")
    return 0


def register(sub: Subparsers) -> None:
    p = sub.add_parser("vehicles", help="vehicles: lease mileage allowances",
                       description="What the fleet manager knows of a vehicle beyond its dongles.")
    vsub = p.add_subparsers(dest="vehicles_command", required=True, metavar="allowance")
    q = vsub.add_parser("allowance", help="set a vehicle's lease mileage allowance a year",
                        description="Set the distance a year the vehicle's lease allows; exports set "
                                    "each period's distance against its share of it.")
    q.add_argument("vin", metavar="VIN")
    figure = q.add_mutually_exclusive_group(required=True)
    figure.add_argument("--per-year-km", type=_figure("km"), metavar="N", help="kilometres a year")
    figure.add_argument("--per-year-mi", type=_figure("mi"), metavar="N", help="miles a year")
    add_db_options(q)
    q.set_defaults(func=cmd_allowance)

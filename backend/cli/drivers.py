"""``odo-backend drivers``: drivers, and the vehicles they are assigned to::

    odo-backend drivers add ID [--name NAME] --db URL
    odo-backend drivers assign ID --vin VIN [--from ISO8601] --db URL
    odo-backend drivers list --db URL [--json]
"""

from __future__ import annotations

import argparse
import json

from backend.cli.common import Subparsers, add_db_options, database, iso
from backend.config import parse_time
from backend.errors import AssignmentError, UsageError
from backend.ledger import assignments
from common.clock import now_ms


def cmd_add(args: argparse.Namespace) -> int:
    db = database(args)
    try:
        d = assignments.add_driver(db, args.driver_id, args.name, now_ms())
    except AssignmentError as exc:
        raise UsageError(str(exc)) from None
    finally:
        db.close()
    print(f"driver {d.id} added; wallet driver:{d.id}")
    return 0


def cmd_assign(args: argparse.Namespace) -> int:
    now = now_ms()
    start = parse_time(args.valid_from, "--from") if args.valid_from else now
    db = database(args)
    try:
        moved = assignments.assign(db, args.driver_id, args.vin, start, now)
    except AssignmentError as exc:
        raise UsageError(str(exc)) from None
    finally:
        db.close()
    total = sum(t.amount for t in moved)
    print(f"{args.driver_id} drives {args.vin} from {iso(start)}"
          + (f"; moved {len(moved)} earlier reward(s), {total} milli-tokens, to driver:{args.driver_id}"
             if moved else ""))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    db = database(args)
    try:
        rows = assignments.drivers(db, now_ms())
    finally:
        db.close()
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no drivers yet: odo-backend drivers add ID --db URL")
    for d in rows:
        current = [a["vin"] for a in d["assignments"] if a["current"]]
        name = f" ({d['name']})" if d["name"] else ""
        print(f"{d['id']}{name}\tbalance {d['balance']} milli-tokens\t"
              f"drives {', '.join(current) if current else 'nothing now'}")
    return 0


def register(sub: Subparsers) -> None:
    drivers = sub.add_parser("drivers", help="drivers and their vehicles",
                             description="Drivers, and the vehicles they are assigned to.")
    dsub = drivers.add_subparsers(dest="drivers_command", required=True, metavar="add|assign|list")
    p = dsub.add_parser("add", help="add a driver (and so the wallet driver:ID)")
    p.add_argument("driver_id", metavar="ID")
    p.add_argument("--name", help="the driver's name, for people")
    add_db_options(p)
    p.set_defaults(func=cmd_add)
    p = dsub.add_parser("assign", help="assign a driver to a vehicle from a time on",
                        description="Assign a driver to a vehicle from --from (default: now) on; the "
                                    "vehicle's previous assignment ends then, and rewards for its readings "
                                    "since then that wait unassigned move to the driver.")
    p.add_argument("driver_id", metavar="ID")
    p.add_argument("--vin", required=True, help="the vehicle's VIN")
    p.add_argument("--from", dest="valid_from", metavar="ISO8601", help="start (UTC unless a zone is given)")
    add_db_options(p)
    p.set_defaults(func=cmd_assign)
    p = dsub.add_parser("list", help="list drivers, balances and current vehicles")
    add_db_options(p, json_flag=True)
    p.set_defaults(func=cmd_list)

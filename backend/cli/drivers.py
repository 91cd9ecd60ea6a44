"""``odo-backend drivers``: drivers, and the vehicles they are assigned to::

    odo-backend drivers add ID [--name NAME] --db URL
    odo-backend drivers assign ID --vin VIN [--from ISO8601] --db URL
    odo-backend drivers end ID --vin VIN [--at ISO8601] --db URL    # an assignment or claim ends
    odo-backend drivers list --db URL [--json]
    odo-backend drivers login-code ID --db URL [--ttl MINUTES]   # a one-time code for the portal
    odo-backend drivers password ID --db URL     # the portal password, from stdin or asked twice
"""

from __future__ import annotations

import argparse
import json
import sys

from backend.cli.common import Subparsers, add_db_options, database, iso
from backend.cli.operators import read_password
from backend.config import parse_time
from backend.errors import AssignmentError, AuthError, UsageError
from backend.ledger import assignments, claims
from backend.web import portal_auth
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


def cmd_end(args: argparse.Namespace) -> int:
    now = now_ms()
    at = parse_time(args.at, "--at") if args.at else now
    db = database(args)
    try:
        ended = claims.end(db, args.driver_id, args.vin, at, now)
    except AssignmentError as exc:
        raise UsageError(str(exc)) from None
    finally:
        db.close()
    print(f"{ended.driver_id} drives {ended.vin} from {iso(ended.valid_from)} to {iso(ended.valid_to)}"
          + ("" if ended.changed else " (it had ended then already)"))
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


def cmd_login_code(args: argparse.Namespace) -> int:
    db = database(args)
    try:
        made = portal_auth.issue_login_code(db, args.driver_id, now_ms(), args.ttl * 60_000)
    except AuthError as exc:
        raise UsageError(str(exc)) from None
    finally:
        db.close()
    print(made.code)
    print(f"one-time code for driver {args.driver_id}, good once until {iso(made.expires_at)}: "
          "sign in at /driver/login", file=sys.stderr)
    return 0


def cmd_password(args: argparse.Namespace) -> int:
    password = read_password(sys.stdin)
    db = database(args)
    try:
        portal_auth.set_driver_password(db, args.driver_id, password, now_ms())
    except AuthError as exc:
        raise UsageError(str(exc)) from None
    finally:
        db.close()
    print(f"portal password of driver {args.driver_id} set; their sessions have ended")
    return 0


def ttl_minutes(text: str) -> int:
    """An argparse type: a login code's lifetime in minutes, within what codes may last."""
    low, high = portal_auth.MIN_CODE_TTL_MS // 60_000, portal_auth.MAX_CODE_TTL_MS // 60_000
    if not text.isdigit() or len(text) > 6 or not low <= int(text) <= high:
        raise argparse.ArgumentTypeError(f"{text!r}: minutes from {low} to {high}")
    return int(text)


def register(sub: Subparsers) -> None:
    drivers = sub.add_parser("drivers", help="drivers and their vehicles",
                             description="Drivers, and the vehicles they are assigned to.")
    dsub = drivers.add_subparsers(dest="drivers_command", required=True,
                                  metavar="add|assign|end|list|login-code|password")
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
    p = dsub.add_parser("end", help="end a driver's assignment or claim of a vehicle",
                        description="End the driver's assignment or claim of the vehicle at --at (default: "
                                    "now; never later, nor before a reading whose reward is the driver's "
                                    "already); readings after it earn for whoever claims the vehicle next. "
                                    "Ending one that ended then already changes nothing.")
    p.add_argument("driver_id", metavar="ID")
    p.add_argument("--vin", required=True, help="the vehicle's VIN")
    p.add_argument("--at", metavar="ISO8601", help="when it ends (UTC unless a zone is given)")
    add_db_options(p)
    p.set_defaults(func=cmd_end)
    p = dsub.add_parser("list", help="list drivers, balances and current vehicles")
    add_db_options(p, json_flag=True)
    p.set_defaults(func=cmd_list)
    p = dsub.add_parser("login-code", help="print a one-time code to sign in to the drivers' portal",
                        description="Print a one-time code with which the driver signs in to the portal "
                                    "(/driver/login) once; it replaces the driver's codes not yet used.")
    p.add_argument("driver_id", metavar="ID")
    p.add_argument("--ttl", type=ttl_minutes, metavar="MINUTES",
                   default=portal_auth.DEFAULT_CODE_TTL_MS // 60_000,
                   help="how long the code is good for (default: %(default)s)")
    add_db_options(p)
    p.set_defaults(func=cmd_login_code)
    p = dsub.add_parser("password", help="set the driver's portal password (from stdin or a prompt)",
                        description="Set the driver's password for the portal (/driver/login), read from "
                                    "stdin or asked twice on a terminal; ends the driver's sessions.")
    p.add_argument("driver_id", metavar="ID")
    add_db_options(p)
    p.set_defaults(func=cmd_password)

"""``odo-backend devices``: the operator's view of the dongles::

    odo-backend devices list|show DEV|revoke DEV --db URL [--json]
    odo-backend devices approve DEV [--vin VIN] [--replace] --db URL [--json]
    odo-backend devices clear DEV --db URL --rules FILE [--json]   # credit what a flag held
    odo-backend devices unit DEV km|mi|default --db URL            # the unit its figures are shown in

A vehicle has one active device: ``approve`` refuses a second one, naming the active device,
unless ``--replace`` retires it (its history is kept).
"""

from __future__ import annotations

import argparse
import getpass
from typing import Any

from backend.cli.common import Subparsers, add_db_options, database, iso, load_rules_setting, print_json
from backend.errors import DeviceError, UsageError
from backend.records import devices, display_units
from common.clock import now_ms


def _device_line(d: dict[str, Any]) -> str:
    flag = f"  VIN CHANGED to {d['flagged_vin']}" if d.get("flagged_vin") else ""
    if d.get("held_since") is not None:
        flag += "  FLAGGED: rewards held"
    odo = f"{d['odo_m'] / 1000:.1f} km" if d["odo_m"] is not None else "-"
    return (f"{d['dev']}  {d['status']:<8}  {d['vin'] or '-':<17}  seq {d['last_seq']:<6}  {odo:>11}  "
            f"{'online ' if d['online'] else 'offline'}  seen {iso(d['last_seen'])}{flag}")


def cmd_unit(args: argparse.Namespace) -> int:
    """Set the unit a device's figures are shown in (``default``: the fleet's ``display_unit``)."""
    unit = None if args.unit == "default" else args.unit
    db = database(args)
    try:
        changed = display_units.set_device_unit(db, args.dev, unit)
    except DeviceError as exc:
        raise UsageError(str(exc)) from None
    finally:
        db.close()
    shown = unit or "the fleet's display_unit"
    print(f"{args.dev}: figures shown in {shown}" + ("" if changed else " (already)"))
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    db = database(args)
    try:
        action = args.devices_command
        if action == "list":
            rows = devices.list_devices(db)
            if args.json:
                print_json(rows)
            else:
                for row in rows:
                    print(_device_line(row))
                if not rows:
                    print("no devices have enrolled yet")
            return 0
        who = f"cli:{getpass.getuser()}"
        if action == "show":
            d = devices.get_device(db, args.dev)
        elif action == "approve":
            d = devices.approve(db, args.dev, now_ms(), who, args.vin, replace=args.replace)
        elif action == "clear":
            d = devices.clear(db, load_rules_setting(args), args.dev, now_ms(), who)
        else:
            d = devices.revoke(db, args.dev, now_ms(), who)
        if args.json:
            print_json(d)
        else:
            print(_device_line(d))
            if d.get("held_since") is not None:
                print(f"  FLAGGED since {iso(d['held_since'])}: {d['held_reason']}; rewards held until "
                      "cleared "
                      f"(odo-backend devices clear {d['dev']} --db URL --rules FILE)")
            if action == "show":
                print(f"  pub {d['pub']}\n  accepted {d['accepted']}, rejected {d['rejected']}, "
                      f"backlog {d['backlog'] if d['backlog'] is not None else '-'}\n"
                      f"  enrolled {iso(d['enrollment']['enrolled_at'])}, decided "
                      f"{iso(d['enrollment']['decided_at'])} by {d['enrollment']['decided_by'] or '-'}")
        return 0
    except DeviceError as exc:
        raise UsageError(str(exc)) from None
    finally:
        db.close()


def register(sub: Subparsers) -> None:
    p = sub.add_parser("devices", help="list, show, approve or revoke devices")
    dsub = p.add_subparsers(dest="devices_command", required=True,
                            metavar="list|show|approve|revoke|clear|unit")
    add_db_options(dsub.add_parser("list", help="every device"), json_flag=True)
    for name, text in (("show", "one device"),
                       ("approve", "approve a device (a flagged one for its new VIN)"),
                       ("revoke", "revoke a device: its records are refused from now on"),
                       ("clear", "clear a device's rollback flag: the rewards held since are credited")):
        q = dsub.add_parser(name, help=text)
        q.add_argument("dev", metavar="DEV")
        if name == "approve":
            q.add_argument("--vin", help="the VIN to approve it for (default: the VIN it now reads)")
            q.add_argument("--replace", action="store_true",
                           help="retire the vehicle's active device (its history is kept)")
        if name == "clear":
            q.add_argument("--rules", metavar="FILE", help="the rules file (default: $ODO_RULES)")
        add_db_options(q, json_flag=True)
    p.set_defaults(func=cmd_devices, vin=None, replace=False)
    q = dsub.add_parser("unit", help="show a device's figures in km or mi (default: the fleet's)")
    q.add_argument("dev", metavar="DEV")
    q.add_argument("unit", choices=display_units.CHOICES, metavar="km|mi|default")
    add_db_options(q)
    q.set_defaults(func=cmd_unit)
